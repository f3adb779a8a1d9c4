//! A `StreamBatches` request as a TOML file a person can write, read and keep next to a run
//! (`atmorep loader pull --request req.toml`, the trainer configuration).
//!
//! [`RequestConfig`] mirrors [`crate::pb::BatchRequest`] with names instead of enum numbers,
//! plain values instead of nested messages, and defaults for everything the schema gives a
//! default.
//! [`RequestConfig::load`] / [`RequestConfig::from_toml`] parse a file strictly (an unknown or
//! misspelt key is an error naming it, so a typo never silently falls back to a default);
//! [`RequestConfig::to_proto`] maps it onto the wire message without judging the values — the
//! server validates them against the dataset and answers with the offending field.
//!
//! A complete reference request (the keys that are commented out are optional and off by
//! default; every other key not in `[[fields]]` is shown with its default value):
//!
//! ```toml
//! # Which dataset (`DatasetSummary.name`).
//! dataset = "era5"
//!
//! batch_size = 16             # samples per batch
//! dtype = "f32"               # "f32" | "bf16": encoding of source, target and pe
//! seed = 0                    # seeds epoch order, centres, masks and noise
//! rank = 0                    # this client's shard, in 0 .. world_size
//! world_size = 1
//! mode = "training"           # "training" (shuffled epochs) | "tiles" (the globe tiled once)
//! units = "normalized"        # "normalized" (per field normalization) | "physical"
//! latitude_weighting = "area" # how centre latitudes are drawn: "area" (cos φ) | "uniform"
//! # end_epoch = 10            # stop before this epoch; left out: stream forever
//!
//! # The part of the time axis samples come from. `split_fractions` are the (train, validation)
//! # fractions of the axis, the test split gets the rest; left out: the server's default
//! # (0.8, 0.1). Explicit dates (both or neither, ISO 8601 UTC) override the fractions.
//! split = "train"             # "train" | "validation" | "test"
//! split_fractions = [0.8, 0.1]
//! # train_end = "2017-01-01"
//! # validation_end = "2019-01-01"
//!
//! # How samples are cut from planned block reads; 0 = the server's default.
//! block_steps = 0             # time steps per block read
//! samples_per_block = 0       # samples cut from each block per epoch
//! buffer_blocks = 0           # blocks open at once (the shuffle buffer)
//!
//! # Tiles mode only: overlap of neighbouring tiles in grid points along (time, lat, lon) and the
//! # time range to tile (both ends inclusive; left out: the split's range).
//! tile_overlap = [0, 0, 0]
//! # tile_time_start = "2020-01-01"
//! # tile_time_end = "2020-02-01"
//!
//! # Continue a stream: the `cursor_after` of the last batch that arrived completely.
//! # resume = { epoch = 3, position = 1024 }
//!
//! [[fields]]
//! name = "t"
//! levels = [850, 500]         # hPa, exactly as the store lists them; left out: a surface field
//! num_tokens = [12, 6, 12]    # tokens along (time, lat, lon)
//! token_size = [3, 9, 9]      # grid points per token along (time, lat, lon)
//! blur_sigma = 0.0            # Gaussian blur in grid points before tokenization; 0 = none
//! normalization = "global"    # "global" | "local" | "none"
//! pe = "local"                # "global" | "local" | "standard" | "info+standard" | "none"
//! pe_width = 16               # even, at least 2
//! # Masking: { kind = "none" } (the default), { kind = "forecast", steps = 2 },
//! # { kind = "interpolation", steps = 2 }, or BERT-style:
//! mask = { kind = "bert", r_max = 0.5, noise_fraction = 0.1, mask_value = 0.0 }
//!
//! [[fields]]
//! name = "z"
//! levels = [850, 500]
//! num_tokens = [12, 6, 12]
//! token_size = [3, 9, 9]
//! pe = "local"
//! pe_width = 16
//! mask = { kind = "bert", r_max = 0.5 }
//! ```

