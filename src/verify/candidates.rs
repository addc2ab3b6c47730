//! The first pass: find the keys that may differ, reading each side once. Over the whole view,
//! both servers sum row hashes per bucket of keys and the buckets that differ are merged row by
//! row; with `--from/--to`, the source's rows of the range are looked up in the target batch by
//! batch. The keys found wait in a temporary file for the recheck.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};

use futures_util::{pin_mut, StreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, RowStream};

use crate::pg::quote_ident;
use crate::source;
use crate::view::range::Range as Rows;
use crate::view::sql;

use super::error::{dwh_err, src, VerifyError};
use super::plan::{Plan, Reach};

/// Rows per bucket of keys: a bucket that differs is read again from both sides, so it should
/// be small; the sums of all buckets (one row of about 60 bytes each) stay a small fraction of
/// the table.
const ROWS_PER_BUCKET: i64 = 100;
/// At most this many buckets (about 30 bytes of memory each per side), whatever the table's
/// size: beyond 13 million rows, buckets grow instead.
const MAX_BUCKETS: i64 = 1 << 17;

/// The bucket of a key hash, among `$1` buckets.
fn bucket_of(kh: &str) -> String {
    format!("((({kh}) & 1073741823)::int4 % $1)")
}

/// Keys that may differ, kept on disk until they are read again.
pub(super) struct Spill {
    out: BufWriter<std::fs::File>,
    pub(super) keys: u64,
}

impl Spill {
    pub(super) fn new() -> Result<Spill, VerifyError> {
        Ok(Spill {
            out: BufWriter::new(tempfile::tempfile().map_err(VerifyError::Spill)?),
            keys: 0,
        })
    }

    pub(super) fn push(&mut self, key: &[String]) -> Result<(), VerifyError> {
        serde_json::to_writer(&mut self.out, key).map_err(|e| VerifyError::Spill(e.into()))?;
        self.keys += 1;
        self.out.write_all(b"\n").map_err(VerifyError::Spill)
    }

    pub(super) fn read(self) -> Result<SpillReader, VerifyError> {
        let mut f = self
            .out
            .into_inner()
            .map_err(|e| VerifyError::Spill(e.into_error()))?;
        f.rewind().map_err(VerifyError::Spill)?;
        Ok(SpillReader(BufReader::new(f).lines()))
    }
}

/// The keys of a spill, read back a chunk at a time.
pub(super) struct SpillReader(std::io::Lines<BufReader<std::fs::File>>);

impl SpillReader {
    /// The next `n` keys: fewer at the end, none once every key is read.
    pub(super) fn next_chunk(&mut self, n: usize) -> Result<Vec<Vec<String>>, VerifyError> {
        let mut chunk = Vec::new();
        for line in self.0.by_ref() {
            let line = line.map_err(VerifyError::Spill)?;
            chunk.push(serde_json::from_str(&line).map_err(|e| VerifyError::Spill(e.into()))?);
            if chunk.len() == n {
                break;
            }
        }
        Ok(chunk)
    }
}

/// Per bucket: its row count, and a hash of its count and digest sums.
type Sums = HashMap<i32, (i64, u64)>;

/// The bucket sums a query streams, kept as they arrive.
async fn sums(
    rows: Result<RowStream, tokio_postgres::Error>,
) -> Result<Sums, tokio_postgres::Error> {
    use std::hash::{Hash, Hasher};
    let rows = rows?;
    pin_mut!(rows);
    let mut out = Sums::new();
    while let Some(r) = rows.next().await {
        let r = r?;
        let count: i64 = r.get(1);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (count, r.get::<_, &str>(2)).hash(&mut h);
        out.insert(r.get(0), (count, h.finish()));
    }
    Ok(out)
}

