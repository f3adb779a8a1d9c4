//! `atmorep plot tokens`: how a sample's tokens evolve in time, and what the model made of them.
//!
//! Per field and level, one figure with a column per time slice of the window (at most
//! [`MAX_COLUMNS`], evenly spread) and four rows: the **source** (the sample before masking),
//! the **masked input** the model saw, the model's **prediction** (ensemble mean) and the
//! **target**, both in the masked tokens only (the rest is grey: the loss sees nothing else). Masked tokens
//! are outlined in the lower three rows. All panels share one colour scale, so a prediction is
//! compared with its target by colour alone. An animated GIF shows the same four maps for every
//! time slice in turn.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::attention::{Figure, TITLE_H, title};
use crate::canvas::{
    Area, ColourScale, FONT_FAMILY, NO_DATA, colour_bar, grid_with_bar, raster, render, spread,
    tick, write_gif,
};
use crate::error::{Result, draw_err, input_err};
use crate::sample::{FieldGrid, ModelRun, unmasked_source};

/// Time slices the PNG shows at most (the GIF shows all).
pub const MAX_COLUMNS: usize = 8;
/// How long the GIF shows each time slice.
pub const GIF_FRAME_MS: u32 = 700;

const ROWS: [&str; 4] = ["source", "masked input", "prediction", "target"];
const PANEL_W: u32 = 250;
const BAR_W: u32 = 132;

/// One field level of the first sample as grid-point maps: `[row][time][lat · lon]`, rows in
/// [`ROWS`] order (`NaN` where a row has no value), and which points belong to masked tokens.
#[derive(Debug, Clone)]
pub struct TokenSeries {
    pub field: String,
    pub level: usize,
    /// `[time][lat · lon]`.
    pub rows: [Vec<Vec<f32>>; 4],
    /// Per time, the masked tokens' (lat, lon) token indices.
    pub masked: Vec<Vec<(usize, usize)>>,
}

/// The grid-point maps of field `f` at level index `level`.
pub fn token_series(run: &ModelRun, f: usize, level: usize) -> TokenSeries {
    let g = &run.fields[f];
    let fb = &run.batches[f];
    let source = unmasked_source(fb);
    let input = fb.source_of(0);
    let pred = &run.predictions[f];
    let masked_set: std::collections::HashSet<usize> =
        fb.masked_indices[0].iter().map(|&i| i as usize).collect();
    let [nt_grid, ny_grid, nx_grid] = g.grid_shape();
    let [st, sy, sx] = g.token_size;
    let v = g.token_numel();
    let value_index = |tau: usize, y: usize, x: usize| {
        let token = g.token_index(level, tau / st, y / sy, x / sx);
        (token, token * v + ((tau % st) * sy + y % sy) * sx + x % sx)
    };
    let mut rows: [Vec<Vec<f32>>; 4] = Default::default();
    for tau in 0..nt_grid {
        let mut maps = [(); 4].map(|_| Vec::with_capacity(ny_grid * nx_grid));
        for y in 0..ny_grid {
            for x in 0..nx_grid {
                let (token, i) = value_index(tau, y, x);
                let is_masked = masked_set.contains(&token);
                maps[0].push(source[i]);
                maps[1].push(input[i]);
                // The loss sees only masked tokens, so a prediction elsewhere means nothing.
                maps[2].push(if is_masked { pred[i] } else { f32::NAN });
                maps[3].push(if is_masked { source[i] } else { f32::NAN });
            }
        }
        for (row, map) in rows.iter_mut().zip(maps) {
            row.push(map);
        }
    }
    let [_, ny, nx] = g.num_tokens;
    let masked = (0..nt_grid)
        .map(|tau| {
            (0..ny * nx)
                .map(|i| (i / nx, i % nx))
                .filter(|&(y, x)| masked_set.contains(&g.token_index(level, tau / st, y, x)))
                .collect()
        })
        .collect();
    TokenSeries {
        field: g.name.clone(),
        level,
        rows,
        masked,
    }
}

/// Options of the token figures.
#[derive(Debug, Clone, Default)]
pub struct TokenOptions {
    /// Only these fields (default: all of the model's).
    pub fields: Vec<String>,
    /// Only these levels, as the store names them (default: all).
    pub levels: Vec<f64>,
    /// Said in every title.
    pub subtitle: String,
}

