//! Evaluation on a held-out split: the root-mean-square error of the model's masked-token
//! predictions per task, field and level **in physical units**, each beside a baseline scored on
//! exactly the same values:
//!
//! - **climatology**: the mean of the training split at the same grid point and hour of day
//!   ([`crate::climatology`]) — a climatology the model could have known, defined for every
//!   masked value;
//! - **global mean**: the loader's global statistics' mean for the field, level and month (what
//!   a normalized prediction of 0 means), over the whole store — defined for every masked value;
//! - **persistence**: the latest earlier value of the same grid point the model could see (an
//!   unmasked token of the sample) — defined where such a value exists (forecast masks);
//! - **interpolation**: linear in time between the nearest visible values before and after —
//!   defined for interior masks only.
//!
//! Normalized values map back through the loader's statistics (`GetStatistics`): each value
//! with the moments of its own level and month, the month taken from the window's place on the
//! dataset's time axis. Every RMSE and skill comes with a 95 % bootstrap interval over the
//! samples ([`crate::bootstrap`]). The scoring ([`Scores::add_field`]) is pure, so a case with a
//! known answer tests it; [`evaluate`] drives it over the loader's test stream.

use std::collections::BTreeMap;
use std::sync::Arc;

use atmorep_proto::request::{NormalizationName, SplitName};
use atmorep_proto::{Batch, FieldBatch, LoaderClient, MonthlyStatistics};
use candle_core::{DType, Device};

use crate::batch::batch_tensors;
use crate::bootstrap::{Bootstrap, Interval};
use crate::climatology::{self, PointClimatology};
use crate::ensemble::{self, EnsembleScore, EnsembleSums};
use crate::error::{Error, Result, input_err};
use crate::model::{FieldInput, MultiFormer};
use crate::train::TrainConfig;

mod report;
pub(crate) use report::{eval_row_columns, parquet_err, write_record_batch};
pub use report::{table, write_parquet};

/// A baseline the model is compared against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Baseline {
    Climatology,
    GlobalMean,
    Persistence,
    Interpolation,
}

impl Baseline {
    pub const ALL: [Baseline; 4] = [
        Baseline::Climatology,
        Baseline::GlobalMean,
        Baseline::Persistence,
        Baseline::Interpolation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Baseline::Climatology => "climatology",
            Baseline::GlobalMean => "global mean",
            Baseline::Persistence => "persistence",
            Baseline::Interpolation => "interpolation",
        }
    }
}

/// The dataset's time axis: step `i` is at `start_unix + i · step_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeAxis {
    pub start_unix: i64,
    pub step_s: i64,
}

/// How one field of a batch is laid out and how its values map back to physical units.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldLayout {
    pub name: String,
    /// Level values in token order; `[0.0]` for a surface variable.
    pub levels: Vec<f64>,
    /// Tokens along (time, lat, lon) per level.
    pub num_tokens: [usize; 3],
    /// Grid points per token along (time, lat, lon).
    pub token_size: [usize; 3],
    /// `false` when the field arrives in physical units already (normalization `none`).
    pub normalized: bool,
}

impl FieldLayout {
    /// The layout of a request field; local normalization cannot be undone from the global
    /// statistics, so it is refused by name.
    pub fn from_request(f: &atmorep_proto::FieldRequestConfig) -> Result<Self> {
        let normalized = match f.normalization {
            NormalizationName::Global => true,
            NormalizationName::None => false,
            NormalizationName::Local => {
                return Err(input_err(
                    format!("field `{}`", f.name),
                    "evaluation maps values back with the global statistics; this field is \
                     normalized locally",
                ));
            }
        };
        Ok(Self {
            name: f.name.clone(),
            levels: if f.levels.is_empty() {
                vec![0.0]
            } else {
                f.levels.clone()
            },
            num_tokens: f.num_tokens.map(|n| n as usize),
            token_size: f.token_size.map(|n| n as usize),
            normalized,
        })
    }

    fn window(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.num_tokens[a] * self.token_size[a])
    }
}

/// Per sample: values, and the squared errors of the model and of one baseline over them.
type SampleSums = [f64; 3];

fn add_sq(acc: &mut SampleSums, truth: f64, model: f64, baseline: f64) {
    acc[0] += 1.0;
    acc[1] += (model - truth).powi(2);
    acc[2] += (baseline - truth).powi(2);
}

