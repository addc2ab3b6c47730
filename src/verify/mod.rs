//! `pgtide verify`: compare a job's target with the view over its source, by key, and repair the
//! rows that differ.
//!
//! Only what the job has reached is compared: view rows up to a poll job's stored watermark
//! (the DWH's copy of the position), minus the rows its open recheck windows will still re-read;
//! for a notify job every view row once its first load is done, minus keys whose events are
//! still waiting.
//!
//! The comparison costs one read of each side, done by the databases themselves, at once. Each
//! side hashes its rows (`hash_record_extended`, by each type's own hash function, which agrees
//! with the type's equality; text in "C"; the source's values cast to the target's column
//! types) and sums the hashes per bucket of keys; a key's bucket comes from a hash of the key,
//! the same on every server. Only the sums cross the wire. The buckets whose sums differ are
//! read again from both sides, ordered by the key's hash (never by a collation, which may
//! differ between the servers), and merged; the keys that may differ go to a temporary file.
//! Servers before PostgreSQL 14 hash the md5 of the row's text instead. With `--from/--to` the
//! source drives: its rows in the range, batch by batch, looked up in the target by key.
//!
//! Hashes only find candidates. At the end every key found is read again on both sides and
//! compared in the DWH, as the job's upsert compares, with the values the job would write
//! (`pgtide.try_cast` included); a key counts only if it differs in two such reads, so a row
//! that changed while verify ran is not reported. Memory holds the bucket sums and one batch of
//! keys, never the table.
//!
//! The command in files, in the order of a run: `plan` fixes what is compared (the job's reach,
//! the columns and their casts); `candidates` finds the keys that may differ (bucket sums and
//! their drill-down, or the source's batches of a range); `recheck` reads those keys again and
//! counts what still differs, handing it to `repair` under `--repair`; `report` is what the
//! command prints; `error` what can fail.
//!
//! A ClickHouse DWH shares no hash function with the source, so `clickhouse` compares the rows
//! in pgtide instead, streaming both sides: the same scope (`plan::Scope`), the same steps
//! (bucket sums, drill-down, two reads of the keys found, `repair`) and the same report.

mod candidates;
mod clickhouse;
mod error;
mod plan;
mod recheck;
mod repair;
mod report;

use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Client;

use crate::config::JobSpec;
use crate::job::{Context, JobError, Warehouse};
use crate::pg::quote_ident;
use crate::position::Position;
use crate::sink;
use crate::sink::dwh::Dwh;

pub use clickhouse::REREAD_SOURCE;
pub use error::VerifyError;
pub use plan::{Options, TEXT_DIGEST};
pub use report::{Keys, Outcome, Repaired, Report, NAMED_KEYS};

use candidates::{by_buckets, by_range, Spill};
use error::dwh_err;
use plan::Plan;
use recheck::recheck;
use repair::Repair;

/// Compare the job's target with the view over its source; with `repair`, rewrite what
/// differs and compare again. Differences are a report, not an error.
pub async fn verify(
    ctx: &Context,
    job: &Arc<JobSpec>,
    opts: Options,
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let mut dwh = ctx.connect_dwh(job).await?;
    // A repair must never race a run of the job; a plain comparison takes no lock.
    if opts.repair && !dwh.lock(&job.name).await? {
        return Err(JobError::Locked.into());
    }
    let result = match &mut dwh {
        Warehouse::Postgres(c) => run(ctx, job, &opts, c).await,
        Warehouse::ClickHouse(ch) => clickhouse::run(ctx, job, &opts, ch).await,
    };
    if opts.repair {
        if let Err(e) = dwh.unlock(&job.name).await {
            tracing::debug!(job = %job.name, error = %e, "unlock failed; the lock ends with the session");
        }
    }
    let mut report = result?;
    report.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    let o = &report.outcome;
    tracing::info!(job = %job.name, compared = o.compared, missing = o.missing, different = o.different,
        extra = o.extra, ms = started.elapsed().as_millis() as u64, "verified");
    Ok(report)
}

async fn run(
    ctx: &Context,
    job: &Arc<JobSpec>,
    opts: &Options,
    dwh: &mut Client,
) -> Result<Report, VerifyError> {
    let mut source = ctx.connect_source(job).await?;
    let view = crate::view::resolve(&source, job)
        .await
        .map_err(JobError::from)?;
    if opts.repair {
        dwh.prepare_target(&view).await?;
    }
    let pos = position(dwh, &job.name).await?;
    let plan = Plan::new(&source, dwh, view, pos.as_ref(), opts).await?;
    let mut repair = opts.repair.then(|| Repair::new(&plan.view));
    let first = compare(&plan, &mut source, dwh, repair.as_mut()).await?;
    let after = match &repair {
        Some(_) if !first.clean() => Some(compare(&plan, &mut source, dwh, None).await?),
        _ => None,
    };
    Ok(assemble(job, plan.counts_extra, first, after, repair))
}

/// The report of a comparison (`first`); with a repair, the comparison after it (`after`,
/// none when nothing needed repairing).
fn assemble(
    job: &JobSpec,
    extra_counted: bool,
    first: Outcome,
    after: Option<Outcome>,
    repair: Option<Repair>,
) -> Report {
    let (outcome, repaired) = match repair {
        None => (first, None),
        Some(r) => (
            after.unwrap_or_else(|| first.clone()),
            Some(Repaired {
                found: first,
                written: r.written,
                deleted: r.deleted,
            }),
        ),
    };
    Report {
        job: job.name.clone(),
        mode: job.mode.as_str(),
        target: job.target.to_string(),
        extra_counted,
        outcome,
        repaired,
        seconds: 0.0,
    }
}

/// The job's position as the DWH holds it (the truth), `None` before its first batch.
async fn position(dwh: &mut Client, job: &str) -> Result<Option<Position>, VerifyError> {
    let control = format!("{}.positions", quote_ident(sink::CONTROL_SCHEMA));
    let exists: bool = dwh
        .query_one("select to_regclass($1) is not null", &[&control])
        .await
        .map_err(dwh_err)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(dwh.read_position(job).await?)
}

/// One comparison: find the keys that may differ, then read them again on both sides.
async fn compare(
    plan: &Plan,
    source: &mut Client,
    dwh: &mut Client,
    repair: Option<&mut Repair>,
) -> Result<Outcome, VerifyError> {
    let mut spill = Spill::new()?;
    let mut outcome = Outcome {
        compared: match plan.range {
            None => by_buckets(plan, source, dwh, &mut spill).await?,
            Some(_) => by_range(plan, source, dwh, &mut spill).await?,
        },
        ..Outcome::default()
    };
    tracing::info!(job = %plan.view.job.name, compared = outcome.compared, keys = spill.keys, "reading the keys that may differ again");
    recheck(plan, source, dwh, spill, &mut outcome, repair).await?;
    Ok(outcome)
}
