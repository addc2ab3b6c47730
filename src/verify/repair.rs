//! `--repair`: the rows that still differ, rewritten through the job's own write path (the
//! caller holds the job's lock).

use tokio_postgres::Client;

use crate::config::{ColumnKind, Mode, OnDelete};
use crate::job;
use crate::source;
use crate::view::View;

use super::error::{src, VerifyError};
use super::plan::Plan;

/// `--repair`: rewrites what differs through the job's own write path.
pub(super) struct Repair {
    /// Positions in `key` of the main-table key columns the view's rows are read by.
    by: Vec<usize>,
    pub(super) written: u64,
    pub(super) deleted: u64,
}

impl Repair {
    pub(super) fn new(view: &View) -> Repair {
        let job = &view.job;
        // The key columns `view.captured[0]` records, in its order.
        let by = job
            .key
            .iter()
            .enumerate()
            .filter(|(_, k)| {
                job.columns.iter().any(|c| {
                    &c.name == *k
                        && matches!(&c.kind, ColumnKind::Direct(r) if r.alias == job.from.alias)
                })
            })
            .map(|(i, _)| i)
            .collect();
        Repair {
            by,
            written: 0,
            deleted: 0,
        }
    }

    /// Rewrite the view rows of `write` (missing or different), and apply the job's
    /// `on_delete` to `gone` (extra).
    pub(super) async fn fix(
        &mut self,
        plan: &Plan,
        source: &mut Client,
        dwh: &mut Client,
        write: Vec<Vec<String>>,
        gone: Vec<Vec<String>>,
    ) -> Result<(), VerifyError> {
        if write.is_empty() && gone.is_empty() {
            return Ok(());
        }
        if self.by.is_empty() || self.by.len() != plan.view.captured[0].columns.len() {
            return Err(VerifyError::NoRepairKey);
        }
        let mut all = write;
        all.extend(gone);
        // A poll job reads by the main-table columns of its key: a superset of these rows,
        // which rewrites nothing that is equal.
        let by: Vec<Vec<String>> = all
            .iter()
            .map(|k| self.by.iter().map(|&i| k[i].clone()).collect())
            .collect();
        let deletes =
            plan.view.job.mode == Mode::Notify && plan.view.job.on_delete != OnDelete::Ignore;
        let (tx, _) = source::begin(source).await.map_err(src)?;
        let done = job::apply_keys(&tx, dwh, &plan.view, &by, deletes.then_some(&all[..])).await?;
        drop(tx);
        self.written += done.changed;
        self.deleted += done.deleted;
        Ok(())
    }
}
