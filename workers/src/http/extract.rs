//! What handlers take from a request besides the state: the promotion a
//! path names and the body, each refused in the envelope when it is not
//! acceptable.

use axum::body::Body;
use axum::body::HttpBody;
use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError};

use crate::http::layers::BodyTimedOut;
use crate::http::ApiError;
use crate::protocol::PromotionId;

/// The promotion named by the `{namespace}/{name}` segments of a route's
/// path, as sent and not yet validated ([`PromotionPath::id`] validates).
///
/// Promotion ids are DNS names, which never need percent-encoding, so a
/// path that holds a `%` (in these routes only the two segments can) is
/// refused with 400 `invalid_request` rather than decoded: every grab and
/// query names a promotion in its one spelling. Taken with axum's
/// [`RawPathParams`], which the router has already split out: no copy of
/// the segments is made (the sold-out answer looks its promotion up with
/// them as they are).
#[derive(Debug)]
pub struct PromotionPath {
    params: RawPathParams,
}

impl PromotionPath {
    fn param(&self, key: &str) -> &str {
        self.params
            .iter()
            .find_map(|(k, v)| (k == key).then_some(v))
            .unwrap_or_default()
    }

    /// The `{namespace}` segment.
    pub fn namespace(&self) -> &str {
        self.param("namespace")
    }

    /// The `{name}` segment.
    pub fn name(&self) -> &str {
        self.param("name")
    }

    /// The validated promotion id; 400 `invalid_request` otherwise.
    pub fn id(&self) -> Result<PromotionId, ApiError> {
        PromotionId::new(self.namespace(), self.name()).map_err(|e| ApiError::invalid_request(e.0))
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
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid_request(e.body_text()))?;
        let path = Self { params };
        if path
            .params
            .iter()
            .filter(|(k, _)| matches!(*k, "namespace" | "name"))
            .count()
            != 2
        {
            // A route of the table without both segments: a bug, not the client's.
            return Err(ApiError::internal(
                "this route does not name a promotion by {namespace}/{name}",
            ));
        }
        Ok(path)
    }
}

/// Reads a request body, which the server's layers bound in size (413
/// `payload_too_large` past [`crate::http::MAX_BODY_BYTES`]) and in time
/// (408 `request_timeout`); a body that breaks off is 400.
pub async fn read_body(mut body: Body) -> Result<Bytes, ApiError> {
    // A grab's body is small and arrives in one frame: taken as it is, it
    // needs none of the buffers `collect` sets up (a tenth of a sold-out
    // answer's instructions, see docs/BENCHMARKS.md).
    let first = match body.frame().await {
        None => return Ok(Bytes::new()),
        Some(frame) => frame.map_err(unreadable)?,
    };
    let first = match first.into_data() {
        Ok(data) if body.is_end_stream() => return Ok(data),
        Ok(data) => data,
        Err(_trailers) => Bytes::new(),
    };
    let rest = body.collect().await.map_err(unreadable)?.to_bytes();
    if first.is_empty() {
        return Ok(rest);
    }
    let mut all = Vec::with_capacity(first.len() + rest.len());
    all.extend_from_slice(&first);
    all.extend_from_slice(&rest);
    Ok(Bytes::from(all))
}

/// The answer to a body that could not be read: over the size limit, past
/// the deadline, or broken off.
fn unreadable(e: axum::Error) -> ApiError {
    let cause = e.into_inner();
    if cause.is::<LengthLimitError>() {
        ApiError::payload_too_large()
    } else if cause.is::<BodyTimedOut>() {
        ApiError::request_timeout()
    } else {
        ApiError::invalid_request(format!("the request body could not be read: {cause}"))
    }
}
