//! The one place library errors become gRPC statuses, with the code a client can act on:
//! malformed requests are INVALID_ARGUMENT, missing things NOT_FOUND, storage that cannot be
//! reached UNAVAILABLE (the client retries), storage that refuses the
//! server's credentials UNAUTHENTICATED / PERMISSION_DENIED (not retried), data that cannot be decoded DATA_LOSS, requests over
//! a server limit RESOURCE_EXHAUSTED, a contained panic INTERNAL.

use tonic::{Code, Status};

use super::request::RequestError;
use crate::error::StoreError;
use crate::pipeline::PipelineError;
use crate::pipeline::cost::CostError;

/// The status for a request that failed validation.
pub fn from_request(error: RequestError) -> Status {
    match error {
        RequestError::Invalid { .. } => Status::invalid_argument(error.to_string()),
        RequestError::NotFound { .. } => Status::not_found(error.to_string()),
    }
}

/// The status for a store failure.
pub fn from_store(error: &StoreError) -> Status {
    let code = match error.root() {
        StoreError::UnknownVariable { .. } => Code::NotFound,
        StoreError::InvalidHyperslab { .. } => Code::InvalidArgument,
        // The store refused our credentials: retrying cannot help, and the operator must act.
        StoreError::ObjectStore {
            source: object_store::Error::Unauthenticated { .. },
            ..
        } => Code::Unauthenticated,
        StoreError::ObjectStore {
            source: object_store::Error::PermissionDenied { .. },
            ..
        } => Code::PermissionDenied,
        StoreError::ObjectStore { .. } | StoreError::Io { .. } => Code::Unavailable,
        StoreError::CorruptChunk { .. }
        | StoreError::Metadata { .. }
        | StoreError::UnsupportedCodec { .. }
        | StoreError::UnsupportedDataType { .. }
        | StoreError::CfTime { .. } => Code::DataLoss,
        // DATA_LOSS, not NOT_FOUND: the client asked for nothing that does not exist (the
        // metadata promises the chunk); the store lost data, which no retry or other request
        // will bring back, like a chunk that does not decode.
        StoreError::MissingChunk { .. } => Code::DataLoss,
        // The data the stream planned on is gone: no retry brings it back until the operator
        // reopens the store.
        StoreError::StoreChanged { .. } => Code::DataLoss,
        // A bug of ours, not the request's: INTERNAL, so no client takes it for its own fault.
        StoreError::Panicked(_) => Code::Internal,
        _ => Code::Internal,
    };
    Status::new(code, full_chain(error))
}

/// The status for a pipeline failure.
pub fn from_pipeline(error: &PipelineError) -> Status {
    match error {
        PipelineError::Store(e) => from_store(e),
        PipelineError::Field { .. } | PipelineError::Request(_) => {
            Status::invalid_argument(error.to_string())
        }
        PipelineError::MissingStatistics { .. } => Status::failed_precondition(format!(
            "statistics: {error} — run `atmorep loader stats` for this dataset"
        )),
        // Rank, world or cursor outside the plan: the request is wrong.
        PipelineError::Epoch(_) => Status::invalid_argument(error.to_string()),
        // The statistics the request needs are missing: the server must run `loader stats`.
        PipelineError::Normalization(e) => {
            Status::failed_precondition(format!("statistics: {}", full_chain(e)))
        }
        PipelineError::Cost(e) => from_cost(e),
        PipelineError::Panicked(e) => Status::internal(e.to_string()),
    }
}

/// The status for a request refused by its cost: nonsense is INVALID_ARGUMENT, a sound request
/// over a server limit RESOURCE_EXHAUSTED.
pub fn from_cost(error: &CostError) -> Status {
    match error {
        CostError::Invalid { .. } => Status::invalid_argument(error.to_string()),
        CostError::OverLimit { .. } => Status::resource_exhausted(error.to_string()),
    }
}

/// The message and every source below it: the object store's reason is often two levels down.
fn full_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_failure(source: object_store::Error) -> StoreError {
        StoreError::ObjectStore {
            url: "s3://bucket/store.zarr/z/0.0.0.0".into(),
            source,
        }
    }

    #[test]
    fn refused_credentials_are_not_unavailable() {
        let refused = |status: u16| format!("Server returned non-2xx status code: {status}").into();
        let denied = from_store(&store_failure(object_store::Error::PermissionDenied {
            path: "store.zarr/z/0.0.0.0".into(),
            source: refused(403),
        }));
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(
            denied
                .message()
                .contains("s3://bucket/store.zarr/z/0.0.0.0")
        );
        let unauthenticated = from_store(&store_failure(object_store::Error::Unauthenticated {
            path: "store.zarr/z/0.0.0.0".into(),
            source: refused(401),
        }));
        assert_eq!(unauthenticated.code(), Code::Unauthenticated);
        let down = from_store(&store_failure(object_store::Error::Generic {
            store: "S3",
            source: refused(503),
        }));
        assert_eq!(down.code(), Code::Unavailable);
        let panicked = from_store(&StoreError::Panicked(crate::panic::Panicked {
            place: "decode",
            message: "boom".into(),
        }));
        assert_eq!(panicked.code(), Code::Internal);
    }
}
