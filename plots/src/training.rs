//! `atmorep plot training`: a run's per-step log as four charts — the loss (training per task,
//! its running mean, and validation), the learning rate, the gradient norm before clipping and
//! the fraction of each step spent waiting for data.
//!
//! The log keeps one training loss per step (the mean over the step's micro-batches and fields)
//! and one validation loss, so the loss is split by task rather than by field.

use std::path::Path;

use atmorep_trainer::metrics_log::StepRecord;
use plotters::prelude::*;

use crate::attention::{Figure, title};
use crate::canvas::{Area, FONT_FAMILY, render, tick, write_png};
use crate::error::{Result, draw_err, input_err};

/// Size of the training figure.
pub const SIZE: (u32, u32) = (1400, 960);

/// Colours of the tasks' loss points (matplotlib's first four).
const TASK_COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Steps in the running mean of the training loss.
const SMOOTH: usize = 10;

/// Writes the four charts of `rows` (one record per step) to `path`.
pub fn training_figure(rows: &[StepRecord], path: &Path, subtitle: &str) -> Result<Figure> {
    if rows.is_empty() {
        return Err(input_err("the metrics log", "holds no steps"));
    }
    // A resumed run may have logged a step twice; the later record wins.
    let mut rows = rows.to_vec();
    rows.sort_by_key(|r| r.step);
    rows.dedup_by(|later, earlier| {
        let same = later.step == earlier.step;
        if same {
            *earlier = later.clone();
        }
        same
    });
    let what = path.display().to_string();
    let (first, last) = (rows[0].step as f64, rows[rows.len() - 1].step as f64);
    let steps = first.min(last - 1.0).max(0.0)..last.max(first + 1.0);
    let rgb = render(&what, SIZE, |root| {
        let body = title(root, &what, "Training", subtitle)?;
        let cells = body.split_evenly((2, 2));
        loss_chart(&cells[0], &what, &rows, steps.clone())?;
        line_chart(
            &cells[1],
            &what,
            "Learning rate",
            "learning rate",
            &rows,
            steps.clone(),
            |r| r.lr,
            false,
            BLUE,
        )?;
        line_chart(
            &cells[2],
            &what,
            "Gradient norm (before clipping)",
            "global L2 norm",
            &rows,
            steps.clone(),
            |r| r.grad_norm,
            false,
            RGBColor(204, 102, 0),
        )?;
        line_chart(
            &cells[3],
            &what,
            "Time waiting for data",
            "data wait (% of step)",
            &rows,
            steps.clone(),
            |r| 100.0 * r.data_wait_fraction(),
            false,
            RGBColor(0, 130, 90),
        )
    })?;
    write_png(path, SIZE, &rgb)?;
    Ok(Figure {
        path: path.to_path_buf(),
        width: SIZE.0,
        height: SIZE.1,
        panels: 4,
    })
}

/// (min, max) of the finite positive values, padded for a log axis.
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return 1e-3..1.0;
    }
    let (lo, hi) = (lo / 1.3, hi * 1.3);
    if hi / lo < 10.0 {
        let mid = (lo * hi).sqrt();
        (mid / 3.2)..(mid * 3.2)
    } else {
        lo..hi
    }
}

