//! The DWH side: the target table (created, evolved, checked), the staging table that COPY
//! fills, the set-based upsert, the per-job lock and the control table holding each job's
//! position in the same transaction as its rows.

use std::collections::HashMap;

use tokio_postgres::{Client, Transaction};

use crate::config::QualifiedName;
use crate::pg::{self, quote_ident, quote_qualified};
use crate::position::Position;
use crate::view::View;

pub mod clickhouse;
pub mod dwh;
mod target;
pub mod warehouse;

pub use target::{check_target, ensure_target, TargetState};

pub use crate::config::names::SCHEMA as CONTROL_SCHEMA;
/// Session-local staging table the COPY writes into.
pub const STAGE: &str = "_pgtide_stage";
pub const LOADED_AT: &str = "_pgtide_loaded_at";
/// With `on_delete = "soft"`: the view row is gone from the source.
pub const DELETED: &str = "_pgtide_deleted";

pub(crate) fn soft(view: &View) -> bool {
    view.job.mode == crate::config::Mode::Notify
        && view.job.on_delete == crate::config::OnDelete::Soft
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("dwh: {}", pg::message(.0))]
    Db(#[from] tokio_postgres::Error),
    /// The ClickHouse url does not parse (the config check lets none through).
    #[error("dwh url: {0}")]
    Url(#[source] crate::clickhouse::UrlError),
    /// ClickHouse refused or could not be reached.
    #[error("dwh: {0}")]
    ClickHouse(#[from] crate::clickhouse::ChError),
    /// The target exists in a shape the job cannot write to.
    #[error("target {table}: {}", .problems.join("; "))]
    Incompatible {
        table: String,
        problems: Vec<String>,
    },
    /// Creating or changing the target failed; the cause says whether trying again can help
    /// (a connection dropped during the DDL) or not (privileges).
    #[error("target {table}: {}", pg::message(.source))]
    Ddl {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A batch the target cannot take as it is (bad keys).
    #[error("{0}")]
    Data(KeyError),
    /// The control table holds a position pgtide cannot read.
    #[error("control table position of job {job} is unreadable: {source}")]
    UnreadablePosition {
        job: String,
        #[source]
        source: serde_json::Error,
    },
    /// The control table holds a position at least as new as the one being written: someone
    /// else moved the job on (its lock was lost, or it was taken without the lock). The
    /// caller's transaction must roll back, rows included.
    #[error("position of job {job} would move backwards (seq {seq}, stored {stored}): another pgtide wrote it")]
    Backwards { job: String, seq: i64, stored: i64 },
}

/// Rows of a batch whose key cannot be a key of the target.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Rows of one batch share a key: a few of the keys, each with its number of rows.
    #[error("the view's key is not unique: {} in one batch (does a join match several rows?)", repeated(.columns, .keys))]
    NotUnique {
        columns: Vec<String>,
        keys: Vec<(String, i64)>,
    },
    /// A row (its start, as JSON) with NULL in a key column.
    #[error("a view row has NULL in its key ({}): {row}", .columns.join(", "))]
    Null { columns: Vec<String>, row: String },
}

/// `(id)=(7) appears 2 times, (id)=(9) appears 3 times`.
fn repeated(columns: &[String], keys: &[(String, i64)]) -> String {
    let list = columns.join(", ");
    keys.iter()
        .map(|(key, n)| format!("({list})={key} appears {n} times"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Try to take the job's lock for this session; `false` when another session holds it.
pub async fn try_lock(client: &Client, job: &str) -> Result<bool, SinkError> {
    let row = client
        .query_one(
            "select pg_try_advisory_lock(hashtextextended('pgtide job ' || $1, 0))",
            &[&job],
        )
        .await?;
    Ok(row.get(0))
}

/// The session holding a job's lock answers (a session lock lasts as long as its session).
pub async fn lock_alive(client: &Client) -> Result<(), SinkError> {
    client.simple_query("select 1").await?;
    Ok(())
}

/// Release the job's lock now, rather than whenever the server notices the session is gone
/// (a process that exits right after a run would otherwise make the next one exit 3).
pub async fn unlock(client: &Client, job: &str) -> Result<(), SinkError> {
    client
        .execute(
            "select pg_advisory_unlock(hashtextextended('pgtide job ' || $1, 0))",
            &[&job],
        )
        .await?;
    Ok(())
}

/// Create the control schema and table if missing (serialized, so two processes starting at
/// once do not trip over each other's `create`).
pub async fn ensure_control(client: &mut Client) -> Result<(), SinkError> {
    let tx = client.transaction().await?;
    tx.execute(
        "select pg_advisory_xact_lock(hashtextextended('pgtide control', 0))",
        &[],
    )
    .await?;
    tx.batch_execute(&format!(
        "create schema if not exists {s};
         create table if not exists {s}.positions (
             job text primary key,
             position jsonb not null,
             seq bigint not null,
             updated_at timestamptz not null default now()
         );
         -- The value cast to the type of template, or NULL when it does not cast
         -- (json columns with on_error = \"null\").
         create or replace function {s}.try_cast(value text, template anyelement) returns anyelement
         language plpgsql immutable as $body$
         begin
             template := value;
             return template;
         exception when others then
             return null;
         end
         $body$",
        s = quote_ident(CONTROL_SCHEMA)
    ))
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn read_position(client: &Client, job: &str) -> Result<Option<Position>, SinkError> {
    let q = format!(
        "select position::text from {}.positions where job = $1",
        quote_ident(CONTROL_SCHEMA)
    );
    let row = client.query_opt(&q, &[&job]).await?;
    match row {
        None => Ok(None),
        Some(r) => {
            let text: String = r.get(0);
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|source| SinkError::UnreadablePosition {
                    job: job.to_string(),
                    source,
                })
        }
    }
}

/// Store the position in the transaction that also holds the batch's rows. The control row
/// only moves forward: a `seq` not greater than the stored one changes nothing and is
/// `SinkError::Backwards`, whatever lock the caller holds.
pub async fn write_position(
    tx: &Transaction<'_>,
    job: &str,
    pos: &Position,
) -> Result<(), SinkError> {
    let control = quote_ident(CONTROL_SCHEMA);
    let q = format!(
        "insert into {control}.positions as p (job, position, seq, updated_at)
         values ($1, $2::text::jsonb, $3, now())
         on conflict (job) do update set position = excluded.position, seq = excluded.seq, updated_at = now()
         where p.seq < excluded.seq"
    );
    let text = serde_json::to_string(pos).expect("position serializes");
    if tx.execute(&q, &[&job, &text, &pos.seq]).await? == 1 {
        return Ok(());
    }
    let stored: i64 = tx
        .query_one(
            &format!("select seq from {control}.positions where job = $1"),
            &[&job],
        )
        .await?
        .get(0);
    Err(SinkError::Backwards {
        job: job.to_string(),
        seq: pos.seq,
        stored,
    })
}

/// (Re)create this session's staging table with the view's column types.
pub async fn create_staging(client: &Client, view: &View) -> Result<(), SinkError> {
    let cols: Vec<String> = view
        .columns
        .iter()
        .map(|c| format!("{} {}", quote_ident(&c.name), c.stage_type))
        .collect();
    client
        .batch_execute(&format!(
            "drop table if exists pg_temp.{s}; create temp table {s} ({}) on commit delete rows",
            cols.join(", "),
            s = quote_ident(STAGE)
        ))
        .await?;
    Ok(())
}

/// `copy <staging or target> (...) from stdin (format binary)`.
pub fn copy_in_sql(view: &View, direct: bool) -> String {
    let cols: Vec<String> = view.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let table = if direct {
        quote_qualified(&view.job.target.schema, &view.job.target.name)
    } else {
        format!("pg_temp.{}", quote_ident(STAGE))
    };
    format!(
        "copy {table} ({}) from stdin (format binary)",
        cols.join(", ")
    )
}

/// Types without an equality operator: compared as text to find unchanged rows.
pub(crate) fn compare_as_text(ty: &str) -> bool {
    let base = ty.trim_end_matches("[]");
    matches!(
        base,
        "json" | "xml" | "point" | "line" | "lseg" | "box" | "path" | "polygon" | "circle"
    )
}

/// The upsert from staging into the target: one statement per batch, rows that did not
/// change are not rewritten.
pub fn upsert_sql(view: &View) -> String {
    let target = &view.job.target;
    let cols: Vec<String> = view.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let key: Vec<String> = view.job.key.iter().map(|k| quote_ident(k)).collect();
    let rest: Vec<&crate::view::ViewColumn> = view
        .columns
        .iter()
        .filter(|c| !view.job.key.contains(&c.name))
        .collect();
    // A soft-deleted row that is back in the view is un-deleted.
    let undelete = soft(view).then(|| format!("t.{}", quote_ident(DELETED)));
    let action = if rest.is_empty() {
        match &undelete {
            None => "nothing".to_string(),
            Some(d) => format!(
                "update set {n} = false, {l} = now() where {d}",
                n = quote_ident(DELETED),
                l = quote_ident(LOADED_AT)
            ),
        }
    } else {
        let sets: Vec<String> = rest
            .iter()
            .map(|c| format!("{n} = excluded.{n}", n = quote_ident(&c.name)))
            .chain(std::iter::once(format!(
                "{} = now()",
                quote_ident(LOADED_AT)
            )))
            .chain(
                undelete
                    .as_ref()
                    .map(|_| format!("{} = false", quote_ident(DELETED))),
            )
            .collect();
        let side = |prefix: &str| -> String {
            let v: Vec<String> = rest
                .iter()
                .map(|c| {
                    let e = format!("{prefix}.{}", quote_ident(&c.name));
                    if compare_as_text(&c.target_type) {
                        format!("{e}::text")
                    } else {
                        e
                    }
                })
                .collect();
            format!("({})", v.join(", "))
        };
        format!(
            "update set {} where {} is distinct from {}{}",
            sets.join(", "),
            side("t"),
            side("excluded"),
            undelete
                .as_ref()
                .map(|d| format!(" or {d}"))
                .unwrap_or_default()
        )
    };
    let values: Vec<String> = view
        .columns
        .iter()
        .map(|c| {
            c.load
                .clone()
                .unwrap_or_else(|| format!("s.{}", quote_ident(&c.name)))
        })
        .collect();
    format!(
        "insert into {} as t ({}) select {} from pg_temp.{} s on conflict ({}) do {action}",
        quote_qualified(&target.schema, &target.name),
        cols.join(", "),
        values.join(", "),
        quote_ident(STAGE),
        key.join(", ")
    )
}

/// Which target rows may be gone from the view after a batch of a notify job.
pub enum Missing<'a> {
    /// Rows of these keys (main-table key values as text) that the batch did not bring.
    Keys(&'a [Vec<String>]),
    /// Every row the batch did not bring (after a TRUNCATE the batch is the whole view).
    All,
}

/// Apply the job's `on_delete` to target rows that the staged batch shows gone from the view:
/// delete them, mark them `_pgtide_deleted`, or leave them. Returns how many were affected.
pub async fn remove_missing(
    tx: &Transaction<'_>,
    view: &View,
    missing: Missing<'_>,
) -> Result<u64, SinkError> {
    use crate::config::OnDelete;
    let target = quote_qualified(&view.job.target.schema, &view.job.target.name);
    let keys: Vec<&crate::view::ViewColumn> = view
        .job
        .key
        .iter()
        .filter_map(|k| view.columns.iter().find(|c| &c.name == k))
        .collect();
    let t_keys: Vec<String> = keys
        .iter()
        .map(|c| format!("t.{}", quote_ident(&c.name)))
        .collect();
    let s_keys: Vec<String> = keys
        .iter()
        .map(|c| format!("s.{}", quote_ident(&c.name)))
        .collect();
    let gone = format!(
        "not exists (select from pg_temp.{} s where ({}) = ({}))",
        quote_ident(STAGE),
        s_keys.join(", "),
        t_keys.join(", ")
    );
    let (filter, columns): (String, Vec<Vec<String>>) = match missing {
        Missing::All => ("true".into(), Vec::new()),
        Missing::Keys(values) => {
            let arrays: Vec<String> = keys
                .iter()
                .enumerate()
                .map(|(i, c)| format!("${}::text[]::{}[]", i + 1, c.target_type))
                .collect();
            let columns = (0..keys.len())
                .map(|i| values.iter().map(|v| v[i].clone()).collect())
                .collect();
            (crate::view::sql::in_arrays(&t_keys, &arrays), columns)
        }
    };
    let q = match view.job.on_delete {
        OnDelete::Ignore => return Ok(0),
        OnDelete::Delete => format!("delete from {target} t where {filter} and {gone}"),
        OnDelete::Soft => format!(
            "update {target} t set {d} = true, {l} = now() where {filter} and not t.{d} and {gone}",
            d = quote_ident(DELETED),
            l = quote_ident(LOADED_AT)
        ),
    };
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = columns
        .iter()
        .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    Ok(tx.execute(&q, &params).await?)
}

/// Per column the DWH casts (`load`), how many staged values did not cast and became NULL.
pub async fn cast_failures(
    tx: &Transaction<'_>,
    view: &View,
) -> Result<Vec<(String, u64)>, SinkError> {
    let loads: Vec<(&str, String)> = view
        .columns
        .iter()
        .filter_map(|c| {
            c.load.as_ref().map(|load| {
                (
                    c.name.as_str(),
                    format!(
                        "count(*) filter (where s.{} is not null and {load} is null)",
                        quote_ident(&c.name)
                    ),
                )
            })
        })
        .collect();
    if loads.is_empty() {
        return Ok(Vec::new());
    }
    let counts: Vec<&str> = loads.iter().map(|(_, c)| c.as_str()).collect();
    let q = format!(
        "select {} from pg_temp.{} s",
        counts.join(", "),
        quote_ident(STAGE)
    );
    let row = tx.query_one(&q, &[]).await?;
    Ok(loads
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.to_string(), row.get::<_, i64>(i) as u64))
        .collect())
}

/// Apply the staged batch; returns the number of rows inserted or changed. A key that is not
/// unique within the batch, or NULL, is reported with the key values instead of SQLSTATE 21000.
pub async fn upsert(tx: &Transaction<'_>, view: &View) -> Result<u64, SinkError> {
    tx.batch_execute("savepoint pgtide_upsert").await?;
    match tx.execute(upsert_sql(view).as_str(), &[]).await {
        Ok(n) => Ok(n),
        Err(e) => {
            let code = e.code().cloned();
            tx.batch_execute("rollback to savepoint pgtide_upsert")
                .await?;
            let key: Vec<String> = view.job.key.iter().map(|k| quote_ident(k)).collect();
            let stage = format!("pg_temp.{}", quote_ident(STAGE));
            if code == Some(tokio_postgres::error::SqlState::CARDINALITY_VIOLATION) {
                let q = format!(
                    "select row({k})::text, count(*) from {stage} group by {k} having count(*) > 1 limit 3",
                    k = key.join(", ")
                );
                let rows = tx.query(&q, &[]).await?;
                return Err(SinkError::Data(KeyError::NotUnique {
                    columns: view.job.key.clone(),
                    keys: rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
                }));
            }
            if code == Some(tokio_postgres::error::SqlState::NOT_NULL_VIOLATION) {
                let nulls: Vec<String> = key.iter().map(|k| format!("{k} is null")).collect();
                let q = format!(
                    "select left(row_to_json(s)::text, 300) from {stage} s where {} limit 1",
                    nulls.join(" or ")
                );
                if let Some(r) = tx.query_opt(&q, &[]).await? {
                    return Err(SinkError::Data(KeyError::Null {
                        columns: view.job.key.clone(),
                        row: r.get(0),
                    }));
                }
            }
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::{parse_job, Problems};
    use crate::view::ViewColumn;

    fn view(cols: &[(&str, &str)], key: &str) -> View {
        let text = format!(
            "interval_secs = 1\nkey = [\"{key}\"]\ntarget = \"dw.T x\"\n[from]\ntable = \"t\"\n{}",
            cols.iter()
                .map(|(n, _)| format!("[[column]]\nname = \"{n}\"\nfrom = \"t.{n}\"\n"))
                .collect::<String>()
        );
        let sources = [("s".to_string(), "postgres://x@y/z".to_string())].into();
        let mut p = Problems::new(Path::new("j.toml"));
        let job = parse_job(
            Path::new("j.toml"),
            &text,
            &sources,
            "public",
            Default::default(),
            &mut p,
        )
        .expect("valid");
        View {
            job: Arc::new(job),
            columns: cols
                .iter()
                .map(|(n, t)| ViewColumn {
                    name: n.to_string(),
                    expr: String::new(),
                    target_type: t.to_string(),
                    stage_type: t.to_string(),
                    load: None,
                    origin: String::new(),
                    nullable: true,
                    dwh_type: None,
                })
                .collect(),
            cursor: vec![],
            settings: vec![],
            checks: vec![],
            captured: vec![],
        }
    }

    #[test]
    fn upsert_skips_unchanged_rows_and_compares_json_as_text() {
        let sql = upsert_sql(&view(
            &[("id", "bigint"), ("doc", "json"), ("n", "integer")],
            "id",
        ));
        assert_eq!(
            sql,
            "insert into \"dw\".\"T x\" as t (\"id\", \"doc\", \"n\") select s.\"id\", s.\"doc\", s.\"n\" from pg_temp.\"_pgtide_stage\" s \
             on conflict (\"id\") do update set \"doc\" = excluded.\"doc\", \"n\" = excluded.\"n\", \"_pgtide_loaded_at\" = now() \
             where (t.\"doc\"::text, t.\"n\") is distinct from (excluded.\"doc\"::text, excluded.\"n\")"
        );
    }

    #[test]
    fn key_only_views_do_nothing_on_conflict() {
        assert!(upsert_sql(&view(&[("id", "bigint")], "id"))
            .ends_with("on conflict (\"id\") do nothing"));
    }
}
