//! `atmorep plot attention`: the encoder's attention weights, per field, for every layer and
//! every head, and one query token's attention drawn on the map.
//!
//! Of an encoder layer's `H` heads the first `H − C` attend within the field (keys: the field's
//! own tokens) and the last `C` across fields (keys: every field's tokens, in field order), so a
//! within head's matrix is `T × T` and a cross head's `T × ΣT`. One figure per field shows them
//! as a grid with a row per layer and a column per head, on one colour scale.
//!
//! The query figure draws, for one query token, each head's weights on the query field's own
//! tokens at their latitude and longitude, summed over the keys' levels and times (a cross head's
//! panel says which share of its weight stays on the field).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::canvas::{
    Area, ColourScale, FONT_FAMILY, colour_bar, grid_with_bar, matrix_panel, render, write_png,
};
use crate::error::{Result, draw_err, input_err, tensor_err};
use crate::sample::ModelRun;

/// Whether a head attends within its field or across all fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    Within,
    Across,
}

/// One head's weights of one encoder layer for the first sample: `rows` queries × `cols` keys,
/// row-major, every row summing to 1.
#[derive(Debug, Clone)]
pub struct HeadMap {
    pub layer: usize,
    pub head: usize,
    pub kind: HeadKind,
    pub rows: usize,
    pub cols: usize,
    pub weights: Vec<f32>,
}

impl HeadMap {
    pub fn row(&self, q: usize) -> &[f32] {
        &self.weights[q * self.cols..(q + 1) * self.cols]
    }
}

/// Every head of every encoder layer for one field, layer by layer, heads in order.
pub fn field_heads(run: &ModelRun, field: usize) -> Result<Vec<HeadMap>> {
    let mut out = Vec::new();
    for (layer, maps) in run.attention.encoder.iter().enumerate() {
        let maps = maps
            .get(field)
            .ok_or_else(|| input_err("attention maps", format!("no field {field}")))?;
        let mut head = 0;
        for (kind, tensor) in [
            (HeadKind::Within, &maps.within),
            (HeadKind::Across, &maps.across),
        ] {
            let Some(tensor) = tensor else { continue };
            let what = "attention weights";
            // [B, heads, T, S] → sample 0.
            let w = tensor
                .get(0)
                .and_then(|w| w.to_dtype(atmorep_trainer::DType::F32))
                .map_err(tensor_err(what))?;
            let (heads, rows, cols) = w.dims3().map_err(tensor_err(what))?;
            let all = w
                .flatten_all()
                .and_then(|w| w.to_vec1::<f32>())
                .map_err(tensor_err(what))?;
            for chunk in all.chunks_exact(rows * cols).take(heads) {
                out.push(HeadMap {
                    layer,
                    head,
                    kind,
                    rows,
                    cols,
                    weights: chunk.to_vec(),
                });
                head += 1;
            }
        }
    }
    Ok(out)
}

/// What `attention_figures` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    /// Map panels in the figure.
    pub panels: usize,
}

impl Figure {
    /// Writes the RGB frame `rgb` of `size` as the PNG at `path` (atomically, see
    /// [`write_png`]) and describes it.
    pub(crate) fn write(
        path: PathBuf,
        size: (u32, u32),
        rgb: &[u8],
        panels: usize,
    ) -> Result<Self> {
        write_png(&path, size, rgb)?;
        Ok(Self {
            path,
            width: size.0,
            height: size.1,
            panels,
        })
    }
}

/// Options of the attention figures.
#[derive(Debug, Clone, Default)]
pub struct AttentionOptions {
    /// Only these fields (default: all of the model's).
    pub fields: Vec<String>,
    /// The query token of the map figure, in token order (default: the middle token of the
    /// first level at the last token time).
    pub query: Option<usize>,
    /// Said in every title (e.g. `sample 3 · checkpoint step 60`).
    pub subtitle: String,
}

const PANEL: u32 = 300;
/// Height of a figure's title block (a title and up to three lines of subtitle).
pub(crate) const TITLE_H: u32 = 92;
const BAR_W: u32 = 132;

