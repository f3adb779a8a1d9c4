//! `atmorep plot training`: a run's per-step log as charts — the loss per task (each step's
//! training loss, its running mean, and validation), the loss per field (the running mean of
//! each field's training loss and its validation loss, one colour per field), the learning rate,
//! the gradient norm before clipping and the fraction of each step spent waiting for data.
//!
//! The log keeps, per step, the training loss (the mean over the step's micro-batches and
//! fields) with each field's part, and on validation steps the validation loss, overall and per
//! field. A log written before the per-field columns existed has no per-field chart: the figure
//! is then the four charts of the other quantities.

use std::path::Path;

use atmorep_trainer::metrics_log::{self, StepRecord};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::attention::{Figure, title};
use crate::canvas::{Area, FONT_FAMILY, TAB10, render, tick};
use crate::error::{Result, draw_err, input_err};

/// Size of the training figure.
pub const SIZE: (u32, u32) = (1400, 960);

/// Colours of the tasks' loss points: `tab10`'s first four but its red (the validation
/// colour's neighbour).
const TASK_COLOURS: [RGBColor; 4] = [TAB10[0], TAB10[1], TAB10[2], TAB10[4]];

/// Colours of the fields' curves: none of the tasks' (the charts sit side by side) nor the
/// validation red.
pub const FIELD_COLOURS: [RGBColor; 6] = [
    RGBColor(0, 150, 160),
    RGBColor(200, 50, 150),
    RGBColor(140, 86, 45),
    RGBColor(40, 60, 160),
    RGBColor(150, 150, 0),
    RGBColor(120, 20, 60),
];

/// The validation curves' red.
const VALIDATION: RGBColor = RGBColor(200, 30, 30);

/// Steps in the running mean of the training loss.
const SMOOTH: usize = 10;

/// One field's curves in the per-field loss chart.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldCurves {
    pub field: String,
    /// (step, mean of the field's training loss over its last [`SMOOTH`] values); a step that
    /// did not mask the field has no point.
    pub training: Vec<(f64, f64)>,
    /// (step, the field's validation loss).
    pub validation: Vec<(f64, f64)>,
    pub colour: RGBColor,
}

/// The curves of the per-field loss chart, in the model's field order; empty for a log
/// without per-field losses.
pub fn field_curves(rows: &[StepRecord]) -> Vec<FieldCurves> {
    metrics_log::field_names(rows)
        .into_iter()
        .enumerate()
        .map(|(i, field)| {
            let value =
                |list: &[(String, f64)]| list.iter().find(|(n, _)| *n == field).map(|(_, v)| *v);
            let raw: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((r.step as f64, value(&r.field_losses)?)))
                .filter(|p| p.1.is_finite())
                .collect();
            let training = raw
                .iter()
                .enumerate()
                .map(|(k, &(step, _))| {
                    let window = &raw[k.saturating_sub(SMOOTH - 1)..=k];
                    (
                        step,
                        window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64,
                    )
                })
                .collect();
            let validation = rows
                .iter()
                .filter_map(|r| Some((r.step as f64, value(&r.val_field_losses)?)))
                .filter(|p| p.1.is_finite())
                .collect();
            FieldCurves {
                field,
                training,
                validation,
                colour: FIELD_COLOURS[i % FIELD_COLOURS.len()],
            }
        })
        .collect()
}

