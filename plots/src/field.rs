//! `atmorep plot field`: one field at one level and time on an equirectangular map, in the
//! store's physical units, with a colour bar and optionally cyclone tracks on top.
//!
//! Tracks are drawn whole (white under black, so they show on any colour), broken where they
//! cross the map's 0°/360° edge; where a track is active at the map's time its position is
//! ringed and labelled with the storm id.

use std::path::Path;

use atmorep_proto::calendar::{TimeFormat, format_time};
use atmorep_track::tracks::Track;
use plotters::prelude::*;

use crate::attention::{Figure, title};
use crate::canvas::{ColourScale, FONT_FAMILY, colour_bar, raster, render, tick};
use crate::error::{Result, draw_err, input_err};

/// Size of the field map.
pub const SIZE: (u32, u32) = (1400, 780);
const BAR_W: u32 = 140;

/// A global (or regional) field on a regular latitude/longitude grid.
#[derive(Debug, Clone)]
pub struct FieldMap {
    pub variable: String,
    pub long_name: Option<String>,
    pub units: Option<String>,
    /// The level value as the store names it; `None` for a surface field.
    pub level: Option<f64>,
    pub time_unix: i64,
    /// Row latitudes, north to south, evenly spaced.
    pub lats: Vec<f64>,
    /// Column longitudes, west to east, evenly spaced (degrees east).
    pub lons: Vec<f64>,
    /// `lats × lons`, row-major.
    pub values: Vec<f32>,
}

impl FieldMap {
    fn check(&self) -> Result<()> {
        let what = || format!("field `{}`", self.variable);
        let (ny, nx) = (self.lats.len(), self.lons.len());
        if ny < 2 || nx < 2 || self.values.len() != ny * nx {
            return Err(input_err(
                what(),
                format!(
                    "{} values on a {ny} × {nx} grid (at least 2 × 2)",
                    self.values.len()
                ),
            ));
        }
        if self.lats.windows(2).any(|w| w[1] >= w[0]) || self.lons.windows(2).any(|w| w[1] <= w[0])
        {
            return Err(input_err(
                what(),
                "latitudes must run north to south and longitudes west to east",
            ));
        }
        Ok(())
    }
}

