//! A grab request, parsed: the promotion from the path's two segments, the
//! customer from the `--customer-id-header` header or from the JSON body.
//! Pure (no I/O, no state), so it is property-tested here and fuzzed by
//! `fuzz/fuzz_targets/grab_request.rs`; every refusal is a client error in
//! the envelope.

use std::borrow::Cow;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName};
use serde::Deserialize;

use crate::http::customer_header::{self, CallerError};
use crate::http::ApiError;
use crate::protocol::{CustomerId, PromotionId};

/// A grab request, validated: what the grab script is called with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrabRequest {
    pub promotion: PromotionId,
    pub customer: CustomerId,
}

/// The JSON body of a grab.
#[derive(Deserialize)]
struct GrabBody<'a> {
    #[serde(rename = "customerId", borrow, default)]
    customer_id: Option<Cow<'a, str>>,
}

/// Is the `Content-Type` JSON (parameters such as `charset` allowed)?
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false)
}

/// The customer of a grab: from the `customer_id_header` only when one is
/// configured (the body is then ignored; see [`customer_header::caller`]),
/// else from the JSON body `{"customerId": "..."}`. Every refusal is a 400
/// or 415 in the envelope.
pub fn grab_customer(
    headers: &HeaderMap,
    body: &[u8],
    customer_id_header: Option<&HeaderName>,
) -> Result<CustomerId, ApiError> {
    if let Some(header) = customer_id_header {
        return customer_header::caller(headers, header).map_err(|e| match e {
            CallerError::Missing(header) => ApiError::invalid_request(format!(
                "the {header} header (the customer id) is required"
            )),
            e @ CallerError::Invalid { .. } => ApiError::invalid_request(e.to_string()),
        });
    }
    if !is_json(headers) {
        return Err(ApiError::unsupported_media_type(
            "the request body must be JSON (Content-Type: application/json)",
        ));
    }
    if let Some(id) = plain_customer(body) {
        return CustomerId::parse(id).map_err(|e| ApiError::invalid_request(e.0));
    }
    let body: GrabBody<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(format!(
            r#"the body must be a JSON object {{"customerId": "..."}}: {e}"#
        ))
    })?;
    let id = body
        .customer_id
        .ok_or_else(|| ApiError::invalid_request("customerId is required"))?;
    CustomerId::parse(&id).map_err(|e| ApiError::invalid_request(e.0))
}

