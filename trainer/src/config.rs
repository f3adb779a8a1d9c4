//! Model configuration: the fields a model sees, its widths and depths, and the aux-info variant.
//!
//! A [`ModelConfig`] is plain serde data (TOML in files); [`ModelConfig::validate`] rejects
//! impossible combinations with an error that names the offending setting, so a bad file fails
//! before any tensor is allocated. Three presets exist: [`ModelConfig::tiny`] (tests, CPU demo),
//! [`ModelConfig::bench_mid`] (docs/design.md §4's fixed benchmark point, kept exactly as
//! specified) and [`ModelConfig::atmorep`] (roughly the paper's size).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, config_err};
use crate::toml_file::read_toml;

/// One field (physical variable) as the model sees it: the shape of what the loader sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// The field's name as the loader sends it; also its prefix in checkpoints, so it must be a
    /// plain identifier (letters, digits, `_`, `-`).
    pub name: String,
    /// Values per token (`V`, e.g. 3·9·9 = 243).
    pub token_numel: usize,
    /// Tokens per sample (`N`, all levels: levels · nt · nlat · nlon).
    pub num_tokens: usize,
    /// Width of the positional encoding the loader sends (`W`); projected to `d_model` when it
    /// differs.
    pub pe_width: usize,
    /// How the tokens tile the sample window; needed by [`Prior::Temporal`], which has to know
    /// which values of the sequence are the same grid point at other times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<TokenGrid>,
}

/// The token geometry of a field's sample, as in its loader request: per level, `num_tokens`
/// tokens along (time, lat, lon), each of `token_size` grid points along (time, lat, lon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenGrid {
    pub num_tokens: [usize; 3],
    pub token_size: [usize; 3],
}

/// What the tail's output is added to.
///
/// With [`Prior::Temporal`] the model predicts a correction to a prior made from the values it
/// can see: each hidden value starts from the linear interpolation in time between the nearest
/// visible values of the same grid point before and after it, or from the nearest one when it
/// has a visible neighbour on one side only (persistence at a forecast edge), or from 0 — the
/// climatological mean in normalized units — when the grid point is hidden at every time of the
/// window. Learning the residual over a simple predictor is how forecasting models are usually
/// trained (they predict tendencies over persistence); it makes every skill over the
/// interpolation baseline something the network has learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prior {
    /// The tail's output is the prediction (AtmoRep).
    #[default]
    None,
    /// The tail's output is added to the temporal prior.
    Temporal,
}

/// How the 8 floats of token info enter the model (the seed's ablation, docs/design.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuxInfo {
    /// AtmoRep: `Linear(V → D − d_info)(values) ‖ Linear(8 → d_info)(info)`.
    #[default]
    Concat,
    /// As `Concat`, but the info first goes through a small non-linear network
    /// (`Linear(8 → d_info)`, GELU, `Linear(d_info → d_info)`) before it is appended.
    ProjectBeforeAppend,
    /// Values embedded to the full `D`; one learnable class token per field and sample, shifted
    /// by a projection of the sample's mean token info, is prepended to the sequence (and
    /// dropped again before the tail).
    ClassToken,
    /// As `Concat`, and after every attention sub-layer the info embedding is appended again.
    /// Appending `d_info` channels and projecting back to `D` is, with the residual, the same as
    /// adding a per-layer `Linear(d_info → D)` of the info, which is how it is computed (the
    /// residual stream keeps its width, and no channel written by an earlier layer is lost).
    Reappend,
    /// Values only: `Linear(V → D)`.
    None,
}

impl AuxInfo {
    /// Every variant, in ablation order.
    pub const ALL: [Self; 5] = [
        Self::Concat,
        Self::ProjectBeforeAppend,
        Self::ClassToken,
        Self::Reappend,
        Self::None,
    ];

    /// The variant's name in config files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Concat => "concat",
            Self::ProjectBeforeAppend => "project-before-append",
            Self::ClassToken => "class-token",
            Self::Reappend => "reappend",
            Self::None => "none",
        }
    }

    /// Whether the value embedding leaves `d_info` channels for the info.
    pub const fn appends_info(self) -> bool {
        matches!(
            self,
            Self::Concat | Self::ProjectBeforeAppend | Self::Reappend
        )
    }

    /// Whether each field's sequence carries one extra (class) token in front.
    pub const fn extra_tokens(self) -> usize {
        match self {
            Self::ClassToken => 1,
            _ => 0,
        }
    }
}

