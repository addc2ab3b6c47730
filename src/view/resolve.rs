//! Resolving a job against the source catalog: tables, columns, types, the cursor.
//!
//! Names from the config are looked up with bound parameters and only then quoted into SQL,
//! so a table called `orders"; drop table x; --` is simply not found. This runs at the start
//! of every run and in `check`, before anything is read: a dropped or retyped source column
//! stops the job with a message naming table and column.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::config::{ColumnKind, ColumnRef, JobSpec, OnError, TableRef};
use crate::pg::{self, quote_ident};

use super::sql::{self, SETTING_PREFIX};
use super::{Captured, Check, CheckKind, CursorColumn, Setting, View, ViewColumn};

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// Everything wrong with the job against the current source schema.
    #[error("{}", .0.join("; "))]
    Problems(Vec<String>),
    #[error("read source catalog: {}", pg::message(.0))]
    Db(#[source] tokio_postgres::Error),
}

#[derive(Debug, Clone)]
struct SourceColumn {
    /// The source type as SQL.
    src_type: String,
    /// The type the value gets in the DWH: builtin types stay, enums and extension types
    /// become text, domains their base type.
    target_type: String,
    /// Declared `not null` in its table.
    not_null: bool,
}

/// Maps a pg_type row `t` (with element type `et`, namespaces `n`, `en`) and a typmod to the
/// source type and the type pgtide gives the column in the DWH, which may lack the source's
/// enums, domains and extensions.
const TYPE_COLUMNS: &str = "format_type(t.oid, TYPMOD) as src,
    case
      when t.typtype = 'e' then 'text'
      when t.typtype = 'd' then format_type(t.typbasetype, t.typtypmod)
      when t.typcategory = 'A' and (et.typtype = 'e' or en.nspname <> 'pg_catalog') then 'text[]'
      when t.typcategory <> 'A' and n.nspname <> 'pg_catalog' then 'text'
      else format_type(t.oid, TYPMOD)
    end as target";

const TYPE_JOINS: &str = "join pg_namespace n on n.oid = t.typnamespace
    left join pg_type et on et.oid = t.typelem and t.typcategory = 'A'
    left join pg_namespace en on en.oid = et.typnamespace";

