//! The grab: a batch of customers of one promotion, one `FCALL
//! seckill_v2_grab` (see `functions/grab.lua`), answered as a flat array that
//! [`decode_reply`] turns into one [`GrabOutcome`] per customer. No JSON and
//! no date formatting happen in Lua: `grantedAt` is rendered here from the
//! Redis time the function read once for the batch.

use chrono::{DateTime, SecondsFormat};
use redis::aio::ConnectionLike;
use redis::Value;
use serde::{Deserialize, Serialize};

use super::functions::{self, GRAB};
use super::{CustomerId, FinishReason, PromotionId, PromotionKeys, ScriptError};

/// A coupon as held by a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Coupon {
    pub coupon_id: String,
    pub customer_id: String,
    pub promotion: String,
    pub discount: f64,
    /// RFC 3339 with milliseconds on Redis' clock.
    pub granted_at: String,
}

/// The answer of a grab, for one customer.
#[derive(Debug, Clone, PartialEq)]
pub enum GrabOutcome {
    /// A coupon was taken and CouponGrabbed appended. `sold_out` is true for
    /// the batch that took the last one (PromotionFinished{SoldOut} appended).
    Granted {
        coupon: Coupon,
        sold_out: bool,
    },
    /// The customer already holds this coupon (also after the promotion is
    /// over); nothing was written.
    AlreadyGranted {
        coupon: Coupon,
    },
    UnknownPromotion,
    /// Redis' clock is before the publish time.
    NotStarted {
        opens_in_ms: u64,
        publish_time: String,
    },
    SoldOut,
    /// Finished for a reason other than selling out (Expired, Deleted).
    Finished {
        reason: FinishReason,
    },
}

impl GrabOutcome {
    /// Whether this answer promises the customer a coupon (a 200).
    pub fn promises_coupon(&self) -> bool {
        matches!(self, Self::Granted { .. } | Self::AlreadyGranted { .. })
    }
}

/// The `FCALL` of one batch (for pipelines: the durable grab).
pub(super) fn batch_command(id: &PromotionId, customers: &[CustomerId]) -> redis::Cmd {
    let keys = PromotionKeys::new(id);
    functions::command(
        GRAB,
        &[&keys.state, &keys.customers, &keys.events],
        customers.iter().map(CustomerId::as_str),
    )
}

/// One customer grabs one coupon of `id`: a batch of one.
pub async fn grab<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    customer: &CustomerId,
) -> Result<GrabOutcome, ScriptError> {
    let mut outcomes = grab_batch(con, id, std::slice::from_ref(customer)).await?;
    outcomes
        .pop()
        .ok_or_else(|| ScriptError::BadReply("grab: no outcome".into()))
}

/// `customers` (in arrival order; repeats allowed) each grab one coupon of
/// `id`, in one atomic call: one outcome per customer, in the same order.
pub async fn grab_batch<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    customers: &[CustomerId],
) -> Result<Vec<GrabOutcome>, ScriptError> {
    let reply: Value = functions::call(con, &batch_command(id, customers)).await?;
    decode_reply(id, customers, reply)
}

