//! What a command worker remembers about promotions, so as not to ask Redis
//! what it already knows. Once a flash sale is over the load does not stop:
//! customers keep pressing the button. So a promotion seen sold out or
//! finished (final states: a promotion never reopens) is answered its 410
//! from memory from then on, the body serialized once per promotion; a
//! promotion Redis did not know is remembered for [`UNKNOWN_MEMORY`] only,
//! which absorbs typos and scans without hiding a promotion created a
//! moment later. "Not started" is never remembered: only Redis' clock may
//! open a sale.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::header::{HeaderValue, CONTENT_LENGTH};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use foldhash::fast::RandomState;

use super::holders::Holders;
use crate::http::{json_response, ApiError, Outcome};
use crate::protocol::{FinishReason, PromotionId};

/// How long an unknown promotion is answered 404 without asking Redis.
pub const UNKNOWN_MEMORY: Duration = Duration::from_secs(1);

/// Bound on remembered unknown promotions, so that requests for random
/// names cannot grow the worker's memory without limit.
pub const MAX_REMEMBERED_UNKNOWN: usize = 10_000;

/// What this worker knows without asking Redis about a promotion.
#[derive(Debug, Clone)]
pub enum Known {
    /// Final: the promotion never reopens.
    Finished(Closed),
    /// Answered unknown by Redis; trusted until `until`.
    Unknown { until: Instant },
}

/// The 410 of a promotion that is over: the same for every customer but its
/// holders (see [`Holders`]), who are answered their coupon.
#[derive(Debug, Clone)]
pub struct Closed {
    pub reason: FinishReason,
    /// Who holds a coupon: loaded once, shared by every clone.
    holders: Arc<Holders>,
    /// The envelope, serialized once.
    body: Bytes,
    /// Its length, as a header value: axum would format it on every answer.
    length: HeaderValue,
}

impl Closed {
    fn new(id: &PromotionId, reason: FinishReason) -> Self {
        let what = match reason {
            FinishReason::SoldOut => "is sold out",
            FinishReason::Expired => "has ended",
            FinishReason::Deleted => "was withdrawn",
        };
        let body = ApiError::new(
            StatusCode::GONE,
            closed_code(reason),
            format!(
                "promotion {id} {what}; coupons you already hold are listed under GET /api/v1/customers/{{customerId}}/coupons"
            ),
        )
        .envelope();
        let length = HeaderValue::from(body.len());
        Self {
            reason,
            holders: Arc::default(),
            body,
            length,
        }
    }

    /// The promotion's holders (empty until loaded).
    pub fn holders(&self) -> &Arc<Holders> {
        &self.holders
    }

    /// The answer: 410 with the prepared body (shared, not copied) and the
    /// error code as the outcome.
    pub fn response(&self) -> Response {
        let mut response = json_response(StatusCode::GONE, &self.body);
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, self.length.clone());
        response
            .extensions_mut()
            .insert(Outcome(closed_code(self.reason)));
        response
    }
}

/// The `error` code of the 410 of a promotion over for `reason`.
pub fn closed_code(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::SoldOut => "sold_out",
        FinishReason::Expired | FinishReason::Deleted => "finished",
    }
}

/// The promotions this worker has seen over or missing, by namespace then
/// name, so that a request is looked up with its path's segments as they
/// are, without building an id. Read on every grab, written rarely; the
/// lock is never held across an await. The maps hash with foldhash, seeded
/// at random per map: names are chosen by clients (unknown ones are
/// remembered), so the seed keeps them from choosing collisions, and the two
/// lookups of every grab cost a fraction of std's SipHash.
#[derive(Debug, Default)]
pub struct PromotionMemory {
    known: RwLock<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    by_namespace: HashMap<Box<str>, HashMap<Box<str>, Known, RandomState>, RandomState>,
    /// How many entries are [`Known::Unknown`].
    unknown: usize,
}

impl Remembered {
    fn get(&self, namespace: &str, name: &str) -> Option<&Known> {
        self.by_namespace.get(namespace)?.get(name)
    }

    /// Sets what is known of `id`, keeping the count of unknown entries.
    fn set(&mut self, id: &PromotionId, known: Known) {
        let names = self.by_namespace.entry(id.namespace().into()).or_default();
        if matches!(known, Known::Unknown { .. }) {
            self.unknown += 1;
        }
        if let Some(Known::Unknown { .. }) = names.insert(id.name().into(), known) {
            self.unknown -= 1;
        }
    }

