//! The per-grid-point climatology of the training split: for each field, level, grid point and
//! hour of day, the mean of every training-split time step — a baseline the model could have
//! known, unlike a mean over the whole store with the test period in it.
//!
//! Where the time axis resolves the diurnal cycle (a step under a day) the mean is kept per hour
//! of day (UTC), so a 06:00 value is compared with the 06:00 climatology; on a daily or coarser
//! axis there is one mean per point. The values come from the loader, not a store: the training
//! split is streamed as ordered global tiles in physical units and stitched back
//! ([`atmorep_proto::stitch`]), so the split is the loader's own (docs/design.md §3).

use std::collections::BTreeMap;

use atmorep_proto::request::{ModeName, NormalizationName, SplitName, UnitsName};
use atmorep_proto::stitch::{StitchedStep, TileField, TileStitcher, TimeAxis as StitchAxis};
use atmorep_proto::{FieldRequestConfig, LoaderClient, MaskConfig, PeMode, RequestConfig};

use crate::error::{Result, input_err};
use crate::eval::FieldLayout;

const DAY_S: i64 = 86_400;

/// Sums of one (field, level, hour) over the time steps added.
#[derive(Debug, Clone, PartialEq)]
struct Plane {
    steps: u64,
    sum: Vec<f64>,
}

/// Per-grid-point means of (field, level, hour of day); see the [module documentation](self).
#[derive(Debug, Clone, PartialEq)]
pub struct PointClimatology {
    nlat: usize,
    nlon: usize,
    diurnal: bool,
    planes: BTreeMap<(String, u64, u32), Plane>,
}

impl PointClimatology {
    /// An empty climatology on an `nlat × nlon` grid (row-major, latitude rows) of a time axis
    /// with `step_s` seconds between steps.
    pub fn new(nlat: usize, nlon: usize, step_s: i64) -> Self {
        Self {
            nlat,
            nlon,
            diurnal: step_s > 0 && step_s < DAY_S,
            planes: BTreeMap::new(),
        }
    }

    /// Whether the means are kept per hour of day.
    pub fn is_diurnal(&self) -> bool {
        self.diurnal
    }

    fn hour(&self, unix: i64) -> u32 {
        if self.diurnal {
            (unix.rem_euclid(DAY_S) / 3600) as u32
        } else {
            0
        }
    }

    /// Adds one global plane of `field` at `level` (0 for a surface field) valid at `unix`.
    pub fn add(&mut self, field: &str, level: f64, unix: i64, values: &[f32]) -> Result<()> {
        if values.len() != self.nlat * self.nlon {
            return Err(input_err(
                format!("climatology of `{field}` at level {level}"),
                format!(
                    "{} values for a grid of {} × {}",
                    values.len(),
                    self.nlat,
                    self.nlon
                ),
            ));
        }
        let hour = self.hour(unix);
        let plane = self
            .planes
            .entry((field.to_string(), level.to_bits(), hour))
            .or_insert_with(|| Plane {
                steps: 0,
                sum: vec![0.0; values.len()],
            });
        plane.steps += 1;
        for (s, &v) in plane.sum.iter_mut().zip(values) {
            *s += f64::from(v);
        }
        Ok(())
    }

    /// Adds every plane of a stitched time step.
    pub fn add_step(&mut self, step: &StitchedStep) -> Result<()> {
        for p in &step.planes {
            self.add(&p.field, p.level.unwrap_or(0.0), step.time_unix, &p.values)?;
        }
        Ok(())
    }

    /// Time steps added for `field` at `level` over all hours.
    pub fn steps(&self, field: &str, level: f64) -> u64 {
        self.planes
            .iter()
            .filter(|((f, l, _), _)| f == field && *l == level.to_bits())
            .map(|(_, p)| p.steps)
            .sum()
    }

    /// The means of `field` at `level` for the hour of `unix`, as a lookup by grid point.
    pub fn at(&self, field: &str, level: f64, unix: i64) -> Result<ClimatologyPlane<'_>> {
        let hour = self.hour(unix);
        let plane = self
            .planes
            .get(&(field.to_string(), level.to_bits(), hour))
            .filter(|p| p.steps > 0)
            .ok_or_else(|| {
                input_err(
                    format!("climatology of `{field}` at level {level}"),
                    if self.diurnal {
                        format!("the training split has no time step at {hour:02}:00 UTC")
                    } else {
                        "the training split has no time step of it".to_string()
                    },
                )
            })?;
        Ok(ClimatologyPlane {
            nlon: self.nlon,
            nlat: self.nlat,
            plane,
        })
    }
}

/// The means of one (field, level, hour): [`Self::mean`] per grid point.
#[derive(Debug, Clone, Copy)]
pub struct ClimatologyPlane<'a> {
    nlat: usize,
    nlon: usize,
    plane: &'a Plane,
}

impl ClimatologyPlane<'_> {
    /// The mean at grid row `lat` and column `lon` (wrapped: windows may cross 360°).
    pub fn mean(&self, lat: usize, lon: usize) -> Option<f64> {
        (lat < self.nlat)
            .then(|| self.plane.sum[lat * self.nlon + lon % self.nlon] / self.plane.steps as f64)
    }
}

