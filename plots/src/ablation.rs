//! `atmorep ablate`'s figures: a bar chart of each variant's masked-token error per field as a
//! fraction of climatology's on the same values (so blurred and raw variants, whose targets
//! differ, compare on one scale), and the variants' loss curves overlaid.

use std::path::Path;

use atmorep_trainer::ablation::AblationReport;
use plotters::prelude::*;

use crate::attention::{Figure, title};
use crate::canvas::{FONT_FAMILY, TAB10, render, tick};
use crate::error::{Result, draw_err, input_err};
use crate::training::{log_range, step_axes};

/// Width of both figures.
const WIDTH: u32 = 1400;
/// Height of a bar and its gap.
const BAR_H: u32 = 34;

/// The most steps in the running mean of the training curves (a tenth of a short run).
const SMOOTH: usize = 20;

/// The colour of a variant's bar: which study it belongs to.
fn study_colour(name: &str) -> RGBColor {
    if name.starts_with("aux=") {
        TAB10[0]
    } else if name.starts_with("pe=") {
        TAB10[1]
    } else if name.starts_with("blur=") {
        TAB10[2]
    } else if name == "base" {
        RGBColor(90, 90, 90)
    } else {
        TAB10[4]
    }
}

fn check(report: &AblationReport, what: &str) -> Result<()> {
    if report.variants.is_empty() {
        return Err(input_err(what, "the ablation report has no variants"));
    }
    if report.fields.is_empty() {
        return Err(input_err(what, "the ablation report has no fields"));
    }
    Ok(())
}

/// One panel per field: each variant's masked-token RMSE ÷ climatology's RMSE on the same
/// values (below 1: better than climatology), with the value at the end of its bar.
pub fn bar_chart(report: &AblationReport, path: &Path, subtitle: &str) -> Result<Figure> {
    let what = path.display().to_string();
    check(report, &what)?;
    let ratios = report.climatology_ratios();
    let n = report.variants.len();
    let size = (WIDTH, 92 + 110 + BAR_H * n as u32);
    let hi = ratios
        .iter()
        .flatten()
        .copied()
        .filter(|r| r.is_finite())
        .fold(1.0f64, f64::max)
        * 1.18;
    let rgb = render(&what, size, |root| {
        let body = title(
            root,
            &what,
            "Ablation: masked-token RMSE ÷ climatology RMSE (lower is better)",
            subtitle,
        )?;
        let panels = body.split_evenly((1, report.fields.len()));
        for (k, (panel, field)) in panels.iter().zip(&report.fields).enumerate() {
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{field}: RMSE ÷ climatology"), (FONT_FAMILY, 19))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(if k == 0 { 210 } else { 10 })
                .build_cartesian_2d(0.0..hi, (0..n - 1).into_segmented())
                .map_err(draw_err(&what))?;
            let names: Vec<String> = report.variants.iter().map(|v| v.name.clone()).collect();
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(n)
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) if k == 0 && *i < n => names[n - 1 - i].clone(),
                    _ => String::new(),
                })
                .x_desc("model RMSE ÷ climatology RMSE")
                .x_label_formatter(&|v| tick(*v))
                .label_style((FONT_FAMILY, 14))
                .axis_desc_style((FONT_FAMILY, 14))
                .light_line_style(TRANSPARENT)
                .draw()
                .map_err(draw_err(&what))?;
            for (i, row) in ratios.iter().enumerate() {
                let r = row[k];
                if !r.is_finite() {
                    continue;
                }
                let colour = study_colour(&report.variants[i].name);
                // The base at the top, the variants below it in run order.
                let i = n - 1 - i;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [
                            (0.0, SegmentValue::Exact(i)),
                            (r, SegmentValue::Exact(i + 1)),
                        ],
                        colour.mix(0.85).filled(),
                    )))
                    .map_err(draw_err(&what))?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{r:.3}"),
                        (r + hi * 0.01, SegmentValue::CenterOf(i)),
                        (FONT_FAMILY, 13).into_font().color(&BLACK),
                    )))
                    .map_err(draw_err(&what))?;
            }
            // Climatology itself.
            chart
                .draw_series(DashedLineSeries::new(
                    [(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Exact(n))],
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))
                .map_err(draw_err(&what))?;
        }
        Ok(())
    })?;
    Figure::write(path.to_path_buf(), size, &rgb, report.fields.len())
}

