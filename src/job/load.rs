//! Loads of many rows (a first load, a reload after `reset`, `replay`): the range cut into
//! chunks that `parallel` workers read and write at once, each chunk in its own source
//! snapshot and its own DWH transaction, streamed as any batch is.
//!
//! A planner walks the cursor's order a chunk at a time (the same keyset query as a batch's
//! upper bound) and hands each range to the next free worker; so chunks hold as many rows as
//! asked whatever the key's distribution, for any cursor (composite, text, timestamps), with
//! no numeric key needed. The planner cuts a chunk only when a worker can take it, so its size
//! follows the speed the workers last reported: the first chunks hold `batch_size` rows, the
//! others about [`CHUNK_TIME`]'s worth, up to [`MAX_CHUNK_ROWS`]: few commits on a fast
//! path, short snapshots on a slow one. A chunk that is a large part of the table reads its
//! bounds once per statement (`range::wide`). Each finished chunk is recorded in the job's
//! position (`position::Load`) with its rows, so a killed load resumes with the chunks it had
//! not finished; see `position/load.rs`. Replays move no position and start over.
//!
//! The workers report each chunk to the run's loop (`Context::drive`), which does the
//! bookkeeping as for any batch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;

use super::*;
use crate::position::{Chunk, Window};

/// How long a chunk should take to read and write: long enough that a chunk's fixed costs
/// (its snapshot, the plan of its read, its commit) are lost in its rows, short enough that
/// its snapshot holds back nothing on the source.
pub const CHUNK_TIME: Duration = Duration::from_secs(2);
/// The most rows in one chunk.
pub const MAX_CHUNK_ROWS: i64 = 1_000_000;

/// The rows of the next chunk: about `CHUNK_TIME`'s worth at `ns_per_row` (0: not known
/// yet, the last chunk's size), at least `batch_size`, at most `MAX_CHUNK_ROWS` (unless
/// `batch_size` is more).
pub(super) fn chunk_rows(batch_size: i64, last: i64, ns_per_row: u64) -> i64 {
    if ns_per_row == 0 {
        return last;
    }
    let fits = (CHUNK_TIME.as_nanos() as u64 / ns_per_row).min(MAX_CHUNK_ROWS as u64) as i64;
    fits.max(batch_size)
}

/// A chunk handed to the workers, and whether it is a large part of the table
/// (`range::wide`).
pub(super) struct Planned {
    pub(super) chunk: Chunk,
    pub(super) wide: bool,
}

/// A load under way.
pub(super) struct Load {
    /// The range it reads, `(lo, hi]` (`hi` open up to the newest row).
    pub(super) lo: Option<Vec<String>>,
    pub(super) hi: Option<Vec<String>>,
    done: mpsc::Receiver<Result<Applied, JobError>>,
    stop: Arc<AtomicBool>,
    tasks: JoinSet<()>,
    stopped: bool,
}

/// What a load reads: the rest of the position's `load`, or a replay's `(lo, to]`.
pub(super) enum Reach {
    Position(Arc<Mutex<Position>>),
    Replay {
        lo: Option<Vec<String>>,
        to: Option<Vec<String>>,
    },
}