/// Writes `attention-FIELD.png` (the matrices) and `attention-query-FIELD.png` (the query map)
/// for each field into `out`.
pub fn attention_figures(
    run: &ModelRun,
    out: &Path,
    opts: &AttentionOptions,
) -> Result<Vec<Figure>> {
    let names: Vec<String> = if opts.fields.is_empty() {
        run.fields.iter().map(|f| f.name.clone()).collect()
    } else {
        opts.fields.clone()
    };
    // Everything is checked before the first file is written, so a bad option leaves none.
    let mut jobs = Vec::new();
    for name in names {
        let f = run.field_index(&name)?;
        let heads = field_heads(run, f)?;
        if heads.is_empty() {
            return Err(input_err(
                "attention maps",
                "the model has no encoder layer",
            ));
        }
        let g = &run.fields[f];
        let query = match opts.query {
            Some(q) if q < g.len() => q,
            Some(q) => {
                return Err(input_err(
                    "--query",
                    format!("token {q} is outside field `{name}`'s 0..{}", g.len()),
                ));
            }
            None => {
                let [nt, ny, nx] = g.num_tokens;
                g.token_index(0, nt - 1, ny / 2, nx / 2)
            }
        };
        jobs.push((f, heads, query));
    }
    let mut figures = Vec::new();
    for (f, heads, query) in jobs {
        figures.push(matrix_figure(run, f, &heads, out, &opts.subtitle)?);
        figures.push(query_figure(run, f, &heads, query, out, &opts.subtitle)?);
    }
    Ok(figures)
}

fn caption(run: &ModelRun, f: usize, h: &HeadMap) -> String {
    match h.kind {
        HeadKind::Within => format!(
            "layer {} · head {} · within {}",
            h.layer, h.head, run.fields[f].name
        ),
        HeadKind::Across => format!("layer {} · head {} · across fields", h.layer, h.head),
    }
}

fn layout(heads: &[HeadMap]) -> (usize, usize) {
    let layers = heads.iter().map(|h| h.layer).max().map_or(0, |l| l + 1);
    (layers, heads.len() / layers.max(1))
}

fn matrix_figure(
    run: &ModelRun,
    f: usize,
    heads: &[HeadMap],
    out: &Path,
    subtitle: &str,
) -> Result<Figure> {
    let name = &run.fields[f].name;
    let path = out.join(format!("attention-{name}.png"));
    let what = path.display().to_string();
    let (rows, cols) = layout(heads);
    let size = (cols as u32 * PANEL + BAR_W, rows as u32 * PANEL + TITLE_H);
    let scale = ColourScale::fit(
        heads
            .iter()
            .flat_map(|h| h.weights.iter().map(|&w| f64::from(w))),
        false,
        "attention weight",
    );
    // Key-axis boundaries of a cross head: where each field's tokens start.
    let per_field: Vec<usize> = run
        .fields
        .iter()
        .map(|g| g.len() + run.extra_tokens)
        .collect();
    let separators: Vec<usize> = per_field
        .iter()
        .scan(0, |acc, n| {
            *acc += n;
            Some(*acc)
        })
        .take(per_field.len().saturating_sub(1))
        .collect();
    let field_names = run
        .fields
        .iter()
        .map(|g| g.name.as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    let across_desc = format!("key token ({field_names})");
    let rgb = render(&what, size, |root| {
        let body = title(
            root,
            &what,
            &format!("Encoder attention of field {name}, every layer and head"),
            subtitle,
        )?;
        let (cells, bar) = grid_with_bar(&body, (rows, cols), BAR_W);
        for (cell, h) in cells.iter().zip(heads) {
            let (x_desc, seps): (&str, &[usize]) = match h.kind {
                HeadKind::Within => ("key token", &[]),
                HeadKind::Across => (&across_desc, &separators),
            };
            matrix_panel(
                cell,
                &what,
                &caption(run, f, h),
                (h.rows, h.cols),
                &h.weights,
                &scale,
                (x_desc, "query token"),
                seps,
            )?;
        }
        colour_bar(&bar, &scale, &what)
    })?;
    Figure::write(path, size, &rgb, heads.len())
}

/// Draws the figure title (and a smaller subtitle, broken after its ` · `s into at most three
/// lines as wide as the figure) and returns the area below.
pub(crate) fn title<'a>(
    root: &Area<'a>,
    what: &str,
    text: &str,
    subtitle: &str,
) -> Result<Area<'a>> {
    let (top, body) = root.split_vertically(TITLE_H);
    top.draw(&Text::new(
        text.to_string(),
        (14, 6),
        (FONT_FAMILY, 22).into_font().color(&BLACK),
    ))
    .map_err(draw_err(what))?;
    // DejaVu Sans at 15 px averages about 8 px a character.
    let fits = (top.dim_in_pixel().0.saturating_sub(28) / 8) as usize;
    let mut lines: Vec<String> = Vec::new();
    for part in subtitle.split(" · ") {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 3 + part.chars().count() <= fits => {
                line.push_str(" · ");
                line.push_str(part);
            }
            _ => lines.push(part.to_string()),
        }
    }
    lines.truncate(3);
    for (k, line) in lines.iter().enumerate() {
        top.draw(&Text::new(
            line.clone(),
            (14, 34 + 19 * k as i32),
            (FONT_FAMILY, 15).into_font().color(&RGBColor(70, 70, 70)),
        ))
        .map_err(draw_err(what))?;
    }
    Ok(body)
}

