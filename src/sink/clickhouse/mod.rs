//! ClickHouse as the DWH, through its HTTP interface.
//!
//! A target is a `ReplacingMergeTree(_pgtide_version)` ordered by the job's key. Every write
//! of a key carries a version greater than any before it, so `final` (or `argMax`) picks the
//! newest and writing a batch again changes nothing a reader sees. ClickHouse has no
//! transactions: a batch's rows go in one insert, then the rows of its deleted keys, then
//! its position. A crash in between leaves rows the next run writes again with a newer
//! version, never a position ahead of its rows.
//!
//! ClickHouse has no locks either: the job's lock is the same advisory lock, held by a
//! session on the job's source.

mod ddl;
pub mod rows;
pub mod types;

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use super::dwh::{Batch, Dwh, WriteError, Written};
use super::{Missing, SinkError, TargetState};
use crate::clickhouse::{Client as Http, InsertError};
use crate::config::OnDelete;
use crate::position::Position;
use crate::view::View;

pub use ddl::{describe, quote, target};
use rows::Tagger;

/// The newest version any connection of this process has handed out.
static LAST_VERSION: AtomicU64 = AtomicU64::new(0);

/// The next version at clock `now` (microseconds) for a connection whose own last one was
/// `floor`: above both, and above every version of this process.
fn advance_version(now: u64, floor: u64) -> u64 {
    let next = |last: u64| now.max(last + 1).max(floor + 1);
    let previous = LAST_VERSION
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| Some(next(last)))
        .expect("the update always gives a value");
    next(previous)
}

/// Why the rows of a batch stopped on their way to ClickHouse.
enum Refused<E> {
    /// The source's stream failed.
    Rows(E),
    /// A row has a NULL in its key.
    NullKey(rows::NullKey),
}

pub const VERSION: &str = "_pgtide_version";
pub const DELETED: &str = "_pgtide_deleted";
pub const LOADED_AT: &str = "_pgtide_loaded_at";
/// The control table, in the DWH url's database.
pub const POSITIONS: &str = "pgtide_positions";

/// A ClickHouse DWH for one run.
pub struct ClickHouse {
    http: Http,
    /// A session on the job's source, holding the job's advisory lock (`None` for the
    /// workers of a run that holds it).
    lock: Option<tokio_postgres::Client>,
    /// The url's database: where the control table lives.
    database: String,
    datetime64: bool,
    /// The last version written to the target; the next is greater.
    last_version: u64,
    /// The seq this connection stored last: later writes need not read it back (the job's
    /// lock keeps other writers out).
    written_seq: Option<i64>,
}

impl ClickHouse {
    pub fn new(http: Http, lock: Option<tokio_postgres::Client>, database: String) -> ClickHouse {
        let datetime64 = types::has_datetime64(http.version());
        ClickHouse {
            http,
            lock,
            database,
            datetime64,
            last_version: 0,
            written_seq: None,
        }
    }

    pub fn http(&mut self) -> &mut Http {
        &mut self.http
    }

    /// How the view's columns are written.
    pub fn columns(&self, view: &View) -> Vec<types::ChColumn> {
        ddl::columns(view, self.datetime64)
    }

    /// A version greater than every one written before, by this connection (and the newest in
    /// the target when it was prepared) and by every other of this process (a load's workers
    /// and the run's own session write the same keys): the clock in microseconds, or one more
    /// than the last, so versions grow even when the clock steps back.
    fn next_version(&mut self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.last_version = advance_version(now, self.last_version);
        self.last_version
    }

    fn positions(&self) -> String {
        format!("{}.{}", quote(&self.database), quote(POSITIONS))
    }

