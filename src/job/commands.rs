//! The commands that act on a job besides running it: `replay`, `reset`, notify jobs'
//! `install`/`uninstall`/`sql`, and `status`'s counts of what is waiting.

use super::*;
use crate::position::Window;

/// What a command was asked that the job cannot do.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A `--from`/`--to` value the source refuses.
    #[error("{flag}: {source}")]
    Watermark {
        flag: String,
        #[source]
        source: source::WatermarkValueError,
    },
    /// `verify` compares rows by key, and this key column is not among the compared ones.
    #[error("key column {column} is not a compared column of the view")]
    KeyNotCompared { column: String },
}

impl Context {
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
        let bounds = async {
            let from = normalize(&s.source, &s.view, from, "--from").await?;
            Ok::<_, JobError>((from, normalize(&s.source, &s.view, to, "--to").await?))
        }
        .await;
        let (from, to) = match bounds {
            Ok(b) => b,
            Err(e) => {
                // Release the job's lock now: a command run right after must not find it held.
                s.close().await;
                return Err(e);
            }
        };
        let run = self.store.start_run(&job.name).await?;
        let mut load = self.start_load(
            &s.view,
            load::Reach::Replay { lo: from, to },
            s.limiter.clone(),
            s.table_rows,
        );
        let mut reads = Vec::new();
        let result = self
            .drive(
                &mut s,
                run,
                &mut Feed::Load(&mut load),
                &mut summary,
                &mut Instant::now(),
            )
            .await;
        drop(load);
        reads.append(&mut summary.reads);
        // Workers commit their chunks in any order: one may have written an old version of a
        // row after another wrote its new one (an update moved it between their ranges). Rows
        // written by what any chunk's snapshot could not see are read once more, now.
        let result = match (result, load::replay_window(reads)) {
            (Ok(true), Some(window)) if job.parallel > 1 => {
                self.reread(&mut s, window).await.map(|a| summary.add(a))
            }
            (r, _) => r.map(|_| ()),
        };
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

    /// Apply the rows of `window` that its snapshots could not see, moving no position.
    async fn reread<D: Dwh>(
        &self,
        s: &mut Session<D>,
        window: Window,
    ) -> Result<Applied, JobError> {
        let (tx, _) = source::begin(&mut s.source)
            .await
            .map_err(JobError::Source)?;
        source::time_limit(&tx, s.view.job.batch_timeout)
            .await
            .map_err(JobError::Source)?;
        let windows = [window];
        let bound = Range::Windows(&windows).bind(&s.view, "");
        let result = apply(
            &tx,
            &mut s.dwh,
            &s.view,
            &bound,
            None,
            &mut write::Paths::staged(),
            None,
            s.limiter.as_deref(),
        )
        .await;
        drop(tx);
        match result {
            Ok(a) => Ok(a),
            Err(e) => Err(s.explain(e, &bound).await),
        }
    }

    /// Set the stored watermark to `to` (the beginning when `None`), in the DWH and locally.
    pub async fn reset(
        &self,
        job: &Arc<JobSpec>,
        to: Option<Vec<String>>,
    ) -> Result<Position, JobError> {
        let mut s = self.open(job).await?;
        let to = match normalize(&s.source, &s.view, to, "--to").await {
            Ok(to) => to,
            Err(e) => {
                s.close().await;
                return Err(e);
            }
        };
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

/// A watermark value from the command line, checked and canonicalized by the source.
pub(super) async fn normalize(
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
            .map_err(|source| {
                JobError::Input(InputError::Watermark {
                    flag: flag.to_string(),
                    source,
                })
            }),
    }
}
