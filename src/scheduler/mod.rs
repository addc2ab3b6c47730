//! `pgtide run`: the scheduler. Poll jobs run on their cron or interval schedule
//! (tokio-cron-scheduler; [`poll`]), at most one run of a job at a time and at most
//! `max_concurrent_jobs` at once; notify jobs are followed ([`follow`]). Transient failures
//! are retried with capped exponential backoff ([`retry`]); permanent ones fail the run and
//! wait for the next tick. When the shared [`Shutdown`] fires, no new work starts, and
//! [`run`] returns once the runs in hand have reached a batch boundary; the deadline for that,
//! and the signals, are the caller's (`cli`).

pub mod follow;
pub mod poll;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use crate::config::{JobSpec, Mode, Schedule};
use crate::job::Context;
use crate::shutdown::Shutdown;
use poll::Running;

/// How often the waiting rows or events of every job are counted for `/metrics`.
const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// How long a stop waits for the batches in hand before giving up on them.
pub const STOP_DEADLINE: Duration = Duration::from_secs(60);

/// Why the scheduler cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("job {job}: schedule: {source}")]
    Schedule {
        job: String,
        #[source]
        source: JobSchedulerError,
    },
    #[error("{0}")]
    Cron(#[from] JobSchedulerError),
}

/// Run every job until the context's shutdown fires (the one the runs see too), then wait for
/// the runs in hand to stop at a batch boundary.
pub async fn run(ctx: Context) -> Result<(), SchedulerError> {
    let mut shutdown = ctx.shutdown.clone();
    if let Some(addr) = ctx.config.daemon.metrics_listen {
        let (metrics, shutdown) = (ctx.metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, metrics, shutdown).await {
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
    tokio::spawn(sample_waiting(ctx.clone(), shutdown.clone()));

    let mut scheduler = Scheduler::start(&ctx).await?;
    for job in ctx.config.jobs.iter().filter(|j| j.mode == Mode::Notify) {
        scheduler
            .tasks
            .spawn(follow::follow(ctx.clone(), job.clone()));
    }
    tracing::info!(jobs = ctx.config.jobs.len(), "running");

    shutdown.recv().await;
    scheduler.stop().await;
    Ok(())
}

/// The poll jobs' schedule, the daemon's tasks, and the permits for runs.
struct Scheduler {
    cron: Option<JobScheduler>,
    tasks: JoinSet<()>,
    /// One per run of a poll job at a time (`max_concurrent_jobs`).
    permits: Arc<Semaphore>,
    max: u32,
}

impl Scheduler {
    /// Schedule every poll job; an interval job also runs at once.
    async fn start(ctx: &Context) -> Result<Scheduler, SchedulerError> {
        let max = ctx.config.daemon.max_concurrent_jobs;
        let mut scheduler = Scheduler {
            cron: None,
            tasks: JoinSet::new(),
            permits: Arc::new(Semaphore::new(max)),
            max: max as u32,
        };
        let polls: Vec<Arc<JobSpec>> = ctx
            .config
            .jobs
            .iter()
            .filter(|j| j.mode == Mode::Poll)
            .cloned()
            .collect();
        if polls.is_empty() {
            return Ok(scheduler);
        }
        let cron = JobScheduler::new().await?;
        for job in polls {
            let running = Running::default();
            let on_tick = {
                let (ctx, job, permits, running) = (
                    ctx.clone(),
                    job.clone(),
                    scheduler.permits.clone(),
                    running.clone(),
                );
                move |_id, _lock| {
                    let tick =
                        poll::poll_tick(ctx.clone(), job.clone(), running.clone(), permits.clone());
                    Box::pin(tick)
                        as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
                }
            };
            let scheduled = match job.schedule.as_ref() {
                Some(Schedule::Cron(expr)) => Job::new_async(expr.as_str(), on_tick),
                Some(Schedule::Interval(secs)) => {
                    // An interval job also runs at once, rather than an interval after the start.
                    scheduler.tasks.spawn(poll::poll_tick(
                        ctx.clone(),
                        job.clone(),
                        running.clone(),
                        scheduler.permits.clone(),
                    ));
                    Job::new_repeated_async(Duration::from_secs(*secs), on_tick)
                }
                None => continue,
            }
            .map_err(|source| SchedulerError::Schedule {
                job: job.name.clone(),
                source,
            })?;
            cron.add(scheduled).await?;
        }
        cron.start().await?;
        scheduler.cron = Some(cron);
        Ok(scheduler)
    }

    /// No more ticks; wait for the tasks and the runs in hand to end.
    async fn stop(mut self) {
        if let Some(mut cron) = self.cron.take() {
            let _ = cron.shutdown().await;
        }
        while self.tasks.join_next().await.is_some() {}
        // Runs started by the schedule hold a permit each: all permits back means all done.
        let _ = self.permits.acquire_many(self.max).await;
    }
}

/// Count every job's waiting rows or events for `/metrics`, now and then, until shutdown.
async fn sample_waiting(ctx: Context, mut shutdown: Shutdown) {
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
        if shutdown.sleep(SAMPLE_EVERY).await {
            return;
        }
    }
}
