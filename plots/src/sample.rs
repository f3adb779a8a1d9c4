//! One loader sample through the model: where its tokens lie and what the model made of them.
//!
//! The loader sends token values in token order (level, t, lat, lon) with values (t, lat, lon)
//! inside each token (docs/design.md §3) and, per token, its 8 floats of info; [`FieldGrid`]
//! turns those back into grid points with latitudes, longitudes and times, which every map
//! needs.

use atmorep_proto::calendar::{SECONDS_PER_DAY, TimeFormat, days_from_civil, format_time};
use atmorep_proto::{Batch, FieldBatch, RequestConfig, TOKEN_INFO_LEN};
use atmorep_trainer::{AttentionMaps, DType, Device, FieldInput, MultiFormer, batch_tensors};

use crate::error::{Result, input_err, tensor_err};

/// One field of the first sample of a batch, with its token geometry.
#[derive(Debug, Clone)]
pub struct FieldGrid {
    pub name: String,
    /// Level values as the store names them (one `NaN` entry for a surface field).
    pub levels: Vec<f64>,
    /// Tokens along (time, lat, lon) per level.
    pub num_tokens: [usize; 3],
    /// Grid points per token along (time, lat, lon).
    pub token_size: [usize; 3],
    /// Per token (token order), its info (year, day of year, hour, level, lat, lon, time step,
    /// grid spacing).
    pub info: Vec<[f32; TOKEN_INFO_LEN]>,
}

impl FieldGrid {
    /// The first sample of `fb`, with the geometry `request` asked for.
    pub fn new(fb: &FieldBatch, request: &RequestConfig) -> Result<Self> {
        let what = || format!("field `{}`", fb.name);
        let req = request
            .fields
            .iter()
            .find(|f| f.name == fb.name)
            .ok_or_else(|| input_err(what(), "the request does not name it"))?;
        let num_tokens = req.num_tokens.map(|n| n as usize);
        let token_size = req.token_size.map(|n| n as usize);
        let levels = if req.levels.is_empty() {
            vec![f64::NAN]
        } else {
            req.levels.clone()
        };
        let n = levels.len() * num_tokens.iter().product::<usize>();
        let v: usize = token_size.iter().product();
        if fb.batch_size() == 0 || fb.num_tokens() != n || fb.token_numel() != v {
            return Err(input_err(
                what(),
                format!(
                    "the batch has {} samples of {} tokens × {} values; the request's geometry \
                     gives {n} × {v}",
                    fb.batch_size(),
                    fb.num_tokens(),
                    fb.token_numel()
                ),
            ));
        }
        let info = fb
            .token_info_of(0)
            .chunks_exact(TOKEN_INFO_LEN)
            .map(|c| c.try_into().expect("chunks of TOKEN_INFO_LEN"))
            .collect();
        Ok(Self {
            name: fb.name.clone(),
            levels,
            num_tokens,
            token_size,
            info,
        })
    }

    /// Tokens of the sample (all levels).
    pub fn len(&self) -> usize {
        self.info.len()
    }

    pub fn is_empty(&self) -> bool {
        self.info.is_empty()
    }

    /// Values per token.
    pub fn token_numel(&self) -> usize {
        self.token_size.iter().product()
    }

    /// The index of token (level, t, lat, lon).
    pub fn token_index(&self, level: usize, t: usize, y: usize, x: usize) -> usize {
        let [nt, ny, nx] = self.num_tokens;
        ((level * nt + t) * ny + y) * nx + x
    }

    /// (level, t, lat, lon) of token `i`.
    pub fn token_coords(&self, i: usize) -> [usize; 4] {
        let [nt, ny, nx] = self.num_tokens;
        [i / (nt * ny * nx), i / (ny * nx) % nt, i / nx % ny, i % nx]
    }

    /// Grid spacing in degrees.
    pub fn spacing(&self) -> f64 {
        f64::from(self.info[0][7])
    }

    /// Latitude and longitude (degrees; longitude continuous across the window, which may
    /// cross 0°) of grid point (`y`, `x`) of the window, rows north to south.
    pub fn grid_lat_lon(&self, y: usize, x: usize) -> (f64, f64) {
        let [_, sy, sx] = self.token_size;
        let d = self.spacing();
        let info = &self.info[self.token_index(0, 0, y / sy, x / sx)];
        let lat = f64::from(info[4]) + ((sy - 1) as f64 / 2.0 - (y % sy) as f64) * d;
        let lon = f64::from(info[5]) + ((x % sx) as f64 - (sx - 1) as f64 / 2.0) * d;
        (lat, self.unwrap_lon(lon))
    }

    /// `lon` shifted by whole turns next to the window's first token, so a window across 0° has
    /// increasing longitudes.
    pub fn unwrap_lon(&self, lon: f64) -> f64 {
        let first = f64::from(self.info[0][5]);
        first + (lon - first + 180.0).rem_euclid(360.0) - 180.0
    }

