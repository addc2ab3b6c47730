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

/// A JSON field of a row that a column with `on_error = "fail"` cannot load: the row (by its
/// key) and what is wrong with the value.
#[derive(Debug, thiserror::Error)]
#[error("column {column} ({origin}): row with key ({})={key}: {problem}", .key_columns.join(", "))]
pub struct BadValue {
    pub column: String,
    /// Where the value comes from: `o.payload json meta.channel`.
    pub origin: String,
    pub key_columns: Vec<String>,
    /// The row's key, as the source writes it as text.
    pub key: String,
    pub problem: BadValueProblem,
}

/// What is wrong with the value of a [`BadValue`].
#[derive(Debug, thiserror::Error)]
pub enum BadValueProblem {
    /// A step of the path is a scalar (or an array where a key is looked up).
    #[error("{at} is {} {found}, not {wanted}, so {path} cannot be read", article(.found))]
    NotAContainer {
        /// `the document`, or the path up to the step.
        at: String,
        /// The JSON type found there.
        found: String,
        /// `an object`, or `an object or an array` for a numeric step.
        wanted: &'static str,
        path: String,
    },
    /// The value does not cast to the column's type.
    #[error("value {value:?} cannot be cast to {ty} ({}); set on_error = \"null\" on the column to load it as NULL", crate::pg::message(.source))]
    Uncastable {
        value: String,
        ty: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Find the row and value behind a data error in the COPY of `bound`; `None` when no JSON
/// field explains it. Runs in a transaction of its own (the failed one is gone). Boxed: it
/// travels on inside `JobError`, which stays small.
pub async fn diagnose(
    client: &mut Client,
    view: &View,
    bound: &Bound,
) -> Result<Option<Box<BadValue>>, tokio_postgres::Error> {
    let tx = client.build_transaction().read_only(true).start().await?;
    super::set_settings(&tx, view, bound.settings.clone()).await?;
    let rows = sql::rows_of(view, &bound.predicate);
    let key = sql::key_text(view);
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
        let bad = |key: String, problem| {
            Box::new(BadValue {
                column: check.column.clone(),
                origin: check.origin.clone(),
                key_columns: view.job.key.clone(),
                key,
                problem,
            })
        };
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
            return Ok(Some(bad(
                r.get(0),
                BadValueProblem::NotAContainer {
                    at,
                    found: types[k].clone(),
                    wanted: want,
                    path: path.join("."),
                },
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
        if let Some((value, source)) = first_uncastable(&tx, &values, ty).await? {
            let q = format!("select {key} {rows} and {shape} and {raw} = $1 limit 1");
            let who = tx
                .query_opt(&q, &[&value])
                .await?
                .map(|r| r.get::<_, String>(0))
                .unwrap_or_default();
            return Ok(Some(bad(
                who,
                BadValueProblem::Uncastable {
                    value,
                    ty: ty.clone(),
                    source,
                },
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

/// The first of `values` that does not cast to `ty`, with the server's refusal, found with a
/// few array casts instead of one query per value.
async fn first_uncastable(
    tx: &Transaction<'_>,
    values: &[String],
    ty: &str,
) -> Result<Option<(String, tokio_postgres::Error)>, tokio_postgres::Error> {
    let q = format!("select ($1::text[])::{ty}[] is not null");
    let mut candidates = values;
    let mut reason = None;
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
    Ok(candidates.first().cloned().zip(reason))
}

/// Whether casting `values` fails (keeping the server's refusal in `reason`); each try runs in
/// a savepoint so the transaction survives.
async fn fails(
    tx: &Transaction<'_>,
    q: &str,
    values: &[String],
    reason: &mut Option<tokio_postgres::Error>,
) -> Result<bool, tokio_postgres::Error> {
    tx.batch_execute("savepoint pgtide_cast").await?;
    let result = tx.query_one(q, &[&values]).await;
    tx.batch_execute("rollback to savepoint pgtide_cast")
        .await?;
    match result {
        Ok(_) => Ok(false),
        Err(e) if e.code().is_some() => {
            *reason = Some(e);
            Ok(true)
        }
        Err(e) => Err(e),
    }
}