    /// Every job's newest position: `(job, seq, position)`.
    async fn stored(&mut self) -> Result<Vec<(String, i64, String)>, SinkError> {
        let q = format!(
            "select job, max(seq), argMax(position, seq) from {} group by job format TabSeparated",
            self.positions()
        );
        let text = self.http.query(&q).await?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let job = rows::unescape(f.next()?.as_bytes());
                let seq = f.next()?.parse().ok()?;
                let pos = rows::unescape(f.next()?.as_bytes());
                Some((job, seq, pos))
            })
            .collect())
    }

    async fn stored_seq(&mut self, job: &str) -> Result<Option<(i64, String)>, SinkError> {
        Ok(self
            .stored()
            .await?
            .into_iter()
            .find(|(j, _, _)| j == job)
            .map(|(_, s, p)| (s, p)))
    }

    /// Write the position after checking that it moves forward (the job's lock keeps others
    /// from writing between the check and the insert).
    async fn write_position(&mut self, job: &str, pos: &Position) -> Result<(), SinkError> {
        // The lock is in a source session that sits idle while ClickHouse works: it must still
        // be there for the check below to hold.
        self.check_lock().await?;
        let stored = match self.written_seq {
            Some(seq) => Some(seq),
            None => self.stored_seq(job).await?.map(|(seq, _)| seq),
        };
        if let Some(stored) = stored {
            if stored >= pos.seq {
                return Err(SinkError::Backwards {
                    job: job.to_string(),
                    seq: pos.seq,
                    stored,
                });
            }
        }
        let mut body = Vec::new();
        rows::escape(job, &mut body);
        body.push(b'\t');
        body.extend_from_slice(pos.seq.to_string().as_bytes());
        body.push(b'\t');
        rows::escape(
            &serde_json::to_string(pos).expect("position serializes"),
            &mut body,
        );
        body.push(b'\n');
        let q = format!(
            "insert into {} (job, seq, position) format TabSeparated",
            self.positions()
        );
        self.insert_bytes(&q, body).await?;
        self.written_seq = Some(pos.seq);
        Ok(())
    }

    async fn insert_bytes(&mut self, q: &str, body: Vec<u8>) -> Result<(), SinkError> {
        let body = futures_util::stream::once(async move { Ok::<_, SinkError>(Bytes::from(body)) });
        match self.http.insert(q, body).await {
            Ok(()) => Ok(()),
            Err(InsertError::Body(e)) => Err(e),
            Err(InsertError::ClickHouse(e)) => Err(e.into()),
        }
    }

    /// Mark the keys the batch showed gone as deleted, as the job's `on_delete` says.
    /// `seen` holds the key fields of the rows the batch wrote (with `version`).
    async fn remove_missing(
        &mut self,
        view: &View,
        missing: Missing<'_>,
        seen: &std::collections::HashSet<Vec<Vec<u8>>>,
        version: u64,
    ) -> Result<u64, SinkError> {
        if view.job.on_delete == OnDelete::Ignore {
            return Ok(0);
        }
        let target = ddl::target(view);
        let keys: Vec<String> = view.job.key.iter().map(|k| quote(k)).collect();
        let gone_version = self.next_version();
        match missing {
            Missing::Keys(values) => {
                let mut body = Vec::new();
                let mut n = 0;
                for key in values {
                    let escaped: Vec<Vec<u8>> = key
                        .iter()
                        .map(|v| {
                            let mut e = Vec::new();
                            rows::escape(v, &mut e);
                            e
                        })
                        .collect();
                    if seen.contains(&escaped) {
                        continue;
                    }
                    for field in escaped {
                        body.extend_from_slice(&field);
                        body.push(b'\t');
                    }
                    body.extend_from_slice(format!("{gone_version}\t1\n").as_bytes());
                    n += 1;
                }
                if n == 0 {
                    return Ok(0);
                }
                if view.job.on_delete == OnDelete::Soft {
                    // The marked rows keep their values: copied from the newest live row.
                    return self
                        .mark_kept(view, body, n, gone_version)
                        .await
                        .map(|()| n);
                }
                let q = format!(
                    "insert into {target} ({}, {}, {}) format TabSeparated",
                    keys.join(", "),
                    quote(VERSION),
                    quote(DELETED)
                );
                self.insert_bytes(&q, body).await?;
                Ok(n)
            }
            Missing::All => {
                // Every live key the batch (version `version`) did not write is gone.
                let cols: Vec<String> = self.columns(view).iter().map(|c| quote(&c.name)).collect();
                let kept = match view.job.on_delete {
                    OnDelete::Soft => cols.join(", "),
                    _ => keys.join(", "),
                };
                let q = format!(
                    "insert into {target} ({kept}, {v}, {d}) select {kept}, {gone_version}, 1 from {target} final where {d} = 0 and {v} < {version}",
                    v = quote(VERSION),
                    d = quote(DELETED)
                );
                let before = self.count_live(view).await?;
                self.http.execute(&q).await?;
                let after = self.count_live(view).await?;
                Ok(before.saturating_sub(after))
            }
        }
    }

    /// Soft deletes: the keys in `body` (with version and flag) are written into the job's
    /// scratch table, then their newest live rows are copied marked deleted.
    async fn mark_kept(
        &mut self,
        view: &View,
        body: Vec<u8>,
        _n: u64,
        version: u64,
    ) -> Result<(), SinkError> {
        let scratch = ddl::scratch(view);
        let target = ddl::target(view);
        let keys: Vec<String> = view.job.key.iter().map(|k| quote(k)).collect();
        let cols: Vec<String> = self.columns(view).iter().map(|c| quote(&c.name)).collect();
        self.http
            .execute(&format!("truncate table {scratch}"))
            .await?;
        let q = format!(
            "insert into {scratch} ({}, {}, {}) format TabSeparated",
            keys.join(", "),
            quote(VERSION),
            quote(DELETED)
        );
        self.insert_bytes(&q, body).await?;
        let k = keys.join(", ");
        let q = format!(
            "insert into {target} ({c}, {v}, {d}) select {c}, {version}, 1 from {target} final where {d} = 0 and ({k}) in (select {k} from {scratch})",
            c = cols.join(", "),
            v = quote(VERSION),
            d = quote(DELETED)
        );
        self.http.execute(&q).await?;
        Ok(())
    }

    async fn count_live(&mut self, view: &View) -> Result<u64, SinkError> {
        let q = format!(
            "select count() from {} final where {} = 0 format TabSeparated",
            ddl::target(view),
            quote(DELETED)
        );
        Ok(self.http.query(&q).await?.trim().parse().unwrap_or(0))
    }
}

