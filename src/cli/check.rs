//! `pgtide check`: every job's config, source tables and columns, triggers and target checked,
//! all problems listed at once.
//!
//! Problems go to stderr and set the exit code. A job that passes prints `ok` on stdout,
//! followed by `warn` lines for what will make it slow at scale (indexes its reads need that the
//! source lacks): those are advice with the statement that fixes each, not failures, and leave
//! the exit code alone.

use std::sync::Arc;

use crate::config::{JobSpec, Mode};
use crate::job::Context;
use crate::sink::dwh::Dwh;
use crate::view;

use super::Failure;

pub(super) async fn check(ctx: &Context, jobs: &[Arc<JobSpec>]) -> Result<(), Failure> {
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
        let warnings = match crate::source::indexes::missing(&source, &view).await {
            Ok(w) => w,
            Err(e) => {
                unreachable.push(format!(
                    "job {}: source: {}",
                    job.name,
                    crate::pg::message(&e)
                ));
                Vec::new()
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
        for w in &warnings {
            println!("warn {}: {w}", job.file.display());
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
