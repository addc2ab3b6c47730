//! One run of a job: read the position, fetch a batch, write it in one DWH transaction
//! together with the new position, then record the position locally. Repeat until caught up.
//!
//! Progress moves only after the DWH commit, and never backwards. The DWH's copy of the
//! position is the truth: a SQLite file that is lost, stale or ahead of a restored DWH is
//! overwritten from it at the start of the run.
//!
//! One batch, top to bottom: `Context::drive` (the one loop, and its bookkeeping) asks
//! `batch` for the next range past the watermark (`view::range`), and `write::apply` streams
//! its rows into the DWH (`sink::dwh`) with the position after it. `follow` holds a notify
//! job's first load and its drains, `commands` what acts on a job besides running it,
//! `summary` what a run did, and `loading` the progress of a load (begun and ended by `drive`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Client;

use crate::config::{Config, DwhKind, JobSpec, Mode};
use crate::pg::{self, PgError, Retry};
use crate::position::Position;
use crate::shutdown::{crash_point, Shutdown};
use crate::sink::dwh::{Advance, Batch, Dwh, WriteError};
pub use crate::sink::warehouse::Warehouse;
use crate::sink::{self, SinkError};
use crate::source::{self, notify};
pub use crate::state::Tally;
use crate::state::{StateError, Store};
use crate::view::range::{self, Bound, Range};
use crate::view::{self, CheckKind, View, ViewError};

mod commands;
mod follow;
mod load;
mod loading;
mod summary;
#[cfg(test)]
mod tests;
mod throttle;
mod write;

pub use commands::InputError;
pub use follow::Follower;
pub(crate) use summary::Applied;
pub use summary::RunSummary;
use throttle::Limiter;
pub(crate) use write::apply_keys;
use write::{apply, Paths};

