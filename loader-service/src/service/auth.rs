//! Bearer-token authentication of the `Loader` and reflection calls (health stays open).

use std::sync::Arc;

use tonic::{Request, Status};

use super::failed;

/// Checks `authorization: Bearer <token>` on every Loader and reflection call.
#[derive(Debug, Clone)]
pub(super) struct BearerAuth {
    pub(super) expected: Option<Arc<str>>,
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(request),
            Some(_) => Err(failed(Status::unauthenticated(
                "authorization: wrong token",
            ))),
            None => Err(failed(Status::unauthenticated(
                "authorization: a bearer token is required",
            ))),
        }
    }
}

/// Compares without an early exit, so response timing does not leak the token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
