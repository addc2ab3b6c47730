//! `pgtide run`: the scheduler. Poll jobs run on their cron or interval schedule
//! (tokio-cron-scheduler), at most one run of a job at a time and at most
//! `max_concurrent_jobs` at once; notify jobs are followed (LISTEN, drain on each
//! notification, after each reconnect and on the safety sweep). Transient failures are
//! retried with capped exponential backoff; permanent ones fail the run and wait for the next
//! tick. SIGINT or SIGTERM stops new work, lets the batches in hand finish, and exits 0 within
//! a deadline; a second signal exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::{JobSpec, Mode, Schedule, DEFAULT_SWEEP_SECS};
use crate::job::{Context, Follower, JobError};
use crate::pg::Retry;
use crate::source::notify::{Listener, Wake};

/// How often the listening connection is pinged: a dead socket is noticed within this.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often a notify job held by another pgtide is tried again (a standby on another host).
const LOCK_RETRY: Duration = Duration::from_secs(5);
/// How often the waiting rows or events of every job are counted for `/metrics`.
const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// How long a stop waits for the batches in hand before giving up on them.
pub const STOP_DEADLINE: Duration = Duration::from_secs(60);

/// Retries: 1 s doubling to at most 60 s, each wait randomized by half, for as long as the
/// error stays transient (a database that is down for an hour is waited for).
fn retry_policy() -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: Duration::from_secs(1),
        max_interval: Duration::from_secs(60),
        randomization_factor: 0.5,
        multiplier: 2.0,
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

/// Run until stopped by a signal; the exit code.
pub async fn run(ctx: Context) -> i32 {
    let (stop_tx, stop) = watch::channel(false);
    let stopping = ctx.stopping.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: no new work; finishing the batches in hand");
        stopping.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });

    if let Some(addr) = &ctx.config.daemon.metrics_listen {
        let addr = addr.parse().expect("validated at load");
        let metrics = ctx.metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, metrics).await {
                tracing::error!(%addr, error = %e, "cannot serve /metrics");
            }
        });
    }
    for job in &ctx.config.jobs {
        ctx.metrics.register(&job.name);
        if let Ok(Some(at)) = ctx.store.last_success(&job.name).await {
            ctx.metrics.last_success(&job.name, at);
        }
    }
    tokio::spawn(sample_waiting(ctx.clone()));

    let mut tasks = JoinSet::new();
    let scheduler = match schedule_poll_jobs(&ctx, &mut tasks).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the scheduler");
            return 1;
        }
    };
    for job in ctx.config.jobs.iter().filter(|j| j.mode == Mode::Notify) {
        tasks.spawn(follow(ctx.clone(), job.clone(), stop.clone()));
    }
    tracing::info!(jobs = ctx.config.jobs.len(), "running");

    let mut stopped = stop.clone();
    let _ = stopped.wait_for(|s| *s).await;
    if let Some(mut s) = scheduler {
        let _ = s.shutdown().await;
    }
    let max = ctx.config.daemon.max_concurrent_jobs as u32;
    let finished = tokio::time::timeout(STOP_DEADLINE, async {
        while tasks.join_next().await.is_some() {}
        // Runs started by the scheduler hold a permit each: all permits back means all done.
        if let Some(permits) = RUNS.get() {
            let _ = permits.acquire_many(max).await;
        }
    })
    .await
    .is_ok();
    if finished {
        tracing::info!("stopped");
        0
    } else {
        tracing::error!(
            deadline_secs = STOP_DEADLINE.as_secs(),
            "runs did not finish within the deadline; exiting anyway (their open transactions roll back)"
        );
        1
    }
}

/// The permits for runs of poll jobs (`max_concurrent_jobs`).
static RUNS: std::sync::OnceLock<Arc<Semaphore>> = std::sync::OnceLock::new();

async fn schedule_poll_jobs(
    ctx: &Context,
    tasks: &mut JoinSet<()>,
) -> Result<Option<JobScheduler>, String> {
    let polls: Vec<Arc<JobSpec>> = ctx
        .config
        .jobs
        .iter()
        .filter(|j| j.mode == Mode::Poll)
        .cloned()
        .collect();
    if polls.is_empty() {
        return Ok(None);
    }
    let permits = RUNS
        .get_or_init(|| Arc::new(Semaphore::new(ctx.config.daemon.max_concurrent_jobs)))
        .clone();
    let scheduler = JobScheduler::new().await.map_err(|e| e.to_string())?;
    for job in polls {
        let running = Arc::new(AtomicBool::new(false));
        let on_tick = {
            let (ctx, job, permits, running) =
                (ctx.clone(), job.clone(), permits.clone(), running.clone());
            move |_id, _lock| {
                let (ctx, job, permits, running) =
                    (ctx.clone(), job.clone(), permits.clone(), running.clone());
                Box::pin(async move { tick(ctx, job, permits, running).await })
                    as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
            }
        };
        let scheduled = match job.schedule.as_ref() {
            Some(Schedule::Cron(expr)) => Job::new_async(expr.as_str(), on_tick),
            Some(Schedule::Interval(secs)) => {
                // An interval job also runs at once, rather than an interval after the start.
                let (ctx, job, permits, running) =
                    (ctx.clone(), job.clone(), permits.clone(), running.clone());
                tasks.spawn(async move { tick(ctx, job, permits, running).await });
                Job::new_repeated_async(Duration::from_secs(*secs), on_tick)
            }
            None => continue,
        }
        .map_err(|e| format!("job {}: schedule: {e}", job.name))?;
        scheduler.add(scheduled).await.map_err(|e| e.to_string())?;
    }
    scheduler.start().await.map_err(|e| e.to_string())?;
    Ok(Some(scheduler))
}