/// Two panels: every variant's training loss (a running mean over a tenth of the run, at most
/// [`SMOOTH`] steps) and its validation loss, overlaid, one colour per variant.
pub fn loss_chart(report: &AblationReport, path: &Path, subtitle: &str) -> Result<Figure> {
    let what = path.display().to_string();
    check(report, &what)?;
    let size = (WIDTH, 720);
    let last_step = report
        .variants
        .iter()
        .flat_map(|v| v.losses.iter().chain(&v.val_losses).map(|l| l.0))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let smooth = report
        .variants
        .iter()
        .map(|v| v.losses.len() / 10)
        .max()
        .unwrap_or(1)
        .clamp(1, SMOOTH);
    let smoothed: Vec<Vec<(f64, f64)>> = report
        .variants
        .iter()
        .map(|v| {
            (0..v.losses.len())
                .map(|i| {
                    let w = &v.losses[i.saturating_sub(smooth - 1)..=i];
                    let mean = w.iter().map(|l| l.1).sum::<f64>() / w.len() as f64;
                    (v.losses[i].0 as f64, mean)
                })
                .filter(|p| p.1 > 0.0 && p.1.is_finite())
                .collect()
        })
        .collect();
    let rgb = render(&what, size, |root| {
        let body = title(root, &what, "Ablation: loss curves", subtitle)?;
        let panels = body.split_evenly((1, 2));
        for (k, panel) in panels.iter().enumerate() {
            let series: Vec<Vec<(f64, f64)>> = if k == 0 {
                smoothed.clone()
            } else {
                report
                    .variants
                    .iter()
                    .map(|v| {
                        v.val_losses
                            .iter()
                            .map(|l| (l.0 as f64, l.1))
                            .filter(|p| p.1 > 0.0 && p.1.is_finite())
                            .collect()
                    })
                    .collect()
            };
            let y = log_range(series.iter().flatten().map(|p| p.1));
            let caption = if k == 0 {
                format!("Training loss (mean of {smooth} steps)")
            } else {
                "Validation loss".to_string()
            };
            let mut chart = step_axes(
                panel,
                &what,
                &caption,
                0.0..last_step,
                y.log_scale(),
                "masked-token MSE (normalized units²)",
            )?;
            for (i, (v, points)) in report.variants.iter().zip(series).enumerate() {
                let colour = TAB10[i % TAB10.len()];
                // Variants past the palette's ten are told apart by a dashed line.
                let style = colour.stroke_width(if i < TAB10.len() { 2 } else { 1 });
                if k == 1 {
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                        .map_err(draw_err(&what))?;
                }
                chart
                    .draw_series(LineSeries::new(points, style))
                    .map_err(draw_err(&what))?
                    .label(v.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3))
                    });
            }
            if k == 0 {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font((FONT_FAMILY, 13))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(draw_err(&what))?;
            }
        }
        Ok(())
    })?;
    Figure::write(path.to_path_buf(), size, &rgb, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_png::assert_png;
    use atmorep_trainer::AuxInfo;
    use atmorep_trainer::ablation::VariantResult;
    use atmorep_trainer::eval::{Baseline, EvalRow};

    fn report() -> AblationReport {
        let names = ["base", "aux=none", "pe=none", "blur=1"];
        let variants = names
            .iter()
            .enumerate()
            .map(|(i, name)| VariantResult {
                name: name.to_string(),
                aux_info: AuxInfo::Concat,
                pe: "global".into(),
                blur_sigma: 0.0,
                ensemble: 1,
                losses: (1..=120)
                    .map(|s| (s, (1.0 + i as f64) / (1.0 + s as f64 * 0.05)))
                    .collect(),
                val_losses: vec![(60, 0.5 + 0.1 * i as f64), (120, 0.3 + 0.1 * i as f64)],
                seed: 0,
                other_seeds: Vec::new(),
                eval: ["t", "z"]
                    .iter()
                    .map(|f| EvalRow {
                        task: "bert".into(),
                        field: f.to_string(),
                        level: 850.0,
                        baseline: Baseline::Climatology,
                        values: 100,
                        samples: 10,
                        model_rmse: 0.3 + 0.2 * i as f64,
                        baseline_rmse: 1.0,
                        model_ci: [0.2 + 0.2 * i as f64, 0.4 + 0.2 * i as f64],
                        baseline_ci: [0.9, 1.1],
                        skill_ci: [0.5 - 0.2 * i as f64, 0.9 - 0.2 * i as f64],
                        ensemble: None,
                    })
                    .collect(),
            })
            .collect();
        AblationReport {
            fields: vec!["t".into(), "z".into()],
            variants,
            caption: String::new(),
        }
    }

    #[test]
    fn bar_chart_and_loss_curves_draw() {
        let dir = tempfile::tempdir().unwrap();
        let r = report();
        let bars = dir.path().join("bars.png");
        let fig = bar_chart(&r, &bars, "unit test").unwrap();
        assert_eq!(fig.panels, 2);
        assert_png(&bars, (fig.width, fig.height));
        let curves = dir.path().join("curves.png");
        let fig = loss_chart(&r, &curves, "unit test").unwrap();
        assert_eq!((fig.width, fig.height, fig.panels), (WIDTH, 720, 2));
        assert_png(&curves, (WIDTH, 720));

        let empty = AblationReport {
            variants: Vec::new(),
            ..r
        };
        let err = bar_chart(&empty, &bars, "").unwrap_err();
        assert!(err.to_string().contains("no variants"), "{err}");
    }
}
