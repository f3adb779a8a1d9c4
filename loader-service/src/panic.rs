//! Panics contained to the work that hit them: a bug (or a chunk whose bytes trip one) in a
//! decode on the shared rayon pool, a sample task or a stream's task fails only the stream that
//! ran it — INTERNAL to its client, an error line in the log and `atmorep_panics_total` — and
//! the server keeps serving everyone else (docs/operations.md, "Failures and restarts").
//!
//! The test hooks [`DECODE_PANIC_ENV`] and [`SAMPLE_PANIC_ENV`] make decodes or sample tasks
//! panic on purpose. They are read from the server's own environment once, so no client request
//! can turn them on, and cost one load of an initialised `OnceLock` per decoded chunk or sample
//! when unset.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use futures::FutureExt;

/// Test hook: every chunk decode whose `STORE_URL/ARRAY/KEY` contains this variable's value
/// panics (an empty value matches nothing).
pub const DECODE_PANIC_ENV: &str = "ATMOREP_FAULT_DECODE_PANIC";

/// Test hook: every sample task of a stream whose dataset's store URL contains this variable's
/// value panics before it reads anything (an empty value matches nothing).
pub const SAMPLE_PANIC_ENV: &str = "ATMOREP_FAULT_SAMPLE_PANIC";

/// A panic caught where it happened, with the place and the panic's message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("panic in {place}: {message}")]
pub struct Panicked {
    /// What was running: `decode`, `sample task`, `batch task`, `stream task`, `GetSample`.
    pub place: &'static str,
    pub message: String,
}

impl Panicked {
    /// The caught `payload` of a panic in `place`, logged and counted.
    pub fn caught(place: &'static str, payload: &(dyn Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        tracing::error!(place, %message, "panic contained; only its stream fails");
        metrics::counter!("atmorep_panics_total", "place" => place).increment(1);
        Self { place, message }
    }
}

/// Runs `work` and turns a panic in it into [`Panicked`].
pub fn catch<T>(place: &'static str, work: impl FnOnce() -> T) -> Result<T, Panicked> {
    std::panic::catch_unwind(AssertUnwindSafe(work)).map_err(|p| Panicked::caught(place, &*p))
}

/// Awaits `future` and turns a panic while polling it into [`Panicked`].
pub async fn contain<F: Future>(place: &'static str, future: F) -> Result<F::Output, Panicked> {
    AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|p| Panicked::caught(place, &*p))
}

/// Panics if the [`DECODE_PANIC_ENV`] hook matches the chunk `what` (`STORE_URL/ARRAY/KEY`).
pub(crate) fn decode_hook(what: impl FnOnce() -> String) {
    static PATTERN: OnceLock<Option<String>> = OnceLock::new();
    hook(DECODE_PANIC_ENV, &PATTERN, "decoding", what);
}

/// Panics if the [`SAMPLE_PANIC_ENV`] hook matches the store URL `what` of a sample's dataset.
pub(crate) fn sample_hook(what: impl FnOnce() -> String) {
    static PATTERN: OnceLock<Option<String>> = OnceLock::new();
    hook(SAMPLE_PANIC_ENV, &PATTERN, "in a sample task of", what);
}

fn hook(var: &str, pattern: &OnceLock<Option<String>>, doing: &str, what: impl FnOnce() -> String) {
    let pattern = pattern.get_or_init(|| std::env::var(var).ok().filter(|p| !p.is_empty()));
    if let Some(pattern) = pattern {
        let what = what();
        if what.contains(pattern.as_str()) {
            panic!("{var}={pattern}: injected panic {doing} `{what}`");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        let err = catch("decode", || -> u32 { panic!("boom {}", 7) }).unwrap_err();
        assert_eq!((err.place, err.message.as_str()), ("decode", "boom 7"));
        assert_eq!(catch("decode", || 3).unwrap(), 3);
    }

    #[tokio::test]
    async fn a_panicking_future_becomes_an_error() {
        let err = contain("sample task", async { panic!("static") })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "panic in sample task: static");
    }
}
