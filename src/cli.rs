//! The command line: clap definitions and dispatch. Exit codes: 0 success, 1 a job failed,
//! 2 invalid config or command line, 3 the job is held by another pgtide.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::config::{self, Config, JobSpec, Mode};
use crate::job::{Context, JobError};
use crate::sink::dwh::Dwh;
use crate::state::Store;
use crate::telemetry::LogFormat;
use crate::view;

pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;
pub const EXIT_LOCKED: i32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "pgtide",
    version,
    about = "Keeps analytical views in a PostgreSQL warehouse fresh from PostgreSQL sources"
)]
pub struct Cli {
    /// The instance file (default: $PGTIDE_CONFIG, else ./pgtide.toml)
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config, connect, verify source tables, columns and the targets
    Check { jobs: Vec<String> },
    /// Daemon: follow notify jobs and run poll jobs on their interval until SIGINT/SIGTERM
    Run,
    /// Run the jobs (default: all) until they are caught up, then exit
    RunOnce {
        jobs: Vec<String>,
        /// Also write the jobs' metrics (Prometheus text) to this file, for node_exporter's
        /// textfile collector
        #[arg(long)]
        metrics_file: Option<PathBuf>,
    },
    /// Per job: mode, watermark, last run, rows waiting
    Status {
        #[arg(long)]
        json: bool,
        jobs: Vec<String>,
    },
    /// Reload the view rows whose watermark lies in (from, to], leaving the stored watermark alone
    Replay {
        job: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Set the stored watermark to V (default: the beginning)
    Reset {
        job: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// Compare the target with the view over the source by key: rows missing, different or
    /// extra; --repair rewrites them and compares again (exit 1 while rows differ)
    Verify {
        job: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        /// Rewrite the rows that differ (takes the job's lock), then compare again
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Notify jobs: create the event table and triggers in the source (idempotent)
    Install {
        #[arg(required = true)]
        jobs: Vec<String>,
    },
    /// Notify jobs: drop the event table and triggers from the source (idempotent)
    Uninstall {
        #[arg(required = true)]
        jobs: Vec<String>,
    },
    /// Print the DDL that `install JOB` runs
    Sql { job: String },
    /// Start a throwaway PostgreSQL, fill a sample shop, run the example jobs, show the result
    Demo,
    /// Print the job file equivalent to a view document of another tool
    Import {
        #[command(subcommand)]
        format: ImportFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImportFormat {
    /// An InsightForge view document (JSON)
    Insightforge {
        file: PathBuf,
        /// The pgtide source the job reads (default: the document's source name)
        #[arg(long)]
        source: Option<String>,
    },
}

/// A failure of a command, with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_INVALID,
            message: message.into(),
        }
    }
    fn failed(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_FAILED,
            message: message.into(),
        }
    }
    fn job(name: &str, e: &JobError) -> Failure {
        let code = match e {
            JobError::Locked => EXIT_LOCKED,
            JobError::Input(_) => EXIT_INVALID,
            _ => EXIT_FAILED,
        };
        Failure {
            code,
            message: format!("job {name}: {e}"),
        }
    }
}

pub async fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Demo => crate::demo::run().await.map_err(Failure::failed),
        Command::Import {
            format: ImportFormat::Insightforge { file, source },
        } => import(&file, source.as_deref()),
        command => match load(cli.config.as_deref()) {
            Ok(config) => dispatch(command, config).await,
            Err(f) => Err(f),
        },
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("pgtide: {}", f.message);
            }
            f.code
        }
    }
}

fn load(flag: Option<&std::path::Path>) -> Result<Arc<Config>, Failure> {
    let path = config::config_path(flag);
    config::load(&path)
        .map(Arc::new)
        .map_err(|e| Failure::invalid(e.to_string()))
}

