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
//!
//! `positions` holds what a job has reached, `runs` the record of its runs (and, while a run
//! loads, its progress: the estimate `rows_total`, and `rows` as of `progress_at`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, Transaction, TransactionBehavior};

mod positions;
mod runs;

pub use runs::{RunRecord, Tally};

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
const SCHEMA_VERSION: i64 = 2;

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
    columns text not null default '{}',
    rows_total integer,
    progress_at text
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
        // Version 2: the progress of a run's load.
        (
            "rows_total",
            "alter table runs add column rows_total integer",
        ),
        (
            "progress_at",
            "alter table runs add column progress_at text",
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
}

#[cfg(test)]
mod tests;
