//! PNG charts with `plotters` on the bitmap backend, with an embedded font so they render on
//! machines that have no fonts installed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Result, StoreError};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Registers the embedded font as `sans-serif` (idempotent).
pub fn register_font() {
    REGISTER.call_once(|| {
        // The font is compiled in; failing to parse it is a build defect, not a runtime state.
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| "embedded font is invalid")
            .expect("embedded DejaVuSans.ttf parses");
    });
}

/// One named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A bar with a label and a value.
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    pub value: f64,
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::output(path, e)
}

/// Draws a line chart (log-2 x axis when `log2_x`) on the left and a horizontal bar chart on the
/// right, into one PNG of `size` pixels.
#[allow(clippy::too_many_arguments)]
pub fn lines_and_bars(
    path: &Path,
    size: (u32, u32),
    title: &str,
    line_title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    bar_title: &str,
    bar_unit: &str,
    bars: &[Bar],
) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let root = root
        .titled(title, ("sans-serif", 26))
        .map_err(|e| plot_err(path, e))?;
    let (left, right) = root.split_horizontally(size.0 / 2);

    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (xmin, xmax) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |a, x| {
        (a.0.min(x), a.1.max(x))
    });
    let ymax = ys.fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let (xmin, xmax) = if xmin.is_finite() {
        (xmin, xmax.max(xmin * 2.0))
    } else {
        (1.0, 2.0)
    };
    let mut chart = ChartBuilder::on(&left)
        .caption(line_title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((xmin..xmax).log_scale().base(2.0), 0.0..ymax)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(3),
            ))
            .map_err(|e| plot_err(path, e))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| plot_err(path, e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| plot_err(path, e))?;

    let vmax = bars
        .iter()
        .map(|b| b.value)
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.2;
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(&right)
        .caption(bar_title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(190)
        .build_cartesian_2d(0.0..vmax, (0..n).into_segmented())
        .map_err(|e| plot_err(path, e))?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .x_desc(bar_unit)
        .disable_y_mesh()
        .label_style(("sans-serif", 14))
        .y_label_formatter(&|seg| match seg {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                labels.get(*i).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .y_labels(n)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let color = Palette99::pick(i).to_rgba();
            let mut rect = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (b.value, SegmentValue::Exact(i + 1)),
                ],
                color.filled(),
            );
            rect.set_margin(6, 6, 0, 0);
            rect
        }))
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                format!("{:.2}", b.value),
                (b.value + vmax * 0.01, SegmentValue::CenterOf(i)),
                ("sans-serif", 14).into_font(),
            )
        }))
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}
