//! Counting what transforms turned into NULL, and naming the row behind a bad value.
//!
//! Counts come from one aggregate query per batch over the batch's rows, in the batch's
//! snapshot, and only for views that count something. A JSON field that cannot be read stops
//! the batch's COPY; `diagnose` then looks at the batch again and says which row, which value
//! and why, instead of PostgreSQL's bare cast error.

use tokio_postgres::{Client, Transaction};

use crate::config::OnError;
use crate::view::range::Bound;
use crate::view::sql;
use crate::view::{CheckKind, View};

/// What one check met in a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckStat {
    /// Values turned into NULL (unmapped, or a JSON path through a scalar).
    pub nulled: u64,
    /// A few of the values (unmapped values only).
    pub values: Vec<String>,
}

/// Per check of `view` (in order), what the rows of `bound` meet (its settings set); empty
/// when nothing is counted.
pub async fn stats(
    tx: &Transaction<'_>,
    view: &View,
    bound: &Bound,
) -> Result<Vec<CheckStat>, tokio_postgres::Error> {
    let Some(q) = sql::check_stats(view, &bound.predicate) else {
        return Ok(Vec::new());
    };
    let row = tx.query_one(&q, &[]).await?;
    Ok((0..view.checks.len())
        .map(|i| CheckStat {
            nulled: row.get::<_, i64>(2 * i) as u64,
            values: row
                .get::<_, Option<Vec<String>>>(2 * i + 1)
                .unwrap_or_default(),
        })
        .collect())
}

/// Find the row and value behind a data error in the COPY of `bound`; `None` when no JSON
/// field explains it. Runs in a transaction of its own (the failed one is gone).
pub async fn diagnose(
    client: &mut Client,
    view: &View,
    bound: &Bound,
) -> Result<Option<String>, tokio_postgres::Error> {
    let tx = client.build_transaction().read_only(true).start().await?;
    super::set_settings(&tx, view, bound.settings.clone()).await?;
    let rows = sql::rows_of(view, &bound.predicate);
    let key = sql::key_text(view);
    let key_names = view.job.key.join(", ");
    for check in &view.checks {
        let CheckKind::Json {
            raw,
            path,
            ty,
            on_error: OnError::Fail,
            ..
        } = &check.kind
        else {
            continue;
        };
        let shape = check.kind.shape_ok().expect("a json check");
        let steps = check.kind.step_types().expect("a json check");
        let head = format!(
            "column {} ({}): row with key ({key_names})={}",
            check.column, check.origin, "{}"
        );
        // A step of the path that is neither an object nor missing.
        let q = format!("select {key}, {steps} {rows} and not {shape} limit 1");
        if let Some(r) = tx.query_opt(&q, &[]).await? {
            let types: Vec<String> = r.get(1);
            let k = types
                .iter()
                .enumerate()
                .position(|(k, t)| {
                    let array_ok = path[k].parse::<u32>().is_ok();
                    !(t == "null" || t == "object" || (array_ok && t == "array"))
                })
                .unwrap_or(0);
            let at = if k == 0 {
                "the document".to_string()
            } else {
                path[..k].join(".")
            };
            let want = if path[k].parse::<u32>().is_ok() {
                "an object or an array"
            } else {
                "an object"
            };
            return Ok(Some(format!(
                "{}: {at} is {} {}, not {want}, so {} cannot be read",
                head.replace("{}", &r.get::<_, String>(0)),
                article(&types[k]),
                types[k],
                path.join(".")
            )));
        }
        // A value that does not cast: bisect the batch's distinct values.
        let q =
            format!("select array_agg(distinct {raw}) {rows} and {shape} and {raw} is not null");
        let values: Vec<String> = tx
            .query_one(&q, &[])
            .await?
            .get::<_, Option<Vec<String>>>(0)
            .unwrap_or_default();
        if let Some((bad, reason)) = first_uncastable(&tx, &values, ty).await? {
            let q = format!("select {key} {rows} and {shape} and {raw} = $1 limit 1");
            let who = tx
                .query_opt(&q, &[&bad])
                .await?
                .map(|r| r.get::<_, String>(0))
                .unwrap_or_default();
            return Ok(Some(format!(
                "{}: value {bad:?} cannot be cast to {ty} ({reason}); set on_error = \"null\" on the column to load it as NULL",
                head.replace("{}", &who)
            )));
        }
    }
    Ok(None)
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The first of `values` that does not cast to `ty`, with the server's reason, found with a
/// few array casts instead of one query per value.
async fn first_uncastable(
    tx: &Transaction<'_>,
    values: &[String],
    ty: &str,
) -> Result<Option<(String, String)>, tokio_postgres::Error> {
    let q = format!("select ($1::text[])::{ty}[] is not null");
    let mut candidates = values;
    let mut reason = String::new();
    if !fails(tx, &q, candidates, &mut reason).await? {
        return Ok(None);
    }
    while candidates.len() > 1 {
        let (left, right) = candidates.split_at(candidates.len() / 2);
        candidates = if fails(tx, &q, left, &mut reason).await? {
            left
        } else {
            right
        };
    }
    fails(tx, &q, candidates, &mut reason).await?;
    Ok(candidates.first().map(|v| (v.clone(), reason)))
}

/// Whether casting `values` fails; each try runs in a savepoint so the transaction survives.
async fn fails(
    tx: &Transaction<'_>,
    q: &str,
    values: &[String],
    reason: &mut String,
) -> Result<bool, tokio_postgres::Error> {
    tx.batch_execute("savepoint pgtide_cast").await?;
    let result = tx.query_one(q, &[&values]).await;
    tx.batch_execute("rollback to savepoint pgtide_cast")
        .await?;
    match result {
        Ok(_) => Ok(false),
        Err(e) if e.code().is_some() => {
            *reason = crate::pg::message(&e);
            Ok(true)
        }
        Err(e) => Err(e),
    }
}
