//! Ablation studies (docs/design.md §4, the seed's second half): how the model uses the external
//! information of each token (year, month, hour, latitude, longitude), its positional
//! encoding, and blurred against raw data.
//!
//! An [`AblationConfig`] (TOML) names a base training config and the studies to run; it expands
//! into [`Variant`]s, each the base config with one setting changed. Every variant trains from
//! the same seed on the same stream (same samples, same masks: the loader's choices are pure
//! functions of the request seed), for the same number of steps, and is then scored on the
//! same test batches with [`crate::eval`] — masked-token RMSE per field in physical units,
//! beside the baselines on exactly the same values. Those values are the raw fields for every
//! variant: a variant trained on blurred data gets blurred inputs but is scored on unblurred
//! targets. Each variant is trained from `seeds` model seeds (3 by default: the base config's
//! seed and the next ones; the stream is the same), and the table gives the mean ± standard
//! deviation over them.
//!
//! ```toml
//! base = "train.toml"         # a training config file (relative to this file) or a [base] table
//! steps = 300                 # per variant (default: the base config's `steps`)
//! studies = ["aux-info", "positional-encoding", "blur"]
//! blur_sigma = 1.0            # grid points, for the blur study
//!
//! [[variants]]                # optional extra variants, each changing any of the three
//! name = "class-token+standard"
//! aux_info = "class-token"
//! pe = "standard"
//!
//! seeds = 3                   # model seeds per variant (default 3)
//!
//! [eval]
//! split = "test"
//! batches = 4                 # per task
//! ```
//!
//! The first variant is always `base` itself; a study adds every alternative the base does not
//! already use. The report ([`AblationReport`]) holds what is the same on every machine and
//! every run — losses and errors, never timings — so two runs give the same table.

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::Float64Builder;
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow_schema::{DataType as ArrowType, Field, Schema};
use atmorep_proto::PeMode;
use atmorep_proto::request::SplitName;
use serde::{Deserialize, Serialize};

use crate::config::AuxInfo;
use crate::error::{Result, train_config_err};
use crate::eval::{Baseline, EvalRow, eval_row_columns, parquet_err, write_record_batch};
use crate::toml_file::read_toml;
use crate::train::TrainConfig;

/// A family of variants: every alternative of one setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Study {
    /// The five ways the token info enters the model ([`AuxInfo`]).
    AuxInfo,
    /// The five positional encodings the loader computes ([`PeMode`]), on every field.
    PositionalEncoding,
    /// Blurred (`blur_sigma`) against raw data.
    Blur,
}

/// One setting changed from the base config; `None` keeps the base's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_info: Option<AuxInfo>,
    /// The positional encoding of every field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pe: Option<PeMode>,
    /// The Gaussian blur of every field, in grid points (0 = raw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blur_sigma: Option<f64>,
    /// Ensemble members of the model's tail (trained with the CRPS besides the MSE of their
    /// mean, scored with the CRPS and the spread–skill ratio besides the RMSE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<usize>,
}

impl Variant {
    /// The base config with this variant's settings.
    pub fn apply(&self, base: &TrainConfig) -> Result<TrainConfig> {
        if let Some(sigma) = self.blur_sigma
            && !(sigma.is_finite() && sigma >= 0.0)
        {
            return Err(train_config_err(
                format!("variants.{}.blur_sigma", self.name),
                format!("{sigma} must be finite and at least 0"),
            ));
        }
        if self.ensemble == Some(0) {
            return Err(train_config_err(
                format!("variants.{}.ensemble", self.name),
                "must be at least 1 member",
            ));
        }
        let mut cfg = base.clone();
        if let Some(members) = self.ensemble {
            cfg.model.ensemble = members;
        }
        if let Some(aux) = self.aux_info {
            cfg.model.aux_info = aux;
        }
        for f in &mut cfg.request.fields {
            if let Some(pe) = self.pe {
                f.pe = pe;
            }
            if let Some(sigma) = self.blur_sigma {
                f.blur_sigma = sigma;
            }
        }
        cfg.validate()
            .map_err(|e| train_config_err(format!("variants.{}", self.name), e.to_string()))?;
        Ok(cfg)
    }
}

/// What the variants are scored on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationEval {
    #[serde(default = "default_split")]
    pub split: SplitName,
    /// Batches per task.
    #[serde(default = "default_eval_batches")]
    pub batches: u64,
}

fn default_split() -> SplitName {
    SplitName::Test
}

fn default_eval_batches() -> u64 {
    4
}

impl Default for AblationEval {
    fn default() -> Self {
        Self {
            split: default_split(),
            batches: default_eval_batches(),
        }
    }
}