    /// Grid points of the window along (time, lat, lon).
    pub fn grid_shape(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.num_tokens[a] * self.token_size[a])
    }

    /// Unix seconds of grid time `tau` of the window (a token is dated by the last step it
    /// covers, so earlier steps of it lie whole time steps before).
    pub fn time_unix(&self, tau: usize) -> i64 {
        let st = self.token_size[0];
        let info = &self.info[self.token_index(0, tau / st, 0, 0)];
        let (year, doy, hour, step_h) = (info[0], info[1], info[2], info[6]);
        let day = days_from_civil(year as i64, 1, 1) + doy as i64;
        let back = (st - 1 - tau % st) as f64 * f64::from(step_h);
        day * SECONDS_PER_DAY + ((f64::from(hour) - back) * 3600.0).round() as i64
    }

    /// `YYYY-MM-DD HH:MM` UTC of grid time `tau`.
    pub fn time_label(&self, tau: usize) -> String {
        format_time(self.time_unix(tau), TimeFormat::Minutes)
    }

    /// A level's name for titles (`850 hPa`-style numbers as the store has them).
    pub fn level_label(&self, level: usize) -> String {
        match self.levels.get(level) {
            Some(v) if v.is_finite() => format!("level {}", crate::canvas::tick(*v)),
            _ => "surface".into(),
        }
    }
}

/// The model's view of the first sample of a batch.
#[derive(Debug, Clone)]
pub struct ModelRun {
    /// The model's fields in its order, each with its geometry.
    pub fields: Vec<FieldGrid>,
    /// Per field, the loader's part of the batch (source after masking, targets, masks).
    pub batches: Vec<FieldBatch>,
    /// Per field, the ensemble-mean prediction of sample 0, `[N, V]` row-major.
    pub predictions: Vec<Vec<f32>>,
    pub attention: AttentionMaps,
    /// Tokens in front of each field's sequence that are no grid tokens (class token).
    pub extra_tokens: usize,
    /// Heads per layer, and how many of an encoder layer's heads attend across fields.
    pub num_heads: usize,
    pub cross_heads: usize,
}

impl ModelRun {
    /// Runs `model` on the first sample of `batch` (cut as `request` asked) and keeps its
    /// predictions and attention weights.
    pub fn new(model: &MultiFormer, batch: &Batch, request: &RequestConfig) -> Result<Self> {
        let cfg = model.config();
        let mut one = batch.clone();
        // Only the first sample is drawn; a batch of one keeps the forward pass small.
        for fb in &mut one.fields {
            keep_first_sample(fb);
        }
        one.sample_ids.truncate(1);
        one.sample_epochs.truncate(1);
        let tensors = batch_tensors(&one, cfg, DType::F32, &Device::Cpu).map_err(|e| {
            input_err(
                "the loader's sample",
                format!("does not fit the checkpoint's model: {e}"),
            )
        })?;
        let inputs: Vec<FieldInput> = tensors.iter().map(|t| t.input.clone()).collect();
        let (preds, attention) = model
            .forward_with_attention(&inputs)
            .map_err(|e| input_err("the model's forward pass", e.to_string()))?;
        let predictions = preds
            .iter()
            .map(|p| {
                // [1, N, E, V] → the ensemble mean [N, V].
                p.get(0)
                    .and_then(|p| p.mean(1))
                    .and_then(|p| p.to_dtype(DType::F32))
                    .and_then(|p| p.flatten_all())
                    .and_then(|p| p.to_vec1::<f32>())
                    .map_err(tensor_err("predictions"))
            })
            .collect::<Result<_>>()?;
        let mut fields = Vec::new();
        let mut batches = Vec::new();
        for spec in &cfg.fields {
            let fb = one
                .field(&spec.name)
                .expect("batch_tensors found every field");
            fields.push(FieldGrid::new(fb, request)?);
            batches.push(fb.clone());
        }
        Ok(Self {
            fields,
            batches,
            predictions,
            attention,
            extra_tokens: cfg.aux_info.extra_tokens(),
            num_heads: cfg.num_heads,
            cross_heads: cfg.cross_heads,
        })
    }

    /// The index of field `name`.
    pub fn field_index(&self, name: &str) -> Result<usize> {
        self.fields
            .iter()
            .position(|f| f.name == name)
            .ok_or_else(|| {
                input_err(
                    format!("field `{name}`"),
                    format!(
                        "not among the model's fields {:?}",
                        self.fields.iter().map(|f| &f.name).collect::<Vec<_>>()
                    ),
                )
            })
    }
}

/// Cuts `fb` down to its first sample.
fn keep_first_sample(fb: &mut FieldBatch) {
    let [b, n, v] = fb.source_shape;
    if b <= 1 {
        return;
    }
    let m0 = fb.masked_indices[0].len();
    fb.source.truncate(n * v);
    fb.source_shape = [1, n, v];
    fb.target.truncate(m0 * v);
    fb.masked_indices.truncate(1);
    fb.token_info.truncate(n * TOKEN_INFO_LEN);
    fb.pe.truncate(n * fb.pe_width);
    fb.windows.truncate(1);
}

