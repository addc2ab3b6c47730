//! The final check: every key the passes found is read again on both sides, and counts only if
//! it differs twice, 200 ms apart; keys a notify job still has events for are left out. Under
//! `--repair` what counts is rewritten.
//!
//! The source reads the view rows of the keys by key where the key is taken from the main
//! table, else every row in scope; ClickHouse streams the target whole (a query names no
//! values), and only the keys asked for are kept.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::clickhouse::Client as Http;
use crate::sink::clickhouse::{rows::escape, ClickHouse};
use crate::source;
use crate::view::range::Range as Rows;

use super::super::candidates::Spill;
use super::super::error::src;
use super::super::recheck::{waiting, CONFIRM_AFTER};
use super::super::repair::Repair;
use super::super::report::{Kind, Outcome};
use super::rows::{each_source_line, each_target_line, settings, Digester, Side};
use super::values::{encode, Float, Floats};
use super::{Layout, VerifyError};

/// Keys read again at once: each chunk costs a read of the whole target.
const CHUNK_KEYS: usize = 1 << 16;

/// Read every key found again on both sides and count those that still differ; with
/// `repair`, rewrite them.
pub(super) async fn recheck(
    layout: &Layout,
    source: &mut Client,
    ch: &mut ClickHouse,
    spill: Spill,
    outcome: &mut Outcome,
    mut repair: Option<&mut Repair>,
) -> Result<(), VerifyError> {
    let mut keys = spill.read()?;
    loop {
        let chunk = keys.next_chunk(CHUNK_KEYS)?;
        if chunk.is_empty() {
            return Ok(());
        }
        let first = classify(layout, source, ch.http(), &chunk).await?;
        if first.is_empty() {
            continue;
        }
        // A change the source committed between the two reads of a round and that the job
        // applied before ClickHouse's read looks like a difference: confirm in a second round,
        // once the job has had a moment to apply what it was applying.
        tokio::time::sleep(CONFIRM_AFTER).await;
        let chunk: Vec<Vec<String>> = first.into_iter().map(|(i, _)| chunk[i].clone()).collect();
        let confirmed = classify(layout, source, ch.http(), &chunk).await?;
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
            r.fix(&layout.view, source, ch, write, gone).await?;
        }
    }
}

/// The form of a key given as its values' text, as `rows::Digester::key` makes it.
fn key_form(layout: &Layout, key: &[String]) -> Vec<u8> {
    let (mut out, mut field, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    for (&i, value) in layout.key.iter().zip(key) {
        field.clear();
        escape(value, &mut field);
        encode(
            &layout.norms[i],
            &field,
            &mut out,
            &mut scratch,
            &mut Floats::Rounded,
        );
    }
    out
}

/// A row read again: the digest of its form with the floats apart, and the floats.
type Row = (u64, Box<[Float]>);

/// Equal rows: the same values but for floats, and those within the margin.
fn same(a: &Row, b: &Row) -> bool {
    a.0 == b.0 && a.1.len() == b.1.len() && a.1.iter().zip(&b.1[..]).all(|(x, y)| x.close(*y))
}

/// Read `keys` on both sides now; the positions in `keys` of those that differ, and how.
async fn classify(
    layout: &Layout,
    source: &mut Client,
    http: &mut Http,
    keys: &[Vec<String>],
) -> Result<Vec<(usize, Kind)>, VerifyError> {
    let index: HashMap<Vec<u8>, usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (key_form(layout, k), i))
        .collect();
    // Per key: the view row (whether the job has reached it, its digest without its floats,
    // its floats); the target row (its digest, its floats).
    let mut view_rows: Vec<Option<(bool, Row)>> = vec![None; keys.len()];
    let mut target_rows: Vec<Option<Row>> = vec![None; keys.len()];
    let (tx, _) = source::begin(source).await.map_err(src)?;
    let mut set = layout.scope.settings.clone();
    let predicate = match &layout.read_by {
        Some(by) => {
            let main: Vec<Vec<String>> = keys
                .iter()
                .map(|k| by.iter().map(|&i| k[i].clone()).collect())
                .collect();
            let b = Rows::Keys(&main).bind(&layout.view, "vk");
            set.extend(b.settings);
            b.predicate
        }
        None => "true".to_string(),
    };
    settings(&tx, &layout.view, set).await?;
    let reached = format!("case when ({}) then 1 else 0 end", layout.scope.predicate);
    let src_q = layout.source_copy(&[reached], &predicate);
    let tgt_q = layout.target_query();
    let mut ds = Digester::new(&layout.norms, &layout.key, Side::Source, 1, true);
    let mut dt = Digester::new(&layout.norms, &layout.key, Side::Target, 1, true);
    let (a, b) = tokio::join!(
        each_source_line(&tx, &src_q, |line| {
            let (d, rest) = ds.row(line)?;
            if let Some(&i) = index.get(ds.key()) {
                view_rows[i] = Some((rest[0] == b"1", (d.digest, ds.floats().into())));
            }
            Ok(())
        }),
        each_target_line(http, &tgt_q, |line| {
            let (d, rest) = dt.row(line)?;
            if rest[0] == b"0" {
                if let Some(&i) = index.get(dt.key()) {
                    target_rows[i] = Some((d.digest, dt.floats().into()));
                }
            }
            Ok(())
        })
    );
    a?;
    b?;
    let mut found: Vec<(usize, Kind)> = Vec::new();
    for (i, (v, t)) in view_rows.iter().zip(&target_rows).enumerate() {
        let kind = match (v, t) {
            // Not reached by the job (now): no difference.
            (Some((false, _)), _) => continue,
            (Some((true, v)), Some(t)) if same(v, t) => continue,
            (Some((true, _)), Some(_)) => Kind::Different,
            (Some((true, _)), None) => Kind::Missing,
            (None, Some(_)) if layout.counts_extra => Kind::Extra,
            (None, _) => continue,
        };
        found.push((i, kind));
    }
    if let Some(events) = &layout.scope.events {
        let held: Vec<&Vec<String>> = found.iter().map(|(i, _)| &keys[*i]).collect();
        let waiting = waiting(&tx, &layout.view, events, &held)
            .await
            .map_err(src)?;
        found = found
            .into_iter()
            .enumerate()
            .filter(|(n, _)| !waiting.contains(n))
            .map(|(_, f)| f)
            .collect();
    }
    drop(tx);
    Ok(found)
}
