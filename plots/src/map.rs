//! A PNG map of tracks: a latitude/longitude frame, one coloured line per track with a dot at its
//! first point, reference tracks dashed. No coastlines — the map is for judging tracks against
//! each other, and stays free of map data.
//!
//! The longitude frame starts in the widest stretch of longitude without points, so storms
//! crossing the dateline or 0° are drawn as one line each; a line that still wraps within the
//! frame is broken at its edge rather than drawn across the map.

use std::path::Path;

use atmorep_track::geo::{wrap_180, wrap_360};
use atmorep_track::tracks::Track;
use plotters::prelude::*;

use crate::canvas::{FONT_FAMILY, render, write_png};
use crate::error::{Result, draw_err, input_err};

/// What the map shows.
#[derive(Debug, Clone, PartialEq)]
pub struct MapConfig {
    /// Image size in pixels.
    pub width: u32,
    pub height: u32,
    pub title: String,
    /// Latitude range (south, north); `None`: the tracks' extent plus a margin.
    pub lat_range: Option<(f64, f64)>,
    /// Longitude range (west, east) in the frame's convention; `None`: the tracks' extent plus
    /// a margin.
    pub lon_range: Option<(f64, f64)>,
    /// Label each track with its SID in a legend (up to this many tracks).
    pub legend_max: usize,
}

impl Default for MapConfig {
    fn default() -> Self {
        Self {
            width: 1200,
            height: 700,
            title: "Tropical cyclone tracks".into(),
            lat_range: None,
            lon_range: None,
            legend_max: 12,
        }
    }
}

/// Longitude in the 360° frame starting at `west`.
fn in_frame(lon: f64, west: f64) -> f64 {
    (lon - west).rem_euclid(360.0) + west
}

/// Picks the frame's western edge in the middle of the widest stretch of longitude without
/// points, so that the frame cuts the globe where there is nothing to cut — tracks crossing 0°
/// and tracks crossing 180° both stay whole.
fn pick_frame(lons: &[f64]) -> f64 {
    let mut v: Vec<f64> = lons.iter().map(|&l| wrap_360(l)).collect();
    v.sort_by(f64::total_cmp);
    let (Some(&first), Some(&last)) = (v.first(), v.last()) else {
        return 0.0;
    };
    let mut best = (first + 360.0 - last, last);
    for w in v.windows(2) {
        if w[1] - w[0] > best.0 {
            best = (w[1] - w[0], w[0]);
        }
    }
    wrap_360(best.1 + best.0 / 2.0)
}

/// A track's points in the frame, split where consecutive points jump by more than half the
/// globe (the track wraps within the frame).
fn segments(track: &Track, west: f64) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    let mut prev: Option<f64> = None;
    for p in &track.points {
        let x = in_frame(p.lon, west);
        if let Some(px) = prev
            && (x - px).abs() > 180.0
        {
            out.push(Vec::new());
        }
        out.last_mut().expect("never empty").push((x, p.lat));
        prev = Some(x);
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Draws `tracks` (and `reference` dashed, if given) into a PNG at `path`.
pub fn draw_map(
    path: &Path,
    tracks: &[Track],
    reference: Option<&[Track]>,
    cfg: &MapConfig,
) -> Result<()> {
    let what = path.display().to_string();
    if cfg.width < 200 || cfg.height < 150 {
        return Err(input_err(
            &what,
            format!(
                "map size {}×{} is too small (at least 200×150)",
                cfg.width, cfg.height
            ),
        ));
    }
    let reference = reference.unwrap_or(&[]);
    let all = || tracks.iter().chain(reference).flat_map(|t| &t.points);
    let lons: Vec<f64> = all().map(|p| p.lon).collect();
    let west = pick_frame(&lons);
    let (lon_lo, lon_hi) = cfg.lon_range.unwrap_or_else(|| {
        if lons.is_empty() {
            return (west, west + 360.0);
        }
        let (lo, hi) = lons
            .iter()
            .map(|&l| in_frame(l, west))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |a, x| {
                (a.0.min(x), a.1.max(x))
            });
        ((lo - 10.0).max(west), (hi + 10.0).min(west + 360.0))
    });
    let (lat_lo, lat_hi) = cfg.lat_range.unwrap_or_else(|| {
        let (lo, hi) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
            (a.0.min(p.lat), a.1.max(p.lat))
        });
        if lo.is_finite() {
            ((lo - 8.0).max(-90.0), (hi + 8.0).min(90.0))
        } else {
            (-90.0, 90.0)
        }
    });
    if !(lon_lo < lon_hi && lat_lo < lat_hi) {
        return Err(input_err(
            &what,
            format!("map ranges lon {lon_lo}…{lon_hi}, lat {lat_lo}…{lat_hi} are empty"),
        ));
    }

    let size = (cfg.width, cfg.height);
    let rgb = render(&what, size, |root| {
        let err = draw_err(&what);
        let mut chart = ChartBuilder::on(root)
            .caption(&cfg.title, (FONT_FAMILY, 24))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(lon_lo..lon_hi, lat_lo..lat_hi)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .x_desc("longitude")
            .y_desc("latitude")
            .x_label_formatter(&|x| {
                let l = wrap_180(*x);
                format!("{:.0}°{}", l.abs(), if l < 0.0 { "W" } else { "E" })
            })
            .y_label_formatter(&|y| format!("{:.0}°{}", y.abs(), if *y < 0.0 { "S" } else { "N" }))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(&err)?;

        let legend = tracks.len() + reference.len() <= cfg.legend_max;
        for r in reference {
            let style = ShapeStyle::from(&RGBColor(60, 60, 60)).stroke_width(2);
            for (n, seg) in segments(r, west).into_iter().enumerate() {
                let series = chart
                    .draw_series(DashedLineSeries::new(seg, 8, 5, style))
                    .map_err(&err)?;
                if legend && n == 0 {
                    series
                        .label(format!("{} (reference)", r.sid))
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                }
            }
            if let Some(p) = r.points.first() {
                let at = (in_frame(p.lon, west), p.lat);
                chart
                    .draw_series(std::iter::once(TriangleMarker::new(at, 6, style)))
                    .map_err(&err)?;
            }
        }
        for (k, t) in tracks.iter().enumerate() {
            let colour = Palette99::pick(k).to_rgba();
            let style = ShapeStyle::from(&colour).stroke_width(3);
            for (n, seg) in segments(t, west).into_iter().enumerate() {
                let series = chart
                    .draw_series(LineSeries::new(seg, style))
                    .map_err(&err)?;
                if legend && n == 0 {
                    series
                        .label(t.sid.clone())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                }
            }
            if let Some(p) = t.points.first() {
                let at = (in_frame(p.lon, west), p.lat);
                chart
                    .draw_series(std::iter::once(Circle::new(at, 5, colour.filled())))
                    .map_err(&err)?;
            }
        }
        if legend && !(tracks.is_empty() && reference.is_empty()) {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT_FAMILY, 14))
                .position(emptiest_corner(
                    all().map(|p| (in_frame(p.lon, west), p.lat)),
                    (lon_lo, lon_hi),
                    (lat_lo, lat_hi),
                ))
                .draw()
                .map_err(&err)?;
        }
        Ok(())
    })?;
    write_png(path, size, &rgb)
}

