//! The DWH boundary: what a run needs from a warehouse, and PostgreSQL as the first one.
//!
//! A run locks its job, prepares the target, reads the position, writes batches and stores
//! positions; it never sees how. `write` takes one batch as a stream of binary COPY rows and
//! applies it together with the position after it. PostgreSQL does that in one transaction;
//! a store without multi-statement transactions writes the rows first and the position after
//! them, with a replay of the batch harmless.

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use tokio_postgres::Client;

use super::{Missing, SinkError, TargetState};
use crate::pg::{quote_ident, quote_qualified};
use crate::position::{Chunk, Position, Snapshot, Unseen};
use crate::view::View;

/// How one batch is written.
pub struct Batch<'a> {
    /// Copy straight into the target: it held none of the job's keys so far.
    pub direct: bool,
    /// Keys whose view rows are gone, handled as the job's `on_delete` says.
    pub missing: Option<Missing<'a>>,
    /// The job's position after this batch, stored with its rows.
    pub position: Option<Advance<'a>>,
}

/// How a batch moves the job's position.
#[derive(Clone, Copy)]
pub enum Advance<'a> {
    /// Store this position with the rows.
    To(&'a Position),
    /// The batch is a chunk of a load that several workers write at once: under the shared
    /// position's lock, the chunk is recorded in it, the result stored with the rows, and kept
    /// as the shared position once they are committed.
    Chunk {
        shared: &'a tokio::sync::Mutex<Position>,
        chunk: &'a Chunk,
        snap: &'a Snapshot,
        unseen: &'a Unseen,
    },
}

impl Advance<'_> {
    /// Store the position this batch leaves with `store`, which commits it with the rows;
    /// returns the position stored.
    pub async fn store<F, Fut>(self, store: F) -> Result<Position, SinkError>
    where
        F: FnOnce(Position) -> Fut,
        Fut: std::future::Future<Output = Result<(), SinkError>>,
    {
        match self {
            Advance::To(p) => {
                store(p.clone()).await?;
                Ok(p.clone())
            }
            Advance::Chunk {
                shared,
                chunk,
                snap,
                unseen,
            } => {
                let mut guard = shared.lock().await;
                let mut next = guard.clone();
                next.chunk_done(chunk, snap, unseen);
                store(next.clone()).await?;
                *guard = next.clone();
                Ok(next)
            }
        }
    }
}

/// What writing a batch did.
#[derive(Debug, Default)]
pub struct Written {
    /// Rows the batch had.
    pub rows: u64,
    /// Rows the target took as new or changed.
    pub changed: u64,
    /// Target rows deleted or marked deleted.
    pub deleted: u64,
    /// Per column, values the DWH could not cast and wrote as NULL (`on_error = "null"`).
    pub nulled: Vec<(String, u64)>,
    /// The position stored with the batch, if it moved one.
    pub stored: Option<Position>,
}

/// Why a batch was not written.
#[derive(Debug)]
pub enum WriteError<E> {
    /// Reading the rows failed (the source's error).
    Rows(E),
    /// The DWH refused or failed.
    Sink(SinkError),
    /// A direct copy met a key the target holds already; nothing was written, the batch
    /// must be staged.
    KeyExists,
}

impl<E> From<SinkError> for WriteError<E> {
    fn from(e: SinkError) -> Self {
        WriteError::Sink(e)
    }
}

impl<E> From<tokio_postgres::Error> for WriteError<E> {
    fn from(e: tokio_postgres::Error) -> Self {
        WriteError::Sink(SinkError::Db(e))
    }
}

