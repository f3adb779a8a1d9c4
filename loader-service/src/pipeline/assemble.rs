//! Cutting samples: a sample's windows (drawn in its time block, a tile, or around a given
//! centre), each field read straight into token order and normalized on the way (or through a
//! window buffer where it is blurred or normalized per grid point), masked, and given its token
//! info and positional encoding.

use atmorep_proto::positional::{GlobalOffsets, PeInputs, encode};
use atmorep_proto::token_info::{WindowCoords, flatten, token_infos};
use atmorep_proto::tokenize::tokenize_into;
use std::sync::Arc;

use futures::future::try_join_all;

use super::blur::GaussianBlur;
use super::epoch::SampleId;
use super::masking::try_apply_in_place;
use super::prepare::PreparedField;
use super::sampler::{Centre, FieldWindow, Sampler};
use super::seeding::{Purpose, sample_rng};
use super::{BufferPool, Normalization, Pipeline, PipelineError, field_err};
use crate::store::dataset::Dataset;
use crate::store::hyperslab::Hyperslab;

/// One field of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSample {
    pub name: String,
    /// Tokens after masking, (tokens, token values).
    pub source: Vec<f32>,
    /// Original values of the masked tokens, in `masked_indices` order.
    pub target: Vec<f32>,
    pub masked_indices: Vec<u32>,
    /// (tokens, 8) token info.
    pub token_info: Vec<f32>,
    /// (tokens, pe_width) positional encoding.
    pub pe: Vec<f32>,
    pub window: FieldWindow,
}

/// One sample: all fields around one centre.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: SampleId,
    pub epoch: u64,
    pub fields: Vec<FieldSample>,
}

impl Sample {
    /// Bytes of token payload (sources) in f32.
    pub fn payload_bytes(&self) -> usize {
        self.fields.iter().map(|f| f.source.len() * 4).sum()
    }
}

impl Pipeline {
    /// Builds sample `id` of `epoch`.
    pub async fn sample(&self, epoch: u64, id: SampleId) -> Result<Sample, PipelineError> {
        if id >= self.num_samples() {
            return Err(PipelineError::Request(format!(
                "sample id {id} is outside 0..{}",
                self.num_samples()
            )));
        }
        let windows = self.windows(epoch, id)?;
        self.assemble(epoch, id, windows).await
    }

    /// The windows (one per field) of sample `id` of `epoch`.
    pub(super) fn windows(
        &self,
        epoch: u64,
        id: SampleId,
    ) -> Result<Vec<FieldWindow>, PipelineError> {
        Ok(match &self.tiling {
            Some(tiling) => vec![tiling.tiles()[id as usize]; self.fields.len()],
            None => {
                let block = id / self.config.samples_per_block;
                let sampler = self.sampler(block)?;
                let centre = sampler.draw(&mut sample_rng(
                    self.config.seed,
                    epoch,
                    id,
                    0,
                    Purpose::Centre,
                ));
                (0..self.fields.len())
                    .map(|i| sampler.window(i, centre))
                    .collect()
            }
        })
    }