/// The tile request that streams the training split of `request`'s dataset (with its split
/// settings) in physical units for the fields of `layouts`: tiles of up to 36 × 72 points, one
/// time step each.
pub fn train_tiles_request(
    request: &RequestConfig,
    layouts: &[FieldLayout],
    nlat: usize,
    nlon: usize,
) -> RequestConfig {
    let (num_tokens, token_size) = if nlat >= 36 && nlon >= 72 {
        ([1, 4, 8], [1, 9, 9])
    } else {
        ([1, 1, 1], [1, nlat.min(36) as u32, nlon.min(72) as u32])
    };
    let fields = layouts
        .iter()
        .map(|l| {
            let levels = request
                .fields
                .iter()
                .find(|f| f.name == l.name)
                .map(|f| f.levels.clone())
                .unwrap_or_default();
            FieldRequestConfig {
                name: l.name.clone(),
                levels,
                num_tokens,
                token_size,
                blur_sigma: 0.0,
                normalization: NormalizationName::None,
                pe: PeMode::None,
                pe_width: 2,
                mask: MaskConfig::None,
            }
        })
        .collect();
    RequestConfig {
        fields,
        batch_size: 16,
        rank: 0,
        world_size: 1,
        split: SplitName::Train,
        mode: ModeName::Tiles,
        units: UnitsName::Physical,
        end_epoch: None,
        resume: None,
        tile_overlap: [0; 3],
        tile_time_start: None,
        tile_time_end: None,
        ..request.clone()
    }
}

/// The per-point climatology of the training split of `request` (the training request: its
/// dataset and split settings) for the fields of `layouts`, streamed from `client`.
pub async fn from_loader(
    client: &LoaderClient,
    request: &RequestConfig,
    layouts: &[FieldLayout],
) -> Result<PointClimatology> {
    let dataset = &request.dataset;
    let what = || format!("climatology of dataset `{dataset}`");
    let info = client.dataset_info(dataset).await?;
    let grid = info
        .grid
        .as_ref()
        .ok_or_else(|| input_err(what(), "the loader sent no grid"))?;
    let axis = info
        .time
        .as_ref()
        .ok_or_else(|| input_err(what(), "the loader sent no time axis"))?;
    let (nlat, nlon) = (grid.nlat as usize, grid.nlon as usize);
    let time = StitchAxis::from_proto(axis);
    let tiles = train_tiles_request(request, layouts, nlat, nlon);
    let fields: Vec<TileField> = tiles.fields.iter().map(TileField::from_request).collect();
    let stitch_err = |e: atmorep_proto::stitch::StitchError| input_err(what(), e.to_string());
    let mut stitcher = TileStitcher::new(fields, nlat, nlon, time).map_err(stitch_err)?;
    let mut clim = PointClimatology::new(nlat, nlon, time.step_seconds);
    let mut stream = client.stream(tiles.to_proto());
    let mut steps = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        for step in stitcher.push(&batch).map_err(stitch_err)? {
            clim.add_step(&step)?;
            steps += 1;
        }
        if batch.end_of_stream || stitcher.is_done() {
            break;
        }
    }
    for step in stitcher.finish().map_err(stitch_err)? {
        clim.add_step(&step)?;
        steps += 1;
    }
    if steps == 0 {
        return Err(input_err(
            what(),
            "the training split sent no complete time step",
        ));
    }
    tracing::info!(dataset = %dataset, steps, diurnal = clim.diurnal, "train-split climatology");
    Ok(clim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_are_per_point_and_per_hour_of_day() {
        // 2 × 3 grid, 12-hourly: steps at 00:00 and 12:00 of two days.
        let mut c = PointClimatology::new(2, 3, 12 * 3600);
        assert!(c.is_diurnal());
        let day = 86_400;
        for (unix, base) in [
            (0, 1.0),
            (day / 2, 100.0),
            (day, 3.0),
            (day + day / 2, 300.0),
        ] {
            let values: Vec<f32> = (0..6).map(|i| base + i as f32).collect();
            c.add("t", 850.0, unix, &values).unwrap();
        }
        let midnight = c.at("t", 850.0, 2 * day).unwrap();
        // (1 + 3) / 2 + point index.
        assert_eq!(midnight.mean(0, 0), Some(2.0));
        assert_eq!(midnight.mean(1, 2), Some(7.0));
        // Longitude wraps, latitude does not.
        assert_eq!(midnight.mean(1, 5), Some(7.0));
        assert_eq!(midnight.mean(2, 0), None);
        let noon = c.at("t", 850.0, 2 * day + day / 2).unwrap();
        assert_eq!(noon.mean(0, 1), Some(201.0));
        assert_eq!(c.steps("t", 850.0), 4);
        let err = c.at("t", 850.0, 6 * 3600).unwrap_err().to_string();
        assert!(
            err.contains("`t` at level 850") && err.contains("06:00"),
            "{err}"
        );
        let err = c.at("z", 850.0, 0).unwrap_err().to_string();
        assert!(err.contains("`z`"), "{err}");
        let err = c.add("t", 850.0, 0, &[1.0]).unwrap_err().to_string();
        assert!(err.contains("1 values for a grid of 2 × 3"), "{err}");
    }

    #[test]
    fn a_daily_axis_keeps_one_mean_per_point() {
        let mut c = PointClimatology::new(1, 1, 86_400);
        assert!(!c.is_diurnal());
        c.add("z", 0.0, 0, &[2.0]).unwrap();
        c.add("z", 0.0, 86_400 + 3600, &[4.0]).unwrap();
        assert_eq!(c.at("z", 0.0, 7 * 3600).unwrap().mean(0, 0), Some(3.0));
    }
}
