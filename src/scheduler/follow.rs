//! Notify jobs followed until the daemon stops: LISTEN, and drain after every (re)connect, on
//! every notification and on the safety sweep (every `interval_secs`, or on the job's
//! `cron`). A failed follow starts over: with backoff when the failure is transient, at the
//! next sweep when it is not, and every few seconds while another pgtide holds the job.

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

/// When a notify job drains its event table without a notification: every `interval_secs`
/// (default 60 s), or on its `cron`.
enum Sweep {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Sweep {
    fn of(job: &JobSpec) -> Sweep {
        let every = Sweep::Every(Duration::from_secs(DEFAULT_SWEEP_SECS));
        match &job.schedule {
            Some(Schedule::Interval(secs)) => Sweep::Every(Duration::from_secs(*secs)),
            Some(Schedule::Cron(expr)) => croner::Cron::new(expr)
                .with_seconds_required()
                .with_dom_and_dow()
                .parse()
                .map_or(every, |c| Sweep::Cron(Box::new(c))),
            None => every,
        }
    }

    /// How long from now until the next sweep.
    fn wait(&self) -> Duration {
        match self {
            Sweep::Every(d) => *d,
            Sweep::Cron(cron) => {
                let now = chrono::Utc::now();
                cron.find_next_occurrence(&now, false)
                    .ok()
                    .and_then(|next| (next - now).to_std().ok())
                    .unwrap_or(Duration::from_secs(DEFAULT_SWEEP_SECS))
            }
        }
    }
}

/// Follow a notify job until the daemon stops.
pub async fn follow(ctx: Context, job: Arc<JobSpec>) {
    let sweep = Sweep::of(&job);
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
        let result = listen_and_drain(&ctx, &mut follower, &sweep, ctx.shutdown.clone()).await;
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
                let wait = sweep.wait();
                tracing::error!(job = %job.name, error = %e, retry_in_secs = wait.as_secs(), "following the job failed");
                wait
            }
        })
    };
    // Every failure is waited for and tried again: this ends only when the daemon stops.
    let _ = retry::with_backoff(&backoff, &mut shutdown, once, retrying, otherwise).await;
}

/// LISTEN, then drain: after every (re)connect, on every notification and on the sweep.
/// Returns `Ok` when the daemon stops.
async fn listen_and_drain(
    ctx: &Context,
    f: &mut Follower,
    sweep: &Sweep,
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
        let next_sweep = tokio::time::sleep(sweep.wait());
        tokio::pin!(next_sweep);
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
                () = &mut next_sweep => {
                    next_sweep.as_mut().reset(tokio::time::Instant::now() + sweep.wait());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(schedule: Option<Schedule>) -> JobSpec {
        let text = r#"
            mode = "notify"
            key = ["id"]
            [from]
            table = "orders"
            [[column]]
            name = "id"
            from = "orders.id"
        "#;
        let sources = [("s".to_string(), "postgres://x@y/z".to_string())].into();
        let file = std::path::Path::new("jobs/orders.toml");
        let mut p = crate::config::Problems::new(file);
        let mut job =
            crate::config::parse_job(file, text, &sources, "public", Default::default(), &mut p)
                .unwrap();
        job.schedule = schedule;
        job
    }

    #[test]
    fn a_notify_job_sweeps_on_its_interval_its_cron_or_every_minute() {
        assert_eq!(Sweep::of(&job(None)).wait(), Duration::from_secs(60));
        let every = Sweep::of(&job(Some(Schedule::Interval(7))));
        assert_eq!(every.wait(), Duration::from_secs(7));
        let cron = Sweep::of(&job(Some(Schedule::Cron("*/2 * * * * *".into()))));
        assert!(matches!(cron, Sweep::Cron(_)));
        assert!(cron.wait() <= Duration::from_secs(2), "{:?}", cron.wait());
        let hourly = Sweep::of(&job(Some(Schedule::Cron("0 0 * * * *".into()))));
        assert!(hourly.wait() <= Duration::from_secs(3600));
        assert!(hourly.wait() > Duration::from_secs(0));
    }
}
