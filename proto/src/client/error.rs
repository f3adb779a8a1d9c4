//! What can go wrong talking to a loader, and which failures are worth another attempt.

use std::time::Duration;

use tonic::{Code, Status};

use super::stripe::StripeError;
use crate::batch::BatchError;

/// What can go wrong talking to the loader.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("no loader endpoints configured")]
    NoEndpoints,
    #[error("invalid endpoint `{endpoint}`: {source}")]
    InvalidEndpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the bearer token is not a valid header value")]
    InvalidToken,
    #[error("client configuration: {0}")]
    Config(String),
    /// The loader (or the transport, for a failure not worth retrying) answered with this status.
    #[error("loader call failed with {}: {}", .0.code(), .0.message())]
    Status(Box<Status>),
    /// Retryable failures went on past the reconnect policy.
    #[error(
        "gave up after {attempts} failed attempts over {elapsed:?}; last: {}: {}",
        last.code(),
        last.message()
    )]
    RetriesExhausted {
        attempts: u32,
        elapsed: Duration,
        last: Box<Status>,
    },
    /// The server sent a batch that cannot be decoded or reassembled.
    #[error("malformed batch from the loader: {0}")]
    Batch(#[from] BatchError),
    /// A striped stream cannot start (an unstriped cursor) or its sub-streams disagree.
    #[error("striped stream: {0}")]
    Stripe(#[from] StripeError),
}

impl ClientError {
    /// The gRPC status behind the error, if any.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Status(s) | Self::RetriesExhausted { last: s, .. } => Some(s),
            _ => None,
        }
    }

    /// The gRPC code behind the error, if any.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        Self::Status(Box::new(status))
    }
}

/// Whether a failed call is worth repeating (on the next endpoint): UNAVAILABLE, or a status the
/// client synthesized from a transport failure. Statuses the server sent carry no error source;
/// those tonic builds from connection, HTTP/2 or I/O errors do, whatever code they map to.
pub fn is_retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        assert!(is_retryable(&Status::unavailable("down")));
        // Sent by a server: no source.
        assert!(!is_retryable(&Status::internal("bug")));
        assert!(!is_retryable(&Status::invalid_argument("batch_size")));
        assert!(!is_retryable(&Status::unauthenticated("token")));
        // The loader's object store refused its credentials: no retry can fix that.
        assert!(!is_retryable(&Status::permission_denied(
            "object store failure at `s3://b/z/0.0.0.0`: 403"
        )));
        // Built by tonic from an I/O failure: has a source.
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        let status = Status::from_error(Box::new(io));
        assert!(std::error::Error::source(&status).is_some());
        assert!(is_retryable(&status), "{status:?}");
    }
}