fn default_blur_sigma() -> f64 {
    1.0
}

fn default_seeds() -> u64 {
    3
}

/// A whole ablation (see the module docs), with the base config read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationConfig {
    pub base: TrainConfig,
    /// Optimizer steps per variant; the base config's `steps` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    #[serde(default)]
    pub studies: Vec<Study>,
    #[serde(default = "default_blur_sigma")]
    pub blur_sigma: f64,
    #[serde(default)]
    pub variants: Vec<Variant>,
    /// Model seeds per variant: the base config's `seed` and the next `seeds − 1`.
    #[serde(default = "default_seeds")]
    pub seeds: u64,
    #[serde(default)]
    pub eval: AblationEval,
}

impl AblationConfig {
    /// Reads a config file; a base config path in it is relative to the file's folder.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        read_toml(path, Self::from_toml_str)
    }

    /// Parses and validates a config; a base config path is relative to `dir`.
    pub fn from_toml_str(text: &str, dir: Option<&Path>) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| train_config_err("<ablation file>", e.to_string()))?;
        let base = match table.remove("base") {
            Some(toml::Value::String(path)) => {
                TrainConfig::from_toml_file(&dir.unwrap_or(Path::new("")).join(path))?
            }
            Some(toml::Value::Table(t)) => {
                let text = toml::to_string(&t).expect("a TOML table serializes");
                TrainConfig::from_toml_str(&text, dir)?
            }
            Some(_) => return Err(train_config_err("base", "a file path or a table")),
            None => return Err(train_config_err("base", "missing")),
        };
        table.insert(
            "base".into(),
            toml::Value::try_from(&base).expect("a train config serializes"),
        );
        let cfg: Self = table
            .try_into()
            .map_err(|e: toml::de::Error| train_config_err("<ablation file>", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects what cannot run; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        if self.steps == Some(0) {
            return Err(train_config_err("steps", "must be at least 1"));
        }
        if !(self.blur_sigma.is_finite() && self.blur_sigma > 0.0) {
            return Err(train_config_err(
                "blur_sigma",
                format!("{} must be positive and finite", self.blur_sigma),
            ));
        }
        if self.eval.batches == 0 {
            return Err(train_config_err("eval.batches", "must be at least 1"));
        }
        if self.seeds == 0 {
            return Err(train_config_err("seeds", "must be at least 1"));
        }
        let variants = self.expand();
        if variants.len() < 2 {
            return Err(train_config_err(
                "studies",
                "no variant besides the base: name a study or a [[variants]] table",
            ));
        }
        for (i, v) in variants.iter().enumerate() {
            if let Some(j) = variants[..i].iter().position(|w| w.name == v.name) {
                return Err(train_config_err(
                    format!("variants.{}", v.name),
                    format!("the name is used twice (variants {j} and {i})"),
                ));
            }
            self.variant_config(v)?;
        }
        Ok(())
    }

    /// Every variant, `base` first, then the studies' alternatives, then the explicit ones.
    pub fn expand(&self) -> Vec<Variant> {
        let none = |name: String| Variant {
            name,
            aux_info: None,
            pe: None,
            blur_sigma: None,
            ensemble: None,
        };
        let mut out = vec![none("base".into())];
        let base_blur = self.base.request.fields.first().map(|f| f.blur_sigma);
        for study in &self.studies {
            match study {
                Study::AuxInfo => {
                    for aux in AuxInfo::ALL {
                        if aux != self.base.model.aux_info {
                            out.push(Variant {
                                aux_info: Some(aux),
                                ..none(format!("aux={aux}"))
                            });
                        }
                    }
                }
                Study::PositionalEncoding => {
                    for pe in PeMode::ALL {
                        let uniform = self.base.request.fields.iter().all(|f| f.pe == pe);
                        if !uniform {
                            out.push(Variant {
                                pe: Some(pe),
                                ..none(format!("pe={}", pe.as_str()))
                            });
                        }
                    }
                }
                Study::Blur => {
                    // A blurred base is compared with raw data, a raw base with blurred data.
                    let sigma = if base_blur.unwrap_or(0.0) > 0.0 {
                        0.0
                    } else {
                        self.blur_sigma
                    };
                    out.push(Variant {
                        blur_sigma: Some(sigma),
                        ..none(format!("blur={sigma}"))
                    });
                }
            }
        }
        out.extend(self.variants.iter().cloned());
        out
    }

    /// The training config of `variant`: the base with its settings and the ablation's steps.
    pub fn variant_config(&self, variant: &Variant) -> Result<TrainConfig> {
        let mut cfg = variant.apply(&self.base)?;
        if let Some(steps) = self.steps {
            cfg.steps = steps;
        }
        Ok(cfg)
    }

    /// [`Self::variant_config`] with the `k`-th model seed (`k < seeds`): the base's seed + k.
    pub fn seeded_config(&self, variant: &Variant, k: u64) -> Result<TrainConfig> {
        let mut cfg = self.variant_config(variant)?;
        cfg.seed = self.base.seed.wrapping_add(k);
        Ok(cfg)
    }
}

