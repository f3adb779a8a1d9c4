//! The training loop: batches from loaders over gRPC, masked-token losses, AdamW with warm-up
//! and decay, clipping, accumulation, validation on the validation split, metrics and
//! checkpoints from which a run continues bit for bit.
//!
//! A [`TrainConfig`] (TOML) names the model (a preset or a full model table), the loader request
//! (embedded, or a path to a request file), the tasks, the optimizer and the schedule:
//!
//! ```toml
//! steps = 200               # length of the LR schedule (and of the run, unless told to stop earlier)
//! seed = 0                  # weights and the task choice
//! model = "tiny"            # a preset, or a [model] table (see ModelConfig)
//! request = "request.toml"  # a path (relative to this file), or a [request] table
//!
//! [[tasks]]                 # left out: one task with the request's own masks
//! name = "bert"
//! weight = 3                # chosen with probability weight / Σ weights, per micro-batch
//! mask = { kind = "bert", r_max = 0.5 }
//! [[tasks]]
//! name = "forecast"
//! weight = 1
//! mask = { kind = "forecast", steps = 1 }
//!
//! [optimizer]
//! lr = 1e-3
//! warmup_steps = 10
//! decay = "cosine"          # "cosine" | "linear" | "constant"
//! weight_decay = 0.05
//! grad_clip_norm = 1.0
//! accumulation = 1
//!
//! [validation]
//! every = 50                # steps; 0 = never
//! batches = 4               # per task, on the validation split
//!
//! [checkpoint]
//! every = 100               # steps; 0 = only at the end of the run
//! keep = 2
//! ```
//!
//! Each task streams the request with every field's mask replaced by the task's, and the seed
//! offset by the task's index (so the tasks see samples in different orders). Each step draws
//! the task of each micro-batch from a seeded ChaCha stream whose state the checkpoint keeps;
//! with the loader cursors, the weights and AdamW's moments, that is all a run's state, so
//! resuming from a checkpoint reproduces an uninterrupted run exactly (on the CPU, where candle's
//! kernels are deterministic).
//!
//! The model computes on the CPU unless the trainer is made on another device
//! ([`Trainer::new_in`], [`Trainer::from_checkpoint_in`]; a GPU needs the `cuda` feature, see
//! [`crate::device`]). Batches are copied there as they arrive, checkpoints are loaded onto it,
//! and only the numbers the loop logs come back to the host.
//!
//! The loop awaits the stream and computes on the calling task: run it on a multi-threaded
//! tokio runtime so the client's prefetch keeps receiving while a step computes.
//!
//! # Data-parallel runs
//!
//! A trainer made with a [`Collective`] of `N > 1` ranks ([`Trainer::new_in`]) is one rank of a
//! data-parallel run: the config's request names the layout (`world_size = N`, `rank = 0`) and
//! each rank streams its own shard `rank` of it. Each step is what one process would compute on
//! the ranks' batches together: before a micro-batch's backward pass the ranks add up their
//! masked-token counts per field, so that each rank's loss is its part of the combined batch's
//! loss (a field's term is a mean over the masked tokens of the *combined* batch); after the
//! micro-batches the gradients are summed over the ranks in one all-reduce of one flat buffer,
//! and clipping and AdamW then run on the same numbers on every rank. Weights start as rank 0's;
//! the logged losses, validation included, are the combined ones. Only rank 0 shows progress and
//! writes metrics and checkpoints; a checkpoint holds every rank's loader cursors, and all ranks
//! check that their weights are still identical whenever one is written.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use atmorep_proto::client::{BatchStream, LoaderClient};
use atmorep_proto::request::{ModeName, RequestConfig, SplitName};
use atmorep_proto::{Batch, Cursor, MaskConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::batch::{FieldTensors, batch_tensors};
use crate::checkpoint::{self, Checkpoint, RngState, Snapshot, TaskCursor};
use crate::collective::{Collective, SingleProcess};
use crate::config::{ModelConfig, Prior};
use crate::error::{Error, Result, checkpoint_err, io_err, train_config_err};
use crate::loss::{gather_masked, in_units_of, masked_crps, masked_mse, prior_error_per_value};
use crate::metrics_log::{self, StepRecord};
use crate::model::{FieldInput, MultiFormer};
use crate::optim::{AdamW, Grads, OptimizerConfig, sorted_vars};

/// One self-supervised task: a masking of every field, and how often it is drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    /// Relative frequency.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// The mask of every field; left out: the request's own masks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<MaskConfig>,
}

fn default_weight() -> f64 {
    1.0
}

fn default_val_batches() -> u64 {
    4
}

/// Validation on the validation time split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate after every `every` steps; 0 = never.
    #[serde(default)]
    pub every: u64,
    /// Batches per task; always the first ones of the validation stream, so every validation
    /// sees the same samples and masks.
    #[serde(default = "default_val_batches")]
    pub batches: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            every: 0,
            batches: default_val_batches(),
        }
    }
}

fn default_keep() -> usize {
    2
}

/// When checkpoints are written (into the run's output folder) and how many are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Every `every` steps; 0 = only at the end of a run. A run always writes one at its end.
    #[serde(default)]
    pub every: u64,
    #[serde(default = "default_keep")]
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 0,
            keep: default_keep(),
        }
    }
}

/// A whole training run's configuration (see the module docs), with the model and the request
/// spelt out (a preset name or a request path is replaced when the file is read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps of the schedule.
    pub steps: u64,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelConfig,
    pub request: RequestConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskConfig>,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub validation: ValidationConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

/// The sections of a config that decide what a run computes; a checkpoint resumes only under
/// the same ones.
const IDENTITY: [&str; 6] = ["steps", "seed", "model", "request", "tasks", "optimizer"];

impl TrainConfig {
    /// `examples/train.toml`: the tiny preset on `t` and `z` at 850 and 500 hPa of the store
    /// `atmorep loader synth` writes.
    pub fn example() -> Self {
        Self::from_toml_str(include_str!("../../../examples/train.toml"), None)
            .expect("examples/train.toml is valid")
    }

