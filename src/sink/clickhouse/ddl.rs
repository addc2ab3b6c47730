//! The ClickHouse tables a job writes to: the control table, the target (created, evolved,
//! checked) and, for soft deletes, a scratch table of keys.

use super::types::{self, ChColumn};
use super::{DELETED, LOADED_AT, POSITIONS, VERSION};
use crate::clickhouse::Client as Http;
use crate::sink::SinkError;
use crate::view::View;

/// A ClickHouse identifier, quoted: backquotes, with backslashes and backquotes escaped.
pub fn quote(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// The job's target, `database.table` quoted.
pub fn target(view: &View) -> String {
    format!(
        "{}.{}",
        quote(&view.job.target.schema),
        quote(&view.job.target.name)
    )
}

/// The job's scratch table of keys (soft deletes), beside the target.
pub fn scratch(view: &View) -> String {
    format!(
        "{}.{}",
        quote(&view.job.target.schema),
        quote(&format!("pgtide_keys_{}", view.job.name))
    )
}

/// How each view column is written (key columns never `Nullable`).
pub fn columns(view: &View, datetime64: bool) -> Vec<ChColumn> {
    view.columns
        .iter()
        .map(|c| types::column(c, view.job.key.contains(&c.name), datetime64))
        .collect()
}

pub async fn exists(http: &mut Http, database: &str, table: &str) -> Result<bool, SinkError> {
    let q = format!(
        "exists table {}.{} format TabSeparated",
        quote(database),
        quote(table)
    );
    Ok(http.query(&q).await?.trim() == "1")
}

/// Create the control table if missing.
pub async fn ensure_control(http: &mut Http, database: &str) -> Result<(), SinkError> {
    let q = format!(
        "create table if not exists {}.{} (job String, seq UInt64, position String, updated_at DateTime default now()) \
         engine = ReplacingMergeTree(seq) order by job",
        quote(database),
        quote(POSITIONS)
    );
    http.execute(&q).await?;
    Ok(())
}

/// The target's columns and types, `None` when it does not exist.
pub async fn describe(
    http: &mut Http,
    view: &View,
) -> Result<Option<Vec<(String, String)>>, SinkError> {
    if !exists(http, &view.job.target.schema, &view.job.target.name).await? {
        return Ok(None);
    }
    let q = format!("describe table {} format TabSeparated", target(view));
    let text = http.query(&q).await?;
    Ok(Some(
        text.lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let name = super::rows::unescape(f.next()?.as_bytes());
                let ty = super::rows::unescape(f.next()?.as_bytes());
                Some((name, ty))
            })
            .collect(),
    ))
}

/// What `ensure_target` would do: the columns to add, or the problems that stop it.
struct Plan {
    create: bool,
    add: Vec<ChColumn>,
    problems: Vec<String>,
}

async fn plan(http: &mut Http, view: &View, datetime64: bool) -> Result<Plan, SinkError> {
    let wanted = columns(view, datetime64);
    let mut problems = key_problems(view, &wanted);
    let Some(existing) = describe(http, view).await? else {
        return Ok(Plan {
            create: true,
            add: Vec::new(),
            problems,
        });
    };
    let mut add = Vec::new();
    for c in &wanted {
        match existing.iter().find(|(n, _)| n == &c.name) {
            None if view.job.key.contains(&c.name) => problems.push(format!(
                "key column {} is missing from the target (the key of a ClickHouse table cannot change)",
                c.name
            )),
            None => add.push(c.clone()),
            Some((_, ty)) if !types::compatible(ty, &c.ch_type) => problems.push(format!(
                "column {} is {ty}, the job writes {}",
                c.name, c.ch_type
            )),
            Some(_) => {}
        }
    }
    for (col, ty) in [(VERSION, "UInt64"), (DELETED, "UInt8")] {
        match existing.iter().find(|(n, _)| n == col) {
            Some((_, t)) if t == ty => {}
            Some((_, t)) => problems.push(format!("column {col} is {t}, pgtide writes {ty}")),
            None => problems.push(format!(
                "column {col} is missing: not a table pgtide created (it needs {col} {ty})"
            )),
        }
    }
    Ok(Plan {
        create: false,
        add,
        problems,
    })
}

/// Key columns must print the same from the source's text as from the view (a notify job
/// finds deleted keys by comparing the two): integers, decimals, uuids, text and dates.
fn key_problems(view: &View, wanted: &[ChColumn]) -> Vec<String> {
    wanted
        .iter()
        .filter(|c| view.job.key.contains(&c.name))
        .filter(|c| {
            let t = c.ch_type.as_str();
            !(t.starts_with("Int")
                || t.starts_with("UInt")
                || t.starts_with("Decimal")
                || t == "UUID"
                || t == "String"
                || t == "Date")
        })
        .map(|c| {
            format!(
                "key column {} would be {}: a ClickHouse key must be an integer, decimal, uuid, text or date column",
                c.name, c.ch_type
            )
        })
        .collect()
}

/// Make sure the target can take the view: create it when missing, add the columns the job
/// gained, refuse incompatible ones before anything is written.
pub async fn ensure_target(
    http: &mut Http,
    view: &View,
    datetime64: bool,
) -> Result<(), SinkError> {
    let plan = plan(http, view, datetime64).await?;
    if !plan.problems.is_empty() {
        return Err(SinkError::Incompatible {
            table: view.job.target.to_string(),
            problems: plan.problems,
        });
    }
    if plan.create {
        let mut cols: Vec<String> = columns(view, datetime64)
            .iter()
            .map(|c| format!("{} {}", quote(&c.name), c.ch_type))
            .collect();
        cols.push(format!("{} DateTime default now()", quote(LOADED_AT)));
        cols.push(format!("{} UInt64", quote(VERSION)));
        cols.push(format!("{} UInt8 default 0", quote(DELETED)));
        let key: Vec<String> = view.job.key.iter().map(|k| quote(k)).collect();
        let q = format!(
            "create table if not exists {} ({}) engine = ReplacingMergeTree({}) order by ({})",
            target(view),
            cols.join(", "),
            quote(VERSION),
            key.join(", ")
        );
        http.execute(&q).await?;
        tracing::info!(job = %view.job.name, target = %view.job.target, "created the target table in ClickHouse");
    }
    for c in &plan.add {
        let q = format!(
            "alter table {} add column {} {}",
            target(view),
            quote(&c.name),
            c.ch_type
        );
        http.execute(&q).await?;
        tracing::info!(job = %view.job.name, column = %c.name, "added a column to the target");
    }
    if crate::sink::soft(view) {
        let wanted = columns(view, datetime64);
        let mut cols: Vec<String> = wanted
            .iter()
            .filter(|c| view.job.key.contains(&c.name))
            .map(|c| format!("{} {}", quote(&c.name), c.ch_type))
            .collect();
        cols.push(format!("{} UInt64", quote(VERSION)));
        cols.push(format!("{} UInt8", quote(DELETED)));
        let q = format!(
            "create table if not exists {} ({}) engine = Memory",
            scratch(view),
            cols.join(", ")
        );
        http.execute(&q).await?;
    }
    Ok(())
}

/// The problems `ensure_target` would stop at, changing nothing.
pub async fn check_target(
    http: &mut Http,
    view: &View,
    datetime64: bool,
) -> Result<Vec<String>, SinkError> {
    Ok(plan(http, view, datetime64).await?.problems)
}