/// Resolve `job` against the source behind `client`.
pub async fn resolve(client: &Client, job: &std::sync::Arc<JobSpec>) -> Result<View, ViewError> {
    let mut problems = Vec::new();
    let mut tables: HashMap<String, (u32, HashMap<String, SourceColumn>)> = HashMap::new();
    for (i, t) in job.tables().enumerate() {
        match table(client, t).await? {
            Some((oid, kind, cols)) => {
                if i == 0 {
                    if let Some(why) = unfit_main_table(kind) {
                        problems.push(format!("from.table {}: {why}", t.name));
                    }
                }
                tables.insert(t.alias.clone(), (oid, cols));
            }
            None => problems.push(format!("table {} does not exist in the source", t.name)),
        }
    }
    if !problems.is_empty() {
        return Err(ViewError::Problems(problems));
    }
    let table_of = |alias: &str| {
        job.tables()
            .find(|t| t.alias == alias)
            .map(|t| t.name.to_string())
    };
    let lookup = |r: &ColumnRef| {
        tables
            .get(&r.alias)
            .and_then(|(_, cols)| cols.get(&r.column))
            .cloned()
    };
    let missing = |i: usize, r: &ColumnRef| {
        format!(
            "column[{i}] ({}): source column {}.{} does not exist (was it dropped? then mark the column deleted = true)",
            job.columns[i].name,
            table_of(&r.alias).unwrap_or_default(),
            r.column
        )
    };

    for c in &job.joins {
        for (a, b) in &c.on {
            for r in [a, b] {
                if lookup(r).is_none() {
                    problems.push(format!(
                        "join {}: source column {}.{} does not exist",
                        c.table.alias,
                        table_of(&r.alias).unwrap_or_default(),
                        r.column
                    ));
                }
            }
        }
    }

    let mut columns = Vec::new();
    let mut settings = Vec::new();
    let mut checks = Vec::new();
    // Tables whose rows may be missing from a view row (left joined): their columns are NULL
    // there whatever their declaration says.
    let outer: Vec<&str> = job
        .joins
        .iter()
        .filter(|j| j.kind == crate::config::JoinKind::Left)
        .map(|j| j.table.alias.as_str())
        .collect();
    let clickhouse = job.dwh == crate::config::DwhKind::ClickHouse;
    for (i, c) in job.columns.iter().enumerate() {
        // For a ClickHouse DWH a column's `type` names a ClickHouse type: the source sends the
        // value as it is and the DWH's mapping formats it for that type.
        let dwh_type = c.ty.clone().filter(|_| clickhouse);
        if let Some(named) = &dwh_type {
            if named.contains("DateTime") && !named.replace(' ', "").contains("'UTC'") {
                problems.push(format!(
                    "column[{i}] ({}): type {named:?}: ClickHouse reads a time in the column's time \
                     zone, and pgtide writes them in UTC: name it, as in DateTime64(3, 'UTC')",
                    c.name
                ));
                continue;
            }
        }
        let ty = match &c.ty {
            None => None,
            Some(_) if clickhouse => None,
            Some(ty) => match check_type(client, ty).await? {
                Ok(canonical) => Some(canonical),
                Err(m) => {
                    problems.push(format!("column[{i}] ({}): type {ty:?}: {m}", c.name));
                    continue;
                }
            },
        };
        let cast = |expr: String, natural: Option<&SourceColumn>| -> (String, String) {
            match (&ty, natural) {
                (Some(ty), _) => (format!("({expr})::{ty}"), ty.clone()),
                (None, Some(n)) if n.target_type != n.src_type => (
                    format!("({expr})::{}", n.target_type),
                    n.target_type.clone(),
                ),
                (None, Some(n)) => (expr, n.target_type.clone()),
                (None, None) => (expr, "text".into()),
            }
        };
        let mut load = None;
        let mut stage_type = None;
        let mut nullable = true;
        let origin;
        let (expr, target_type) = match &c.kind {
            ColumnKind::Direct(r) => match lookup(r) {
                Some(col) => {
                    origin = r.to_string();
                    nullable = !col.not_null || outer.contains(&r.alias.as_str());
                    cast(sql::column(&r.alias, &r.column), Some(&col))
                }
                None => {
                    problems.push(missing(i, r));
                    continue;
                }
            },
            ColumnKind::Map { from, map, default } => {
                if lookup(from).is_none() {
                    problems.push(missing(i, from));
                    continue;
                }
                origin = format!("{from} map");
                let name = format!("map{i}");
                settings.push(Setting {
                    name: name.clone(),
                    value: serde_json::to_string(map).unwrap_or_default(),
                });
                let raw = format!("({})::text", sql::column(&from.alias, &from.column));
                let mut e = format!("current_setting('{SETTING_PREFIX}{name}')::jsonb ->> {raw}");
                match default {
                    Some(d) => {
                        let dname = format!("mapdefault{i}");
                        settings.push(Setting {
                            name: dname.clone(),
                            value: d.clone(),
                        });
                        e = format!("coalesce({e}, current_setting('{SETTING_PREFIX}{dname}'))");
                    }
                    None => checks.push(Check {
                        column: c.name.clone(),
                        origin: origin.clone(),
                        kind: CheckKind::Unmapped {
                            raw,
                            map_setting: name,
                        },
                    }),
                }
                cast(e, None)
            }
            ColumnKind::Json {
                from,
                path,
                on_error,
            } => {
                let Some(col) = lookup(from) else {
                    problems.push(missing(i, from));
                    continue;
                };
                if col.src_type != "jsonb" && col.src_type != "json" {
                    problems.push(format!(
                        "column[{i}] ({}): source column {from} is {}, not json or jsonb",
                        c.name, col.src_type
                    ));
                    continue;
                }
                origin = format!("{from} json {}", path.join("."));
                let doc = format!("({})::jsonb", sql::column(&from.alias, &from.column));
                settings.push(Setting {
                    name: format!("path{i}"),
                    value: text_array(path),
                });
                let raw = format!("{doc} #>> current_setting('{SETTING_PREFIX}path{i}')::text[]");
                let steps: Vec<(String, bool)> = (0..path.len())
                    .map(|k| {
                        let name = format!("step{i}_{k}");
                        settings.push(Setting {
                            name: name.clone(),
                            value: text_array(&path[..k]),
                        });
                        (name, path[k].parse::<u32>().is_ok())
                    })
                    .collect();
                let ty = ty.clone().unwrap_or_else(|| "text".into());
                let kind = CheckKind::Json {
                    doc,
                    raw: raw.clone(),
                    steps,
                    path: path.clone(),
                    ty: ty.clone(),
                    on_error: *on_error,
                };
                let shape = kind.shape_ok().expect("a json check");
                let raw = raw.clone();
                checks.push(Check {
                    column: c.name.clone(),
                    origin: origin.clone(),
                    kind,
                });
                match on_error {
                    // A wrong shape divides by zero: the batch stops, and the diagnosis
                    // that follows names the row.
                    // A value means every step of the path was traversable, so the shape is
                    // checked only where there is none.
                    OnError::Fail => (
                        format!(
                            "coalesce(({raw})::{ty}, case when {shape} then null::{ty} else (1 / ({shape})::int)::text::{ty} end)"
                        ),
                        ty,
                    ),
                    // The DWH casts, turning what does not cast into NULL (and counting it).
                    OnError::Null => {
                        if ty != "text" {
                            load = Some(format!(
                                "{}.try_cast(s.{}, null::{ty})",
                                quote_ident(crate::config::names::SCHEMA),
                                quote_ident(&c.name)
                            ));
                            stage_type = Some("text".to_string());
                        }
                        // A path through a scalar reads as NULL already; the stats count it.
                        (raw, ty)
                    }
                }
            }
            ColumnKind::Sql(expr) => {
                let natural = match sql_type(client, job, expr).await? {
                    Ok(t) => t,
                    Err(m) => {
                        problems.push(format!("column[{i}] ({}).sql: {m}", c.name));
                        continue;
                    }
                };
                origin = super::SQL_ORIGIN.into();
                cast(format!("({expr})"), Some(&natural))
            }
            ColumnKind::Deleted { .. } => {
                origin = "deleted".into();
                let ty = ty.clone().unwrap_or_else(|| "text".into());
                (format!("null::{ty}"), ty)
            }
        };
        columns.push(ViewColumn {
            name: c.name.clone(),
            expr,
            stage_type: stage_type.unwrap_or_else(|| target_type.clone()),
            target_type,
            load,
            origin,
            nullable,
            dwh_type,
        });
    }

    let main = &tables[&job.from.alias];
    let cursor_names = match &job.watermark {
        Some(w) => w.clone(),
        None => match primary_key(client, main.0).await? {
            Some(pk) => vec![pk],
            None => {
                problems.push(format!(
                    "watermark: {} has no single-column primary key; set watermark = [\"column\", ...]",
                    job.from.name
                ));
                Vec::new()
            }
        },
    };
    let mut cursor = Vec::new();
    for name in cursor_names {
        match main.1.get(&name) {
            Some(col) => cursor.push(CursorColumn {
                name,
                sql_type: col.src_type.clone(),
            }),
            None => problems.push(format!(
                "watermark: column {}.{name} does not exist",
                job.from.name
            )),
        }
    }

    let captured = capture(job, &tables, &mut problems);
    let view = View {
        job: job.clone(),
        columns,
        cursor,
        settings,
        checks,
        captured,
    };
    if problems.is_empty() {
        // The whole query must plan; settings it reads are set for the probe's transaction.
        if let Err(e) = probe(client, &view).await {
            problems.push(format!("view query: {}", pg::message(&e)));
        }
    }
    if problems.is_empty() {
        Ok(view)
    } else {
        Err(ViewError::Problems(problems))
    }
}