    /// Reads a config file; a request path in it is relative to the file's folder.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_toml_str(&text, path.parent()).map_err(|e| match e {
            Error::TrainConfig { setting, reason } => Error::TrainConfig {
                setting,
                reason: format!("{reason} (in {})", path.display()),
            },
            other => other,
        })
    }

    /// Parses and validates a config; a request path is relative to `base` (the working folder
    /// when `None`).
    pub fn from_toml_str(text: &str, base: Option<&Path>) -> Result<Self> {
        let parse_err = |e: &dyn std::fmt::Display| train_config_err("<file>", e.to_string());
        let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_err(&e))?;
        match table.get("model") {
            Some(toml::Value::String(name)) => {
                let preset = ModelConfig::preset(name)
                    .map_err(|e| train_config_err("model", e.to_string()))?;
                let value = toml::Value::try_from(preset).expect("a model config serializes");
                table.insert("model".into(), value);
            }
            Some(toml::Value::Table(_)) => {}
            Some(_) => return Err(train_config_err("model", "a preset name or a table")),
            None => return Err(train_config_err("model", "missing")),
        }
        match table.get("request") {
            Some(toml::Value::String(path)) => {
                let path = base.unwrap_or(Path::new("")).join(path);
                let request = RequestConfig::load(&path)
                    .map_err(|e| train_config_err("request", e.to_string()))?;
                let value = toml::Value::try_from(request).expect("a request serializes");
                table.insert("request".into(), value);
            }
            Some(toml::Value::Table(_)) => {}
            Some(_) => return Err(train_config_err("request", "a file path or a table")),
            None => return Err(train_config_err("request", "missing")),
        }
        let cfg: Self = table.try_into().map_err(|e| parse_err(&e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML (what a checkpoint keeps).
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a train config always serializes")
    }

    /// The tasks; one called `request` with the request's masks when the config lists none.
    pub fn tasks(&self) -> Vec<TaskConfig> {
        if self.tasks.is_empty() {
            vec![TaskConfig {
                name: "request".into(),
                weight: 1.0,
                mask: None,
            }]
        } else {
            self.tasks.clone()
        }
    }

    /// Task `i`'s training request: the task's mask on every field, the seed offset by `i`.
    pub fn task_request(&self, i: usize) -> RequestConfig {
        let mut r = self.request.clone();
        if let Some(mask) = self.tasks().get(i).and_then(|t| t.mask) {
            for f in &mut r.fields {
                f.mask = mask;
            }
        }
        r.seed = r.seed.wrapping_add(i as u64);
        r
    }

    /// Task `i`'s validation request: its training request on the validation split, from the
    /// start.
    pub fn validation_request(&self, i: usize) -> RequestConfig {
        let mut r = self.task_request(i);
        r.split = SplitName::Validation;
        r.resume = None;
        r
    }

    /// Tokens of one sample over the model's fields.
    pub fn tokens_per_sample(&self) -> u64 {
        self.model.fields.iter().map(|f| f.num_tokens as u64).sum()
    }

    /// Rejects impossible or inconsistent settings; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        self.model
            .validate()
            .map_err(|e| train_config_err("model", e.to_string()))?;
        self.optimizer.validate()?;
        if self.steps == 0 {
            return Err(train_config_err("steps", "must be at least 1"));
        }
        let r = &self.request;
        if r.mode != ModeName::Training {
            return Err(train_config_err(
                "request.mode",
                "training needs `training`",
            ));
        }
        if r.split != SplitName::Train {
            return Err(train_config_err(
                "request.split",
                "training reads `train` (validation uses the validation split by itself)",
            ));
        }
        if let Some(end) = r.end_epoch {
            return Err(train_config_err(
                "request.end_epoch",
                format!(
                    "{end}: a training stream must not end (leave it out; `steps` ends the run)"
                ),
            ));
        }
        if r.resume.is_some() {
            return Err(train_config_err(
                "request.resume",
                "a run resumes from its checkpoint (`--resume`), not from the request",
            ));
        }
        if r.batch_size == 0 {
            return Err(train_config_err("request.batch_size", "must be at least 1"));
        }
        for (m, spec) in self.model.fields.iter().enumerate() {
            let Some(i) = r.fields.iter().position(|f| f.name == spec.name) else {
                return Err(train_config_err(
                    format!("model.fields[{m}].name"),
                    format!(
                        "`{}` is not among the request's fields {:?}",
                        spec.name,
                        r.fields.iter().map(|f| &f.name).collect::<Vec<_>>()
                    ),
                ));
            };
            let f = &r.fields[i];
            let levels = f.levels.len().max(1) as u64;
            let tokens = levels * f.num_tokens.iter().map(|&n| u64::from(n)).product::<u64>();
            let numel: u64 = f.token_size.iter().map(|&n| u64::from(n)).product();
            for (what, got, want) in [
                ("num_tokens", tokens, spec.num_tokens as u64),
                ("token_size", numel, spec.token_numel as u64),
                ("pe_width", u64::from(f.pe_width), spec.pe_width as u64),
            ] {
                if got != want {
                    return Err(train_config_err(
                        format!("request.fields[{i}].{what}"),
                        format!(
                            "field `{}` gives {got} (tokens per sample over all levels, values \
                             per token, PE width), the model's field expects {want}",
                            f.name
                        ),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return Err(train_config_err(
                    format!("tasks[{i}].name"),
                    format!("`{}` is empty or named twice", t.name),
                ));
            }
            if !(t.weight.is_finite() && t.weight > 0.0) {
                return Err(train_config_err(
                    format!("tasks[{i}].weight"),
                    format!("{} must be positive", t.weight),
                ));
            }
        }
        for (i, _) in self.tasks().iter().enumerate() {
            let req = self.task_request(i);
            let masked = req
                .fields
                .iter()
                .any(|f| self.model.field_index(&f.name).is_some() && f.mask != MaskConfig::None);
            if !masked {
                let setting = if self.tasks.is_empty() {
                    "request.fields".to_string()
                } else {
                    format!("tasks[{i}].mask")
                };
                return Err(train_config_err(
                    setting,
                    "no field of the model is masked, so there is nothing to learn",
                ));
            }
        }
        if self.checkpoint.keep == 0 {
            return Err(train_config_err("checkpoint.keep", "must be at least 1"));
        }
        if self.validation.every > 0 && self.validation.batches == 0 {
            return Err(train_config_err("validation.batches", "must be at least 1"));
        }
        Ok(())
    }

    /// The identity settings (see [`IDENTITY`]) in which `other` differs, as dotted keys.
    pub fn identity_differences(&self, other: &Self) -> Vec<String> {
        let a = toml::Table::try_from(self).expect("serializes");
        let b = toml::Table::try_from(other).expect("serializes");
        let mut out = Vec::new();
        for key in IDENTITY {
            let (x, y) = (a.get(key), b.get(key));
            if x == y {
                continue;
            }
            match (x, y) {
                (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                    let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                    keys.sort();
                    keys.dedup();
                    out.extend(
                        keys.into_iter()
                            .filter(|k| x.get(*k) != y.get(*k))
                            .map(|k| format!("{key}.{k}")),
                    );
                }
                _ => out.push(key.to_string()),
            }
        }
        out
    }
}

/// How to run: where to stop, where to write, whether to show progress.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop once this many optimizer steps have been taken in all (default: the config's
    /// `steps`). The schedule still spans the config's `steps`.
    pub stop_at: Option<u64>,
    /// Output folder for checkpoints and the metrics tables; `None`: write nothing.
    pub out: Option<PathBuf>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// One record per step of this run.
    pub steps: Vec<StepRecord>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// The metrics tables written.
    pub metrics_files: Vec<PathBuf>,
    /// Loader calls re-issued after a lost stream (training and validation streams): each is a
    /// pause in which the client reconnected and resumed from its cursor.
    pub reconnects: u64,
}

/// Mean time per step and its parts, over some steps of a run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Breakdown {
    pub steps: usize,
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub data_wait_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

impl Breakdown {
    pub fn data_wait_fraction(&self) -> f64 {
        self.data_wait_s / self.step_s.max(1e-12)
    }

    /// A few lines for a terminal.
    pub fn to_text(&self) -> String {
        let pct = |s: f64| 100.0 * s / self.step_s.max(1e-12);
        format!(
            "{:.0} tokens/s over {} steps; {:.2} ms per step: data wait {:.2} ms ({:.1}%), \
             forward {:.2} ms ({:.1}%), backward {:.2} ms ({:.1}%), optimizer {:.2} ms ({:.1}%)\n",
            self.tokens_per_s,
            self.steps,
            self.step_s * 1e3,
            self.data_wait_s * 1e3,
            pct(self.data_wait_s),
            self.forward_s * 1e3,
            pct(self.forward_s),
            self.backward_s * 1e3,
            pct(self.backward_s),
            self.optimizer_s * 1e3,
            pct(self.optimizer_s),
        )
    }
}

impl RunSummary {
    /// The training losses, step by step.
    pub fn losses(&self) -> Vec<f64> {
        self.steps.iter().map(|s| s.loss).collect()
    }

    /// Means over the steps after the first `skip` (warm-up of caches and the stream).
    pub fn breakdown(&self, skip: usize) -> Breakdown {
        let rows = &self.steps[skip.min(self.steps.len())..];
        let n = rows.len().max(1) as f64;
        let sum = |f: fn(&StepRecord) -> f64| rows.iter().map(f).sum::<f64>();
        let total = sum(|r| r.step_s);
        Breakdown {
            steps: rows.len(),
            tokens_per_s: rows.iter().map(|r| r.tokens).sum::<u64>() as f64 / total.max(1e-12),
            step_s: total / n,
            data_wait_s: sum(|r| r.data_wait_s) / n,
            forward_s: sum(|r| r.forward_s) / n,
            backward_s: sum(|r| r.backward_s) / n,
            optimizer_s: sum(|r| r.optimizer_s) / n,
        }
    }
}

/// A model, its optimizer and everything else a run's state is made of.
pub struct Trainer {
    config: TrainConfig,
    model: MultiFormer,
    varmap: VarMap,
    opt: AdamW,
    /// Draws the task of each micro-batch.
    rng: ChaCha8Rng,
    /// Per task, the cursor after the last batch consumed.
    cursors: Vec<Option<Cursor>>,
    device: Device,
    dtype: DType,
    /// The ranks of a data-parallel run; [`SingleProcess`] alone.
    collective: Box<dyn Collective>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `VarMap` has no `Debug`; the variables are listed through the optimizer.
        f.debug_struct("Trainer")
            .field("step", &self.step())
            .field("cursors", &self.cursors)
            .field("model", &self.model)
            .field("opt", &self.opt)
            .field("collective", &self.collective)
            .finish_non_exhaustive()
    }
}

