//! Notify jobs followed until the daemon stops: LISTEN, and drain after every (re)connect, on
//! every notification and on the safety sweep. A failed follow starts over: with backoff when
//! the failure is transient, after the sweep interval when it is not, and every few seconds
//! while another pgtide holds the job.

use std::sync::Arc;
use std::time::Duration;

use super::retry::{self, Backoff};
use crate::config::{JobSpec, Schedule, DEFAULT_SWEEP_SECS};
use crate::job::{Context, Follower, JobError};
use crate::shutdown::Shutdown;
use crate::source::notify::{Listener, Wake};

/// How often the listening connection is pinged: a dead socket is noticed within this.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often a notify job held by another pgtide is tried again (a standby on another host).
const LOCK_RETRY: Duration = Duration::from_secs(5);

/// Follow a notify job until the daemon stops.
pub async fn follow(ctx: Context, job: Arc<JobSpec>) {
    let sweep = match job.schedule {
        Some(Schedule::Interval(secs)) => Duration::from_secs(secs),
        _ => Duration::from_secs(DEFAULT_SWEEP_SECS),
    };
    let mut shutdown = ctx.shutdown.clone();
    if shutdown.is_shutdown() {
        return;
    }
    let backoff = Backoff::default();
    let once = || async {
        let mut follower = ctx.follower(&job).await?;
        // It got going: a later failure is a new one, waited for from the first wait.
        backoff.reset();
        ctx.metrics.retry_attempt(&job.name, 0);
        let result = listen_and_drain(&ctx, &mut follower, sweep, ctx.shutdown.clone()).await;
        ctx.metrics.run(&job.name, result.is_ok());
        follower.finish(result.as_ref().err()).await;
        result
    };
    let retrying = |e: &JobError, attempt, wait: Duration| {
        ctx.metrics.retry_attempt(&job.name, attempt);
        tracing::warn!(job = %job.name, error = %e, attempt, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying");
    };
    let otherwise = |e: JobError| {
        Ok::<_, JobError>(match e {
            JobError::Locked => {
                tracing::info!(job = %job.name, "held by another pgtide; waiting for it");
                LOCK_RETRY
            }
            e => {
                tracing::error!(job = %job.name, error = %e, retry_in_secs = sweep.as_secs(), "following the job failed");
                sweep
            }
        })
    };
    // Every failure is waited for and tried again: this ends only when the daemon stops.
    let _ = retry::with_backoff(&backoff, &mut shutdown, once, retrying, otherwise).await;
}

/// LISTEN, then drain: after every (re)connect, on every notification and on the sweep
/// interval. Returns `Ok` when the daemon stops.
async fn listen_and_drain(
    ctx: &Context,
    f: &mut Follower,
    sweep: Duration,
    mut shutdown: Shutdown,
) -> Result<(), JobError> {
    let job = f.job().clone();
    let url = ctx.config.sources[&job.source].clone();
    let what = format!("source {}", job.source);
    loop {
        let mut listener = Listener::start(&url, &job.name, &what).await?;
        tracing::info!(job = %job.name, "listening");
        // Whatever arrived while nobody listened is in the event table.
        f.drain_all().await?;
        let mut sweep_tick = tokio::time::interval(sweep);
        sweep_tick.tick().await;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                () = shutdown.recv() => return Ok(()),
                wake = listener.wakes.recv() => match wake {
                    Some(Wake::Notified) => {
                        // Notifications that queued up meanwhile are served by this drain too.
                        while let Ok(Wake::Notified) = listener.wakes.try_recv() {}
                        f.drain_all().await?;
                    }
                    Some(Wake::Lost(why)) => {
                        tracing::warn!(job = %job.name, reason = %why, "listening connection lost; reconnecting");
                        break;
                    }
                    None => break,
                },
                _ = sweep_tick.tick() => {
                    let n = f.drain_all().await?;
                    if n > 0 {
                        tracing::info!(job = %job.name, events = n, "the sweep found events no notification announced");
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(why) = listener.ping().await {
                        tracing::warn!(job = %job.name, reason = %why, "listening connection does not answer; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}
