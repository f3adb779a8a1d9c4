//! `atmorep-trainer`: the AtmoRep-style multiformer in candle (docs/design.md §4).
//!
//! This crate owns the *model*: its configuration ([`config`]), the differentiable building
//! blocks candle-nn lacks ([`ops`]) and their fused CPU kernels ([`fused`]), token embedding with the aux-info variants ([`embed`]),
//! attention that can return its weights ([`attention`]), the field-coupled encoder layer
//! ([`encoder`]), the per-field decoder layer ([`decoder`]), the tail ([`tail`]), the whole
//! [`MultiFormer`] ([`model`]), losses on masked tokens ([`loss`]), seeded initialization
//! ([`init`]) and the step from the loader's decoded batches to tensors ([`batch`]).
//!
//! Training builds on it: AdamW with saveable moments, the LR schedule, clipping and
//! accumulation ([`optim`]), atomic checkpoints ([`checkpoint`]), per-step metrics as Parquet
//! and `metrics` gauges ([`metrics_log`]), the loop over the loader's gRPC stream with its
//! config ([`train`]) and, across processes, the collective operations of data-parallel training
//! ([`collective`]) and how NCCL ranks meet ([`rendezvous`]), the device the model computes on
//! (the CPU, or a GPU with the `cuda` feature: [`device`]), evaluation against baselines in
//! physical units ([`eval`]: the training split's per-point [`climatology`] among them, every
//! score with a [`bootstrap`] interval, an [`ensemble`]'s CRPS and spread–skill) and global
//! inference, every token predicted from the others
//! ([`infer`]); ablation studies run variants of one config on one stream and report them side
//! by side ([`ablation`]).
//!
//! ```no_run
//! use atmorep_trainer::{ModelConfig, MultiFormer};
//! use candle_core::{DType, Device};
//! let cfg = ModelConfig::tiny();
//! let (model, varmap) = MultiFormer::seeded(&cfg, 42, DType::F32, &Device::Cpu)?;
//! # let _ = (model, varmap);
//! # Ok::<(), atmorep_trainer::Error>(())
//! ```

pub mod ablation;
pub mod attention;
pub mod batch;
pub mod bootstrap;
pub mod checkpoint;
pub mod climatology;
pub mod collective;
pub mod config;
pub mod decoder;
pub mod device;
pub mod embed;
pub mod encoder;
pub mod ensemble;
pub mod error;
pub mod eval;
pub mod fused;
pub mod fused_attention;
pub mod fused_linear;
pub mod infer;
pub mod init;
pub mod loss;
pub mod metrics_log;
pub mod model;
pub mod ops;
pub mod optim;
mod product;
pub mod rendezvous;
pub mod tail;
mod toml_file;
pub mod train;

pub use batch::{FieldTensors, batch_tensors};
/// The tensor types, so a user of the trainer needs no candle dependency of its own.
pub use candle_core::{DType, Device};
pub use config::{AuxInfo, FieldSpec, ModelConfig};
pub use device::{DeviceError, DeviceSpec, device_from_str};
pub use error::{Error, Result};
pub use model::{AttentionMaps, FieldInput, MultiFormer};
pub use train::{RunOptions, RunProgress, RunSummary, TrainConfig, Trainer};