/// Writes `tokens-FIELD-LEVEL.png` and `tokens-FIELD-LEVEL.gif` for every chosen field and
/// level into `out`; returns the PNGs (the GIFs lie beside them).
pub fn token_figures(run: &ModelRun, out: &Path, opts: &TokenOptions) -> Result<Vec<Figure>> {
    let names: Vec<String> = if opts.fields.is_empty() {
        run.fields.iter().map(|f| f.name.clone()).collect()
    } else {
        opts.fields.clone()
    };
    let mut jobs = Vec::new();
    for name in &names {
        let f = run.field_index(name)?;
        let g = &run.fields[f];
        if opts.levels.is_empty() {
            jobs.extend((0..g.levels.len()).map(|l| (f, l)));
        }
        for want in &opts.levels {
            let l = g.levels.iter().position(|v| v == want).ok_or_else(|| {
                input_err(
                    format!("--level {want}"),
                    format!("field `{name}` has levels {:?}", g.levels),
                )
            })?;
            jobs.push((f, l));
        }
    }
    let mut figures = Vec::new();
    for (f, l) in jobs {
        let series = token_series(run, f, l);
        figures.push(draw_tokens(&run.fields[f], &series, out, &opts.subtitle)?);
    }
    Ok(figures)
}

/// Panel size for the window's aspect ratio (degrees: lat × lon grid points).
fn panel_size(g: &FieldGrid) -> (u32, u32) {
    let [_, ny, nx] = g.grid_shape();
    let plot_w = f64::from(PANEL_W - 60);
    let plot_h = (plot_w * ny as f64 / nx as f64).clamp(90.0, 330.0);
    (PANEL_W, plot_h as u32 + 70)
}

fn file_stem(g: &FieldGrid, level: usize) -> String {
    let level = match g.levels[level] {
        v if v.is_finite() => tick(v),
        _ => "surface".into(),
    };
    format!("tokens-{}-{level}", g.name)
}

