//! The native half of the `atmorep` Python package: [`Client`] wraps the Rust
//! [`LoaderClient`](atmorep_proto::LoaderClient) of atmorep-proto — failover, reconnection with
//! resume, striping, large HTTP/2 frames and buffer recycling — and hands its decoded batches to
//! Python as numpy arrays that borrow the client's buffers (docs/design.md §4 describes the
//! stream; python/README.md the Python API).
//!
//! The pure-Python half (python/atmorep/) adds the PyTorch conversions and `LoaderDataset`.

mod batch;
mod client;
mod error;
mod request;
mod runtime;

use pyo3::prelude::*;

/// The extension module `atmorep._atmorep`, re-exported by `atmorep/__init__.py`.
#[pymodule]
fn _atmorep(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    m.add_class::<client::Stream>()?;
    m.add_class::<batch::Batch>()?;
    m.add_class::<batch::FieldBatch>()?;
    m.add("LoaderError", m.py().get_type::<error::LoaderError>())?;
    m.add_function(wrap_pyfunction!(request::load_request, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