/// The source of sample 0 before masking: the masked tokens' original values put back.
pub fn unmasked_source(fb: &FieldBatch) -> Vec<f32> {
    let v = fb.token_numel();
    let mut out = fb.source_of(0).to_vec();
    for (k, &i) in fb.masked_indices[0].iter().enumerate() {
        let i = i as usize;
        out[i * v..(i + 1) * v].copy_from_slice(&fb.target_of(0)[k * v..(k + 1) * v]);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use atmorep_proto::Window;
    use atmorep_trainer::ModelConfig;

    /// The tiny model's request: per field 2 levels × 2×2×2 tokens of 1×3×4 points.
    pub(crate) fn tiny_request() -> RequestConfig {
        let field = |name: &str| {
            format!(
                "[[fields]]\nname = \"{name}\"\nlevels = [850, 500]\nnum_tokens = [2, 2, 2]\n\
                 token_size = [1, 3, 4]\npe = \"local\"\npe_width = 8\n"
            )
        };
        let text = format!("dataset = \"tiny\"\n{}{}", field("t"), field("z"));
        RequestConfig::from_toml(&text).expect("the tiny request parses")
    }

    /// A batch of `b` samples of the tiny geometry on a 1° grid at 20°N 350°E (the window
    /// crosses 0°), masking tokens 1, 5 and 12 of sample 0.
    pub(crate) fn tiny_batch(b: usize) -> Batch {
        let cfg = ModelConfig::tiny();
        let field = |name: &str, phase: f32| {
            let (n, v, w) = (16, 12, 8);
            let mut info = Vec::new();
            for s in 0..b {
                for i in 0..n {
                    let (l, t, y, x) = (i / 8, i / 4 % 2, i / 2 % 2, i % 2);
                    info.extend([
                        2020.0,
                        245.0 + s as f32,
                        6.0 * t as f32,
                        [850.0, 500.0][l],
                        21.0 - 3.0 * y as f32,
                        (351.5 + 4.0 * x as f32) % 360.0,
                        6.0,
                        1.0,
                    ]);
                }
            }
            let source: Vec<f32> = (0..b * n * v)
                .map(|i| ((i as f32) * 0.37 + phase).sin())
                .collect();
            let masked = [1u32, 5, 12];
            let mut masked_indices = vec![masked.to_vec()];
            masked_indices.resize(b, vec![]);
            FieldBatch {
                name: name.into(),
                target: masked
                    .iter()
                    .flat_map(|&i| source[i as usize * v..(i as usize + 1) * v].to_vec())
                    .map(|x| x + 0.5)
                    .collect(),
                source,
                source_shape: [b, n, v],
                masked_indices,
                token_info: info,
                pe: (0..b * n * w).map(|i| (i % 5) as f32 * 0.1).collect(),
                pe_width: w,
                windows: vec![
                    Window {
                        time_start: 0,
                        lat_start: 0,
                        lon_start: 0,
                        size: [2, 6, 8],
                    };
                    b
                ],
            }
        };
        assert_eq!(cfg.fields[0].num_tokens, 16);
        Batch {
            sample_ids: (0..b as u64).collect(),
            sample_epochs: vec![0; b],
            fields: vec![field("z", 1.0), field("t", 0.0)],
            ..Default::default()
        }
    }

    pub(crate) fn tiny_run() -> ModelRun {
        let (model, _) =
            MultiFormer::seeded(&ModelConfig::tiny(), 7, DType::F32, &Device::Cpu).unwrap();
        ModelRun::new(&model, &tiny_batch(2), &tiny_request()).unwrap()
    }

    #[test]
    fn a_grid_knows_where_and_when_its_points_are() {
        let batch = tiny_batch(1);
        let g = FieldGrid::new(batch.field("t").unwrap(), &tiny_request()).unwrap();
        assert_eq!(g.grid_shape(), [2, 6, 8]);
        assert_eq!(g.token_coords(g.token_index(1, 0, 1, 1)), [1, 0, 1, 1]);
        // Token (0,0,0,0) is centred at 21°N 351.5°E with 3×4 points: rows 22, 21, 20.
        assert_eq!(g.grid_lat_lon(0, 0), (22.0, 350.0));
        assert_eq!(g.grid_lat_lon(5, 7), (17.0, 357.0));
        // Token column 1 is centred at 355.5°: continuous, not wrapped.
        assert_eq!(g.unwrap_lon(0.5), 360.5);
        // Day 245 of 2020 is 2 September.
        assert_eq!(g.time_label(0), "2020-09-02 00:00");
        assert_eq!(g.time_label(1), "2020-09-02 06:00");
        assert_eq!(g.level_label(1), "level 500");
    }

    #[test]
    fn the_model_run_keeps_one_sample_in_the_models_field_order() {
        let run = tiny_run();
        assert_eq!(run.fields[0].name, "t");
        assert_eq!(run.batches[1].name, "z");
        assert_eq!(run.batches[0].batch_size(), 1);
        assert_eq!(run.predictions[0].len(), 16 * 12);
        let src = unmasked_source(&run.batches[0]);
        let masked = run.batches[0].source_of(0);
        assert_eq!(src[12 + 3], masked[12 + 3] + 0.5);
        assert_eq!(src[3], masked[3]);
    }
}
