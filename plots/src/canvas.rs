//! The pieces every figure shares: the embedded font, rendering into memory, atomic PNG and GIF
//! files, colour maps, colour bars and raster heat maps.
//!
//! Figures render into an RGB buffer first and are written as `.NAME.tmp-PID` beside the target,
//! then renamed: a failure half way (a drawing error, a full disk, a killed process) leaves no
//! half-written picture under the final name.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{PlotError, Result, draw_err, input_err};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// The font family every figure uses.
pub const FONT_FAMILY: &str = "sans-serif";

/// Registers the embedded DejaVu Sans as `sans-serif` (idempotent), so figures render on
/// machines with no fonts installed.
pub fn register_font() {
    REGISTER.call_once(|| {
        // The font is compiled in; failing to parse it is a build defect, not a runtime state.
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| "embedded font is invalid")
            .expect("embedded DejaVuSans.ttf parses");
    });
}

/// A drawing area of the in-memory bitmap.
pub type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Renders one `width`×`height` frame with `draw` and returns its RGB bytes.
pub fn render(
    what: &str,
    (width, height): (u32, u32),
    draw: impl FnOnce(&Area<'_>) -> Result<()>,
) -> Result<Vec<u8>> {
    if width < 64 || height < 64 {
        return Err(input_err(
            what,
            format!("a {width}×{height} picture is too small"),
        ));
    }
    register_font();
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(what))?;
        draw(&root)?;
        root.present().map_err(draw_err(what))?;
    }
    Ok(buf)
}

