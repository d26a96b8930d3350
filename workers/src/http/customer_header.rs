//! The customer-id header (`--customer-id-header NAME`): behind an
//! authenticating gateway, the header NAME, set by the gateway, says who
//! the caller is. Grabs then take the customer id from it only, and
//! customers may read only their own coupons. One flag and one rule for
//! reading it, shared by the command and query APIs (and `seckill up`).

use axum::http::{HeaderMap, HeaderName};

use crate::protocol::CustomerId;

/// The `--customer-id-header` flag, flattened into every role that serves
/// the grab or query endpoints.
#[derive(clap::Args, Debug, Clone)]
pub struct CustomerIdHeaderArgs {
    /// Header set by an authenticating gateway with the caller's customer
    /// id: grabs take the customer id from it only (the body's is then
    /// ignored) and customers may read only their own coupons. Unset: the
    /// grab body names the customer and coupons are readable by anyone.
    #[arg(long, env = "SECKILL_CUSTOMER_ID_HEADER", value_parser = header_name)]
    pub customer_id_header: Option<HeaderName>,
}

/// Parses the flag's value: a valid, non-empty HTTP header name.
fn header_name(value: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| format!("{value:?} is not a valid HTTP header name"))
}

/// Why a request names no caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallerError {
    /// The header is absent or empty: the gateway named no one.
    #[error("the {0} header naming the customer is missing or empty")]
    Missing(HeaderName),
    /// The header does not hold one valid customer id.
    #[error("the {header} header does not name a customer: {reason}")]
    Invalid { header: HeaderName, reason: String },
}

/// The caller named by `header`: the customer id the gateway put there.
///
/// The one rule both APIs follow: absent or empty is [`CallerError::Missing`]
/// (an empty value names no one: proxies blank a header to drop it);
/// present twice, not visible ASCII, or not a valid customer id is
/// [`CallerError::Invalid`] (which of two values the gateway set cannot be
/// told, and an id that could not be granted a coupon authenticates no one).
pub fn caller(headers: &HeaderMap, header: &HeaderName) -> Result<CustomerId, CallerError> {
    let mut values = headers.get_all(header).iter();
    let value = match values.next() {
        Some(v) if !v.is_empty() => v,
        _ => return Err(CallerError::Missing(header.clone())),
    };
    let invalid = |reason: String| CallerError::Invalid {
        header: header.clone(),
        reason,
    };
    if values.next().is_some() {
        return Err(invalid("it is present more than once".to_owned()));
    }
    let text = value
        .to_str()
        .map_err(|_| invalid("it is not visible ASCII".to_owned()))?;
    CustomerId::parse(text).map_err(|e| invalid(e.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn header() -> HeaderName {
        HeaderName::from_static("x-customer-id")
    }

    fn with(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header(), axum::http::HeaderValue::from_bytes(v).unwrap());
        }
        headers
    }

    #[test]
    fn the_caller_is_the_one_valid_customer_id_in_the_header() {
        assert_eq!(
            caller(&with(&[b"alice"]), &header()).unwrap().as_str(),
            "alice"
        );
    }

    #[test]
    fn an_absent_or_empty_header_names_no_caller() {
        for headers in [with(&[]), with(&[b""])] {
            assert_eq!(
                caller(&headers, &header()),
                Err(CallerError::Missing(header()))
            );
        }
    }

    #[test]
    fn two_values_a_non_ascii_value_or_an_invalid_id_are_invalid_not_missing() {
        for values in [
            &[b"alice".as_slice(), b"bob".as_slice()][..],
            &[b"al\xffice".as_slice()][..],
            &[b"a b".as_slice()][..],
            &[b"{x}".as_slice()][..],
            &["x".repeat(65).as_bytes()][..],
        ] {
            let result = caller(&with(values), &header());
            assert!(
                matches!(result, Err(CallerError::Invalid { .. })),
                "{values:?}: {result:?}"
            );
        }
    }

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        header: CustomerIdHeaderArgs,
    }

    #[test]
    fn the_flag_takes_a_header_name_and_refuses_anything_else() {
        let set = Flags::try_parse_from(["t", "--customer-id-header", "X-Customer-Id"]).unwrap();
        assert_eq!(set.header.customer_id_header, Some(header()));
        for bad in ["", "a b", "x:y"] {
            assert!(
                Flags::try_parse_from(["t", "--customer-id-header", bad]).is_err(),
                "{bad:?}"
            );
        }
    }
}