/// What a run needs from a DWH.
#[allow(async_fn_in_trait)] // used through concrete types; no Send bound needed beyond theirs
pub trait Dwh {
    /// Take the job's lock for this session; `false` when another session holds it.
    async fn lock(&mut self, job: &str) -> Result<bool, SinkError>;
    /// Release the job's lock now.
    async fn unlock(&mut self, job: &str) -> Result<(), SinkError>;
    /// Fail unless the session holding the job's lock is still there: a session lock ends
    /// with its session (a dropped connection, `idle_session_timeout`), and another pgtide
    /// could then write the job too. Asked where the lock's session may have sat idle.
    async fn check_lock(&mut self) -> Result<(), SinkError>;
    /// Create or evolve what the job writes to (control table, target, staging), refusing an
    /// incompatible target before anything is written.
    async fn prepare_target(&mut self, view: &View) -> Result<TargetState, SinkError>;
    /// The job's stored position, `None` before its first batch.
    async fn read_position(&mut self, job: &str) -> Result<Option<Position>, SinkError>;
    /// Store a position that comes without rows (a reset, the end of a first load).
    async fn store_position(&mut self, job: &str, position: &Position) -> Result<(), SinkError>;
    /// The problems `prepare_target` would stop at, changing nothing (`check`).
    async fn check_target(&mut self, view: &View) -> Result<Vec<String>, SinkError>;
    /// The source statement that copies the view rows of `predicate` out in the form `write`
    /// takes.
    fn copy_sql(&self, view: &View, predicate: &str) -> String;
    /// Write one batch of the view's rows (binary COPY data) and then its position.
    async fn write<S, E>(
        &mut self,
        view: &View,
        rows: S,
        batch: Batch<'_>,
    ) -> Result<Written, WriteError<E>>
    where
        S: Stream<Item = Result<Bytes, E>>;

    /// The target's greatest key (one text value per key column), for `write_split`: `None`
    /// when the target is empty or this DWH does not copy rows of new keys straight in.
    async fn key_ceiling(&mut self, _view: &View) -> Result<Option<Vec<String>>, SinkError> {
        Ok(None)
    }

    /// Write one batch as `write` does, its rows in two parts: `fresh`, whose keys all lie
    /// above the target's greatest (`key_ceiling`), and then `rest`. A fresh key the target
    /// holds after all is `WriteError::KeyExists`, with nothing written.
    async fn write_split<F, S, E>(
        &mut self,
        view: &View,
        fresh: F,
        rest: S,
        batch: Batch<'_>,
    ) -> Result<Written, WriteError<E>>
    where
        F: Stream<Item = Result<Bytes, E>>,
        S: Stream<Item = Result<Bytes, E>>,
    {
        self.write(view, fresh.chain(rest), batch).await
    }
}

/// A PostgreSQL DWH, through one session (which holds the job's advisory lock).
impl Dwh for Client {
    async fn lock(&mut self, job: &str) -> Result<bool, SinkError> {
        super::try_lock(self, job).await
    }

    async fn unlock(&mut self, job: &str) -> Result<(), SinkError> {
        super::unlock(self, job).await
    }

    async fn check_lock(&mut self) -> Result<(), SinkError> {
        super::lock_alive(self).await
    }

    async fn prepare_target(&mut self, view: &View) -> Result<TargetState, SinkError> {
        super::ensure_control(self).await?;
        let target = super::ensure_target(self, view).await?;
        super::create_staging(self, view).await?;
        Ok(target)
    }

    async fn read_position(&mut self, job: &str) -> Result<Option<Position>, SinkError> {
        super::read_position(self, job).await
    }

    async fn check_target(&mut self, view: &View) -> Result<Vec<String>, SinkError> {
        super::check_target(self, view).await
    }

    /// Binary COPY, which the staging table and the target take as they are.
    fn copy_sql(&self, view: &View, predicate: &str) -> String {
        crate::view::sql::copy_out(view, predicate)
    }

    async fn store_position(&mut self, job: &str, position: &Position) -> Result<(), SinkError> {
        let tx = self.transaction().await?;
        super::write_position(&tx, job, position).await?;
        tx.commit().await?;
        Ok(())
    }

    /// One DWH transaction: COPY into the target (direct) or the staging table, then the
    /// upsert, the deletes and the position.
    async fn write<S, E>(
        &mut self,
        view: &View,
        rows: S,
        batch: Batch<'_>,
    ) -> Result<Written, WriteError<E>>
    where
        S: Stream<Item = Result<Bytes, E>>,
    {
        write_parts(
            self,
            view,
            None::<futures_util::stream::Empty<_>>,
            rows,
            batch,
        )
        .await
    }