/// What one variant's run and evaluation gave.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantResult {
    pub name: String,
    pub aux_info: AuxInfo,
    /// The fields' positional encoding (`mixed` when they differ).
    pub pe: String,
    pub blur_sigma: f64,
    /// Ensemble members (1: none).
    pub ensemble: usize,
    /// `(step, training loss)` of every step.
    pub losses: Vec<(u64, f64)>,
    /// `(step, validation loss)` wherever validation ran, the final one included.
    pub val_losses: Vec<(u64, f64)>,
    /// The evaluation's rows (every task, field, level and baseline).
    pub eval: Vec<EvalRow>,
    /// The model seed of the run above.
    pub seed: u64,
    /// The runs from the other seeds (the losses above are the first seed's).
    pub other_seeds: Vec<SeedRun>,
}

/// One more seed's run of a variant.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedRun {
    pub seed: u64,
    pub final_loss: Option<f64>,
    pub eval: Vec<EvalRow>,
}

/// Mean and sample standard deviation (0 for one value).
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

impl VariantResult {
    /// Describes `cfg`'s settings under `name`; the run's figures come later.
    pub fn new(name: &str, cfg: &TrainConfig) -> Self {
        let pes: Vec<PeMode> = cfg.request.fields.iter().map(|f| f.pe).collect();
        let pe = match pes.first() {
            Some(first) if pes.iter().all(|p| p == first) => first.as_str().to_string(),
            Some(_) => "mixed".into(),
            None => "-".into(),
        };
        let sigmas: Vec<f64> = cfg.request.fields.iter().map(|f| f.blur_sigma).collect();
        Self {
            name: name.into(),
            aux_info: cfg.model.aux_info,
            pe,
            blur_sigma: sigmas.iter().copied().fold(0.0, f64::max),
            ensemble: cfg.model.ensemble,
            losses: Vec::new(),
            val_losses: Vec::new(),
            eval: Vec::new(),
            seed: cfg.seed,
            other_seeds: Vec::new(),
        }
    }

    /// Every seed's (seed, final loss, evaluation rows), the first run's first.
    pub fn seed_runs(&self) -> Vec<(u64, Option<f64>, &[EvalRow])> {
        let mut out = vec![(self.seed, self.final_loss(), self.eval.as_slice())];
        out.extend(
            self.other_seeds
                .iter()
                .map(|s| (s.seed, s.final_loss, s.eval.as_slice())),
        );
        out
    }

    /// Per seed, [`Self::pooled`] for that seed's rows.
    pub fn pooled_per_seed(&self, field: &str, baseline: Baseline) -> Vec<Pooled> {
        self.seed_runs()
            .into_iter()
            .filter_map(|(_, _, eval)| pool(eval, field, baseline))
            .collect()
    }

    /// The mean training loss of the last tenth of the run (at least one step): one step's
    /// loss depends on which task and batch it drew.
    pub fn final_loss(&self) -> Option<f64> {
        let n = (self.losses.len() / 10).max(1).min(self.losses.len());
        (n > 0).then(|| {
            self.losses[self.losses.len() - n..]
                .iter()
                .map(|l| l.1)
                .sum::<f64>()
                / n as f64
        })
    }

    /// The masked-token RMSE of the model and of `baseline` for `field`, pooled over tasks and
    /// levels on the values where `baseline` is defined, and how many values that is.
    pub fn pooled(&self, field: &str, baseline: Baseline) -> Option<Pooled> {
        pool(&self.eval, field, baseline)
    }

    /// Per seed, the ensemble's `(CRPS, spread–skill)` for `field` pooled over tasks and levels
    /// (empty without an ensemble): the CRPS as the mean over values, the spread–skill ratio
    /// from the pooled ensemble variance and squared error of the mean.
    pub fn ensemble_per_seed(&self, field: &str) -> Vec<(f64, f64)> {
        self.seed_runs()
            .into_iter()
            .filter_map(|(_, _, eval)| {
                let mut sums = [0.0; 4];
                let mut members = 0;
                // Every baseline's row holds the same ensemble scores: one baseline's rows.
                for r in eval
                    .iter()
                    .filter(|r| r.field == field && r.baseline == Baseline::Climatology)
                {
                    let Some(e) = &r.ensemble else { continue };
                    let n = r.values as f64;
                    members = e.members;
                    sums[0] += n;
                    sums[1] += n * e.crps;
                    sums[2] += n * e.spread.powi(2);
                    sums[3] += n * r.model_rmse.powi(2);
                }
                (sums[0] > 0.0).then(|| {
                    let factor = ((members as f64 + 1.0) / members as f64).sqrt();
                    (sums[1] / sums[0], factor * (sums[2] / sums[3]).sqrt())
                })
            })
            .collect()
    }
}