/// Model RMSE, baseline RMSE and skill from totals of [`SampleSums`].
fn rmse_and_skill(t: &SampleSums) -> [f64; 3] {
    let (m, b) = ((t[1] / t[0]).sqrt(), (t[2] / t[0]).sqrt());
    [m, b, 1.0 - m / b]
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub task: String,
    pub field: String,
    pub level: f64,
    pub baseline: Baseline,
    /// Masked values both were scored on.
    pub values: u64,
    /// Samples (windows) they came from: the unit the intervals resample.
    pub samples: u64,
    pub model_rmse: f64,
    pub baseline_rmse: f64,
    /// 95 % bootstrap intervals of the model's RMSE, the baseline's and the skill.
    pub model_ci: Interval,
    pub baseline_ci: Interval,
    pub skill_ci: Interval,
    /// The ensemble's CRPS and spread–skill of the (task, field, level), for a model of more
    /// than one member (the same on every baseline's row).
    pub ensemble: Option<EnsembleScore>,
}

impl EvalRow {
    /// `1 − model / baseline`: positive when the model beats the baseline.
    pub fn skill(&self) -> f64 {
        1.0 - self.model_rmse / self.baseline_rmse
    }
}

/// What the baselines and the mapping to physical units need besides a batch.
#[derive(Debug, Clone, Copy)]
pub struct References<'a> {
    /// The loader's global statistics: physical units and the global-mean baseline.
    pub stats: &'a MonthlyStatistics,
    pub time: TimeAxis,
    /// The training split's per-point climatology; `None` leaves that baseline out.
    pub climatology: Option<&'a PointClimatology>,
}

type Key = (String, String, u64, Baseline);

/// Squared errors per (task, field, level, baseline), per sample; with an ensemble, its sums
/// per (task, field, level), per sample.
#[derive(Debug, Clone, Default)]
pub struct Scores {
    acc: BTreeMap<Key, Vec<SampleSums>>,
    members: usize,
    ensemble: BTreeMap<(String, String, u64), Vec<EnsembleSums>>,
}

