//! A row per run: started, its progress, how it finished, and what its transforms turned into
//! NULL; read back for `status` and the metrics.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{StateError, Store, NOW};

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
        self.write_tx(move |tx| {
            tx.execute("update runs set rows = ?2 where id = ?1", params![id, rows])
                .map(|_| ())
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