/// The temporary name beside `path` a picture is written under before it is renamed.
fn temporary(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes through `write` into a temporary file beside `path`, then renames it to `path`.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| PlotError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let tmp = temporary(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        PlotError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Writes an RGB frame as a PNG at `path` (atomically).
pub fn write_png(path: &Path, (width, height): (u32, u32), rgb: &[u8]) -> Result<()> {
    if rgb.len() != width as usize * height as usize * 3 {
        return Err(PlotError::Encode {
            path: path.to_path_buf(),
            detail: format!("{} bytes for {width}×{height} RGB pixels", rgb.len()),
        });
    }
    write_atomically(path, |tmp| {
        image::save_buffer_with_format(
            tmp,
            rgb,
            width,
            height,
            image::ColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .map_err(|e| PlotError::Encode {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    })
}

/// Writes RGB frames as an endlessly looping animated GIF at `path` (atomically), each shown
/// for `delay_ms`.
pub fn write_gif(
    path: &Path,
    (width, height): (u32, u32),
    frames: &[Vec<u8>],
    delay_ms: u32,
) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let enc = |e: image::ImageError| PlotError::Encode {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    write_atomically(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|source| PlotError::Io {
            path: tmp.to_path_buf(),
            source,
        })?;
        let mut encoder = GifEncoder::new_with_speed(std::io::BufWriter::new(file), 10);
        encoder.set_repeat(Repeat::Infinite).map_err(enc)?;
        for rgb in frames {
            let rgba: Vec<u8> = rgb
                .chunks_exact(3)
                .flat_map(|p| [p[0], p[1], p[2], 255])
                .collect();
            let img = image::RgbaImage::from_raw(width, height, rgba).ok_or_else(|| {
                PlotError::Encode {
                    path: path.to_path_buf(),
                    detail: format!("a frame of {} bytes is not {width}×{height} RGB", rgb.len()),
                }
            })?;
            let delay = image::Delay::from_numer_denom_ms(delay_ms, 1);
            encoder
                .encode_frame(image::Frame::from_parts(img, 0, 0, delay))
                .map_err(enc)?;
        }
        Ok(())
    })
}

/// A colour map: colours at evenly spaced stops, linearly interpolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColourMap {
    /// Perceptually uniform, sequential (matplotlib's viridis): magnitudes, weights.
    Viridis,
    /// Diverging blue–white–red (matplotlib's RdBu_r): anomalies and signed quantities.
    BlueRed,
}

const VIRIDIS: [(u8, u8, u8); 9] = [
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
];

const BLUE_RED: [(u8, u8, u8); 9] = [
    (5, 48, 97),
    (33, 102, 172),
    (67, 147, 195),
    (146, 197, 222),
    (247, 247, 247),
    (244, 165, 130),
    (214, 96, 77),
    (178, 24, 43),
    (103, 0, 31),
];

impl ColourMap {
    /// The colour of `t` in [0, 1] (clamped).
    pub fn at(self, t: f64) -> RGBColor {
        let stops = match self {
            Self::Viridis => &VIRIDIS,
            Self::BlueRed => &BLUE_RED,
        };
        let t = if t.is_finite() {
            t.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let x = t * (stops.len() - 1) as f64;
        let i = (x.floor() as usize).min(stops.len() - 2);
        let f = x - i as f64;
        let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * f).round() as u8;
        let (a, b) = (stops[i], stops[i + 1]);
        RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
    }
}

/// A value range mapped onto a colour map, with the label of its colour bar.
#[derive(Debug, Clone, PartialEq)]
pub struct ColourScale {
    pub map: ColourMap,
    pub min: f64,
    pub max: f64,
    /// The colour bar's axis label (quantity and unit).
    pub label: String,
}

/// matplotlib's `tab10`: categorical colours for curves and bars told apart by colour alone.
pub const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of "no value here" (land of a mask, a token that is not a target).
pub const NO_DATA: RGBColor = RGBColor(215, 215, 215);

impl ColourScale {
    /// A scale over the finite values of `values`: diverging and symmetric about 0 when they
    /// have both signs and `signed` allows it, sequential otherwise. A constant field still
    /// gets a range of non-zero width.
    pub fn fit(values: impl IntoIterator<Item = f64>, signed: bool, label: &str) -> Self {
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.into_iter().filter(|v| v.is_finite()) {
            min = min.min(v);
            max = max.max(v);
        }
        if !min.is_finite() {
            (min, max) = (0.0, 1.0);
        }
        let map = if signed && min < 0.0 && max > 0.0 {
            let m = min.abs().max(max);
            (min, max) = (-m, m);
            ColourMap::BlueRed
        } else {
            ColourMap::Viridis
        };
        if max - min <= f64::EPSILON * max.abs().max(1.0) {
            let pad = (max.abs() * 0.01).max(1e-6);
            (min, max) = (min - pad, max + pad);
        }
        Self {
            map,
            min,
            max,
            label: label.to_string(),
        }
    }

    pub fn colour(&self, v: f64) -> RGBColor {
        if !v.is_finite() {
            return NO_DATA;
        }
        self.map.at((v - self.min) / (self.max - self.min))
    }
}

/// Draws a vertical colour bar for `scale` filling `area`: the bar on the left, tick labels to
/// its right and the scale's label, reading upwards, along the right edge. Drawn by hand rather
/// than as a plotters chart, whose right-axis labels are placed by estimated text widths and
/// can land on the bar.
pub fn colour_bar(area: &Area<'_>, scale: &ColourScale, what: &str) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let (x0, bar_w, top, bottom) = (8, (w / 5).clamp(12, 28), 30, h - 30);
    if bottom - top < 40 {
        return Err(input_err(what, "too little room for a colour bar"));
    }
    let (min, max) = (scale.min, scale.max);
    let bar = area.clone().shrink((x0, top), (bar_w, bottom - top));
    raster(&bar, what, |_, fy| {
        Some(scale.colour(min + (max - min) * fy))
    })?;
    area.draw(&Rectangle::new(
        [(x0, top), (x0 + bar_w, bottom)],
        BLACK.stroke_width(1),
    ))
    .map_err(draw_err(what))?;
    let y_of = |v: f64| bottom - ((v - min) / (max - min) * f64::from(bottom - top)).round() as i32;
    let style = TextStyle::from((FONT_FAMILY, 13).into_font())
        .color(&BLACK)
        .pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Left,
            plotters::style::text_anchor::VPos::Center,
        ));
    for v in nice_ticks(min, max, 6) {
        let y = y_of(v);
        area.draw(&PathElement::new(
            vec![(x0 + bar_w, y), (x0 + bar_w + 4, y)],
            BLACK.stroke_width(1),
        ))
        .map_err(draw_err(what))?;
        area.draw(&Text::new(tick(v), (x0 + bar_w + 7, y), style.clone()))
            .map_err(draw_err(what))?;
    }
    let label = TextStyle::from(
        (FONT_FAMILY, 14)
            .into_font()
            .transform(FontTransform::Rotate270),
    )
    .color(&BLACK)
    .pos(plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Center,
        plotters::style::text_anchor::VPos::Center,
    ));
    area.draw(&Text::new(
        scale.label.clone(),
        (w - 12, (top + bottom) / 2),
        label,
    ))
    .map_err(draw_err(what))?;
    Ok(())
}