impl Scores {
    /// Scores one field of a batch. `pred` is the model's output for every token and ensemble
    /// member, `[B, N, members, V]`, in the field's normalized units: the ensemble mean is
    /// scored against the baselines, and with more than one member the ensemble itself
    /// ([`crate::ensemble`]).
    pub fn add_field(
        &mut self,
        task: &str,
        fb: &FieldBatch,
        pred: &[f32],
        members: usize,
        layout: &FieldLayout,
        refs: &References,
    ) -> Result<()> {
        let References {
            stats,
            time,
            climatology,
        } = *refs;
        let what = || format!("field `{}`", layout.name);
        let [nt, ny, nx] = layout.num_tokens;
        let [st, sy, sx] = layout.token_size;
        let [wt, wy, wx] = layout.window();
        let nl = layout.levels.len();
        let (b, n, v) = (fb.batch_size(), fb.num_tokens(), fb.token_numel());
        if n != nl * nt * ny * nx || v != st * sy * sx {
            return Err(input_err(
                what(),
                format!(
                    "{n} tokens of {v} values, the request's geometry makes {} of {}",
                    nl * nt * ny * nx,
                    st * sy * sx
                ),
            ));
        }
        let e = members;
        if e == 0 || pred.len() != b * n * e * v || fb.windows.len() != b {
            return Err(input_err(
                what(),
                format!(
                    "{} predicted values of {e} members and {} windows for {b} samples of {n}×{v}",
                    pred.len(),
                    fb.windows.len()
                ),
            ));
        }
        // (mean, std) per level and time step of the window: physical = x · std + mean.
        let affine = |l: usize, t_abs: usize| -> Result<(f64, f64)> {
            if !layout.normalized {
                return Ok((0.0, 1.0));
            }
            let unix = time.start_unix + t_abs as i64 * time.step_s;
            stats
                .affine(&layout.name, layout.levels[l], unix)
                .map_err(|e| input_err(what(), e.to_string()))
        };
        let plane = wy * wx;
        let index = |l: usize, t: usize, y: usize, x: usize| ((l * wt + t) * wy + y) * wx + x;
        let mut known = vec![f64::NAN; nl * wt * plane];
        let mut row = 0usize;
        for i in 0..b {
            let window = &fb.windows[i];
            let t0 = window.time_start;
            let mut moments = Vec::with_capacity(nl * wt);
            let mut clim = Vec::with_capacity(nl * wt);
            for l in 0..nl {
                for t in 0..wt {
                    moments.push(affine(l, t0 + t)?);
                    if let Some(c) = climatology {
                        let unix = time.start_unix + (t0 + t) as i64 * time.step_s;
                        clim.push(c.at(&layout.name, layout.levels[l], unix)?);
                    }
                }
            }
            let mut sums: BTreeMap<(usize, Baseline), SampleSums> = BTreeMap::new();
            let mut ens: BTreeMap<usize, EnsembleSums> = BTreeMap::new();
            let mut xs = vec![0.0; e];
            let mut off_grid = None;
            let masked = &fb.masked_indices[i];
            known.fill(f64::NAN);
            let source = fb.source_of(i);
            for k in 0..n {
                if masked.binary_search(&(k as u32)).is_ok() {
                    continue;
                }
                for_each_value(k, layout, |j, l, t, y, x| {
                    let (mean, std) = moments[l * wt + t];
                    known[index(l, t, y, x)] = f64::from(source[k * v + j]) * std + mean;
                });
            }
            let p = &pred[i * n * e * v..(i + 1) * n * e * v];
            for &k in masked {
                let k = k as usize;
                let target = fb.target.get(row * v..(row + 1) * v).ok_or_else(|| {
                    input_err(what(), "fewer target rows than masked tokens".to_string())
                })?;
                row += 1;
                for_each_value(k, layout, |j, l, t, y, x| {
                    let (mean, std) = moments[l * wt + t];
                    let truth = f64::from(target[j]) * std + mean;
                    for (m, x) in xs.iter_mut().enumerate() {
                        *x = f64::from(p[(k * e + m) * v + j]) * std + mean;
                    }
                    let model = xs.iter().sum::<f64>() / e as f64;
                    if e > 1 {
                        ensemble::add_value(ens.entry(l).or_default(), &xs, truth);
                    }
                    let mut add = |baseline: Baseline, value: f64| {
                        add_sq(sums.entry((l, baseline)).or_default(), truth, model, value);
                    };
                    add(Baseline::GlobalMean, mean);
                    if let Some(c) = clim.get(l * wt + t) {
                        let (lat, lon) = (window.lat_start + y, window.lon_start + x);
                        match c.mean(lat, lon) {
                            Some(m) => add(Baseline::Climatology, m),
                            None => off_grid = Some(lat),
                        }
                    }
                    let at = |tt: usize| known[index(l, tt, y, x)];
                    let before = (0..t).rev().find(|&tt| !at(tt).is_nan());
                    let after = (t + 1..wt).find(|&tt| !at(tt).is_nan());
                    if let Some(t_0) = before {
                        add(Baseline::Persistence, at(t_0));
                        if let Some(t_1) = after {
                            let w = (t - t_0) as f64 / (t_1 - t_0) as f64;
                            add(Baseline::Interpolation, at(t_0) + (at(t_1) - at(t_0)) * w);
                        }
                    }
                });
            }
            if let Some(lat) = off_grid {
                return Err(input_err(
                    what(),
                    format!("window {i} reaches grid row {lat}, past the climatology's grid"),
                ));
            }
            for ((l, baseline), s) in sums {
                let level = layout.levels[l].to_bits();
                self.acc
                    .entry((task.to_string(), layout.name.clone(), level, baseline))
                    .or_default()
                    .push(s);
            }
            for (l, s) in ens {
                let level = layout.levels[l].to_bits();
                self.members = e;
                self.ensemble
                    .entry((task.to_string(), layout.name.clone(), level))
                    .or_default()
                    .push(s);
            }
        }
        if row * v != fb.target.len() {
            return Err(input_err(
                what(),
                format!(
                    "{} target values for {row} masked tokens of {v}",
                    fb.target.len()
                ),
            ));
        }
        Ok(())
    }

    /// The report, sorted by task, field, level and baseline, with the default intervals
    /// (1000 resamples, seed 0).
    pub fn rows(&self) -> Vec<EvalRow> {
        self.rows_with(&Bootstrap::default())
    }

