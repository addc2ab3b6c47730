//! The target table: created when missing, columns the job gained added, and an existing
//! table whose column types or key cannot take the view refused before anything is written.

use super::*;

/// What the target needs before the view can be written into it.
struct TargetPlan {
    /// DDL to run: a `create table`, or an `alter table ... add column ...`.
    ddl: Option<String>,
    /// Every view column has exactly its type in the target, so binary COPY fits it as is.
    exact: bool,
    /// Incompatibilities; when any, nothing is changed.
    problems: Vec<String>,
}

async fn plan_target(tx: &Transaction<'_>, view: &View) -> Result<TargetPlan, SinkError> {
    let target = &view.job.target;
    let quoted = quote_qualified(&target.schema, &target.name);
    let Some(existing) = target_columns(tx, target).await? else {
        let mut cols: Vec<String> = view
            .columns
            .iter()
            .map(|c| format!("{} {}", quote_ident(&c.name), c.target_type))
            .collect();
        cols.push(format!(
            "{} timestamptz not null default now()",
            quote_ident(LOADED_AT)
        ));
        if soft(view) {
            cols.push(format!(
                "{} boolean not null default false",
                quote_ident(DELETED)
            ));
        }
        let key: Vec<String> = view.job.key.iter().map(|k| quote_ident(k)).collect();
        let ddl = format!(
            "create schema if not exists {}; create table if not exists {quoted} ({}, primary key ({}))",
            quote_ident(&target.schema),
            cols.join(", "),
            key.join(", ")
        );
        return Ok(TargetPlan {
            ddl: Some(ddl),
            exact: true,
            problems: Vec::new(),
        });
    };
    let mut problems = Vec::new();
    let mut additions = Vec::new();
    let mut exact = true;
    for c in &view.columns {
        let Some(ours) = type_oid(tx, &c.target_type).await? else {
            problems.push(format!(
                "column {}: type {} does not exist in the dwh",
                c.name, c.target_type
            ));
            continue;
        };
        match existing.get(&c.name) {
            None => additions.push(format!("add column {} {}", quote_ident(&c.name), c.target_type)),
            Some((oid, shown)) if *oid != ours && !assignable(tx, ours, *oid).await? => problems.push(format!(
                "column {} is {shown} in the target but the view gives {}; change the type in the job or in the target",
                c.name, c.target_type
            )),
            Some((oid, shown)) => exact &= *oid == ours && shown == &c.target_type,
        }
    }
    if !existing.contains_key(LOADED_AT) {
        additions.push(format!(
            "add column {} timestamptz not null default now()",
            quote_ident(LOADED_AT)
        ));
    }
    if soft(view) && !existing.contains_key(DELETED) {
        additions.push(format!(
            "add column {} boolean not null default false",
            quote_ident(DELETED)
        ));
    }
    let mut want = view.job.key.clone();
    want.sort();
    if !unique_keys(tx, target).await?.iter().any(|k| k == &want) {
        problems.push(format!(
            "has no primary key or unique index on ({}), which the job's key needs",
            view.job.key.join(", ")
        ));
    }
    let ddl =
        (!additions.is_empty()).then(|| format!("alter table {quoted} {}", additions.join(", ")));
    Ok(TargetPlan {
        ddl,
        exact,
        problems,
    })
}

/// What a run learns about its target before the first batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetState {
    /// Empty, with exactly the view's column types: batches may be copied straight in.
    pub copy_direct: bool,
    /// With exactly the view's column types, a unique index on the key in key order, and a key
    /// the source computes the same way each time it is read: a batch's rows whose keys lie
    /// above the target's greatest may be copied straight in, the others upserted.
    pub split: bool,
}

