//! Waiting for something to become true, the one way every test does it:
//! poll a probe until it answers `Ok`, and fail with its last answer when the
//! deadline passes.
//!
//! The deadline only bounds a hang: it is generous (seconds where the
//! expected wait is milliseconds) and nothing is asserted about how soon the
//! probe succeeded. Speed is measured by `make bench`, never by a test.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

/// How long a probe rests between two attempts.
pub const POLL_EVERY: Duration = Duration::from_millis(10);

/// Polls `probe` until it answers `Ok(value)` and returns the value; panics
/// with the last `Err` (which should say what was seen) once `within` has
/// passed.
pub async fn eventually<T, E, F, Fut>(within: Duration, probe: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    match try_eventually(within, probe).await {
        Ok(value) => value,
        Err(last) => panic!("not within {within:?}; last seen: {last:?}"),
    }
}

/// [`eventually`], returning the last `Err` once `within` has passed instead
/// of panicking, for a test that gathers more facts before it fails.
pub async fn try_eventually<T, E, F, Fut>(within: Duration, mut probe: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => tokio::time::sleep(POLL_EVERY).await,
        }
    }
}

/// [`eventually`] for code that cannot await (fixtures built on blocking
/// connections): returns the last `Err` when `within` has passed instead of
/// panicking, so the fixture can report it as its own error.
pub fn eventually_blocking<T, E, F>(within: Duration, mut probe: F) -> Result<T, E>
where
    F: FnMut() -> Result<T, E>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => std::thread::sleep(POLL_EVERY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_the_probe_succeeds() {
        let mut calls = 0;
        let got = eventually(Duration::from_secs(5), || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(n)
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "last seen: \"still 7\"")]
    async fn panics_with_the_last_observation_after_the_deadline() {
        eventually(Duration::from_millis(30), || async {
            Err::<(), _>("still 7")
        })
        .await;
    }

    #[test]
    fn the_blocking_form_returns_the_last_error_after_the_deadline() {
        let mut n = 0;
        let r: Result<(), u32> = eventually_blocking(Duration::from_millis(30), || {
            n += 1;
            Err(n)
        });
        assert!(matches!(r, Err(k) if k >= 2), "{r:?}");
    }
}
