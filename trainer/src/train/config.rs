//! A training run's configuration (TOML): the model, the loader request, the tasks, the
//! optimizer, and the validation and checkpoint cadence; which settings a resumed run must keep.

use std::collections::HashSet;
use std::path::Path;

use atmorep_proto::MaskConfig;
use atmorep_proto::request::{ModeName, RequestConfig, SplitName};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Result, train_config_err};
use crate::optim::OptimizerConfig;
use crate::toml_file::read_toml;

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

/// A whole training run's configuration (see [`crate::train`]), with the model and the request
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
        read_toml(path, Self::from_toml_str)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

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
}