impl fmt::Display for AuxInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuxInfo {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                config_err(
                    "aux_info",
                    format!(
                        "unknown variant `{s}` (expected one of {})",
                        Self::ALL.map(Self::as_str).join(", ")
                    ),
                )
            })
    }
}

fn default_ensemble() -> usize {
    1
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// The whole model's shape. See the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The fields, in the order the forward pass takes them.
    pub fields: Vec<FieldSpec>,
    /// Model width `D`, shared by all fields (cross-field heads mix their keys and values).
    pub d_model: usize,
    /// Attention heads per layer (encoder and decoder).
    pub num_heads: usize,
    /// How many of an encoder layer's heads attend across all fields; the others attend within
    /// the field.
    pub cross_heads: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    /// MLP hidden width; `4 · d_model` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_hidden: Option<usize>,
    /// Channels of the token-info embedding (`Concat`, `ProjectBeforeAppend`, `Reappend`).
    pub d_info: usize,
    #[serde(default)]
    pub aux_info: AuxInfo,
    /// Ensemble members `E` of the tail; 1 = a single prediction.
    #[serde(default = "default_ensemble")]
    pub ensemble: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// What the tail's output is added to; every field needs its `grid` for `temporal`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub prior: Prior,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Preset names accepted by [`ModelConfig::preset`].
pub const PRESETS: [&str; 3] = ["tiny", "bench-mid", "atmorep"];

impl ModelConfig {
    /// A model small enough for unit tests and a CPU demo: 2 fields of 16 tokens of 12 values,
    /// PE width 8 (≠ D, so the projection is exercised), D = 32, 2 heads of which 1 crosses
    /// fields, 1 encoder + 1 decoder layer.
    pub fn tiny() -> Self {
        let field = |name: &str| FieldSpec {
            name: name.into(),
            token_numel: 12,
            num_tokens: 16,
            pe_width: 8,
            grid: None,
        };
        Self {
            fields: vec![field("t"), field("z")],
            d_model: 32,
            num_heads: 2,
            cross_heads: 1,
            encoder_layers: 1,
            decoder_layers: 1,
            mlp_hidden: None,
            d_info: 8,
            aux_info: AuxInfo::Concat,
            ensemble: 1,
            layer_norm_eps: default_layer_norm_eps(),
            prior: Prior::None,
        }
    }

    /// docs/design.md §4's benchmark point, exactly: 2 fields of 2 levels × 6×4×8 tokens of
    /// 3×9×9 values (384 tokens, 243 values), D = 256, 8 heads of which 2 cross fields, 4 + 4
    /// layers, MLP 4·D, token info width 16, `Concat`, `local` PE (sent at width D), no
    /// ensemble.
    pub fn bench_mid() -> Self {
        let field = |name: &str| FieldSpec {
            name: name.into(),
            token_numel: 3 * 9 * 9,
            num_tokens: 2 * 6 * 4 * 8,
            pe_width: 256,
            grid: None,
        };
        Self {
            fields: vec![field("t"), field("z")],
            d_model: 256,
            num_heads: 8,
            cross_heads: 2,
            encoder_layers: 4,
            decoder_layers: 4,
            mlp_hidden: Some(4 * 256),
            d_info: 16,
            aux_info: AuxInfo::Concat,
            ensemble: 1,
            layer_norm_eps: default_layer_norm_eps(),
            prior: Prior::None,
        }
    }

    /// Roughly the AtmoRep paper's model: the five fields of its multiformer, each 5 levels of
    /// 12×6×12 tokens of 3×9×9 values, D = 1024, 16 heads of which 4 cross fields, 10 + 10
    /// layers, token info width 16 (as AtmoRep's `size_token_info_net`), 16 ensemble members.
    /// Far too large for a CPU; it exists so configs and parameter counts can be checked.
    pub fn atmorep() -> Self {
        let field = |name: &str| FieldSpec {
            name: name.into(),
            token_numel: 3 * 9 * 9,
            num_tokens: 5 * 12 * 6 * 12,
            pe_width: 1024,
            grid: None,
        };
        Self {
            fields: [
                "velocity_u",
                "velocity_v",
                "specific_humidity",
                "velocity_z",
                "temperature",
            ]
            .into_iter()
            .map(field)
            .collect(),
            d_model: 1024,
            num_heads: 16,
            cross_heads: 4,
            encoder_layers: 10,
            decoder_layers: 10,
            mlp_hidden: None,
            d_info: 16,
            aux_info: AuxInfo::Concat,
            ensemble: 16,
            layer_norm_eps: default_layer_norm_eps(),
            prior: Prior::None,
        }
    }

    /// The preset called `name` (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        match name.trim() {
            "tiny" => Ok(Self::tiny()),
            "bench-mid" | "bench_mid" => Ok(Self::bench_mid()),
            "atmorep" => Ok(Self::atmorep()),
            other => Err(config_err(
                "preset",
                format!(
                    "unknown preset `{other}` (expected one of {})",
                    PRESETS.join(", ")
                ),
            )),
        }
    }

    /// Parses and validates a TOML document.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: "<string>".into(),
            source: Box::new(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        read_toml(path.as_ref(), |text, _| Self::from_toml_str(text))
    }

    /// The config as TOML.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a model config always serializes")
    }

    /// MLP hidden width.
    pub fn mlp_hidden(&self) -> usize {
        self.mlp_hidden.unwrap_or(4 * self.d_model)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.num_heads
    }

    /// Matrix-multiply FLOPs (2 per multiply-add) of one forward pass over one sample: the
    /// linear layers and the two products of attention, as the PyTorch twin of `bench-mid`
    /// counts them (element-wise work left out). A training step costs about three times this.
    pub fn forward_flops_per_sample(&self) -> f64 {
        let (d, r) = (self.d_model as f64, self.mlp_hidden() as f64);
        let all: f64 = self.fields.iter().map(|f| f.num_tokens as f64).sum();
        let dh = self.head_dim() as f64;
        let (hw, hc) = (self.within_heads() as f64, self.cross_heads as f64);
        let mlp = 2.0 * 2.0 * d * r;
        self.fields
            .iter()
            .map(|f| {
                let (n, v) = (f.num_tokens as f64, f.token_numel as f64);
                // A positional encoding as wide as the model is added without a projection.
                let pe = if f.pe_width == self.d_model {
                    0.0
                } else {
                    2.0 * f.pe_width as f64 * d
                };
                let embed = 2.0 * v * d + pe;
                // Per query token: scores and the weighted sum, each 2·dh per key.
                let enc_att = 4.0 * dh * (hw * n + hc * all);
                let enc = 2.0 * 4.0 * d * d + mlp + enc_att;
                let dec = 2.0 * 8.0 * d * d + mlp + 2.0 * 4.0 * d * n;
                let tail = 2.0 * d * v;
                n * (embed
                    + self.encoder_layers as f64 * enc
                    + self.decoder_layers as f64 * dec
                    + tail)
            })
            .sum()
    }

    /// Heads of an encoder layer that attend within the field.
    pub fn within_heads(&self) -> usize {
        self.num_heads - self.cross_heads
    }

    /// Rejects impossible settings; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        if self.fields.is_empty() {
            return Err(config_err("fields", "at least one field is needed"));
        }
        for (i, f) in self.fields.iter().enumerate() {
            let at = |what: &str| format!("fields[{i}].{what}");
            if f.name.is_empty()
                || !f
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(config_err(
                    at("name"),
                    format!(
                        "`{}` must be non-empty and use only letters, digits, `_` and `-` \
                         (it prefixes the field's checkpoint tensors)",
                        f.name
                    ),
                ));
            }
            if let Some(j) = self.fields[..i].iter().position(|g| g.name == f.name) {
                return Err(config_err(
                    at("name"),
                    format!("`{}` is also the name of fields[{j}]", f.name),
                ));
            }
            for (what, value) in [
                ("token_numel", f.token_numel),
                ("num_tokens", f.num_tokens),
                ("pe_width", f.pe_width),
            ] {
                if value == 0 {
                    return Err(config_err(at(what), "must be at least 1"));
                }
            }
            match (&f.grid, self.prior) {
                (None, Prior::Temporal) => {
                    return Err(config_err(
                        at("grid"),
                        "prior `temporal` needs each field's token grid \
                         ({ num_tokens = [t, lat, lon], token_size = [t, lat, lon] })",
                    ));
                }
                (Some(g), _) => {
                    let per_level: usize = g.num_tokens.iter().product();
                    let values: usize = g.token_size.iter().product();
                    if per_level == 0 || values != f.token_numel {
                        return Err(config_err(
                            at("grid"),
                            format!(
                                "token_size {:?} makes {values} values per token, the field has {}",
                                g.token_size, f.token_numel
                            ),
                        ));
                    }
                    if !f.num_tokens.is_multiple_of(per_level) {
                        return Err(config_err(
                            at("grid"),
                            format!(
                                "num_tokens {:?} makes {per_level} tokens per level, which does \
                                 not divide the field's {} tokens",
                                g.num_tokens, f.num_tokens
                            ),
                        ));
                    }
                }
                (None, Prior::None) => {}
            }
        }
        for (what, value) in [
            ("d_model", self.d_model),
            ("num_heads", self.num_heads),
            ("encoder_layers", self.encoder_layers),
            ("decoder_layers", self.decoder_layers),
            ("mlp_hidden", self.mlp_hidden()),
            ("ensemble", self.ensemble),
        ] {
            if value == 0 {
                return Err(config_err(what, "must be at least 1"));
            }
        }
        if !self.d_model.is_multiple_of(self.num_heads) {
            return Err(config_err(
                "num_heads",
                format!(
                    "d_model {} is not divisible by {} heads",
                    self.d_model, self.num_heads
                ),
            ));
        }
        if self.cross_heads > self.num_heads {
            return Err(config_err(
                "cross_heads",
                format!(
                    "{} cross-field heads but only {} heads per layer",
                    self.cross_heads, self.num_heads
                ),
            ));
        }
        if self.aux_info.appends_info() {
            if self.d_info == 0 {
                return Err(config_err(
                    "d_info",
                    format!("aux_info `{}` needs d_info ≥ 1", self.aux_info),
                ));
            }
            if self.d_info >= self.d_model {
                return Err(config_err(
                    "d_info",
                    format!(
                        "{} leaves no channels for the token values (d_model is {})",
                        self.d_info, self.d_model
                    ),
                ));
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(config_err(
                "layer_norm_eps",
                format!("{} must be positive and finite", self.layer_norm_eps),
            ));
        }
        Ok(())
    }

    /// The index of the field called `name`.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }
}