    /// Builds the sample centred on (`time` index, latitude, longitude in degrees): the nearest
    /// grid point, windows shifted inward at the poles. Masks and noise are drawn as for sample
    /// id `time · nlat · nlon + lat · nlon + lon` of `epoch` (for debugging and plotting).
    pub async fn sample_at(
        &self,
        epoch: u64,
        time: usize,
        lat_deg: f64,
        lon_deg: f64,
    ) -> Result<Sample, PipelineError> {
        let ds = &self.dataset;
        let (nlat, nlon) = (ds.lats.len(), ds.lons.len());
        if !(-90.0..=90.0).contains(&lat_deg) || !lon_deg.is_finite() {
            return Err(PipelineError::Request(format!(
                "centre ({lat_deg}, {lon_deg}) is not a latitude in [-90, 90] and a longitude"
            )));
        }
        let lat = (0..nlat)
            .min_by(|&a, &b| {
                (ds.lats[a] - lat_deg)
                    .abs()
                    .total_cmp(&(ds.lats[b] - lat_deg).abs())
            })
            .unwrap_or(0);
        let lon_step = 360.0 / nlon as f64;
        let lon = ((lon_deg - ds.lons[0]).rem_euclid(360.0) / lon_step).round() as usize % nlon;
        let sampler = Sampler::new(
            &ds.lats,
            nlon,
            ds.times.len(),
            0..ds.times.len(),
            &self
                .fields
                .iter()
                .map(|f| (f.config.name.clone(), f.geometry.geometry.window()))
                .collect::<Vec<_>>(),
            self.config.latitude_weighting,
        )
        .map_err(|e| PipelineError::Request(e.to_string()))?;
        let max_t = self
            .fields
            .iter()
            .map(|f| f.geometry.geometry.window()[0])
            .max()
            .unwrap_or(1);
        if time < max_t / 2 || time - max_t / 2 + max_t > ds.times.len() {
            return Err(PipelineError::Request(format!(
                "time index {time}: a {max_t}-step window around it leaves 0..{}",
                ds.times.len()
            )));
        }
        let centre = Centre { time, lat, lon };
        let windows = (0..self.fields.len())
            .map(|i| sampler.window(i, centre))
            .collect();
        let id = (time * nlat * nlon + lat * nlon + lon) as u64;
        self.assemble(epoch, id, windows).await
    }

    async fn assemble(
        &self,
        epoch: u64,
        id: SampleId,
        windows: Vec<FieldWindow>,
    ) -> Result<Sample, PipelineError> {
        let fields = try_join_all(
            self.fields
                .iter()
                .zip(windows)
                .enumerate()
                .map(|(i, (field, window))| self.field_sample(epoch, id, i as u32, field, window)),
        )
        .await?;
        Ok(Sample { id, epoch, fields })
    }

    pub(super) async fn field_sample(
        &self,
        epoch: u64,
        id: SampleId,
        index: u32,
        field: &PreparedField,
        window: FieldWindow,
    ) -> Result<FieldSample, PipelineError> {
        let ds = &self.dataset;
        let tokens = match (&field.blur, field.config.normalization) {
            // The common case cuts tokens straight from the decoded chunks, normalizing on the
            // way: one pass instead of read, normalize and tokenize.
            (None, Normalization::Global | Normalization::None) => {
                let slab = self.field_slab(field, &window)?;
                let affine = self.plane_affine(field, &window)?;
                let out = self.pool.take_len(slab.len());
                ds.read_layout_into(&slab, &field.layout, affine.as_deref(), out)
                    .await?
            }
            _ => {
                let levels = if ds.variable(&field.config.name)?.has_level() {
                    field.level_indices.clone()
                } else {
                    vec![]
                };
                self.window_tokens(field, &window, levels).await?
            }
        };
        // Masks, token info and positional encodings: CPU work that grows with the request
        // (a wide encoding is hundreds of megabytes), so not on the worker that awaits it.
        let cut = Cut {
            pipeline: self.shared(),
            field: index as usize,
            epoch,
            id,
            window,
        };
        off_worker(move || cut.finish(tokens)).await
    }

    /// The per-plane normalization of `field`'s window (`None` without normalization).
    pub(super) fn plane_affine(
        &self,
        field: &PreparedField,
        window: &FieldWindow,
    ) -> Result<Option<Vec<(f32, f32)>>, PipelineError> {
        if field.config.normalization != Normalization::Global {
            return Ok(None);
        }
        let stats = self.stats.as_ref().expect("checked in Pipeline::new");
        let name = &field.config.name;
        let wt = window.size[0];
        let mut affine = Vec::with_capacity(wt * field.level_values.len());
        for t in 0..wt {
            for &level in &field.level_values {
                affine.push(stats.affine(
                    name,
                    level,
                    self.dataset.times[window.time_start + t],
                )?);
            }
        }
        Ok(Some(affine))
    }

