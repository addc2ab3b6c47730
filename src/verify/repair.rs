//! `--repair`: the rows that still differ, rewritten through the job's own write path (the
//! caller holds the job's lock).

use tokio_postgres::Client;

use crate::config::{ColumnKind, Mode, OnDelete};
use crate::job;
use crate::sink::dwh::Dwh;
use crate::source;
use crate::view::View;

use super::error::{src, VerifyError};

/// `--repair`: rewrites what differs through the job's own write path.
pub(super) struct Repair {
    /// Positions in `key` of the main-table key columns the view's rows are read by.
    by: Option<Vec<usize>>,
    /// Apply `on_delete` to the extra keys only. By default it applies to every key rewritten
    /// that the view lacks by the time of the repair (a row deleted since it was found).
    extras_only: bool,
    pub(super) written: u64,
    pub(super) deleted: u64,
}

/// Positions in `key` of the main-table key columns (those `view.captured[0]` records, in its
/// order) that the view's rows can be read by, `None` unless every one is a key column taken as
/// it is from the main table.
pub(super) fn read_by(view: &View) -> Option<Vec<usize>> {
    let job = &view.job;
    let by: Vec<usize> = job
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
    (!by.is_empty() && by.len() == view.captured[0].columns.len()).then_some(by)
}

impl Repair {
    pub(super) fn new(view: &View) -> Repair {
        Repair {
            by: read_by(view),
            extras_only: false,
            written: 0,
            deleted: 0,
        }
    }

    /// `on_delete` applies to the keys found extra only, not to every key rewritten.
    pub(super) fn deleting_extras_only(self) -> Repair {
        Repair {
            extras_only: true,
            ..self
        }
    }

    /// Rewrite the view rows of `write` (missing or different), and apply the job's
    /// `on_delete` to `gone` (extra).
    pub(super) async fn fix<D: Dwh>(
        &mut self,
        view: &View,
        source: &mut Client,
        dwh: &mut D,
        write: Vec<Vec<String>>,
        gone: Vec<Vec<String>>,
    ) -> Result<(), VerifyError> {
        if write.is_empty() && gone.is_empty() {
            return Ok(());
        }
        let Some(by) = &self.by else {
            return Err(VerifyError::NoRepairKey);
        };
        let written = write.len();
        let mut all = write;
        all.extend(gone);
        // A poll job reads by the main-table columns of its key: a superset of these rows,
        // which rewrites nothing that is equal.
        let by: Vec<Vec<String>> = all
            .iter()
            .map(|k| by.iter().map(|&i| k[i].clone()).collect())
            .collect();
        let deletes = view.job.mode == Mode::Notify && view.job.on_delete != OnDelete::Ignore;
        let (tx, _) = source::begin(source).await.map_err(src)?;
        let gone = if self.extras_only {
            &all[written..]
        } else {
            &all[..]
        };
        let done = job::apply_keys(&tx, dwh, view, &by, deletes.then_some(gone)).await?;
        drop(tx);
        self.written += done.changed;
        self.deleted += done.deleted;
        Ok(())
    }
}