    /// The greatest key by the key's unique index (`TargetState::split` says there is one in
    /// key order), one entry read backwards.
    async fn key_ceiling(&mut self, view: &View) -> Result<Option<Vec<String>>, SinkError> {
        // Qualified: `order by "id"` would sort the text output column of that name.
        let key: Vec<String> = view
            .job
            .key
            .iter()
            .map(|k| format!("t.{}", quote_ident(k)))
            .collect();
        let text: Vec<String> = key.iter().map(|k| format!("{k}::text")).collect();
        let desc: Vec<String> = key.iter().map(|k| format!("{k} desc")).collect();
        let q = format!(
            "select {} from {} t order by {} limit 1",
            text.join(", "),
            quote_qualified(&view.job.target.schema, &view.job.target.name),
            desc.join(", ")
        );
        let Some(row) = self.query_opt(q.as_str(), &[]).await? else {
            return Ok(None);
        };
        Ok((0..key.len())
            .map(|i| row.get::<_, Option<String>>(i))
            .collect())
    }

    /// One DWH transaction: `fresh` copied straight into the target, then `rest` staged and
    /// upserted, the position last.
    async fn write_split<F, S, E>(
        &mut self,
        view: &View,
        fresh: F,
        rest: S,
        batch: Batch<'_>,
    ) -> Result<Written, WriteError<E>>
    where
        F: Stream<Item = Result<Bytes, E>>,
        S: Stream<Item = Result<Bytes, E>>,
    {
        write_parts(self, view, Some(fresh), rest, batch).await
    }
}

/// COPY `rows` in with `sql`; a refused row (a key the target holds, a NULL or repeated key)
/// is `KeyExists` when `direct`, since the staged path applies the first and names the row of
/// the others.
async fn copy_rows<S, E>(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    rows: S,
    direct: bool,
) -> Result<u64, WriteError<E>>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let copy_in = tx.copy_in::<_, Bytes>(sql).await?;
    futures_util::pin_mut!(rows);
    futures_util::pin_mut!(copy_in);
    let copied = async {
        while let Some(chunk) = rows.next().await {
            copy_in
                .feed(chunk.map_err(WriteError::Rows)?)
                .await
                .map_err(WriteError::from)?;
        }
        copy_in.as_mut().finish().await.map_err(WriteError::from)
    }
    .await;
    match copied {
        Err(WriteError::Sink(SinkError::Db(e)))
            if direct && crate::pg::refusal(&e) == Some(crate::pg::Refusal::Constraint) =>
        {
            Err(WriteError::KeyExists)
        }
        other => other,
    }
}

/// `write` and `write_split` for PostgreSQL: in one transaction, `fresh` (if any) straight
/// into the target, `rows` into the target (direct) or the staging table, then the upsert,
/// the deletes and the position.
async fn write_parts<F, S, E>(
    client: &mut Client,
    view: &View,
    fresh: Option<F>,
    rows: S,
    batch: Batch<'_>,
) -> Result<Written, WriteError<E>>
where
    F: Stream<Item = Result<Bytes, E>>,
    S: Stream<Item = Result<Bytes, E>>,
{
    let tx = client.transaction().await?;
    let fresh = match fresh {
        Some(f) => copy_rows(&tx, &super::copy_in_sql(view, true), f, true).await?,
        None => 0,
    };
    let rows = copy_rows(
        &tx,
        &super::copy_in_sql(view, batch.direct),
        rows,
        batch.direct,
    )
    .await?;
    let mut written = Written {
        rows: fresh + rows,
        changed: fresh,
        ..Written::default()
    };
    if !batch.direct && rows > 0 {
        written.nulled = super::cast_failures(&tx, view).await?;
    }
    written.changed += match (batch.direct, rows) {
        (true, _) => rows,
        (false, 0) => 0,
        (false, _) => super::upsert(&tx, view).await?,
    };
    if let Some(m) = batch.missing {
        written.deleted = super::remove_missing(&tx, view, m).await?;
    }
    match batch.position {
        Some(advance) => {
            let job = &view.job.name;
            let stored = advance
                .store(|p| async move {
                    super::write_position(&tx, job, &p).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await?;
            written.stored = Some(stored);
        }
        None => tx.commit().await?,
    }
    Ok(written)
}