    /// Tokens of a field window through a window buffer: the path for blurred fields (the blur
    /// needs a halo and whole planes) and local normalization (per grid point).
    async fn window_tokens(
        &self,
        field: &PreparedField,
        window: &FieldWindow,
        levels: Vec<usize>,
    ) -> Result<Vec<f32>, PipelineError> {
        let ds = &self.dataset;
        let (nlat, nlon) = (ds.lats.len(), ds.lons.len());
        let [wt, wy, wx] = window.size;
        let name = &field.config.name;
        // A halo for the blur, wrapping in longitude and clipped at the poles.
        let r = field.blur.as_ref().map_or(0, GaussianBlur::radius);
        let halo_x = r.min((nlon - wx) / 2);
        let y0 = window.lat_start.saturating_sub(r);
        let y1 = (window.lat_start + wy + r).min(nlat);
        let slab = Hyperslab {
            variable: name.clone(),
            time: window.time_start..window.time_start + wt,
            levels,
            lat: y0..y1,
            lon_start: (window.lon_start + nlon - halo_x) % nlon,
            lon_len: wx + 2 * halo_x,
        };
        let mut values = ds.read_into(&slab, self.pool.take_len(slab.len())).await?;
        let nl = field.level_values.len();
        let (py, px) = (y1 - y0, wx + 2 * halo_x);
        if let Some(blur) = &field.blur {
            // Up to 2·(2·⌈4σ⌉+1) taps a point over whole planes, run by rayon: on a blocking
            // thread, so the worker awaiting it serves other streams meanwhile.
            let (blur, name) = (blur.clone(), name.clone());
            values = off_worker(move || {
                for plane in values.chunks_mut(py * px) {
                    if px == nlon {
                        blur.apply_globe(plane, py, px)
                    } else {
                        blur.apply_window(plane, py, px)
                    }
                    .map_err(|e| field_err(&name, e))?;
                }
                Ok::<_, PipelineError>(values)
            })
            .await?;
        }
        // Crop the halo: (time, level, lat, lon) over the window.
        let (oy, ox) = (window.lat_start - y0, halo_x);
        let mut cropped = if (py, px) == (wy, wx) {
            values
        } else {
            let mut cropped = self.take_buffer();
            cropped.clear();
            for plane in values.chunks(py * px) {
                for y in 0..wy {
                    let row = (oy + y) * px + ox;
                    cropped.extend_from_slice(&plane[row..row + wx]);
                }
            }
            self.return_buffer(values);
            cropped
        };
        match field.config.normalization {
            Normalization::Global => {
                let stats = self.stats.as_ref().expect("checked in Pipeline::new");
                for (k, plane) in cropped.chunks_mut(wy * wx).enumerate() {
                    let (t, l) = (k / nl, k % nl);
                    stats.normalize(
                        name,
                        field.level_values[l],
                        ds.times[window.time_start + t],
                        plane,
                    )?;
                }
            }
            Normalization::Local => {
                let local = self
                    .local
                    .as_ref()
                    .expect("checked in Pipeline::with_statistics");
                local.normalize(
                    name,
                    &ds.times[window.time_start..window.time_start + wt],
                    &field.level_values,
                    window.lat_start..window.lat_start + wy,
                    window.lon_start,
                    &mut cropped,
                )?;
            }
            Normalization::None => {}
        }
        let tokens = tokenize_into(&field.geometry, &cropped, self.pool.take_len(cropped.len()));
        self.return_buffer(cropped);
        Ok(tokens)
    }

    /// Hands a finished sample's large buffers back for reuse by later samples.
    pub fn recycle(&self, sample: Sample) {
        for field in sample.fields {
            self.return_buffer(field.source);
            self.return_buffer(field.target);
        }
    }
}