/// Compare bucket sums, then merge the rows of the buckets that differ; returns how many view
/// rows were compared.
pub(super) async fn by_buckets(
    plan: &Plan,
    source: &mut Client,
    dwh: &Client,
    spill: &mut Spill,
) -> Result<u64, VerifyError> {
    // The planner's estimates of both tables' sizes (a count where there is none).
    let estimate =
        "select coalesce((select reltuples::int8 from pg_class where oid = to_regclass($1)), -1)";
    let main = &plan.view.job.from.name;
    let main = crate::pg::quote_qualified(&main.schema, &main.name);
    let source_rows: i64 = source
        .query_one(estimate, &[&main])
        .await
        .map_err(src)?
        .get(0);
    let mut target_rows: i64 = dwh
        .query_one(estimate, &[&plan.target])
        .await
        .map_err(dwh_err)?
        .get(0);
    if target_rows < 0 {
        target_rows = dwh
            .query_one(&format!("select count(*) from {}", plan.target), &[])
            .await
            .map_err(dwh_err)?
            .get(0);
    }
    let buckets = (target_rows.max(source_rows) / ROWS_PER_BUCKET).clamp(1, MAX_BUCKETS) as i32;
    // The digests are taken below the grouping (`offset 0`), so a sort, if the server picks
    // one, sorts two numbers per row rather than the rows.
    let agg = |kh: &str, digest: &str, rows: &str| {
        format!(
            "select b, count(*), sum(d)::text from (select {} as b, {digest} as d {rows} offset 0) x group by b",
            bucket_of(kh)
        )
    };
    let (bound, bound_values) = plan.src_where_bound(2);
    let src_rows = format!("{} where {bound}", sql::from_clause(&plan.view));
    let tgt_rows = format!("from {} t where not {}", plan.target, plan.marked());
    let src_kh = plan.src_key_hash();
    let tgt_kh = plan.tgt_key_hash();
    let (tx, _) = source::begin(source).await.map_err(src)?;
    source::set_settings(&tx, &plan.view, plan.settings.clone())
        .await
        .map_err(src)?;
    let src_q = agg(&src_kh, &plan.src_digest(), &src_rows);
    let tgt_q = agg(&tgt_kh, &plan.tgt_digest(), &tgt_rows);
    let mut src_params: Vec<&(dyn ToSql + Sync)> = vec![&buckets];
    src_params.extend(bound_values.iter().map(|v| v as &(dyn ToSql + Sync)));
    let count: [&(dyn ToSql + Sync); 1] = [&buckets];
    let (s, t) = tokio::join!(
        async {
            sums(
                tx.query_raw(src_q.as_str(), src_params.iter().copied())
                    .await,
            )
            .await
        },
        async { sums(dwh.query_raw(tgt_q.as_str(), count.iter().copied()).await).await }
    );
    let (s, t) = (s.map_err(src)?, t.map_err(dwh_err)?);
    let compared: i64 = s.values().map(|v| v.0).sum();
    let mut differ: Vec<i32> = s
        .iter()
        .filter(|(b, v)| t.get(b) != Some(v))
        .map(|(b, _)| *b)
        .collect();
    // A bucket only the target has holds extra rows only.
    if plan.counts_extra {
        differ.extend(t.keys().filter(|b| !s.contains_key(b)));
    }
    tracing::debug!(job = %plan.view.job.name, buckets, differ = differ.len(), "bucket sums compared");
    if differ.is_empty() {
        return Ok(compared as u64);
    }
    let rows = |kh: &str, keys: &[String], digest: &str, rows: &str| {
        format!(
            "select kh, k, d from (select {kh} as kh, array[{}] as k, {digest} as d {rows}) r
             where {} = any($2::int4[]) order by kh, k collate \"C\"",
            keys.join(", "),
            bucket_of("kh")
        )
    };
    let (bound, bound_values) = plan.src_where_bound(3);
    let src_rows = format!("{} where {bound}", sql::from_clause(&plan.view));
    let src_q = rows(&src_kh, &plan.src_keys(), &plan.src_digest(), &src_rows);
    let tgt_q = rows(&tgt_kh, &plan.tgt_keys(), &plan.tgt_digest(), &tgt_rows);
    let params: [&(dyn ToSql + Sync); 2] = [&buckets, &differ];
    let mut src_params: Vec<&(dyn ToSql + Sync)> = vec![&buckets, &differ];
    src_params.extend(bound_values.iter().map(|v| v as &(dyn ToSql + Sync)));
    let s = tx
        .query_raw(src_q.as_str(), src_params)
        .await
        .map_err(src)?;
    let t = dwh
        .query_raw(tgt_q.as_str(), params.iter().copied())
        .await
        .map_err(dwh_err)?;
    pin_mut!(s);
    pin_mut!(t);
    let mut a = next_row(s.as_mut()).await.map_err(src)?;
    let mut b = next_row(t.as_mut()).await.map_err(dwh_err)?;
    loop {
        let order = match (&a, &b) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => (x.0, &x.1).cmp(&(y.0, &y.1)),
        };
        match order {
            std::cmp::Ordering::Less => {
                spill.push(&a.as_ref().expect("a source row").1)?;
                a = next_row(s.as_mut()).await.map_err(src)?;
            }
            std::cmp::Ordering::Greater => {
                if plan.counts_extra {
                    spill.push(&b.as_ref().expect("a target row").1)?;
                }
                b = next_row(t.as_mut()).await.map_err(dwh_err)?;
            }
            std::cmp::Ordering::Equal => {
                let (x, y) = (a.as_ref().expect("a row"), b.as_ref().expect("a row"));
                if x.2 != y.2 {
                    spill.push(&x.1)?;
                }
                a = next_row(s.as_mut()).await.map_err(src)?;
                b = next_row(t.as_mut()).await.map_err(dwh_err)?;
            }
        }
    }
    drop(tx);
    Ok(compared as u64)
}