    /// Drops the unknown entries that expired by `now`.
    fn drop_expired(&mut self, now: Instant) {
        let mut dropped = 0;
        for names in self.by_namespace.values_mut() {
            names.retain(|_, k| {
                let expired = matches!(k, Known::Unknown { until } if *until <= now);
                dropped += usize::from(expired);
                !expired
            });
        }
        self.by_namespace.retain(|_, names| !names.is_empty());
        self.unknown -= dropped;
    }
}

impl PromotionMemory {
    /// What is known of `namespace`/`name` (the path's segments, valid or
    /// not: only valid ids are ever remembered).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Known> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        match known.get(namespace, name) {
            Some(Known::Unknown { until }) if *until <= Instant::now() => None,
            other => other.cloned(),
        }
    }

    /// Remembers `id` as over (for good: a first reason stays) and returns
    /// its 410.
    pub fn finished(&self, id: &PromotionId, reason: FinishReason) -> Closed {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if let Some(Known::Finished(closed)) = known.get(id.namespace(), id.name()) {
            return closed.clone();
        }
        let closed = Closed::new(id, reason);
        known.set(id, Known::Finished(closed.clone()));
        closed
    }

    /// Remembers `id` as unknown for [`UNKNOWN_MEMORY`], unless
    /// [`MAX_REMEMBERED_UNKNOWN`] unexpired ones are remembered already.
    pub fn unknown(&self, id: &PromotionId) {
        let now = Instant::now();
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known.unknown >= MAX_REMEMBERED_UNKNOWN {
            known.drop_expired(now);
            if known.unknown >= MAX_REMEMBERED_UNKNOWN {
                return;
            }
        }
        known.set(
            id,
            Known::Unknown {
                until: now + UNKNOWN_MEMORY,
            },
        );
    }

    /// Forgets that `id` was unknown (it exists now); a final state stays.
    pub fn forget_unknown(&self, id: &PromotionId) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        let Some(names) = known.by_namespace.get_mut(id.namespace()) else {
            return;
        };
        if matches!(names.get(id.name()), Some(Known::Unknown { .. })) {
            names.remove(id.name());
            if names.is_empty() {
                known.by_namespace.remove(id.namespace());
            }
            known.unknown -= 1;
        }
    }

    /// Entries remembered, of every kind.
    #[cfg(test)]
    fn len(&self) -> usize {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        known.by_namespace.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::CONTENT_TYPE;

    fn id(namespace: &str, name: &str) -> PromotionId {
        PromotionId::new(namespace, name).unwrap()
    }

    #[test]
    fn unknown_promotions_are_remembered_for_a_second_only_and_finished_ones_for_good() {
        let m = PromotionMemory::default();
        m.unknown(&id("a", "b"));
        assert!(matches!(m.get("a", "b"), Some(Known::Unknown { .. })));
        m.known.write().unwrap().set(
            &id("a", "b"),
            Known::Unknown {
                until: Instant::now(),
            },
        );
        assert!(m.get("a", "b").is_none(), "expired");
        m.finished(&id("c", "d"), FinishReason::SoldOut);
        let closed = m.finished(&id("c", "d"), FinishReason::Expired);
        assert_eq!(
            closed.reason,
            FinishReason::SoldOut,
            "the first reason stays"
        );
        assert!(std::str::from_utf8(&closed.body)
            .unwrap()
            .starts_with(r#"{"error":"sold_out","message":"promotion c/d is sold out;"#));
        assert!(matches!(m.get("c", "d"), Some(Known::Finished(_))));
        m.forget_unknown(&id("c", "d"));
        assert!(
            m.get("c", "d").is_some(),
            "a final state is never forgotten"
        );
        m.forget_unknown(&id("a", "b"));
        assert!(m.get("a", "b").is_none());
        assert_eq!(m.known.read().unwrap().unknown, 0);
    }

    #[test]
    fn remembered_unknown_promotions_are_bounded() {
        let m = PromotionMemory::default();
        for i in 0..MAX_REMEMBERED_UNKNOWN + 50 {
            m.unknown(&id("ns", &format!("p{i}")));
        }
        assert_eq!(m.len(), MAX_REMEMBERED_UNKNOWN);
        assert_eq!(m.known.read().unwrap().unknown, MAX_REMEMBERED_UNKNOWN);
        // Once they expire, they make room.
        let later = Instant::now() + UNKNOWN_MEMORY;
        m.known.write().unwrap().drop_expired(later);
        assert_eq!(m.len(), 0);
        m.unknown(&id("ns", "again"));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn the_410_is_the_prepared_envelope_with_its_code_as_the_outcome() {
        let m = PromotionMemory::default();
        let response = m
            .finished(&id("shop", "sale"), FinishReason::Deleted)
            .response();
        assert_eq!(response.status(), StatusCode::GONE);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(
            response.extensions().get::<Outcome>(),
            Some(&Outcome("finished"))
        );
    }
}
