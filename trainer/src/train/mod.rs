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
//!
//! The module is split by concern: the config, the trainer's set-up and resumption from a
//! checkpoint, the batch loss across ranks, the loop, validation, and what a run reports.

mod config;
mod objective;
mod run;
mod setup;
mod summary;
mod validation;

pub use config::{CheckpointConfig, TaskConfig, TrainConfig, ValidationConfig};
pub use setup::Trainer;
pub use summary::{Breakdown, ForwardOnly, RunOptions, RunProgress, RunSummary};
pub use validation::Validation;
