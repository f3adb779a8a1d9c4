//! Requests from Python: a dict with exactly the keys of the request TOML (see
//! `examples/request.toml`), or the path of such a file, checked here — before any network call —
//! by the same strict parser as `atmorep loader pull --request` (an unknown key or a value of the
//! wrong type is a `ValueError` naming the key).

use std::path::PathBuf;

use atmorep_proto::batch::StreamCursor;
use atmorep_proto::request::RequestConfig;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

/// `request` (a dict or a path) as a request.
pub fn request_config(request: &Bound<'_, PyAny>) -> PyResult<RequestConfig> {
    if let Ok(dict) = request.cast::<PyDict>() {
        let table = dict_to_table(dict, "")?;
        let text =
            toml::to_string(&table).map_err(|e| PyValueError::new_err(format!("request: {e}")))?;
        return RequestConfig::from_toml(&text).map_err(|e| PyValueError::new_err(e.to_string()));
    }
    if let Ok(path) = request.extract::<PathBuf>() {
        return RequestConfig::load(&path).map_err(|e| PyValueError::new_err(e.to_string()));
    }
    Err(PyTypeError::new_err(format!(
        "request must be a dict or the path of a request TOML file, not {}",
        request.get_type().name()?
    )))
}

/// A cursor dict `{"epoch": E, "position": P}` (exactly these keys).
pub fn cursor(resume: &Bound<'_, PyAny>) -> PyResult<StreamCursor> {
    let dict = resume.cast::<PyDict>().map_err(|_| {
        PyValueError::new_err("resume must be a cursor dict {\"epoch\": …, \"position\": …}")
    })?;
    let mut epoch = None;
    let mut position = None;
    for (key, value) in dict.iter() {
        let key: String = key
            .extract()
            .map_err(|_| PyValueError::new_err("resume: keys must be strings"))?;
        let number: u64 = value.extract().map_err(|_| {
            PyValueError::new_err(format!(
                "resume key `{key}`: expected a non-negative integer"
            ))
        })?;
        match key.as_str() {
            "epoch" => epoch = Some(number),
            "position" => position = Some(number),
            other => {
                return Err(PyValueError::new_err(format!(
                    "resume: unknown key `{other}`, expected `epoch` and `position`"
                )));
            }
        }
    }
    match (epoch, position) {
        (Some(epoch), Some(position)) => Ok(StreamCursor { epoch, position }),
        _ => Err(PyValueError::new_err(
            "resume: needs both `epoch` and `position`",
        )),
    }
}

/// The request `request` (a dict or the path of a request TOML file), checked and completed
/// with its defaults, as a dict of plain Python values.
///
/// Raises `ValueError` naming the key when the request is invalid.
#[pyfunction]
pub fn load_request<'py>(request: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let config = request_config(request)?;
    let json = serde_json::to_string(&config)
        .map_err(|e| PyValueError::new_err(format!("request: {e}")))?;
    let loads = request.py().import("json")?.getattr("loads")?;
    let value = loads.call1((json,))?;
    // Optional keys that are unset come out as None; the TOML form leaves them out.
    if let Ok(dict) = value.cast::<PyDict>() {
        let unset: Vec<Bound<'py, PyAny>> = dict
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect();
        for key in unset {
            dict.del_item(key)?;
        }
    }
    Ok(value)
}

fn dict_to_table(dict: &Bound<'_, PyDict>, path: &str) -> PyResult<toml::Table> {
    let mut table = toml::Table::new();
    for (key, value) in dict.iter() {
        let key: String = key.extract().map_err(|_| {
            PyValueError::new_err(format!(
                "request{}: keys must be strings, got {key:?}",
                at(path)
            ))
        })?;
        let child = join(path, &key);
        if value.is_none() {
            // None means "left out", as in the TOML file.
            continue;
        }
        table.insert(key, to_value(&value, &child)?);
    }
    Ok(table)
}

fn to_value(value: &Bound<'_, PyAny>, path: &str) -> PyResult<toml::Value> {
    if value.is_instance_of::<PyBool>() {
        return Ok(toml::Value::Boolean(value.extract()?));
    }
    if value.is_instance_of::<PyInt>() {
        let int: i64 = value.extract().map_err(|_| {
            PyValueError::new_err(format!("request key `{path}`: integer out of range"))
        })?;
        return Ok(toml::Value::Integer(int));
    }
    if value.is_instance_of::<PyFloat>() {
        return Ok(toml::Value::Float(value.extract()?));
    }
    if value.is_instance_of::<PyString>() {
        return Ok(toml::Value::String(value.extract()?));
    }
    if let Ok(dict) = value.cast::<PyDict>() {
        return Ok(toml::Value::Table(dict_to_table(dict, path)?));
    }
    if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        let items = value
            .try_iter()?
            .enumerate()
            .map(|(i, item)| to_value(&item?, &format!("{path}[{i}]")))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(toml::Value::Array(items));
    }
    // numpy scalars and other numbers: integers first, so 3 stays an integer.
    if value.hasattr("__index__")?
        && let Ok(int) = value.extract::<i64>()
    {
        return Ok(toml::Value::Integer(int));
    }
    if let Ok(float) = value.extract::<f64>() {
        return Ok(toml::Value::Float(float));
    }
    Err(PyValueError::new_err(format!(
        "request key `{path}`: unsupported value of type {}",
        value.get_type().name()?
    )))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" key `{path}`")
    }
}