mod names;
mod wire;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::batch::StreamCursor;
use crate::positional::PeMode;

pub use names::{
    DtypeName, LatitudeWeightingName, ModeName, NormalizationName, SplitName, UnitsName,
};

/// A whole `StreamBatches` request (the [module documentation](crate::request) has a reference
/// file). Field meanings are those of [`crate::pb::BatchRequest`]; where the schema has a
/// default the field has the same one here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestConfig {
    /// `DatasetSummary.name`.
    pub dataset: String,
    /// The fields of every sample, in the order the batches carry them.
    pub fields: Vec<FieldRequestConfig>,
    /// Samples per batch. Default 16.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Encoding of `source`, `target` and `pe`. Default `f32`.
    #[serde(default)]
    pub dtype: DtypeName,
    /// Seeds every random choice. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// This client's shard, in `0 .. world_size`. Default 0.
    #[serde(default)]
    pub rank: u32,
    /// Number of shards. Default 1.
    #[serde(default = "default_world_size")]
    pub world_size: u32,
    /// Which part of the time axis. Default `train`.
    #[serde(default)]
    pub split: SplitName,
    /// (train, validation) fractions of the time axis; `None`: the server's default.
    #[serde(default)]
    pub split_fractions: Option<[f64; 2]>,
    /// First instant (ISO 8601 UTC) not in the training split; goes with `validation_end`.
    #[serde(default)]
    pub train_end: Option<String>,
    /// First instant (ISO 8601 UTC) not in the validation split; goes with `train_end`.
    #[serde(default)]
    pub validation_end: Option<String>,
    /// Training order or ordered tiles. Default `training`.
    #[serde(default)]
    pub mode: ModeName,
    /// Normalized or physical values. Default `normalized`.
    #[serde(default)]
    pub units: UnitsName,
    /// Stop before this epoch (exclusive); `None`: stream forever.
    #[serde(default)]
    pub end_epoch: Option<u64>,
    /// Where to start: the `cursor_after` of the last complete batch; `None`: epoch 0's start.
    #[serde(default, with = "strict_cursor")]
    pub resume: Option<StreamCursor>,
    /// Time steps per planned block read; 0 = server default.
    #[serde(default)]
    pub block_steps: u32,
    /// Samples cut from each block per epoch; 0 = server default.
    #[serde(default)]
    pub samples_per_block: u64,
    /// Blocks open at once (the shuffle buffer); 0 = server default.
    #[serde(default)]
    pub buffer_blocks: u64,
    /// How centre latitudes are drawn in training mode. Default `area`.
    #[serde(default)]
    pub latitude_weighting: LatitudeWeightingName,
    /// Tiles mode: overlap of neighbouring tiles in grid points along (time, lat, lon).
    #[serde(default)]
    pub tile_overlap: [u32; 3],
    /// Tiles mode: first instant to tile (ISO 8601 UTC); `None`: the split's start.
    #[serde(default)]
    pub tile_time_start: Option<String>,
    /// Tiles mode: end of the tiled range (exclusive); `None`: the split's end.
    #[serde(default)]
    pub tile_time_end: Option<String>,
}

/// One field of a sample ([`crate::pb::FieldRequest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRequestConfig {
    /// Variable name in the store.
    pub name: String,
    /// Level values exactly as the store lists them; empty for a surface variable.
    #[serde(default)]
    pub levels: Vec<f64>,
    /// Tokens along (time, lat, lon).
    pub num_tokens: [u32; 3],
    /// Grid points per token along (time, lat, lon).
    pub token_size: [u32; 3],
    /// Gaussian blur sigma in grid points; 0 = none.
    #[serde(default)]
    pub blur_sigma: f64,
    /// How values are normalized in normalized units. Default `global`.
    #[serde(default)]
    pub normalization: NormalizationName,
    /// Positional encoding. Required: the schema has no default mode.
    pub pe: PeMode,
    /// Positional-encoding width (even, at least 2). Required.
    pub pe_width: u32,
    /// Self-supervised masking. Default none.
    #[serde(default)]
    pub mask: MaskConfig,
}