async fn dispatch(command: Command, config: Arc<Config>) -> Result<(), Failure> {
    let store = Store::open(&config.state_path).map_err(|e| Failure::failed(e.to_string()))?;
    let ctx = Context::new(config.clone(), store);
    match command {
        Command::Check { jobs } => check(&ctx, &select(&config, &jobs)?).await,
        Command::RunOnce { jobs, metrics_file } => {
            let jobs = select(&config, &jobs)?;
            let result = run_once(&ctx, &jobs).await;
            if let Some(path) = metrics_file {
                write_metrics(&ctx, &jobs, &path).await?;
            }
            result
        }
        Command::Run => daemon(ctx).await,
        Command::Status { json, jobs } => status(&ctx, &select(&config, &jobs)?, json).await,
        Command::Replay {
            job,
            from,
            to,
            dry_run,
        } => {
            let job = one(&config, &job)?;
            let from = from.map(|v| parse_value(&v, "--from")).transpose()?;
            let to = to.map(|v| parse_value(&v, "--to")).transpose()?;
            let s = ctx
                .replay(&job, from, to, dry_run)
                .await
                .map_err(|e| Failure::job(&job.name, &e))?;
            if dry_run {
                println!("job {}: replay would read {} source rows", job.name, s.rows);
            } else {
                println!(
                    "job {}: replayed {} rows ({} changed) in {} batches",
                    job.name, s.rows, s.changed, s.batches
                );
            }
            Ok(())
        }
        Command::Reset { job, to } => {
            let job = one(&config, &job)?;
            let to = to.map(|v| parse_value(&v, "--to")).transpose()?;
            let pos = ctx
                .reset(&job, to)
                .await
                .map_err(|e| Failure::job(&job.name, &e))?;
            match pos.watermark {
                Some(w) => println!("job {}: watermark set to {}", job.name, w.join(", ")),
                None => println!("job {}: watermark reset to the beginning", job.name),
            }
            Ok(())
        }
        Command::Verify {
            job,
            from,
            to,
            repair,
            json,
        } => {
            let job = one(&config, &job)?;
            let opts = crate::verify::Options {
                from: from.map(|v| parse_value(&v, "--from")).transpose()?,
                to: to.map(|v| parse_value(&v, "--to")).transpose()?,
                repair,
            };
            let report = crate::verify::verify(&ctx, &job, opts)
                .await
                .map_err(|e| match e {
                    crate::verify::VerifyError::Job(e) => Failure::job(&job.name, &e),
                    e => Failure::failed(format!("job {}: {e}", job.name)),
                })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            } else {
                print!("{}", report.human());
            }
            if report.clean() {
                Ok(())
            } else {
                let o = &report.outcome;
                Err(Failure::failed(format!(
                    "job {}: the target differs from the view ({} missing, {} different, {} extra)",
                    job.name, o.missing, o.different, o.extra
                )))
            }
        }
        Command::Install { jobs } => {
            for job in notify_jobs(&config, &jobs)? {
                ctx.install(&job)
                    .await
                    .map_err(|e| Failure::job(&job.name, &e))?;
                println!("job {}: installed", job.name);
            }
            Ok(())
        }
        Command::Uninstall { jobs } => {
            for job in notify_jobs(&config, &jobs)? {
                ctx.uninstall(&job)
                    .await
                    .map_err(|e| Failure::job(&job.name, &e))?;
                println!("job {}: uninstalled", job.name);
            }
            Ok(())
        }
        Command::Sql { job } => {
            let job = notify_jobs(&config, std::slice::from_ref(&job))?.remove(0);
            let ddl = ctx
                .install_sql(&job)
                .await
                .map_err(|e| Failure::job(&job.name, &e))?;
            print!("{ddl}");
            Ok(())
        }
        Command::Demo | Command::Import { .. } => unreachable!("handled before loading the config"),
    }
}

fn import(file: &std::path::Path, source: Option<&str>) -> Result<(), Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::invalid(format!("{}: {e}", file.display())))?;
    let job = crate::import::insightforge(&text, source).map_err(|e| {
        let lines: Vec<String> =
            e.0.iter()
                .map(|l| format!("  {}: {l}", file.display()))
                .collect();
        Failure::invalid(format!(
            "cannot translate {}:\n{}",
            file.display(),
            lines.join("\n")
        ))
    })?;
    print!("{job}");
    Ok(())
}

