//! `pgtide run`: follow every notify job (LISTEN, drain on each notification, after each
//! reconnect and on the safety sweep) and run poll jobs on their interval, until SIGINT or
//! SIGTERM. A stop lets the batch in hand finish (its transactions commit or roll back, never
//! half) and exits 0; a second signal exits at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{JobSpec, Mode, Schedule, DEFAULT_SWEEP_SECS};
use crate::job::{Context, Follower, JobError};
use crate::pg::Retry;
use crate::source::notify::{Listener, Wake};

/// How often the listening connection is pinged: a dead socket is noticed within this.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often a job held by another pgtide is tried again.
const LOCK_RETRY: Duration = Duration::from_secs(5);
/// The first and the longest wait before a failed job is tried again.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Run until stopped by a signal.
pub async fn run(ctx: Context) {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: finishing the batches in hand");
        let _ = stop_tx.send(true);
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    let mut tasks = JoinSet::new();
    for job in ctx.config.jobs.clone() {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        match (job.mode, &job.schedule) {
            (Mode::Notify, _) => tasks.spawn(follow(ctx, job, stop)),
            (Mode::Poll, Some(Schedule::Interval(secs))) => {
                let every = Duration::from_secs(*secs);
                tasks.spawn(poll(ctx, job, every, stop))
            }
            (Mode::Poll, _) => {
                tracing::warn!(job = %job.name, "cron schedules are not run by this version's daemon; use interval_secs, or run-once from a timer");
                continue;
            }
        };
    }
    tracing::info!(jobs = tasks.len(), "running");
    while tasks.join_next().await.is_some() {}
    tracing::info!("stopped");
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Sleep, or return `true` at once when the daemon is stopping.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// Exponential waits, capped, with jitter so that jobs failing together do not retry together.
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.attempt += 1;
        let base = BACKOFF_FIRST
            .saturating_mul(1 << self.attempt.min(6))
            .min(BACKOFF_MAX);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        base.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
    }
}

async fn poll(ctx: Context, job: Arc<JobSpec>, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        match ctx.run_once(&job).await {
            Ok(s) if s.rows > 0 => {
                tracing::info!(job = %job.name, rows = s.rows, changed = s.changed, "run done")
            }
            Ok(_) => {}
            Err(JobError::Locked) => {
                tracing::info!(job = %job.name, "held by another pgtide; skipped")
            }
            Err(e) => tracing::error!(job = %job.name, error = %e, "run failed"),
        }
        if sleep_or_stop(every, &mut stop).await {
            return;
        }
    }
}

/// Follow a notify job until the daemon stops, starting over (with backoff) after failures.
async fn follow(ctx: Context, job: Arc<JobSpec>, mut stop: watch::Receiver<bool>) {
    let sweep = match job.schedule {
        Some(Schedule::Interval(secs)) => Duration::from_secs(secs),
        _ => Duration::from_secs(DEFAULT_SWEEP_SECS),
    };
    let mut backoff = Backoff { attempt: 0 };
    while !*stop.borrow() {
        let mut follower = match ctx.follower(&job).await {
            Ok(f) => f,
            Err(JobError::Locked) => {
                tracing::info!(job = %job.name, "held by another pgtide; waiting for it");
                if sleep_or_stop(LOCK_RETRY, &mut stop).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                let wait = backoff.next();
                tracing::error!(job = %job.name, error = %e, attempt = backoff.attempt, retry_in_ms = wait.as_millis() as u64, "cannot follow the job");
                if sleep_or_stop(wait, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        backoff.attempt = 0;
        let result = listen_and_drain(&ctx, &mut follower, sweep, &mut stop).await;
        follower.finish(result.as_ref().err()).await;
        match result {
            Ok(()) => return,
            Err(e) => {
                let wait = backoff.next();
                let kind = if e.retry() == Retry::Transient {
                    "transient"
                } else {
                    "permanent"
                };
                tracing::error!(job = %job.name, error = %e, kind, attempt = backoff.attempt, retry_in_ms = wait.as_millis() as u64, "following the job failed");
                if sleep_or_stop(wait, &mut stop).await {
                    return;
                }
            }
        }
    }
}

/// LISTEN, then drain: after every (re)connect, on every notification and on the sweep
/// interval. Returns `Ok` when the daemon stops.
async fn listen_and_drain(
    ctx: &Context,
    f: &mut Follower,
    sweep: Duration,
    stop: &mut watch::Receiver<bool>,
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
                _ = stop.changed() => return Ok(()),
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