/// One head's weights of `query` on the query field's own tokens, summed over the keys' levels
/// and times: `ny × nx` (row 0 north), and the share of the row they hold.
pub fn query_map(run: &ModelRun, f: usize, h: &HeadMap, query: usize) -> (Vec<f64>, f64) {
    let g = &run.fields[f];
    let extra = run.extra_tokens;
    let offset = match h.kind {
        HeadKind::Within => 0,
        HeadKind::Across => run.fields[..f].iter().map(|g| g.len() + extra).sum(),
    };
    let row = h.row(query + extra);
    let [_, ny, nx] = g.num_tokens;
    let mut map = vec![0.0; ny * nx];
    for k in 0..g.len() {
        let [_, _, y, x] = g.token_coords(k);
        map[y * nx + x] += f64::from(row[offset + extra + k]);
    }
    let share = map.iter().sum();
    (map, share)
}

fn query_figure(
    run: &ModelRun,
    f: usize,
    heads: &[HeadMap],
    query: usize,
    out: &Path,
    subtitle: &str,
) -> Result<Figure> {
    let g = &run.fields[f];
    let path = out.join(format!("attention-query-{}.png", g.name));
    let what = path.display().to_string();
    let (rows, cols) = layout(heads);
    let size = (cols as u32 * PANEL + BAR_W, rows as u32 * PANEL + TITLE_H);
    let maps: Vec<(Vec<f64>, f64)> = heads.iter().map(|h| query_map(run, f, h, query)).collect();
    let scale = ColourScale::fit(
        maps.iter().flat_map(|(m, _)| m.iter().copied()),
        false,
        "attention weight (Σ over levels, times)",
    );
    let [ql, qt, qy, qx] = g.token_coords(query);
    let [_, ny, nx] = g.num_tokens;
    let [_, sy, sx] = g.token_size;
    let d = g.spacing();
    // Token (y, x)'s box in degrees: its centre ± half its extent.
    let centre = |y: usize, x: usize| {
        let info = &g.info[g.token_index(0, 0, y, x)];
        (f64::from(info[4]), g.unwrap_lon(f64::from(info[5])))
    };
    let (half_lat, half_lon) = (sy as f64 * d / 2.0, sx as f64 * d / 2.0);
    let (north, west) = centre(0, 0);
    let (south, east) = centre(ny - 1, nx - 1);
    let lat_range = (south - half_lat)..(north + half_lat);
    let lon_range = (west - half_lon)..(east + half_lon);
    let (q_lat, q_lon) = centre(qy, qx);
    let head_title = format!(
        "Attention of one {} token on the map, per layer and head",
        g.name
    );
    let details = format!(
        "query token {query}: {}, {}, {q_lat:.1}°N {:.1}°E · {subtitle}",
        g.level_label(ql),
        g.time_label(qt * g.token_size[0] + g.token_size[0] - 1),
        q_lon.rem_euclid(360.0)
    );
    let rgb = render(&what, size, |root| {
        let body = title(root, &what, &head_title, &details)?;
        let (cells, bar) = grid_with_bar(&body, (rows, cols), BAR_W);
        for ((cell, h), (map, share)) in cells.iter().zip(heads).zip(&maps) {
            let cap = match h.kind {
                HeadKind::Within => caption(run, f, h),
                HeadKind::Across => format!(
                    "layer {} · head {} · across ({:.0}% on {})",
                    h.layer,
                    h.head,
                    share * 100.0,
                    g.name
                ),
            };
            let mut chart = ChartBuilder::on(cell)
                .caption(cap, (FONT_FAMILY, 15))
                .margin(6)
                .x_label_area_size(38)
                .y_label_area_size(48)
                .build_cartesian_2d(lon_range.clone(), lat_range.clone())
                .map_err(draw_err(&what))?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc("longitude (°E)")
                .y_desc("latitude (°N)")
                .x_labels(5)
                .y_labels(5)
                .x_label_formatter(&|v| format!("{:.0}", v.rem_euclid(360.0)))
                .y_label_formatter(&|v| format!("{v:.0}"))
                .label_style((FONT_FAMILY, 12))
                .axis_desc_style((FONT_FAMILY, 13))
                .draw()
                .map_err(draw_err(&what))?;
            chart
                .draw_series((0..ny * nx).map(|i| {
                    let (lat, lon) = centre(i / nx, i % nx);
                    Rectangle::new(
                        [
                            (lon - half_lon, lat + half_lat),
                            (lon + half_lon, lat - half_lat),
                        ],
                        scale.colour(map[i]).filled(),
                    )
                }))
                .map_err(draw_err(&what))?;
            // The query token: a ring drawn twice so it shows on dark and light colours.
            chart
                .draw_series([
                    Circle::new((q_lon, q_lat), 9, WHITE.stroke_width(4)),
                    Circle::new((q_lon, q_lat), 9, BLACK.stroke_width(2)),
                ])
                .map_err(draw_err(&what))?;
        }
        colour_bar(&bar, &scale, &what)
    })?;
    Figure::write(path, size, &rgb, heads.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::tests::tiny_run;
    use crate::test_png::assert_png;

    #[test]
    fn every_layer_and_head_has_a_map_whose_rows_sum_to_one() {
        let run = tiny_run();
        for f in 0..run.fields.len() {
            let heads = field_heads(&run, f).unwrap();
            // tiny: 1 encoder layer × 2 heads (1 within, 1 across).
            assert_eq!(heads.len(), 2);
            assert_eq!(heads[0].kind, HeadKind::Within);
            assert_eq!((heads[0].rows, heads[0].cols), (16, 16));
            assert_eq!((heads[1].rows, heads[1].cols), (16, 32));
            for h in &heads {
                for q in 0..h.rows {
                    let s: f32 = h.row(q).iter().sum();
                    assert!(
                        (s - 1.0).abs() < 1e-5,
                        "layer {} head {} row {q}: {s}",
                        h.layer,
                        h.head
                    );
                }
            }
            let (map, share) = query_map(&run, f, &heads[0], 3);
            assert!((share - 1.0).abs() < 1e-5);
            assert_eq!(map.len(), 4);
            let (_, share) = query_map(&run, f, &heads[1], 3);
            assert!(share > 0.0 && share < 1.0, "{share}");
        }
    }

    #[test]
    fn the_figures_have_one_panel_per_layer_and_head() {
        let run = tiny_run();
        let dir = tempfile::tempdir().unwrap();
        let opts = AttentionOptions {
            subtitle: "unit test".into(),
            ..Default::default()
        };
        let figs = attention_figures(&run, dir.path(), &opts).unwrap();
        assert_eq!(figs.len(), 4);
        for fig in &figs {
            assert_eq!(fig.panels, 2);
            assert_eq!(
                (fig.width, fig.height),
                (2 * PANEL + BAR_W, PANEL + TITLE_H)
            );
            assert_png(&fig.path, (fig.width, fig.height));
        }
        let bad = AttentionOptions {
            query: Some(16),
            ..Default::default()
        };
        let err = attention_figures(&run, dir.path(), &bad).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let bad = AttentionOptions {
            fields: vec!["q".into()],
            ..Default::default()
        };
        let err = attention_figures(&run, dir.path(), &bad).unwrap_err();
        assert!(err.to_string().contains("`q`"), "{err}");
    }
}
