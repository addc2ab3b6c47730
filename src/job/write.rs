//! Writing one range: the source's COPY of its view rows streamed into the DWH and applied
//! there with the position after it, straight into the target while it holds none of the
//! job's keys, else staged and upserted.

use super::*;

/// Apply the view rows of `bound`: straight into the target while `direct` holds, else (and
/// from the first key found in the target on) through the staging table.
#[allow(clippy::too_many_arguments)]
pub(super) async fn apply<D: Dwh>(
    source_tx: &tokio_postgres::Transaction<'_>,
    dwh: &mut D,
    view: &View,
    bound: &Bound,
    position: Option<Advance<'_>>,
    direct: &mut bool,
    missing: Option<sink::Missing<'_>>,
    limiter: Option<&Limiter>,
) -> Result<Applied, JobError> {
    if *direct && missing.is_none() {
        let tried = transfer(source_tx, dwh, view, bound, position, true, None, limiter).await?;
        if let Some(done) = tried {
            return Ok(done);
        }
        // A key already in the target: this batch (same snapshot) and all that follow stage.
        *direct = false;
    }
    let done = transfer(
        source_tx, dwh, view, bound, position, false, missing, limiter,
    )
    .await?;
    Ok(done.expect("only direct copies meet existing keys"))
}

/// Stream the view rows of `bound` from the source transaction into the DWH and apply them,
/// writing `position` in the same DWH transaction.
///
/// `direct` copies straight into the target, which only works while no key exists there
/// yet; a key that does ends the attempt with `Ok(None)` and nothing written, so the caller
/// can stage the batch instead.
#[allow(clippy::too_many_arguments)]
pub(super) async fn transfer<D: Dwh>(
    source_tx: &tokio_postgres::Transaction<'_>,
    dwh: &mut D,
    view: &View,
    bound: &Bound,
    position: Option<Advance<'_>>,
    direct: bool,
    missing: Option<sink::Missing<'_>>,
    limiter: Option<&Limiter>,
) -> Result<Option<Applied>, JobError> {
    source::set_settings(source_tx, view, bound.settings.clone())
        .await
        .map_err(JobError::Source)?;
    let stats = source::checks::stats(source_tx, view, bound)
        .await
        .map_err(JobError::Source)?;
    let out = source::copy_out(source_tx, &dwh.copy_sql(view, &bound.predicate))
        .await
        .map_err(JobError::Source)?;
    let batch = Batch {
        direct,
        missing,
        position,
    };
    let out = throttle::throttled(out, limiter);
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
    let mut no_direct = false;
    let applied = apply(
        source_tx,
        dwh,
        view,
        &Range::Keys(keys).bind(view, "n"),
        None,
        &mut no_direct,
        gone.map(sink::Missing::Keys),
        None,
    )
    .await?;
    let mut summary = RunSummary::default();
    summary.add(applied);
    Ok(summary)
}
