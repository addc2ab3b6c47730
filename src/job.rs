//! One run of a job: read the position, fetch a batch, write it in one DWH transaction
//! together with the new position, then record the position locally. Repeat until caught up.
//!
//! Progress moves only after the DWH commit, and never backwards. The DWH's copy of the
//! position is the truth: a SQLite file that is lost, stale or ahead of a restored DWH is
//! overwritten from it at the start of the run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Client;

use crate::config::{Config, JobSpec, Mode};
use crate::pg::{self, PgError, Retry};
use crate::position::Position;
use crate::shutdown::Shutdown;
use crate::sink::dwh::{Batch, Dwh, WriteError};
use crate::sink::{self, SinkError};
use crate::source::{self, notify};
pub use crate::state::Tally;
use crate::state::{StateError, Store};
use crate::view::range::{Bound, Range};
use crate::view::{self, CheckKind, View, ViewError};

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
    Data(String),
    /// A value given on the command line that the job cannot use.
    #[error("{0}")]
    Input(String),
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
            _ => Retry::Permanent,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// View rows read from the source and applied.
    pub rows: u64,
    /// Rows the DWH inserted or changed (unchanged rows are not rewritten).
    pub changed: u64,
    pub batches: u64,
    /// Rows re-read by rechecking open windows (included in `rows`).
    pub rechecked: u64,
    /// Notify jobs: events taken from the event table.
    pub events: u64,
    /// Notify jobs: target rows deleted or marked deleted.
    pub deleted: u64,
    /// Per column, values that transforms turned into NULL.
    pub tallies: BTreeMap<String, Tally>,
}

/// What one batch (or one recheck, or one drain) applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Applied {
    rows: u64,
    changed: u64,
    /// Target rows deleted or marked deleted (notify jobs).
    deleted: u64,
    tallies: BTreeMap<String, Tally>,
}

impl RunSummary {
    fn add(&mut self, a: Applied) {
        self.rows += a.rows;
        self.changed += a.changed;
        self.deleted += a.deleted;
        for (column, t) in a.tallies {
            let mine = self.tallies.entry(column).or_default();
            mine.unmapped += t.unmapped;
            mine.nulled += t.nulled;
            for v in t.values {
                if mine.values.len() < NAMED_VALUES && !mine.values.contains(&v) {
                    mine.values.push(v);
                }
            }
        }
    }

    /// Log what transforms turned into NULL in this run, naming a few values.
    fn report(&self, job: &str) {
        for (column, t) in &self.tallies {
            if t.unmapped > 0 {
                tracing::warn!(job, column = %column, count = t.unmapped, values = ?t.values, "values missing from the map were written as NULL");
            }
            if t.nulled > 0 {
                tracing::warn!(job, column = %column, count = t.nulled, "JSON values that could not be read or cast were written as NULL");
            }
        }
    }
}

/// A notify job followed by the daemon: its session (and the job's lock) stays open between
/// drains, so a drain costs only its own statements.
pub struct Follower {
    ctx: Context,
    session: Session,
    run: i64,
    pub summary: RunSummary,
    last_progress: Instant,
}

impl Follower {
    pub fn job(&self) -> &Arc<JobSpec> {
        &self.session.view.job
    }

    /// Apply every waiting event; returns how many were taken.
    pub async fn drain_all(&mut self) -> Result<u64, JobError> {
        let before = self.summary.events;
        let mut feed = Feed::Events;
        self.ctx
            .drive(
                &mut self.session,
                self.run,
                &mut feed,
                &mut self.summary,
                &mut self.last_progress,
            )
            .await?;
        self.ctx.metrics.fresh(&self.session.view.job.name);
        Ok(self.summary.events - before)
    }

