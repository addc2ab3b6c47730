//! The final check: every key the first pass found is read again on both sides and compared in
//! the DWH as the job's upsert compares; a key counts only if it differs twice, and keys a
//! notify job still has events for are left out. Under `--repair` what counts is rewritten.

use std::collections::{HashMap, HashSet};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Transaction};

use crate::pg::quote_ident;
use crate::source;
use crate::view::{sql, View};

use super::candidates::Spill;
use super::error::{dwh_err, src, VerifyError};
use super::plan::{Col, Plan};
use super::repair::Repair;
use super::report::{Kind, Outcome};

/// How long a running job gets to apply what it is applying before a difference is confirmed
/// (a drain takes milliseconds).
pub(super) const CONFIRM_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// Read every key found again on both sides and count those that still differ (the job not
/// having reached them now is no difference); with `repair`, rewrite them.
pub(super) async fn recheck(
    plan: &Plan,
    source: &mut Client,
    dwh: &mut Client,
    spill: Spill,
    outcome: &mut Outcome,
    mut repair: Option<&mut Repair>,
) -> Result<(), VerifyError> {
    let mut keys = spill.read()?;
    let chunk_size = plan.view.job.batch_size.max(1) as usize;
    let queries = Recheck::new(plan);
    loop {
        let chunk = keys.next_chunk(chunk_size)?;
        if chunk.is_empty() {
            return Ok(());
        }
        let first = queries.classify(plan, source, dwh, &chunk).await?;
        if first.is_empty() {
            continue;
        }
        // A change the source committed between the two reads of a round and that the job
        // applied before the DWH's read looks like a difference: confirm in a second round,
        // once the job has had a moment to apply what it was applying.
        tokio::time::sleep(CONFIRM_AFTER).await;
        let chunk: Vec<Vec<String>> = first.into_iter().map(|(i, _)| chunk[i].clone()).collect();
        let confirmed = queries.classify(plan, source, dwh, &chunk).await?;
        let mut write = Vec::new();
        let mut gone = Vec::new();
        for (i, kind) in confirmed {
            outcome.add(kind, &chunk[i]);
            match kind {
                Kind::Extra => gone.push(chunk[i].clone()),
                _ => write.push(chunk[i].clone()),
            }
        }
        if let Some(r) = repair.as_deref_mut() {
            r.fix(&plan.view, source, dwh, write, gone).await?;
        }
    }
}

/// The statements of one round of re-reading keys.
struct Recheck {
    /// The source's view rows of the keys: key, reached by the job, values as text.
    source: String,
    /// See `dwh_compare`.
    dwh: String,
}

impl Recheck {
    fn new(plan: &Plan) -> Recheck {
        let src_keys: Vec<String> = plan
            .key
            .iter()
            .map(|&i| format!("({})::{}", plan.cols[i].expr, plan.cols[i].ty))
            .collect();
        let source = format!(
            "select array[{}], ({}), array[{}]::text[] {} where {}",
            plan.src_keys().join(", "),
            plan.scope,
            plan.cols
                .iter()
                .map(|c| plan.src_text(c))
                .collect::<Vec<_>>()
                .join(", "),
            sql::from_clause(&plan.view),
            plan.key_in(&src_keys, 1)
        );
        Recheck {
            source,
            dwh: dwh_compare(plan),
        }
    }

