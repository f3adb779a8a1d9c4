//! `atmorep.Client` and the iterator `Stream` its `stream` method returns.
//!
//! Every wait on the network and every decode runs with the GIL released (other Python threads,
//! such as a training loop's, go on meanwhile); the waits wake every 100 ms to let Ctrl-C
//! through.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use atmorep_proto::client::is_retryable;
use atmorep_proto::pool::BufferPool;
use atmorep_proto::{ClientConfig, ClientError, LoaderClient, LoaderStream, StreamStats, pb};
use numpy::PyArray1;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tokio::runtime::Runtime;
use tonic::Status;

use crate::batch::{Batch, PreparedBatch, to_python};
use crate::error::loader_error;
use crate::request::{cursor, request_config};
use crate::runtime::runtime;

/// How often a blocked call looks for pending signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// A client of one or more equivalent loaders (see python/README.md).
#[derive(Debug)]
#[pyclass(frozen, module = "atmorep._atmorep")]
pub struct Client {
    config: ClientConfig,
    /// The connected client and the process it was made in (a forked child makes its own).
    inner: Mutex<Option<(u32, LoaderClient)>>,
    /// Whether a loader ever answered. Until one has, a call gives up after `connect_timeout`
    /// (nothing listening is a configuration error, not a loader restart worth waiting for);
    /// from then on after `retry_timeout`.
    contacted: Arc<AtomicBool>,
}

/// The error of a client that reached no loader within its connect timeout.
fn unreachable(endpoints: &[String], timeout: Duration) -> ClientError {
    Status::unavailable(format!(
        "no loader answered at {} within the connect timeout of {:.1} s",
        endpoints.join(", "),
        timeout.as_secs_f64()
    ))
    .into()
}

/// `endpoints` as a list: a string (comma-separated) or a sequence of strings.
fn endpoint_list(endpoints: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let list: Vec<String> = if let Ok(s) = endpoints.extract::<String>() {
        s.split(',').map(|e| e.trim().to_string()).collect()
    } else {
        endpoints.extract().map_err(|_| {
            PyTypeError::new_err(
                "endpoints must be a string (comma-separated) or a list of strings",
            )
        })?
    };
    let list: Vec<String> = list.into_iter().filter(|e| !e.is_empty()).collect();
    if list.is_empty() {
        return Err(PyValueError::new_err("endpoints: no loader endpoint given"));
    }
    Ok(list)
}

/// The CA: PEM text or bytes, or the path of a PEM file.
fn ca_pem(ca: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if !ca.is_instance_of::<pyo3::types::PyString>()
        && let Ok(bytes) = ca.extract::<Vec<u8>>()
    {
        return Ok(bytes);
    }
    if let Ok(text) = ca.extract::<String>()
        && text.contains("-----BEGIN")
    {
        return Ok(text.into_bytes());
    }
    let path: PathBuf = ca.extract().map_err(|_| {
        PyTypeError::new_err("ca must be PEM text or bytes, or the path of a PEM file")
    })?;
    std::fs::read(&path)
        .map_err(|e| PyValueError::new_err(format!("ca: reading {}: {e}", path.display())))
}

fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| PyValueError::new_err(format!("{what}: expected seconds ≥ 0, got {value}")))
}

impl Client {
    /// The runtime and a client of this process with `prefetch` batches of prefetch.
    fn connected(&self, prefetch: usize) -> PyResult<(Arc<Runtime>, LoaderClient)> {
        let rt = runtime()?;
        let pid = std::process::id();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((owner, client)) = inner.as_ref()
            && *owner == pid
            && client.config().prefetch == prefetch
        {
            return Ok((rt, client.clone()));
        }
        let mut config = self.config.clone();
        config.prefetch = prefetch;
        let client = rt
            .block_on(LoaderClient::connect(config))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        if prefetch == self.config.prefetch {
            *inner = Some((pid, client.clone()));
        }
        Ok((rt, client))
    }

