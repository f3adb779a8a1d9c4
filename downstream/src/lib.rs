//! `atmorep-track` finds tropical cyclones in the atmorep-rs token stream, links them into
//! tracks and scores the tracks against reference tracks (DESIGN §6).
//!
//! The pipeline, one module per step:
//!
//! - [`stitch`]: global fields back from a tiles-mode stream of [`atmorep_proto::Batch`]es
//!   ([`TileStitcher`]), one [`Snapshot`] per time step;
//! - [`field`]: those fields on the canonical grid (latitude north → south, longitude 0 → 360,
//!   periodic);
//! - [`detect`](mod@detect): per time step, cyclonic 850 hPa vorticity maxima with a closed
//!   geopotential low and a warm core — in parallel over time steps;
//! - [`tracks`]: detections linked into IBTrACS-like tracks, read and written as CSV;
//! - [`eval`]: tracks against synthetic truth or IBTrACS — hits, misses, false alarms and
//!   great-circle position errors;
//! - [`map`]: a PNG map of tracks.
//!
//! [`track`] runs detection and stitching in one call. The crate depends on the contract crate
//! alone: no Zarr, no gRPC server, no tokio — a client feeds it batches however it receives them.
//!
//! ```
//! use atmorep_track::{Field, Grid, Snapshot, TrackConfig};
//!
//! let grid = Grid::global(2.0);
//! let calm = Field::from_fn(grid, |_, _| 0.0).unwrap();
//! let step = Snapshot::new(0)
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
pub mod map;
pub mod stitch;
pub mod time;
pub mod tracks;

#[cfg(test)]
mod testutil;

pub use config::{ContourConfig, DetectConfig, StitchConfig, TrackConfig, WarmCoreConfig};
pub use detect::{Detection, detect, detect_step};
pub use error::{Result, TrackError};
pub use eval::{EvalConfig, EvalReport, evaluate, read_reference};
pub use field::{Field, FieldKey, Grid, Snapshot};
pub use map::{MapConfig, draw_map};
pub use stitch::{TileField, TileStitcher, TimeAxis, tokenize, untokenize};
pub use tracks::{
    Track, TrackPoint, parse_tracks_csv, read_tracks_csv, stitch_tracks, tracks_to_csv,
    write_tracks_csv,
};

/// Detects cyclones in every time step (in parallel) and links them into tracks.
pub fn track(snapshots: &[Snapshot], cfg: &TrackConfig) -> Result<Vec<Track>> {
    cfg.validate()?;
    let detections = detect(snapshots, &cfg.detect)?;
    stitch_tracks(&detections, &cfg.stitch)
}
