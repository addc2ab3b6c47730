//! A row per run: started, its progress, how it finished, and what its transforms turned into
//! NULL; read back for `status` and the metrics.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;

use super::{StateError, Store, NOW};
use crate::progress::Snapshot;

/// Set the row count of run `run`; while it loads, it counted them now.
pub(super) fn set_rows(tx: &Transaction<'_>, run: i64, rows: i64) -> rusqlite::Result<()> {
    tx.execute(
        &format!(
            "update runs set rows = ?2, progress_at = iif(progress_at is null, null, {NOW})
             where id = ?1"
        ),
        params![run, rows],
    )
    .map(|_| ())
}

/// One run as recorded, for `status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RunRecord {
    pub started_at: String,
    pub finished_at: Option<String>,
    pub outcome: String,
    pub rows: i64,
    pub error: Option<String>,
    /// Values that maps without a default did not know (written as NULL).
    pub unmapped: i64,
    /// JSON fields that could not be read or cast, written as NULL (`on_error = "null"`).
    pub nulled: i64,
    /// The same per column, with a few of the unmapped values.
    pub columns: BTreeMap<String, Tally>,
}

/// Values of one column that a transform turned into NULL in a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Tally {
    /// Values a map (without `map_default`) does not know.
    pub unmapped: u64,
    /// JSON fields that could not be read or cast (`on_error = "null"`).
    pub nulled: u64,
    /// A few of the unmapped values.
    pub values: Vec<String>,
}

impl Store {
    /// Record the start of a run; runs of this job left `running` by a process that died are
    /// marked failed first (the caller holds the job's lock, so none of them is still going).
    pub async fn start_run(&self, job: &str) -> Result<i64, StateError> {
        let job = job.to_string();
        self.write_tx(move |tx| {
            tx.execute(
                &format!(
                    "update runs set outcome = 'failed', finished_at = coalesce(finished_at, {NOW}),
                       error = 'interrupted: the process ended before the run finished'
                     where job = ?1 and outcome = 'running'"
                ),
                [&job],
            )?;
            tx.execute(
                &format!(
                    "insert into runs (job, started_at, outcome) values (?1, {NOW}, 'running')"
                ),
                [&job],
            )?;
            Ok(tx.last_insert_rowid())
        })
        .await
    }

    /// Record a run that failed before it could start (the source or DWH down, a table gone),
    /// so that `status` shows why.
    pub async fn failed_run(&self, job: &str, error: String) -> Result<(), StateError> {
        let job = job.to_string();
        self.write_tx(move |tx| {
            tx.execute(
                &format!(
                    "insert into runs (job, started_at, finished_at, outcome, error) values (?1, {NOW}, {NOW}, 'failed', ?2)"
                ),
                params![job, error],
            )
            .map(|_| ())
        })
        .await
    }

    /// Update the row count of a run in progress.
    pub async fn progress_run(&self, id: i64, rows: i64) -> Result<(), StateError> {
        self.write_tx(move |tx| set_rows(tx, id, rows)).await
    }

    /// Run `id` begins a load of about `rows_total` rows: until `end_load`, `progress` shows
    /// it, its rate counted from the start of the run.
    pub async fn begin_load(&self, id: i64, rows_total: Option<u64>) -> Result<(), StateError> {
        let total = rows_total.map(|t| t.min(i64::MAX as u64) as i64);
        self.write_tx(move |tx| {
            tx.execute(
                &format!("update runs set rows_total = ?2, progress_at = {NOW} where id = ?1"),
                params![id, total],
            )
            .map(|_| ())
        })
        .await
    }

    /// Run `id`'s load ended; the run may go on (a notify job's events).
    pub async fn end_load(&self, id: i64) -> Result<(), StateError> {
        self.write_tx(move |tx| {
            tx.execute(
                "update runs set rows_total = null, progress_at = null where id = ?1",
                [id],
            )
            .map(|_| ())
        })
        .await
    }

    /// The progress of the job's load in hand, if its last run is loading.
    pub async fn progress(&self, job: &str) -> Result<Option<Snapshot>, StateError> {
        let (err, job) = (self.sqlite(), job.to_string());
        self.call(move |c| {
            let row: Option<(i64, Option<i64>, f64)> = c
                .query_row(
                    "select rows, rows_total,
                            (julianday(progress_at) - julianday(started_at)) * 86400.0
                     from (select * from runs where job = ?1 order by id desc limit 1)
                     where outcome = 'running' and progress_at is not null",
                    [&job],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(&err)?;
            Ok(row.map(|(rows, total, secs)| {
                Snapshot::at(
                    rows.max(0) as u64,
                    total.map(|t| t.max(0) as u64),
                    std::time::Duration::from_secs_f64(secs.max(0.0)),
                )
            }))
        })
        .await
    }

    pub async fn finish_run(
        &self,
        id: i64,
        rows: i64,
        error: Option<String>,
        columns: &BTreeMap<String, Tally>,
    ) -> Result<(), StateError> {
        let outcome = if error.is_none() { "ok" } else { "failed" };
        let unmapped: u64 = columns.values().map(|t| t.unmapped).sum();
        let nulled: u64 = columns.values().map(|t| t.nulled).sum();
        let columns = serde_json::to_string(columns).expect("tallies serialize");
        self.write_tx(move |tx| {
            tx.execute(
                &format!(
                    "update runs set finished_at = {NOW}, outcome = ?2, rows = ?3, error = ?4,
                       unmapped = ?5, nulled = ?6, columns = ?7 where id = ?1"
                ),
                params![
                    id,
                    outcome,
                    rows,
                    error,
                    unmapped as i64,
                    nulled as i64,
                    columns
                ],
            )
            .map(|_| ())
        })
        .await
    }

    /// When the job last finished a run without error.
    pub async fn last_success(
        &self,
        job: &str,
    ) -> Result<Option<std::time::SystemTime>, StateError> {
        let (err, job) = (self.sqlite(), job.to_string());
        self.call(move |c| {
            let secs: Option<f64> = c
                .query_row(
                    "select (julianday(finished_at) - 2440587.5) * 86400.0 from runs
                     where job = ?1 and outcome = 'ok' order by id desc limit 1",
                    [&job],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&err)?;
            Ok(
                secs.map(|s| {
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(s.max(0.0))
                }),
            )
        })
        .await
    }

    pub async fn last_run(&self, job: &str) -> Result<Option<RunRecord>, StateError> {
        Ok(self.runs(job, 1).await?.pop())
    }

    /// The last `n` runs of a job, newest first.
    pub async fn runs(&self, job: &str, n: i64) -> Result<Vec<RunRecord>, StateError> {
        let (err, job) = (self.sqlite(), job.to_string());
        self.call(move |c| {
            let mut st = c
                .prepare(
                    "select started_at, finished_at, outcome, rows, error, unmapped, nulled, columns
                     from runs where job = ?1 order by id desc limit ?2",
                )
                .map_err(&err)?;
            let rows = st
                .query_map(params![job, n], |r| {
                    Ok(RunRecord {
                        started_at: r.get(0)?,
                        finished_at: r.get(1)?,
                        outcome: r.get(2)?,
                        rows: r.get(3)?,
                        error: r.get(4)?,
                        unmapped: r.get(5)?,
                        nulled: r.get(6)?,
                        // Written by pgtide itself; an unreadable value reads as nothing counted.
                        columns: serde_json::from_str(&r.get::<_, String>(7)?).unwrap_or_default(),
                    })
                })
                .map_err(&err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(&err)
        })
        .await
    }
}
