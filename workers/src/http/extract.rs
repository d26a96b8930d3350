//! What handlers take from a request besides the state: the promotion a
//! path names and the body, each refused in the envelope when it is not
//! acceptable.

use axum::body::Body;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError};
use serde::Deserialize;
use tower_http::timeout::TimeoutError;

use crate::http::ApiError;
use crate::protocol::PromotionId;

/// The promotion named by the `{namespace}/{name}` segments of a route's
/// path, as sent and not yet validated ([`PromotionPath::id`] validates).
///
/// Promotion ids are DNS names, which never need percent-encoding, so a
/// path that holds a `%` (in these routes only the two segments can) is
/// refused with 400 `invalid_request` rather than decoded: every grab and
/// query names a promotion in its one spelling.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PromotionPath {
    pub namespace: String,
    pub name: String,
}

impl PromotionPath {
    /// The validated promotion id; 400 `invalid_request` otherwise.
    pub fn id(&self) -> Result<PromotionId, ApiError> {
        PromotionId::new(&self.namespace, &self.name).map_err(|e| ApiError::invalid_request(e.0))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PromotionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if parts.uri.path().contains('%') {
            return Err(ApiError::invalid_request(
                "a promotion id is a DNS name: send its namespace and name as they are, \
                 not percent-encoded",
            ));
        }
        let Path(path) = Path::<PromotionPath>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid_request(e.body_text()))?;
        Ok(path)
    }
}

/// Reads a request body, which the server's layers bound in size (413
/// `payload_too_large` past [`crate::http::MAX_BODY_BYTES`]) and in time
/// (408 `request_timeout`); a body that breaks off is 400.
pub async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            let cause = e.into_inner();
            if cause.is::<LengthLimitError>() {
                Err(ApiError::payload_too_large())
            } else if cause.is::<TimeoutError>() {
                Err(ApiError::request_timeout())
            } else {
                Err(ApiError::invalid_request(format!(
                    "the request body could not be read: {cause}"
                )))
            }
        }
    }
}
