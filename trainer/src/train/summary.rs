//! What a run is told and what it reports: where to stop and write and who watches
//! ([`RunOptions`], [`RunProgress`]), the per-step records and files of a run ([`RunSummary`]),
//! and the mean step time split into its parts ([`Breakdown`]).

use std::path::PathBuf;
use std::sync::Arc;

use crate::metrics_log::StepRecord;

/// How to run: where to stop, where to write, who watches.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Stop once this many optimizer steps have been taken in all (default: the config's
    /// `steps`). The schedule still spans the config's `steps`.
    pub stop_at: Option<u64>,
    /// Output folder for checkpoints and the metrics tables; `None`: write nothing.
    pub out: Option<PathBuf>,
    /// Told of each step (on rank 0 of a data-parallel run); `None`: nobody watches.
    pub progress: Option<Arc<dyn RunProgress>>,
    /// After the last step, time this many forward passes alone (no backward pass, no update)
    /// over the last step's batch, for [`RunSummary::forward_only`]; 0: none.
    pub forward_passes: usize,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("stop_at", &self.stop_at)
            .field("out", &self.out)
            .field("progress", &self.progress.is_some())
            .field("forward_passes", &self.forward_passes)
            .finish()
    }
}

/// Receives a run's progress: the library reports, the command line draws. Held across the
/// loop's awaits, hence `Send + Sync`.
pub trait RunProgress: Send + Sync {
    /// A run begins with `step` optimizer steps taken and stops at `stop`.
    fn start(&self, step: u64, stop: u64) {
        let _ = (step, stop);
    }

    /// Optimizer step `record.step` is done (its validation too, where one ran).
    fn step(&self, record: &StepRecord) {
        let _ = record;
    }

    /// The run is over.
    fn finish(&self) {}
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
    /// Forward passes alone over one batch ([`RunOptions::forward_passes`]), as eval and infer
    /// run the model: passes, tokens per pass and seconds in all.
    pub forward_only: Option<ForwardOnly>,
}

/// Timed forward passes of the model without backward passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardOnly {
    pub passes: usize,
    pub tokens_per_pass: u64,
    pub seconds: f64,
}

impl ForwardOnly {
    pub fn tokens_per_s(&self) -> f64 {
        (self.passes as u64 * self.tokens_per_pass) as f64 / self.seconds.max(1e-9)
    }
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
    /// Matrix-multiply GFLOP per second of the training step (three forward passes' worth,
    /// [`crate::ModelConfig::forward_flops_per_sample`]); 0 when not known.
    pub gflops: f64,
}

impl Breakdown {
    pub fn data_wait_fraction(&self) -> f64 {
        self.data_wait_s / self.step_s.max(1e-12)
    }

    /// A few lines for a terminal.
    pub fn to_text(&self) -> String {
        let pct = |s: f64| 100.0 * s / self.step_s.max(1e-12);
        format!(
            "{:.0} tokens/s, {:.1} GFLOP/s over {} steps; {:.2} ms per step: data wait {:.2} ms ({:.1}%), \
             forward {:.2} ms ({:.1}%), backward {:.2} ms ({:.1}%), optimizer {:.2} ms ({:.1}%)\n",
            self.tokens_per_s,
            self.gflops,
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

    /// [`Self::breakdown`] with the GFLOP/s of a model that costs `forward_flops_per_token`
    /// matrix-multiply FLOPs per token in a forward pass.
    pub fn breakdown_with_flops(&self, skip: usize, forward_flops_per_token: f64) -> Breakdown {
        let b = self.breakdown(skip);
        Breakdown {
            gflops: 3.0 * forward_flops_per_token * b.tokens_per_s / 1e9,
            ..b
        }
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
            gflops: 0.0,
        }
    }
}
