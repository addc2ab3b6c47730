//! `pgtide run-once` and `pgtide run`: runs reported per job, their loads shown as they go,
//! the metrics file, and the daemon's stop on a signal.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{JobSpec, Mode};
use crate::job::{Context, Tally};
use crate::progress::show::{self, Show, Shown};

use super::{Failure, EXIT_FAILED, EXIT_LOCKED};

/// Show the loads of `jobs` while a command runs them.
pub(super) fn show_loads(ctx: &Context, jobs: &[Arc<JobSpec>], how: Show) -> Shown {
    let jobs = jobs
        .iter()
        .map(|j| (j.name.clone(), ctx.metrics.progress(&j.name)))
        .collect();
    show::show(jobs, how)
}

/// `pgtide run-once`. The first SIGINT or SIGTERM stops it at the next batch boundary (the
/// chunks being written finish, nothing new starts) and it exits 1; a second exits at once.
pub(super) async fn run_once(ctx: &Context, jobs: &[Arc<JobSpec>]) -> Result<(), Failure> {
    let mut signals = crate::shutdown::Signals::new()
        .map_err(|e| Failure::failed(format!("cannot handle signals: {e}")))?;
    let (trigger, shutdown) = crate::shutdown::channel();
    let ctx = ctx.clone().with_shutdown(shutdown);
    let runs = run_jobs(&ctx, jobs);
    tokio::pin!(runs);
    tokio::select! {
        done = &mut runs => return done,
        () = signals.recv() => {}
    }
    tracing::info!("stopping: finishing the batches in hand");
    trigger.fire();
    tokio::select! {
        done = &mut runs => {
            done?;
            Err(Failure::failed("stopped by a signal before every job had caught up"))
        }
        () = signals.recv() => {
            tracing::warn!("second signal: exiting now");
            Err(Failure { code: 130, message: String::new() })
        }
    }
}

async fn run_jobs(ctx: &Context, jobs: &[Arc<JobSpec>]) -> Result<(), Failure> {
    let mut failures = Vec::new();
    let shown = show_loads(ctx, jobs, Show::detect());
    for job in jobs {
        if ctx.shutdown.is_shutdown() {
            break;
        }
        let result = ctx.run_once(job).await;
        // The job's bar leaves the terminal before its line is printed.
        shown.refresh();
        match result {
            Ok(s) => println!(
                "job {}: {} rows read, {} changed, {} batches{}{}",
                job.name,
                s.rows,
                s.changed,
                s.batches,
                if s.rechecked > 0 {
                    format!(" ({} re-read by recheck)", s.rechecked)
                } else if job.mode == Mode::Notify {
                    format!(", {} events, {} deleted", s.events, s.deleted)
                } else {
                    String::new()
                },
                nulls(&s.tallies)
            ),
            Err(e) => {
                let f = Failure::job(&job.name, &e);
                tracing::error!(job = %job.name, error = %e, "run failed");
                failures.push(f);
            }
        }
    }
    shown.stop().await;
    match failures.len() {
        0 => Ok(()),
        _ => {
            // Locked only when every failure is a lock held elsewhere.
            let code = if failures.iter().all(|f| f.code == EXIT_LOCKED) {
                EXIT_LOCKED
            } else {
                failures
                    .iter()
                    .map(|f| f.code)
                    .find(|c| *c != EXIT_LOCKED)
                    .unwrap_or(EXIT_FAILED)
            };
            let message = failures
                .into_iter()
                .map(|f| f.message)
                .collect::<Vec<_>>()
                .join("\n");
            Err(Failure { code, message })
        }
    }
}

/// `; status_label: 3 unmapped (7, 9); qty: 2 JSON values set to NULL`, or nothing.
pub(super) fn nulls(tallies: &BTreeMap<String, Tally>) -> String {
    let mut parts = Vec::new();
    for (column, t) in tallies {
        if t.unmapped > 0 {
            parts.push(format!(
                "{column}: {} unmapped ({})",
                t.unmapped,
                t.values.join(", ")
            ));
        }
        if t.nulled > 0 {
            parts.push(format!("{column}: {} JSON values set to NULL", t.nulled));
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("; {}", parts.join("; "))
    }
}

/// The metrics of `jobs` after a `run-once`, written to a temporary file and renamed into place
/// so that a collector never reads half a file.
pub(super) async fn write_metrics(
    ctx: &Context,
    jobs: &[Arc<JobSpec>],
    path: &std::path::Path,
) -> Result<(), Failure> {
    for job in jobs {
        ctx.metrics.register(&job.name);
        if let Ok(Some(at)) = ctx.store.last_success(&job.name).await {
            ctx.metrics.last_success(&job.name, at);
        }
        let waiting = match job.mode {
            Mode::Notify => ctx.events_waiting(job).await.map(|(n, _)| n).ok(),
            Mode::Poll => match ctx.store.position(&job.name).await {
                Ok(pos) => ctx.waiting(job, pos.as_ref()).await.ok(),
                Err(_) => None,
            },
        };
        ctx.metrics.waiting(&job.name, waiting);
    }
    let tmp = path.with_extension("tmp");
    // 0644 whatever the umask (the systemd unit sets 0077): node_exporter reads the file as
    // another user, and it holds no secrets.
    std::fs::write(&tmp, ctx.metrics.render())
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Failure::failed(format!("--metrics-file {}: {e}", path.display())))
}

/// `pgtide run` until a signal stops it. The first SIGINT or SIGTERM fires the one shutdown
/// signal: no new work, and the runs in hand get `STOP_DEADLINE` to reach a batch boundary
/// (their open transactions roll back if they do not). A second signal exits at once.
pub(super) async fn daemon(ctx: Context) -> Result<(), Failure> {
    use crate::scheduler::STOP_DEADLINE;
    let unfinished = || Failure {
        code: EXIT_FAILED,
        message: "stopped with runs unfinished".into(),
    };
    let mut signals = crate::shutdown::Signals::new()
        .map_err(|e| Failure::failed(format!("cannot handle signals: {e}")))?;
    let (trigger, shutdown) = crate::shutdown::channel();
    let scheduler = crate::scheduler::run(ctx.with_shutdown(shutdown));
    tokio::pin!(scheduler);
    tokio::select! {
        started = &mut scheduler => {
            // It returns before any signal only when it cannot start.
            return started.map_err(|e| {
                tracing::error!(error = %e, "cannot start the scheduler");
                unfinished()
            });
        }
        () = signals.recv() => {}
    }
    tracing::info!("stopping: no new work; finishing the batches in hand");
    trigger.fire();
    tokio::select! {
        stopped = tokio::time::timeout(STOP_DEADLINE, &mut scheduler) => match stopped {
            Ok(_) => {
                tracing::info!("stopped");
                Ok(())
            }
            Err(_) => {
                tracing::error!(
                    deadline_secs = STOP_DEADLINE.as_secs(),
                    "runs did not finish within the deadline; exiting anyway (their open transactions roll back)"
                );
                Err(unfinished())
            }
        },
        () = signals.recv() => {
            tracing::warn!("second signal: exiting now");
            // The log has said it all: nothing more on stderr.
            Err(Failure { code: 130, message: String::new() })
        }
    }
}