    /// Record the end of the follow (and why, if it failed) and release the job's lock.
    pub async fn finish(self, error: Option<&JobError>) {
        let name = self.session.view.job.name.clone();
        let error = error.map(|e| format!("job {name}: {e}"));
        self.summary.report(&name);
        if let Err(e) = self
            .ctx
            .store
            .finish_run(
                self.run,
                self.summary.rows as i64,
                error,
                &self.summary.tallies,
            )
            .await
        {
            tracing::warn!(job = %name, error = %e, "cannot record the end of the run");
        }
        self.session.close().await;
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
    /// Batches of `(lo, to]` that leave the position alone (`replay`).
    Replay {
        lo: Option<Vec<String>>,
        to: Option<Vec<String>>,
    },
}

/// Connections of one run, the DWH one holding the job's lock.
struct Session {
    source: Client,
    dwh: Client,
    view: View,
    /// Copy batches straight into the target (it was empty with exactly the view's types)
    /// until a key turns out to exist already; then stage and upsert.
    copy_direct: bool,
}

impl Session {
    /// A data error of the source's COPY, turned into a message naming the row and value when
    /// a JSON field explains it.
    async fn explain(&mut self, e: JobError, bound: &Bound) -> JobError {
        let JobError::Source(pe) = &e else { return e };
        if !pe.code().is_some_and(|c| c.code().starts_with("22")) {
            return e;
        }
        match source::checks::diagnose(&mut self.source, &self.view, bound).await {
            Ok(Some(m)) => JobError::Data(m),
            Ok(None) => e,
            Err(d) => {
                tracing::debug!(job = %self.view.job.name, error = %d, "could not find the row behind a data error");
                e
            }
        }
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

    pub async fn connect_dwh(&self, job: &JobSpec) -> Result<Client, JobError> {
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
        Ok(Session {
            source,
            dwh,
            view,
            copy_direct: target.copy_direct,
        })
    }

    /// The position to continue from: the DWH's copy wins over SQLite whenever they differ.
    async fn position(&self, s: &mut Session) -> Result<Position, JobError> {
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

    /// Start following a notify job: take its lock, load what existed before its triggers,
    /// and apply the events waiting. The run stays `running` until `Follower::finish`.
    pub async fn follower(&self, job: &Arc<JobSpec>) -> Result<Follower, JobError> {
        let mut session = self.open_recorded(job).await?;
        let run = self.store.start_run(&job.name).await?;
        let mut summary = RunSummary::default();
        let caught_up = async {
            let mut pos = self.position(&mut session).await?;
            self.follow(&mut session, run, &mut pos, &mut summary).await
        }
        .await;
        let follower = Follower {
            ctx: self.clone(),
            session,
            run,
            summary,
            last_progress: Instant::now(),
        };
        match caught_up {
            Ok(()) => Ok(follower),
            Err(e) => {
                follower.finish(Some(&e)).await;
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

    async fn catch_up(
        &self,
        s: &mut Session,
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
        if !pos.windows.is_empty() {
            let (applied, dropped) = self.recheck(s, &mut pos).await?;
            let (rows, changed) = (applied.rows, applied.changed);
            summary.rechecked = rows;
            self.metrics.rechecked(&job.name, rows);
            summary.add(applied);
            tracing::debug!(job = %job.name, rows, changed, settled = dropped, open = pos.windows.len(), "rechecked windows");
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
    async fn batch(
        &self,
        s: &mut Session,
        pos: &mut Position,
        merge: bool,
    ) -> Result<Option<Applied>, JobError> {
        let (tx, snap) = source::begin(&mut s.source)
            .await
            .map_err(JobError::Source)?;
        let lo = pos.watermark.clone();
        let hi = source::batch_bound(&tx, &s.view, lo.as_deref(), None, s.view.job.batch_size)
            .await
            .map_err(JobError::Source)?;
        let Some(hi) = hi else { return Ok(None) };
        let unseen = source::unseen(&tx, &snap, snap.xmin)
            .await
            .map_err(JobError::Source)?;
        let bound = Range::Cursor {
            lo: lo.as_deref(),
            hi: Some(&hi),
        }
        .bind(&s.view, "b");
        let mut next = pos.clone();
        next.advance(hi, &snap, &unseen, merge);
        let result = apply(
            &tx,
            &mut s.dwh,
            &s.view,
            &bound,
            Some(&next),
            &mut s.copy_direct,
            None,
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

    /// Read and apply the next batch of `(lo, to]` without touching the position; returns what
    /// was applied and the batch's last cursor value, `None` when no rows remain.
    async fn replay_batch(
        &self,
        s: &mut Session,
        lo: Option<&[String]>,
        to: Option<&[String]>,
    ) -> Result<Option<(Applied, Vec<String>)>, JobError> {
        let (tx, _) = source::begin(&mut s.source)
            .await
            .map_err(JobError::Source)?;
        let hi = source::batch_bound(&tx, &s.view, lo, to, s.view.job.batch_size)
            .await
            .map_err(JobError::Source)?;
        let Some(hi) = hi else { return Ok(None) };
        let bound = Range::Cursor { lo, hi: Some(&hi) }.bind(&s.view, "b");
        let mut direct = false;
        let result = apply(&tx, &mut s.dwh, &s.view, &bound, None, &mut direct, None).await;
        drop(tx);
        match result {
            Ok(applied) => Ok(Some((applied, hi))),
            Err(e) => Err(s.explain(e, &bound).await),
        }
    }

    /// A notify job's run: load the rows that existed before its triggers (once, by
    /// watermark), then apply its events until none are left.
    async fn follow(
        &self,
        s: &mut Session,
        run: i64,
        pos: &mut Position,
        summary: &mut RunSummary,
    ) -> Result<(), JobError> {
        let job = s.view.job.clone();
        if !pos.initial_done {
            let mut feed = Feed::Watermark(pos);
            if !self
                .drive(s, run, &mut feed, summary, &mut Instant::now())
                .await?
            {
                return Ok(());
            }
            pos.finish_initial_load();
            s.dwh.store_position(&job.name, pos).await?;
            self.store.advance(&job.name, pos).await?;
            tracing::info!(job = %job.name, rows = summary.rows, "loaded the existing rows; following events from here");
        }
        self.drive(s, run, &mut Feed::Events, summary, &mut Instant::now())
            .await?;
        Ok(())
    }

    /// Apply `feed` step by step until it runs dry (`true`) or the run is stopping (`false`),
    /// doing each step's bookkeeping here and only here: metrics, the run's summary, and the
    /// state store (the position after every batch that moved it; the run's row count at
    /// most once a second otherwise, since `last_progress`: no disk sync per drain).
    async fn drive(
        &self,
        s: &mut Session,
        run: i64,
        feed: &mut Feed<'_>,
        summary: &mut RunSummary,
        last_progress: &mut Instant,
    ) -> Result<bool, JobError> {
        let job = s.view.job.clone();
        loop {
            if self.stopping() {
                tracing::info!(job = %job.name, "stopping at a batch boundary");
                return Ok(false);
            }
            let t = Instant::now();
            let step = match feed {
                Feed::Watermark(pos) => {
                    let merge = summary.batches > 0;
                    self.batch(s, pos, merge).await?.map(|a| (a, 0))
                }
                Feed::Events => self.drain(s).await?.map(|(n, a)| (a, n as u64)),
                Feed::Replay { lo, to } => {
                    match self.replay_batch(s, lo.as_deref(), to.as_deref()).await? {
                        Some((a, hi)) => {
                            *lo = Some(hi);
                            Some((a, 0))
                        }
                        None => None,
                    }
                }
            };
            let Some((applied, events)) = step else {
                break;
            };
            let (rows, changed) = (applied.rows, applied.changed);
            self.metrics.rows(&job.name, rows);
            self.metrics.batch(&job.name, t.elapsed().as_secs_f64());
            summary.events += events;
            summary.add(applied);
            summary.batches += 1;
            match feed {
                Feed::Watermark(pos) => {
                    self.store
                        .advance_run(&job.name, pos, run, summary.rows as i64)
                        .await?;
                }
                _ if last_progress.elapsed() >= std::time::Duration::from_secs(1) => {
                    self.store.progress_run(run, summary.rows as i64).await?;
                    *last_progress = Instant::now();
                }
                _ => {}
            }
            tracing::debug!(job = %job.name, rows, changed, events, ms = t.elapsed().as_millis() as u64, "batch committed");
        }
        Ok(true)
    }

    /// Take one batch of events, re-read the current view rows they point to, apply them (and
    /// the rows that are gone) in one DWH transaction, and only then remove the events. `None`
    /// when no event was waiting.
    async fn drain(&self, s: &mut Session) -> Result<Option<(usize, Applied)>, JobError> {
        let tx = s.source.transaction().await.map_err(JobError::Source)?;
        let changes = notify::take(&tx, &s.view, s.view.job.batch_size)
            .await
            .map_err(JobError::Source)?;
        if changes.events == 0 {
            return Ok(None);
        }
        let mut no_direct = false;
        let result = if changes.truncated {
            apply(
                &tx,
                &mut s.dwh,
                &s.view,
                &Range::All.bind(&s.view, ""),
                None,
                &mut no_direct,
                Some(sink::Missing::All),
            )
            .await
        } else {
            let keys = affected_keys(&tx, &s.view, &changes).await?;
            if keys.is_empty() {
                tx.commit().await.map_err(JobError::Source)?;
                return Ok(Some((changes.events, Applied::default())));
            }
            let bound = Range::Keys(&keys).bind(&s.view, "n");
            let result = apply(
                &tx,
                &mut s.dwh,
                &s.view,
                &bound,
                None,
                &mut no_direct,
                Some(sink::Missing::Keys(&keys)),
            )
            .await;
            match result {
                Ok(a) => Ok(a),
                Err(e) => {
                    drop(tx);
                    return Err(s.explain(e, &bound).await);
                }
            }
        };
        let applied = result?;
        crash_point("PGTIDE_CRASH_BETWEEN_COMMITS");
        tx.commit().await.map_err(JobError::Source)?;
        Ok(Some((changes.events, applied)))
    }

    /// Re-read rows of open windows written by transactions the windows' snapshots could not
    /// see, then close the windows that this snapshot settles.
    /// Returns what was applied and how many windows closed.
    async fn recheck(
        &self,
        s: &mut Session,
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
        let mut direct = false;
        let position = settled.changed.then_some(&next);
        let result = apply(
            &tx,
            &mut s.dwh,
            &s.view,
            &bound,
            position,
            &mut direct,
            None,
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

    /// Reload the view rows whose cursor lies in `(from, to]`, leaving the position alone.
    /// With `dry_run`, only count the main-table rows that would be read.
    pub async fn replay(
        &self,
        job: &Arc<JobSpec>,
        from: Option<Vec<String>>,
        to: Option<Vec<String>>,
        dry_run: bool,
    ) -> Result<RunSummary, JobError> {
        let mut summary = RunSummary::default();
        if dry_run {
            // Only the source is asked: a dry run changes nothing anywhere.
            let source = self.connect_source(job).await?;
            let view = view::resolve(&source, job).await?;
            let from = normalize(&source, &view, from, "--from").await?;
            let to = normalize(&source, &view, to, "--to").await?;
            summary.rows = source::count(&source, &view, from.as_deref(), to.as_deref())
                .await
                .map_err(JobError::Source)? as u64;
            return Ok(summary);
        }
        let mut s = self.open(job).await?;
        let from = normalize(&s.source, &s.view, from, "--from").await?;
        let to = normalize(&s.source, &s.view, to, "--to").await?;
        let run = self.store.start_run(&job.name).await?;
        let mut feed = Feed::Replay { lo: from, to };
        let result = self
            .drive(&mut s, run, &mut feed, &mut summary, &mut Instant::now())
            .await
            .map(|_| ());
        let error = result
            .as_ref()
            .err()
            .map(|e: &JobError| format!("job {} (replay): {e}", job.name));
        summary.report(&job.name);
        self.store
            .finish_run(run, summary.rows as i64, error, &summary.tallies)
            .await?;
        s.close().await;
        result.map(|()| summary)
    }

    /// Set the stored watermark to `to` (the beginning when `None`), in the DWH and locally.
    pub async fn reset(
        &self,
        job: &Arc<JobSpec>,
        to: Option<Vec<String>>,
    ) -> Result<Position, JobError> {
        let mut s = self.open(job).await?;
        let to = normalize(&s.source, &s.view, to, "--to").await?;
        let local = self.store.position(&job.name).await?.map_or(0, |p| p.seq);
        let remote = s.dwh.read_position(&job.name).await?.map_or(0, |p| p.seq);
        let pos = Position::reset(to, local.max(remote));
        s.dwh.store_position(&job.name, &pos).await?;
        self.store.overwrite(&job.name, &pos).await?;
        s.close().await;
        Ok(pos)
    }

    /// Resolve a notify job's view on its source.
    async fn source_view(&self, job: &Arc<JobSpec>) -> Result<(Client, View), JobError> {
        let source = self.connect_source(job).await?;
        let view = view::resolve(&source, job).await?;
        Ok((source, view))
    }

    /// The DDL `install` runs for a notify job.
    pub async fn install_sql(&self, job: &Arc<JobSpec>) -> Result<String, JobError> {
        let (_, view) = self.source_view(job).await?;
        Ok(notify::install_sql(&view))
    }

    /// Create (or replace) the job's event table and triggers in the source.
    pub async fn install(&self, job: &Arc<JobSpec>) -> Result<(), JobError> {
        let (mut source, view) = self.source_view(job).await?;
        notify::install(&mut source, &view)
            .await
            .map_err(JobError::Source)
    }

    /// Drop the job's event table and triggers from the source.
    pub async fn uninstall(&self, job: &Arc<JobSpec>) -> Result<(), JobError> {
        let mut source = self.connect_source(job).await?;
        notify::uninstall(&mut source, &job.name)
            .await
            .map_err(JobError::Source)
    }

    /// Events waiting for a notify job, and the age of the oldest in seconds.
    pub async fn events_waiting(&self, job: &Arc<JobSpec>) -> Result<(i64, Option<f64>), JobError> {
        let source = self.connect_source(job).await?;
        notify::waiting(&source, &job.name)
            .await
            .map_err(JobError::Source)
    }

    /// Source rows past the stored watermark, for `status`.
    pub async fn waiting(
        &self,
        job: &Arc<JobSpec>,
        pos: Option<&Position>,
    ) -> Result<i64, JobError> {
        let source = self.connect_source(job).await?;
        let view = view::resolve(&source, job).await?;
        let wm = pos.and_then(|p| p.watermark.clone());
        source::count(&source, &view, wm.as_deref(), None)
            .await
            .map_err(JobError::Source)
    }
}

/// The main-table keys behind a batch of events: recorded directly for the main table, found
/// through the join for joined tables. Rows without a key (NULLs) cannot be in the target.
async fn affected_keys(
    tx: &tokio_postgres::Transaction<'_>,
    view: &View,
    changes: &notify::Changes,
) -> Result<Vec<Vec<String>>, JobError> {
    let mut keys: std::collections::BTreeSet<Vec<String>> = changes.values[0]
        .iter()
        .filter_map(|v| v.iter().cloned().collect::<Option<Vec<String>>>())
        .collect();
    for (table, values) in changes.values.iter().enumerate().skip(1) {
        if values.is_empty() {
            continue;
        }
        let width = view.captured[table].columns.len();
        let columns: Vec<Vec<Option<String>>> = (0..width)
            .map(|i| values.iter().map(|v| v.get(i).cloned().flatten()).collect())
            .collect();
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = columns
            .iter()
            .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = tx
            .query(view::sql::affected_keys(view, table).as_str(), &params)
            .await
            .map_err(JobError::Source)?;
        for r in rows {
            let key: Option<Vec<String>> = (0..view.captured[0].columns.len())
                .map(|i| r.get(i))
                .collect();
            keys.extend(key);
        }
    }
    Ok(keys.into_iter().collect())
}

/// A crash on purpose, for tests of what a crash at this point leaves behind (debug builds).
fn crash_point(name: &str) {
    if cfg!(debug_assertions) && std::env::var_os(name).is_some() {
        eprintln!("pgtide: {name} is set: aborting here");
        std::process::abort();
    }
}

/// A watermark value from the command line, checked and canonicalized by the source.
async fn normalize(
    source: &Client,
    view: &View,
    v: Option<Vec<String>>,
    flag: &str,
) -> Result<Option<Vec<String>>, JobError> {
    match v {
        None => Ok(None),
        Some(v) => source::normalize(source, view, &v)
            .await
            .map(Some)
            .map_err(|m| JobError::Input(format!("{flag}: {m}"))),
    }
}

/// Apply the view rows of `bound`: straight into the target while `direct` holds, else (and
/// from the first key found in the target on) through the staging table.
async fn apply(
    source_tx: &tokio_postgres::Transaction<'_>,
    dwh: &mut Client,
    view: &View,
    bound: &Bound,
    position: Option<&Position>,
    direct: &mut bool,
    missing: Option<sink::Missing<'_>>,
) -> Result<Applied, JobError> {
    if *direct && missing.is_none() {
        if let Some(done) = transfer(source_tx, dwh, view, bound, position, true, None).await? {
            return Ok(done);
        }
        // A key already in the target: this batch (same snapshot) and all that follow stage.
        *direct = false;
    }
    let done = transfer(source_tx, dwh, view, bound, position, false, missing).await?;
    Ok(done.expect("only direct copies meet existing keys"))
}

/// Stream the view rows of `bound` from the source transaction into the DWH and apply them,
/// writing `position` in the same DWH transaction.
///
/// `direct` copies straight into the target, which only works while no key exists there
/// yet; a key that does ends the attempt with `Ok(None)` and nothing written, so the caller
/// can stage the batch instead.
#[allow(clippy::too_many_arguments)]
async fn transfer(
    source_tx: &tokio_postgres::Transaction<'_>,
    dwh: &mut Client,
    view: &View,
    bound: &Bound,
    position: Option<&Position>,
    direct: bool,
    missing: Option<sink::Missing<'_>>,
) -> Result<Option<Applied>, JobError> {
    source::set_settings(source_tx, view, bound.settings.clone())
        .await
        .map_err(JobError::Source)?;
    let stats = source::checks::stats(source_tx, view, bound)
        .await
        .map_err(JobError::Source)?;
    let out = source::copy_out(source_tx, view, bound)
        .await
        .map_err(JobError::Source)?;
    let batch = Batch {
        direct,
        missing,
        position,
    };
    let written = match dwh.write(view, out, batch).await {
        Ok(w) => w,
        Err(WriteError::KeyExists) => {
            tracing::info!(job = %view.job.name, "a key is in the target already; staging and upserting from here on");
            return Ok(None);
        }
        Err(WriteError::Rows(e)) => return Err(JobError::Source(e)),
        Err(WriteError::Sink(e)) => return Err(JobError::Sink(e)),
    };
    let mut applied = Applied {
        rows: written.rows,
        changed: written.changed,
        deleted: written.deleted,
        ..Applied::default()
    };
    for (check, stat) in view.checks.iter().zip(stats) {
        if stat.nulled == 0 {
            continue;
        }
        let t = applied.tallies.entry(check.column.clone()).or_default();
        match check.kind {
            CheckKind::Unmapped { .. } => {
                t.unmapped += stat.nulled;
                t.values = stat.values;
            }
            CheckKind::Json { .. } => t.nulled += stat.nulled,
        }
    }
    for (column, n) in written.nulled {
        if n > 0 {
            applied.tallies.entry(column).or_default().nulled += n;
        }
    }
    Ok(Some(applied))
}

/// `verify --repair`: apply the current view rows of the main-table keys `keys` (values as text,
/// one per column of `view.captured[0]`), and with `gone` (whole keys as text, in `key` order)
/// the job's `on_delete` to the target rows of those keys that the view no longer has: the
/// path a notify drain takes, so a repair writes exactly what the job would.
pub(crate) async fn apply_keys(
    source_tx: &tokio_postgres::Transaction<'_>,
    dwh: &mut Client,
    view: &View,
    keys: &[Vec<String>],
    gone: Option<&[Vec<String>]>,
) -> Result<RunSummary, JobError> {
    let mut no_direct = false;
    let applied = apply(
        source_tx,
        dwh,
        view,
        &Range::Keys(keys).bind(view, "n"),
        None,
        &mut no_direct,
        gone.map(sink::Missing::Keys),
    )
    .await?;
    let mut summary = RunSummary::default();
    summary.add(applied);
    Ok(summary)
}
