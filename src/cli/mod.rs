//! The command line: clap definitions and dispatch. Exit codes: 0 success, 1 a job failed,
//! 2 invalid config or command line, 3 the job is held by another pgtide.
//!
//! The longer commands have files of their own: `check`, `status`, and `run` (`run-once`, its
//! metrics file, and the daemon).

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, JobSpec, Mode};
use crate::job::{Context, JobError};
use crate::state::Store;
use crate::telemetry::LogFormat;

mod check;
mod run;
mod status;

use check::check;
use run::{daemon, run_once, show_loads, write_metrics};
use status::status;

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
        Command::Demo => crate::demo::run()
            .await
            .map_err(|e| Failure::failed(e.to_string())),
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
        Command::Run => {
            // Without a person watching: the loads of the daemon's jobs go to its log.
            let shown = show_loads(&ctx, &config.jobs, crate::progress::show::Show::Log);
            let result = daemon(ctx).await;
            shown.stop().await;
            result
        }
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
            let shown = show_loads(
                &ctx,
                std::slice::from_ref(&job),
                crate::progress::show::Show::detect(),
            );
            let replayed = ctx.replay(&job, from, to, dry_run).await;
            shown.stop().await;
            let s = replayed.map_err(|e| Failure::job(&job.name, &e))?;
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