/// Every customer holding a coupon of `id` (the customers hash's fields),
/// handed to `each` page by page (HSCAN, so Redis is never blocked by one
/// large reply). Used once a promotion is over, to know its holders.
pub async fn holders<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    mut each: impl FnMut(&[u8]),
) -> Result<(), ScriptError> {
    let key = PromotionKeys::new(id).customers;
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
            .arg(&key)
            .arg(cursor)
            .arg("COUNT")
            .arg(10_000)
            .query_async(con)
            .await?;
        // Fields and values alternate: the customer ids are the fields.
        for customer in page.iter().step_by(2) {
            each(customer);
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

fn bad(what: impl Into<String>) -> ScriptError {
    ScriptError::BadReply(what.into())
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// RFC 3339 with milliseconds, UTC, as every `grantedAt` is written.
pub fn rfc3339_ms(epoch_ms: i64) -> Result<String, ScriptError> {
    DateTime::from_timestamp_millis(epoch_ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .ok_or_else(|| bad(format!("time out of range: {epoch_ms} ms")))
}

/// The coupon a customers-hash value stands for: `<seq>:<grantedAtMs>` since
/// version 2, or the coupon JSON version 1 wrote (starts with `{`).
pub fn held_coupon(
    id: &PromotionId,
    customer: &CustomerId,
    discount: f64,
    value: &str,
) -> Result<Coupon, ScriptError> {
    if value.starts_with('{') {
        return serde_json::from_str(value).map_err(|e| bad(format!("held coupon {value}: {e}")));
    }
    let (seq, ms) = value
        .split_once(':')
        .and_then(|(s, m)| Some((s.parse::<u64>().ok()?, m.parse::<i64>().ok()?)))
        .ok_or_else(|| bad(format!("held coupon {value:?} is not <seq>:<ms>")))?;
    coupon(id, customer, discount, seq, ms)
}

fn coupon(
    id: &PromotionId,
    customer: &CustomerId,
    discount: f64,
    seq: u64,
    granted_at_ms: i64,
) -> Result<Coupon, ScriptError> {
    Ok(Coupon {
        coupon_id: format!("{id}#{seq}"),
        customer_id: customer.as_str().to_owned(),
        promotion: id.to_string(),
        discount,
        granted_at: rfc3339_ms(granted_at_ms)?,
    })
}

/// Decodes the flat array `seckill_v2_grab` answers (see the head of
/// `functions/grab.lua`) into one outcome per customer of `customers`.
pub fn decode_reply(
    id: &PromotionId,
    customers: &[CustomerId],
    reply: Value,
) -> Result<Vec<GrabOutcome>, ScriptError> {
    let Value::Array(items) = reply else {
        return Err(bad(format!("grab reply is not an array: {reply:?}")));
    };
    let kind = items.first().and_then(text).unwrap_or_default();
    let all = |outcome: GrabOutcome| Ok(vec![outcome; customers.len()]);
    match kind {
        "unknown_promotion" => all(GrabOutcome::UnknownPromotion),
        "not_started" => all(GrabOutcome::NotStarted {
            opens_in_ms: items.get(2).and_then(int).unwrap_or(0).max(0) as u64,
            publish_time: items.get(3).and_then(text).unwrap_or_default().to_owned(),
        }),
        "batch" => {
            let head = |i: usize| items.get(i).ok_or_else(|| bad("grab reply: short head"));
            let now = int(head(1)?).ok_or_else(|| bad("grab reply: time"))?;
            let discount: f64 = text(head(2)?)
                .and_then(|d| d.parse().ok())
                .ok_or_else(|| bad("grab reply: discount"))?;
            let over = match text(head(3)?).unwrap_or_default() {
                "" => None,
                reason => Some(
                    FinishReason::parse(reason)
                        .ok_or_else(|| bad(format!("grab reply: reason {reason:?}")))?,
                ),
            };
            let sold_out_now = int(head(4)?) == Some(1);
            let answers = &items[5..];
            if answers.len() != customers.len() * 2 {
                return Err(bad(format!(
                    "grab reply: {} answers for {} customers",
                    answers.len() / 2,
                    customers.len()
                )));
            }
            let mut outcomes = Vec::with_capacity(customers.len());
            for (customer, answer) in customers.iter().zip(answers.chunks_exact(2)) {
                let value = &answer[1];
                outcomes.push(match text(&answer[0]).unwrap_or_default() {
                    "g" => {
                        let seq = int(value).ok_or_else(|| bad("grab reply: seq"))?;
                        GrabOutcome::Granted {
                            coupon: coupon(id, customer, discount, seq.max(0) as u64, now)?,
                            sold_out: sold_out_now,
                        }
                    }
                    "a" => {
                        let held = text(value).ok_or_else(|| bad("grab reply: held value"))?;
                        GrabOutcome::AlreadyGranted {
                            coupon: held_coupon(id, customer, discount, held)?,
                        }
                    }
                    "x" => match over {
                        Some(FinishReason::SoldOut) => GrabOutcome::SoldOut,
                        Some(reason) => GrabOutcome::Finished { reason },
                        None => return Err(bad("grab reply: none left without a reason")),
                    },
                    other => return Err(bad(format!("grab reply: answer {other:?}"))),
                });
            }
            Ok(outcomes)
        }
        other => Err(bad(format!("grab reply: unknown kind {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::BulkString(v.as_bytes().to_vec())
    }

    /// A `batch` reply: Redis' clock (epoch ms), the discount, the finish
    /// reason ("" while open), whether this call sold out, then the answers
    /// (two values a customer).
    fn batch(
        now_ms: i64,
        discount: &str,
        reason: &str,
        sold_out: bool,
        answers: Vec<Value>,
    ) -> Value {
        let mut reply = vec![
            s("batch"),
            Value::Int(now_ms),
            s(discount),
            s(reason),
            Value::Int(sold_out.into()),
        ];
        reply.extend(answers);
        Value::Array(reply)
    }

    fn id() -> PromotionId {
        PromotionId::parse("shop/sale").unwrap()
    }

    fn customers(names: &[&str]) -> Vec<CustomerId> {
        names
            .iter()
            .map(|n| CustomerId::parse(n).unwrap())
            .collect()
    }

    #[test]
    fn a_batch_reply_gives_each_customer_its_own_answer() {
        let reply = batch(
            1_764_583_200_123,
            "0.8",
            "SoldOut",
            true,
            vec![
                s("g"),
                Value::Int(7),
                s("a"),
                s("7:1764583200123"),
                s("a"),
                s(
                    r#"{"couponId":"shop/sale#1","customerId":"carol","promotion":"shop/sale","discount":0.5,"grantedAt":"2026-01-01T00:00:00.000Z"}"#,
                ),
                s("x"),
                s(""),
            ],
        );
        let out = decode_reply(&id(), &customers(&["ann", "ann", "carol", "dan"]), reply).unwrap();
        let GrabOutcome::Granted { coupon, sold_out } = &out[0] else {
            panic!("{out:?}")
        };
        assert!(sold_out);
        assert_eq!(coupon.coupon_id, "shop/sale#7");
        assert_eq!(coupon.granted_at, "2025-12-01T10:00:00.123Z");
        assert_eq!(coupon.discount, 0.8);
        assert_eq!(
            out[1],
            GrabOutcome::AlreadyGranted {
                coupon: coupon.clone()
            },
            "the same customer twice in a batch: the second gets the first's coupon"
        );
        let GrabOutcome::AlreadyGranted { coupon: v1 } = &out[2] else {
            panic!("{out:?}")
        };
        assert_eq!((v1.coupon_id.as_str(), v1.discount), ("shop/sale#1", 0.5));
        assert_eq!(out[3], GrabOutcome::SoldOut);
    }

    #[test]
    fn window_answers_go_to_every_customer_of_the_batch() {
        let two = customers(&["a", "b"]);
        let not_started = Value::Array(vec![
            s("not_started"),
            Value::Int(1),
            Value::Int(1500),
            s("2026-01-01T00:00:00.000Z"),
        ]);
        let out = decode_reply(&id(), &two, not_started).unwrap();
        assert_eq!(out.len(), 2);
        assert!(matches!(
            &out[1],
            GrabOutcome::NotStarted {
                opens_in_ms: 1500,
                ..
            }
        ));
        let expired = batch(
            1,
            "0.5",
            "Expired",
            false,
            vec![s("x"), s(""), s("x"), s("")],
        );
        let out = decode_reply(&id(), &two, expired).unwrap();
        assert_eq!(
            out,
            vec![
                GrabOutcome::Finished {
                    reason: FinishReason::Expired
                };
                2
            ]
        );
        let unknown = Value::Array(vec![s("unknown_promotion"), Value::Int(1)]);
        assert_eq!(
            decode_reply(&id(), &two, unknown).unwrap(),
            vec![GrabOutcome::UnknownPromotion; 2]
        );
    }

    #[test]
    fn a_reply_that_does_not_fit_the_batch_is_refused_not_guessed() {
        let short = batch(1, "0.5", "", false, vec![s("g"), Value::Int(1)]);
        assert!(decode_reply(&id(), &customers(&["a", "b"]), short).is_err());
        assert!(decode_reply(&id(), &customers(&["a"]), s("granted")).is_err());
        let bad_held = batch(1, "0.5", "", false, vec![s("a"), s("junk")]);
        assert!(decode_reply(&id(), &customers(&["a"]), bad_held).is_err());
    }
}