    /// The report with intervals drawn by `bootstrap`.
    pub fn rows_with(&self, bootstrap: &Bootstrap) -> Vec<EvalRow> {
        let ensembles: BTreeMap<_, _> = self
            .ensemble
            .iter()
            .map(|(k, samples)| {
                let score = EnsembleScore::from_samples(samples, self.members, bootstrap);
                (k.clone(), score)
            })
            .collect();
        self.acc
            .iter()
            .map(|((task, field, level, baseline), samples)| {
                let mut total = [0.0; 3];
                for s in samples {
                    for (t, v) in total.iter_mut().zip(s) {
                        *t += v;
                    }
                }
                let [model_rmse, baseline_rmse, _] = rmse_and_skill(&total);
                let [model_ci, baseline_ci, skill_ci] =
                    bootstrap.intervals(samples, rmse_and_skill);
                EvalRow {
                    task: task.clone(),
                    field: field.clone(),
                    level: f64::from_bits(*level),
                    baseline: *baseline,
                    values: total[0] as u64,
                    samples: samples.len() as u64,
                    model_rmse,
                    baseline_rmse,
                    model_ci,
                    baseline_ci,
                    skill_ci,
                    ensemble: ensembles
                        .get(&(task.clone(), field.clone(), *level))
                        .copied(),
                }
            })
            .collect()
    }
}

/// Calls `f(j, level, t, y, x)` for each value `j` of token `k`, with its place in the window.
pub(crate) fn for_each_value(
    k: usize,
    layout: &FieldLayout,
    mut f: impl FnMut(usize, usize, usize, usize, usize),
) {
    let [nt, ny, nx] = layout.num_tokens;
    let [st, sy, sx] = layout.token_size;
    let (tx, rest) = (k % nx, k / nx);
    let (ty, rest) = (rest % ny, rest / ny);
    let (tt, l) = (rest % nt, rest / nt);
    let mut j = 0;
    for dt in 0..st {
        for dy in 0..sy {
            for dx in 0..sx {
                f(j, l, tt * st + dt, ty * sy + dy, tx * sx + dx);
                j += 1;
            }
        }
    }
}

/// What to evaluate on.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub split: SplitName,
    /// Batches per task at most (one pass over the split's first epoch otherwise).
    pub batches: u64,
    /// The training split's per-point climatology, if already computed (for several models on
    /// one stream); `None`: computed from the loader.
    pub climatology: Option<Arc<PointClimatology>>,
}

/// Scores `model` (on the CPU) on every task of `config` over the `opts.split` stream of
/// `client`.
pub async fn evaluate(
    model: &MultiFormer,
    config: &TrainConfig,
    client: &LoaderClient,
    opts: &EvalOptions,
) -> Result<Scores> {
    evaluate_on(model, config, client, opts, &Device::Cpu).await
}

/// [`evaluate`] for a model whose weights are on `device` (a trainer's
/// [`crate::Trainer::device`]): the batches are copied there, the predictions read back.
pub async fn evaluate_on(
    model: &MultiFormer,
    config: &TrainConfig,
    client: &LoaderClient,
    opts: &EvalOptions,
    device: &Device,
) -> Result<Scores> {
    let dataset = &config.request.dataset;
    let info = client.dataset_info(dataset).await?;
    let axis = info.time.as_ref().ok_or_else(|| {
        input_err(
            format!("dataset `{dataset}`"),
            "the loader sent no time axis",
        )
    })?;
    let time = TimeAxis {
        start_unix: axis.start_unix,
        step_s: (axis.step_hours * 3600.0).round() as i64,
    };
    let layouts = config
        .model
        .fields
        .iter()
        .map(|spec| {
            let f = config
                .request
                .fields
                .iter()
                .find(|f| f.name == spec.name)
                .ok_or_else(|| {
                    input_err(
                        format!("field `{}`", spec.name),
                        "the model has it, the request does not",
                    )
                })?;
            FieldLayout::from_request(f)
        })
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = layouts
        .iter()
        .filter(|l| l.normalized)
        .map(|l| l.name.clone())
        .collect();
    let stats = if names.is_empty() {
        MonthlyStatistics::default()
    } else {
        client.statistics(dataset, &names).await?
    };
    let climatology = match &opts.climatology {
        Some(c) => c.clone(),
        None => Arc::new(climatology::from_loader(client, &config.request, &layouts).await?),
    };
    let refs = References {
        stats: &stats,
        time,
        climatology: Some(&climatology),
    };
    let mut scores = Scores::default();
    for (i, task) in config.tasks().iter().enumerate() {
        let mut request = config.task_request(i);
        request.split = opts.split;
        request.resume = None;
        request.end_epoch = Some(1);
        // A model trained on blurred fields still gets blurred inputs, but is scored (and the
        // baselines with it) on the raw values: the same windows and masks, from the same seed,
        // without the blur — so every variant of an ablation is scored on the same targets.
        let mut raw = request.clone();
        for f in &mut raw.fields {
            f.blur_sigma = 0.0;
        }
        let mut raw_stream = (raw != request).then(|| client.stream(raw.to_proto()));
        let mut stream = client.stream(request.to_proto());
        let mut taken = 0;
        while taken < opts.batches {
            let Some(batch) = next_batch(&mut stream).await? else {
                break;
            };
            let truth = match &mut raw_stream {
                Some(s) => Some(next_batch(s).await?.ok_or_else(|| {
                    input_err(
                        format!("task `{}`", task.name),
                        "the unblurred stream ended before the blurred one",
                    )
                })?),
                None => None,
            };
            taken += 1;
            score_batch(
                &mut scores,
                &task.name,
                &batch,
                truth.as_ref(),
                model,
                &layouts,
                &refs,
                device,
            )?;
        }
        if taken == 0 {
            return Err(Error::StreamEnded {
                what: format!("{:?} split of task `{}`", opts.split, task.name),
                batches: 0,
            });
        }
    }
    Ok(scores)
}