impl Dwh for ClickHouse {
    async fn lock(&mut self, job: &str) -> Result<bool, SinkError> {
        match &self.lock {
            Some(session) => super::try_lock(session, job).await,
            None => unreachable!("a worker's connection never takes the job's lock"),
        }
    }

    async fn unlock(&mut self, job: &str) -> Result<(), SinkError> {
        match &self.lock {
            Some(session) => super::unlock(session, job).await,
            None => Ok(()),
        }
    }

    async fn check_lock(&mut self) -> Result<(), SinkError> {
        match &self.lock {
            Some(session) => super::lock_alive(session).await,
            None => Ok(()),
        }
    }

    async fn prepare_target(&mut self, view: &View) -> Result<TargetState, SinkError> {
        ddl::ensure_control(&mut self.http, &self.database).await?;
        ddl::ensure_target(&mut self.http, view, self.datetime64).await?;
        let q = format!(
            "select max({}) from {} format TabSeparated",
            quote(VERSION),
            ddl::target(view)
        );
        let newest: u64 = self.http.query(&q).await?.trim().parse().unwrap_or(0);
        self.last_version = self.last_version.max(newest);
        Ok(TargetState {
            copy_direct: false,
            split: false,
        })
    }

    async fn check_target(&mut self, view: &View) -> Result<Vec<String>, SinkError> {
        ddl::check_target(&mut self.http, view, self.datetime64).await
    }

    async fn read_position(&mut self, job: &str) -> Result<Option<Position>, SinkError> {
        if !ddl::exists(&mut self.http, &self.database, POSITIONS).await? {
            return Ok(None);
        }
        match self.stored_seq(job).await? {
            None => Ok(None),
            Some((_, text)) => serde_json::from_str(&text).map(Some).map_err(|source| {
                SinkError::UnreadablePosition {
                    job: job.to_string(),
                    source,
                }
            }),
        }
    }