/// The task-choice RNG's stream, apart from the weights' (which use one per variable name).
const TASK_RNG_STREAM: u64 = 0x7461_736b;

impl Trainer {
    /// A fresh run on the CPU: weights from the config's seed, moments at zero, streams at their
    /// start.
    pub fn new(config: TrainConfig) -> Result<Self> {
        Self::new_in(config, Box::new(SingleProcess), &Device::Cpu)
    }

    /// [`Self::new`] on `device`, as one rank of the data-parallel run of `collective` (see the
    /// module docs; [`SingleProcess`] for a run of one process). With more than one rank the
    /// config's request must name the run's layout: `world_size` the collective's, `rank` 0
    /// (each rank streams its own shard of it). The weights are drawn on the host and copied to
    /// `device`, so they start from the same bits on every device.
    pub fn new_in(
        config: TrainConfig,
        collective: Box<dyn Collective>,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let world = collective.world_size();
        if world > 1 && (config.request.world_size != world || config.request.rank != 0) {
            return Err(train_config_err(
                "request.world_size",
                format!(
                    "rank {} of world size {} in a data-parallel run of {world} ranks: the \
                     request must name the run's layout (world size {world}, rank 0)",
                    config.request.rank, config.request.world_size
                ),
            ));
        }
        let (device, dtype) = (device.clone(), DType::F32);
        let (model, varmap) = MultiFormer::seeded(&config.model, config.seed, dtype, &device)?;
        let opt = AdamW::new(&varmap, &config.optimizer)?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(TASK_RNG_STREAM);
        let cursors = vec![None; config.tasks().len()];
        Ok(Self {
            config,
            model,
            varmap,
            opt,
            rng,
            cursors,
            device,
            dtype,
            collective,
        })
    }

    /// Continues the run of `ckpt`. With `config` (e.g. from `--config`), its identity settings
    /// (model, request, tasks, optimizer, steps, seed) must equal the checkpoint's; its
    /// validation and checkpoint cadence replace the checkpoint's. The model computes on the
    /// CPU.
    pub fn from_checkpoint(ckpt: Checkpoint, config: Option<TrainConfig>) -> Result<Self> {
        Self::from_checkpoint_in(ckpt, config, Box::new(SingleProcess), &Device::Cpu)
    }