/// About `n` round tick values (1, 2, 2.5 or 5 × 10ᵏ apart) inside `min..=max`.
pub fn nice_ticks(min: f64, max: f64, n: usize) -> Vec<f64> {
    let span = max - min;
    if !(span.is_finite() && span > 0.0) || n == 0 {
        return Vec::new();
    }
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    // The slack keeps an end that is a multiple of the step (-0.3 / 0.1 = -2.9999…) in.
    let first = (min / step - 1e-9).ceil() as i64;
    let last = (max / step + 1e-9).floor() as i64;
    (first..=last)
        .map(|k| {
            let v = k as f64 * step;
            // A zero tick that rounding left as 1e-17 (or -0) prints as 0.
            if v.abs() < step * 1e-9 { 0.0 } else { v }
        })
        .collect()
}

/// Fills every pixel of `area` with `colour(fx, fy)`, where `fx` runs 0 → 1 left to right and
/// `fy` 0 → 1 bottom to top through pixel centres (`None`: leave the pixel).
pub fn raster(
    area: &Area<'_>,
    what: &str,
    colour: impl Fn(f64, f64) -> Option<RGBColor>,
) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    for py in 0..h {
        let fy = 1.0 - (f64::from(py) + 0.5) / f64::from(h);
        for px in 0..w {
            let fx = (f64::from(px) + 0.5) / f64::from(w);
            if let Some(c) = colour(fx, fy) {
                area.draw_pixel((px as i32, py as i32), &c)
                    .map_err(draw_err(what))?;
            }
        }
    }
    Ok(())
}

/// A short tick label: few digits, scientific for very small or large magnitudes.
pub fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-4..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .into()
    } else {
        // Four significant digits, so neighbouring ticks such as 0.0025 and 0.003 stay apart.
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        format!("{v:.decimals$}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .into()
    }
}

/// A heat map of `values` (`rows`×`cols`, row-major, row 0 at the top) in a chart with axes
/// running over token indices, with `caption` above it.
#[allow(clippy::too_many_arguments)]
pub fn matrix_panel(
    area: &Area<'_>,
    what: &str,
    caption: &str,
    (rows, cols): (usize, usize),
    values: &[f32],
    scale: &ColourScale,
    (x_desc, y_desc): (&str, &str),
    x_separators: &[usize],
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT_FAMILY, 15))
        .margin(6)
        .x_label_area_size(38)
        .y_label_area_size(44)
        .build_cartesian_2d(0.0..cols as f64, rows as f64..0.0)
        .map_err(draw_err(what))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(5)
        .y_labels(5)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT_FAMILY, 12))
        .axis_desc_style((FONT_FAMILY, 13))
        .draw()
        .map_err(draw_err(what))?;
    raster(&chart.plotting_area().strip_coord_spec(), what, |fx, fy| {
        let c = ((fx * cols as f64) as usize).min(cols - 1);
        let r = (((1.0 - fy) * rows as f64) as usize).min(rows - 1);
        Some(scale.colour(f64::from(values[r * cols + c])))
    })?;
    for &x in x_separators {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x as f64, 0.0), (x as f64, rows as f64)],
                WHITE.stroke_width(2),
            )))
            .map_err(draw_err(what))?;
    }
    Ok(())
}