fn loss_chart(
    area: &Area<'_>,
    what: &str,
    rows: &[StepRecord],
    steps: std::ops::Range<f64>,
) -> Result<()> {
    let y = log_range(
        rows.iter()
            .map(|r| r.loss)
            .chain(rows.iter().filter_map(|r| r.val_loss)),
    );
    let mut chart = ChartBuilder::on(area)
        .caption("Loss (masked-token MSE)", (FONT_FAMILY, 19))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(steps, y.log_scale())
        .map_err(draw_err(what))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss (normalized units²)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| tick(*v))
        .label_style((FONT_FAMILY, 13))
        .axis_desc_style((FONT_FAMILY, 14))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(draw_err(what))?;
    let mut tasks: Vec<&str> = rows.iter().map(|r| r.tasks.as_str()).collect();
    tasks.sort_unstable();
    tasks.dedup();
    for (i, task) in tasks.iter().enumerate() {
        let colour = TASK_COLOURS[i % TASK_COLOURS.len()];
        chart
            .draw_series(
                rows.iter()
                    .filter(|r| r.tasks == *task && r.loss > 0.0)
                    .map(|r| Circle::new((r.step as f64, r.loss), 2, colour.mix(0.6).filled())),
            )
            .map_err(draw_err(what))?
            .label(format!("training, task {task}"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 3, colour.filled()));
    }
    let smooth: Vec<(f64, f64)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let window = &rows[i.saturating_sub(SMOOTH - 1)..=i];
            let mean = window.iter().map(|r| r.loss).sum::<f64>() / window.len() as f64;
            (r.step as f64, mean)
        })
        .filter(|p| p.1 > 0.0)
        .collect();
    chart
        .draw_series(LineSeries::new(smooth, BLACK.stroke_width(2)))
        .map_err(draw_err(what))?
        .label(format!("training, mean of {SMOOTH} steps"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    let val: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.step as f64, r.val_loss?)))
        .filter(|p| p.1 > 0.0)
        .collect();
    if !val.is_empty() {
        let red = RGBColor(200, 30, 30);
        chart
            .draw_series(LineSeries::new(val.clone(), red.stroke_width(2)))
            .map_err(draw_err(what))?;
        chart
            .draw_series(val.iter().map(|&p| TriangleMarker::new(p, 7, red.filled())))
            .map_err(draw_err(what))?
            .label("validation")
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, red.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_err(what))
}

#[allow(clippy::too_many_arguments)]
fn line_chart(
    area: &Area<'_>,
    what: &str,
    caption: &str,
    y_desc: &str,
    rows: &[StepRecord],
    steps: std::ops::Range<f64>,
    value: impl Fn(&StepRecord) -> f64,
    log: bool,
    colour: RGBColor,
) -> Result<()> {
    let points: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.step as f64, value(r)))
        .filter(|p| p.1.is_finite())
        .collect();
    macro_rules! draw {
        ($y:expr) => {{
            let mut chart = ChartBuilder::on(area)
                .caption(caption, (FONT_FAMILY, 19))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(70)
                .build_cartesian_2d(steps, $y)
                .map_err(draw_err(what))?;
            chart
                .configure_mesh()
                .x_desc("optimizer step")
                .y_desc(y_desc)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| tick(*v))
                .label_style((FONT_FAMILY, 13))
                .axis_desc_style((FONT_FAMILY, 14))
                .light_line_style(TRANSPARENT)
                .draw()
                .map_err(draw_err(what))?;
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(draw_err(what))?;
        }};
    }
    if log {
        draw!(log_range(points.iter().map(|p| p.1)).log_scale());
    } else {
        let hi = points.iter().map(|p| p.1).fold(0.0f64, f64::max);
        draw!(0.0..if hi > 0.0 { hi * 1.1 } else { 1.0 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_png::assert_png;

    pub(crate) fn records(n: u64) -> Vec<StepRecord> {
        (1..=n)
            .map(|step| StepRecord {
                step,
                tasks: if step % 4 == 0 { "forecast" } else { "bert" }.into(),
                loss: 1.0 / (1.0 + step as f64 * 0.1) + 0.05 * ((step as f64).sin()),
                lr: 1e-3 * (step.min(10) as f64 / 10.0),
                grad_norm: 2.0 / (step as f64).sqrt(),
                tokens: 256,
                step_s: 0.1,
                data_wait_s: 0.01 * (step % 3) as f64,
                forward_s: 0.03,
                backward_s: 0.05,
                optimizer_s: 0.01,
                val_loss: (step % 20 == 0).then_some(0.8 / (1.0 + step as f64 * 0.1)),
            })
            .collect()
    }

    #[test]
    fn the_training_figure_has_four_charts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("training.png");
        let fig = training_figure(&records(60), &path, "unit test").unwrap();
        assert_eq!((fig.width, fig.height, fig.panels), (1400, 960, 4));
        assert_png(&path, SIZE);
        // A single step still draws (the step axis gets a width).
        training_figure(&records(1), &path, "one step").unwrap();
        let err = training_figure(&[], &path, "").unwrap_err();
        assert!(err.to_string().contains("no steps"), "{err}");
    }
}