    /// Read `keys` on both sides now; the positions in `keys` of those that differ, and how.
    async fn classify(
        &self,
        plan: &Plan,
        source: &mut Client,
        dwh: &Client,
        keys: &[Vec<String>],
    ) -> Result<Vec<(usize, Kind)>, VerifyError> {
        let columns: Vec<Vec<String>> = (0..plan.key.len())
            .map(|i| keys.iter().map(|k| k[i].clone()).collect())
            .collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let (tx, _) = source::begin(source).await.map_err(src)?;
        source::set_settings(&tx, &plan.view, plan.settings.clone())
            .await
            .map_err(src)?;
        let now: HashMap<Vec<String>, (bool, Vec<Option<String>>)> = tx
            .query(self.source.as_str(), &params)
            .await
            .map_err(src)?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        // What counts: view rows in reach, and (where extra rows count) keys the view lacks.
        let mut entries: Vec<(usize, Option<&Vec<Option<String>>>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match now.get(key) {
                Some((true, values)) => entries.push((i, Some(values))),
                Some((false, _)) => {}
                None if plan.counts_extra => entries.push((i, None)),
                None => {}
            }
        }
        if let Some(events) = &plan.events {
            let held: Vec<&Vec<String>> = entries.iter().map(|(i, _)| &keys[*i]).collect();
            let waiting = waiting(&tx, &plan.view, events, &held).await.map_err(src)?;
            entries = entries
                .into_iter()
                .enumerate()
                .filter(|(n, _)| !waiting.contains(n))
                .map(|(_, e)| e)
                .collect();
        }
        drop(tx);
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let idx: Vec<i32> = entries.iter().map(|(i, _)| *i as i32).collect();
        let present: Vec<bool> = entries.iter().map(|(_, v)| v.is_some()).collect();
        let key_columns: Vec<Vec<String>> = (0..plan.key.len())
            .map(|k| entries.iter().map(|(i, _)| keys[*i][k].clone()).collect())
            .collect();
        let values: Vec<Vec<Option<String>>> = (0..plan.cols.len())
            .map(|c| {
                entries
                    .iter()
                    .map(|(_, v)| v.and_then(|v| v.get(c).cloned().flatten()))
                    .collect()
            })
            .collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&idx, &present];
        params.extend(key_columns.iter().map(|c| c as &(dyn ToSql + Sync)));
        params.extend(values.iter().map(|c| c as &(dyn ToSql + Sync)));
        let rows = dwh
            .query(self.dwh.as_str(), &params)
            .await
            .map_err(dwh_err)?;
        let mut out: Vec<(usize, Kind)> = rows
            .iter()
            .map(|r| {
                let kind = match r.get::<_, &str>(1) {
                    "m" => Kind::Missing,
                    "d" => Kind::Different,
                    _ => Kind::Extra,
                };
                (r.get::<_, i32>(0) as usize, kind)
            })
            .collect();
        // In the order they were found, so reports name the same keys run after run.
        out.sort_by_key(|(i, _)| *i);
        Ok(out)
    }
}

/// The DWH query that classifies re-read keys: parameters are the entries' positions, whether
/// the view has the key, the key's values (one text array per key column) and the view row's
/// values (one text array per compared column). Returns (position, 'm' | 'd' | 'e').
fn dwh_compare(plan: &Plan) -> String {
    let mut arrays = vec!["$1::int4[]".to_string(), "$2::bool[]".to_string()];
    let mut names = vec!["i".to_string(), "present".to_string()];
    for n in 0..plan.key.len() {
        arrays.push(format!("${}::text[]", arrays.len() + 1));
        names.push(format!("k{n}"));
    }
    for n in 0..plan.cols.len() {
        arrays.push(format!("${}::text[]", arrays.len() + 1));
        names.push(format!("v{n}"));
    }
    let join: Vec<String> = plan
        .key
        .iter()
        .enumerate()
        .map(|(n, &i)| {
            let c = &plan.cols[i];
            format!("t.{} = s.k{n}::{}", quote_ident(&c.name), c.ty)
        })
        .collect();
    let first_key = format!("t.{}", quote_ident(&plan.cols[plan.key[0]].name));
    // Equal as the job's upsert sees it (`is distinct from`, types without equality as text):
    // what the job would not rewrite is no difference.
    let as_compared = |e: String, c: &Col| {
        if c.compare_as_text {
            format!("({e})::text")
        } else {
            e
        }
    };
    let target: Vec<String> = plan
        .cols
        .iter()
        .map(|c| {
            if c.in_target {
                as_compared(format!("t.{}", quote_ident(&c.name)), c)
            } else {
                format!("null::{}", if c.compare_as_text { "text" } else { &c.ty })
            }
        })
        .collect();
    let rebuilt: Vec<String> = plan
        .cols
        .iter()
        .enumerate()
        .map(|(i, c)| as_compared(plan.rebuilt(i, c), c))
        .collect();
    let marked = plan.marked();
    format!(
        "select i, kind from (
             select s.i, case
                 when s.present and {first_key} is null then 'm'
                 when s.present and {marked} then 'd'
                 when s.present and ({}) is distinct from ({}) then 'd'
                 when not s.present and {first_key} is not null and not {marked} then 'e'
             end as kind
             from unnest({}) as s({})
             left join {} t on {}
         ) x where kind is not null",
        target.join(", "),
        rebuilt.join(", "),
        arrays.join(", "),
        names.join(", "),
        plan.target,
        join.join(" and ")
    )
}