/// What triggers record per table. A notify job finds the view rows of a deleted main-table row
/// by its key, so every key column must be a main-table column taken as it is.
fn capture(
    job: &JobSpec,
    tables: &HashMap<String, (u32, HashMap<String, SourceColumn>)>,
    problems: &mut Vec<String>,
) -> Vec<Captured> {
    let type_of = |r: &ColumnRef| {
        tables
            .get(&r.alias)
            .and_then(|(_, cols)| cols.get(&r.column))
            .map(|c| c.src_type.clone())
            .unwrap_or_default()
    };
    let mut main = Captured {
        alias: job.from.alias.clone(),
        columns: Vec::new(),
        matches: Vec::new(),
    };
    for k in &job.key {
        match job.columns.iter().find(|c| &c.name == k).map(|c| &c.kind) {
            Some(ColumnKind::Direct(r)) if r.alias == job.from.alias => {
                main.columns.push(r.column.clone());
                main.matches.push((sql::column(&r.alias, &r.column), type_of(r)));
            }
            _ if job.mode == crate::config::Mode::Notify => problems.push(format!(
                "key: {k:?} must be a column of the main table taken as it is (from = \"{}.column\"), so that a notify job can name the rows of a deleted row",
                job.from.alias
            )),
            _ => {}
        }
    }
    let mut out = vec![main];
    for j in &job.joins {
        out.push(Captured {
            alias: j.table.alias.clone(),
            columns: j.on.iter().map(|(_, this)| this.column.clone()).collect(),
            matches: j
                .on
                .iter()
                .map(|(earlier, _)| {
                    (
                        sql::column(&earlier.alias, &earlier.column),
                        type_of(earlier),
                    )
                })
                .collect(),
        });
    }
    out
}

