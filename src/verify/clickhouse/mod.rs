//! `verify` against a ClickHouse DWH. The two servers share no hash function and print values
//! differently, so pgtide compares the rows itself, streaming both sides: the source's text
//! COPY of the view rows in scope (each column printed as the job prints it for ClickHouse)
//! and ClickHouse's `TabSeparated` rows of the target (`final`, newest version of each key,
//! rows marked `_pgtide_deleted` left out). Every value is brought to the form its ClickHouse
//! type gives it (`values`) before it is hashed (`rows`).
//!
//! `passes`: each side's rows are summed per bucket of keys (about 100 rows a bucket, at most
//! 131,072 buckets) in one read of each side at once; the buckets whose sums differ are read
//! again (the source's rows from a temporary file the first read wrote), a bounded number of
//! rows held by key at a time, and the keys that may differ go to a temporary file. Floats
//! are compared within a few units in the last place (see `values`). With `--from/--to` the target has no cursor to cut it, so the range's rows
//! are looked up in the whole target and no row counts as extra. `recheck`: the keys found are
//! read again on both sides (by key on the source, where the key is a main-table column; the
//! target streamed whole), twice, 200 ms apart, and under `--repair` what still differs is
//! rewritten through the job's own write path. Memory holds the bucket sums, at most
//! [`passes::HELD_ROWS`] keys of the buckets that differ and a chunk of keys to check again,
//! never the table.

mod passes;
mod recheck;
mod rows;
mod values;

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::config::ColumnKind;
use crate::job::{InputError, JobError};
use crate::position::Position;
use crate::sink::clickhouse::{self as sink, ClickHouse};
use crate::sink::dwh::Dwh;
use crate::view::View;

use super::candidates::Spill;
use super::plan::{counts_extra, Options, Scope};
use super::repair::{read_by, Repair};
use super::report::{Outcome, Report};
use super::VerifyError;
use values::Norm;

pub use passes::REREAD_SOURCE;

/// Compare the job's target in ClickHouse with the view (the caller holds the job's lock under
/// `--repair`).
pub(super) async fn run(
    ctx: &crate::job::Context,
    job: &std::sync::Arc<crate::config::JobSpec>,
    opts: &Options,
    ch: &mut ClickHouse,
) -> Result<Report, VerifyError> {
    let mut source = ctx.connect_source(job).await?;
    let view = crate::view::resolve(&source, job)
        .await
        .map_err(JobError::from)?;
    if opts.repair {
        ch.prepare_target(&view).await?;
    }
    let pos = ch.read_position(&job.name).await?;
    let layout = Layout::new(&source, ch, view, pos.as_ref(), opts).await?;
    // ClickHouse tells a batch's rows from the keys to delete by their text, which for keys
    // read from the target is ClickHouse's: only keys found extra are deleted.
    let mut repair = opts
        .repair
        .then(|| Repair::new(&layout.view).deleting_extras_only());
    let first = compare(&layout, &mut source, ch, repair.as_mut()).await?;
    let after = match &repair {
        Some(_) if !first.clean() => Some(compare(&layout, &mut source, ch, None).await?),
        _ => None,
    };
    Ok(super::assemble(
        job,
        layout.counts_extra,
        first,
        after,
        repair,
    ))
}

/// One comparison: find the keys that may differ, then read them again on both sides.
async fn compare(
    layout: &Layout,
    source: &mut Client,
    ch: &mut ClickHouse,
    repair: Option<&mut Repair>,
) -> Result<Outcome, VerifyError> {
    let mut spill = Spill::new()?;
    let mut outcome = Outcome {
        compared: passes::candidates(layout, source, ch.http(), &mut spill).await?,
        ..Outcome::default()
    };
    tracing::info!(job = %layout.view.job.name, compared = outcome.compared, keys = spill.keys, "reading the keys that may differ again");
    recheck::recheck(layout, source, ch, spill, &mut outcome, repair).await?;
    Ok(outcome)
}