/// Positions in `keys` of the keys a notify job has events waiting for (a waiting TRUNCATE
/// holds every key): the job has not reached them yet.
pub(super) async fn waiting(
    tx: &Transaction<'_>,
    view: &View,
    events: &str,
    keys: &[&Vec<String>],
) -> Result<HashSet<usize>, tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let truncated: bool = tx
        .query_one(
            &format!("select exists (select from {events} where op = 'T')"),
            &[],
        )
        .await?
        .get(0);
    if truncated {
        return Ok((0..keys.len()).collect());
    }
    let main = &view.captured[0].matches;
    let idx: Vec<i32> = (0..keys.len() as i32).collect();
    let columns: Vec<Vec<String>> = (0..main.len())
        .map(|i| keys.iter().map(|k| k[i].clone()).collect())
        .collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&idx];
    params.extend(columns.iter().map(|c| c as &(dyn ToSql + Sync)));
    let arrays: Vec<String> = (0..main.len())
        .map(|i| format!("${}::text[]", i + 2))
        .collect();
    let names: Vec<String> = (0..main.len()).map(|i| format!("c{i}")).collect();
    let unnest = format!(
        "unnest($1::int4[], {}) as k(i, {})",
        arrays.join(", "),
        names.join(", ")
    );
    // The trigger records the main table's key columns as text of their own type.
    let recorded: Vec<String> = main
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("(k.c{i}::{ty})::text"))
        .collect();
    let recorded = format!("array[{}]", recorded.join(", "));
    let typed: Vec<String> = main
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("k.c{i}::{ty}"))
        .collect();
    let main_exprs: Vec<String> = main.iter().map(|(e, _)| e.clone()).collect();
    let mut queries = vec![format!(
        "select k.i from {unnest} where exists (select from {events} e where e.source = 0
             and (e.old_values = {recorded} or e.new_values = {recorded}))"
    )];
    // A change of a joined table affects the view rows it joins to (as the drain finds them).
    for (table, cap) in view.captured.iter().enumerate().skip(1) {
        let exprs: Vec<String> = cap.matches.iter().map(|(e, _)| e.clone()).collect();
        let values: Vec<String> = cap
            .matches
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("x.v[{}]::{ty}", i + 1))
            .collect();
        queries.push(format!(
            "select k.i from {unnest} where exists (
                 select {} where ({}) = ({}) and ({}) in (
                     select {} from {events} e cross join lateral (values (e.old_values), (e.new_values)) x(v)
                     where e.source = {table} and x.v is not null))",
            sql::from_joins(view, table - 1),
            main_exprs.join(", "),
            typed.join(", "),
            exprs.join(", "),
            values.join(", ")
        ));
    }
    let mut out = HashSet::new();
    for q in queries {
        for r in tx.query(q.as_str(), &params).await? {
            out.insert(r.get::<_, i32>(0) as usize);
        }
    }
    Ok(out)
}
