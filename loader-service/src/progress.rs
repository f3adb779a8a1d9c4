//! How long jobs (writing a synthetic store, computing statistics, benchmarks) say how far they
//! are. The library only reports; the command line draws the bars, and library callers and tests
//! pass [`NoProgress`].

/// Receives a job's progress. Jobs report from worker threads and async tasks, hence `Sync`.
pub trait Progress: Sync {
    /// A job named `what` of `total` steps begins; it replaces any job before it.
    fn start(&self, what: &str, total: u64) {
        let _ = (what, total);
    }

    /// `steps` more steps of the current job are done.
    fn advance(&self, steps: u64) {
        let _ = steps;
    }

    /// The current job is over.
    fn finish(&self) {}
}

/// Progress nobody watches.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}
