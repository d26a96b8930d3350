//! The error envelope every worker answers: a status and
//! `{"error": code, "message": text for a person}`, with `Retry-After` when
//! retrying later may succeed. [`ApiError`] is an axum [`IntoResponse`], so
//! handlers and extractors return it as they would any rejection; the
//! [`Outcome`] it leaves on the response is the `outcome` label of the
//! request counter.

use axum::body::Body;
use axum::http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

/// Largest request body accepted; a larger one is answered 413.
pub const MAX_BODY_BYTES: usize = 4 * 1024;

/// `Content-Type` of every answer but `/metrics`.
pub const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Answered when a body cannot be serialized (never for the bodies we build).
const UNENCODABLE: &[u8] =
    br#"{"error":"internal_error","message":"the response could not be encoded"}"#;

/// What a request led to, for the `outcome` label of the request counter:
/// a response extension set by [`ApiError`] (the error code) or by a
/// handler (e.g. `granted`); `ok` / `error` when none is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome(pub &'static str);

/// An error answer: a status and the envelope `{"error": code, "message": text}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header, when retrying later may succeed.
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// Adds a `Retry-After` header of `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 400 `invalid_request`.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 405 `method_not_allowed` (axum adds the `Allow` header).
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    /// 408 `request_timeout`: the body did not arrive in time.
    pub fn request_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body was not received in time",
        )
    }

    /// 413 `payload_too_large`.
    pub fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body must be at most {MAX_BODY_BYTES} bytes"),
        )
    }

    /// 415 `unsupported_media_type`.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 503 `unavailable` with `Retry-After: 1`: a dependency (Redis) did not
    /// answer in time; nothing was promised, so retrying is safe.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }

    /// The answer of an API request past the server's `--max-in-flight`:
    /// 503 `unavailable` with `Retry-After: 1`, nothing attempted (the
    /// handler never ran). Counted under the outcome `overloaded`, apart
    /// from the 503s of a Redis that does not answer.
    pub fn overloaded() -> Response {
        let mut response = Self::unavailable(
            "this worker is handling as many requests as it may at once (--max-in-flight); \
             nothing was attempted, retry after Retry-After seconds",
        )
        .into_response();
        response.extensions_mut().insert(Outcome("overloaded"));
        response
    }

    /// 429 `rate_limited` with `Retry-After`: this client sent more than its
    /// share; nothing was attempted.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many requests from this client; nothing was attempted, retry in {retry_after_secs} s"
            ),
        )
        .retry_after(retry_after_secs.max(1))
    }

    /// 500 `internal_error`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// The envelope of an error answer that a layer, not a handler, gave
    /// with its status alone (tower-http's 413 for a declared body over the
    /// limit, say): the same code and a message as if a handler had.
    pub fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => Self::payload_too_large(),
            StatusCode::REQUEST_TIMEOUT => Self::request_timeout(),
            StatusCode::NOT_FOUND => Self::not_found("no such route"),
            StatusCode::METHOD_NOT_ALLOWED => {
                Self::method_not_allowed("the Allow header lists the methods this route takes")
            }
            StatusCode::SERVICE_UNAVAILABLE => Self::unavailable("try again in a moment"),
            s if s.is_server_error() => {
                Self::new(s, "internal_error", format!("the worker answered {s}"))
            }
            s => Self::new(
                s,
                "invalid_request",
                format!("the request was refused: {s}"),
            ),
        }
    }

    /// The envelope alone, serialized: for answers prepared once and then
    /// only shared (see the sold-out answer of the command API).
    pub fn envelope(&self) -> Bytes {
        serialized(&ErrorEnvelope {
            error: self.code,
            message: &self.message,
        })
        .unwrap_or_else(|| Bytes::from_static(UNENCODABLE))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, &self.envelope());
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(Outcome(self.code));
        response
    }
}

/// Serializes `body` as JSON; `None` (logged) when it cannot be.
fn serialized(body: &impl Serialize) -> Option<Bytes> {
    // Room for a grab's answer (about 180 bytes) without growing.
    let mut bytes = Vec::with_capacity(256);
    match serde_json::to_writer(&mut bytes, body) {
        Ok(()) => Some(Bytes::from(bytes)),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a response body");
            None
        }
    }
}

/// A response of `status` with `body`, already JSON, as `application/json`.
pub fn json_response(status: StatusCode, body: &Bytes) -> Response {
    let mut response = Response::new(Body::from(body.clone()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, JSON);
    response
}

/// A JSON response of `status` with `body` serialized; 500
/// `internal_error` in the envelope when it cannot be.
pub fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serialized(body) {
        Some(bytes) => json_response(status, &bytes),
        None => {
            let mut response = json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &Bytes::from_static(UNENCODABLE),
            );
            response.extensions_mut().insert(Outcome("internal_error"));
            response
        }
    }
}

/// The router's fallback: 404 `not_found` for a path no route matches.
pub async fn no_route(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// The answer to a method a route does not take: 405
/// `method_not_allowed` (axum adds the `Allow` header after it).
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(format!(
        "{} does not take {method}; the Allow header lists the methods it takes",
        uri.path()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_answer_the_envelope_with_retry_after_when_set() {
        let r = ApiError::unavailable("redis down").into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(
            r.extensions().get::<Outcome>(),
            Some(&Outcome("unavailable"))
        );
        assert_eq!(
            ApiError::unavailable("redis down").envelope(),
            Bytes::from_static(br#"{"error":"unavailable","message":"redis down"}"#)
        );
    }

    #[test]
    fn a_bare_status_gets_the_code_a_handler_would_give_it() {
        for (status, code) in [
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            (StatusCode::NOT_FOUND, "not_found"),
            (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            (StatusCode::BAD_GATEWAY, "internal_error"),
            (StatusCode::BAD_REQUEST, "invalid_request"),
        ] {
            let e = ApiError::for_status(status);
            assert_eq!((e.status, e.code), (status, code));
            assert!(!e.message.is_empty());
        }
    }
}
