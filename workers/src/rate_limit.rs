//! Abuse control: a token bucket per client (by IP or by customer id). A flash
//! sale attracts bots that hammer the grab endpoint; the bucket lets each
//! client burst a little and then caps it at a steady rate, answering 429 with
//! `Retry-After` instead of spending a Redis round trip on it.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What identifies a client for rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateLimitKey {
    /// The peer IP address (or the first X-Forwarded-For hop when trusted).
    Ip,
    /// The customer id of the grab.
    Customer,
}

impl RateLimitKey {
    /// The flag value, also the `key` label of the rate-limit metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Customer => "customer",
        }
    }
}

/// Rate-limit flags; off unless `--rate-limit-per-sec` is above zero.
#[derive(clap::Args, Debug, Clone)]
pub struct RateLimitArgs {
    /// Steady requests per second allowed per client; 0 turns limiting off.
    #[arg(long, env = "SECKILL_RATE_LIMIT_PER_SEC", default_value_t = 0.0)]
    pub rate_limit_per_sec: f64,
    /// Requests a client may send at once before the steady rate applies.
    #[arg(long, env = "SECKILL_RATE_LIMIT_BURST", default_value_t = 10)]
    pub rate_limit_burst: u32,
    /// What identifies a client.
    #[arg(long, env = "SECKILL_RATE_LIMIT_KEY", value_enum, default_value_t = RateLimitKey::Customer)]
    pub rate_limit_key: RateLimitKey,
    /// Key by the first X-Forwarded-For address (only behind a trusted ingress).
    #[arg(long, env = "SECKILL_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,
}

impl Default for RateLimitArgs {
    fn default() -> Self {
        Self {
            rate_limit_per_sec: 0.0,
            rate_limit_burst: 10,
            rate_limit_key: RateLimitKey::Customer,
            trust_forwarded_for: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

const SHARDS: usize = 32;
/// A shard holding more clients than this drops those whose bucket refilled,
/// at most once per [`SWEEP_EVERY`], so a crowd of new clients never makes
/// each check scan the shard.
const SHARD_SOFT_LIMIT: usize = 4096;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Shard {
    buckets: HashMap<String, Bucket>,
    last_sweep: Option<Instant>,
}

/// Token buckets for many clients, sharded to keep lock contention low.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
}

impl RateLimiter {
    /// `None` when limiting is off.
    pub fn from_args(args: &RateLimitArgs) -> Option<Self> {
        (args.rate_limit_per_sec > 0.0)
            .then(|| Self::new(args.rate_limit_per_sec, args.rate_limit_burst.max(1)))
    }

    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        Self {
            rate: rate_per_sec,
            burst: f64::from(burst),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::new(),
                        last_sweep: None,
                    })
                })
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Takes one token for `client` at `now`; `Err(wait)` tells how long until
    /// the next token.
    pub fn check_at(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let shard = &self.shards[(self.hasher.hash_one(client) as usize) % SHARDS];
        let Ok(mut shard) = shard.lock() else {
            // A poisoned lock only means another request panicked; never
            // turn customers away for it.
            return Ok(());
        };
        let due = shard
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
        if shard.buckets.len() > SHARD_SOFT_LIMIT && due {
            let full_after = Duration::from_secs_f64(self.burst / self.rate);
            shard
                .buckets
                .retain(|_, b| now.saturating_duration_since(b.last) < full_after);
            shard.last_sweep = Some(now);
        }
        // Look up before inserting: a known client costs no allocation.
        if !shard.buckets.contains_key(client) {
            shard.buckets.insert(
                client.to_owned(),
                Bucket {
                    tokens: self.burst,
                    last: now,
                },
            );
        }
        let Some(bucket) = shard.buckets.get_mut(client) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    pub fn check(&self, client: &str) -> Result<(), Duration> {
        self.check_at(client, Instant::now())
    }
}

/// Whole seconds for a `Retry-After` header, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_may_burst_then_is_held_to_the_steady_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("bot", t0).is_ok());
        }
        let wait = limiter.check_at("bot", t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        // Half a second later one token has come back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert!(limiter.check_at("bot", t1).is_ok());
        assert!(limiter.check_at("bot", t1).is_err());
    }

    #[test]
    fn clients_do_not_share_buckets() {
        let limiter = RateLimiter::new(1.0, 1);
        let t = Instant::now();
        assert!(limiter.check_at("a", t).is_ok());
        assert!(limiter.check_at("a", t).is_err());
        assert!(limiter.check_at("b", t).is_ok());
    }

    #[test]
    fn limiting_is_off_by_default() {
        assert!(RateLimiter::from_args(&RateLimitArgs::default()).is_none());
    }

    #[test]
    fn idle_clients_are_forgotten_when_a_shard_fills() {
        let limiter = RateLimiter::new(1000.0, 1);
        let t = Instant::now();
        for i in 0..(SHARD_SOFT_LIMIT * SHARDS * 2) {
            let _ = limiter.check_at(&format!("c{i}"), t);
        }
        let later = t + Duration::from_secs(2);
        for i in 0..SHARDS * 8 {
            let _ = limiter.check_at(&format!("late{i}"), later);
        }
        let total: usize = limiter
            .shards
            .iter()
            .map(|s| s.lock().unwrap().buckets.len())
            .sum();
        assert!(total < SHARD_SOFT_LIMIT * SHARDS * 2, "{total}");
    }
}