fn pool(eval: &[EvalRow], field: &str, baseline: Baseline) -> Option<Pooled> {
    let mut p = Pooled::default();
    for r in eval
        .iter()
        .filter(|r| r.field == field && r.baseline == baseline)
    {
        let n = r.values as f64;
        p.values += r.values;
        p.model += n * r.model_rmse.powi(2);
        p.baseline += n * r.baseline_rmse.powi(2);
    }
    (p.values > 0).then(|| {
        let n = p.values as f64;
        Pooled {
            values: p.values,
            model: (p.model / n).sqrt(),
            baseline: (p.baseline / n).sqrt(),
        }
    })
}

/// RMSEs pooled over rows (see [`VariantResult::pooled`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pooled {
    pub values: u64,
    pub model: f64,
    pub baseline: f64,
}

impl Pooled {
    /// `model / baseline`: below 1 when the model beats the baseline.
    pub fn ratio(&self) -> f64 {
        self.model / self.baseline
    }
}

/// Units of ERA5's variables by short name, for table headers.
pub fn units(field: &str) -> &'static str {
    match field {
        "t" => "K",
        "z" => "m² s⁻²",
        "u" | "v" | "w" => "m s⁻¹",
        "vo" | "d" => "s⁻¹",
        "q" => "kg kg⁻¹",
        "sp" | "msl" => "Pa",
        _ => "physical units",
    }
}

/// All variants' results, in run order.
#[derive(Debug, Clone, PartialEq)]
pub struct AblationReport {
    pub fields: Vec<String>,
    pub variants: Vec<VariantResult>,
    /// Said above the table (store, steps, evaluation split).
    pub caption: String,
}

/// Numbers as the tables print them: vorticity (~1e-5) needs exponents.
fn num(x: f64) -> String {
    if !x.is_finite() {
        "–".into()
    } else if x != 0.0 && x.abs() < 1e-2 {
        format!("{x:.3e}")
    } else if x.abs() >= 1e3 {
        format!("{x:.1}")
    } else {
        format!("{x:.4}")
    }
}