/// Splits `area` into a grid of `rows`×`cols` cells and a colour-bar strip of `bar_width` on
/// the right.
pub fn grid_with_bar<'a>(
    area: &Area<'a>,
    (rows, cols): (usize, usize),
    bar_width: u32,
) -> (Vec<Area<'a>>, Area<'a>) {
    let (w, _) = area.dim_in_pixel();
    let (grid, bar) = area.split_horizontally(w.saturating_sub(bar_width));
    (grid.split_evenly((rows, cols)), bar)
}

/// An even range of `n` values from `range` (for subsampled time axes).
pub fn spread(range: Range<usize>, n: usize) -> Vec<usize> {
    let len = range.len();
    if n == 0 || len == 0 {
        return Vec::new();
    }
    if len <= n {
        return range.collect();
    }
    (0..n)
        .map(|i| range.start + (i * (len - 1) + (n - 1) / 2) / (n - 1).max(1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_scales_fit_their_values() {
        let s = ColourScale::fit([-1.0, 3.0, f64::NAN], true, "x");
        assert_eq!((s.map, s.min, s.max), (ColourMap::BlueRed, -3.0, 3.0));
        assert_eq!(s.colour(0.0), RGBColor(247, 247, 247));
        let s = ColourScale::fit([2.0, 5.0], true, "x");
        assert_eq!((s.map, s.min, s.max), (ColourMap::Viridis, 2.0, 5.0));
        assert_eq!(s.colour(2.0), RGBColor(68, 1, 84));
        assert_eq!(s.colour(5.0), RGBColor(253, 231, 37));
        assert_eq!(s.colour(f64::NAN), NO_DATA);
        let flat = ColourScale::fit([4.0, 4.0], false, "x");
        assert!(flat.min < 4.0 && flat.max > 4.0);
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(1.5), "1.5");
        assert_eq!(tick(0.0625), "0.0625");
        assert_eq!(tick(0.0025), "0.0025");
        assert_eq!(tick(0.35), "0.35");
        assert_eq!(tick(250.4), "250");
        assert_eq!(tick(1.0e-5), "1.0e-5");
    }

    #[test]
    fn nice_ticks_are_round_and_inside() {
        let labels = |min, max, n| -> Vec<String> {
            nice_ticks(min, max, n).into_iter().map(tick).collect()
        };
        assert_eq!(labels(0.0, 1.0, 5), ["0", "0.2", "0.4", "0.6", "0.8", "1"]);
        assert_eq!(
            labels(-0.3, 0.3, 6),
            ["-0.3", "-0.2", "-0.1", "0", "0.1", "0.2", "0.3"]
        );
        assert_eq!(labels(4990.0, 5310.0, 6), ["5000", "5100", "5200", "5300"]);
        assert!(nice_ticks(1.0, 1.0, 5).is_empty());
    }

    #[test]
    fn spread_picks_even_indices() {
        assert_eq!(spread(0..4, 12), vec![0, 1, 2, 3]);
        assert_eq!(spread(0..36, 4), vec![0, 12, 23, 35]);
        assert!(spread(0..0, 3).is_empty());
    }

    #[test]
    fn a_failed_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        // Too few bytes for the stated size: refused, and nothing stays behind (the GIF fails
        // on its second frame, after its temporary file was created).
        let err = write_png(&path, (10, 10), &[0; 5]).unwrap_err();
        assert!(matches!(err, PlotError::Encode { .. }), "{err}");
        let gif = dir.path().join("x.gif");
        let frames = [vec![0; 3 * 4], vec![0; 5]];
        let err = write_gif(&gif, (2, 2), &frames, 100).unwrap_err();
        assert!(matches!(err, PlotError::Encode { .. }), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_png(&path, (2, 1), &[0, 0, 0, 255, 255, 255]).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (2, 1));
    }
}
