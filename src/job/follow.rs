//! A notify job followed: its first load by watermark, then its events drained, each drain
//! re-reading the current view rows of the keys its events name.

use super::*;

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

impl Context {
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

    /// A notify job's run: load the rows that existed before its triggers (once, by
    /// watermark), then apply its events until none are left.
    pub(super) async fn follow<D: Dwh>(
        &self,
        s: &mut Session<D>,
        run: i64,
        pos: &mut Position,
        summary: &mut RunSummary,
    ) -> Result<(), JobError> {
        let job = s.view.job.clone();
        if !pos.initial_done {
            // Rows written after the load began have events: the triggers came first.
            if !self.load(s, run, pos, summary).await? {
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

    /// Take one batch of events, re-read the current view rows they point to, apply them (and
    /// the rows that are gone) in one DWH transaction, and only then remove the events. `None`
    /// when no event was waiting.
    pub(super) async fn drain<D: Dwh>(
        &self,
        s: &mut Session<D>,
    ) -> Result<Option<(usize, Applied)>, JobError> {
        let tx = s.source.transaction().await.map_err(JobError::Source)?;
        let changes = notify::take(&tx, &s.view, s.view.job.batch_size)
            .await
            .map_err(JobError::Source)?;
        if changes.events == 0 {
            return Ok(None);
        }
        let mut staged = Paths::staged();
        let result = if changes.truncated {
            apply(
                &tx,
                &mut s.dwh,
                &s.view,
                &Range::All.bind(&s.view, ""),
                None,
                &mut staged,
                Some(sink::Missing::All),
                s.limiter.as_deref(),
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
                &mut staged,
                Some(sink::Missing::Keys(&keys)),
                s.limiter.as_deref(),
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
}

/// The main-table keys behind a batch of events: recorded directly for the main table, found
/// through the join for joined tables. Rows without a key (NULLs) cannot be in the target.
pub(super) async fn affected_keys(
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