/// Why a relation of kind `relkind` cannot be a job's main table, if it cannot.
///
/// Exactness rests on each main-table row's `xmin` (the transaction that wrote it): rechecks
/// find late rows by it, and a notify job's triggers fire on the table itself. Views,
/// materialized views and foreign tables have neither, so a job on one could not promise that
/// no row is lost; it is refused before anything is read.
fn unfit_main_table(relkind: i8) -> Option<&'static str> {
    let why = match relkind as u8 {
        b'v' => "is a view; pgtide finds rows that commit late by the main table's row versions (xmin), which a view does not have: make its base table the main table and add the other tables as [[join]]",
        b'm' => "is a materialized view; pgtide finds rows that commit late by the main table's row versions (xmin), and a refresh rewrites every row: make the tables it is built from the main table and [[join]]s",
        b'f' => "is a foreign table; pgtide finds rows that commit late by the main table's row versions (xmin), which a foreign table does not have: run pgtide against the server that holds the table",
        _ => return None,
    };
    Some(why)
}

async fn table(
    client: &Client,
    t: &TableRef,
) -> Result<Option<(u32, i8, HashMap<String, SourceColumn>)>, ViewError> {
    let row = client
        .query_opt(
            "select c.oid, c.relkind from pg_class c join pg_namespace ns on ns.oid = c.relnamespace
             where ns.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p', 'v', 'm', 'f')",
            &[&t.name.schema, &t.name.name],
        )
        .await
        .map_err(ViewError::Db)?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let kind: i8 = row.get(1);
    let q = format!(
        "select a.attname, {}, a.attnotnull from pg_attribute a join pg_type t on t.oid = a.atttypid {TYPE_JOINS}
         where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped",
        TYPE_COLUMNS.replace("TYPMOD", "a.atttypmod")
    );
    let rows = client.query(&q, &[&oid]).await.map_err(ViewError::Db)?;
    let cols = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                SourceColumn {
                    src_type: r.get(1),
                    target_type: r.get(2),
                    not_null: r.get(3),
                },
            )
        })
        .collect();
    Ok(Some((oid, kind, cols)))
}

async fn primary_key(client: &Client, table: u32) -> Result<Option<String>, ViewError> {
    let rows = client
        .query(
            "select a.attname from pg_index i
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
             where i.indrelid = $1 and i.indisprimary",
            &[&table],
        )
        .await
        .map_err(ViewError::Db)?;
    Ok(if rows.len() == 1 {
        Some(rows[0].get(0))
    } else {
        None
    })
}

