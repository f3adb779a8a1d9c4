//! Terminal progress bars for the loader's long jobs (synthetic stores, statistics,
//! benchmarks) and for training runs: the libraries report through [`Progress`] and
//! `atmorep_trainer::RunProgress`, this draws.

#[cfg(feature = "trainer")]
use std::sync::{Arc, OnceLock};
use std::sync::{Mutex, PoisonError};

use atmorep_loader::progress::Progress;
#[cfg(feature = "trainer")]
use atmorep_trainer::RunProgress;
#[cfg(feature = "trainer")]
use atmorep_trainer::metrics_log::StepRecord;
use indicatif::{ProgressBar, ProgressStyle};

/// Draws each job reported to it as a bar on stderr, or nothing when hidden.
#[derive(Debug)]
pub struct Bars {
    show: bool,
    current: Mutex<Option<ProgressBar>>,
}

impl Bars {
    /// Bars that draw when `show` (off for `--json`, `--quiet` and the like).
    pub fn new(show: bool) -> Self {
        Self {
            show,
            current: Mutex::new(None),
        }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Progress for Bars {
    fn start(&self, what: &str, total: u64) {
        if !self.show {
            return;
        }
        let bar = ProgressBar::new(total)
            .with_prefix(what.to_string())
            .with_style(
                ProgressStyle::with_template(
                    "{prefix:>10} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
        if let Some(previous) = self.current().replace(bar) {
            previous.finish_and_clear();
        }
    }

    fn advance(&self, steps: u64) {
        if let Some(bar) = self.current().as_ref() {
            bar.inc(steps);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.current().take() {
            bar.finish_and_clear();
        }
    }
}

/// A training run's progress bar on stderr: steps, the loss, throughput, data wait and the last
/// validation loss. One bar per run; it appears when the run starts.
#[cfg(feature = "trainer")]
#[derive(Debug, Default)]
pub struct StepBar(OnceLock<ProgressBar>);

#[cfg(feature = "trainer")]
impl StepBar {
    /// A bar for `RunOptions::progress`, none when `quiet`.
    pub fn unless(quiet: bool) -> Option<Arc<dyn RunProgress>> {
        (!quiet).then(|| Arc::new(Self::default()) as Arc<dyn RunProgress>)
    }
}

#[cfg(feature = "trainer")]
impl RunProgress for StepBar {
    fn start(&self, step: u64, stop: u64) {
        self.0.get_or_init(|| {
            let bar = ProgressBar::new(stop).with_position(step);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} steps · {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
    }

    fn step(&self, record: &StepRecord) {
        let Some(bar) = self.0.get() else {
            return;
        };
        bar.set_position(record.step);
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
    }

    fn finish(&self) {
        if let Some(bar) = self.0.get() {
            bar.finish_and_clear();
        }
    }
}
