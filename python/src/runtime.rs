//! The tokio runtime the client's background tasks run on: one per process, made again after a
//! `fork` (PyTorch's DataLoader workers are forked children of the process that may already
//! have streamed, and a forked child has none of its parent's threads).

use std::sync::{Arc, Mutex, PoisonError};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::Runtime;

static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// The runtime of this process, started on first use.
pub fn runtime() -> PyResult<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((owner, rt)) = slot.as_ref()
        && *owner == pid
    {
        return Ok(rt.clone());
    }
    // A runtime inherited through fork: its worker threads do not exist in this process, so
    // dropping it would wait for them forever. Leak it instead.
    if let Some((_, inherited)) = slot.take() {
        std::mem::forget(inherited);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("atmorep-client")
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("starting the client's runtime: {e}")))?;
    let rt = Arc::new(rt);
    *slot = Some((pid, rt.clone()));
    Ok(rt)
}