    /// Runs the future `call` makes on the runtime with the GIL released, waking for signals.
    fn call<T, F>(&self, py: Python<'_>, call: impl FnOnce(LoaderClient) -> F) -> PyResult<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ClientError>> + Send + 'static,
    {
        let (rt, client) = self.connected(self.config.prefetch)?;
        let contacted = self.contacted.clone();
        let first = !contacted.load(Ordering::Relaxed);
        let (timeout, endpoints) = (self.config.connect_timeout, self.config.endpoints.clone());
        let call = call(client);
        let handle = rt.spawn(async move {
            let result = if first {
                tokio::time::timeout(timeout, call)
                    .await
                    .unwrap_or_else(|_| Err(unreachable(&endpoints, timeout)))
            } else {
                call.await
            };
            // A status the server sent (not one made from a transport failure) is an answer.
            let answered = match &result {
                Ok(_) => true,
                Err(err) => err.status().is_some_and(|s| !is_retryable(s)),
            };
            if answered {
                contacted.store(true, Ordering::Relaxed);
            }
            result
        });
        wait(py, &rt, handle)
    }
}

/// Waits for `handle` with the GIL released, checking for signals in between.
fn wait<T: Send + 'static>(
    py: Python<'_>,
    rt: &Runtime,
    mut handle: tokio::task::JoinHandle<Result<T, ClientError>>,
) -> PyResult<T> {
    loop {
        let done = py.detach(|| {
            rt.block_on(async { tokio::time::timeout(SIGNAL_POLL, &mut handle).await.ok() })
        });
        match done {
            None => {
                if let Err(e) = py.check_signals() {
                    handle.abort();
                    return Err(e);
                }
            }
            Some(Ok(Ok(value))) => return Ok(value),
            Some(Ok(Err(err))) => return Err(loader_error(py, &err)),
            Some(Err(join)) => {
                return Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "the loader call's task failed: {join}"
                )));
            }
        }
    }
}