/// The customer of the body every client we know sends,
/// `{"customerId":"<id>"}` and nothing else, read without a JSON parser:
/// after a sale, when every grab's customer is looked up among the holders,
/// the parser cost more than the rest of the 410 (callgrind,
/// docs/BENCHMARKS.md). Only a string JSON reads as it stands (UTF-8, no
/// escape, quote or control character) is taken; it is then validated as
/// [`CustomerId::parse`] validates any id. `None` for anything else, valid
/// or not, which serde_json reads as before, so what is accepted and every
/// refusal stay the same.
fn plain_customer(body: &[u8]) -> Option<&str> {
    let id = body
        .strip_prefix(br#"{"customerId":""#)?
        .strip_suffix(br#""}"#)?;
    if id.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        return None;
    }
    std::str::from_utf8(id).ok()
}

/// Parses a grab request of promotion `namespace`/`name` (the path's
/// segments, as sent): the promotion validated, the customer from the
/// header or the body.
pub fn parse_grab(
    namespace: &str,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
    customer_id_header: Option<&HeaderName>,
) -> Result<GrabRequest, ApiError> {
    let promotion =
        PromotionId::new(namespace, name).map_err(|e| ApiError::invalid_request(e.0))?;
    let customer = grab_customer(headers, body, customer_id_header)?;
    Ok(GrabRequest {
        promotion,
        customer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn json_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, "application/json".parse().unwrap());
        headers
    }

    #[test]
    fn the_parser_takes_the_customer_from_the_header_only_when_one_is_configured() {
        let header = HeaderName::from_static("x-customer-id");
        let mut headers = HeaderMap::new();
        headers.insert(&header, "alice".parse().unwrap());
        let parsed = parse_grab("shop", "sale", &headers, b"garbage", Some(&header));
        assert_eq!(parsed.unwrap().customer.as_str(), "alice");
        let missing = parse_grab(
            "shop",
            "sale",
            &json_headers(),
            br#"{"customerId":"bob"}"#,
            Some(&header),
        );
        assert_eq!(missing.unwrap_err().code, "invalid_request");
    }

    #[test]
    fn an_empty_customer_header_is_missing_and_says_the_header_is_required() {
        let header = HeaderName::from_static("x-customer-id");
        let mut headers = json_headers();
        headers.insert(&header, HeaderValue::from_static(""));
        let e = parse_grab("shop", "sale", &headers, b"{}", Some(&header)).unwrap_err();
        assert_eq!(e.code, "invalid_request");
        assert!(e.message.contains("is required"), "{e:?}");
    }

    proptest::proptest! {
        /// Whatever arrives, the parser answers (no panic), refuses with a
        /// client error in the envelope, or yields ids that pass validation.
        #[test]
        fn arbitrary_requests_never_panic_and_never_yield_an_invalid_id(
            namespace in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            name in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            content_type in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
        ) {
            let (namespace, name) = (String::from_utf8_lossy(&namespace), String::from_utf8_lossy(&name));
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&content_type) {
                headers.insert(CONTENT_TYPE, v);
            }
            match parse_grab(&namespace, &name, &headers, &body, None) {
                Ok(req) => {
                    proptest::prop_assert!(CustomerId::parse(req.customer.as_str()).is_ok());
                    let again = PromotionId::new(req.promotion.namespace(), req.promotion.name());
                    proptest::prop_assert_eq!(again.as_ref(), Ok(&req.promotion));
                    proptest::prop_assert_eq!(req.promotion.namespace(), &*namespace);
                    proptest::prop_assert_eq!(req.promotion.name(), &*name);
                }
                Err(e) => {
                    proptest::prop_assert!(e.status.is_client_error(), "{:?}", e);
                    proptest::prop_assert!(!e.message.is_empty());
                    proptest::prop_assert!(matches!(
                        e.code,
                        "invalid_request" | "unsupported_media_type"
                    ), "{:?}", e);
                }
            }
        }

        /// The reader without a parser answers exactly what serde_json's
        /// path answers, for ids of any characters (escapes, quotes, long,
        /// empty, non-ASCII) in the one shape it reads.
        #[test]
        fn the_plain_body_reader_answers_as_the_json_parser_does(
            id in proptest::prop_oneof![
                "[A-Za-z0-9._:@-]{0,70}",
                "([A-Za-z0-9._:@-]|\\PC|[\"\\\\]){0,70}",
            ],
        ) {
            let body = format!(r#"{{"customerId":"{id}"}}"#);
            let headers = json_headers();
            let answered = grab_customer(&headers, body.as_bytes(), None);
            let parsed = serde_json::from_slice::<GrabBody<'_>>(body.as_bytes())
                .map_err(|_| ())
                .and_then(|b| b.customer_id.ok_or(()))
                .and_then(|id| CustomerId::parse(&id).map_err(|_| ()));
            match (&answered, &parsed) {
                (Ok(a), Ok(p)) => proptest::prop_assert_eq!(a, p),
                (Err(e), Err(())) => proptest::prop_assert_eq!(e.code, "invalid_request"),
                _ => proptest::prop_assert!(false, "{:?} but the parser: {:?}", answered, parsed),
            }
            if let Some(plain) = plain_customer(body.as_bytes()) {
                let json: GrabBody<'_> = serde_json::from_slice(body.as_bytes()).unwrap();
                proptest::prop_assert_eq!(Some(plain), json.customer_id.as_deref());
            }
        }

        /// Valid promotion ids and customer ids come back out unchanged.
        #[test]
        fn valid_requests_round_trip(
            ns in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
            name in "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}",
            customer in "[A-Za-z0-9._:@-]{1,64}",
            charset in proptest::option::of("; ?charset=(utf-8|UTF-8)"),
        ) {
            let mut headers = HeaderMap::new();
            let ct = format!("Application/JSON{}", charset.unwrap_or_default());
            headers.insert(CONTENT_TYPE, ct.parse().unwrap());
            let body = serde_json::to_vec(&serde_json::json!({ "customerId": customer })).unwrap();
            let req = parse_grab(&ns, &name, &headers, &body, None).unwrap();
            proptest::prop_assert_eq!(req.promotion.namespace(), ns.as_str());
            proptest::prop_assert_eq!(req.promotion.name(), name.as_str());
            proptest::prop_assert_eq!(req.customer.as_str(), customer.as_str());
        }

        /// Any string as customerId is accepted exactly when `CustomerId::parse`
        /// accepts it, whatever JSON escaping it needed.
        #[test]
        fn the_body_customer_is_accepted_exactly_when_the_id_is_valid(customer in "\\PC{0,70}|[\\x00-\\x7f]{0,70}") {
            let body = serde_json::to_vec(&serde_json::json!({ "customerId": customer })).unwrap();
            let parsed = parse_grab("shop", "sale", &json_headers(), &body, None);
            match CustomerId::parse(&customer) {
                Ok(id) => proptest::prop_assert_eq!(parsed.unwrap().customer, id),
                Err(_) => proptest::prop_assert_eq!(parsed.unwrap_err().code, "invalid_request"),
            }
        }

        /// Only `application/json` (any case, any parameters) is taken as JSON;
        /// anything else is 415 whatever the body.
        #[test]
        fn only_json_content_types_are_read(content_type in "[ -~]{0,40}") {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_str(&content_type).unwrap());
            let parsed = parse_grab("shop", "sale", &headers, br#"{"customerId":"bob"}"#, None);
            let main = content_type.split(';').next().unwrap_or_default().trim();
            if main.eq_ignore_ascii_case("application/json") {
                proptest::prop_assert!(parsed.is_ok(), "{:?}", parsed);
            } else {
                proptest::prop_assert_eq!(parsed.unwrap_err().code, "unsupported_media_type");
            }
        }
    }
}
