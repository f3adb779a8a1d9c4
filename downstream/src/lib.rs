//! `atmorep-track` finds tropical cyclones in the atmorep-rs token stream, links them into
//! tracks and scores the tracks against reference tracks (docs/design.md §6).
//!
//! The pipeline, one module per step:
//!
//! - global fields come back from a tiles-mode stream of [`atmorep_proto::Batch`]es through the
//!   contract's [`atmorep_proto::stitch::TileStitcher`], one step at a time, each made a
//!   [`FieldSnapshot`] ([`FieldSnapshot::from_stitched`]);
//! - [`field`]: those fields on the canonical grid (latitude north → south, longitude 0 → 360,
//!   periodic);
//! - [`detect`](mod@detect): per time step, cyclonic 850 hPa vorticity maxima with a closed
//!   geopotential low and a warm core — in parallel over time steps;
//! - [`tracks`]: detections linked into IBTrACS-like tracks, read and written as CSV;
//! - [`eval`]: tracks against synthetic truth or IBTrACS — hits, misses, false alarms and
//!   great-circle position errors.
//!
//! [`track`] runs detection and linking in one call. The crate depends on the contract crate
//! alone: no Zarr, no gRPC server, no tokio — a client feeds it batches however it receives them.
//! From a tiles-mode request (`units = "physical"`, no masking, `world_size = 1`) and the
//! dataset's `DatasetInfo` (`Grid::from_proto`, `TimeAxis::from_proto`):
//!
//! ```
//! use atmorep_proto::Batch;
//! use atmorep_proto::stitch::{TileField, TileStitcher, TimeAxis};
//! use atmorep_track::{FieldSnapshot, Grid, Track, TrackConfig};
//!
//! fn track_stream(
//!     batches: impl IntoIterator<Item = Batch>,
//!     fields: Vec<TileField>, // TileField::from_request for each [[fields]] of the request
//!     grid: Grid,
//!     time: TimeAxis,
//! ) -> atmorep_track::Result<Vec<Track>> {
//!     let mut stitcher = TileStitcher::new(fields, grid.nlat, grid.nlon, time)?;
//!     let mut steps = Vec::new();
//!     for batch in batches {
//!         steps.extend(stitcher.push(&batch)?);
//!         // Without `end_epoch` the loader starts the tiling over: the stitcher notices.
//!         if batch.end_of_stream || stitcher.is_done() {
//!             break;
//!         }
//!     }
//!     steps.extend(stitcher.finish()?);
//!     let snapshots = steps
//!         .into_iter()
//!         .map(|step| FieldSnapshot::from_stitched(grid, step))
//!         .collect::<atmorep_track::Result<Vec<_>>>()?;
//!     atmorep_track::track(&snapshots, &TrackConfig::default())
//! }
//! ```
//!
//! With 850 hPa vorticity and geopotential plus 300 and 500 hPa geopotential (or temperature),
//! the defaults are those of docs/design.md §6; see [`config`].
//!
//! ```
//! use atmorep_track::{Field, Grid, FieldSnapshot, TrackConfig};
//!
//! let grid = Grid::global(2.0);
//! let calm = Field::from_fn(grid, |_, _| 0.0).unwrap();
//! let step = FieldSnapshot::new(0)
//!     .with("vo", Some(850.0), calm.clone()).unwrap()
//!     .with("z", Some(850.0), calm).unwrap();
//! let tracks = atmorep_track::track(&[step], &TrackConfig::default()).unwrap();
//! assert!(tracks.is_empty());
//! ```

pub mod config;
mod csv;
pub mod detect;
pub mod error;
pub mod eval;
pub mod field;
pub mod geo;
pub mod tracks;

#[cfg(test)]
mod testutil;