#[pymethods]
impl Client {
    /// A client of the loaders at `endpoints` (`host:port`, `http://…` or `https://…`; a string,
    /// comma-separated, or a list), tried in turn when one fails. `token` is sent as a bearer
    /// token; `ca` (PEM text or bytes, or a file path) turns on TLS; `stripe` spreads a training
    /// stream over all endpoints at once. Nothing is connected until the first call; a loader
    /// that is down is retried (next endpoint, exponential backoff) for `retry_timeout` seconds
    /// after the last batch or answer, then the call raises `LoaderError` with code
    /// `UNAVAILABLE`; until a loader has answered once, `connect_timeout` seconds.
    #[new]
    #[pyo3(signature = (endpoints, token=None, ca=None, stripe=false, *, tls_domain=None, connect_timeout=5.0, retry_timeout=60.0, compression=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        endpoints: &Bound<'_, PyAny>,
        token: Option<String>,
        ca: Option<&Bound<'_, PyAny>>,
        stripe: bool,
        tls_domain: Option<String>,
        connect_timeout: f64,
        retry_timeout: f64,
        compression: Option<String>,
    ) -> PyResult<Self> {
        let mut config = ClientConfig::new(endpoint_list(endpoints)?);
        config.bearer_token = token;
        config.tls_ca_pem = ca.map(ca_pem).transpose()?;
        config.tls_domain = tls_domain;
        config.stripe = stripe;
        config.connect_timeout = seconds("connect_timeout", connect_timeout)?;
        config.reconnect.give_up_after = Some(seconds("retry_timeout", retry_timeout)?);
        config.compression = match compression.as_deref() {
            None => None,
            Some("gzip") => Some(atmorep_proto::client::Compression::Gzip),
            Some("zstd") => Some(atmorep_proto::client::Compression::Zstd),
            Some(other) => {
                return Err(PyValueError::new_err(format!(
                    "compression: expected \"gzip\", \"zstd\" or None, got {other:?}"
                )));
            }
        };
        let client = Self {
            config,
            inner: Mutex::new(None),
            contacted: Arc::default(),
        };
        // Checks endpoints, TLS settings and the token now (no connection is opened).
        client.connected(client.config.prefetch)?;
        Ok(client)
    }

    /// The loader endpoints, in order.
    #[getter]
    fn endpoints(&self) -> Vec<String> {
        self.config.endpoints.clone()
    }

    /// The names of the datasets the loader serves.
    fn datasets(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let list = self.call(py, |c| async move { c.list_datasets().await })?;
        Ok(list.into_iter().map(|d| d.name).collect())
    }

    /// What `name` holds and what a request may ask of it: `variables` (name → long name,
    /// units, levels, dims, chunk shape, stored dtype), `grid`, `time`, `statistics` (which
    /// normalizations are available) and `limits` (largest window, tokens, batch size and
    /// positional-encoding width, and the encodings served).
    fn dataset_info<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyDict>> {
        let info = self.call(py, |c| async move { c.dataset_info(&name).await })?;
        info_dict(py, &info)
    }

    /// The monthly global statistics of `variable` in `dataset`: a dict of equally long numpy
    /// arrays, one entry per (level, year, month): `level`, `year`, `month`, `count`, `mean`,
    /// `std`, `min`, `max`.
    fn statistics<'py>(
        &self,
        py: Python<'py>,
        dataset: String,
        variable: String,
    ) -> PyResult<Bound<'py, PyDict>> {
        let vars = vec![variable.clone()];
        let stats = self.call(py, |c| async move { c.statistics(&dataset, &vars).await })?;
        let rows: Vec<pb::MonthlyMoments> = stats
            .to_proto()
            .global
            .into_iter()
            .filter(|m| m.variable == variable)
            .collect();
        let dict = PyDict::new(py);
        macro_rules! column {
            ($name:ident) => {
                dict.set_item(
                    stringify!($name),
                    PyArray1::from_vec(py, rows.iter().map(|m| m.$name).collect()),
                )?;
            };
        }
        column!(level);
        column!(year);
        column!(month);
        column!(count);
        column!(mean);
        column!(std);
        column!(min);
        column!(max);
        Ok(dict)
    }

    /// The batches of `request` (a dict with the keys of the request TOML, or the path of such
    /// a file), from `resume` (a cursor dict, e.g. a batch's `cursor_after`) or the request's
    /// own start, with up to `prefetch` batches decoded ahead. The request is checked first: a
    /// bad one raises `ValueError` naming the key, before any network call.
    #[pyo3(signature = (request, resume=None, prefetch=4))]
    fn stream(
        &self,
        request: &Bound<'_, PyAny>,
        resume: Option<&Bound<'_, PyAny>>,
        prefetch: usize,
    ) -> PyResult<Stream> {
        let mut request = request_config(request)?.to_proto();
        if let Some(resume) = resume {
            request.resume = Some(cursor(resume)?.into());
        }
        if prefetch == 0 {
            return Err(PyValueError::new_err("prefetch: at least 1"));
        }
        let bf16 = request.dtype == pb::Dtype::Bf16 as i32;
        let (rt, client) = self.connected(prefetch)?;
        let stream = {
            let _entered = rt.enter();
            client.stream(request)
        };
        let give_up_at = (!self.contacted.load(Ordering::Relaxed))
            .then(|| Instant::now() + self.config.connect_timeout);
        Ok(Stream {
            contacted: self.contacted.clone(),
            give_up_at,
            endpoints: self.config.endpoints.clone(),
            connect_timeout: self.config.connect_timeout,
            pool: stream.buffer_pool().clone(),
            inner: Mutex::new(Some(stream)),
            rt,
            bf16,
            final_stats: Mutex::default(),
        })
    }

    fn __repr__(&self) -> String {
        format!("Client({:?})", self.config.endpoints)
    }
}

