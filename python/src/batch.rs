//! `Batch` and `FieldBatch`: a decoded batch as numpy arrays that borrow the client's buffers.
//!
//! Each array's base object is a [`Buffer`] that owns the vector the client decoded into, so
//! no value is copied on the way to Python; when Python frees the last array of a buffer, an
//! `f32` buffer goes back to the stream's pool for the batches after it (see
//! `LoaderStream::recycle`). bf16 streams arrive as `uint16` arrays of the bf16 bits: the
//! client decodes every tensor to `f32`, and those values are exactly bf16 values, so taking
//! the upper halves (off the GIL) gives back the bits the server sent.

use std::sync::Arc;

use atmorep_proto::pool::BufferPool;
use atmorep_proto::tensor::f32_to_bf16;
use atmorep_proto::{Batch as RustBatch, FieldBatch as RustField, TOKEN_INFO_LEN};
use numpy::ndarray::{ArrayView, IxDyn};
use numpy::{Element, PyArray, PyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The values behind one numpy array.
enum Values {
    F32(Vec<f32>),
    U16(Vec<u16>),
    I64(Vec<i64>),
    U64(Vec<u64>),
}

/// Owns the vector behind a numpy array (its `base`): the array borrows it for as long as the
/// array lives, and an `f32` vector is handed to the pool when it goes.
#[pyclass(frozen, module = "atmorep._atmorep")]
struct Buffer {
    values: Values,
    shape: Vec<usize>,
    pool: Option<Arc<BufferPool>>,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let (Values::F32(values), Some(pool)) = (&mut self.values, &self.pool) {
            pool.give(std::mem::take(values));
        }
    }
}

/// A numpy array of `shape` over `values`, without a copy.
fn array<'py>(
    py: Python<'py>,
    values: Values,
    shape: Vec<usize>,
    pool: Option<&Arc<BufferPool>>,
) -> PyResult<Bound<'py, PyAny>> {
    let owner = Bound::new(
        py,
        Buffer {
            values,
            shape,
            pool: pool.cloned(),
        },
    )?;
    let buffer = owner.get();
    Ok(match &buffer.values {
        Values::F32(v) => borrow(v, &buffer.shape, &owner)?.into_any(),
        Values::U16(v) => borrow(v, &buffer.shape, &owner)?.into_any(),
        Values::I64(v) => borrow(v, &buffer.shape, &owner)?.into_any(),
        Values::U64(v) => borrow(v, &buffer.shape, &owner)?.into_any(),
    })
}

#[allow(unsafe_code)]
fn borrow<'py, T: Element>(
    values: &[T],
    shape: &[usize],
    owner: &Bound<'py, Buffer>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let view = ArrayView::from_shape(IxDyn(shape), values).map_err(|e| {
        pyo3::exceptions::PyValueError::new_err(format!("array of shape {shape:?}: {e}"))
    })?;
    // SAFETY: `owner` becomes the array's base object, so it outlives the array; it is frozen
    // and never touches its vector until it is dropped, so the memory stays where it is.
    Ok(unsafe { PyArray::borrow_from_array(&view, owner.clone().into_any()) })
}

/// One field of a decoded batch, before it meets Python: what can be done without the GIL.
pub struct Prepared {
    name: String,
    bf16: bool,
    source: Values,
    source_shape: [usize; 3],
    target: Values,
    target_shape: [usize; 2],
    masked_indices: Vec<i64>,
    masked_counts: Vec<i64>,
    token_info: Vec<f32>,
    token_info_shape: [usize; 3],
    pe: Values,
    pe_shape: [usize; 3],
    windows: Vec<i64>,
}

/// A batch ready for Python.
pub struct PreparedBatch {
    sample_ids: Vec<u64>,
    sample_epochs: Vec<u64>,
    cursor_after: (u64, u64),
    end_of_stream: bool,
    fields: Vec<Prepared>,
}

/// `bf16` bits of values that are bf16 values (exact), the `f32` buffer back to the pool.
fn to_bf16(values: Vec<f32>, pool: &BufferPool) -> Values {
    let bits = values.iter().map(|&v| f32_to_bf16(v)).collect();
    pool.give(values);
    Values::U16(bits)
}

impl PreparedBatch {
    /// Flattens masks and windows and, for a bf16 stream, narrows the values (off the GIL).
    pub fn new(batch: RustBatch, bf16: bool, pool: &BufferPool) -> Self {
        let fields = batch
            .fields
            .into_iter()
            .map(|field| prepare(field, bf16, pool))
            .collect();
        Self {
            sample_ids: batch.sample_ids,
            sample_epochs: batch.sample_epochs,
            cursor_after: (batch.cursor_after.epoch, batch.cursor_after.position),
            end_of_stream: batch.end_of_stream,
            fields,
        }
    }
}

fn prepare(field: RustField, bf16: bool, pool: &BufferPool) -> Prepared {
    let source_shape = field.source_shape;
    let target_shape = field.target_shape();
    let token_info_shape = [source_shape[0], source_shape[1], TOKEN_INFO_LEN];
    let pe_shape = field.pe_shape();
    let masked_counts = field
        .masked_indices
        .iter()
        .map(|m| m.len() as i64)
        .collect();
    let masked_indices = field
        .masked_indices
        .iter()
        .flatten()
        .map(|&i| i64::from(i))
        .collect();
    let windows = field
        .windows
        .iter()
        .flat_map(|w| {
            [
                w.time_start,
                w.lat_start,
                w.lon_start,
                w.size[0],
                w.size[1],
                w.size[2],
            ]
        })
        .map(|v| v as i64)
        .collect();
    let narrow = |values: Vec<f32>| {
        if bf16 {
            to_bf16(values, pool)
        } else {
            Values::F32(values)
        }
    };
    Prepared {
        name: field.name,
        bf16,
        source: narrow(field.source),
        source_shape,
        target: narrow(field.target),
        target_shape,
        masked_indices,
        masked_counts,
        token_info: field.token_info,
        token_info_shape,
        pe: narrow(field.pe),
        pe_shape,
        windows,
    }
}