pub use config::{ContourConfig, DetectConfig, StitchConfig, TrackConfig, WarmCoreConfig};
pub use detect::{Detection, detect, detect_step};
pub use error::{Result, TrackError};
pub use eval::{EvalConfig, EvalReport, evaluate, read_reference};
pub use field::{Field, FieldKey, FieldSnapshot, Grid};
pub use tracks::{
    Track, TrackPoint, parse_tracks_csv, read_tracks_csv, stitch_tracks, tracks_to_csv,
    write_tracks_csv,
};

/// Detects cyclones in every time step (in parallel) and links them into tracks.
pub fn track(snapshots: &[FieldSnapshot], cfg: &TrackConfig) -> Result<Vec<Track>> {
    cfg.validate()?;
    let detections = detect(snapshots, &cfg.detect)?;
    stitch_tracks(&detections, &cfg.stitch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::{KM_PER_DEG, distance_km};
    use crate::testutil::{Upper, Vortex, snapshot};

    /// Position of a storm moving linearly from (`lat`, `lon`) by (`dlat`, `dlon`) per hour.
    fn at(lat: f64, lon: f64, dlat: f64, dlon: f64, hours: f64) -> (f64, f64) {
        (lat + dlat * hours, geo::wrap_360(lon + dlon * hours))
    }

    #[test]
    fn tracks_storms_across_the_dateline_and_0_degrees_and_drops_decoys() {
        let grid = Grid::global(1.0);
        let steps = 13; // 72 h, 6-hourly
        let north = (14.3, 177.6, 0.05, 0.1); // crosses 180°
        let south = (-15.2, 2.7, -0.04, -0.1); // crosses 0°/360°
        let snapshots: Vec<FieldSnapshot> = (0..steps)
            .map(|k| {
                let h = 6.0 * k as f64;
                let p = |s: (f64, f64, f64, f64)| at(s.0, s.1, s.2, s.3, h);
                let (nlat, nlon) = p(north);
                let (slat, slon) = p(south);
                let mut storms = vec![
                    Vortex::tc(nlat, nlon),
                    Vortex::tc(slat, slon),
                    // Cold-core low all along.
                    Vortex {
                        thickness: -100.0,
                        ..Vortex::tc(20.0 + 0.05 * h, 90.0 - 0.1 * h)
                    },
                    // Poleward of 50° all along.
                    Vortex::tc(56.0, 320.0 + 0.1 * h),
                ];
                // A warm-core storm living 36 h only.
                if (12.0..=48.0).contains(&h) {
                    storms.push(Vortex::tc(12.0, 250.0 - 0.1 * h));
                }
                snapshot(
                    grid,
                    1_598_918_400 + (h * 3600.0) as i64,
                    &storms,
                    Upper::Geopotential,
                )
            })
            .collect();
        let tracks = track(&snapshots, &TrackConfig::default()).unwrap();
        assert_eq!(tracks.len(), 2, "{tracks:#?}");
        let half = 0.5 * KM_PER_DEG * grid.spacing();
        for (storm, hemisphere) in [(north, 1.0), (south, -1.0)] {
            let t = tracks
                .iter()
                .find(|t| t.points[0].lat.signum() == hemisphere)
                .unwrap();
            assert_eq!(t.points.len(), steps, "{t:#?}");
            for (k, p) in t.points.iter().enumerate() {
                let (lat, lon) = at(storm.0, storm.1, storm.2, storm.3, 6.0 * k as f64);
                let km = distance_km(p.lat, p.lon, lat, lon);
                assert!(km < half, "{} at step {k}: {km:.1} km off", t.sid);
                assert_eq!(p.vorticity.unwrap().signum(), hemisphere);
            }
        }
        let north_track = tracks.iter().find(|t| t.points[0].lat > 0.0).unwrap();
        assert!(north_track.points[0].lon < 180.0 && north_track.points[12].lon > 180.0);
        assert_eq!(north_track.sid, "2020245N14178");
        let south_track = tracks.iter().find(|t| t.points[0].lat < 0.0).unwrap();
        assert!(south_track.points[0].lon < 5.0 && south_track.points[12].lon > 355.0);
    }
}