/// A field's masking ([`crate::pb::Mask`]), written as a table tagged by `kind`:
/// `{ kind = "bert", r_max = 0.5 }`, `{ kind = "forecast", steps = 2 }`, ….
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(from = "MaskRepr", into = "MaskRepr")]
pub enum MaskConfig {
    /// No masking: `target` is empty.
    #[default]
    None,
    /// A ratio r ~ U(0, `r_max`) of each sample's tokens is masked.
    Bert {
        /// Upper bound of the masking ratio, in [0, 1).
        r_max: f32,
        /// Probability that a masked token gets noise instead of `mask_value`. Default 0.1 (the
        /// schema's default, spelt out so the parsed config shows what the server applies).
        noise_fraction: f32,
        /// Value written into masked, non-noised tokens. Default 0.
        mask_value: f32,
    },
    /// The last `steps` token time slices are masked.
    Forecast {
        /// Token time slices masked at the end.
        steps: u32,
    },
    /// `steps` random interior token time slices are masked.
    Interpolation {
        /// Token time slices masked in the interior.
        steps: u32,
    },
}

/// [`MaskConfig`] as written in a file. `none` is an empty struct variant here because serde
/// ignores every key beside the tag of a unit variant, and `{ kind = "none", r_max = 0.5 }`
/// should be rejected like any other stray key.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum MaskRepr {
    None {},
    Bert {
        r_max: f32,
        #[serde(default = "default_noise_fraction")]
        noise_fraction: f32,
        #[serde(default)]
        mask_value: f32,
    },
    Forecast {
        steps: u32,
    },
    Interpolation {
        steps: u32,
    },
}

impl From<MaskRepr> for MaskConfig {
    fn from(repr: MaskRepr) -> Self {
        match repr {
            MaskRepr::None {} => Self::None,
            MaskRepr::Bert {
                r_max,
                noise_fraction,
                mask_value,
            } => Self::Bert {
                r_max,
                noise_fraction,
                mask_value,
            },
            MaskRepr::Forecast { steps } => Self::Forecast { steps },
            MaskRepr::Interpolation { steps } => Self::Interpolation { steps },
        }
    }
}

impl From<MaskConfig> for MaskRepr {
    fn from(mask: MaskConfig) -> Self {
        match mask {
            MaskConfig::None => Self::None {},
            MaskConfig::Bert {
                r_max,
                noise_fraction,
                mask_value,
            } => Self::Bert {
                r_max,
                noise_fraction,
                mask_value,
            },
            MaskConfig::Forecast { steps } => Self::Forecast { steps },
            MaskConfig::Interpolation { steps } => Self::Interpolation { steps },
        }
    }
}

/// Why a request file could not be turned into a [`RequestConfig`].
#[derive(Debug, thiserror::Error)]
pub enum RequestConfigError {
    /// The file could not be read.
    #[error("cannot read request file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML or not a valid request; `detail` is toml's message with the
    /// line, column and offending key.
    #[error("invalid request{}: {detail}", in_file(.path.as_deref()))]
    Parse {
        /// The file the text came from; `None` for [`RequestConfig::from_toml`].
        path: Option<PathBuf>,
        /// What is wrong, and where.
        detail: String,
    },
}

/// ` file <path>` when the text came from a file, else nothing.
fn in_file(path: Option<&Path>) -> String {
    path.map(|p| format!(" file {}", p.display()))
        .unwrap_or_default()
}

const fn default_batch_size() -> u32 {
    16
}

const fn default_world_size() -> u32 {
    1
}

const fn default_noise_fraction() -> f32 {
    0.1
}

impl RequestConfig {
    /// Reads and parses a request file.
    pub fn load(path: &Path) -> Result<Self, RequestConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| RequestConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            RequestConfigError::Parse { detail, .. } => RequestConfigError::Parse {
                path: Some(path.to_path_buf()),
                detail,
            },
            other => other,
        })
    }

    /// Parses a request from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, RequestConfigError> {
        toml::from_str(text).map_err(|e| RequestConfigError::Parse {
            path: None,
            // toml's message already says where (line, column, the source line) and what.
            detail: e.to_string().trim_end().to_owned(),
        })
    }
}

