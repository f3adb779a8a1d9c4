//! Plain charts of measurements: lines over a log-2 axis beside horizontal bars, one PNG (the
//! storage benchmark's figure, `atmorep loader bench-storage`).

use std::path::Path;

use plotters::prelude::*;

use crate::canvas::{FONT_FAMILY, render, write_png};
use crate::error::{Result, draw_err};

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
    let what = path.display().to_string();
    let rgb = render(&what, size, |root| {
        let err = draw_err(&what);
        let root = root.titled(title, (FONT_FAMILY, 26)).map_err(&err)?;
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
            .caption(line_title, (FONT_FAMILY, 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((xmin..xmax).log_scale().base(2.0), 0.0..ymax)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style((FONT_FAMILY, 15))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(&err)?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(3),
                ))
                .map_err(&err)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(&err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT_FAMILY, 15))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(&err)?;

        let vmax = bars
            .iter()
            .map(|b| b.value)
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.2;
        let n = bars.len().max(1);
        let mut chart = ChartBuilder::on(&right)
            .caption(bar_title, (FONT_FAMILY, 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(190)
            .build_cartesian_2d(0.0..vmax, (0..n).into_segmented())
            .map_err(&err)?;
        let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
        chart
            .configure_mesh()
            .x_desc(bar_unit)
            .disable_y_mesh()
            .label_style((FONT_FAMILY, 14))
            .y_label_formatter(&|seg| match seg {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    labels.get(*i).cloned().unwrap_or_default()
                }
                SegmentValue::Last => String::new(),
            })
            .y_labels(n)
            .draw()
            .map_err(&err)?;
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
            .map_err(&err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                Text::new(
                    format!("{:.2}", b.value),
                    (b.value + vmax * 0.01, SegmentValue::CenterOf(i)),
                    (FONT_FAMILY, 14).into_font(),
                )
            }))
            .map_err(&err)?;
        Ok(())
    })?;
    write_png(path, size, &rgb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_png::assert_png;

    #[test]
    fn draws_lines_beside_bars() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let series = [Series {
            name: "object GET".into(),
            points: vec![(1.0, 0.2), (4.0, 0.7), (16.0, 1.1)],
        }];
        let bars = [
            Bar {
                label: "decode zstd".into(),
                value: 0.9,
            },
            Bar {
                label: "block read".into(),
                value: 0.4,
            },
        ];
        let size = (1000, 500);
        lines_and_bars(
            &path, size, "bench", "GET", "requests", "GB/s", &series, "reads", "GB/s", &bars,
        )
        .unwrap();
        assert_png(&path, size);
        // Nothing measured is still a chart.
        lines_and_bars(
            &path,
            size,
            "bench",
            "GET",
            "x",
            "y",
            &[],
            "reads",
            "u",
            &[],
        )
        .unwrap();
        assert_png(&path, size);
    }
}