/// The parts of a pipeline that finishing a field needs, shared with a blocking thread.
#[derive(Debug, Clone)]
pub(super) struct Shared {
    dataset: Arc<Dataset>,
    fields: Arc<[PreparedField]>,
    pool: Arc<BufferPool>,
    seed: u64,
    time_step_h: f64,
    grid_spacing: f64,
}

impl Pipeline {
    pub(super) fn shared(&self) -> Shared {
        Shared {
            dataset: self.dataset.clone(),
            fields: self.fields.clone(),
            pool: self.pool.clone(),
            seed: self.config.seed,
            time_step_h: self.time_step_h,
            grid_spacing: self.grid_spacing,
        }
    }
}

/// What finishing one field of a sample needs, owned, for a blocking thread.
pub(super) struct Cut {
    pub(super) pipeline: Shared,
    pub(super) field: usize,
    pub(super) epoch: u64,
    pub(super) id: SampleId,
    pub(super) window: FieldWindow,
}

impl Cut {
    /// Masks `tokens` and adds the token info and positional encoding.
    pub(super) fn finish(self, tokens: Vec<f32>) -> Result<FieldSample, PipelineError> {
        let Self {
            pipeline: shared,
            field: index,
            epoch,
            id,
            window,
        } = self;
        let field = &shared.fields[index];
        let ds = &shared.dataset;
        let nlon = ds.lons.len();
        let [wt, wy, wx] = window.size;
        let name = &field.config.name;
        let mut rng = sample_rng(shared.seed, epoch, id, index as u32, Purpose::Mask);
        // A target with room for the largest mask: one that grew would take fresh pages.
        let target = shared
            .pool
            .take_capacity(field.config.mask.max_target_len(&field.mask_geometry));
        let masked = try_apply_in_place(
            &field.config.mask,
            &field.mask_geometry,
            tokens,
            target,
            &mut rng,
        )
        .map_err(|e| field_err(name, e))?;
        let lats: Vec<f64> = (0..wy).map(|y| ds.lats[window.lat_start + y]).collect();
        let lons: Vec<f64> = (0..wx)
            .map(|x| ds.lons[(window.lon_start + x) % nlon])
            .collect();
        let infos = token_infos(
            &field.geometry,
            &WindowCoords {
                times_unix_s: &ds.times[window.time_start..window.time_start + wt],
                level_values: &field.level_values,
                lats_deg: &lats,
                lons_deg: &lons,
                time_step_h: shared.time_step_h,
                grid_spacing_deg: shared.grid_spacing,
            },
        )
        .map_err(|e| field_err(name, e))?;
        let pe = match &field.fixed_pe {
            Some(pe) => pe.clone(),
            None => {
                let offsets = GlobalOffsets::from_grid_start(
                    [window.time_start, window.lat_start, window.lon_start],
                    field.geometry.geometry.token_size,
                    Some(nlon),
                );
                encode(
                    field.config.pe,
                    &field.geometry,
                    field.config.pe_width,
                    &PeInputs {
                        global_offsets: Some(offsets),
                        token_infos: Some(&infos),
                    },
                )
                .map_err(|e| field_err(name, e))?
            }
        };
        Ok(FieldSample {
            name: name.clone(),
            source: masked.source,
            target: masked.target,
            masked_indices: masked.masked_indices,
            token_info: flatten(&infos),
            pe,
            window,
        })
    }
}

/// Runs CPU-heavy `work` on tokio's blocking pool rather than on the async worker awaiting it:
/// a worker busy for the length of an encoding or a blur stalls every stream it serves. Outside
/// a tokio runtime it runs in place. A panic in `work` goes on in the caller, as if it had run
/// there.
pub(super) async fn off_worker<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a runtime shutting down cancels a blocking task; nobody awaits the sample.
            Err(e) => panic!("a blocking sample task was cancelled: {e}"),
        },
    }
}