/// One tick of a poll job: skipped while the previous run goes on; otherwise run until caught
/// up, retrying transient failures.
async fn tick(ctx: Context, job: Arc<JobSpec>, permits: Arc<Semaphore>, running: Arc<AtomicBool>) {
    if ctx.stopping.load(Ordering::Relaxed) {
        return;
    }
    if running.swap(true, Ordering::AcqRel) {
        tracing::info!(job = %job.name, "tick skipped: the previous run is still going");
        return;
    }
    let Ok(_permit) = permits.acquire().await else {
        running.store(false, Ordering::Release);
        return;
    };
    let mut policy = retry_policy();
    let mut attempt = 0u64;
    loop {
        match ctx.run_once(&job).await {
            Ok(s) => {
                if s.rows > 0 {
                    tracing::info!(job = %job.name, rows = s.rows, changed = s.changed, "run done");
                }
                break;
            }
            Err(JobError::Locked) => {
                tracing::info!(job = %job.name, "held by another pgtide; tick skipped");
                break;
            }
            Err(e) if e.retry() == Retry::Transient && !ctx.stopping.load(Ordering::Relaxed) => {
                attempt += 1;
                ctx.metrics.retry_attempt(&job.name, attempt);
                let wait = policy.next_backoff().unwrap_or(Duration::from_secs(60));
                tracing::warn!(job = %job.name, error = %e, attempt, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying");
                if sleep_or_stop(&ctx, wait).await {
                    break;
                }
            }
            Err(e) => {
                tracing::error!(job = %job.name, error = %e, "run failed; waiting for the next tick");
                break;
            }
        }
    }
    ctx.metrics.retry_attempt(&job.name, 0);
    running.store(false, Ordering::Release);
}

/// Sleep, or return `true` at once when the daemon is stopping.
async fn sleep_or_stop(ctx: &Context, d: Duration) -> bool {
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end {
        if ctx.stopping.load(Ordering::Relaxed) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200).min(end - tokio::time::Instant::now())).await;
    }
    ctx.stopping.load(Ordering::Relaxed)
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Count every job's waiting rows or events for `/metrics`, now and then.
async fn sample_waiting(ctx: Context) {
    loop {
        for job in &ctx.config.jobs {
            let n = match job.mode {
                Mode::Notify => ctx.events_waiting(job).await.map(|(n, _)| n),
                Mode::Poll => match ctx.store.position(&job.name).await {
                    Ok(pos) => ctx.waiting(job, pos.as_ref()).await,
                    Err(e) => Err(e.into()),
                },
            };
            ctx.metrics.waiting(&job.name, n.ok());
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// Follow a notify job until the daemon stops, starting over after failures: with backoff
/// when they are transient, after its sweep interval when they are not.
async fn follow(ctx: Context, job: Arc<JobSpec>, mut stop: watch::Receiver<bool>) {
    let sweep = match job.schedule {
        Some(Schedule::Interval(secs)) => Duration::from_secs(secs),
        _ => Duration::from_secs(DEFAULT_SWEEP_SECS),
    };
    let mut policy = retry_policy();
    let mut attempt = 0u64;
    while !*stop.borrow() {
        let result = match ctx.follower(&job).await {
            Ok(mut follower) => {
                policy.reset();
                attempt = 0;
                ctx.metrics.retry_attempt(&job.name, 0);
                let result = listen_and_drain(&ctx, &mut follower, sweep, &mut stop).await;
                ctx.metrics.run(&job.name, result.is_ok());
                follower.finish(result.as_ref().err()).await;
                result
            }
            Err(e) => Err(e),
        };
        let wait = match result {
            Ok(()) => return,
            Err(JobError::Locked) => {
                tracing::info!(job = %job.name, "held by another pgtide; waiting for it");
                LOCK_RETRY
            }
            Err(e) if e.retry() == Retry::Transient => {
                attempt += 1;
                ctx.metrics.retry_attempt(&job.name, attempt);
                let wait = policy.next_backoff().unwrap_or(Duration::from_secs(60));
                tracing::warn!(job = %job.name, error = %e, attempt, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying");
                wait
            }
            Err(e) => {
                tracing::error!(job = %job.name, error = %e, retry_in_secs = sweep.as_secs(), "following the job failed");
                sweep
            }
        };
        if sleep_or_stop(&ctx, wait).await {
            return;
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