/// Why the source refuses a job's type or `sql` expression: one of the job's problems.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("no such type in the source")]
    NoSuchType,
    #[error("{}", pg::message(.0))]
    Server(#[source] tokio_postgres::Error),
}

/// The source's own spelling of `ty` if its type parser accepts it (only then is it written
/// into SQL). A type with a modifier (`numeric(12,2)`) keeps the job's spelling, which the
/// parser accepted, since the canonical name alone would drop the modifier.
async fn check_type(client: &Client, ty: &str) -> Result<Result<String, Refused>, ViewError> {
    match client
        .query_one("select format_type(to_regtype($1), null)", &[&ty])
        .await
    {
        Ok(row) => match row.get::<_, Option<String>>(0) {
            Some(_) if ty.contains('(') => Ok(Ok(ty.to_string())),
            Some(canonical) => Ok(Ok(canonical)),
            None => Ok(Err(Refused::NoSuchType)),
        },
        Err(e) if e.code().is_some() => Ok(Err(Refused::Server(e))),
        Err(e) => Err(ViewError::Db(e)),
    }
}

/// The natural type of a `sql` expression, found by preparing it over the view's tables.
async fn sql_type(
    client: &Client,
    job: &std::sync::Arc<JobSpec>,
    expr: &str,
) -> Result<Result<SourceColumn, Refused>, ViewError> {
    let probe_view = View {
        job: job.clone(),
        columns: Vec::new(),
        cursor: Vec::new(),
        settings: Vec::new(),
        checks: Vec::new(),
        captured: Vec::new(),
    };
    let q = format!("select ({expr}) {} limit 0", sql::from_clause(&probe_view));
    let stmt = match client.prepare(&q).await {
        Ok(s) => s,
        Err(e) if e.code().is_some() => return Ok(Err(Refused::Server(e))),
        Err(e) => return Err(ViewError::Db(e)),
    };
    let oid = stmt.columns()[0].type_().oid();
    let q = format!(
        "select {} from pg_type t {TYPE_JOINS} where t.oid = $1",
        TYPE_COLUMNS.replace("TYPMOD", "null")
    );
    let row = client.query_one(&q, &[&oid]).await.map_err(ViewError::Db)?;
    Ok(Ok(SourceColumn {
        src_type: row.get(0),
        target_type: row.get(1),
        not_null: false,
    }))
}

async fn probe(client: &Client, view: &View) -> Result<(), tokio_postgres::Error> {
    let tx_settings = settings_statement(&view.settings);
    client.batch_execute("begin read only").await?;
    let result = async {
        if let Some((q, names, values)) = &tx_settings {
            client.execute(q.as_str(), &[names, values]).await?;
        }
        client.prepare(&sql::probe(view)).await?;
        client.query(&sql::probe(view), &[]).await.map(|_| ())
    }
    .await;
    client.batch_execute("rollback").await?;
    result
}

/// One statement that sets every setting for the current transaction, with its parameters.
pub fn settings_statement(settings: &[Setting]) -> Option<(String, Vec<String>, Vec<String>)> {
    if settings.is_empty() {
        return None;
    }
    let names = settings
        .iter()
        .map(|s| format!("{SETTING_PREFIX}{}", s.name))
        .collect();
    let values = settings.iter().map(|s| s.value.clone()).collect();
    Some((
        "select count(set_config(k, v, true)) from unnest($1::text[], $2::text[]) as s(k, v)"
            .into(),
        names,
        values,
    ))
}

/// A PostgreSQL text[] literal, every element quoted.
pub fn text_array(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_array_quotes_elements() {
        assert_eq!(
            text_array(&["a".into(), "b,\"c\"".into()]),
            r#"{"a","b,\"c\""}"#
        );
    }

    #[test]
    fn settings_are_one_bound_statement() {
        let (q, names, values) = settings_statement(&[Setting {
            name: "x".into(),
            value: "1'; drop".into(),
        }])
        .unwrap();
        assert!(!q.contains("drop"));
        assert_eq!(names, vec!["pgtide.x".to_string()]);
        assert_eq!(values, vec!["1'; drop".to_string()]);
    }
}
