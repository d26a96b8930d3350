//! The grab: a batch of customers of one promotion, one `FCALL
//! seckill_v3_grab` (see `functions/grab.lua`), answered as one string of
//! lines (or, when the window turns the whole batch away, a short array)
//! that [`decode_reply`] turns into one [`GrabOutcome`] per customer. No JSON
//! and no date formatting happen in Lua: `grantedAt` is rendered here, once
//! per batch, from the Redis time the function read.

use redis::aio::ConnectionLike;
use redis::Value;
use serde::{Deserialize, Serialize};

use super::functions::{self, GRAB};
use super::{rfc3339_ms, CustomerId, FinishReason, PromotionId, PromotionKeys, ScriptError};

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
    each: impl FnMut(&[u8]),
) -> Result<(), ScriptError> {
    customers_of(con, &PromotionKeys::new(id).customers, each).await
}

/// The fields of the customers hash `key`, page by page (HSCAN): the
/// holders of one promotion, or of one shard of a sharded one.
pub(super) async fn customers_of<C: ConnectionLike>(
    con: &mut C,
    key: &str,
    mut each: impl FnMut(&[u8]),
) -> Result<(), ScriptError> {
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
            .arg(key)
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

pub(super) fn bad(what: impl Into<String>) -> ScriptError {
    ScriptError::BadReply(what.into())
}

pub(super) fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

pub(super) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// `grantedAt` of a coupon granted at `epoch_ms` (Redis' clock).
pub(super) fn granted_at(epoch_ms: i64) -> Result<String, ScriptError> {
    rfc3339_ms(epoch_ms).ok_or_else(|| bad(format!("time out of range: {epoch_ms} ms")))
}

/// The coupon of the promotion spelled `promotion` that a customers-hash
/// value stands for: `<seq>:<grantedAtMs>` since version 2, or the coupon
/// JSON version 1 wrote (starts with `{`).
pub(super) fn held_coupon(
    promotion: &str,
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
    Ok(coupon(promotion, customer, discount, seq, granted_at(ms)?))
}

/// A coupon of the promotion spelled `promotion` (`<namespace>/<name>`).
pub(super) fn coupon(
    promotion: &str,
    customer: &CustomerId,
    discount: f64,
    seq: u64,
    granted_at: String,
) -> Coupon {
    Coupon {
        coupon_id: super::coupon_id(promotion, seq),
        customer_id: customer.as_str().to_owned(),
        promotion: promotion.to_owned(),
        discount,
        granted_at,
    }
}

/// Decodes what `seckill_v3_grab` answers (see the head of
/// `functions/grab.lua`) into one outcome per customer of `customers`: an
/// array when the window turns the whole batch away, else the batch's
/// lines in one string.
pub fn decode_reply(
    id: &PromotionId,
    customers: &[CustomerId],
    reply: Value,
) -> Result<Vec<GrabOutcome>, ScriptError> {
    let items = match reply {
        Value::BulkString(batch) => return decode_batch(id, customers, &batch),
        Value::Array(items) => items,
        other => return Err(bad(format!("grab reply: {other:?}"))),
    };
    let kind = items.first().and_then(text).unwrap_or_default();
    let all = |outcome: GrabOutcome| Ok(vec![outcome; customers.len()]);
    match kind {
        "unknown_promotion" => all(GrabOutcome::UnknownPromotion),
        "not_started" => all(GrabOutcome::NotStarted {
            opens_in_ms: items.get(2).and_then(int).unwrap_or(0).max(0) as u64,
            publish_time: items.get(3).and_then(text).unwrap_or_default().to_owned(),
        }),
        other => Err(bad(format!("grab reply: unknown kind {other:?}"))),
    }
}

/// The lines of a batch's answer: `batch`, Redis' time (ms), the discount,
/// the reason the promotion is over (or empty), whether this batch sold it
/// out (`0`|`1`), then one line per customer: `g<seq>` granted now, `a<held
/// value>` already held, `x` none left.
fn decode_batch(
    id: &PromotionId,
    customers: &[CustomerId],
    batch: &[u8],
) -> Result<Vec<GrabOutcome>, ScriptError> {
    let batch = std::str::from_utf8(batch).map_err(|_| bad("grab reply: not UTF-8"))?;
    let mut lines = batch.split('\n');
    let mut head = |what: &str| {
        lines
            .next()
            .ok_or_else(|| bad(format!("grab reply: no {what}")))
    };
    let kind = head("kind")?;
    if kind != "batch" {
        return Err(bad(format!("grab reply: unknown kind {kind:?}")));
    }
    let now: i64 = head("time")?.parse().map_err(|_| bad("grab reply: time"))?;
    let discount: f64 = head("discount")?
        .parse()
        .map_err(|_| bad("grab reply: discount"))?;
    let over = match head("reason")? {
        "" => None,
        reason => Some(
            FinishReason::parse(reason)
                .ok_or_else(|| bad(format!("grab reply: reason {reason:?}")))?,
        ),
    };
    let sold_out_now = head("sold-out flag")? == "1";
    // Spelled once per batch: every coupon names the promotion, and every
    // coupon granted now has the batch's time.
    let promotion = id.to_string();
    let granted_now = granted_at(now)?;
    let mut outcomes = Vec::with_capacity(customers.len());
    let mut customer_of = customers.iter();
    for line in lines {
        let customer = customer_of.next().ok_or_else(|| {
            bad(format!(
                "grab reply: more answers than {} customers",
                customers.len()
            ))
        })?;
        outcomes.push(match line.split_at_checked(1) {
            Some(("g", seq)) => {
                let seq: u64 = seq
                    .parse()
                    .map_err(|_| bad(format!("grab reply: seq {seq:?}")))?;
                GrabOutcome::Granted {
                    coupon: coupon(&promotion, customer, discount, seq, granted_now.clone()),
                    sold_out: sold_out_now,
                }
            }
            Some(("a", value)) => GrabOutcome::AlreadyGranted {
                coupon: held_coupon(&promotion, customer, discount, value)?,
            },
            Some(("x", "")) => match over {
                Some(FinishReason::SoldOut) => GrabOutcome::SoldOut,
                Some(reason) => GrabOutcome::Finished { reason },
                None => return Err(bad("grab reply: none left without a reason")),
            },
            _ => return Err(bad(format!("grab reply: answer {line:?}"))),
        });
    }
    if outcomes.len() != customers.len() {
        return Err(bad(format!(
            "grab reply: {} answers for {} customers",
            outcomes.len(),
            customers.len()
        )));
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::BulkString(v.as_bytes().to_vec())
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
        let reply = s(concat!(
            "batch\n1764583200123\n0.8\nSoldOut\n1\n",
            "g7\n",
            "a7:1764583200123\n",
            r#"a{"couponId":"shop/sale#1","customerId":"carol","promotion":"shop/sale","discount":0.5,"grantedAt":"2026-01-01T00:00:00.000Z"}"#,
            "\nx"
        ));
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
        let expired = s("batch\n1\n0.5\nExpired\n0\nx\nx");
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
        let short = s("batch\n1\n0.5\n\n0\ng1");
        assert!(decode_reply(&id(), &customers(&["a", "b"]), short).is_err());
        let long = s("batch\n1\n0.5\n\n0\ng1\ng2");
        assert!(decode_reply(&id(), &customers(&["a"]), long).is_err());
        assert!(decode_reply(&id(), &customers(&["a"]), s("granted")).is_err());
        let bad_held = s("batch\n1\n0.5\n\n0\najunk");
        assert!(decode_reply(&id(), &customers(&["a"]), bad_held).is_err());
    }
}
