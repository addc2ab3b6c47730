//! Writing one range: the source's COPY of its view rows streamed into the DWH and applied
//! there with the position after it: straight into the target while it holds none of the
//! job's keys; else the rows of keys above the target's greatest straight in and the others
//! staged and upserted (when the target allows it, see `TargetState::split`); else all staged
//! and upserted.

use futures_util::TryStreamExt;

use super::*;

/// Which ways of writing a run may still try; each is given up, for the rest of the run, at
/// the first batch it does not fit (a key met where none was expected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Paths {
    /// Copy every row straight into the target (it held none of the job's keys so far).
    pub direct: bool,
    /// Copy the rows of keys above the target's greatest straight in, stage the others.
    pub split: bool,
}

impl Paths {
    /// Stage and upsert every row.
    pub fn staged() -> Paths {
        Paths {
            direct: false,
            split: false,
        }
    }
}

/// Apply the view rows of `bound` by the first of `paths` that fits, giving up those that do
/// not: a direct copy that meets a key in the target, a split whose fresh part does, are
/// written again (same snapshot) the next way.
#[allow(clippy::too_many_arguments)]
pub(super) async fn apply<D: Dwh>(
    source_tx: &tokio_postgres::Transaction<'_>,
    dwh: &mut D,
    view: &View,
    bound: &Bound,
    position: Option<Advance<'_>>,
    paths: &mut Paths,
    missing: Option<sink::Missing<'_>>,
    limiter: Option<&Limiter>,
) -> Result<Applied, JobError> {
    if paths.direct && missing.is_none() {
        let tried = transfer(
            source_tx,
            dwh,
            view,
            bound,
            position,
            Way::Direct,
            None,
            limiter,
        )
        .await?;
        if let Some(done) = tried {
            return Ok(done);
        }
        // A key already in the target: this batch (same snapshot) and all that follow stage.
        tracing::info!(job = %view.job.name, "a key is in the target already; staging and upserting from here on");
        paths.direct = false;
    }
    if paths.split && missing.is_none() {
        let tried = transfer(
            source_tx,
            dwh,
            view,
            bound,
            position,
            Way::Split,
            None,
            limiter,
        )
        .await?;
        if let Some(done) = tried {
            return Ok(done);
        }
        tracing::info!(job = %view.job.name, "a key above the target's greatest is in it already; staging and upserting every row from here on");
        paths.split = false;
    }
    let done = transfer(
        source_tx,
        dwh,
        view,
        bound,
        position,
        Way::Staged,
        missing,
        limiter,
    )
    .await?;
    Ok(done.expect("only a direct copy or a split meets keys it cannot take"))
}

/// How `transfer` writes a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Way {
    Direct,
    Split,
    Staged,
}

/// Stream the view rows of `bound` from the source transaction into the DWH and apply them,
/// writing `position` in the same DWH transaction.
///
/// `Way::Direct` copies straight into the target, which only works while no key exists there
/// yet; `Way::Split` copies the rows of keys above the target's greatest straight in (two
/// reads of the range in the one snapshot, cut by key) and stages the others. A key met where
/// none was expected ends the attempt with `Ok(None)` and nothing written, so the caller can
/// stage the batch instead.
#[allow(clippy::too_many_arguments)]
pub(super) async fn transfer<D: Dwh>(
    source_tx: &tokio_postgres::Transaction<'_>,
    dwh: &mut D,
    view: &View,
    bound: &Bound,
    position: Option<Advance<'_>>,
    way: Way,
    missing: Option<sink::Missing<'_>>,
    limiter: Option<&Limiter>,
) -> Result<Option<Applied>, JobError> {
    let ceiling = match way {
        Way::Split => dwh.key_ceiling(view).await?,
        _ => None,
    };
    let parts = ceiling.map(|c| bound.split_at_key(view, &c, "k"));
    let settings = match &parts {
        Some((fresh, _)) => fresh.settings.clone(),
        None => bound.settings.clone(),
    };
    source::set_settings(source_tx, view, settings)
        .await
        .map_err(JobError::Source)?;
    let stats = source::checks::stats(source_tx, view, bound)
        .await
        .map_err(JobError::Source)?;
    let batch = Batch {
        direct: way == Way::Direct,
        missing,
        position,
    };
    let written = match &parts {
        None => {
            let out = source::copy_out(source_tx, &dwh.copy_sql(view, &bound.predicate))
                .await
                .map_err(JobError::Source)?;
            dwh.write(view, throttle::throttled(out, limiter), batch)
                .await
        }
        Some((fresh, rest)) => {
            let fresh_out = source::copy_out(source_tx, &dwh.copy_sql(view, &fresh.predicate))
                .await
                .map_err(JobError::Source)?;
            // The second COPY starts once the first is read to its end (one connection).
            let rest_sql = dwh.copy_sql(view, &rest.predicate);
            let rest_out =
                futures_util::stream::once(source::copy_out(source_tx, &rest_sql)).try_flatten();
            dwh.write_split(
                view,
                throttle::throttled(fresh_out, limiter),
                throttle::throttled(rest_out, limiter),
                batch,
            )
            .await
        }
    };
    let written = match written {
        Ok(w) => w,
        Err(WriteError::KeyExists) => return Ok(None),
        Err(WriteError::Rows(e)) => return Err(JobError::Source(e)),
        Err(WriteError::Sink(e)) => return Err(JobError::Sink(e)),
    };
    let mut applied = Applied {
        stored: written.stored.clone(),
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
pub(crate) async fn apply_keys<D: Dwh>(
    source_tx: &tokio_postgres::Transaction<'_>,
    dwh: &mut D,
    view: &View,
    keys: &[Vec<String>],
    gone: Option<&[Vec<String>]>,
) -> Result<RunSummary, JobError> {
    let applied = apply(
        source_tx,
        dwh,
        view,
        &Range::Keys(keys).bind(view, "n"),
        None,
        &mut Paths::staged(),
        gone.map(sink::Missing::Keys),
        None,
    )
    .await?;
    let mut summary = RunSummary::default();
    summary.add(applied);
    Ok(summary)
}