    async fn store_position(&mut self, job: &str, position: &Position) -> Result<(), SinkError> {
        self.write_position(job, position).await
    }

    fn copy_sql(&self, view: &View, predicate: &str) -> String {
        let cols: Vec<String> = self.columns(view).into_iter().map(|c| c.select).collect();
        format!(
            "copy (select {} {}) to stdout",
            cols.join(", "),
            crate::view::sql::rows_of(view, predicate)
        )
    }

    /// The rows in one streamed insert, tagged with a new version; then the deleted keys'
    /// rows; then the position.
    async fn write<S, E>(
        &mut self,
        view: &View,
        rows: S,
        batch: Batch<'_>,
    ) -> Result<Written, WriteError<E>>
    where
        S: Stream<Item = Result<Bytes, E>>,
    {
        let version = self.next_version();
        let key_fields = view.key_positions();
        let keep_keys = matches!(batch.missing, Some(Missing::Keys(_)));
        let refuse_null = key_fields.iter().any(|k| view.columns[*k].nullable);
        let columns = self.columns(view);
        let names: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
        let q = format!(
            "insert into {} ({}, {}, {}) format TabSeparated",
            ddl::target(view),
            names.join(", "),
            quote(VERSION),
            quote(DELETED)
        );
        let tagger = std::sync::Arc::new(std::sync::Mutex::new(Tagger::new(
            version,
            key_fields,
            keep_keys,
            refuse_null,
        )));
        let t = tagger.clone();
        let tagged = rows.ready_chunks(rows::PIECE_ROWS).map(move |chunks| {
            let mut tagger = t.lock().expect("tagger");
            // A row per chunk as a rule, each with its tag (at most 24 bytes).
            let len: usize = chunks.iter().flatten().map(|c| c.len() + 24).sum();
            let mut piece = BytesMut::with_capacity(len);
            for chunk in chunks {
                tagger
                    .feed(&chunk.map_err(Refused::Rows)?, &mut piece)
                    .map_err(Refused::NullKey)?;
            }
            Ok(piece.freeze())
        });
        // A refused row aborts the insert: ClickHouse sees a broken body and keeps nothing of
        // its unfinished block (a batch is one block up to `max_insert_block_size` rows).
        match self.http.insert(&q, tagged).await {
            Ok(()) => {}
            Err(InsertError::Body(Refused::Rows(e))) => return Err(WriteError::Rows(e)),
            Err(InsertError::Body(Refused::NullKey(row))) => {
                return Err(WriteError::Sink(SinkError::Data(super::KeyError::Null {
                    columns: view.job.key.clone(),
                    row: row.0,
                })))
            }
            Err(InsertError::ClickHouse(e)) => return Err(WriteError::Sink(e.into())),
        }
        let tagger = std::mem::replace(
            &mut *tagger.lock().expect("tagger"),
            Tagger::new(0, Vec::new(), false, false),
        );
        let mut written = Written {
            rows: tagger.rows,
            changed: tagger.rows,
            ..Written::default()
        };
        if let Some(m) = batch.missing {
            written.deleted = self.remove_missing(view, m, &tagger.keys, version).await?;
        }
        if let Some(advance) = batch.position {
            crate::shutdown::crash_point("PGTIDE_CRASH_BEFORE_CH_POSITION");
            let job = view.job.name.clone();
            let this = &mut *self;
            let stored = advance
                .store(|p| async move { this.write_position(&job, &p).await })
                .await?;
            written.stored = Some(stored);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_grow_across_connections_when_the_clock_steps_back() {
        // One connection writes at clock 2,000,000; another, whose own last version is
        // older, writes after the clock stepped back: its version is still newer.
        let first = advance_version(2_000_000, 0);
        let second = advance_version(1_000_000, 5);
        assert!(second > first, "{second} after {first}");
        // A connection's own last version counts too.
        let own = advance_version(0, second + 10);
        assert!(own > second + 10);
    }
}
