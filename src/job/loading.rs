//! A load's progress, begun and ended around `Context::drive`: the rows it reads estimated on
//! the source, recorded on the run for `status`, and counted by the job's shared `Progress`
//! (which the drive loop, or any worker committing part of the load, adds committed rows to).

use super::*;
use crate::progress::Progress;

/// The load in hand. Its `Progress` ends when this is dropped, however the load ended; the
/// run's record ends with `end_load` (or with the run).
pub(super) struct LoadProgress(Arc<Progress>);

impl Drop for LoadProgress {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl Context {
    /// Begin the progress of `feed` if it is a load: batches past the watermark (from the
    /// beginning, or past a stored watermark) or a replay's range. A notify job's events are
    /// not one (`None`). An estimate that fails leaves the total unknown, never the load.
    pub(super) async fn begin_load<D: Dwh>(
        &self,
        s: &Session<D>,
        run: i64,
        feed: &Feed<'_>,
    ) -> Result<Option<LoadProgress>, JobError> {
        let (lo, hi) = match feed {
            Feed::Watermark(pos) => (pos.watermark.as_deref(), None),
            Feed::Load(load) => (load.lo.as_deref(), load.hi.as_deref()),
            Feed::Events => return Ok(None),
        };
        let total = match source::estimate(&s.source, &s.view, lo, hi).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(job = %s.view.job.name, error = %pg::message(&e), "cannot estimate the rows of the load");
                None
            }
        };
        self.store.begin_load(run, total).await?;
        s.progress.begin(total);
        Ok(Some(LoadProgress(s.progress.clone())))
    }

    /// End the progress of the load begun by `begin_load`.
    pub(super) async fn end_load(
        &self,
        load: Option<LoadProgress>,
        run: i64,
    ) -> Result<(), JobError> {
        if let Some(load) = load {
            drop(load);
            self.store.end_load(run).await?;
        }
        Ok(())
    }
}