impl Load {
    /// The next finished chunk; `None` once every worker is done.
    pub(super) async fn next(&mut self) -> Result<Option<Applied>, JobError> {
        match self.done.recv().await {
            Some(r) => r.map(Some),
            None => {
                // Every worker has ended; one that panicked says so here.
                while let Some(joined) = self.tasks.join_next().await {
                    if let Err(e) = joined {
                        if e.is_panic() {
                            std::panic::resume_unwind(e.into_panic());
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    /// Hand out no more chunks; those being written are finished.
    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stopped = true;
    }

    pub(super) fn stopped(&self) -> bool {
        self.stopped
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A failed load: whatever is still being written rolls back with its connection.
        self.stop.store(true, Ordering::SeqCst);
        self.tasks.abort_all();
    }
}

/// The one window over every chunk a replay's workers read (`reads`, with their plan order):
/// from the first chunk's start to the last one's end, with what any of their snapshots could
/// not see.
pub(super) fn replay_window(mut reads: Vec<(u64, Window)>) -> Option<Window> {
    reads.sort_by_key(|(seq, _)| *seq);
    let mut reads = reads.into_iter().map(|(_, w)| w);
    let mut window = reads.next()?;
    for w in reads {
        window.absorb(w);
    }
    Some(window)
}

impl Context {
    /// Start loading `reach` with the job's `parallel` workers; `table_rows` is the main
    /// table's size by its statistics (`Session::table_rows`).
    pub(super) fn start_load(
        &self,
        view: &View,
        reach: Reach,
        limiter: Option<Arc<Limiter>>,
        table_rows: Option<u64>,
    ) -> Load {
        let workers = view.job.parallel.max(1);
        // One chunk waits for the next free worker: the planner cuts each chunk when a worker
        // has taken the one before, at the speed known then.
        let (chunks_tx, chunks_rx) = mpsc::channel::<Planned>(1);
        let chunks_rx = Arc::new(Mutex::new(chunks_rx));
        let (done_tx, done_rx) = mpsc::channel(workers * 2);
        let stop = Arc::new(AtomicBool::new(false));
        // Nanoseconds per row of the last chunk finished, for the planner's next size.
        let speed = Arc::new(AtomicU64::new(0));
        let (shared, lo, hi) = match &reach {
            Reach::Position(p) => {
                let pos = p
                    .try_lock()
                    .expect("nothing holds a load's position before it starts");
                // Up to the newest row: the load's end when it began.
                (Some(p.clone()), pos.watermark.clone(), None)
            }
            Reach::Replay { lo, to } => (None, lo.clone(), to.clone()),
        };
        let mut tasks = JoinSet::new();
        {
            let (ctx, view, stop, done) =
                (self.clone(), view.clone(), stop.clone(), done_tx.clone());
            let speed = speed.clone();
            tasks.spawn(async move {
                if let Err(e) = ctx
                    .plan(&view, reach, table_rows, chunks_tx, &stop, &speed)
                    .await
                {
                    let _ = done.send(Err(e)).await;
                }
            });
        }
        for _ in 0..workers {
            let ctx = self.clone();
            let view = view.clone();
            let (chunks, done, stop) = (chunks_rx.clone(), done_tx.clone(), stop.clone());
            let (shared, limiter, speed) = (shared.clone(), limiter.clone(), speed.clone());
            tasks.spawn(async move {
                let worked = ctx
                    .work(
                        &view,
                        chunks,
                        &done,
                        &stop,
                        &speed,
                        shared,
                        limiter.as_deref(),
                    )
                    .await;
                if let Err(e) = worked {
                    stop.store(true, Ordering::SeqCst);
                    let _ = done.send(Err(e)).await;
                }
            });
        }
        Load {
            lo,
            hi,
            done: done_rx,
            stop,
            tasks,
            stopped: false,
        }
    }

    /// Cut the load's range into chunks and hand them out, in cursor order: chunks that tile
    /// it, the last one reaching its end.
    pub(super) async fn plan(
        &self,
        view: &View,
        reach: Reach,
        table_rows: Option<u64>,
        chunks: mpsc::Sender<Planned>,
        stop: &AtomicBool,
        speed: &AtomicU64,
    ) -> Result<(), JobError> {
        let mut rows = view.job.batch_size;
        let mut source = self.connect_source(&view.job).await?;
        let (mut lo, end, shared) = match reach {
            Reach::Replay { lo, to } => (lo, to, None),
            Reach::Position(shared) => {
                let (lo, end, again) = {
                    let p = shared.lock().await;
                    let load = p.load.as_ref().expect("a load in progress");
                    (load.frontier.clone(), load.end.clone(), p.reopen_chunks())
                };
                // Chunks handed out before a crash and never finished: read again first (they
                // stay open in the position until done). Their size is not known: their
                // values are kept in the planner's sight.
                for chunk in again {
                    let planned = Planned { chunk, wide: false };
                    if chunks.send(planned).await.is_err() {
                        return Ok(());
                    }
                }
                (lo, Some(end), Some(shared))
            }
        };
        let mut seq = 0;
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Cut the next chunk once a worker can take it, at the speed known by then.
            let Ok(permit) = chunks.reserve().await else {
                return Ok(());
            };
            rows = chunk_rows(view.job.batch_size, rows, speed.load(Ordering::Relaxed));
            let (hi, last) = {
                let tx = source.transaction().await.map_err(JobError::Source)?;
                source::time_limit(&tx, view.job.batch_timeout)
                    .await
                    .map_err(JobError::Source)?;
                let nth = source::nth_cursor(&tx, view, lo.as_deref(), end.as_deref(), rows)
                    .await
                    .map_err(JobError::Source)?;
                match (nth, &end) {
                    (Some(hi), _) => (hi, false),
                    // Fewer rows are left: the last chunk reaches the end of the range,
                    // whatever was deleted or moved meanwhile, so the chunks tile it and a row
                    // that commits into it later is in a chunk's snapshot or its window.
                    (None, Some(end)) if lo.as_ref() != Some(end) => (end.clone(), true),
                    (None, Some(_)) => break,
                    // A replay up to the newest row: up to the newest one now.
                    (None, None) => {
                        match source::batch_bound(&tx, view, lo.as_deref(), None, rows)
                            .await
                            .map_err(JobError::Source)?
                        {
                            Some(hi) => (hi, true),
                            None => break,
                        }
                    }
                }
            };
            let chunk = match &shared {
                Some(shared) => {
                    let mut p = shared.lock().await;
                    let chunk = p.open_chunk(lo.clone(), hi.clone());
                    p.advance_frontier(hi.clone());
                    chunk
                }
                None => {
                    seq += 1;
                    Chunk {
                        seq: seq - 1,
                        lo: lo.clone(),
                        hi: hi.clone(),
                    }
                }
            };
            permit.send(Planned {
                chunk,
                wide: range::wide(rows, table_rows),
            });
            lo = Some(hi);
            if last {
                break;
            }
        }
        if let Some(shared) = shared {
            shared.lock().await.finish_planning();
        }
        Ok(())
    }

    /// Read and write chunks until none are left (or the load stops).
    #[allow(clippy::too_many_arguments)]
    async fn work(
        &self,
        view: &View,
        chunks: Arc<Mutex<mpsc::Receiver<Planned>>>,
        done: &mpsc::Sender<Result<Applied, JobError>>,
        stop: &AtomicBool,
        speed: &AtomicU64,
        shared: Option<Arc<Mutex<Position>>>,
        limiter: Option<&Limiter>,
    ) -> Result<(), JobError> {
        let job = view.job.clone();
        let mut source = self.connect_source(&job).await?;
        let mut dwh = self.connect_worker_dwh(&job).await?;
        // Loads read ranges the target mostly holds already, or none of (a first load): no
        // split by key.
        let mut paths = Paths {
            direct: dwh.prepare_target(view).await?.copy_direct,
            split: false,
        };
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let Some(Planned { chunk, wide }) = chunks.lock().await.recv().await else {
                return Ok(());
            };
            if stop.load(Ordering::SeqCst) {
                // Stopping: the chunk stays open in the position, for the next run.
                return Ok(());
            }
            let started = std::time::Instant::now();
            let (tx, mut snap) = source::begin(&mut source).await.map_err(JobError::Source)?;
            if job.parallel > 1 {
                // Chunks of several workers commit in any order: a chunk's window must stay
                // open, whatever its own read saw (see position/load.rs), so it is not settled
                // at its read.
                snap.after = None;
            }
            hold_first_chunk(&chunk).await;
            source::time_limit(&tx, job.batch_timeout)
                .await
                .map_err(JobError::Source)?;
            let unseen = source::unseen(&tx, &snap, snap.xmin)
                .await
                .map_err(JobError::Source)?;
            let bound = Range::Cursor {
                lo: chunk.lo.as_deref(),
                hi: Some(&chunk.hi),
                wide,
            }
            .bind(view, "b");
            let advance = shared.as_deref().map(|shared| Advance::Chunk {
                shared,
                chunk: &chunk,
                snap: &snap,
                unseen: &unseen,
            });
            let result = apply(
                &tx, &mut dwh, view, &bound, advance, &mut paths, None, limiter,
            )
            .await;
            drop(tx);
            let mut applied = match result {
                Ok(a) => a,
                Err(e) => return Err(explain(&mut source, view, e, &bound).await),
            };
            if shared.is_none() {
                let window = Window::read(chunk.lo.clone(), chunk.hi.clone(), &snap, &unseen);
                applied.read = Some((chunk.seq, window));
            }
            if let Some(ns) = (started.elapsed().as_nanos() as u64).checked_div(applied.rows) {
                speed.store(ns.max(1), Ordering::Relaxed);
            }
            if done.send(Ok(applied)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Debug builds: the first chunk of a load waits `PGTIDE_HOLD_FIRST_CHUNK_MS` after taking
/// its snapshot, so tests can make chunks commit out of order.
async fn hold_first_chunk(chunk: &Chunk) {
    if !cfg!(debug_assertions) || chunk.seq != 0 {
        return;
    }
    if let Some(ms) = std::env::var("PGTIDE_HOLD_FIRST_CHUNK_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::info!(ms, "holding the first chunk of the load");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_hold_two_seconds_of_work_within_bounds() {
        // Unknown speed: the size stays.
        assert_eq!(chunk_rows(10_000, 10_000, 0), 10_000);
        // 4 µs a row: two seconds are 500,000 rows, at once.
        assert_eq!(chunk_rows(10_000, 10_000, 4_000), 500_000);
        // Slower rows shrink the next chunk.
        assert_eq!(chunk_rows(10_000, 500_000, 40_000), 50_000);
        // Fast rows stop at the cap; slow ones never go below batch_size.
        assert_eq!(chunk_rows(10_000, 800_000, 10), MAX_CHUNK_ROWS);
        assert_eq!(chunk_rows(10_000, 40_000, 1_000_000), 10_000);
        // A batch_size above the cap is kept.
        assert_eq!(chunk_rows(2_000_000, 2_000_000, 10), 2_000_000);
    }
}