/// How many distinct unmapped values a run names in its log and record.
const NAMED_VALUES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("is already running elsewhere (another pgtide holds its lock)")]
    Locked,
    #[error("{0}")]
    Connect(#[from] PgError),
    #[error("source: {}", pg::message(.0))]
    Source(#[source] tokio_postgres::Error),
    #[error("view: {0}")]
    View(#[from] ViewError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("its triggers are not installed in the source (or not on every table of its view): run `pgtide install` for it first")]
    NotInstalled,
    /// A value a transform cannot convert, with the row it is in.
    #[error("{0}")]
    Data(Box<source::checks::BadValue>),
    /// A value given on the command line that the job cannot use.
    #[error("{0}")]
    Input(InputError),
}

impl JobError {
    /// Whether retrying later can succeed (connection trouble, server restarts).
    pub fn retry(&self) -> Retry {
        match self {
            JobError::Connect(e) => e.retry(),
            JobError::Source(e)
            | JobError::Sink(SinkError::Db(e))
            | JobError::Sink(SinkError::Ddl { source: e, .. })
            | JobError::View(ViewError::Db(e)) => pg::classify(e),
            JobError::Sink(SinkError::ClickHouse(e)) => e.retry(),
            _ => Retry::Permanent,
        }
    }
}

/// Everything a job run needs besides the job.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub store: Store,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Fires when the daemon stops: runs end at the next batch boundary.
    pub shutdown: Shutdown,
}

/// What a run's loop (`Context::drive`) takes its steps from.
enum Feed<'a> {
    /// Batches past the watermark, each moving the position: a poll job's catch-up, a notify
    /// job's first load.
    Watermark(&'a mut Position),
    /// A notify job's events.
    Events,
    /// The chunks of a load as its workers finish them (`load.rs`).
    Load(&'a mut load::Load),
}

/// A data error of the source's COPY, turned into a message naming the row and value when
/// a JSON field explains it.
async fn explain(source: &mut Client, view: &View, e: JobError, bound: &Bound) -> JobError {
    let JobError::Source(pe) = &e else { return e };
    if pg::refusal(pe) != Some(pg::Refusal::Data) {
        return e;
    }
    match source::checks::diagnose(source, view, bound).await {
        Ok(Some(m)) => JobError::Data(m),
        Ok(None) => e,
        Err(d) => {
            tracing::debug!(job = %view.job.name, error = %d, "could not find the row behind a data error");
            e
        }
    }
}

/// Connections of one run, the DWH one holding the job's lock.
struct Session<D = Warehouse> {
    source: Client,
    dwh: D,
    view: View,
    /// How batches are written: straight into the target while it holds none of the job's
    /// keys (it was empty, with exactly the view's types), else the rows of new keys straight
    /// in and the others staged and upserted (where the target allows it), else all staged.
    paths: Paths,
    /// The job's `max_rows_per_sec`, shared by everything that reads for this run.
    limiter: Option<Arc<Limiter>>,
    /// The job's progress: whatever commits rows of a load adds them here.
    progress: Arc<crate::progress::Progress>,
    /// About how many rows the main table holds (statistics), read when the session opens:
    /// which batches are a large part of it (`range::wide`).
    table_rows: Option<u64>,
}

impl<D: Dwh> Session<D> {
    /// A data error of the source's COPY, turned into a message naming the row and value when
    /// a JSON field explains it.
    async fn explain(&mut self, e: JobError, bound: &Bound) -> JobError {
        explain(&mut self.source, &self.view, e, bound).await
    }

    /// End the session, releasing the job's lock. A broken connection has lost it already.
    async fn close(mut self) {
        if let Err(e) = self.dwh.unlock(&self.view.job.name).await {
            tracing::debug!(job = %self.view.job.name, error = %e, "unlock failed; the lock ends with the session");
        }
    }
}

impl Context {
    pub fn new(config: Arc<Config>, store: Store) -> Context {
        Context {
            config,
            store,
            metrics: Arc::default(),
            shutdown: Shutdown::never(),
        }
    }

    /// The same context, its runs stopped by `shutdown` (the daemon's).
    pub fn with_shutdown(self, shutdown: Shutdown) -> Context {
        Context { shutdown, ..self }
    }

    fn stopping(&self) -> bool {
        self.shutdown.is_shutdown()
    }

    fn application(job: &JobSpec) -> String {
        format!("pgtide:{}", job.name)
    }

    pub async fn connect_source(&self, job: &JobSpec) -> Result<Client, JobError> {
        let url = &self.config.sources[&job.source];
        Ok(pg::connect(
            url,
            &Self::application(job),
            &format!("source {}", job.source),
        )
        .await?)
    }

    /// The DWH for a run of `job`. A ClickHouse DWH holds the job's lock in a session on the
    /// job's source, which it opens here.
    pub async fn connect_dwh(&self, job: &JobSpec) -> Result<Warehouse, JobError> {
        self.warehouse(job, true).await
    }

    /// Another connection to the DWH for a worker of a run that holds the job's lock.
    async fn connect_worker_dwh(&self, job: &JobSpec) -> Result<Warehouse, JobError> {
        self.warehouse(job, false).await
    }

    async fn warehouse(&self, job: &JobSpec, locks: bool) -> Result<Warehouse, JobError> {
        match self.config.dwh.kind {
            DwhKind::Postgres => Ok(Warehouse::Postgres(self.connect_pg_dwh(job).await?)),
            DwhKind::ClickHouse => {
                let url =
                    crate::clickhouse::Url::parse(&self.config.dwh.url).map_err(SinkError::Url)?;
                let http = crate::clickhouse::Client::connect(&url)
                    .await
                    .map_err(SinkError::from)?;
                let lock = match locks {
                    true => Some(self.connect_source(job).await?),
                    false => None,
                };
                Ok(Warehouse::ClickHouse(Box::new(
                    crate::sink::clickhouse::ClickHouse::new(
                        http,
                        lock,
                        url.database().to_string(),
                    ),
                )))
            }
        }
    }

    /// The DWH's PostgreSQL session, for what only a PostgreSQL DWH does.
    pub async fn connect_pg_dwh(&self, job: &JobSpec) -> Result<Client, JobError> {
        Ok(pg::connect(&self.config.dwh.url, &Self::application(job), "dwh").await?)
    }

    /// Connect both sides, take the job's lock, resolve the view and prepare the target.
    async fn open(&self, job: &Arc<JobSpec>) -> Result<Session, JobError> {
        let mut dwh = self.connect_dwh(job).await?;
        if !dwh.lock(&job.name).await? {
            return Err(JobError::Locked);
        }
        let source = self.connect_source(job).await?;
        let view = view::resolve(&source, job).await?;
        if job.mode == Mode::Notify
            && !notify::installed(&source, &view)
                .await
                .map_err(JobError::Source)?
        {
            return Err(JobError::NotInstalled);
        }
        let target = dwh.prepare_target(&view).await?;
        let table_rows = source::table_rows(&source, &view)
            .await
            .map_err(JobError::Source)?;
        Ok(Session {
            source,
            dwh,
            view,
            paths: Paths {
                direct: target.copy_direct,
                split: target.split,
            },
            limiter: job.max_rows_per_sec.map(|r| Arc::new(Limiter::new(r))),
            progress: self.metrics.progress(&job.name),
            table_rows,
        })
    }

    /// The position to continue from: the DWH's copy wins over SQLite whenever they differ.
    async fn position<D: Dwh>(&self, s: &mut Session<D>) -> Result<Position, JobError> {
        let name = &s.view.job.name;
        let local = self.store.position(name).await?;
        let remote = s.dwh.read_position(name).await?;
        let pos = remote.clone().unwrap_or_default();
        if local.as_ref() != remote.as_ref() {
            match (&local, &remote) {
                (None, Some(r)) => {
                    tracing::warn!(job = %name, seq = r.seq, "state store has no position for this job; recovered it from the dwh")
                }
                (Some(l), Some(r)) if l.seq < r.seq => {
                    tracing::warn!(job = %name, local_seq = l.seq, dwh_seq = r.seq, "state store was behind the dwh; recovered the position from the dwh")
                }
                (Some(l), Some(r)) => {
                    tracing::warn!(job = %name, local_seq = l.seq, dwh_seq = r.seq, "state store is ahead of the dwh (was the dwh restored?); continuing from the dwh's position")
                }
                (Some(l), None) => {
                    tracing::warn!(job = %name, local_seq = l.seq, "the dwh has no position for this job (was it restored or its control table dropped?); loading from the beginning")
                }
                (None, None) => {}
            }
            self.store.overwrite(name, &pos).await?;
        }
        Ok(pos)
    }

    /// `open`, recording a failure to open as a failed run (a job held elsewhere is not one).
    async fn open_recorded(&self, job: &Arc<JobSpec>) -> Result<Session, JobError> {
        match self.open(job).await {
            Ok(s) => Ok(s),
            Err(JobError::Locked) => Err(JobError::Locked),
            Err(e) => {
                self.store
                    .failed_run(&job.name, format!("job {}: {e}", job.name))
                    .await?;
                self.metrics.run(&job.name, false);
                Err(e)
            }
        }
    }

    /// Run the job until it is caught up, recording the run in the state store.
    pub async fn run_once(&self, job: &Arc<JobSpec>) -> Result<RunSummary, JobError> {
        let mut session = self.open_recorded(job).await?;
        let run = self.store.start_run(&job.name).await?;
        let mut summary = RunSummary::default();
        let result = self.catch_up(&mut session, run, &mut summary).await;
        let error = result
            .as_ref()
            .err()
            .map(|e| format!("job {}: {e}", job.name));
        summary.report(&job.name);
        self.store
            .finish_run(run, summary.rows as i64, error, &summary.tallies)
            .await?;
        self.metrics.run(&job.name, result.is_ok());
        session.close().await;
        result.map(|()| summary)
    }

    async fn catch_up<D: Dwh>(
        &self,
        s: &mut Session<D>,
        run: i64,
        summary: &mut RunSummary,
    ) -> Result<(), JobError> {
        let job = s.view.job.clone();
        let started = Instant::now();
        let mut pos = self.position(s).await?;
        if job.mode == Mode::Notify {
            self.follow(s, run, &mut pos, summary).await?;
            tracing::info!(job = %job.name, rows = summary.rows, changed = summary.changed, deleted = summary.deleted,
                events = summary.events, ms = started.elapsed().as_millis() as u64, "caught up");
            return Ok(());
        }
        // A load under way reads its open chunks with fresh snapshots first; the windows wait
        // for the next run (they stay in the position until they settle).
        if !pos.windows.is_empty() && pos.load.is_none() {
            let (applied, dropped) = self.recheck(s, &mut pos).await?;
            let (rows, changed) = (applied.rows, applied.changed);
            summary.rechecked = rows;
            self.metrics.rechecked(&job.name, rows);
            summary.add(applied);
            tracing::debug!(job = %job.name, rows, changed, settled = dropped, open = pos.windows.len(), "rechecked windows");
        }
        if (pos.watermark.is_none() || pos.load.is_some())
            && !self.load(s, run, &mut pos, summary).await?
        {
            return Ok(());
        }
        let mut feed = Feed::Watermark(&mut pos);
        self.drive(s, run, &mut feed, summary, &mut Instant::now())
            .await?;
        tracing::info!(
            job = %job.name,
            rows = summary.rows,
            changed = summary.changed,
            rechecked = summary.rechecked,
            batches = summary.batches,
            ms = started.elapsed().as_millis() as u64,
            "caught up"
        );
        Ok(())
    }

    /// Read and apply the next batch past the watermark; `None` when there is none. The caller
    /// records the new position locally.
    async fn batch<D: Dwh>(
        &self,
        s: &mut Session<D>,
        pos: &mut Position,
        merge: bool,
        rows: i64,
    ) -> Result<Option<Applied>, JobError> {
        let (tx, snap) = source::begin(&mut s.source)
            .await
            .map_err(JobError::Source)?;
        source::time_limit(&tx, s.view.job.batch_timeout)
            .await
            .map_err(JobError::Source)?;
        let lo = pos.watermark.clone();
        let hi = source::batch_bound(&tx, &s.view, lo.as_deref(), None, rows)
            .await
            .map_err(JobError::Source)?;
        let Some(hi) = hi else { return Ok(None) };
        let unseen = source::unseen(&tx, &snap, snap.xmin)
            .await
            .map_err(JobError::Source)?;
        let bound = Range::Cursor {
            lo: lo.as_deref(),
            hi: Some(&hi),
            wide: range::wide(rows, s.table_rows),
        }
        .bind(&s.view, "b");
        let mut next = pos.clone();
        next.advance(hi, &snap, &unseen, merge);
        let result = apply(
            &tx,
            &mut s.dwh,
            &s.view,
            &bound,
            Some(Advance::To(&next)),
            &mut s.paths,
            None,
            s.limiter.as_deref(),
        )
        .await;
        drop(tx);
        match result {
            Ok(applied) => {
                *pos = next;
                Ok(Some(applied))
            }
            Err(e) => Err(s.explain(e, &bound).await),
        }
    }

    /// Apply `feed` step by step until it runs dry (`true`) or the run is stopping (`false`),
    /// doing each step's bookkeeping here and only here: metrics, the run's summary, and the
    /// state store (the position after every batch that moved it; the run's row count at
    /// most once a second otherwise, since `last_progress`: no disk sync per drain), and the
    /// progress of a load (`loading`).
    async fn drive<D: Dwh>(
        &self,
        s: &mut Session<D>,
        run: i64,
        feed: &mut Feed<'_>,
        summary: &mut RunSummary,
        last_progress: &mut Instant,
    ) -> Result<bool, JobError> {
        let job = s.view.job.clone();
        let load = self.begin_load(s, run, feed).await?;
        // Batches past the watermark grow as a load's chunks do: few commits for a catch-up
        // of many rows, `batch_size` for a run that finds few.
        let mut rows = job.batch_size;
        let done = loop {
            if self.stopping() {
                match feed {
                    Feed::Load(load) if !load.stopped() => {
                        tracing::info!(job = %job.name, "stopping: finishing the chunks being written");
                        load.stop();
                    }
                    Feed::Load(_) => {}
                    _ => {
                        tracing::info!(job = %job.name, "stopping at a batch boundary");
                        break false;
                    }
                }
            }
            let t = Instant::now();
            let step = match feed {
                Feed::Watermark(pos) => {
                    let merge = summary.batches > 0;
                    let step = self.batch(s, pos, merge, rows).await?;
                    if let Some(a) = &step {
                        let ns = (t.elapsed().as_nanos() as u64).checked_div(a.rows);
                        rows = load::chunk_rows(job.batch_size, rows, ns.unwrap_or(0));
                    }
                    step.map(|a| (a, 0))
                }
                Feed::Events => self.drain(s).await?.map(|(n, a)| (a, n as u64)),
                Feed::Load(load) => {
                    let chunk = load.next().await?;
                    // The workers write; the session holding the job's lock waits meanwhile.
                    s.dwh.check_lock().await?;
                    chunk.map(|a| (a, 0))
                }
            };
            let Some((applied, events)) = step else {
                break true;
            };
            let (rows, changed) = (applied.rows, applied.changed);
            let stored = applied.stored.clone();
            self.metrics.rows(&job.name, rows);
            self.metrics.batch(&job.name, t.elapsed().as_secs_f64());
            summary.events += events;
            summary.add(applied);
            summary.batches += 1;
            s.progress.add(rows);
            match (&mut *feed, stored) {
                (Feed::Watermark(pos), _) => {
                    self.store
                        .advance_run(&job.name, pos, run, summary.rows as i64)
                        .await?;
                }
                (Feed::Load(_), Some(pos)) => {
                    self.store
                        .advance_run(&job.name, &pos, run, summary.rows as i64)
                        .await?;
                }
                _ if last_progress.elapsed() >= std::time::Duration::from_secs(1) => {
                    self.store.progress_run(run, summary.rows as i64).await?;
                    *last_progress = Instant::now();
                }
                _ => {}
            }
            tracing::debug!(job = %job.name, rows, changed, events, ms = t.elapsed().as_millis() as u64, "batch committed");
        };
        self.end_load(load, run).await?;
        Ok(done && !matches!(feed, Feed::Load(load) if load.stopped()))
    }

    /// Load the rows of a position that starts from the beginning (or has a load under way)
    /// with the job's workers: returns `false` when the run is stopping. The position leaves
    /// with the load done, its chunks' windows kept.
    async fn load<D: Dwh>(
        &self,
        s: &mut Session<D>,
        run: i64,
        pos: &mut Position,
        summary: &mut RunSummary,
    ) -> Result<bool, JobError> {
        let name = s.view.job.name.clone();
        if pos.load.is_none() {
            let end = source::last_cursor(&s.source, &s.view, pos.watermark.as_deref())
                .await
                .map_err(JobError::Source)?;
            let Some(end) = end else { return Ok(true) };
            pos.begin_load(end);
            s.dwh.store_position(&name, pos).await?;
            self.store.advance(&name, pos).await?;
        }
        let shared = Arc::new(tokio::sync::Mutex::new(pos.clone()));
        let mut load = self.start_load(
            &s.view,
            load::Reach::Position(shared.clone()),
            s.limiter.clone(),
            s.table_rows,
        );
        let finished = self
            .drive(
                s,
                run,
                &mut Feed::Load(&mut load),
                summary,
                &mut Instant::now(),
            )
            .await;
        drop(load);
        let latest = shared.lock().await.clone();
        finished?;
        // Planning may have ended after the last chunk was stored, completing the load.
        let stored = self.store.position(&name).await?.map_or(0, |p| p.seq);
        if latest.seq > stored {
            s.dwh.store_position(&name, &latest).await?;
            self.store.advance(&name, &latest).await?;
        }
        *pos = latest;
        Ok(pos.load.is_none())
    }

    /// Re-read rows of open windows written by transactions the windows' snapshots could not
    /// see, then close the windows that this snapshot settles.
    /// Returns what was applied and how many windows closed.
    async fn recheck<D: Dwh>(
        &self,
        s: &mut Session<D>,
        pos: &mut Position,
    ) -> Result<(Applied, usize), JobError> {
        let horizon = source::horizon(&s.source).await.map_err(JobError::Source)?;
        let (tx, snap) = source::begin(&mut s.source)
            .await
            .map_err(JobError::Source)?;
        let bound = Range::Windows(&pos.windows).bind(&s.view, "");
        let unseen = source::unseen(&tx, &snap, pos.lowest_floor().unwrap_or(snap.xmin))
            .await
            .map_err(JobError::Source)?;
        let mut next = pos.clone();
        let settled = next.settle(&snap, &horizon, &unseen);
        let position = settled.changed.then_some(Advance::To(&next));
        let result = apply(
            &tx,
            &mut s.dwh,
            &s.view,
            &bound,
            position,
            &mut Paths::staged(),
            None,
            s.limiter.as_deref(),
        )
        .await;
        drop(tx);
        let applied = match result {
            Ok(a) => a,
            Err(e) => return Err(s.explain(e, &bound).await),
        };
        if settled.changed {
            *pos = next;
            self.store.advance(&s.view.job.name, pos).await?;
        }
        Ok((applied, settled.closed))
    }
}