/// Draws `map` with `tracks` on top into `path`.
pub fn field_figure(
    map: &FieldMap,
    tracks: &[Track],
    path: &Path,
    subtitle: &str,
) -> Result<Figure> {
    map.check()?;
    let what = path.display().to_string();
    let (ny, nx) = (map.lats.len(), map.lons.len());
    let dlat = (map.lats[0] - map.lats[ny - 1]) / (ny - 1) as f64;
    let dlon = (map.lons[nx - 1] - map.lons[0]) / (nx - 1) as f64;
    let west = map.lons[0] - dlon / 2.0;
    let east = map.lons[nx - 1] + dlon / 2.0;
    let north = (map.lats[0] + dlat / 2.0).min(90.0);
    let south = (map.lats[ny - 1] - dlat / 2.0).max(-90.0);
    let units = map
        .units
        .as_deref()
        .filter(|u| !u.is_empty())
        .unwrap_or("no unit given");
    let scale = ColourScale::fit(
        map.values.iter().map(|&v| f64::from(v)),
        true,
        &format!("{} ({units})", map.variable),
    );
    let name = match &map.long_name {
        Some(l) if !l.is_empty() => format!("{l} ({})", map.variable),
        _ => map.variable.clone(),
    };
    let level = match map.level {
        Some(l) => format!(" at level {}", tick(l)),
        None => String::new(),
    };
    let heading = format!(
        "{name}{level}, {} UTC",
        format_time(map.time_unix, TimeFormat::Minutes)
    );
    let frame_west = west;
    let in_frame = |lon: f64| (lon - frame_west).rem_euclid(360.0) + frame_west;
    let rgb = render(&what, SIZE, |root| {
        let body = title(root, &what, &heading, subtitle)?;
        let (w, _) = body.dim_in_pixel();
        let (left, bar) = body.split_horizontally(w - BAR_W);
        let mut chart = ChartBuilder::on(&left)
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(west..east, south..north)
            .map_err(draw_err(&what))?;
        chart
            .configure_mesh()
            .x_desc("longitude (°E)")
            .y_desc("latitude (°N)")
            .x_labels(13)
            .y_labels(7)
            .x_label_formatter(&|v| format!("{:.0}", v.rem_euclid(360.0)))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style((FONT_FAMILY, 14))
            .axis_desc_style((FONT_FAMILY, 15))
            .light_line_style(TRANSPARENT)
            .bold_line_style(BLACK.mix(0.25))
            .draw()
            .map_err(draw_err(&what))?;
        raster(
            &chart.plotting_area().strip_coord_spec(),
            &what,
            |fx, fy| {
                let lon = west + fx * (east - west);
                let lat = south + fy * (north - south);
                let x =
                    (((lon - map.lons[0]) / dlon).round() as i64).rem_euclid(nx as i64) as usize;
                let y =
                    (((map.lats[0] - lat) / dlat).round() as i64).clamp(0, ny as i64 - 1) as usize;
                Some(scale.colour(f64::from(map.values[y * nx + x])))
            },
        )?;
        // The raster covered the grid lines; draw them again, faintly, on top.
        chart
            .configure_mesh()
            .x_labels(13)
            .y_labels(7)
            .light_line_style(TRANSPARENT)
            .bold_line_style(BLACK.mix(0.18))
            .x_label_style((FONT_FAMILY, 1).into_font().color(&TRANSPARENT))
            .y_label_style((FONT_FAMILY, 1).into_font().color(&TRANSPARENT))
            .draw()
            .map_err(draw_err(&what))?;
        let mut labelled = false;
        for track in tracks {
            let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            let mut prev: Option<f64> = None;
            for p in &track.points {
                let x = in_frame(p.lon);
                if prev.is_some_and(|px| (x - px).abs() > 180.0) {
                    segments.push(Vec::new());
                }
                segments.last_mut().expect("never empty").push((x, p.lat));
                prev = Some(x);
            }
            for seg in segments.iter().filter(|s| !s.is_empty()) {
                chart
                    .draw_series(LineSeries::new(seg.clone(), WHITE.stroke_width(4)))
                    .map_err(draw_err(&what))?;
                chart
                    .draw_series(LineSeries::new(seg.clone(), BLACK.stroke_width(2)))
                    .map_err(draw_err(&what))?;
            }
            if let Some(first) = track.points.first() {
                chart
                    .draw_series(std::iter::once(Circle::new(
                        (in_frame(first.lon), first.lat),
                        3,
                        BLACK.filled(),
                    )))
                    .map_err(draw_err(&what))?;
            }
            if let Some(p) = track.point_at(map.time_unix) {
                let at = (in_frame(p.lon), p.lat);
                let ring = chart
                    .draw_series([
                        Circle::new(at, 9, WHITE.stroke_width(4)),
                        Circle::new(at, 9, RGBColor(200, 0, 0).stroke_width(2)),
                    ])
                    .map_err(draw_err(&what))?;
                if !labelled {
                    ring.label("cyclone at this time").legend(|(x, y)| {
                        Circle::new((x + 10, y), 6, RGBColor(200, 0, 0).stroke_width(2))
                    });
                    labelled = true;
                }
                // The id sits a fixed number of pixels up and right of the ring, whatever the
                // grid spacing.
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at(at)
                            + Text::new(
                                track.sid.clone(),
                                (12, -22),
                                (FONT_FAMILY, 14).into_font().color(&BLACK),
                            ),
                    ))
                    .map_err(draw_err(&what))?;
            }
        }
        if !tracks.is_empty() {
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(draw_err(&what))?
                .label(format!("cyclone tracks ({}), dot at genesis", tracks.len()))
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2))
                });
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT_FAMILY, 14))
                .position(SeriesLabelPosition::LowerLeft)
                .draw()
                .map_err(draw_err(&what))?;
        }
        colour_bar(&bar, &scale, &what)
    })?;
    Figure::write(path.to_path_buf(), SIZE, &rgb, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_png::assert_png;
    use atmorep_track::tracks::TrackPoint;

    fn map() -> FieldMap {
        let lats: Vec<f64> = (0..19).map(|i| 90.0 - 10.0 * i as f64).collect();
        let lons: Vec<f64> = (0..36).map(|i| 10.0 * i as f64).collect();
        let values = lats
            .iter()
            .flat_map(|lat| {
                lons.iter()
                    .map(move |lon| (5000.0 + 300.0 * lat.to_radians().cos() + lon / 36.0) as f32)
            })
            .collect();
        FieldMap {
            variable: "z".into(),
            long_name: Some("Geopotential".into()),
            units: Some("m**2 s**-2".into()),
            level: Some(500.0),
            time_unix: 1_599_004_800,
            lats,
            lons,
            values,
        }
    }

    #[test]
    fn a_map_with_tracks_across_the_edge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("field.png");
        let point = |h: i64, lat: f64, lon: f64| TrackPoint {
            time_unix: 1_599_004_800 + h * 3600,
            lat,
            lon,
            vorticity: None,
            z_centre: None,
            warm_core: None,
        };
        let track = Track {
            sid: "2020246N15355".into(),
            points: vec![
                point(-6, 15.0, 352.0),
                point(0, 16.0, 358.0),
                point(6, 17.0, 3.0),
            ],
        };
        let fig = field_figure(&map(), &[track], &path, "unit test").unwrap();
        assert_eq!((fig.width, fig.height), SIZE);
        assert_png(&path, SIZE);

        let mut bad = map();
        bad.values.pop();
        let err = field_figure(&bad, &[], &path, "").unwrap_err();
        assert!(err.to_string().contains("`z`"), "{err}");
    }
}
