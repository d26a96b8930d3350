//! Fuzzes the grab request parser (`command::parse_grab`): whatever path
//! segments (namespace and name, as axum's `Path` hands them over), content
//! type, customer header and body arrive, it must not panic, must refuse
//! with a client error in the envelope, or must yield ids that pass
//! validation and are the segments given. The same input is also fed to
//! `protocol::Event::decode`.
//!
//! Input layout: one flag byte, then the namespace, the name, the content
//! type (also the customer header's value) and the body separated by NUL
//! bytes. Flag bit 1 takes the customer from the `x-customer-id` header
//! instead of the body.
#![no_main]

use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::HeaderMap;
use libfuzzer_sys::fuzz_target;
use seckill_workers::command::parse_grab;
use seckill_workers::protocol::{CustomerId, Event, PromotionId};

fuzz_target!(|data: &[u8]| {
    let (flags, rest) = data.split_first().map_or((0, data), |(f, r)| (*f, r));
    let mut parts = rest.splitn(4, |b| *b == 0);
    let namespace = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let name = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let content_type = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();

    let customer_header = HeaderName::from_static("x-customer-id");
    let from_header = flags & 2 == 2;
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(content_type) {
        headers.insert(CONTENT_TYPE, value.clone());
        if from_header {
            headers.insert(customer_header.clone(), value);
        }
    }
    let header = from_header.then_some(&customer_header);

    match parse_grab(&namespace, &name, &headers, body, header) {
        Ok(req) => {
            assert!(CustomerId::parse(req.customer.as_str()).is_ok());
            let again = PromotionId::new(req.promotion.namespace(), req.promotion.name());
            assert_eq!(again.as_ref(), Ok(&req.promotion));
            assert_eq!(req.promotion.namespace(), namespace);
            assert_eq!(req.promotion.name(), name);
        }
        Err(e) => {
            assert!(e.status.is_client_error(), "{e:?}");
            assert!(!e.message.is_empty());
        }
    }

    if let Ok(event) = Event::decode(body) {
        // What decodes re-encodes to something that decodes the same.
        let again = Event::decode(event.encode().as_bytes()).expect("re-encoded event decodes");
        assert_eq!(again, event);
    }
});