/// Writes the charts of `rows` (one record per step) to `path`: five with per-field losses in
/// the log (the two loss charts on top, the rest below), four without. `loss_unit` labels the
/// loss axes (`normalized units²`, or `prior errors²` for a temporal-prior model).
pub fn training_figure(
    rows: &[StepRecord],
    path: &Path,
    subtitle: &str,
    loss_unit: &str,
) -> Result<Figure> {
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
    let curves = field_curves(&rows);
    let panels = if curves.is_empty() { 4 } else { 5 };
    let rgb = render(&what, SIZE, |root| {
        let body = title(root, &what, "Training", subtitle)?;
        let cells = if curves.is_empty() {
            body.split_evenly((2, 2))
        } else {
            let (top, bottom) = body.split_vertically(body.dim_in_pixel().1 / 2);
            let mut cells = top.split_evenly((1, 2));
            cells.extend(bottom.split_evenly((1, 3)));
            cells
        };
        let mut cells = cells.iter();
        let mut next = || cells.next().expect("a cell per chart");
        loss_chart(next(), &what, &rows, steps.clone(), loss_unit)?;
        if !curves.is_empty() {
            field_chart(next(), &what, &curves, steps.clone(), loss_unit)?;
        }
        line_chart(
            next(),
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
            next(),
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
            next(),
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
    Figure::write(path.to_path_buf(), SIZE, &rgb, panels)
}

/// (min, max) of the finite positive values, padded for a log axis.
pub(crate) fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
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

/// Points along the polyline `points` (its vertices and `k` more per segment), so that a sparse
/// line (validation) counts where it runs and not only at its markers.
fn along(points: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = points.to_vec();
    for w in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if y0 <= 0.0 || y1 <= 0.0 {
            continue;
        }
        out.extend((1..=k).map(|i| {
            let t = i as f64 / (k + 1) as f64;
            (
                x0 + t * (x1 - x0),
                (y0.ln() + t * (y1.ln() - y0.ln())).exp(),
            )
        }));
    }
    out
}

/// The corner of a chart with a log y axis where a legend of `lines` entries, the longest
/// `chars` characters, covers the fewest of `points`: upper right, lower left, upper left, lower
/// right, the first on a tie. `plot` is the size of the plotting area in pixels.
fn legend_corner(
    points: &[(f64, f64)],
    x: &std::ops::Range<f64>,
    y: &std::ops::Range<f64>,
    plot: (u32, u32),
    lines: usize,
    chars: usize,
) -> SeriesLabelPosition {
    // 13 px labels: about 7 px a character, a 16 px line, the marker and padding.
    let (w, h) = (f64::from(plot.0.max(1)), f64::from(plot.1.max(1)));
    let fw = ((chars as f64 * 7.0 + 50.0) / w).min(1.0);
    let fh = ((lines as f64 * 16.0 + 20.0) / h).min(1.0);
    let fx = |v: f64| (v - x.start) / (x.end - x.start);
    let fy = |v: f64| (v.ln() - y.start.ln()) / (y.end.ln() - y.start.ln());
    let (low, high) = (0.0..fw, 1.0 - fw..1.0);
    let (bottom, top) = (0.0..fh, 1.0 - fh..1.0);
    let corners = [
        (SeriesLabelPosition::UpperRight, high.clone(), top.clone()),
        (SeriesLabelPosition::LowerLeft, low.clone(), bottom.clone()),
        (SeriesLabelPosition::UpperLeft, low, top),
        (SeriesLabelPosition::LowerRight, high, bottom),
    ];
    corners
        .into_iter()
        .min_by_key(|(_, cx, cy)| {
            points
                .iter()
                .filter(|p| p.1 > 0.0 && cx.contains(&fx(p.0)) && cy.contains(&fy(p.1)))
                .count()
        })
        .map(|(corner, _, _)| corner)
        .unwrap_or(SeriesLabelPosition::UpperRight)
}

/// A chart over optimizer steps with a y axis of kind `Y` (linear or log).
pub(crate) type StepChart<'a, 'b, Y> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

/// A chart over `steps` on `area` with `caption`, its axes (the y axis `y`, described by
/// `y_desc`) and labels drawn.
pub(crate) fn step_axes<'a, 'b, Y>(
    area: &'a Area<'b>,
    what: &str,
    caption: &str,
    steps: std::ops::Range<f64>,
    y: Y,
    y_desc: &str,
) -> Result<StepChart<'a, 'b, Y::CoordDescType>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT_FAMILY, 19))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(steps, y)
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
    Ok(chart)
}