/// Make sure the target can take the view: create it when missing, add columns the job
/// gained, refuse incompatible column types and a key that differs. Nothing is changed when
/// a problem is found.
pub async fn ensure_target(client: &mut Client, view: &View) -> Result<TargetState, SinkError> {
    let table = view.job.target.to_string();
    let tx = client.transaction().await?;
    let plan = plan_target(&tx, view).await?;
    if !plan.problems.is_empty() {
        return Err(SinkError::Incompatible {
            table,
            problems: plan.problems,
        });
    }
    if let Some(ddl) = plan.ddl {
        tx.batch_execute(&ddl)
            .await
            .map_err(|source| SinkError::Ddl {
                table: table.clone(),
                source,
            })?;
        tracing::info!(job = %view.job.name, table = %table, ddl = %ddl, "changed target table");
    }
    let target = &view.job.target;
    let empty: bool = tx
        .query_one(
            &format!(
                "select not exists (select from {})",
                quote_qualified(&target.schema, &target.name)
            ),
            &[],
        )
        .await?
        .get(0);
    let ordered = key_index_in_order(&tx, target, &view.job.key).await?;
    tx.commit().await?;
    let exact = plan.exact && view.copies_as_is();
    Ok(TargetState {
        copy_direct: empty && exact,
        split: exact && ordered && view.key_is_plain(),
    })
}

/// Whether a unique btree index of the target holds exactly `key`, in that order, ascending
/// and with the columns' collations: `order by key desc limit 1` reads one entry of it.
async fn key_index_in_order(
    tx: &Transaction<'_>,
    target: &QualifiedName,
    key: &[String],
) -> Result<bool, SinkError> {
    let row = tx
        .query_one(
            "select exists (
                 select from pg_index i
                 join pg_class c on c.oid = i.indrelid
                 join pg_namespace n on n.oid = c.relnamespace
                 where n.nspname = $1 and c.relname = $2 and i.indisunique and i.indisvalid
                   and i.indpred is null and i.indexprs is null and i.indnkeyatts = cardinality($3::text[])
                   and (select array_agg(a.attname::text order by k.n)
                        from unnest(i.indkey::int2[]) with ordinality k(attnum, n)
                        join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
                        where k.n <= i.indnkeyatts) = $3::text[]
                   and not exists (select from unnest(i.indoption::int2[]) o where o <> 0)
                   and not exists (
                       select from unnest(i.indkey::int2[], i.indcollation::oid[]) k(attnum, coll)
                       join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
                       where k.coll <> a.attcollation))",
            &[&target.schema, &target.name, &key],
        )
        .await?;
    Ok(row.get(0))
}

/// The problems `ensure_target` would refuse on, changing nothing (for `check`).
pub async fn check_target(client: &mut Client, view: &View) -> Result<Vec<String>, SinkError> {
    let tx = client.transaction().await?;
    let plan = plan_target(&tx, view).await?;
    tx.rollback().await?;
    Ok(plan.problems)
}

async fn target_columns(
    tx: &Transaction<'_>,
    target: &QualifiedName,
) -> Result<Option<HashMap<String, (u32, String)>>, SinkError> {
    let exists = tx
        .query_opt(
            "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
            &[&target.schema, &target.name],
        )
        .await?;
    let Some(row) = exists else { return Ok(None) };
    let oid: u32 = row.get(0);
    let rows = tx
        .query(
            "select attname, atttypid, format_type(atttypid, atttypmod) from pg_attribute
             where attrelid = $1 and attnum > 0 and not attisdropped",
            &[&oid],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect(),
    ))
}

/// Column sets (sorted) of the target's primary key and unique indexes.
async fn unique_keys(
    tx: &Transaction<'_>,
    target: &QualifiedName,
) -> Result<Vec<Vec<String>>, SinkError> {
    let rows = tx
        .query(
            "select array(select a.attname::text from pg_attribute a
                          where a.attrelid = i.indrelid and a.attnum = any(i.indkey) order by 1)
             from pg_index i join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = $1 and c.relname = $2 and i.indisunique and i.indpred is null and i.indexprs is null",
            &[&target.schema, &target.name],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn type_oid(tx: &Transaction<'_>, ty: &str) -> Result<Option<u32>, SinkError> {
    match tx.query_one("select to_regtype($1)::oid", &[&ty]).await {
        Ok(r) => Ok(r.get::<_, Option<u32>>(0)),
        Err(e) if e.code().is_some() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether values of type `from` go into a column of type `to` by assignment.
async fn assignable(tx: &Transaction<'_>, from: u32, to: u32) -> Result<bool, SinkError> {
    let row = tx
        .query_one(
            "select exists (select 1 from pg_cast where castsource = $1 and casttarget = $2 and castcontext in ('i', 'a'))",
            &[&from, &to],
        )
        .await?;
    Ok(row.get(0))
}