fn info_dict<'py>(py: Python<'py>, info: &pb::DatasetInfo) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("name", &info.name)?;
    dict.set_item("description", &info.description)?;
    let variables = PyDict::new(py);
    for v in &info.variables {
        let d = PyDict::new(py);
        d.set_item("long_name", &v.long_name)?;
        d.set_item("units", &v.units)?;
        d.set_item("levels", PyList::new(py, &v.levels)?)?;
        d.set_item("dims", PyList::new(py, &v.dims)?)?;
        d.set_item("chunk_shape", PyList::new(py, &v.chunk_shape)?)?;
        d.set_item("stored_dtype", &v.stored_dtype)?;
        variables.set_item(&v.name, d)?;
    }
    dict.set_item("variables", variables)?;
    if let Some(g) = &info.grid {
        let d = PyDict::new(py);
        d.set_item("nlat", g.nlat)?;
        d.set_item("nlon", g.nlon)?;
        d.set_item("lat_first", g.lat_first)?;
        d.set_item("lat_step", g.lat_step)?;
        d.set_item("lon_first", g.lon_first)?;
        d.set_item("lon_step", g.lon_step)?;
        dict.set_item("grid", d)?;
    }
    if let Some(t) = &info.time {
        let d = PyDict::new(py);
        d.set_item("start", &t.start)?;
        d.set_item("end", &t.end)?;
        d.set_item("start_unix", t.start_unix)?;
        d.set_item("end_unix", t.end_unix)?;
        d.set_item("step_hours", t.step_hours)?;
        d.set_item("count", t.count)?;
        dict.set_item("time", d)?;
    }
    if let Some(s) = &info.statistics {
        let d = PyDict::new(py);
        d.set_item("global", PyList::new(py, &s.global)?)?;
        d.set_item("local", PyList::new(py, &s.local)?)?;
        d.set_item("global_first_year", s.global_first_year)?;
        d.set_item("global_last_year", s.global_last_year)?;
        if let Some(c) = &s.global_coverage {
            let cov = PyDict::new(py);
            cov.set_item("first_step", &c.first_step)?;
            cov.set_item("last_step", &c.last_step)?;
            cov.set_item("every_steps", c.every_steps)?;
            cov.set_item("steps_read", c.steps_read)?;
            cov.set_item("store_steps", c.store_steps)?;
            cov.set_item("variables", PyList::new(py, &c.variables)?)?;
            cov.set_item("levels", PyList::new(py, &c.levels)?)?;
            d.set_item("global_coverage", cov)?;
        }
        dict.set_item("statistics", d)?;
    }
    if let Some(g) = &info.geometry {
        let d = PyDict::new(py);
        d.set_item("max_window", PyList::new(py, &g.max_window)?)?;
        d.set_item("max_tokens", g.max_tokens)?;
        d.set_item("max_batch_size", g.max_batch_size)?;
        let modes: Vec<&str> = g
            .pe_modes
            .iter()
            .filter_map(|&m| pb::PeMode::try_from(m).ok())
            .map(|m| m.as_str_name())
            .collect();
        d.set_item("pe_modes", modes)?;
        d.set_item("max_pe_width", g.max_pe_width)?;
        d.set_item("max_batch_bytes", g.max_batch_bytes)?;
        d.set_item("max_window_bytes", g.max_window_bytes)?;
        d.set_item("max_samples_per_epoch", g.max_samples_per_epoch)?;
        d.set_item("max_blur_sigma", g.max_blur_sigma)?;
        dict.set_item("limits", d)?;
    }
    Ok(dict)
}

