//! `atmorep-plot`: the plotting pipeline of atmorep-rs. This crate owns every picture the
//! project draws, and the one plotting stack they share ([`canvas`]: the embedded font,
//! rendering into memory, atomic PNG and GIF files, colour maps):
//!
//! - [`chart`]: lines beside bars, for measurements (the storage benchmark);
//! - [`map`]: cyclone tracks on a latitude/longitude frame (feature `track`);
//!
//! and, with the default feature `model` (atmorep-trainer and candle), the pictures that assess
//! a model or its data:
//!
//! - [`attention`]: the encoder's attention weights per layer and head, within and across
//!   fields, and one query token's attention on the latitude/longitude map;
//! - [`tokens`]: a sample's source, masked input, prediction and target per time slice on one
//!   colour scale, as a PNG and an animated GIF;
//! - [`training`]: a run's loss, learning rate, gradient norm and data wait from its step log;
//! - [`field`]: a field on an equirectangular map in physical units, with cyclone tracks;
//! - [`ablation`]: an ablation's errors per variant and field as bars, and its loss curves.
//!
//! Without `model` the crate needs no candle, so the loader-only build of the `atmorep` binary
//! (a storage node's image) still draws its benchmark chart.
//!
//! It takes its data already loaded — a checkpoint's model and a loader sample ([`sample`]), a
//! run's step records, a grid read from a store, tracks, benchmark figures — so the commands
//! only fetch and this crate only draws. Figures render with `plotters` into memory with an
//! embedded font (no fonts needed on the machine) and are written to a temporary file and
//! renamed ([`canvas`]), so a failure never leaves half a picture.
//!
//! ```no_run
//! # #[cfg(feature = "model")] {
//! use atmorep_plot::training::training_figure;
//! let rows = atmorep_trainer::metrics_log::read_steps("runs/train".as_ref())?;
//! training_figure(&rows, "runs/train/training.png".as_ref(), "runs/train", "normalized units²")?;
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "model")]
pub mod ablation;
#[cfg(feature = "model")]
pub mod attention;
pub mod canvas;
pub mod chart;
pub mod error;
#[cfg(feature = "model")]
pub mod field;
#[cfg(feature = "track")]
pub mod map;
#[cfg(feature = "model")]
pub mod sample;
#[cfg(feature = "model")]
pub mod tokens;
#[cfg(feature = "model")]
pub mod training;

#[cfg(feature = "model")]
pub use attention::{AttentionOptions, Figure, attention_figures};
pub use chart::{Bar, Series, lines_and_bars};
pub use error::{PlotError, Result};
#[cfg(feature = "model")]
pub use field::{FieldMap, field_figure};
#[cfg(feature = "track")]
pub use map::{MapConfig, draw_map};
#[cfg(feature = "model")]
pub use sample::{FieldGrid, ModelRun};
#[cfg(feature = "model")]
pub use tokens::{TokenOptions, token_figures};
#[cfg(feature = "model")]
pub use training::training_figure;

#[cfg(test)]
pub(crate) mod test_png {
    use std::path::Path;

    /// The PNG at `path` decodes, has `size` and is no flat picture (many distinct colours).
    /// With `ATMOREP_PLOT_LOOK=DIR` set, the pictures the tests draw are copied there to be
    /// looked at.
    pub(crate) fn assert_png(path: &Path, size: (u32, u32)) {
        if let Some(dir) = std::env::var_os("ATMOREP_PLOT_LOOK") {
            let dir = Path::new(&dir);
            std::fs::create_dir_all(dir).unwrap();
            for ext in ["png", "gif"] {
                let p = path.with_extension(ext);
                if p.exists() {
                    std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
                }
            }
        }
        let img = image::open(path)
            .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
            .to_rgb8();
        assert_eq!(img.dimensions(), size, "{}", path.display());
        let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(
            colours.len() > 50,
            "{} has only {} colours",
            path.display(),
            colours.len()
        );
    }
}
