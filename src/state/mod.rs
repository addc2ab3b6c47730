//! The local state store (SQLite): each job's position and a row per run.
//!
//! WAL mode with `synchronous = full`: a position written here survives a power cut. Calls run
//! on the blocking pool; the connection sits behind a std mutex that is never held across an
//! await. A position only moves forward (`seq` grows) unless a command sets it on purpose.
//!
//! Any number of pgtide processes (the daemon, timers, `status`, `replay`) may share the file,
//! and may all open it for the first time at once. Waiting for another process is never an
//! error until `BUSY_TIMEOUT`: every write transaction is `begin immediate` (SQLite answers a
//! deferred transaction that reads first and then tries to write while another connection
//! writes with SQLITE_BUSY at once, without waiting), and `open` retries the switch to WAL and
//! the creation of the schema itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};
use serde::Serialize;

use crate::position::Position;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state store {path}: stored position of job {job} is unreadable: {source}")]
    Corrupt {
        path: PathBuf,
        job: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("state store {path}: cannot create directory: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

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

#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

/// How long a state-store call waits for other processes' writes before it fails. pgtide's
/// own write transactions last milliseconds; only something else holding the file for long (a
/// `sqlite3` shell left inside a transaction) makes a call fail.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The version of `SCHEMA` recorded in SQLite's `user_version`: opening a file that is at this
/// version writes nothing (so `status` and the like never queue for the write lock to open).
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
create table if not exists positions (
    job text primary key,
    position text not null,
    seq integer not null,
    updated_at text not null
);
create table if not exists runs (
    id integer primary key,
    job text not null,
    started_at text not null,
    finished_at text,
    outcome text not null check (outcome in ('ok', 'failed', 'running')),
    rows integer not null default 0,
    error text,
    unmapped integer not null default 0,
    nulled integer not null default 0,
    columns text not null default '{}'
);
create index if not exists runs_job on runs (job, id);
";

/// Create the schema, or bring a file written by an earlier version up to it, in one write
/// transaction. Several processes may do this at once on a new file: the write lock orders
/// them, and whoever comes second finds the work done.
fn prepare(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("pragma user_version", [], |r| r.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    migrate(&tx)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

/// Bring a state file written by an earlier version up to `SCHEMA`.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let mut st = conn.prepare("select name from pragma_table_info('runs')")?;
    let have: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    for (column, ddl) in [
        (
            "unmapped",
            "alter table runs add column unmapped integer not null default 0",
        ),
        (
            "nulled",
            "alter table runs add column nulled integer not null default 0",
        ),
        (
            "columns",
            "alter table runs add column columns text not null default '{}'",
        ),
    ] {
        if !have.iter().any(|h| h == column) {
            conn.execute_batch(ddl)?;
        }
    }
    Ok(())
}

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// Whether SQLite refused because another connection holds a lock.
fn busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Run `f` until it does not fail with SQLITE_BUSY, or until `deadline`: for the steps of
/// `open` where SQLite may answer busy without calling the busy handler (the change of journal
/// mode takes an exclusive lock). Each attempt is whole or rolled back, so retrying is safe.
fn retry_busy<T>(
    deadline: Instant,
    mut f: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let mut pause = Duration::from_millis(2);
    loop {
        match f() {
            Err(e) if busy(&e) && Instant::now() < deadline => {
                // Processes that collided once should not collide again in lockstep.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let jitter = Duration::from_nanos(u64::from(nanos) % pause.as_nanos() as u64);
                std::thread::sleep(pause + jitter);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}

impl Store {
    /// Open (creating if needed) the store at `path`; other processes may be opening or
    /// writing it at the same time.
    pub fn open(path: &Path) -> Result<Store, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Dir {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let wrap = |source| StateError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(wrap)?;
        let deadline = Instant::now() + BUSY_TIMEOUT;
        // WAL is a property of the file: once one process switched, this is a no-op.
        let mode: String = retry_busy(deadline, || {
            conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
        })
        .map_err(wrap)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode = %mode, "state store cannot use WAL mode (on this file system?); readers and writers will wait for each other");
        }
        conn.pragma_update(None, "synchronous", "full")
            .map_err(wrap)?;
        retry_busy(deadline, || prepare(&conn)).map_err(wrap)?;
        Ok(Store {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` with the connection on the blocking pool (reads).
    async fn call<R, F>(&self, f: F) -> Result<R, StateError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StateError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&guard)
        })
        .await
        .expect("state store task panicked")
    }

    /// Run `f` in one write transaction that takes the write lock up front (`begin
    /// immediate`), so that another process's write is waited for (up to `BUSY_TIMEOUT`)
    /// rather than failing the call. Every write of the store goes through here.
    async fn write_tx<R, F>(&self, f: F) -> Result<R, StateError>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> rusqlite::Result<R> + Send + 'static,
    {
        let err = self.sqlite();
        self.call(move |c| {
            let tx = Transaction::new_unchecked(c, TransactionBehavior::Immediate).map_err(&err)?;
            let out = f(&tx).map_err(&err)?;
            tx.commit().map_err(&err)?;
            Ok(out)
        })
        .await
    }

    fn sqlite(&self) -> impl Fn(rusqlite::Error) -> StateError + Send + Clone + 'static {
        let path = self.path.clone();
        move |source| StateError::Sqlite {
            path: path.clone(),
            source,
        }
    }

    /// The stored position of `job`, if any.
    pub async fn position(&self, job: &str) -> Result<Option<Position>, StateError> {
        let (err, job, path) = (self.sqlite(), job.to_string(), self.path.clone());
        self.call(move |c| {
            let text: Option<String> = c
                .query_row(
                    "select position from positions where job = ?1",
                    [&job],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&err)?;
            text.map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|source| StateError::Corrupt { path, job, source })
        })
        .await
    }

    /// Store `pos` if it is newer than what is stored (a position never moves backwards).
    /// Returns whether it was written.
    pub async fn advance(&self, job: &str, pos: &Position) -> Result<bool, StateError> {
        self.put(job, pos, false, None).await
    }

    /// `advance`, and set the row count of run `run` in the same transaction (one sync to
    /// disk per batch instead of two).
    pub async fn advance_run(
        &self,
        job: &str,
        pos: &Position,
        run: i64,
        rows: i64,
    ) -> Result<bool, StateError> {
        self.put(job, pos, false, Some((run, rows))).await
    }

    /// Store `pos` whatever is stored: for `reset`, and for recovery from the DWH's copy.
    pub async fn overwrite(&self, job: &str, pos: &Position) -> Result<(), StateError> {
        self.put(job, pos, true, None).await.map(|_| ())
    }

    async fn put(
        &self,
        job: &str,
        pos: &Position,
        force: bool,
        progress: Option<(i64, i64)>,
    ) -> Result<bool, StateError> {
        let job = job.to_string();
        let text = serde_json::to_string(pos).expect("position serializes");
        let seq = pos.seq;
        self.write_tx(move |tx| {
            let sql =
                format!(
                "insert into positions (job, position, seq, updated_at) values (?1, ?2, ?3, {NOW})
                 on conflict (job) do update set position = excluded.position, seq = excluded.seq,
                   updated_at = excluded.updated_at {}",
                if force { "" } else { "where excluded.seq > positions.seq" }
            );
            let n = tx.execute(&sql, params![job, text, seq])?;
            if let Some((run, rows)) = progress {
                tx.execute(
                    "update runs set rows = ?2 where id = ?1",
                    params![run, rows],
                )?;
            }
            Ok(n > 0)
        })
        .await
    }

    /// Every job with a stored position.
    pub async fn jobs(&self) -> Result<Vec<String>, StateError> {
        let err = self.sqlite();
        self.call(move |c| {
            let mut st = c
                .prepare("select job from positions order by job")
                .map_err(&err)?;
            let rows = st.query_map([], |r| r.get(0)).map_err(&err)?;
            rows.collect::<Result<Vec<String>, _>>().map_err(&err)
        })
        .await
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn positions_never_move_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("sub/state.db")).unwrap();
        let p2 = Position {
            watermark: Some(vec!["20".into()]),
            windows: vec![],
            seq: 2,
            initial_done: false,
        };
        let p1 = Position {
            watermark: Some(vec!["10".into()]),
            windows: vec![],
            seq: 1,
            initial_done: false,
        };
        assert!(s.advance("j", &p2).await.unwrap());
        assert!(!s.advance("j", &p1).await.unwrap());
        assert_eq!(s.position("j").await.unwrap(), Some(p2));
        s.overwrite("j", &p1).await.unwrap();
        assert_eq!(s.position("j").await.unwrap(), Some(p1));
        assert_eq!(s.jobs().await.unwrap(), vec!["j".to_string()]);
    }

    /// Regression: stores opened at once on a new file failed with `database is locked`.
    #[test]
    fn many_stores_open_one_new_file_at_once_and_write_concurrently() {
        const STORES: usize = 8;
        const WRITES: i64 = 25;
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("new/state.db");
            let start = Arc::new(std::sync::Barrier::new(STORES));
            let threads: Vec<_> = (0..STORES)
                .map(|t| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || -> Result<(), StateError> {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        start.wait();
                        let s = Store::open(&path)?;
                        rt.block_on(async {
                            // Every store writes its own job, and all of them the shared one.
                            let run = s.start_run(&format!("j{t}")).await?;
                            for seq in 1..=WRITES {
                                let pos = Position {
                                    watermark: Some(vec![seq.to_string()]),
                                    seq,
                                    ..Position::default()
                                };
                                s.advance_run(&format!("j{t}"), &pos, run, seq).await?;
                                s.advance("shared", &pos).await?;
                            }
                            s.finish_run(run, WRITES, None, &BTreeMap::new()).await
                        })
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap().unwrap();
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let s = Store::open(&path).unwrap();
            rt.block_on(async {
                let mut jobs = s.jobs().await.unwrap();
                jobs.retain(|j| j != "shared");
                assert_eq!(jobs.len(), STORES);
                for j in jobs.iter().chain(["shared".to_string()].iter()) {
                    assert_eq!(s.position(j).await.unwrap().unwrap().seq, WRITES, "{j}");
                }
                let run = s.last_run("j0").await.unwrap().unwrap();
                assert_eq!((run.outcome.as_str(), run.rows), ("ok", WRITES));
            });
            let mode: String = s
                .conn
                .lock()
                .unwrap()
                .query_row("pragma journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
    }

    #[test]
    fn a_file_of_an_earlier_version_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "create table runs (id integer primary key, job text not null, started_at text not null,
               finished_at text, outcome text not null, rows integer not null default 0, error text);
             insert into runs (job, started_at, outcome) values ('j', '2024-01-01T00:00:00Z', 'ok');",
        )
        .unwrap();
        drop(old);
        let s = Store::open(&path).unwrap();
        let c = s.conn.lock().unwrap();
        let version: i64 = c
            .query_row("pragma user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let nulled: i64 = c
            .query_row("select nulled from runs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(nulled, 0);
    }

    #[tokio::test]
    async fn runs_left_running_are_marked_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.db")).unwrap();
        let first = s.start_run("j").await.unwrap();
        s.progress_run(first, 5).await.unwrap();
        let second = s.start_run("j").await.unwrap();
        let runs = s.runs("j", 10).await.unwrap();
        assert_eq!(runs[1].outcome, "failed");
        assert_eq!(runs[1].rows, 5);
        assert!(runs[1].error.as_deref().unwrap().contains("interrupted"));
        let tallies: BTreeMap<String, Tally> = [(
            "label".to_string(),
            Tally {
                unmapped: 3,
                nulled: 0,
                values: vec!["9".into()],
            },
        )]
        .into();
        s.finish_run(second, 7, None, &tallies).await.unwrap();
        let last = s.last_run("j").await.unwrap().unwrap();
        assert_eq!(
            (last.outcome.as_str(), last.rows, last.unmapped),
            ("ok", 7, 3)
        );
        assert_eq!(last.columns, tallies);
        assert!(last.finished_at.is_some());
    }
}