/// The named jobs, each of which must be a notify job.
fn notify_jobs(config: &Config, names: &[String]) -> Result<Vec<Arc<JobSpec>>, Failure> {
    let jobs = select(config, names)?;
    if let Some(j) = jobs.iter().find(|j| j.mode != Mode::Notify) {
        return Err(Failure::invalid(format!(
            "job {} is a poll job: only notify jobs (mode = \"notify\") have triggers",
            j.name
        )));
    }
    Ok(jobs)
}

fn select(config: &Config, names: &[String]) -> Result<Vec<Arc<JobSpec>>, Failure> {
    if names.is_empty() {
        return Ok(config.jobs.clone());
    }
    names.iter().map(|n| one(config, n)).collect()
}

fn one(config: &Config, name: &str) -> Result<Arc<JobSpec>, Failure> {
    config
        .jobs
        .iter()
        .find(|j| j.name == name)
        .cloned()
        .ok_or_else(|| {
            let known: Vec<&str> = config.jobs.iter().map(|j| j.name.as_str()).collect();
            Failure::invalid(format!(
                "unknown job {name:?} (jobs in {}: {})",
                config.jobs_dir.display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
}

/// A watermark value from the command line: one value as text, or a JSON array for a
/// composite watermark.
pub fn parse_value(v: &str, flag: &str) -> Result<Vec<String>, Failure> {
    if !v.trim_start().starts_with('[') {
        return Ok(vec![v.to_string()]);
    }
    let items: Vec<serde_json::Value> = serde_json::from_str(v)
        .map_err(|e| Failure::invalid(format!("{flag}: {v:?} is not a JSON array: {e}")))?;
    items
        .into_iter()
        .map(|i| match i {
            serde_json::Value::String(s) => Ok(s),
            serde_json::Value::Number(n) => Ok(n.to_string()),
            serde_json::Value::Bool(b) => Ok(b.to_string()),
            other => Err(Failure::invalid(format!(
                "{flag}: {other} is not a watermark value"
            ))),
        })
        .collect()
}

/// The metrics of `jobs` after a `run-once`, written to a temporary file and renamed into place
/// so that a collector never reads half a file.
async fn write_metrics(
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
async fn daemon(ctx: Context) -> Result<(), Failure> {
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

async fn check(ctx: &Context, jobs: &[Arc<JobSpec>]) -> Result<(), Failure> {
    let mut problems = Vec::new();
    let mut unreachable = Vec::new();
    for job in jobs {
        let source = match ctx.connect_source(job).await {
            Ok(c) => c,
            Err(e) => {
                unreachable.push(format!("job {}: {e}", job.name));
                continue;
            }
        };
        let view = match view::resolve(&source, job).await {
            Ok(v) => v,
            Err(view::ViewError::Problems(p)) => {
                problems.extend(
                    p.into_iter()
                        .map(|m| format!("{}: {m}", job.file.display())),
                );
                continue;
            }
            Err(e) => {
                unreachable.push(format!("job {}: {e}", job.name));
                continue;
            }
        };
        let mut dwh = match ctx.connect_dwh(job).await {
            Ok(c) => c,
            Err(e) => {
                unreachable.push(format!("job {}: {e}", job.name));
                continue;
            }
        };
        if job.mode == Mode::Notify {
            match crate::source::notify::installed(&source, &view).await {
                Ok(true) => {}
                Ok(false) => problems.push(format!(
                    "{}: its triggers are not installed in the source (or not on every table of its view): run `pgtide install {}`",
                    job.file.display(),
                    job.name
                )),
                Err(e) => unreachable.push(format!("job {}: source: {}", job.name, crate::pg::message(&e))),
            }
        }
        match dwh.check_target(&view).await {
            Ok(p) if p.is_empty() => {
                println!("ok   {} ({} -> {})", job.name, job.from.name, job.target)
            }
            Ok(p) => problems.extend(
                p.into_iter()
                    .map(|m| format!("{}: target {}: {m}", job.file.display(), job.target)),
            ),
            Err(e) => unreachable.push(format!("job {}: {e}", job.name)),
        }
    }
    if !problems.is_empty() {
        let mut m = format!("{} problem(s):", problems.len() + unreachable.len());
        for p in problems.iter().chain(&unreachable) {
            m.push_str(&format!("\n  {p}"));
        }
        return Err(Failure::invalid(m));
    }
    if !unreachable.is_empty() {
        return Err(Failure::failed(unreachable.join("\n  ")));
    }
    Ok(())
}

async fn run_once(ctx: &Context, jobs: &[Arc<JobSpec>]) -> Result<(), Failure> {
    let mut failures = Vec::new();
    for job in jobs {
        match ctx.run_once(job).await {
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
fn nulls(tallies: &std::collections::BTreeMap<String, crate::job::Tally>) -> String {
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

async fn status(ctx: &Context, jobs: &[Arc<JobSpec>], as_json: bool) -> Result<(), Failure> {
    let mut out = Vec::new();
    for job in jobs {
        let err = |e: crate::state::StateError| Failure::failed(e.to_string());
        let pos = ctx.store.position(&job.name).await.map_err(err)?;
        let last = ctx.store.last_run(&job.name).await.map_err(err)?;
        let since_success = ctx
            .store
            .last_success(&job.name)
            .await
            .map_err(err)?
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
        let mut oldest = None;
        let waiting = match job.mode {
            Mode::Poll => match ctx.waiting(job, pos.as_ref()).await {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(job = %job.name, error = %e, "cannot count waiting rows");
                    None
                }
            },
            Mode::Notify => match ctx.events_waiting(job).await {
                Ok((n, age)) => {
                    oldest = age;
                    Some(n)
                }
                Err(e) => {
                    tracing::warn!(job = %job.name, error = %e, "cannot count waiting events");
                    None
                }
            },
        };
        out.push(json!({
            "job": job.name,
            "mode": job.mode.as_str(),
            "watermark": pos.as_ref().and_then(|p| p.watermark.clone()),
            "open_windows": pos.as_ref().map_or(0, |p| p.windows.len()),
            "waiting": waiting,
            "oldest_event_secs": oldest,
            "seconds_since_last_success": since_success,
            "last_run": last,
        }));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    println!(
        "{:<20} {:<6} {:<32} {:>9}  LAST RUN",
        "JOB", "MODE", "WATERMARK", "WAITING"
    );
    for (job, v) in jobs.iter().zip(&out) {
        let wm = v["watermark"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|| "-".into());
        let waiting = v["waiting"]
            .as_i64()
            .map_or("?".to_string(), |n| n.to_string());
        let last = match &v["last_run"] {
            serde_json::Value::Null => "never".to_string(),
            r => format!(
                "{} {} rows, started {}{}{}{}",
                r["outcome"].as_str().unwrap_or(""),
                r["rows"],
                r["started_at"].as_str().unwrap_or(""),
                v["seconds_since_last_success"]
                    .as_f64()
                    .map(|s| format!("; last success {s:.0} s ago"))
                    .unwrap_or_else(|| "; never succeeded".into()),
                serde_json::from_value(r["columns"].clone())
                    .map(|t| nulls(&t))
                    .unwrap_or_default(),
                r["error"]
                    .as_str()
                    .map(|e| format!("\n{:>71}error: {e}", ""))
                    .unwrap_or_default()
            ),
        };
        println!(
            "{:<20} {:<6} {:<32} {:>9}  {last}",
            job.name,
            job.mode.as_str(),
            wm,
            waiting
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_values_from_the_command_line() {
        assert_eq!(parse_value("1500", "--to").unwrap(), vec!["1500"]);
        assert_eq!(
            parse_value(r#"["2025-01-31 12:00:00+00", 1500]"#, "--to").unwrap(),
            vec!["2025-01-31 12:00:00+00", "1500"]
        );
        let e = parse_value("[1, {}]", "--from").unwrap_err();
        assert_eq!(e.code, EXIT_INVALID);
        assert!(e.message.starts_with("--from:"), "{}", e.message);
    }
}