/// (key hash, key, digest) of the next row of a merge, if any.
async fn next_row(
    s: std::pin::Pin<&mut RowStream>,
) -> Result<Option<(i64, Vec<String>, i64)>, tokio_postgres::Error> {
    let mut s = s;
    Ok(s.next()
        .await
        .transpose()?
        .map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// With `--from/--to`: the source's rows of the range, batch by batch along the cursor, looked
/// up in the target by key; returns how many view rows were compared.
pub(super) async fn by_range(
    plan: &Plan,
    source: &mut Client,
    dwh: &Client,
    spill: &mut Spill,
) -> Result<u64, VerifyError> {
    let (from, to) = plan.range.clone().expect("a range");
    let upper = match (&plan.reach, to) {
        (Reach::Nothing, _) => return Ok(0),
        (_, Some(to)) => Some(to),
        (Reach::UpTo(w), None) => Some(w.clone()),
        (Reach::All, None) => None,
    };
    let tgt_keys: Vec<String> = plan
        .key
        .iter()
        .map(|&i| format!("t.{}", quote_ident(&plan.cols[i].name)))
        .collect();
    let lookup = format!(
        "select array[{}], {}, {} from {} t where {}",
        plan.tgt_keys().join(", "),
        plan.tgt_digest(),
        plan.marked(),
        plan.target,
        plan.key_in(&tgt_keys, 1)
    );
    let mut compared = 0;
    let mut lo = from;
    loop {
        let (tx, _) = source::begin(source).await.map_err(src)?;
        let hi = source::batch_bound(
            &tx,
            &plan.view,
            lo.as_deref(),
            upper.as_deref(),
            plan.view.job.batch_size,
        )
        .await
        .map_err(src)?;
        let Some(hi) = hi else { break };
        let b = Rows::Cursor {
            lo: lo.as_deref(),
            hi: Some(&hi),
            wide: false,
        }
        .bind(&plan.view, "vb");
        let mut settings = plan.settings.clone();
        settings.extend(b.settings);
        source::set_settings(&tx, &plan.view, settings)
            .await
            .map_err(src)?;
        let batch = b.predicate;
        let q = format!(
            "select array[{}], {} {} where {} and ({batch})",
            plan.src_keys().join(", "),
            plan.src_digest(),
            sql::from_clause(&plan.view),
            plan.src_where()
        );
        let rows = tx.query(q.as_str(), &[]).await.map_err(src)?;
        drop(tx);
        compared += rows.len() as u64;
        let found: Vec<(Vec<String>, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let columns: Vec<Vec<String>> = (0..plan.key.len())
            .map(|i| found.iter().map(|(k, _)| k[i].clone()).collect())
            .collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let target: HashMap<Vec<String>, (i64, bool)> = dwh
            .query(lookup.as_str(), &params)
            .await
            .map_err(dwh_err)?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        for (key, digest) in &found {
            match target.get(key) {
                Some((d, marked)) if d == digest && !marked => {}
                _ => spill.push(key)?,
            }
        }
        lo = Some(hi);
    }
    Ok(compared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::plan::md5_hash;

    #[test]
    fn buckets_come_from_the_key_hash_alone() {
        assert_eq!(
            md5_hash("x"),
            "('x' || substr(md5(x), 1, 16))::bit(64)::int8"
        );
        assert_eq!(bucket_of("kh"), "(((kh) & 1073741823)::int4 % $1)");
    }
}