impl AblationReport {
    /// The report as markdown: one row per variant (losses, and per field the model's RMSE with
    /// its skill against climatology on the same values), then the baselines on the base
    /// variant's values.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        if !self.caption.is_empty() {
            out.push_str(&self.caption);
            out.push_str("\n\n");
        }
        out.push_str("| variant | aux info | PE | blur σ | members | train loss | val loss |");
        let mut rule = String::from("|---|---|---|---:|---:|---:|---:|");
        for f in &self.fields {
            out.push_str(&format!(" {f} RMSE [{}] (skill) |", units(f)));
            rule.push_str("---:|");
        }
        out.push('\n');
        out.push_str(&rule);
        out.push('\n');
        for v in &self.variants {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                v.name,
                v.aux_info,
                v.pe,
                v.blur_sigma,
                v.ensemble,
                {
                    let losses: Vec<f64> = v.seed_runs().iter().filter_map(|s| s.1).collect();
                    match losses.len() {
                        0 => "–".into(),
                        1 => num(losses[0]),
                        _ => {
                            let (m, sd) = mean_std(&losses);
                            format!("{} ± {}", num(m), num(sd))
                        }
                    }
                },
                v.val_losses
                    .last()
                    .map(|l| num(l.1))
                    .unwrap_or_else(|| "–".into()),
            ));
            for f in &self.fields {
                let seeds = v.pooled_per_seed(f, Baseline::Climatology);
                let cell = match seeds.len() {
                    0 => " – |".into(),
                    1 => format!(
                        " {} ({:+.3}) |",
                        num(seeds[0].model),
                        1.0 - seeds[0].ratio()
                    ),
                    _ => {
                        let rmse: Vec<f64> = seeds.iter().map(|p| p.model).collect();
                        let skill: Vec<f64> = seeds.iter().map(|p| 1.0 - p.ratio()).collect();
                        let ((m, sd), (sm, ssd)) = (mean_std(&rmse), mean_std(&skill));
                        format!(" {} ± {} ({sm:+.3} ± {ssd:.3}) |", num(m), num(sd))
                    }
                };
                out.push_str(&cell);
            }
            out.push('\n');
        }
        out.push_str(&self.ensemble_markdown());
        if let Some(base) = self.variants.first() {
            out.push_str(&format!(
                "\nBaselines on the values `{}` was scored on (its first seed's RMSE on the \
                 same values in brackets; skill = 1 − model / climatology, the training \
                 split's mean at each grid point and hour):\n\n| baseline |",
                base.name
            ));
            let mut rule = String::from("|---|");
            for f in &self.fields {
                out.push_str(&format!(" {f} [{}] |", units(f)));
                rule.push_str("---:|");
            }
            out.push('\n');
            out.push_str(&rule);
            out.push('\n');
            for b in Baseline::ALL {
                out.push_str(&format!("| {} |", b.name()));
                for f in &self.fields {
                    let cell = match base.pooled(f, b) {
                        Some(p) => format!(" {} ({}) |", num(p.baseline), num(p.model)),
                        None => " – |".into(),
                    };
                    out.push_str(&cell);
                }
                out.push('\n');
            }
        }
        out
    }

    /// The variants with an ensemble: per field the CRPS and the spread–skill ratio (1 when
    /// the spread matches the error of the mean), the mean ± std over seeds; empty without one.
    fn ensemble_markdown(&self) -> String {
        let ensembles: Vec<&VariantResult> =
            self.variants.iter().filter(|v| v.ensemble > 1).collect();
        if ensembles.is_empty() {
            return String::new();
        }
        let mut out = String::from(
            "\nEnsembles (pooled over tasks and levels; spread–skill 1 = as spread as the \
             ensemble mean errs, below 1 = overconfident):\n\n| variant | members |",
        );
        let mut rule = String::from("|---|---:|");
        for f in &self.fields {
            out.push_str(&format!(" {f} CRPS [{}] (spread–skill) |", units(f)));
            rule.push_str("---:|");
        }
        out.push('\n');
        out.push_str(&rule);
        out.push('\n');
        for v in ensembles {
            out.push_str(&format!("| {} | {} |", v.name, v.ensemble));
            for f in &self.fields {
                let seeds = v.ensemble_per_seed(f);
                let cell = match seeds.len() {
                    0 => " – |".into(),
                    1 => format!(" {} ({:.3}) |", num(seeds[0].0), seeds[0].1),
                    _ => {
                        let crps: Vec<f64> = seeds.iter().map(|s| s.0).collect();
                        let ratio: Vec<f64> = seeds.iter().map(|s| s.1).collect();
                        let ((m, sd), (rm, rsd)) = (mean_std(&crps), mean_std(&ratio));
                        format!(" {} ± {} ({rm:.3} ± {rsd:.3}) |", num(m), num(sd))
                    }
                };
                out.push_str(&cell);
            }
            out.push('\n');
        }
        out
    }

    /// Writes every variant's evaluation rows (long format, one row per variant, task, field,
    /// level and baseline) as Parquet.
    pub fn write_parquet(&self, path: &Path) -> Result<()> {
        let runs: Vec<(&VariantResult, u64, Option<f64>, &[EvalRow])> = self
            .variants
            .iter()
            .flat_map(|v| v.seed_runs().into_iter().map(move |(s, l, e)| (v, s, l, e)))
            .collect();
        let rows: Vec<(&VariantResult, u64, Option<f64>, &EvalRow)> = runs
            .iter()
            .flat_map(|&(v, s, l, e)| e.iter().map(move |r| (v, s, l, r)))
            .collect();
        let mut final_loss = Float64Builder::with_capacity(rows.len());
        for (_, _, l, _) in &rows {
            final_loss.append_option(*l);
        }
        let strings = |f: &dyn Fn(&VariantResult) -> String| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|(v, ..)| f(v)),
            ))
        };
        let mut fields = vec![
            Field::new("variant", ArrowType::Utf8, false),
            Field::new("aux_info", ArrowType::Utf8, false),
            Field::new("pe", ArrowType::Utf8, false),
            Field::new("blur_sigma", ArrowType::Float64, false),
            Field::new("ensemble", ArrowType::UInt64, false),
            Field::new("seed", ArrowType::UInt64, false),
            Field::new("final_train_loss", ArrowType::Float64, true),
        ];
        let mut columns: Vec<ArrayRef> = vec![
            strings(&|v| v.name.clone()),
            strings(&|v| v.aux_info.to_string()),
            strings(&|v| v.pe.clone()),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|(v, ..)| v.blur_sigma),
            )),
            Arc::new(arrow_array::UInt64Array::from_iter_values(
                rows.iter().map(|(v, ..)| v.ensemble as u64),
            )),
            Arc::new(arrow_array::UInt64Array::from_iter_values(
                rows.iter().map(|r| r.1),
            )),
            Arc::new(final_loss.finish()),
        ];
        let eval_rows: Vec<&EvalRow> = rows.iter().map(|r| r.3).collect();
        let (eval_fields, eval_columns) = eval_row_columns(&eval_rows);
        fields.extend(eval_fields);
        columns.extend(eval_columns);
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(schema, columns).map_err(|e| parquet_err(path, e))?;
        write_record_batch(path, &batch)
    }

    /// Per variant, the field RMSEs as fractions of climatology's on the same values (what the
    /// bar chart draws; the mean over seeds): `[variant][field]`, NaN where a field was not
    /// scored.
    pub fn climatology_ratios(&self) -> Vec<Vec<f64>> {
        self.variants
            .iter()
            .map(|v| {
                self.fields
                    .iter()
                    .map(|f| {
                        let seeds = v.pooled_per_seed(f, Baseline::Climatology);
                        let ratios: Vec<f64> = seeds.iter().map(Pooled::ratio).collect();
                        if ratios.is_empty() {
                            f64::NAN
                        } else {
                            mean_std(&ratios).0
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ensemble::EnsembleScore;
    use crate::error::Error;

    const QUICK: &str = include_str!("../../examples/ablation-quick.toml");

    fn names(cfg: &AblationConfig) -> Vec<String> {
        cfg.expand().into_iter().map(|v| v.name).collect()
    }

    #[test]
    fn the_quick_config_expands_into_eleven_variants() {
        let cfg = AblationConfig::from_toml_str(QUICK, None).unwrap();
        assert_eq!(
            names(&cfg),
            [
                "base",
                "aux=project-before-append",
                "aux=class-token",
                "aux=reappend",
                "aux=none",
                "pe=local",
                "pe=standard",
                "pe=info+standard",
                "pe=none",
                "blur=1",
                "ensemble=4",
            ]
        );
        // Each variant changes exactly its setting, and takes the ablation's steps.
        for v in cfg.expand() {
            let c = cfg.variant_config(&v).unwrap();
            assert_eq!(c.steps, 300);
            let base = &cfg.base;
            assert_eq!(c.seed, base.seed);
            assert_eq!(c.tasks, base.tasks);
            assert_eq!(c.model.aux_info, v.aux_info.unwrap_or(base.model.aux_info));
            assert_eq!(c.model.ensemble, v.ensemble.unwrap_or(base.model.ensemble));
            for (f, b) in c.request.fields.iter().zip(&base.request.fields) {
                assert_eq!(f.pe, v.pe.unwrap_or(b.pe));
                assert_eq!(f.blur_sigma, v.blur_sigma.unwrap_or(b.blur_sigma));
                assert_eq!((&f.name, &f.levels, f.mask), (&b.name, &b.levels, b.mask));
            }
        }
    }

    #[test]
    fn a_blurred_base_is_compared_with_raw_data() {
        let mut cfg = AblationConfig::from_toml_str(QUICK, None).unwrap();
        for f in &mut cfg.base.request.fields {
            f.blur_sigma = 2.0;
        }
        cfg.studies = vec![Study::Blur];
        cfg.variants.clear();
        let variants = cfg.expand();
        assert_eq!(variants.len(), 2);
        assert_eq!(variants[1].blur_sigma, Some(0.0));
        assert_eq!(variants[1].name, "blur=0");
    }

    #[test]
    fn the_base_comes_from_a_file_or_a_table_and_bad_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("train.toml");
        std::fs::write(
            &train,
            include_str!("../../examples/train.toml").replace("steps = 200", "steps = 7"),
        )
        .unwrap();
        let file = dir.path().join("ablation.toml");
        std::fs::write(
            &file,
            "base = \"train.toml\"\nstudies = [\"positional-encoding\"]\n\
             [[variants]]\nname = \"raw-class\"\naux_info = \"class-token\"\n",
        )
        .unwrap();
        let cfg = AblationConfig::from_toml_file(&file).unwrap();
        assert_eq!(cfg.base.steps, 7);
        // The example uses `local` PE: the study adds the other four, then the explicit one.
        assert_eq!(
            names(&cfg),
            [
                "base",
                "pe=global",
                "pe=standard",
                "pe=info+standard",
                "pe=none",
                "raw-class"
            ]
        );
        assert_eq!(cfg.variant_config(&cfg.expand()[5]).unwrap().steps, 7);

        let setting = |text: &str| match AblationConfig::from_toml_str(text, None) {
            Err(Error::TrainConfig { setting, .. }) => setting,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(setting("studies = [\"blur\"]"), "base");
        let table = QUICK.to_string();
        assert_eq!(
            setting(&table.replace("steps = 300\nstudies", "steps = 0\nstudies")),
            "steps"
        );
        assert_eq!(
            setting(&table.replace("blur_sigma = 1.0", "blur_sigma = -1.0")),
            "blur_sigma"
        );
        assert_eq!(
            setting(&table.replace("batches = 4\n", "batches = 0\n")),
            "eval.batches"
        );
        // Without its studies and its explicit variant, the base alone is left.
        let studies_only = &table[..table.find("\n# A four-member ensemble").unwrap()];
        assert_eq!(
            setting(&studies_only.replace(
                "studies = [\"aux-info\", \"positional-encoding\", \"blur\"]",
                "studies = []"
            )),
            "studies"
        );
        let twice = format!("{QUICK}\n[[variants]]\nname = \"pe=none\"\npe = \"none\"\n");
        assert_eq!(setting(&twice), "variants.pe=none");
        // A variant whose settings make the base invalid names itself.
        let bad = format!("{QUICK}\n[[variants]]\nname = \"huge-blur\"\nblur_sigma = -3.0\n");
        assert_eq!(setting(&bad), "variants.huge-blur.blur_sigma");
        let none = format!("{QUICK}\n[[variants]]\nname = \"no-members\"\nensemble = 0\n");
        assert_eq!(setting(&none), "variants.no-members.ensemble");
        let unknown = QUICK.replace("studies = [", "studies = [\"dropout\", ");
        assert_eq!(setting(&unknown), "<ablation file>");
    }

    fn row(
        field: &str,
        level: f64,
        baseline: Baseline,
        values: u64,
        model: f64,
        base: f64,
    ) -> EvalRow {
        EvalRow {
            task: "bert".into(),
            field: field.into(),
            level,
            baseline,
            values,
            samples: 1,
            model_rmse: model,
            baseline_rmse: base,
            model_ci: [model; 2],
            baseline_ci: [base; 2],
            skill_ci: [1.0 - model / base; 2],
            ensemble: None,
        }
    }

    fn report() -> AblationReport {
        let mut a = VariantResult::new(
            "base",
            &AblationConfig::from_toml_str(QUICK, None).unwrap().base,
        );
        a.losses = (1..=20)
            .map(|s| (s, if s > 18 { 0.5 } else { 1.0 }))
            .collect();
        a.val_losses = vec![(20, 0.75)];
        // Two levels pooled: sqrt((1·3² + 3·1²) / 4) = sqrt(3) for the model.
        a.eval = vec![
            row("t", 850.0, Baseline::Climatology, 1, 3.0, 6.0),
            row("t", 500.0, Baseline::Climatology, 3, 1.0, 6.0),
            row("t", 850.0, Baseline::Persistence, 2, 2.0, 0.5),
            row("z", 850.0, Baseline::Climatology, 5, 2e-6, 1e-5),
        ];
        let mut b = a.clone();
        b.name = "aux=none".into();
        b.aux_info = AuxInfo::None;
        b.eval = vec![row("t", 850.0, Baseline::Climatology, 4, 2.0, 6.0)];
        AblationReport {
            fields: vec!["t".into(), "z".into()],
            variants: vec![a, b],
            caption: "caption".into(),
        }
    }

    #[test]
    fn the_table_pools_levels_and_scores_against_climatology() {
        let r = report();
        let a = &r.variants[0];
        // The last tenth of 20 steps: the 2 steps at 0.5.
        assert_eq!(a.final_loss(), Some(0.5));
        let p = a.pooled("t", Baseline::Climatology).unwrap();
        assert_eq!(p.values, 4);
        assert!((p.model - 3f64.sqrt()).abs() < 1e-12);
        assert!((p.baseline - 6.0).abs() < 1e-12);
        assert!(a.pooled("z", Baseline::Interpolation).is_none());
        let md = r.markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "caption");
        assert_eq!(
            lines[2],
            "| variant | aux info | PE | blur σ | members | train loss | val loss | t RMSE [K] (skill) | z RMSE [m² s⁻²] (skill) |"
        );
        assert_eq!(
            lines[4],
            format!(
                "| base | concat | global | 0 | 1 | 0.5000 | 0.7500 | {:.4} ({:+.3}) | 2.000e-6 (+0.800) |",
                3f64.sqrt(),
                1.0 - 3f64.sqrt() / 6.0
            )
        );
        assert_eq!(
            lines[5],
            "| aux=none | none | global | 0 | 1 | 0.5000 | 0.7500 | 2.0000 (+0.667) | – |"
        );
        assert!(md.contains("| persistence | 0.5000 (2.0000) | – |"), "{md}");
        assert!(
            md.contains("| climatology | 6.0000 (1.7321) | 1.000e-5 (2.000e-6) |"),
            "{md}"
        );
        let ratios = r.climatology_ratios();
        assert!((ratios[1][0] - 1.0 / 3.0).abs() < 1e-12);
        assert!(ratios[1][1].is_nan());
    }

    #[test]
    fn an_ensemble_variant_gets_pooled_crps_and_spread_skill() {
        let mut r = report();
        assert!(!r.markdown().contains("Ensembles"), "no ensemble, no table");
        let mut v = r.variants[1].clone();
        v.name = "ensemble=4".into();
        v.ensemble = 4;
        let scored = |mut row: EvalRow, crps: f64, spread: f64| {
            row.ensemble = Some(EnsembleScore {
                members: 4,
                crps,
                crps_ci: [crps; 2],
                spread,
                spread_skill: 0.0,
                spread_skill_ci: [0.0; 2],
            });
            row
        };
        // Two levels: CRPS (1·2 + 3·1) / 4 = 1.25; spread² (1·1 + 3·1) / 4 = 1 against the
        // mean's squared error (1·2² + 3·1²) / 4 = 1.75, times √(5/4) for 4 members. Another
        // baseline's row of the same values repeats the scores and must not count twice.
        v.eval = vec![
            scored(
                row("t", 850.0, Baseline::Climatology, 1, 2.0, 6.0),
                2.0,
                1.0,
            ),
            scored(
                row("t", 500.0, Baseline::Climatology, 3, 1.0, 6.0),
                1.0,
                1.0,
            ),
            scored(
                row("t", 850.0, Baseline::Persistence, 1, 2.0, 0.5),
                9.0,
                9.0,
            ),
        ];
        let pooled = v.ensemble_per_seed("t");
        assert_eq!(pooled.len(), 1);
        let want = (1.25f64 / 1.75).sqrt();
        assert!((pooled[0].0 - 1.25).abs() < 1e-12, "{pooled:?}");
        assert!((pooled[0].1 - want).abs() < 1e-12, "{pooled:?}");
        assert!(v.ensemble_per_seed("z").is_empty());
        r.variants.push(v);
        let md = r.markdown();
        assert!(
            md.contains(&format!("| ensemble=4 | 4 | 1.2500 ({want:.3}) | – |")),
            "{md}"
        );
        assert!(
            md.contains("| ensemble=4 | none | global | 0 | 4 |"),
            "{md}"
        );
    }

    #[test]
    fn seeds_give_mean_and_std_in_the_table_and_rows_in_the_parquet() {
        let mut r = report();
        // Two more seeds of `aux=none`: model RMSEs 2, 3, 4 against climatology's 6.
        let v = &mut r.variants[1];
        for (seed, model) in [(1, 3.0), (2, 4.0)] {
            v.other_seeds.push(SeedRun {
                seed,
                final_loss: Some(0.5 + seed as f64),
                eval: vec![row("t", 850.0, Baseline::Climatology, 4, model, 6.0)],
            });
        }
        let md = r.markdown();
        // Mean 3, sample std 1; skills 2/3, 1/2, 1/3: mean 1/2, std 1/6. Losses 0.5, 1.5, 2.5.
        assert!(
            md.contains("| aux=none | none | global | 0 | 1 | 1.5000 ± 1.0000 | 0.7500 | 3.0000 ± 1.0000 (+0.500 ± 0.167) | – |"),
            "{md}"
        );
        assert!((r.climatology_ratios()[1][0] - 0.5).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ablation.parquet");
        r.write_parquet(&path).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 7);
        let seeds = batches[0]
            .column_by_name("seed")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow_array::UInt64Array>()
            .unwrap()
            .clone();
        assert_eq!(seeds.values().to_vec(), [0, 0, 0, 0, 0, 1, 2]);
        // The quick ablation runs one seed; the default is three.
        assert_eq!(AblationConfig::from_toml_str(QUICK, None).unwrap().seeds, 1);
        let three = QUICK.replace("seeds = 1\n", "");
        let cfg = AblationConfig::from_toml_str(&three, None).unwrap();
        assert_eq!(cfg.seeds, 3);
        let v = &cfg.expand()[1];
        assert_eq!(cfg.seeded_config(v, 2).unwrap().seed, cfg.base.seed + 2);
    }

    #[test]
    fn the_parquet_holds_every_row_of_every_variant() {
        use arrow_array::Array;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ablation.parquet");
        let r = report();
        r.write_parquet(&path).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 5);
        let variant = batches[0]
            .column_by_name("variant")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone();
        assert_eq!(variant.value(0), "base");
        assert_eq!(variant.value(4), "aux=none");
        assert_eq!(variant.len(), 5);
    }
}