/// One field of every sample of a batch (`B` samples, `N` tokens of `V` values, `M` masked
/// tokens in all, positional-encoding width `W`).
#[derive(Debug)]
#[pyclass(frozen, module = "atmorep._atmorep")]
pub struct FieldBatch {
    /// The field's name.
    #[pyo3(get)]
    name: String,
    /// `"float32"`, or `"bfloat16"` for a bf16 stream (whose value arrays are `uint16` bits).
    #[pyo3(get)]
    dtype: &'static str,
    /// Model input after masking, `[B, N, V]`.
    #[pyo3(get)]
    source: Py<PyAny>,
    /// Original values of the masked tokens, `[M, V]`, sample by sample.
    #[pyo3(get)]
    target: Py<PyAny>,
    /// Indices (in `0..N`) of the masked tokens, `[M]` int64, sample by sample, ascending.
    #[pyo3(get)]
    masked_indices: Py<PyAny>,
    /// Masked tokens per sample, `[B]` int64 (they sum to `M`).
    #[pyo3(get)]
    masked_counts: Py<PyAny>,
    /// Token info, `[B, N, 8]` float32.
    #[pyo3(get)]
    token_info: Py<PyAny>,
    /// Positional encoding, `[B, N, W]`.
    #[pyo3(get)]
    pe: Py<PyAny>,
    /// Where each sample was cut, `[B, 6]` int64: time, lat and lon start on the grid, then the
    /// window's size along (time, lat, lon).
    #[pyo3(get)]
    windows: Py<PyAny>,
}

#[pymethods]
impl FieldBatch {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let shape = self.source.bind(py).getattr("shape")?.repr()?;
        Ok(format!(
            "FieldBatch(name={:?}, dtype={}, source shape {shape})",
            self.name, self.dtype
        ))
    }
}

/// A decoded batch: the samples' ids and epochs, the fields, and the cursor to resume after it.
#[derive(Debug)]
#[pyclass(frozen, module = "atmorep._atmorep")]
pub struct Batch {
    /// The samples' ids within their epochs, `[B]` uint64.
    #[pyo3(get)]
    sample_ids: Py<PyAny>,
    /// Each sample's epoch, `[B]` uint64 (a batch may straddle two epochs).
    #[pyo3(get)]
    sample_epochs: Py<PyAny>,
    /// `True` on the last batch of a finite stream.
    #[pyo3(get)]
    end_of_stream: bool,
    /// Name → `FieldBatch`, in request order.
    #[pyo3(get)]
    fields: Py<PyDict>,
    cursor: (u64, u64),
}

#[pymethods]
impl Batch {
    /// The stream position right after this batch: pass it as `resume` to continue there.
    #[getter]
    fn cursor_after<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("epoch", self.cursor.0)?;
        dict.set_item("position", self.cursor.1)?;
        Ok(dict)
    }

    /// Number of samples.
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.sample_ids.bind(py).len()
    }

    /// The batch as a dict of torch tensors made without copying: `sample_ids`,
    /// `sample_epochs`, `cursor_after`, and per field name a dict of `source`, `target`,
    /// `masked_indices`, `masked_counts`, `token_info`, `pe` (bf16 streams as `torch.bfloat16`),
    /// moved to `device` when given.
    #[pyo3(signature = (device=None))]
    fn to_torch<'py>(
        slf: &Bound<'py, Self>,
        device: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("atmorep._convert")?
            .call_method1("batch_to_torch", (slf, device))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let names: Vec<String> = self.fields.bind(py).keys().extract()?;
        Ok(format!(
            "Batch({} samples, fields {names:?}, cursor_after=(epoch {}, position {}))",
            self.__len__(py)?,
            self.cursor.0,
            self.cursor.1
        ))
    }
}

/// Makes the Python objects of `batch` (with the GIL; nothing is copied).
pub fn to_python(py: Python<'_>, batch: PreparedBatch, pool: &Arc<BufferPool>) -> PyResult<Batch> {
    let b = batch.sample_ids.len();
    let fields = PyDict::new(py);
    for f in batch.fields {
        let obj = FieldBatch {
            dtype: if f.bf16 { "bfloat16" } else { "float32" },
            source: array(py, f.source, f.source_shape.to_vec(), Some(pool))?.unbind(),
            target: array(py, f.target, f.target_shape.to_vec(), Some(pool))?.unbind(),
            masked_indices: {
                let m = f.masked_indices.len();
                array(py, Values::I64(f.masked_indices), vec![m], None)?.unbind()
            },
            masked_counts: array(py, Values::I64(f.masked_counts), vec![b], None)?.unbind(),
            token_info: array(
                py,
                Values::F32(f.token_info),
                f.token_info_shape.to_vec(),
                Some(pool),
            )?
            .unbind(),
            pe: array(py, f.pe, f.pe_shape.to_vec(), Some(pool))?.unbind(),
            windows: array(py, Values::I64(f.windows), vec![b, 6], None)?.unbind(),
            name: f.name.clone(),
        };
        fields.set_item(f.name, Bound::new(py, obj)?)?;
    }
    Ok(Batch {
        sample_ids: array(py, Values::U64(batch.sample_ids), vec![b], None)?.unbind(),
        sample_epochs: array(py, Values::U64(batch.sample_epochs), vec![b], None)?.unbind(),
        end_of_stream: batch.end_of_stream,
        fields: fields.unbind(),
        cursor: batch.cursor_after,
    })
}