fn draw_tokens(g: &FieldGrid, s: &TokenSeries, out: &Path, subtitle: &str) -> Result<Figure> {
    let stem = file_stem(g, s.level);
    let path = out.join(format!("{stem}.png"));
    let gif: PathBuf = out.join(format!("{stem}.gif"));
    let what = path.display().to_string();
    let times = spread(0..s.rows[0].len(), MAX_COLUMNS);
    let (pw, ph) = panel_size(g);
    let scale = ColourScale::fit(
        s.rows[..3]
            .iter()
            .flatten()
            .flatten()
            .map(|&v| f64::from(v)),
        true,
        "value (normalized units)",
    );
    let heading = format!(
        "{} at {}: source, masked input, prediction and target",
        g.name,
        g.level_label(s.level)
    );
    let size = (
        times.len() as u32 * pw + BAR_W,
        ROWS.len() as u32 * ph + TITLE_H,
    );
    let rgb = render(&what, size, |root| {
        let body = title(root, &what, &heading, subtitle)?;
        let (cells, bar) = grid_with_bar(&body, (ROWS.len(), times.len()), BAR_W);
        for (r, name) in ROWS.iter().enumerate() {
            for (c, &tau) in times.iter().enumerate() {
                let cap = if r >= 2 && s.masked[tau].is_empty() {
                    format!("{name}: no token masked")
                } else {
                    format!("{name} · {}", g.time_label(tau))
                };
                map_panel(
                    &cells[r * times.len() + c],
                    &what,
                    g,
                    s,
                    r,
                    tau,
                    &cap,
                    &scale,
                )?;
            }
        }
        colour_bar(&bar, &scale, &what)
    })?;

    let gif_what = gif.display().to_string();
    let gif_size = (ROWS.len() as u32 * pw + BAR_W, ph + TITLE_H);
    let frames = (0..s.rows[0].len())
        .map(|tau| {
            render(&gif_what, gif_size, |root| {
                let body = title(
                    root,
                    &gif_what,
                    &format!("{heading}, {}", g.time_label(tau)),
                    subtitle,
                )?;
                let (cells, bar) = grid_with_bar(&body, (1, ROWS.len()), BAR_W);
                for (r, name) in ROWS.iter().enumerate() {
                    map_panel(&cells[r], &gif_what, g, s, r, tau, name, &scale)?;
                }
                colour_bar(&bar, &scale, &gif_what)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let figure = Figure::write(path, size, &rgb, ROWS.len() * times.len())?;
    write_gif(&gif, gif_size, &frames, GIF_FRAME_MS)?;
    Ok(figure)
}

/// One latitude/longitude map of row `row` at time `tau`.
#[allow(clippy::too_many_arguments)]
fn map_panel(
    area: &Area<'_>,
    what: &str,
    g: &FieldGrid,
    s: &TokenSeries,
    row: usize,
    tau: usize,
    caption: &str,
    scale: &ColourScale,
) -> Result<()> {
    let [_, ny, nx] = g.grid_shape();
    let d = g.spacing();
    let (north, west) = g.grid_lat_lon(0, 0);
    let (south, east) = g.grid_lat_lon(ny - 1, nx - 1);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT_FAMILY, 14))
        .margin(5)
        .x_label_area_size(34)
        .y_label_area_size(44)
        .build_cartesian_2d(
            (west - d / 2.0)..(east + d / 2.0),
            (south - d / 2.0)..(north + d / 2.0),
        )
        .map_err(draw_err(what))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("longitude (°E)")
        .y_desc("latitude (°N)")
        .x_labels(4)
        .y_labels(4)
        .x_label_formatter(&|v| format!("{:.0}", v.rem_euclid(360.0)))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT_FAMILY, 11))
        .axis_desc_style((FONT_FAMILY, 12))
        .draw()
        .map_err(draw_err(what))?;
    let map = &s.rows[row][tau];
    raster(&chart.plotting_area().strip_coord_spec(), what, |fx, fy| {
        let x = ((fx * nx as f64) as usize).min(nx - 1);
        let y = (((1.0 - fy) * ny as f64) as usize).min(ny - 1);
        let v = map[y * nx + x];
        Some(if v.is_finite() {
            scale.colour(f64::from(v))
        } else {
            NO_DATA
        })
    })?;
    if row > 0 {
        let [_, sy, sx] = g.token_size;
        chart
            .draw_series(s.masked[tau].iter().map(|&(ty, tx)| {
                let (n, w) = g.grid_lat_lon(ty * sy, tx * sx);
                let (so, e) = g.grid_lat_lon(ty * sy + sy - 1, tx * sx + sx - 1);
                Rectangle::new(
                    [(w - d / 2.0, n + d / 2.0), (e + d / 2.0, so - d / 2.0)],
                    BLACK.stroke_width(1),
                )
            }))
            .map_err(draw_err(what))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::tests::tiny_run;
    use crate::test_png::assert_png;

    #[test]
    fn series_put_tokens_back_on_the_grid() {
        let run = tiny_run();
        let s = token_series(&run, 0, 0);
        assert_eq!(s.rows[0].len(), 2);
        assert_eq!(s.rows[0][0].len(), 6 * 8);
        // Token 1 of level 0 (t 0, lat 0, lon 1) is masked: grid points x 4..8, y 0..3 at τ 0.
        assert_eq!(s.masked[0], vec![(0, 1)]);
        assert_eq!(s.masked[1], vec![(0, 1)]); // token 5 = (t 1, lat 0, lon 1)
        let fb = &run.batches[0];
        // Grid point (τ 0, y 1, x 5) is value (1 · 4 + 1) of token 1.
        assert_eq!(s.rows[1][0][8 + 5], fb.source_of(0)[12 + 5]);
        assert_eq!(s.rows[0][0][8 + 5], fb.source_of(0)[12 + 5] + 0.5);
        assert_eq!(s.rows[3][0][8 + 5], s.rows[0][0][8 + 5]);
        assert!(s.rows[3][0][0].is_nan());
        assert!(s.rows[2][0][0].is_nan());
        assert_eq!(s.rows[2][0][5], run.predictions[0][12 + 1]);
    }

    #[test]
    fn figures_and_gifs_are_written() {
        let run = tiny_run();
        let dir = tempfile::tempdir().unwrap();
        let opts = TokenOptions {
            fields: vec!["z".into()],
            levels: vec![500.0],
            subtitle: "unit test".into(),
        };
        let figs = token_figures(&run, dir.path(), &opts).unwrap();
        assert_eq!(figs.len(), 1);
        let fig = &figs[0];
        assert_eq!(fig.path.file_name().unwrap(), "tokens-z-500.png");
        assert_eq!(fig.panels, 8);
        assert_png(&fig.path, (fig.width, fig.height));
        let gif = fig.path.with_extension("gif");
        let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
            std::fs::File::open(&gif).unwrap(),
        ))
        .unwrap();
        use image::AnimationDecoder;
        assert_eq!(decoder.into_frames().count(), 2);

        let bad = TokenOptions {
            levels: vec![700.0],
            ..Default::default()
        };
        let err = token_figures(&run, dir.path(), &bad).unwrap_err();
        assert!(err.to_string().contains("700"), "{err}");
    }
}
