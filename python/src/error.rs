//! `atmorep.LoaderError`: a failed loader call, with the gRPC status name in `.code`.

use atmorep_proto::ClientError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use tonic_code::name;

create_exception!(
    atmorep,
    LoaderError,
    PyException,
    "A loader call failed. `code` is the gRPC status name (e.g. \"INVALID_ARGUMENT\", \
     \"UNAVAILABLE\"), or None when no status is behind the failure (a malformed batch); \
     `message` is the server's message, which names the offending request field."
);

/// `err` as a `LoaderError` with `code` and `message` set.
pub fn loader_error(py: Python<'_>, err: &ClientError) -> PyErr {
    let code = err.code().map(name);
    let message = match err.status() {
        Some(status) => status.message().to_string(),
        None => err.to_string(),
    };
    let py_err = LoaderError::new_err(err.to_string());
    let value = py_err.value(py);
    // Setting attributes on a fresh exception instance cannot fail.
    let _ = value.setattr("code", code);
    let _ = value.setattr("message", message);
    py_err
}

/// gRPC status names as the specification spells them.
mod tonic_code {
    use tonic::Code;

    pub fn name(code: Code) -> &'static str {
        match code {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}