#[cfg(test)]
impl ModelConfig {
    /// This config (the tiny preset's fields: 16 tokens of 12 values) with the temporal prior,
    /// each field laid out as 2 levels × `num_tokens` tokens of 1×3×4 points.
    pub(crate) fn with_temporal_prior(mut self, num_tokens: [usize; 3]) -> Self {
        self.prior = Prior::Temporal;
        for f in &mut self.fields {
            f.grid = Some(TokenGrid {
                num_tokens,
                token_size: [1, 3, 4],
            });
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting_of(err: Error) -> String {
        match err {
            Error::Config { setting, .. } => setting,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn presets_are_valid() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            cfg.validate().unwrap();
            // And they survive a TOML round trip.
            assert_eq!(
                ModelConfig::from_toml_str(&cfg.to_toml_string()).unwrap(),
                cfg
            );
        }
        assert_eq!(
            setting_of(ModelConfig::preset("huge").unwrap_err()),
            "preset"
        );
    }

    #[test]
    fn bench_mid_is_as_specified() {
        let c = ModelConfig::bench_mid();
        assert_eq!(c.fields.len(), 2);
        for f in &c.fields {
            assert_eq!((f.num_tokens, f.token_numel), (384, 243));
        }
        assert_eq!((c.d_model, c.num_heads, c.cross_heads), (256, 8, 2));
        assert_eq!((c.encoder_layers, c.decoder_layers), (4, 4));
        assert_eq!((c.mlp_hidden(), c.d_info, c.ensemble), (1024, 16, 1));
        assert_eq!(c.aux_info, AuxInfo::Concat);
        // The PyTorch twin counts 15.08 GFLOP per sample; it embeds into D − 16 values and its
        // cross heads see the other field only, ours all fields.
        let flops = c.forward_flops_per_sample();
        assert!((flops / 15.083e9 - 1.0).abs() < 0.03, "{flops}");
    }

    #[test]
    fn validation_names_the_setting() {
        type Edit = Box<dyn Fn(&mut ModelConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("num_heads", Box::new(|c| c.num_heads = 3)),
            ("cross_heads", Box::new(|c| c.cross_heads = 3)),
            ("d_info", Box::new(|c| c.d_info = 32)),
            ("d_info", Box::new(|c| c.d_info = 0)),
            ("d_model", Box::new(|c| c.d_model = 0)),
            ("ensemble", Box::new(|c| c.ensemble = 0)),
            ("encoder_layers", Box::new(|c| c.encoder_layers = 0)),
            ("mlp_hidden", Box::new(|c| c.mlp_hidden = Some(0))),
            ("layer_norm_eps", Box::new(|c| c.layer_norm_eps = -1.0)),
            ("fields", Box::new(|c| c.fields.clear())),
            (
                "fields[1].name",
                Box::new(|c| c.fields[1].name = "t".into()),
            ),
            (
                "fields[0].name",
                Box::new(|c| c.fields[0].name = "a.b".into()),
            ),
            ("fields[1].pe_width", Box::new(|c| c.fields[1].pe_width = 0)),
            (
                "fields[0].token_numel",
                Box::new(|c| c.fields[0].token_numel = 0),
            ),
            ("fields[0].grid", Box::new(|c| c.prior = Prior::Temporal)),
            (
                "fields[0].grid",
                Box::new(|c| {
                    c.fields[0].grid = Some(TokenGrid {
                        num_tokens: [2, 2, 2],
                        token_size: [1, 3, 3],
                    })
                }),
            ),
            (
                "fields[1].grid",
                Box::new(|c| {
                    c.fields[1].grid = Some(TokenGrid {
                        num_tokens: [3, 1, 1],
                        token_size: [1, 3, 4],
                    })
                }),
            ),
        ];
        for (setting, edit) in cases {
            let mut cfg = ModelConfig::tiny();
            edit(&mut cfg);
            let err = cfg.validate().unwrap_err();
            let msg = err.to_string();
            assert_eq!(setting_of(err), setting, "{msg}");
            assert!(msg.contains(setting), "{msg}");
        }
        // d_info is irrelevant without an appended info.
        let mut cfg = ModelConfig::tiny();
        cfg.aux_info = AuxInfo::ClassToken;
        cfg.d_info = 0;
        cfg.validate().unwrap();
        ModelConfig::tiny()
            .with_temporal_prior([2, 2, 2])
            .validate()
            .unwrap();
    }

    #[test]
    fn toml_loading() {
        let text = r#"
            d_model = 64
            num_heads = 4
            cross_heads = 1
            encoder_layers = 2
            decoder_layers = 2
            d_info = 8
            aux_info = "class-token"
            ensemble = 4
            [[fields]]
            name = "t"
            token_numel = 27
            num_tokens = 32
            pe_width = 64
        "#;
        let cfg = ModelConfig::from_toml_str(text).unwrap();
        assert_eq!(cfg.prior, Prior::None);
        assert!(
            !cfg.to_toml_string().contains("prior"),
            "the default stays implicit"
        );
        let temporal = text.replacen("d_model", "prior = \"temporal\"\nd_model", 1)
            + "grid = { num_tokens = [2, 2, 2], token_size = [3, 3, 3] }\n";
        let with_prior = ModelConfig::from_toml_str(&temporal).unwrap();
        assert_eq!(with_prior.prior, Prior::Temporal);
        assert_eq!(
            ModelConfig::from_toml_str(&with_prior.to_toml_string()).unwrap(),
            with_prior
        );
        assert_eq!(cfg.aux_info, AuxInfo::ClassToken);
        assert_eq!(cfg.mlp_hidden(), 256);
        assert_eq!(cfg.layer_norm_eps, 1e-5);
        let bad = text.replace("num_heads = 4", "num_heads = 5");
        assert!(
            ModelConfig::from_toml_str(&bad)
                .unwrap_err()
                .to_string()
                .contains("num_heads")
        );
        assert!(matches!(
            ModelConfig::from_toml_str("d_model = 1\nwidth = 3"),
            Err(Error::ConfigFile { .. })
        ));
        for v in AuxInfo::ALL {
            assert_eq!(v.as_str().parse::<AuxInfo>().unwrap(), v);
        }
        assert!("rope".parse::<AuxInfo>().is_err());
    }
}