    /// [`Self::from_checkpoint`] on `device`, as one rank of the data-parallel run of
    /// `collective`: the checkpoint must come from a run of as many ranks, and this rank
    /// continues its own shard. The checkpoint's tensors are copied to `device` where they were
    /// loaded elsewhere (load them there, `checkpoint::load(path, device)`, to save the copy).
    pub fn from_checkpoint_in(
        ckpt: Checkpoint,
        config: Option<TrainConfig>,
        collective: Box<dyn Collective>,
        device: &Device,
    ) -> Result<Self> {
        let dir = ckpt.dir.clone();
        let config = match config {
            Some(given) => {
                let diff = ckpt.config.identity_differences(&given);
                if !diff.is_empty() {
                    return Err(checkpoint_err(
                        &dir.join(checkpoint::CONFIG_FILE),
                        format!(
                            "was trained with another config: it differs from the given one in {} \
                             (resume without a config to use the checkpoint's)",
                            diff.iter()
                                .map(|d| format!("`{d}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                given
            }
            None => ckpt.config.clone(),
        };
        let mut trainer = Self::new_in(config, collective, device)?;
        let model_path = dir.join(checkpoint::MODEL_FILE);
        let mut weights = ckpt.weights;
        // Every variable: the weights and the statistics the optimizer leaves alone.
        for (name, var) in &sorted_vars(&trainer.varmap) {
            let t = weights.remove(name).ok_or_else(|| {
                checkpoint_err(
                    &model_path,
                    format!("no tensor `{name}`, which the model needs"),
                )
            })?;
            if t.dims() != var.dims() {
                return Err(checkpoint_err(
                    &model_path,
                    format!(
                        "tensor `{name}` has shape {:?}, the model needs {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            // A tensor already on the device (always so on the CPU) is not copied.
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        if let Some(extra) = weights.keys().min() {
            return Err(checkpoint_err(
                &model_path,
                format!("tensor `{extra}` belongs to no variable of the model"),
            ));
        }
        let moments = ckpt
            .optimizer
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_device(&trainer.device)?)))
            .collect::<Result<_>>()?;
        trainer
            .opt
            .load_state(moments, ckpt.step)
            .map_err(|what| checkpoint_err(&dir.join(checkpoint::OPTIMIZER_FILE), what))?;
        let state_path = dir.join(checkpoint::STATE_FILE);
        let (rank, world) = (trainer.collective.rank(), trainer.collective.world_size());
        let saved_ranks = ckpt.ranks.len().max(1);
        if saved_ranks != world as usize {
            return Err(checkpoint_err(
                &state_path,
                format!(
                    "holds the loader cursors of {saved_ranks} data-parallel rank(s); it \
                     continues with {saved_ranks}, not {world}"
                ),
            ));
        }
        let mine = if ckpt.ranks.is_empty() {
            ckpt.tasks
        } else {
            ckpt.ranks
                .into_iter()
                .nth(rank as usize)
                .unwrap_or_default()
        };
        if mine.len() != trainer.cursors.len() {
            return Err(checkpoint_err(
                &state_path,
                format!(
                    "{} task cursors for rank {rank}; the config has {} tasks",
                    mine.len(),
                    trainer.cursors.len()
                ),
            ));
        }
        for (task, saved) in trainer.config.tasks().iter().zip(&mine) {
            if task.name != saved.task {
                return Err(checkpoint_err(
                    &state_path,
                    format!(
                        "a cursor for task `{}` where the config has `{}`",
                        saved.task, task.name
                    ),
                ));
            }
        }
        trainer.cursors = mine.iter().map(|t| t.cursor).collect();
        trainer.rng = ckpt
            .rng
            .restore()
            .map_err(|what| checkpoint_err(&state_path, what))?;
        Ok(trainer)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn model(&self) -> &MultiFormer {
        &self.model
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The device the model computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.opt.steps_taken()
    }

    /// Per task, the cursor after the last batch consumed.
    pub fn cursors(&self) -> &[Option<Cursor>] {
        &self.cursors
    }

    /// The collective this trainer is a rank of.
    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    /// The run's state as a checkpoint would save it (this rank's cursors only; see
    /// [`Self::save_checkpoint_all_ranks`]).
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            config: &self.config,
            step: self.step(),
            tasks: self.task_cursors(&self.cursors),
            ranks: Vec::new(),
            rng: RngState::capture(&self.rng),
            weights: sorted_vars(&self.varmap)
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect(),
            optimizer: self.opt.state_tensors(),
        }
    }

    fn task_cursors(&self, cursors: &[Option<Cursor>]) -> Vec<TaskCursor> {
        self.config
            .tasks()
            .into_iter()
            .zip(cursors)
            .map(|(t, c)| TaskCursor {
                task: t.name,
                cursor: *c,
            })
            .collect()
    }

    /// Writes a checkpoint under `out` and returns its folder.
    pub fn save_checkpoint(&self, out: &Path) -> Result<PathBuf> {
        checkpoint::save(out, &self.snapshot(), self.config.checkpoint.keep)
    }

    /// A checkpoint of a data-parallel run, called on every rank at the same step: gathers every
    /// rank's loader cursors, checks that all ranks hold the same weights, and has rank 0 write
    /// the checkpoint (its folder is returned there, `None` elsewhere). With one rank it is
    /// [`Self::save_checkpoint`].
    pub fn save_checkpoint_all_ranks(&self, out: &Path) -> Result<Option<PathBuf>> {
        let world = self.collective.world_size();
        if world == 1 {
            return self.save_checkpoint(out).map(Some);
        }
        self.check_lockstep()?;
        // Per task: present, epoch, position.
        let mine: Vec<u64> = self
            .cursors
            .iter()
            .flat_map(|c| match c {
                Some(c) => [1, c.epoch, c.position],
                None => [0, 0, 0],
            })
            .collect();
        let all = self.collective.all_gather_u64(&mine)?;
        let ranks: Vec<Vec<TaskCursor>> = all
            .chunks(mine.len().max(1))
            .map(|rank| {
                let cursors: Vec<Option<Cursor>> = rank
                    .chunks(3)
                    .map(|c| {
                        (c[0] == 1).then_some(Cursor {
                            epoch: c[1],
                            position: c[2],
                        })
                    })
                    .collect();
                self.task_cursors(&cursors)
            })
            .collect();
        if self.collective.rank() != 0 {
            return Ok(None);
        }
        let mut snap = self.snapshot();
        snap.ranks = ranks;
        checkpoint::save(out, &snap, self.config.checkpoint.keep).map(Some)
    }

    /// A fingerprint of the weights (FNV-1a over their bits, variables in name order): equal on
    /// every rank of a data-parallel run that is in lockstep.
    pub fn weights_digest(&self) -> Result<u64> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (_, var) in self.opt.vars() {
            let values = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for v in values {
                for b in v.to_bits().to_le_bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
        Ok(h)
    }

    /// Fails on every rank if the ranks' weights differ (a broken all-reduce, a rank that
    /// resumed from another checkpoint): they would go on training different models.
    fn check_lockstep(&self) -> Result<()> {
        let digests = self.collective.all_gather_u64(&[self.weights_digest()?])?;
        if digests.iter().any(|d| *d != digests[0]) {
            return Err(Error::Collective(format!(
                "the ranks' weights differ after step {} (digests by rank: {})",
                self.step(),
                digests
                    .iter()
                    .map(|d| format!("{d:016x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    /// Sets every rank's weights to rank 0's, so a data-parallel run starts from one model
    /// whatever each rank initialized or loaded.
    fn broadcast_weights(&self) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let vars = self.opt.vars();
        let flat: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let flat = self
            .collective
            .broadcast_from_root(&Tensor::cat(&flat, 0)?)?;
        let mut offset = 0;
        for (_, var) in vars {
            let n = var.elem_count();
            var.set(&flat.narrow(0, offset, n)?.reshape(var.dims())?)?;
            offset += n;
        }
        Ok(())
    }

    /// Sums the accumulated gradients over the ranks: one all-reduce of one flat buffer holding
    /// every gradient (zeros where a rank has none) and, per variable, how many ranks had one;
    /// a variable no rank had a gradient for keeps none, as in one process.
    fn all_reduce_grads(&self, acc: &mut Grads) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let vars = self.opt.vars();
        acc.0.resize(vars.len(), None);
        let mut parts = Vec::with_capacity(vars.len() + 1);
        for ((_, var), g) in vars.iter().zip(&acc.0) {
            parts.push(match g {
                Some(g) => g.flatten_all()?.to_dtype(self.dtype)?,
                None => Tensor::zeros(var.elem_count(), self.dtype, &self.device)?,
            });
        }
        let has: Vec<f32> = acc
            .0
            .iter()
            .map(|g| f32::from(u8::from(g.is_some())))
            .collect();
        parts.push(Tensor::from_vec(has, vars.len(), &self.device)?.to_dtype(self.dtype)?);
        let summed = self.collective.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
        let total: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        let had = summed
            .narrow(0, total, vars.len())?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let mut offset = 0;
        for (((_, var), g), had) in vars.iter().zip(&mut acc.0).zip(had) {
            let n = var.elem_count();
            *g = if had > 0.0 {
                Some(summed.narrow(0, offset, n)?.reshape(var.dims())?)
            } else {
                None
            };
            offset += n;
        }
        Ok(())
    }

    /// The training loss of one batch: per field with masked tokens the MSE of the ensemble
    /// mean (plus the CRPS with an ensemble), averaged over those fields.
    pub fn loss(&self, preds: &[Tensor], fields: &[FieldTensors]) -> Result<Tensor> {
        Ok(self.loss_per_field(preds, fields)?.0)
    }

    /// [`Self::loss`] and the fields' terms it averages, in the model's field order: `None` for
    /// a field without masked tokens in the batch. The values are read off the same tensor the
    /// loss sums, so the loss and its gradients are those of [`Self::loss`].
    pub fn loss_per_field(
        &self,
        preds: &[Tensor],
        fields: &[FieldTensors],
    ) -> Result<(Tensor, Vec<Option<f64>>)> {
        self.loss_of_share(preds, fields, None)
    }

    /// [`Self::loss_per_field`] as this rank's part of a batch spread over data-parallel ranks:
    /// with `share` `(weights, fields)`, each field's term is multiplied by its weight (the
    /// field's masked tokens here over those of the combined batch) and the sum divided by
    /// `fields` (the fields with masked tokens in the combined batch), so that the ranks' losses
    /// add up to the combined batch's. The returned terms are this rank's, unweighted.
    fn loss_of_share(
        &self,
        preds: &[Tensor],
        fields: &[FieldTensors],
        share: Option<(&[f64], usize)>,
    ) -> Result<(Tensor, Vec<Option<f64>>)> {
        let ensemble = self.config.model.ensemble > 1;
        let mut terms = Vec::new();
        let mut which = Vec::new();
        for (i, (p, f)) in preds.iter().zip(fields).enumerate() {
            if f.target.elem_count() == 0 {
                continue;
            }
            // Under a temporal prior, errors count in units of each value's prior error.
            let scaled = match (&f.input.prior, self.model.prior_error(i)) {
                (Some(prior), Some(error)) => Some(in_units_of(
                    p,
                    &f.target,
                    &f.masked_indices,
                    &prior_error_per_value(&prior.kind, &error.detach())?,
                )?),
                _ => None,
            };
            let (p, target) = match &scaled {
                Some((p, t)) => (p, t),
                None => (p, &f.target),
            };
            let mut l = masked_mse(p, target, &f.masked_indices)?;
            if ensemble {
                l = (l + masked_crps(p, target, &f.masked_indices)?)?;
            }
            terms.push(l);
            which.push(i);
        }
        let mut per_field = vec![None; fields.len()];
        if terms.is_empty() {
            // A batch without masked tokens: a zero that keeps the graph, all gradients zero.
            return Ok((preds[0].sum_all()?.affine(0.0, 0.0)?, per_field));
        }
        let mut n = terms.len();
        let mut stacked = Tensor::stack(&terms, 0)?;
        let values = stacked.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (&i, v) in which.iter().zip(values) {
            per_field[i] = Some(f64::from(v));
        }
        if let Some((weights, fields)) = share {
            n = fields;
            let w: Vec<f64> = which.iter().map(|&i| weights[i]).collect();
            // A whole batch (one rank) has weights of exactly 1: leave the graph as it was.
            if w.iter().any(|&w| w != 1.0) {
                let w = Tensor::new(w, &self.device)?.to_dtype(stacked.dtype())?;
                stacked = (stacked * w)?;
            }
        }
        let loss = stacked.sum_all()?.affine(1.0 / n as f64, 0.0)?;
        Ok((loss, per_field))
    }

    /// Sets each field's `prior_error` (see [`crate::tail::PRIOR_ERROR`]) to the RMS error of
    /// each kind of temporal prior on the masked values of `batches` (a fresh run's first of
    /// every task, summed over the ranks); a kind they lack keeps its value.
    fn measure_prior_error(&mut self, batches: &[Batch]) -> Result<()> {
        let k = crate::batch::PREDICTED_PRIOR_KINDS.len();
        let n_fields = self.config.model.fields.len();
        let mut sums = vec![0.0f64; 2 * k * n_fields];
        for batch in batches {
            let fields = batch_tensors(batch, &self.config.model, self.dtype, &self.device)?;
            for (f, field) in fields.iter().enumerate() {
                if let Some((sq, n)) = prior_error_sums(field)? {
                    for c in 0..k {
                        sums[2 * k * f + c] += sq[c];
                        sums[2 * k * f + k + c] += n[c];
                    }
                }
            }
        }
        self.collective.all_reduce_sum_f64(&mut sums)?;
        for f in 0..n_fields {
            let Some(error) = self.model.prior_error(f) else {
                continue;
            };
            let mut values: Vec<f64> = error.to_dtype(DType::F64)?.to_vec1()?;
            for (kind, value) in values.iter_mut().enumerate() {
                let (sq, n) = (sums[2 * k * f + kind], sums[2 * k * f + k + kind]);
                if n > 0.0 {
                    // A floor, so a prior that happens to be exact cannot divide by zero.
                    *value = (sq / n).sqrt().max(1e-6);
                }
            }
            let name = format!(
                "tail.{}.{}",
                self.config.model.fields[f].name,
                crate::tail::PRIOR_ERROR
            );
            tracing::info!(field = %self.config.model.fields[f].name, ?values, "prior error");
            self.varmap.set_one(
                &name,
                Tensor::new(values, &self.device)?.to_dtype(self.dtype)?,
            )?;
        }
        Ok(())
    }

    /// This rank's batch through the model: its part of the loss of the ranks' batches
    /// together (all of it with one rank), the fields' terms of the combined loss weighted by
    /// this rank's share (`Some(0.0)` for a field masked only on other ranks; the ranks' values
    /// add up to the combined batch's terms) and the tokens read here. Every rank calls it for
    /// its micro-batch at the same time: the ranks exchange their masked-token counts.
    fn forward_loss(&self, batch: &Batch) -> Result<(Tensor, Vec<Option<f64>>, u64)> {
        let fields = batch_tensors(batch, &self.config.model, self.dtype, &self.device)?;
        let local: Vec<f64> = fields
            .iter()
            .map(|f| {
                if f.target.elem_count() == 0 {
                    0.0
                } else {
                    f.target.dims()[0] as f64
                }
            })
            .collect();
        let mut global = local.clone();
        self.collective.all_reduce_sum_f64(&mut global)?;
        let weights: Vec<f64> = local
            .iter()
            .zip(&global)
            .map(|(l, g)| if *l > 0.0 { l / g } else { 0.0 })
            .collect();
        let masked = global.iter().filter(|g| **g > 0.0).count();

        let inputs: Vec<FieldInput> = fields.iter().map(|f| f.input.clone()).collect();
        let preds = self.model.forward(&inputs)?;
        let tokens = batch.len() as u64 * self.config.tokens_per_sample();
        let (loss, terms) = self.loss_of_share(&preds, &fields, Some((&weights, masked)))?;
        let shares = terms
            .iter()
            .zip(&weights)
            .zip(&global)
            .map(|((t, w), g)| match t {
                // Exactly the term with one rank (w = 1).
                Some(t) => Some(if *w == 1.0 { *t } else { t * w }),
                None => (*g > 0.0).then_some(0.0),
            })
            .collect();
        Ok((loss, shares, tokens))
    }

    /// `request` as this rank streams it: its own shard of a data-parallel run's layout.
    fn shard(&self, mut request: RequestConfig) -> RequestConfig {
        if self.collective.world_size() > 1 {
            request.rank = self.collective.rank();
        }
        request
    }

    fn pick_task(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }

    /// Trains until `opts.stop_at` (or the config's `steps`), pulling batches from `client`.
    pub async fn run(&mut self, client: &LoaderClient, opts: &RunOptions) -> Result<RunSummary> {
        let stop = opts.stop_at.unwrap_or(self.config.steps);
        let tasks = self.config.tasks();
        let weights: Vec<f64> = tasks.iter().map(|t| t.weight).collect();
        // One HTTP/2 connection per stream. A stream the loop is not reading keeps up to its
        // flow-control window of batches in the transport, and streams on one connection share
        // the connection's window: two idle task streams of small batches filled it and the
        // validation stream, opened on the same connection, never received a byte.
        let mut streams = Vec::with_capacity(tasks.len());
        for i in 0..tasks.len() {
            let mut r = self.shard(self.config.task_request(i));
            r.resume = self.cursors[i];
            streams.push(own_connection(client).await?.stream(r.to_proto()));
        }
        if self.step() == 0 && self.config.model.prior == Prior::Temporal {
            // The first batch of every task, on streams of their own: the run's streams and
            // cursors stay as they were.
            let mut first = Vec::with_capacity(tasks.len());
            for (i, task) in tasks.iter().enumerate() {
                let r = self.shard(self.config.task_request(i));
                let mut stream = own_connection(client).await?.stream(r.to_proto());
                first.push(next_batch(&mut stream, &task.name, &mut 0).await?);
            }
            self.measure_prior_error(&first)?;
        }
        let validation_client = own_connection(client).await?;
        let mut delivered = vec![0u64; tasks.len()];
        self.broadcast_weights()?;
        let root = self.collective.rank() == 0;
        let bar = progress_bar(opts.progress && root, self.step(), stop);
        let mut summary = RunSummary::default();
        let mut unwritten: Vec<StepRecord> = Vec::new();
        let accumulation = self.config.optimizer.accumulation;
        let mut saved_at = None;
        // Reconnects of the validation streams, which end with each validation.
        let mut validation_reconnects = 0;

        while self.step() < stop {
            let started = Instant::now();
            let step = self.step();
            let lr = self.config.optimizer.lr_at(step, self.config.steps);
            let mut acc = Grads::default();
            let mut record = StepRecord {
                step: step + 1,
                tasks: String::new(),
                loss: 0.0,
                lr,
                grad_norm: 0.0,
                tokens: 0,
                step_s: 0.0,
                data_wait_s: 0.0,
                forward_s: 0.0,
                backward_s: 0.0,
                optimizer_s: 0.0,
                val_loss: None,
                field_losses: Vec::new(),
                val_field_losses: Vec::new(),
            };
            let mut names = Vec::with_capacity(accumulation);
            let mut per_field = FieldMeans::new(self.config.model.fields.len());
            for _ in 0..accumulation {
                let task = self.pick_task(&weights);
                names.push(tasks[task].name.as_str());
                let t = Instant::now();
                let batch =
                    next_batch(&mut streams[task], &tasks[task].name, &mut delivered[task]).await?;
                record.data_wait_s += t.elapsed().as_secs_f64();

                let t = Instant::now();
                let (loss, fields, tokens) = self.forward_loss(&batch)?;
                record.loss += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                per_field.add(&fields);
                record.tokens += tokens;
                record.forward_s += t.elapsed().as_secs_f64();

                let t = Instant::now();
                let store = loss.backward()?;
                acc.accumulate(Grads::from_store(
                    &store,
                    self.opt.vars(),
                    1.0 / accumulation as f64,
                )?)?;
                record.backward_s += t.elapsed().as_secs_f64();
                self.cursors[task] = Some(batch.cursor_after);
                streams[task].recycle(batch);
            }
            // The combined batch's loss, terms and tokens: the ranks' parts add up to them.
            let mut sums = vec![record.loss, record.tokens as f64];
            sums.extend(per_field.0.iter().map(|(sum, _)| *sum));
            self.collective.all_reduce_sum_f64(&mut sums)?;
            record.loss = sums[0] / accumulation as f64;
            record.tokens = sums[1] as u64;
            for (acc, sum) in per_field.0.iter_mut().zip(&sums[2..]) {
                acc.0 = *sum;
            }
            record.field_losses = per_field.means(&self.config.model);
            record.tasks = names.join("+");

            let t = Instant::now();
            self.all_reduce_grads(&mut acc)?;
            record.grad_norm = acc.clip(self.config.optimizer.grad_clip_norm)?;
            self.opt.step(&acc, lr)?;
            record.optimizer_s = t.elapsed().as_secs_f64();
            record.step_s = started.elapsed().as_secs_f64();

            let done = self.step();
            let every = self.config.validation.every;
            if every > 0 && done.is_multiple_of(every) {
                let (v, reconnects) = self.validate_counting(&validation_client).await?;
                validation_reconnects += reconnects;
                record.val_loss = Some(v.loss);
                record.val_field_losses = v.fields;
            }
            record.record();
            let reconnects =
                validation_reconnects + streams.iter().map(BatchStream::reconnects).sum::<u64>();
            if reconnects > summary.reconnects {
                // The client logs each failed call; the counter says the run went on past them.
                metrics::counter!("atmorep_train_loader_reconnects_total")
                    .increment(reconnects - summary.reconnects);
                summary.reconnects = reconnects;
            }
            bar.set_position(done);
            bar.set_message(format!(
                "loss {:.4} · {:.0} tok/s · data wait {:.1}%{}",
                record.loss,
                record.tokens_per_s(),
                100.0 * record.data_wait_fraction(),
                record
                    .val_loss
                    .map(|v| format!(" · val {v:.4}"))
                    .unwrap_or_default()
            ));
            summary.steps.push(record.clone());
            unwritten.push(record);

            let every = self.config.checkpoint.every;
            if let Some(out) = &opts.out
                && ((every > 0 && done.is_multiple_of(every)) || done == stop)
            {
                summary.checkpoint = self.save_checkpoint_all_ranks(out)?;
                if root {
                    summary
                        .metrics_files
                        .extend(metrics_log::write_steps(out, &unwritten)?);
                }
                unwritten.clear();
                saved_at = Some(done);
            }
        }
        if let Some(out) = &opts.out
            && saved_at != Some(self.step())
        {
            // Nothing to train (already at `stop`): still leave a checkpoint of where it stands.
            summary.checkpoint = self.save_checkpoint_all_ranks(out)?;
            if root {
                summary
                    .metrics_files
                    .extend(metrics_log::write_steps(out, &unwritten)?);
            }
        }
        bar.finish_and_clear();
        Ok(summary)
    }

    /// The mean loss over the first `validation.batches` batches of every task's validation
    /// stream (the same batches every time). Touches no state of the run. Give it a client
    /// whose connection carries no other stream that is not being read (see [`Self::run`]).
    pub async fn validate(&self, client: &LoaderClient) -> Result<f64> {
        Ok(self.validate_per_field(client).await?.loss)
    }

    /// [`Self::validate`], with each field's loss: the mean of its terms over the validation
    /// batches in which it had masked tokens.
    pub async fn validate_per_field(&self, client: &LoaderClient) -> Result<Validation> {
        Ok(self.validate_counting(client).await?.0)
    }

    /// [`Self::validate_per_field`] and the reconnects its streams needed.
    async fn validate_counting(&self, client: &LoaderClient) -> Result<(Validation, u64)> {
        let mut reconnects = 0;
        let mut sum = 0.0;
        let mut n = 0u64;
        let mut per_field = FieldMeans::new(self.config.model.fields.len());
        for (i, task) in self.config.tasks().iter().enumerate() {
            let request = self.shard(self.config.validation_request(i));
            let mut stream = client.stream(request.to_proto());
            let what = format!("validation `{}`", task.name);
            let mut delivered = 0;
            for _ in 0..self.config.validation.batches {
                let batch = next_batch(&mut stream, &what, &mut delivered).await?;
                let (loss, fields, _) = self.forward_loss(&batch)?;
                stream.recycle(batch);
                sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                per_field.add(&fields);
                n += 1;
            }
            reconnects += stream.reconnects();
        }
        // The ranks' parts of each combined batch's loss and terms add up to them.
        let mut sums = vec![sum];
        sums.extend(per_field.0.iter().map(|(s, _)| *s));
        self.collective.all_reduce_sum_f64(&mut sums)?;
        sum = sums[0];
        for (acc, s) in per_field.0.iter_mut().zip(&sums[1..]) {
            acc.0 = *s;
        }
        let validation = Validation {
            loss: sum / n.max(1) as f64,
            fields: per_field.means(&self.config.model),
        };
        Ok((validation, reconnects))
    }
}

/// What a validation measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Validation {
    /// The mean loss over the validation batches.
    pub loss: f64,
    /// Per field with masked tokens in some batch, in the model's field order, the mean of its
    /// loss terms over those batches.
    pub fields: Vec<(String, f64)>,
}

/// Per field, the sum and count of its loss terms over some batches.
struct FieldMeans(Vec<(f64, u64)>);

impl FieldMeans {
    fn new(fields: usize) -> Self {
        Self(vec![(0.0, 0); fields])
    }

    fn add(&mut self, terms: &[Option<f64>]) {
        for (acc, t) in self.0.iter_mut().zip(terms) {
            if let Some(v) = t {
                acc.0 += v;
                acc.1 += 1;
            }
        }
    }

    /// `(name, mean)` of the fields with at least one term, in the model's order.
    fn means(&self, model: &ModelConfig) -> Vec<(String, f64)> {
        model
            .fields
            .iter()
            .zip(&self.0)
            .filter(|(_, (_, n))| *n > 0)
            .map(|(f, (sum, n))| (f.name.clone(), sum / *n as f64))
            .collect()
    }
}

/// Per kind of temporal prior, the sum of squared errors of the prior on `field`'s masked
/// values and how many there are; `None` without a prior.
fn prior_error_sums(field: &FieldTensors) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
    let Some(prior) = &field.input.prior else {
        return Ok(None);
    };
    let k = prior.kind.dim(3)?;
    if field.target.elem_count() == 0 {
        return Ok(Some((vec![0.0; k], vec![0.0; k])));
    }
    // Gathered as predictions are, [B, T, E, V] → [M, E, V]: the values with E = 1, the kinds
    // with each value's K channels side by side in the last axis.
    let (b, n, v, _) = prior.kind.dims4()?;
    let values = gather_masked(&prior.values.unsqueeze(2)?, &field.masked_indices)?.squeeze(1)?;
    let kind = gather_masked(
        &prior.kind.reshape((b, n, 1, v * k))?,
        &field.masked_indices,
    )?
    .reshape(((), v, k))?;
    let sq = (&field.target - &values)?.sqr()?.unsqueeze(2)?;
    let to_vec = |t: Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    let sums = to_vec(kind.broadcast_mul(&sq)?.sum((0, 1))?)?;
    let counts = to_vec(kind.sum((0, 1))?)?;
    Ok(Some((sums, counts)))
}

/// A client like `client` on a connection of its own.
async fn own_connection(client: &LoaderClient) -> Result<LoaderClient> {
    Ok(LoaderClient::connect(client.config().clone()).await?)
}

/// The next batch with samples (a finite stream's closing message may have none).
async fn next_batch(stream: &mut BatchStream, what: &str, delivered: &mut u64) -> Result<Batch> {
    loop {
        match stream.next().await {
            Some(Ok(batch)) if batch.is_empty() && !batch.end_of_stream => continue,
            Some(Ok(batch)) if batch.is_empty() => break,
            Some(Ok(batch)) => {
                *delivered += 1;
                return Ok(batch);
            }
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    Err(Error::StreamEnded {
        what: what.to_string(),
        batches: *delivered,
    })
}

fn progress_bar(show: bool, pos: u64, len: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_position(pos);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps · {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_valid_and_round_trips() {
        let cfg = TrainConfig::example();
        assert_eq!(cfg.model, ModelConfig::tiny());
        assert_eq!(cfg.tasks().len(), 2);
        let again = TrainConfig::from_toml_str(&cfg.to_toml_string(), None).unwrap();
        assert_eq!(again, cfg);
        assert!(cfg.identity_differences(&again).is_empty());
        // The tasks stream the request with their masks and their own seeds.
        let (a, b) = (cfg.task_request(0), cfg.task_request(1));
        assert_ne!(a.fields[0].mask, b.fields[0].mask);
        assert_eq!(b.seed, a.seed + 1);
        assert_eq!(cfg.validation_request(1).split, SplitName::Validation);
    }

    #[test]
    fn a_request_path_is_read_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrainConfig::example();
        // The BERT task's request: masks of its own, so the run needs no tasks.
        let request = cfg.task_request(0);
        std::fs::write(
            dir.path().join("req.toml"),
            toml::to_string(&request).unwrap(),
        )
        .unwrap();
        let text = "steps = 5\nmodel = \"tiny\"\nrequest = \"req.toml\"\n";
        let path = dir.path().join("train.toml");
        std::fs::write(&path, text).unwrap();
        let loaded = TrainConfig::from_toml_file(&path).unwrap();
        assert_eq!(loaded.request, request);
        assert!(loaded.tasks.is_empty());
        let e = TrainConfig::from_toml_str(text, Some(Path::new("/nonexistent")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("request"), "{e}");
    }

    #[test]
    fn bad_configs_name_the_setting() {
        let base = TrainConfig::example();
        type Edit = Box<dyn Fn(&mut TrainConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("steps", Box::new(|c| c.steps = 0)),
            ("optimizer.lr", Box::new(|c| c.optimizer.lr = -1.0)),
            (
                "request.fields[0].num_tokens",
                Box::new(|c| c.request.fields[0].num_tokens[0] = 3),
            ),
            (
                "request.fields[1].token_size",
                Box::new(|c| c.request.fields[1].token_size[2] = 5),
            ),
            (
                "request.fields[0].pe_width",
                Box::new(|c| c.request.fields[0].pe_width = 16),
            ),
            (
                "model.fields[1].name",
                Box::new(|c| c.request.fields[1].name = "q".into()),
            ),
            (
                "request.end_epoch",
                Box::new(|c| c.request.end_epoch = Some(3)),
            ),
            (
                "request.split",
                Box::new(|c| c.request.split = SplitName::Test),
            ),
            (
                "tasks[1].name",
                Box::new(|c| c.tasks[1].name = c.tasks[0].name.clone()),
            ),
            ("tasks[0].weight", Box::new(|c| c.tasks[0].weight = 0.0)),
            (
                "tasks[0].mask",
                Box::new(|c| c.tasks[0].mask = Some(MaskConfig::None)),
            ),
            ("model", Box::new(|c| c.model.num_heads = 3)),
            ("checkpoint.keep", Box::new(|c| c.checkpoint.keep = 0)),
        ];
        for (setting, edit) in cases {
            let mut cfg = base.clone();
            edit(&mut cfg);
            match cfg.validate().unwrap_err() {
                Error::TrainConfig { setting: s, reason } => {
                    assert_eq!(s, setting, "{reason}")
                }
                other => panic!("{setting}: {other}"),
            }
        }
        let e = TrainConfig::from_toml_str("steps = 1\nmodel = \"huge\"\nrequest = \"x\"", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model") && e.contains("huge"), "{e}");
    }

    #[test]
    fn identity_differences_are_dotted_keys() {
        let a = TrainConfig::example();
        let mut b = a.clone();
        b.optimizer.lr *= 2.0;
        b.model.d_model = 64;
        b.validation.every = 99;
        assert_eq!(
            a.identity_differences(&b),
            ["model.d_model", "optimizer.lr"]
        );
    }

    #[test]
    fn the_loss_is_the_mean_of_the_masked_fields_terms() {
        let trainer = Trainer::new(TrainConfig::example()).unwrap();
        let model = &trainer.config().model;
        let (t, v, e) = (
            model.fields[0].num_tokens,
            model.fields[0].token_numel,
            model.ensemble,
        );
        let dev = Device::Cpu;
        let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &dev).unwrap();
        // Predictions of zero; a field's masked tokens all hold `value`, so its MSE is value².
        let field = |masked: Vec<u32>, value: f32| FieldTensors {
            input: FieldInput {
                source: zeros(&[1, t, v]),
                token_info: zeros(&[1, t, 8]),
                pe: zeros(&[1, t, 1]),
                prior: None,
            },
            target: Tensor::full(value, (masked.len(), v), &dev).unwrap(),
            masked_indices: vec![masked],
        };
        let preds = vec![zeros(&[1, t, e, v]); model.fields.len()];
        let scalar = |l: &Tensor| l.to_scalar::<f32>().unwrap();

        let fields = vec![field(vec![0, 3], 2.0), field(vec![], 1.0)];
        let (loss, terms) = trainer.loss_per_field(&preds, &fields).unwrap();
        assert_eq!(terms, [Some(4.0), None]);
        assert_eq!(scalar(&loss), 4.0);
        assert_eq!(scalar(&trainer.loss(&preds, &fields).unwrap()), 4.0);

        let fields = vec![field(vec![1], 2.0), field(vec![0, 2], 1.0)];
        let (loss, terms) = trainer.loss_per_field(&preds, &fields).unwrap();
        assert_eq!(terms, [Some(4.0), Some(1.0)]);
        assert_eq!(scalar(&loss), 2.5);

        // No field masked: a zero loss and no terms.
        let fields = vec![field(vec![], 2.0), field(vec![], 1.0)];
        let (loss, terms) = trainer.loss_per_field(&preds, &fields).unwrap();
        assert_eq!(terms, [None, None]);
        assert_eq!(scalar(&loss), 0.0);

        let mut means = FieldMeans::new(2);
        means.add(&[Some(1.0), None]);
        means.add(&[Some(3.0), Some(5.0)]);
        means.add(&[None, None]);
        let names: Vec<_> = model.fields.iter().map(|f| f.name.clone()).collect();
        assert_eq!(
            means.means(model),
            [(names[0].clone(), 2.0), (names[1].clone(), 5.0)]
        );
        assert!(FieldMeans::new(2).means(model).is_empty());
    }

    /// A run's first batches set each field's `prior_error` to the RMS error of each kind of
    /// prior on its masked values (computed here value by value), the optimizer never touches
    /// it, and the loss then counts errors in its units.
    #[test]
    fn the_first_batch_measures_each_fields_prior_error() {
        let mut config = TrainConfig::example();
        // Per level 4 times × 2 latitudes (tokens (level, t, lat) in that order).
        config.model = config.model.with_temporal_prior([4, 2, 1]);
        let mut trainer = Trainer::new(config).unwrap();
        assert!(
            trainer
                .opt
                .vars()
                .iter()
                .all(|(name, _)| !name.ends_with(crate::tail::PRIOR_ERROR))
        );
        let model = trainer.config().model.clone();
        let b = 2;
        // Sample 0: token 2 between visible times (interpolated), 8 and 10 before the visible
        // 12 (one-sided); sample 1: 1, 3, 5, 7 every time of their point (climatology), and 12.
        let masked: Vec<Vec<u32>> = vec![vec![2, 8, 10], vec![1, 3, 5, 7, 12]];
        let fields: Vec<atmorep_proto::FieldBatch> = model
            .fields
            .iter()
            .enumerate()
            .map(|(f, spec)| {
                let (n, v) = (spec.num_tokens, spec.token_numel);
                let truth =
                    |i: usize| ((i * 7 + f * 3) % 11) as f32 * 0.1 + (i as f32 * 0.37).sin();
                let mut source: Vec<f32> = (0..b * n * v).map(truth).collect();
                let mut target = Vec::new();
                for (s, tokens) in masked.iter().enumerate() {
                    for &k in tokens {
                        let at = (s * n + k as usize) * v;
                        target.extend_from_slice(&source[at..at + v]);
                        source[at..at + v].fill(0.0);
                    }
                }
                atmorep_proto::FieldBatch {
                    name: spec.name.clone(),
                    source,
                    source_shape: [b, n, v],
                    target,
                    masked_indices: masked.clone(),
                    token_info: vec![2000.0; b * n * 8],
                    pe: vec![0.0; b * n * spec.pe_width],
                    pe_width: spec.pe_width,
                    windows: vec![
                        atmorep_proto::Window {
                            time_start: 0,
                            lat_start: 0,
                            lon_start: 0,
                            size: [4, 6, 4],
                        };
                        b
                    ],
                }
            })
            .collect();
        let batch = Batch {
            sample_ids: vec![0, 1],
            sample_epochs: vec![0, 0],
            fields,
            ..Default::default()
        };
        // Twice the same batch: sums over batches leave each RMS as it is.
        trainer
            .measure_prior_error(&[batch.clone(), batch.clone()])
            .unwrap();

        let tensors = batch_tensors(&batch, &model, DType::F32, &Device::Cpu).unwrap();
        let mut seen = [false; 3];
        for (f, (field, spec)) in tensors.iter().zip(&model.fields).enumerate() {
            let prior = field.input.prior.as_ref().unwrap();
            let values: Vec<Vec<Vec<f32>>> = prior.values.to_vec3().unwrap();
            let kind: Vec<f32> = prior.kind.flatten_all().unwrap().to_vec1().unwrap();
            let target: Vec<Vec<f32>> = field.target.to_vec2().unwrap();
            let (n, v) = (spec.num_tokens, spec.token_numel);
            let (mut sq, mut count) = ([0f64; 3], [0f64; 3]);
            let mut row = 0;
            for (s, tokens) in masked.iter().enumerate() {
                for &k in tokens {
                    let k = k as usize;
                    for j in 0..v {
                        let c = (0..3)
                            .find(|&c| kind[((s * n + k) * v + j) * 3 + c] == 1.0)
                            .expect("a masked value has a kind of prior");
                        let e = f64::from(target[row][j] - values[s][k][j]);
                        sq[c] += e * e;
                        count[c] += 1.0;
                    }
                    row += 1;
                }
            }
            let got: Vec<f32> = trainer.model().prior_error(f).unwrap().to_vec1().unwrap();
            for c in 0..3 {
                let want = if count[c] > 0.0 {
                    seen[c] = true;
                    (sq[c] / count[c]).sqrt().max(1e-6) as f32
                } else {
                    crate::tail::PRIOR_ERROR_DEFAULT[c] as f32
                };
                assert!(
                    (got[c] - want).abs() <= 1e-5 * want.max(1.0),
                    "field {f} kind {c}: {} vs {want}",
                    got[c]
                );
            }
        }
        assert!(seen.iter().all(|&s| s), "every kind occurs: {seen:?}");

        // The loss is the MSE in units of the measured errors: a prediction of the prior
        // itself scores (Σ_k n_k) / (values) = 1 per field.
        let preds: Vec<Tensor> = tensors
            .iter()
            .map(|f| f.input.prior.as_ref().unwrap().values.unsqueeze(2).unwrap())
            .collect();
        let (_, terms) = trainer.loss_per_field(&preds, &tensors).unwrap();
        for t in terms {
            assert!((t.unwrap() - 1.0).abs() < 1e-4, "{t:?}");
        }
    }

    #[test]
    fn checkpoint_weights_must_fit_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let trainer = Trainer::new(TrainConfig::example()).unwrap();
        trainer.save_checkpoint(dir.path()).unwrap();

        // Resumes as saved.
        let ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        let back = Trainer::from_checkpoint(ckpt, None).unwrap();
        assert_eq!(back.step(), 0);

        // Another config: named.
        let mut other = TrainConfig::example();
        other.optimizer.weight_decay = 0.1;
        let ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        let e = Trainer::from_checkpoint(ckpt, Some(other))
            .unwrap_err()
            .to_string();
        assert!(e.contains("optimizer.weight_decay"), "{e}");

        // A tensor of the wrong shape, a missing one, an unknown one.
        let model_path = dir
            .path()
            .join("checkpoints/step-00000000")
            .join(checkpoint::MODEL_FILE);
        let mut ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        let name = ckpt.weights.keys().min().unwrap().clone();
        ckpt.weights.insert(
            name.clone(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = Trainer::from_checkpoint(ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name) && e.contains("[7]"), "{e}");
        assert!(e.contains(&model_path.display().to_string()), "{e}");
        let mut ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        ckpt.weights.remove(&name);
        let e = Trainer::from_checkpoint(ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name) && e.contains("no tensor"), "{e}");
        let mut ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        ckpt.weights.insert(
            "bogus".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = Trainer::from_checkpoint(ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`bogus`"), "{e}");
        let mut ckpt = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
        ckpt.optimizer.remove(&format!("v.{name}"));
        let e = Trainer::from_checkpoint(ckpt, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(checkpoint::OPTIMIZER_FILE) && e.contains(&format!("v.{name}")),
            "{e}"
        );
    }
}