/// The loss per task: each step's loss as a point in its task's colour, the running mean and
/// validation.
fn loss_chart(
    area: &Area<'_>,
    what: &str,
    rows: &[StepRecord],
    steps: std::ops::Range<f64>,
    loss_unit: &str,
) -> Result<()> {
    let y = log_range(
        rows.iter()
            .map(|r| r.loss)
            .chain(rows.iter().filter_map(|r| r.val_loss)),
    );
    let mut chart = step_axes(
        area,
        what,
        "Loss per task (masked-token MSE)",
        steps.clone(),
        y.clone().log_scale(),
        &format!("loss ({loss_unit})"),
    )?;
    let plot = chart.plotting_area().dim_in_pixel();
    let mut tasks: Vec<&str> = rows.iter().map(|r| r.tasks.as_str()).collect();
    tasks.sort_unstable();
    tasks.dedup();
    let mut covered: Vec<(f64, f64)> = rows.iter().map(|r| (r.step as f64, r.loss)).collect();
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
    covered.extend(along(&val, 20));
    let longest = tasks
        .iter()
        .map(|t| t.chars().count() + 15)
        .max()
        .unwrap_or(0);
    let corner = legend_corner(
        &covered,
        &steps,
        &y,
        plot,
        tasks.len() + 1 + usize::from(!val.is_empty()),
        longest.max(26),
    );
    if !val.is_empty() {
        let red = VALIDATION;
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
        .position(corner)
        .draw()
        .map_err(draw_err(what))
}

/// The per-field chart: each field's running mean (solid) and validation loss (dashed, with
/// triangles) in the field's colour; the legend names the fields, then the two line styles.
fn field_chart(
    area: &Area<'_>,
    what: &str,
    curves: &[FieldCurves],
    steps: std::ops::Range<f64>,
    loss_unit: &str,
) -> Result<()> {
    let y = log_range(
        curves
            .iter()
            .flat_map(|c| c.training.iter().chain(&c.validation).map(|p| p.1)),
    );
    let mut chart = step_axes(
        area,
        what,
        &format!("Loss per field (training: mean of {SMOOTH} steps)"),
        steps.clone(),
        y.clone().log_scale(),
        &format!("loss ({loss_unit})"),
    )?;
    let plot = chart.plotting_area().dim_in_pixel();
    let has_validation = curves.iter().any(|c| !c.validation.is_empty());
    let covered: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|c| c.training.iter().copied().chain(along(&c.validation, 20)))
        .collect();
    let longest = curves
        .iter()
        .map(|c| c.field.chars().count())
        .max()
        .unwrap_or(0);
    let corner = legend_corner(
        &covered,
        &steps,
        &y,
        plot,
        curves.len() + 1 + usize::from(has_validation),
        longest.max(10),
    );
    let positive = |points: &[(f64, f64)]| -> Vec<(f64, f64)> {
        points.iter().copied().filter(|p| p.1 > 0.0).collect()
    };
    for c in curves {
        let colour = c.colour;
        chart
            .draw_series(LineSeries::new(
                positive(&c.training),
                colour.stroke_width(2),
            ))
            .map_err(draw_err(what))?
            .label(c.field.clone())
            .legend(move |(x, y)| {
                Rectangle::new([(x + 2, y - 5), (x + 18, y + 5)], colour.filled())
            });
        let val = positive(&c.validation);
        chart
            .draw_series(DashedLineSeries::new(
                val.clone(),
                6,
                4,
                colour.stroke_width(2),
            ))
            .map_err(draw_err(what))?;
        chart
            .draw_series(
                val.iter()
                    .map(|&p| TriangleMarker::new(p, 6, colour.filled())),
            )
            .map_err(draw_err(what))?;
    }
    let grey = RGBColor(90, 90, 90);
    chart
        .draw_series(std::iter::empty::<Circle<(f64, f64), u32>>())
        .map_err(draw_err(what))?
        .label("training")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(2)));
    if has_validation {
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), u32>>())
            .map_err(draw_err(what))?
            .label("validation")
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (6, 0)], grey.stroke_width(2))
                    + PathElement::new(vec![(12, 0), (20, 0)], grey.stroke_width(2))
                    + TriangleMarker::new((10, 0), 5, grey.filled())
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 13))
        .position(corner)
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
            let mut chart = step_axes(area, what, caption, steps, $y, y_desc)?;
            chart
                // One pixel wide: plotters draws wider lines as polygons whose ends overshoot on
                // steep segments, below the axis of a noisy series.
                .draw_series(LineSeries::new(points, colour.stroke_width(1)))
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

    /// `n` steps of three fields (`t` unmasked on forecast steps), validation every 20.
    pub(crate) fn records(n: u64) -> Vec<StepRecord> {
        (1..=n)
            .map(|step| {
                let x = step as f64;
                let forecast = step.is_multiple_of(4);
                let mut fields = vec![
                    ("vo".to_string(), 2.0 / (1.0 + x * 0.1)),
                    ("z".to_string(), 0.5 / (1.0 + x * 0.05) + 0.02 * x.sin()),
                ];
                if !forecast {
                    fields.push(("t".to_string(), 0.2 / (1.0 + x * 0.2)));
                }
                let val = step.is_multiple_of(20);
                StepRecord {
                    step,
                    tasks: if forecast { "forecast" } else { "bert" }.into(),
                    loss: fields.iter().map(|f| f.1).sum::<f64>() / fields.len() as f64,
                    lr: 1e-3 * (step.min(10) as f64 / 10.0),
                    grad_norm: 2.0 / x.sqrt(),
                    tokens: 256,
                    step_s: 0.1,
                    data_wait_s: 0.01 * (step % 3) as f64,
                    forward_s: 0.03,
                    backward_s: 0.05,
                    optimizer_s: 0.01,
                    val_loss: val.then_some(0.8 / (1.0 + x * 0.1)),
                    val_field_losses: if val {
                        fields.iter().map(|(n, v)| (n.clone(), 1.2 * v)).collect()
                    } else {
                        Vec::new()
                    },
                    field_losses: fields,
                }
            })
            .collect()
    }

    /// Pixels of exactly `colour` in the PNG at `path`.
    fn pixels_of(path: &Path, colour: RGBColor) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        img.pixels()
            .filter(|p| p.0 == [colour.0, colour.1, colour.2])
            .count()
    }

    /// A series whose neighbouring steps lie far apart (gradient norms, data waits) stays above
    /// its chart's x axis: plotters' 2-pixel lines overshoot the ends of steep segments.
    #[test]
    fn steep_lines_stay_inside_their_chart() {
        let mut rows = records(400);
        for r in &mut rows {
            r.grad_norm = if r.step % 2 == 0 { 0.05 } else { 4.0 };
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spiky.png");
        training_figure(&rows, &path, "spiky", "normalized units²").unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let (w, h) = img.dimensions();
        // The gradient-norm chart is the bottom row's middle third; its x axis is the lowest
        // row there that is black over most of the chart's width.
        let cols = w / 3..2 * w / 3;
        let black = |y: u32| {
            cols.clone()
                .filter(|&x| img.get_pixel(x, y).0 == [0, 0, 0])
                .count()
        };
        let axis = (h / 2..h)
            .filter(|&y| black(y) > (w / 6) as usize)
            .max()
            .expect("the chart has an x axis");
        let below = (axis + 2..h)
            .flat_map(|y| cols.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0 == [204, 102, 0])
            .count();
        assert_eq!(
            below, 0,
            "pixels of the series below its x axis (row {axis})"
        );
    }

    #[test]
    fn the_training_figure_has_five_charts_with_per_field_losses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("training.png");
        let fig = training_figure(&records(60), &path, "unit test", "normalized units²").unwrap();
        assert_eq!((fig.width, fig.height, fig.panels), (1400, 960, 5));
        assert_png(&path, SIZE);
        // Every field's curves are drawn in its colour: far more of it than a legend swatch.
        for colour in &FIELD_COLOURS[..3] {
            let n = pixels_of(&path, *colour);
            assert!(n > 1000, "{colour:?}: {n} pixels");
        }
        assert_eq!(pixels_of(&path, FIELD_COLOURS[3]), 0);
        // A single step still draws (the step axis gets a width).
        let fig = training_figure(&records(1), &path, "one step", "prior errors²").unwrap();
        assert_eq!(fig.panels, 5);
        let err = training_figure(&[], &path, "", "").unwrap_err();
        assert!(err.to_string().contains("no steps"), "{err}");
    }

    #[test]
    fn a_log_without_per_field_losses_has_four_charts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("training.png");
        let mut rows = records(60);
        for r in &mut rows {
            r.field_losses.clear();
            r.val_field_losses.clear();
        }
        assert!(field_curves(&rows).is_empty());
        let fig =
            training_figure(&rows, &path, "before per-field losses", "normalized units²").unwrap();
        assert_eq!((fig.width, fig.height, fig.panels), (1400, 960, 4));
        assert_png(&path, SIZE);
        let counts: Vec<usize> = FIELD_COLOURS.iter().map(|c| pixels_of(&path, *c)).collect();
        assert!(counts.iter().all(|&n| n == 0), "{counts:?}");
    }

    #[test]
    fn the_legend_goes_where_the_curves_leave_room() {
        let (x, y) = (0.0..100.0, 0.01..1.0);
        let at = |points: &[(f64, f64)]| legend_corner(points, &x, &y, (600, 300), 4, 20);
        let corner = |c: SeriesLabelPosition| format!("{c:?}");
        // Falling from upper left to lower right: both of the other corners are free, upper
        // right comes first.
        let falling: Vec<(f64, f64)> = (0..100)
            .map(|s| (s as f64, 0.9 * (0.012f64 / 0.9).powf(s as f64 / 99.0)))
            .collect();
        assert_eq!(
            corner(at(&falling)),
            corner(SeriesLabelPosition::UpperRight)
        );
        // A flat curve high up and another falling one: lower left.
        let mut high = falling.clone();
        high.extend((0..100).map(|s| (s as f64, 0.8)));
        assert_eq!(corner(at(&high)), corner(SeriesLabelPosition::LowerLeft));
        // A validation line counts between its markers too.
        let val = along(&[(0.0, 0.9), (99.0, 0.9)], 20);
        assert!(val.len() == 22 && val.iter().all(|p| (p.1 - 0.9).abs() < 1e-9));
        let mut both = falling;
        both.extend(val);
        assert_ne!(corner(at(&both)), corner(SeriesLabelPosition::UpperRight));
    }

    #[test]
    fn field_curves_are_running_means_in_the_models_order() {
        let rows = records(60);
        let curves = field_curves(&rows);
        let names: Vec<&str> = curves.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(names, ["vo", "z", "t"]);
        let colours: Vec<RGBColor> = curves.iter().map(|c| c.colour).collect();
        assert_eq!(colours, FIELD_COLOURS[..3]);
        // `vo` on every step; `t` only on the 45 steps that masked it.
        assert_eq!(curves[0].training.len(), 60);
        assert_eq!(curves[2].training.len(), 45);
        assert!(
            curves[2]
                .training
                .iter()
                .all(|p| !(p.0 as u64).is_multiple_of(4))
        );
        // The running mean of the field's last 10 values.
        let vo = |s: u64| 2.0 / (1.0 + s as f64 * 0.1);
        let want = (51..=60).map(vo).sum::<f64>() / 10.0;
        assert!((curves[0].training[59].1 - want).abs() < 1e-12);
        assert!((curves[0].training[0].1 - vo(1)).abs() < 1e-12);
        let t = |s: u64| 0.2 / (1.0 + s as f64 * 0.2);
        let last: Vec<u64> = (1..=60)
            .filter(|s: &u64| !s.is_multiple_of(4))
            .rev()
            .take(10)
            .collect();
        let want = last.iter().map(|&s| t(s)).sum::<f64>() / 10.0;
        assert!((curves[2].training[44].1 - want).abs() < 1e-12);
        // Validation as logged, on steps 20, 40, 60; `t` is unmasked on those (forecast).
        let steps: Vec<f64> = curves[0].validation.iter().map(|p| p.0).collect();
        assert_eq!(steps, [20.0, 40.0, 60.0]);
        assert!((curves[0].validation[0].1 - 1.2 * vo(20)).abs() < 1e-12);
        assert!(curves[2].validation.is_empty());
    }
}
