//! What `seckill load --report` samples while the crowd runs: the run's
//! time cut into equal intervals (buckets), and for each the answers by
//! outcome and a latency histogram of the answers that completed in it.
//! The report's requests/s and latency plots are read from it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The sampling interval for a run of `duration`: about 300 points over
/// the run, never finer than 100 ms (a 60 s run is sampled every 200 ms),
/// in whole 50 ms.
pub fn bucket_for(duration: Duration) -> Duration {
    let ms = (duration.as_millis() / 300).max(100);
    Duration::from_millis((ms.div_ceil(50) * 50) as u64)
}

/// Latencies kept per bucket: 1 µs to 60 s, two significant digits (1 %),
/// which is what a plot can show; about 10 KB a bucket.
fn histogram() -> Option<Histogram<u32>> {
    Histogram::new_with_bounds(1, 60_000_000, 2).ok()
}

#[derive(Default)]
struct Bucket<K> {
    outcomes: BTreeMap<K, u64>,
    latency: Option<Histogram<u32>>,
}

/// Answers per bucket since `started`.
pub struct Timeline<K> {
    started: Instant,
    bucket: Duration,
    buckets: Mutex<Vec<Bucket<K>>>,
}

/// p50, p90 and p99 of one bucket, in milliseconds.
pub type Quantiles = Option<[f64; 3]>;

impl<K: Ord + Copy> Timeline<K> {
    pub fn new(started: Instant, bucket: Duration) -> Self {
        Self {
            started,
            bucket: bucket.max(Duration::from_millis(1)),
            buckets: Mutex::new(Vec::new()),
        }
    }

    pub fn bucket(&self) -> Duration {
        self.bucket
    }

    /// The bucket of instant `at`.
    fn index(&self, at: Instant) -> usize {
        (at.saturating_duration_since(self.started).as_nanos() / self.bucket.as_nanos()) as usize
    }

    /// An answer of `outcome` that completed at `done` after `latency`.
    pub fn record(&self, done: Instant, outcome: K, latency: Duration) {
        let i = self.index(done);
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        if buckets.len() <= i {
            buckets.resize_with(i + 1, || Bucket {
                outcomes: BTreeMap::new(),
                latency: None,
            });
        }
        let bucket = &mut buckets[i];
        *bucket.outcomes.entry(outcome).or_default() += 1;
        if bucket.latency.is_none() {
            bucket.latency = histogram();
        }
        if let Some(h) = bucket.latency.as_mut() {
            h.saturating_record((latency.as_micros() as u64).max(1));
        }
    }

    /// Buckets from the start to the last answer.
    pub fn len(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
    }

    /// Answers per second of each outcome, per bucket, over `n` buckets.
    pub fn rates(&self, n: usize) -> BTreeMap<K, Vec<f64>> {
        let secs = self.bucket.as_secs_f64();
        let mut out: BTreeMap<K, Vec<f64>> = BTreeMap::new();
        let Ok(buckets) = self.buckets.lock() else {
            return out;
        };
        for (i, bucket) in buckets.iter().enumerate().take(n) {
            for (outcome, count) in &bucket.outcomes {
                out.entry(*outcome).or_insert_with(|| vec![0.0; n])[i] = *count as f64 / secs;
            }
        }
        out
    }

    /// Answers of `outcome` per bucket (counts, not rates), over `n` buckets.
    pub fn counts(&self, outcome: K, n: usize) -> Vec<u64> {
        let Ok(buckets) = self.buckets.lock() else {
            return vec![0; n];
        };
        (0..n)
            .map(|i| {
                buckets
                    .get(i)
                    .and_then(|b| b.outcomes.get(&outcome).copied())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// p50, p90 and p99 in milliseconds per bucket, over `n` buckets;
    /// `None` for a bucket without answers.
    pub fn quantiles(&self, n: usize) -> Vec<Quantiles> {
        let Ok(buckets) = self.buckets.lock() else {
            return vec![None; n];
        };
        (0..n)
            .map(|i| {
                let h = buckets.get(i)?.latency.as_ref()?;
                let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                (!h.is_empty()).then(|| [ms(0.5), ms(0.9), ms(0.99)])
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_sampled_in_about_300_points_no_finer_than_100_ms() {
        for (run_secs, bucket_ms) in [(60, 200), (10, 100), (75, 250), (3600, 12_000)] {
            assert_eq!(
                bucket_for(Duration::from_secs(run_secs)),
                Duration::from_millis(bucket_ms),
                "a run of {run_secs} s"
            );
        }
    }

    #[test]
    fn answers_land_in_the_bucket_of_their_completion_as_rates_per_second() {
        let t0 = Instant::now();
        let timeline = Timeline::new(t0, Duration::from_millis(200));
        let ms = Duration::from_millis;
        for _ in 0..4 {
            timeline.record(t0 + ms(10), "notStarted", ms(1));
        }
        timeline.record(t0 + ms(450), "granted", ms(2));
        timeline.record(t0 + ms(599), "granted", ms(4));
        assert_eq!(timeline.len(), 3);
        let rates = timeline.rates(4);
        assert_eq!(rates["notStarted"], [20.0, 0.0, 0.0, 0.0]);
        assert_eq!(rates["granted"], [0.0, 0.0, 10.0, 0.0]);
        assert_eq!(timeline.counts("granted", 4), [0, 0, 2, 0]);
        assert_eq!(timeline.counts("soldOut", 2), [0, 0]);
    }

    #[test]
    fn each_bucket_has_its_own_percentiles_and_an_empty_one_has_none() {
        let t0 = Instant::now();
        let timeline = Timeline::new(t0, Duration::from_millis(100));
        for i in 1..=100u64 {
            timeline.record(t0, 1, Duration::from_millis(i));
        }
        timeline.record(
            t0 + Duration::from_millis(250),
            1,
            Duration::from_micros(700),
        );
        let q = timeline.quantiles(4);
        let [p50, p90, p99] = q[0].unwrap();
        // Two significant digits: within 1 %.
        for (got, want) in [(p50, 50.0), (p90, 90.0), (p99, 99.0)] {
            assert!((got - want).abs() <= want * 0.01, "{got} vs {want}");
        }
        assert_eq!(q[1], None);
        assert!((q[2].unwrap()[0] - 0.7).abs() < 0.01);
        assert_eq!(q[3], None);
    }
}