/// The next batch with samples, `None` at the end of the stream.
async fn next_batch(stream: &mut atmorep_proto::LoaderStream) -> Result<Option<Batch>> {
    loop {
        match stream.next().await {
            Some(Ok(batch)) if batch.is_empty() => {
                if batch.end_of_stream {
                    return Ok(None);
                }
            }
            Some(Ok(batch)) => return Ok(Some(batch)),
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(None),
        }
    }
}

/// Scores the model's predictions from `batch` against `truth` (the same samples unblurred;
/// `None`: `batch` itself).
#[allow(clippy::too_many_arguments)]
fn score_batch(
    scores: &mut Scores,
    task: &str,
    batch: &Batch,
    truth: Option<&Batch>,
    model: &MultiFormer,
    layouts: &[FieldLayout],
    refs: &References,
    device: &Device,
) -> Result<()> {
    let fields = batch_tensors(batch, model.config(), DType::F32, device)?;
    let inputs: Vec<FieldInput> = fields.iter().map(|f| f.input.clone()).collect();
    let preds = model.forward(&inputs)?;
    for ((pred, layout), spec) in preds.iter().zip(layouts).zip(&model.config().fields) {
        let fb = batch
            .field(&spec.name)
            .expect("batch_tensors found every field");
        if fb.masked_indices.iter().all(Vec::is_empty) {
            continue;
        }
        let fb = match truth {
            None => fb,
            Some(raw) => {
                let what = || format!("field `{}` of task `{task}`", spec.name);
                let r = raw
                    .field(&spec.name)
                    .ok_or_else(|| input_err(what(), "missing from the unblurred stream"))?;
                if r.windows != fb.windows || r.masked_indices != fb.masked_indices {
                    return Err(input_err(
                        what(),
                        "the unblurred stream cut other windows or masks than the blurred one",
                    ));
                }
                r
            }
        };
        let members = pred.dims4()?.2;
        let values = pred.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        scores.add_field(task, fb, &values, members, layout, refs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::RecordBatch;
    use atmorep_proto::Window;
    use atmorep_proto::statistics::Moments;

    /// One level, 4 time tokens of 1 step, one 1×2 token per step: a window of 4 steps × 1 × 2.
    fn layout() -> FieldLayout {
        FieldLayout {
            name: "t".into(),
            levels: vec![850.0],
            num_tokens: [4, 1, 1],
            token_size: [1, 1, 2],
            normalized: true,
        }
    }

    /// 2020-01-01T00:00Z, hourly; January has mean 280 and std 10.
    fn stats() -> (MonthlyStatistics, TimeAxis) {
        let mut s = MonthlyStatistics::default();
        let m = Moments {
            count: 1,
            mean: 280.0,
            std: 10.0,
            min: 0.0,
            max: 0.0,
        };
        s.insert("t", 850.0, 2020, 1, m);
        (
            s,
            TimeAxis {
                start_unix: 1_577_836_800,
                step_s: 3600,
            },
        )
    }

    /// Physical values at step t, point x: 280 + 10·(t + x/2) ⇒ normalized t + x/2 — linear in
    /// time, so interpolation is exact and persistence is off by 10 per step.
    fn field(masked: Vec<u32>, noise: f32) -> FieldBatch {
        let norm = |t: usize, x: usize| t as f32 + x as f32 / 2.0;
        let mut source = Vec::new();
        let mut target = Vec::new();
        for t in 0..4 {
            for x in 0..2 {
                if masked.contains(&(t as u32)) {
                    source.push(noise);
                    target.push(norm(t, x));
                } else {
                    source.push(norm(t, x));
                }
            }
        }
        FieldBatch {
            name: "t".into(),
            source,
            source_shape: [1, 4, 2],
            target,
            masked_indices: vec![masked],
            token_info: vec![0.0; 4 * 8],
            pe: vec![],
            pe_width: 0,
            windows: vec![Window {
                time_start: 0,
                lat_start: 0,
                lon_start: 0,
                size: [4, 1, 2],
            }],
        }
    }

    fn row(rows: &[EvalRow], b: Baseline) -> &EvalRow {
        rows.iter().find(|r| r.baseline == b).unwrap()
    }

    fn refs<'a>(
        s: &'a MonthlyStatistics,
        time: TimeAxis,
        c: Option<&'a PointClimatology>,
    ) -> References<'a> {
        References {
            stats: s,
            time,
            climatology: c,
        }
    }

    /// A 3 × 4 grid whose training mean at 850 hPa, hour `h` of day, point (lat, lon) is
    /// `want(h, lat, lon)`, from two days of values `want ∓ 1`.
    fn point_climatology(want: impl Fn(i64, usize, usize) -> f32) -> PointClimatology {
        let mut c = PointClimatology::new(3, 4, 3600);
        for day in [-3, -2] {
            for h in 0..24 {
                let values: Vec<f32> = (0..12)
                    .map(|i| want(h, i / 4, i % 4) + if day == -3 { -1.0 } else { 1.0 })
                    .collect();
                c.add("t", 850.0, 1_577_836_800 + day * 86_400 + h * 3600, &values)
                    .unwrap();
            }
        }
        c
    }

    #[test]
    fn baselines_have_their_known_answers() {
        let (s, time) = stats();
        // Tokens 1 and 3 masked: step 1 lies between visible steps 0 and 2, step 3 has only a
        // past. The model predicts normalized 0.5 everywhere (physical 285).
        let mut fb = field(vec![1, 3], 9.0);
        // The window's two columns are grid columns 3 and 0 (across 360°) of row 1.
        fb.windows[0].lat_start = 1;
        fb.windows[0].lon_start = 3;
        // The training mean there: 01:00 → 289 at column 3, 296 at column 0; 03:00 → 310, 313.
        let c = point_climatology(|h, lat, lon| match (h, lat, lon) {
            (1, 1, 3) => 289.0,
            (1, 1, 0) => 296.0,
            (3, 1, 3) => 310.0,
            (3, 1, 0) => 313.0,
            _ => 0.0,
        });
        let pred = vec![0.5f32; 8];
        let mut scores = Scores::default();
        scores
            .add_field("bert", &fb, &pred, 1, &layout(), &refs(&s, time, Some(&c)))
            .unwrap();
        let rows = scores.rows();
        assert_eq!(rows.len(), 4);
        // Truths (physical): step 1 → 290, 295; step 3 → 310, 315.
        let point = row(&rows, Baseline::Climatology);
        assert_eq!((point.values, point.samples), (4, 1));
        let want = ((1.0 + 1.0 + 0.0 + 4.0) / 4.0f64).sqrt();
        assert!((point.baseline_rmse - want).abs() < 1e-9, "{point:?}");
        // One sample: every resample is that sample.
        assert_eq!(point.baseline_ci, [point.baseline_rmse; 2]);
        let clim = row(&rows, Baseline::GlobalMean);
        assert_eq!(clim.values, 4);
        let want = ((10f64.powi(2) + 15f64.powi(2) + 30f64.powi(2) + 35f64.powi(2)) / 4.0).sqrt();
        assert!((clim.baseline_rmse - want).abs() < 1e-9, "{clim:?}");
        let model = ((5f64.powi(2) + 10f64.powi(2) + 25f64.powi(2) + 30f64.powi(2)) / 4.0).sqrt();
        assert!((clim.model_rmse - model).abs() < 1e-9, "{clim:?}");
        // Persistence: step 1 from step 0 (off by 10), step 3 from step 2 (off by 10).
        let pers = row(&rows, Baseline::Persistence);
        assert_eq!(pers.values, 4);
        assert!((pers.baseline_rmse - 10.0).abs() < 1e-9, "{pers:?}");
        // Interpolation: only step 1, exactly.
        let interp = row(&rows, Baseline::Interpolation);
        assert_eq!(interp.values, 2);
        assert!(interp.baseline_rmse.abs() < 1e-9, "{interp:?}");
        let model = ((5f64.powi(2) + 10f64.powi(2)) / 2.0).sqrt();
        assert!((interp.model_rmse - model).abs() < 1e-9, "{interp:?}");
        assert!(interp.skill() < 0.0 && clim.skill() > 0.0);
    }

    #[test]
    fn a_perfect_model_scores_zero_and_masked_sources_are_never_used() {
        let (s, time) = stats();
        // Step 0 masked: no past, so only climatology applies; the noise in the masked source
        // must not leak into any baseline.
        let fb = field(vec![0, 2], 1e6);
        let mut pred = vec![0f32; 8];
        for t in 0..4 {
            for x in 0..2 {
                pred[t * 2 + x] = t as f32 + x as f32 / 2.0;
            }
        }
        let mut scores = Scores::default();
        scores
            .add_field("bert", &fb, &pred, 1, &layout(), &refs(&s, time, None))
            .unwrap();
        let rows = scores.rows();
        assert_eq!(row(&rows, Baseline::GlobalMean).values, 4);
        assert_eq!(row(&rows, Baseline::Persistence).values, 2);
        let interp = row(&rows, Baseline::Interpolation);
        assert_eq!(interp.values, 2);
        assert!(interp.baseline_rmse.abs() < 1e-9 && interp.model_rmse.abs() < 1e-9);
        for r in &rows {
            assert!(r.model_rmse < 1e-9, "{r:?}");
        }
    }

    #[test]
    fn missing_statistics_and_local_normalization_are_named() {
        let (_, time) = stats();
        let fb = field(vec![1], 0.0);
        let err = Scores::default()
            .add_field(
                "bert",
                &fb,
                &[0.0; 8],
                1,
                &layout(),
                &refs(&MonthlyStatistics::default(), time, None),
            )
            .unwrap_err();
        assert!(err.to_string().contains("`t`"), "{err}");
        // A climatology without the window's hours, or off the window's grid rows.
        let (s, _) = stats();
        let mut c = PointClimatology::new(3, 4, 3600);
        c.add("t", 850.0, 1_577_836_800, &[280.0; 12]).unwrap();
        let err = Scores::default()
            .add_field(
                "bert",
                &fb,
                &[0.0; 8],
                1,
                &layout(),
                &refs(&s, time, Some(&c)),
            )
            .unwrap_err();
        assert!(err.to_string().contains("01:00 UTC"), "{err}");
        let c = point_climatology(|_, _, _| 280.0);
        let mut far = field(vec![1], 0.0);
        far.windows[0].lat_start = 3;
        let err = Scores::default()
            .add_field(
                "bert",
                &far,
                &[0.0; 8],
                1,
                &layout(),
                &refs(&s, time, Some(&c)),
            )
            .unwrap_err();
        assert!(err.to_string().contains("grid row 3"), "{err}");
        let f: atmorep_proto::FieldRequestConfig = toml::from_str(
            "name = 't'\nnum_tokens = [1, 1, 1]\ntoken_size = [1, 1, 1]\npe = 'local'\n\
             pe_width = 8\nnormalization = 'local'",
        )
        .unwrap();
        let err = FieldLayout::from_request(&f).unwrap_err();
        assert!(err.to_string().contains("normalized locally"), "{err}");
    }

    #[test]
    fn intervals_resample_samples_and_reach_the_report() {
        let (s, time) = stats();
        let r = refs(&s, time, None);
        let mut scores = Scores::default();
        // Sample A: the model predicts 285 everywhere; sample B: the model is exact.
        let fb = field(vec![1, 3], 0.0);
        scores
            .add_field("bert", &fb, &[0.5; 8], 1, &layout(), &r)
            .unwrap();
        let exact: Vec<f32> = (0..8)
            .map(|i| (i / 2) as f32 + (i % 2) as f32 / 2.0)
            .collect();
        scores
            .add_field("bert", &fb, &exact, 1, &layout(), &r)
            .unwrap();
        let rows = scores.rows();
        let g = row(&rows, Baseline::GlobalMean);
        assert_eq!((g.values, g.samples), (8, 2));
        // Two samples of equal size: the interval runs from B's RMSE alone to A's alone.
        let a = ((5f64.powi(2) + 10f64.powi(2) + 25f64.powi(2) + 30f64.powi(2)) / 4.0).sqrt();
        assert!(
            g.model_ci[0] == 0.0 && (g.model_ci[1] - a).abs() < 1e-9,
            "{g:?}"
        );
        assert!((g.model_rmse - a / 2f64.sqrt()).abs() < 1e-9, "{g:?}");
        // Both samples have the same truth, so the baseline's interval has no width.
        assert_eq!(g.baseline_ci, [g.baseline_rmse; 2]);
        assert!(g.skill_ci[0] <= g.skill() && g.skill() <= g.skill_ci[1] && g.skill_ci[1] == 1.0);
        let text = table(&rows);
        assert!(
            text.contains("[0.0000, ") && text.contains("+1.000]"),
            "{text}"
        );
    }

    /// A two-member prediction: member 0 exact, member 1 two normalized units (20 K) high.
    fn two_members() -> Vec<f32> {
        // [B = 1, N = 4, E = 2, V = 2]
        let mut out = Vec::new();
        for t in 0..4 {
            for m in 0..2 {
                for x in 0..2 {
                    out.push(t as f32 + x as f32 / 2.0 + 2.0 * m as f32);
                }
            }
        }
        out
    }

    #[test]
    fn an_ensemble_gets_crps_and_spread_skill() {
        let (s, time) = stats();
        let mut scores = Scores::default();
        scores
            .add_field(
                "bert",
                &field(vec![1, 3], 0.0),
                &two_members(),
                2,
                &layout(),
                &refs(&s, time, None),
            )
            .unwrap();
        let rows = scores.rows();
        // The ensemble mean is 10 K high everywhere.
        let g = row(&rows, Baseline::GlobalMean);
        assert!((g.model_rmse - 10.0).abs() < 1e-9, "{g:?}");
        // CRPS per value: (0 + 20)/2 − 20/4 = 5; unbiased variance (10² + 10²)/1 = 200, so
        // spread √200 and spread–skill √(3/2) · √200 / 10 = √3.
        let e = g.ensemble.expect("two members make an ensemble");
        assert_eq!(e.members, 2);
        assert!((e.crps - 5.0).abs() < 1e-9, "{e:?}");
        assert!((e.spread - 200f64.sqrt()).abs() < 1e-9, "{e:?}");
        assert!((e.spread_skill - 3f64.sqrt()).abs() < 1e-9, "{e:?}");
        assert!(rows.iter().all(|r| r.ensemble == Some(e)));
        assert!(table(&rows).contains("spread–skill"));
        // A wrong member count is refused.
        let err = Scores::default()
            .add_field(
                "bert",
                &field(vec![1], 0.0),
                &two_members(),
                3,
                &layout(),
                &refs(&s, time, None),
            )
            .unwrap_err();
        assert!(err.to_string().contains("of 3 members"), "{err}");
    }

    #[test]
    fn the_report_round_trips_through_parquet() {
        let (s, time) = stats();
        let mut scores = Scores::default();
        scores
            .add_field(
                "bert",
                &field(vec![1, 3], 0.0),
                &two_members(),
                2,
                &layout(),
                &refs(&s, time, None),
            )
            .unwrap();
        let rows = scores.rows();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eval.parquet");
        write_parquet(&path, &rows).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        let n: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(n, rows.len());
        for column in [
            "samples",
            "model_rmse_lo",
            "model_rmse_hi",
            "baseline_rmse_lo",
            "baseline_rmse_hi",
            "skill_lo",
            "skill_hi",
            "members",
            "crps",
            "crps_lo",
            "crps_hi",
            "spread",
            "spread_skill",
            "spread_skill_lo",
            "spread_skill_hi",
        ] {
            assert!(batches[0].column_by_name(column).is_some(), "no {column}");
        }
        let text = table(&rows);
        assert!(
            text.contains("interpolation") && text.contains("persistence"),
            "{text}"
        );
    }
}
