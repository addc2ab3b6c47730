//! Retry with capped exponential backoff: the one loop that poll ticks and notify followers
//! share. A transient failure (connection trouble, a server restart) is tried again after a
//! growing wait; any other failure is handed back to the caller, which gives up or names a
//! wait of its own. Shutdown cuts a wait short.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;

use crate::job::JobError;
use crate::pg::Retry;
use crate::shutdown::Shutdown;

/// The first wait after a transient failure.
pub const FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between two attempts (before randomization): a database that is down for
/// an hour is waited for, and tried at least once a minute.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Whether an error can go away by trying again.
pub trait Transient {
    /// `true` for connection trouble and the like.
    fn is_transient(&self) -> bool;
}

impl Transient for JobError {
    fn is_transient(&self) -> bool {
        self.retry() == Retry::Transient
    }
}

/// Capped exponential backoff and the number of the attempt it is at. Shared by reference
/// with the attempt itself, which may [`reset`](Backoff::reset) it when it got going.
pub struct Backoff {
    state: Mutex<(ExponentialBackoff, u64)>,
    cap: Duration,
}

impl Default for Backoff {
    /// [`FIRST_WAIT`] doubling to at most [`MAX_WAIT`].
    fn default() -> Backoff {
        Backoff::between(FIRST_WAIT, MAX_WAIT)
    }
}

impl Backoff {
    /// `first` doubling to at most `cap`, each wait randomized by half (so that many jobs
    /// failing together do not come back together), for as long as the error stays transient.
    pub fn between(first: Duration, cap: Duration) -> Backoff {
        let policy = ExponentialBackoff {
            // The default's own first wait (0.5 s) would stand until the first reset.
            current_interval: first,
            initial_interval: first,
            max_interval: cap,
            randomization_factor: 0.5,
            multiplier: 2.0,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        Backoff {
            state: Mutex::new((policy, 0)),
            cap,
        }
    }

    /// Start over from the first wait (an attempt got going: its next failure is a new one).
    pub fn reset(&self) {
        let mut state = self.state.lock().expect("backoff lock");
        state.0.reset();
        state.1 = 0;
    }

    /// Count one more attempt; its number and the wait before it.
    pub fn next(&self) -> (u64, Duration) {
        let mut state = self.state.lock().expect("backoff lock");
        state.1 += 1;
        let wait = state.0.next_backoff().unwrap_or(self.cap);
        (state.1, wait)
    }
}

/// Run `attempt` until it succeeds (`Ok(Some(_))`). After a transient failure, `retrying` is
/// told the attempt's number and the wait, and the attempt is made again after that wait.
/// Any other failure, and a transient one once shutdown has begun, goes to `otherwise`: its
/// `Err` gives up with that error, its `Ok` names the wait before trying again. A shutdown
/// during a wait ends it all with `Ok(None)`.
pub async fn with_backoff<T, E, F, Fut>(
    backoff: &Backoff,
    shutdown: &mut Shutdown,
    mut attempt: F,
    mut retrying: impl FnMut(&E, u64, Duration),
    mut otherwise: impl FnMut(E) -> Result<Duration, E>,
) -> Result<Option<T>, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        let e = match attempt().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) => e,
        };
        let wait = if e.is_transient() && !shutdown.is_shutdown() {
            let (n, wait) = backoff.next();
            retrying(&e, n, wait);
            wait
        } else {
            otherwise(e)?
        };
        if shutdown.sleep(wait).await {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, PartialEq)]
    enum Fake {
        Down,
        Broken,
    }

    impl Transient for Fake {
        fn is_transient(&self) -> bool {
            *self == Fake::Down
        }
    }

    #[test]
    fn waits_double_up_to_the_cap_and_start_over_after_a_reset() {
        let b = Backoff::default();
        let mut intervals = Vec::new();
        for expected_attempt in 1..=10u64 {
            let (n, wait) = b.next();
            assert_eq!(n, expected_attempt);
            let interval = FIRST_WAIT
                .saturating_mul(1 << (n - 1).min(20))
                .min(MAX_WAIT);
            // Randomized by half around the interval.
            assert!(
                wait >= interval.mul_f64(0.5) && wait <= interval.mul_f64(1.5),
                "attempt {n}: {wait:?} not around {interval:?}"
            );
            intervals.push(interval);
        }
        assert_eq!(intervals[0], Duration::from_secs(1));
        assert_eq!(intervals[5], Duration::from_secs(32));
        assert!(
            intervals[6..].iter().all(|i| *i == MAX_WAIT),
            "{intervals:?}"
        );
        b.reset();
        let (n, wait) = b.next();
        assert_eq!(n, 1);
        assert!(wait <= FIRST_WAIT.mul_f64(1.5), "{wait:?}");
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_with_growing_waits_up_to_the_cap() {
        let b = Backoff::between(Duration::from_millis(1), Duration::from_millis(8));
        let (_trigger, mut stop) = shutdown::channel();
        let calls = AtomicU32::new(0);
        let mut retries = Vec::new();
        let out = with_backoff(
            &b,
            &mut stop,
            || async {
                // Down for six attempts, then up.
                if calls.fetch_add(1, Ordering::SeqCst) < 6 {
                    Err(Fake::Down)
                } else {
                    Ok("done")
                }
            },
            |e, n, wait| retries.push((format!("{e:?}"), n, wait)),
            Err,
        )
        .await;
        assert_eq!(out, Ok(Some("done")));
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        let numbers: Vec<u64> = retries.iter().map(|r| r.1).collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5, 6]);
        // Intervals 1, 2, 4, 8, 8, 8 ms, each randomized by half.
        let ms = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0];
        for ((_, n, wait), interval) in retries.iter().zip(ms) {
            let wait = wait.as_secs_f64() * 1000.0;
            assert!(
                wait >= interval * 0.5 - 1e-9 && wait <= interval * 1.5 + 1e-9,
                "attempt {n}: {wait} ms not around {interval} ms"
            );
        }
        assert!(retries.iter().all(|r| r.0 == "Down"));
    }

    #[tokio::test]
    async fn a_permanent_failure_is_not_retried() {
        let b = Backoff::between(Duration::from_millis(1), Duration::from_millis(8));
        let (_trigger, mut stop) = shutdown::channel();
        let calls = AtomicU32::new(0);
        let mut retried = 0;
        let out: Result<Option<()>, Fake> = with_backoff(
            &b,
            &mut stop,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fake::Broken)
            },
            |_, _, _| retried += 1,
            Err,
        )
        .await;
        assert_eq!(out, Err(Fake::Broken));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(retried, 0);
    }

    #[tokio::test]
    async fn a_shutdown_ends_the_wait_and_a_transient_failure_after_it_is_not_retried() {
        // A long wait, cut short by the shutdown.
        let b = Backoff::between(Duration::from_secs(3600), Duration::from_secs(3600));
        let (trigger, mut stop) = shutdown::channel();
        let calls = AtomicU32::new(0);
        let fire = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            trigger.fire();
        };
        let run = with_backoff(
            &b,
            &mut stop,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Fake::Down)
            },
            |_, _, _| {},
            Err,
        );
        let (out, ()) =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(run, fire) })
                .await
                .expect("the shutdown ends the wait");
        assert_eq!(out, Ok(None));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Once stopping, a transient failure goes to `otherwise` like a permanent one.
        let mut stopped = stop.clone();
        let out: Result<Option<()>, Fake> = with_backoff(
            &b,
            &mut stopped,
            || async { Err(Fake::Down) },
            |_, _, _| panic!("no retry while stopping"),
            Err,
        )
        .await;
        assert_eq!(out, Err(Fake::Down));
    }
}