/// What both sides print and how it compares, fixed at the start.
pub(super) struct Layout {
    view: View,
    /// The target, `database.table` quoted.
    target: String,
    /// Per compared view column, the source expression printing it as the job does.
    source_cols: Vec<String>,
    /// Per compared view column, what ClickHouse selects: the column, or NULL when the target
    /// lacks it.
    target_cols: Vec<String>,
    /// Per compared view column, how it compares (from its type in the target).
    norms: Vec<Norm>,
    /// Positions of the key's columns among the compared ones, in `key` order.
    key: Vec<usize>,
    /// `(<key expression>) is not null and ...`: the rows compared have a whole key.
    whole_key: String,
    scope: Scope,
    counts_extra: bool,
    /// Positions in `key` the source's view rows are read by, when the key allows it.
    read_by: Option<Vec<usize>>,
}

impl Layout {
    async fn new(
        source: &Client,
        ch: &mut ClickHouse,
        view: View,
        pos: Option<&Position>,
        opts: &Options,
    ) -> Result<Layout, VerifyError> {
        let job = view.job.clone();
        let Some(described) = sink::describe(ch.http(), &view).await? else {
            return Err(VerifyError::NoTarget(job.target.to_string()));
        };
        let types: HashMap<String, String> = described.into_iter().collect();
        let mut names = Vec::new();
        let (mut source_cols, mut target_cols, mut norms) = (Vec::new(), Vec::new(), Vec::new());
        for (c, written) in view.columns.iter().zip(ch.columns(&view)) {
            // Columns marked deleted are not compared: the target keeps their old values.
            let deleted = job
                .columns
                .iter()
                .any(|s| s.name == c.name && matches!(s.kind, ColumnKind::Deleted { .. }));
            if deleted {
                continue;
            }
            let (norm, selected) = match types.get(&c.name) {
                Some(ty) => (values::norm(ty), sink::quote(&c.name)),
                None => (values::norm(&written.ch_type), "null".to_string()),
            };
            names.push(c.name.clone());
            source_cols.push(written.select);
            target_cols.push(selected);
            norms.push(norm);
        }
        let mut key = Vec::new();
        let mut whole = Vec::new();
        for k in &job.key {
            match names.iter().position(|n| n == k) {
                Some(i) => key.push(i),
                None => {
                    return Err(
                        JobError::Input(InputError::KeyNotCompared { column: k.clone() }).into(),
                    )
                }
            }
            if let Some(c) = view.columns.iter().find(|c| &c.name == k) {
                whole.push(format!("({}) is not null", c.expr));
            }
        }
        let scope = Scope::new(source, &view, pos, opts).await?;
        Ok(Layout {
            target: sink::target(&view),
            counts_extra: counts_extra(&job, scope.range.is_some()),
            read_by: read_by(&view),
            view,
            source_cols,
            target_cols,
            norms,
            key,
            whole_key: whole.join(" and "),
            scope,
        })
    }

    /// The source's text COPY of the view rows of `predicate` that have a whole key: the
    /// compared columns, then `extra`.
    fn source_copy(&self, extra: &[String], predicate: &str) -> String {
        let mut cols = self.source_cols.clone();
        cols.extend(extra.iter().cloned());
        format!(
            "copy (select {} {}) to stdout",
            cols.join(", "),
            crate::view::sql::rows_of(&self.view, &format!("({predicate}) and {}", self.whole_key))
        )
    }

    /// Every key's newest row in the target: the compared columns, then `_pgtide_deleted`.
    /// Marked rows are left out here rather than by a `where`: a server may move the condition
    /// to PREWHERE, which is applied before `final` picks the newest row.
    fn target_query(&self) -> String {
        format!(
            "select {}, {} from {} final format TabSeparated",
            self.target_cols.join(", "),
            sink::quote(sink::DELETED),
            self.target
        )
    }
}
