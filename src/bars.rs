//! Terminal progress bars for the loader's long jobs (synthetic stores, statistics,
//! benchmarks): the loader reports through [`Progress`], this draws.

use std::sync::{Mutex, PoisonError};

use atmorep_loader::progress::Progress;
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