/// The batches of one request (`Client.stream`): iterate it; it ends after the last batch of a
/// finite request and raises `LoaderError` when the stream fails for good.
#[derive(Debug)]
#[pyclass(frozen, module = "atmorep._atmorep")]
pub struct Stream {
    inner: Mutex<Option<LoaderStream>>,
    rt: Arc<Runtime>,
    pool: Arc<BufferPool>,
    bf16: bool,
    /// The counters as the stream ended (its task is gone then).
    final_stats: Mutex<StreamStats>,
    /// The client's "a loader answered" flag, and when to give up if none has by then.
    contacted: Arc<AtomicBool>,
    give_up_at: Option<Instant>,
    endpoints: Vec<String>,
    connect_timeout: Duration,
}

/// What one wait for the next batch came to.
enum Step {
    Pending,
    End,
    Failed(ClientError),
    Batch(PreparedBatch),
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Batch>> {
        loop {
            let step = py.detach(|| {
                let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(stream) = guard.as_mut() else {
                    return Step::End;
                };
                match self
                    .rt
                    .block_on(async { tokio::time::timeout(SIGNAL_POLL, stream.next()).await })
                {
                    Err(_) => Step::Pending,
                    Ok(None) => {
                        self.finish(&mut guard);
                        Step::End
                    }
                    Ok(Some(Err(err))) => {
                        self.finish(&mut guard);
                        Step::Failed(err)
                    }
                    Ok(Some(Ok(batch))) => {
                        Step::Batch(PreparedBatch::new(batch, self.bf16, &self.pool))
                    }
                }
            });
            match step {
                Step::Pending => {
                    py.check_signals()?;
                    if self.unreachable() {
                        let err = unreachable(&self.endpoints, self.connect_timeout);
                        self.close();
                        return Err(loader_error(py, &err));
                    }
                }
                Step::End => return Ok(None),
                Step::Failed(err) => return Err(loader_error(py, &err)),
                Step::Batch(batch) => {
                    self.contacted.store(true, Ordering::Relaxed);
                    return to_python(py, batch, &self.pool).map(Some);
                }
            }
        }
    }

    /// The `cursor_after` of the last batch delivered (None before the first).
    #[getter]
    fn cursor<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(c) = guard.as_ref().and_then(LoaderStream::cursor) else {
            return Ok(None);
        };
        let dict = PyDict::new(py);
        dict.set_item("epoch", c.epoch)?;
        dict.set_item("position", c.position)?;
        Ok(Some(dict))
    }

    /// The stream's counters: `reconnects`, `bytes_received`, `messages_received`,
    /// `batches_received`, `batches_delivered`, `discarded_messages`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let s = match guard.as_ref() {
            Some(stream) => stream.stats(),
            None => *self
                .final_stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        };
        let dict = PyDict::new(py);
        dict.set_item("reconnects", s.reconnects)?;
        dict.set_item("bytes_received", s.bytes_received)?;
        dict.set_item("messages_received", s.messages_received)?;
        dict.set_item("batches_received", s.batches_received)?;
        dict.set_item("batches_delivered", s.batches_delivered)?;
        dict.set_item("discarded_messages", s.discarded_messages)?;
        Ok(dict)
    }

    /// Stops the stream (its background task and call); iteration ends.
    fn close(&self) {
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        self.finish(&mut guard);
    }
}

impl Stream {
    /// No loader has ever answered this client, the connect timeout has passed and the calls
    /// failed (a loader that answers but is slow to send the first batch is waited for).
    fn unreachable(&self) -> bool {
        let Some(deadline) = self.give_up_at else {
            return false;
        };
        if self.contacted.load(Ordering::Relaxed) || Instant::now() < deadline {
            return false;
        }
        let guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        guard
            .as_ref()
            .is_some_and(|s| s.stats().reconnects > 0 && s.stats().messages_received == 0)
    }

    /// Drops the stream (stopping its task), keeping its counters.
    fn finish(&self, stream: &mut Option<LoaderStream>) {
        if let Some(stream) = stream.take() {
            *self
                .final_stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = stream.stats();
        }
    }
}
