//! What a run did: rows, changes, deletes and the values transforms turned into NULL.

use super::*;

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
    /// The windows of a replay's chunks (plan order), for its closing re-read.
    pub(crate) reads: Vec<(u64, crate::position::Window)>,
}

/// What one batch (or one recheck, or one drain) applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    pub(super) rows: u64,
    pub(super) changed: u64,
    /// Target rows deleted or marked deleted (notify jobs).
    pub(super) deleted: u64,
    pub(super) tallies: BTreeMap<String, Tally>,
    /// The position stored with the rows, when the batch moved it.
    pub(super) stored: Option<Position>,
    /// A replay's chunk (plan order) and the window its read leaves, for the re-read that
    /// ends a replay written by several workers.
    pub(super) read: Option<(u64, crate::position::Window)>,
}

impl RunSummary {
    pub(super) fn add(&mut self, a: Applied) {
        self.reads.extend(a.read);
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
    pub(super) fn report(&self, job: &str) {
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