/// `resume` through a strict copy of [`StreamCursor`]: `StreamCursor`'s own serde derive accepts
/// unknown keys, and a misspelt key in a resume cursor must not go unnoticed.
mod strict_cursor {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::batch::StreamCursor;

    #[derive(Serialize, Deserialize)]
    #[serde(remote = "StreamCursor", deny_unknown_fields)]
    struct CursorDef {
        epoch: u64,
        position: u64,
    }

    #[derive(Serialize, Deserialize)]
    struct Strict(#[serde(with = "CursorDef")] StreamCursor);

    pub fn serialize<S: Serializer>(
        cursor: &Option<StreamCursor>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        cursor.map(Strict).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<StreamCursor>, D::Error> {
        Ok(Option::<Strict>::deserialize(d)?.map(|s| s.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use pb::mask::Kind;

    /// The ```toml block of the module documentation, so the reference stays parseable.
    fn doc_example() -> String {
        let source = include_str!("mod.rs");
        let mut lines = source
            .lines()
            .skip_while(|l| l.trim() != "//! ```toml")
            .skip(1);
        let mut text = String::new();
        for line in lines.by_ref() {
            if line.trim() == "//! ```" {
                return text;
            }
            let line = line.strip_prefix("//!").expect("doc line");
            text.push_str(line.strip_prefix(' ').unwrap_or(line));
            text.push('\n');
        }
        panic!("unterminated toml block in the module documentation");
    }

    /// Every key set to something other than its default.
    const FULL: &str = r#"
        dataset = "era5"
        batch_size = 4
        dtype = "bf16"
        seed = 42
        rank = 1
        world_size = 4
        split = "validation"
        split_fractions = [0.7, 0.2]
        train_end = "2017-01-01"
        validation_end = "2019-01-01T00:00:00Z"
        mode = "tiles"
        units = "physical"
        end_epoch = 5
        resume = { epoch = 3, position = 1024 }
        block_steps = 48
        samples_per_block = 64
        buffer_blocks = 8
        latitude_weighting = "uniform"
        tile_overlap = [1, 4, 8]
        tile_time_start = "2020-01-01"
        tile_time_end = "2020-02-01"

        [[fields]]
        name = "u"
        levels = [137.0, 96]
        num_tokens = [4, 6, 12]
        token_size = [3, 9, 9]
        blur_sigma = 0.5
        normalization = "local"
        pe = "info-standard"
        pe_width = 32
        mask = { kind = "forecast", steps = 2 }

        [[fields]]
        name = "t2m"
        num_tokens = [4, 6, 12]
        token_size = [3, 9, 9]
        normalization = "none"
        pe = "none"
        pe_width = 2
        [fields.mask]
        kind = "interpolation"
        steps = 1

        [[fields]]
        name = "v"
        levels = [850]
        num_tokens = [4, 6, 12]
        token_size = [3, 9, 9]
        pe = "standard"
        pe_width = 8
        mask = { kind = "bert", r_max = 0.25, noise_fraction = 0.5, mask_value = -1.5 }

        [[fields]]
        name = "w"
        num_tokens = [4, 6, 12]
        token_size = [3, 9, 9]
        pe = "global"
        pe_width = 4
        mask = { kind = "none" }
    "#;

    const MINIMAL: &str = r#"
        dataset = "era5"
        [[fields]]
        name = "t2m"
        num_tokens = [12, 6, 12]
        token_size = [3, 9, 9]
        pe = "global"
        pe_width = 16
    "#;

    fn parse_err(text: &str) -> String {
        match RequestConfig::from_toml(text) {
            Ok(config) => panic!("parsed: {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reference_example_maps_onto_the_wire() {
        let config = RequestConfig::from_toml(&doc_example()).unwrap();
        let request = config.to_proto();
        assert_eq!(request.dataset, "era5");
        assert_eq!(request.batch_size, 16);
        assert_eq!(request.dtype, pb::Dtype::F32 as i32);
        assert_eq!((request.seed, request.rank, request.world_size), (0, 0, 1));
        assert_eq!(request.mode, pb::Mode::Training as i32);
        assert_eq!(request.units, pb::Units::Normalized as i32);
        assert_eq!(
            request.latitude_weighting,
            pb::LatitudeWeighting::Area as i32
        );
        assert_eq!(request.end_epoch, None);
        assert_eq!(request.resume, None);
        // Zeros and the default overlap mean "server default": nothing to send.
        assert_eq!(request.read_plan, None);
        assert_eq!(request.tiles, None);
        // A split spec without dates.
        assert_eq!(
            request.split,
            Some(pb::SplitSpec {
                split: pb::Split::Train as i32,
                fractions: vec![0.8, 0.1],
                train_end: None,
                validation_end: None,
            })
        );

        let names: Vec<_> = request.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["t", "z"]);
        for field in &request.fields {
            assert_eq!(field.levels, [850.0, 500.0]);
            assert_eq!(field.num_tokens, [12, 6, 12]);
            assert_eq!(field.token_size, [3, 9, 9]);
            assert_eq!(field.blur_sigma, 0.0);
            assert_eq!(field.normalization, pb::Normalization::Global as i32);
            assert_eq!(field.pe, pb::PeMode::Local as i32);
            assert_eq!(field.pe_width, 16);
            // The explicit and the defaulted noise fraction agree.
            assert_eq!(
                field.mask,
                Some(pb::Mask {
                    kind: Some(Kind::Bert(pb::BertMask {
                        r_max: 0.5,
                        noise_fraction: Some(0.1),
                        mask_value: 0.0,
                    })),
                })
            );
        }
        // `z` leaves out what `t` spells out as defaults, so they differ only in the name.
        let z_as_t = FieldRequestConfig {
            name: "t".into(),
            ..config.fields[1].clone()
        };
        assert_eq!(config.fields[0], z_as_t);
    }

    #[test]
    fn every_key_maps_onto_the_wire() {
        let request = RequestConfig::from_toml(FULL).unwrap().to_proto();
        assert_eq!(request.dataset, "era5");
        assert_eq!(request.batch_size, 4);
        assert_eq!(request.dtype, pb::Dtype::Bf16 as i32);
        assert_eq!((request.seed, request.rank, request.world_size), (42, 1, 4));
        assert_eq!(request.mode, pb::Mode::Tiles as i32);
        assert_eq!(request.units, pb::Units::Physical as i32);
        assert_eq!(
            request.latitude_weighting,
            pb::LatitudeWeighting::Uniform as i32
        );
        assert_eq!(request.end_epoch, Some(5));
        assert_eq!(
            request.resume,
            Some(pb::Cursor {
                epoch: 3,
                position: 1024
            })
        );
        assert_eq!(
            request.read_plan,
            Some(pb::ReadPlan {
                block_steps: 48,
                samples_per_block: 64,
                buffer_blocks: 8,
            })
        );
        assert_eq!(
            request.tiles,
            Some(pb::TileOptions {
                overlap: vec![1, 4, 8],
                time_start: "2020-01-01".into(),
                time_end: "2020-02-01".into(),
            })
        );
        // A split spec with dates (passed on verbatim: the server parses them).
        assert_eq!(
            request.split,
            Some(pb::SplitSpec {
                split: pb::Split::Validation as i32,
                fractions: vec![0.7, 0.2],
                train_end: Some("2017-01-01".into()),
                validation_end: Some("2019-01-01T00:00:00Z".into()),
            })
        );

        let [u, t2m, v, w] = request.fields.as_slice() else {
            panic!("four fields expected");
        };
        assert_eq!(u.name, "u");
        assert_eq!(u.levels, [137.0, 96.0]);
        assert_eq!(u.num_tokens, [4, 6, 12]);
        assert_eq!(u.token_size, [3, 9, 9]);
        assert_eq!(u.blur_sigma, 0.5);
        assert_eq!(u.normalization, pb::Normalization::Local as i32);
        assert_eq!(u.pe, pb::PeMode::InfoStandard as i32);
        assert_eq!(u.pe_width, 32);
        assert_eq!(
            u.mask.unwrap().kind,
            Some(Kind::Forecast(pb::ForecastMask { steps: 2 }))
        );

        assert!(t2m.levels.is_empty());
        assert_eq!(t2m.normalization, pb::Normalization::None as i32);
        assert_eq!(t2m.pe, pb::PeMode::None as i32);
        assert_eq!(
            t2m.mask.unwrap().kind,
            Some(Kind::Interpolation(pb::InterpolationMask { steps: 1 }))
        );

        assert_eq!(v.pe, pb::PeMode::Standard as i32);
        assert_eq!(
            v.mask.unwrap().kind,
            Some(Kind::Bert(pb::BertMask {
                r_max: 0.25,
                noise_fraction: Some(0.5),
                mask_value: -1.5,
            }))
        );

        assert_eq!(w.pe, pb::PeMode::Global as i32);
        assert_eq!(w.mask.unwrap().kind, Some(Kind::None(pb::NoMask {})));
    }

    #[test]
    fn a_minimal_file_gets_the_defaults() {
        let config = RequestConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(
            config,
            RequestConfig {
                dataset: "era5".into(),
                fields: vec![FieldRequestConfig {
                    name: "t2m".into(),
                    levels: vec![],
                    num_tokens: [12, 6, 12],
                    token_size: [3, 9, 9],
                    blur_sigma: 0.0,
                    normalization: NormalizationName::Global,
                    pe: PeMode::Global,
                    pe_width: 16,
                    mask: MaskConfig::None,
                }],
                batch_size: 16,
                dtype: DtypeName::F32,
                seed: 0,
                rank: 0,
                world_size: 1,
                split: SplitName::Train,
                split_fractions: None,
                train_end: None,
                validation_end: None,
                mode: ModeName::Training,
                units: UnitsName::Normalized,
                end_epoch: None,
                resume: None,
                block_steps: 0,
                samples_per_block: 0,
                buffer_blocks: 0,
                latitude_weighting: LatitudeWeightingName::Area,
                tile_overlap: [0, 0, 0],
                tile_time_start: None,
                tile_time_end: None,
            }
        );
        let request = config.to_proto();
        assert_eq!(request.dtype, pb::Dtype::F32 as i32);
        assert_eq!(request.world_size, 1);
        assert_eq!(
            request.split,
            Some(pb::SplitSpec {
                split: pb::Split::Train as i32,
                ..Default::default()
            })
        );
        assert_eq!((request.read_plan, request.tiles), (None, None));
        assert_eq!(
            request.fields[0].mask.unwrap().kind,
            Some(Kind::None(pb::NoMask {}))
        );
        // The BERT mask's own defaults.
        let bert: MaskConfig = toml::from_str("kind = \"bert\"\nr_max = 0.5").unwrap();
        assert_eq!(
            bert,
            MaskConfig::Bert {
                r_max: 0.5,
                noise_fraction: 0.1,
                mask_value: 0.0
            }
        );
    }

    #[test]
    fn tile_options_are_sent_when_any_is_set() {
        let config = RequestConfig::from_toml(&format!(
            "tile_time_end = \"2021-01-01\"\nmode = \"tiles\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            config.to_proto().tiles,
            Some(pb::TileOptions {
                overlap: vec![0, 0, 0],
                time_start: String::new(),
                time_end: "2021-01-01".into(),
            })
        );
        let config = RequestConfig::from_toml(&format!("buffer_blocks = 2\n{MINIMAL}")).unwrap();
        assert_eq!(
            config.to_proto().read_plan,
            Some(pb::ReadPlan {
                buffer_blocks: 2,
                ..Default::default()
            })
        );
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = parse_err(&format!("datset = \"era5\"\n{MINIMAL}"));
        assert!(err.contains("datset"), "{err}");
        assert!(err.contains("line 1"), "{err}");
        assert!(err.starts_with("invalid request: "), "{err}");

        let err = parse_err(&format!("{MINIMAL}\npe_widht = 8"));
        assert!(err.contains("pe_widht"), "{err}");

        let err = parse_err(&format!(
            "{MINIMAL}\nmask = {{ kind = \"bert\", rmax = 0.5 }}"
        ));
        assert!(err.contains("rmax"), "{err}");

        let err = parse_err(&format!(
            "{MINIMAL}\nmask = {{ kind = \"none\", r_max = 0.5 }}"
        ));
        assert!(err.contains("r_max"), "{err}");

        let err = parse_err(&format!("{MINIMAL}\nmask = {{ kind = \"dropout\" }}"));
        assert!(err.contains("dropout"), "{err}");

        let err = parse_err(&format!(
            "resume = {{ epoch = 1, position = 2, positon = 3 }}\n{MINIMAL}"
        ));
        assert!(err.contains("positon"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected() {
        let err = parse_err(&MINIMAL.replace("pe = \"global\"\n", ""));
        assert!(err.contains("missing field `pe`"), "{err}");

        let err = parse_err(&MINIMAL.replace("[12, 6, 12]", "[12, 6]"));
        assert!(
            err.contains("num_tokens") || err.contains("length"),
            "{err}"
        );

        let err = parse_err(&format!("dtype = \"f64\"\n{MINIMAL}"));
        assert!(err.contains("f64") && err.contains("bf16"), "{err}");

        let err = parse_err(&MINIMAL.replace("\"global\"", "\"sinusoidal\""));
        assert!(err.contains("sinusoidal"), "{err}");
    }

    #[test]
    fn serializes_back_to_the_same_request() {
        for text in [doc_example().as_str(), FULL, MINIMAL] {
            let config = RequestConfig::from_toml(text).unwrap();
            let written = toml::to_string(&config).unwrap();
            assert_eq!(
                RequestConfig::from_toml(&written).unwrap(),
                config,
                "{written}"
            );
        }
    }

    #[test]
    fn name_enums_use_their_proto_counterparts() {
        assert_eq!(i32::from(DtypeName::Bf16), pb::Dtype::Bf16 as i32);
        assert_eq!(pb::Split::from(SplitName::Test), pb::Split::Test);
        assert_eq!(ModeName::Tiles.to_proto(), pb::Mode::Tiles);
        assert_eq!(UnitsName::Physical.to_proto(), pb::Units::Physical);
        assert_eq!(
            LatitudeWeightingName::Uniform.to_proto(),
            pb::LatitudeWeighting::Uniform
        );
        assert_eq!(NormalizationName::None.to_proto(), pb::Normalization::None);
        let name: SplitName = serde_json::from_str("\"validation\"").unwrap();
        assert_eq!(name, SplitName::Validation);
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("atmorep-request-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let good = dir.join("good.toml");
        std::fs::write(&good, MINIMAL).unwrap();
        assert_eq!(
            RequestConfig::load(&good).unwrap(),
            RequestConfig::from_toml(MINIMAL).unwrap()
        );

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "dataset = \"era5\"\nfields = []\nbatch = 3\n").unwrap();
        let err = RequestConfig::load(&bad).unwrap_err();
        assert!(
            matches!(&err, RequestConfigError::Parse { path: Some(p), .. } if *p == bad),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("bad.toml"), "{message}");
        assert!(message.contains("line 3"), "{message}");
        assert!(message.contains("batch"), "{message}");

        let missing = dir.join("missing.toml");
        let err = RequestConfig::load(&missing).unwrap_err();
        assert!(matches!(err, RequestConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.toml"), "{err}");

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
