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
}

/// A PostgreSQL DWH, through one session (which holds the job's advisory lock).
impl Dwh for Client {
    async fn lock(&mut self, job: &str) -> Result<bool, SinkError> {
        super::try_lock(self, job).await
    }

    async fn unlock(&mut self, job: &str) -> Result<(), SinkError> {
        super::unlock(self, job).await
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
        let tx = self.transaction().await?;
        let copy_in = tx
            .copy_in::<_, Bytes>(super::copy_in_sql(view, batch.direct).as_str())
            .await?;
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
        let rows = match copied {
            Ok(rows) => rows,
            // A key already in the target, or a batch the target refuses (a NULL or repeated
            // key): the staged path applies the first and names the row of the others.
            Err(WriteError::Sink(SinkError::Db(e)))
                if batch.direct
                    && crate::pg::refusal(&e) == Some(crate::pg::Refusal::Constraint) =>
            {
                return Err(WriteError::KeyExists);
            }
            Err(e) => return Err(e),
        };
        let mut written = Written {
            rows,
            ..Written::default()
        };
        if !batch.direct && rows > 0 {
            written.nulled = super::cast_failures(&tx, view).await?;
        }
        written.changed = match (batch.direct, rows) {
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
}
