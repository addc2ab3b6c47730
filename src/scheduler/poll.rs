//! Poll jobs' ticks (cron or interval): at most one run of a job at a time (an overlapping
//! tick is skipped), at most `max_concurrent_jobs` runs at once (the scheduler's permits), and
//! each run retried with backoff while it fails transiently.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::retry::{self, Backoff, Transient};
use crate::config::JobSpec;
use crate::job::{Context, JobError};
use crate::shutdown::Shutdown;

/// Whether a job's run is going: one run of a job at a time.
#[derive(Clone, Default)]
pub struct Running(Arc<AtomicBool>);

/// Held while a run goes on; the job is free again when it is dropped.
pub struct RunGuard(Arc<AtomicBool>);

impl Running {
    /// Take the job for a run, unless a run of it is going already.
    pub fn start(&self) -> Option<RunGuard> {
        (!self.0.swap(true, Ordering::AcqRel)).then(|| RunGuard(self.0.clone()))
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What became of one tick.
#[derive(Debug, PartialEq)]
pub enum Tick<T, E> {
    /// The daemon is stopping: no new run.
    Stopping,
    /// The previous run of the job is still going.
    Skipped,
    /// The run's end: `Ok(None)` when shutdown came during a retry's wait.
    Ran(Result<Option<T>, E>),
}

/// One tick of a job: skipped while the previous run goes on or once stopping; otherwise wait
/// for a permit and run, retrying transient failures with backoff. A permanent failure is not
/// retried: the next tick tries again.
pub async fn tick<T, E, F, Fut>(
    running: &Running,
    permits: &Semaphore,
    shutdown: &Shutdown,
    backoff: &Backoff,
    run: F,
    retrying: impl FnMut(&E, u64, std::time::Duration),
) -> Tick<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    if shutdown.is_shutdown() {
        return Tick::Stopping;
    }
    let Some(_running) = running.start() else {
        return Tick::Skipped;
    };
    let Ok(_permit) = permits.acquire().await else {
        return Tick::Stopping;
    };
    let mut shutdown = shutdown.clone();
    Tick::Ran(retry::with_backoff(backoff, &mut shutdown, run, retrying, Err).await)
}

/// One tick of a poll job in the daemon: run it until caught up, and say how it went.
pub async fn poll_tick(ctx: Context, job: Arc<JobSpec>, running: Running, permits: Arc<Semaphore>) {
    let shutdown = ctx.shutdown.clone();
    let backoff = Backoff::default();
    let ran = tick(
        &running,
        &permits,
        &shutdown,
        &backoff,
        || ctx.run_once(&job),
        |e: &JobError, attempt, wait| {
            ctx.metrics.retry_attempt(&job.name, attempt);
            tracing::warn!(job = %job.name, error = %e, attempt, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying");
        },
    )
    .await;
    match ran {
        Tick::Stopping => return,
        Tick::Skipped => {
            tracing::info!(job = %job.name, "tick skipped: the previous run is still going");
            return;
        }
        Tick::Ran(Ok(Some(s))) => {
            if s.rows > 0 {
                tracing::info!(job = %job.name, rows = s.rows, changed = s.changed, "run done");
            }
        }
        Tick::Ran(Ok(None)) => {}
        Tick::Ran(Err(JobError::Locked)) => {
            tracing::info!(job = %job.name, "held by another pgtide; tick skipped");
        }
        Tick::Ran(Err(e)) => {
            tracing::error!(job = %job.name, error = %e, "run failed; waiting for the next tick");
        }
    }
    ctx.metrics.retry_attempt(&job.name, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;
    use tokio::sync::Notify;

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

    fn quick() -> Backoff {
        Backoff::between(Duration::from_millis(1), Duration::from_millis(4))
    }

    #[tokio::test]
    async fn an_overlapping_tick_is_skipped_and_the_next_one_runs() {
        let running = Running::default();
        let permits = Semaphore::new(4);
        let (_trigger, stop) = shutdown::channel();
        let (started, release) = (Notify::new(), Notify::new());
        let runs = AtomicU32::new(0);
        let run = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            started.notify_one();
            release.notified().await;
            Ok::<_, Fake>(())
        };
        let backoff = quick();
        let first = tick(&running, &permits, &stop, &backoff, run, |_, _, _| {});
        let second = async {
            started.notified().await;
            let overlapping = tick(&running, &permits, &stop, &backoff, run, |_, _, _| {}).await;
            release.notify_one();
            overlapping
        };
        let (first, second) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(first, second)
        })
        .await
        .expect("ticks end");
        assert_eq!(first, Tick::Ran(Ok(Some(()))));
        assert_eq!(second, Tick::Skipped);
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        // The run is over: the next tick runs again.
        let release_at_once = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Fake>(())
        };
        let third = tick(
            &running,
            &permits,
            &stop,
            &backoff,
            release_at_once,
            |_, _, _| {},
        )
        .await;
        assert_eq!(third, Tick::Ran(Ok(Some(()))));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_run_frees_the_job_and_a_stopping_daemon_starts_none() {
        let running = Running::default();
        let permits = Semaphore::new(1);
        let (trigger, stop) = shutdown::channel();
        let backoff = quick();
        let runs = AtomicU32::new(0);
        let broken = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Fake::Broken)
        };
        let t = tick(&running, &permits, &stop, &backoff, broken, |_, _, _| {}).await;
        assert_eq!(t, Tick::Ran(Err(Fake::Broken)));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "a permanent failure is not retried"
        );
        assert!(
            running.start().is_some(),
            "the job is free after a failed run"
        );

        trigger.fire();
        let t = tick(&running, &permits, &stop, &backoff, broken, |_, _, _| {}).await;
        assert_eq!(t, Tick::Stopping);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_within_the_tick() {
        let running = Running::default();
        let permits = Semaphore::new(1);
        let (_trigger, stop) = shutdown::channel();
        let backoff = quick();
        let runs = AtomicU32::new(0);
        let flaky = || async {
            if runs.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(Fake::Down)
            } else {
                Ok(7)
            }
        };
        let mut attempts = Vec::new();
        let t = tick(&running, &permits, &stop, &backoff, flaky, |e, n, _| {
            assert_eq!(*e, Fake::Down);
            attempts.push(n);
        })
        .await;
        assert_eq!(t, Tick::Ran(Ok(Some(7))));
        assert_eq!(attempts, [1, 2, 3]);
    }
}