/// The corner of the frame with the fewest track points, where the legend hides the least.
fn emptiest_corner(
    points: impl Iterator<Item = (f64, f64)>,
    (lon_lo, lon_hi): (f64, f64),
    (lat_lo, lat_hi): (f64, f64),
) -> SeriesLabelPosition {
    let (lon_mid, lat_mid) = ((lon_lo + lon_hi) / 2.0, (lat_lo + lat_hi) / 2.0);
    // Upper right, upper left, lower right, lower left: ties keep the earlier corner.
    let mut counts = [0usize; 4];
    for (lon, lat) in points {
        let k = usize::from(lon < lon_mid) + 2 * usize::from(lat < lat_mid);
        counts[k] += 1;
    }
    let corner = (0..4).min_by_key(|&k| counts[k]).unwrap_or(0);
    [
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::LowerLeft,
    ][corner]
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use atmorep_track::tracks::TrackPoint;

    fn track(sid: &str, lat: f64, lons: &[f64]) -> Track {
        Track {
            sid: sid.into(),
            points: lons
                .iter()
                .enumerate()
                .map(|(k, &lon)| TrackPoint {
                    time_unix: k as i64 * 21_600,
                    lat: lat + 0.4 * k as f64,
                    lon,
                    vorticity: None,
                    z_centre: None,
                    warm_core: None,
                })
                .collect(),
        }
    }

    #[test]
    fn frames_keep_crossing_tracks_whole() {
        // The frame starts opposite a lone cluster …
        assert_eq!(pick_frame(&[176.0, 179.0, 182.0]), 359.0);
        assert_eq!(pick_frame(&[355.0, 359.0, 2.0]), 178.5);
        assert_eq!(pick_frame(&[]), 0.0);
        // … and between two, so that a track across 180° and one across 0° both stay whole.
        let east = track("E", 15.0, &[176.0, 179.0, 182.0]);
        let zero = track("Z", -15.0, &[3.0, 0.5, 358.0]);
        let lons: Vec<f64> = [&east, &zero]
            .iter()
            .flat_map(|t| t.points.iter().map(|p| p.lon))
            .collect();
        let west = pick_frame(&lons);
        assert_eq!(segments(&east, west).len(), 1);
        assert_eq!(segments(&zero, west).len(), 1);
        assert_eq!(segments(&east, -180.0).len(), 2);
    }

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tracks.png");
        let ours = vec![
            track("2020245N14176", 14.0, &[176.0, 178.5, 181.0, 183.5]),
            track("2020245N20150", 20.0, &[150.0, 149.0, 148.0]),
        ];
        let truth = vec![track("SYN0001N", 14.2, &[176.2, 178.7, 181.2, 183.7])];
        draw_map(&path, &ours, Some(&truth), &MapConfig::default()).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 5_000);
        // Nothing to draw is still a map (the whole globe), and a tiny one is refused.
        draw_map(&path, &[], None, &MapConfig::default()).unwrap();
        let tiny = MapConfig {
            width: 10,
            ..MapConfig::default()
        };
        assert!(draw_map(&path, &ours, None, &tiny).is_err());
    }

    #[test]
    fn the_legend_goes_to_the_emptiest_corner() {
        let corner = |points: &[(f64, f64)]| {
            emptiest_corner(points.iter().copied(), (0.0, 100.0), (-50.0, 50.0))
        };
        assert!(matches!(corner(&[]), SeriesLabelPosition::UpperRight));
        assert!(matches!(
            corner(&[(90.0, 40.0), (10.0, 40.0), (10.0, -40.0)]),
            SeriesLabelPosition::LowerRight
        ));
        assert!(matches!(
            corner(&[(90.0, 40.0), (90.0, -40.0), (10.0, -40.0)]),
            SeriesLabelPosition::UpperLeft
        ));
    }
}
