//! The first passes: find the keys that may differ. Both sides' rows are summed per bucket of
//! keys in one read of each, at once; the rows of the buckets whose sums differ are read again,
//! the source's held by key (at most [`HELD_ROWS`] at a time, more rounds when more differ)
//! and the target's looked up among them. The keys found go to a temporary file.
//!
//! The source's side is the costly one (its server prints every value as text, and it is the
//! OLTP database): the first pass keeps each source row's bucket, digest and key in a temporary
//! file, up to [`RECORDS_MAX_BYTES`], and the second reads them there rather than the source.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Seek, Write};

use tokio_postgres::Client;

use crate::clickhouse::Client as Http;
use crate::sink::SinkError;
use crate::source;

use super::super::candidates::Spill;
use super::super::error::src;
use super::super::plan::Reach;
use super::rows::{each_source_line, each_target_line, settings, Digester, Side};
use super::values::key_text;
use super::{Layout, VerifyError};

/// Rows per bucket of keys: a bucket that differs is read again, so it should be small.
const ROWS_PER_BUCKET: u64 = 100;
/// At most this many buckets (16 bytes each per side), whatever the table's size: beyond 13
/// million rows, buckets grow instead.
const MAX_BUCKETS: u64 = 1 << 17;
/// At most this many source rows of differing buckets are held by key at once (some 60 bytes
/// each): the buckets beyond wait for another round, which reads both sides again.
pub(super) const HELD_ROWS: u64 = 1 << 17;
/// Debug builds: the second pass reads the source again, as when the first pass's file was
/// given up.
pub const REREAD_SOURCE: &str = "PGTIDE_VERIFY_REREAD_SOURCE";

/// The most disk the first pass's source records take (some 30 bytes a row with an integer
/// key: about 35 million rows); beyond, the second pass reads the source again.
const RECORDS_MAX_BYTES: u64 = 1 << 30;

/// The source's rows as the first pass saw them, (bucket, digest, key form) each, in a
/// temporary file; given up (`out` none) when it cannot be written or grows too large.
struct Records {
    out: Option<BufWriter<std::fs::File>>,
    bytes: u64,
}

impl Records {
    fn new() -> Records {
        // Tests of debug builds reach the path of a file given up with this variable.
        if cfg!(debug_assertions) && std::env::var_os(REREAD_SOURCE).is_some() {
            return Records {
                out: None,
                bytes: 0,
            };
        }
        let out = match tempfile::tempfile() {
            Ok(f) => Some(BufWriter::new(f)),
            Err(e) => {
                tracing::debug!(error = %e, "no temporary file for the source's rows: the second pass reads the source again");
                None
            }
        };
        Records { out, bytes: 0 }
    }

    fn push(&mut self, bucket: usize, digest: u64, key: &[u8]) {
        let Some(out) = &mut self.out else { return };
        self.bytes += 16 + key.len() as u64;
        let written = (|| {
            out.write_all(&(bucket as u32).to_le_bytes())?;
            out.write_all(&digest.to_le_bytes())?;
            out.write_all(&(key.len() as u32).to_le_bytes())?;
            out.write_all(key)
        })();
        if self.bytes > RECORDS_MAX_BYTES || written.is_err() {
            self.out = None;
        }
    }

    /// The records from the start, unless they were given up.
    fn read(&mut self) -> Option<BufReader<std::fs::File>> {
        let out = self.out.as_mut()?;
        let ready = out.flush().and_then(|()| out.get_mut().rewind());
        match ready.and_then(|()| out.get_ref().try_clone()) {
            Ok(f) => Some(BufReader::new(f)),
            Err(_) => {
                self.out = None;
                None
            }
        }
    }
}

/// Each record of `r`: (bucket, digest, key form).
fn each_record(
    mut r: BufReader<std::fs::File>,
    mut each: impl FnMut(usize, u64, &[u8]) -> Result<(), VerifyError>,
) -> Result<(), VerifyError> {
    let mut head = [0u8; 16];
    let mut key = Vec::new();
    loop {
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(VerifyError::Spill(e)),
        }
        let bucket = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let digest = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[12..].try_into().expect("4 bytes")) as usize;
        key.resize(len, 0);
        r.read_exact(&mut key).map_err(VerifyError::Spill)?;
        each(bucket, digest, &key)?;
    }
}

/// A bucket's rows: how many, and the wrapping sum of their digests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sum {
    rows: u64,
    digests: u64,
}

impl Sum {
    fn add(&mut self, digest: u64) {
        self.rows += 1;
        self.digests = self.digests.wrapping_add(digest);
    }
}

/// What the second pass does with a bucket's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bucket {
    /// Both sides agree.
    Same,
    /// Only the source has rows here: each is missing.
    SourceOnly,
    /// Only the target has rows here: each is extra (where extra rows count).
    TargetOnly,
    /// Both have rows: the source's are held by key in this round and the target's looked up.
    Held(u32),
}

/// Find the keys that may differ; returns how many view rows were compared.
pub(super) async fn candidates(
    layout: &Layout,
    source: &mut Client,
    http: &mut Http,
    spill: &mut Spill,
) -> Result<u64, VerifyError> {
    if layout.scope.reach == Reach::Nothing && !layout.counts_extra {
        return Ok(0);
    }
    let n = bucket_count(layout, source, http).await?;
    let bucket = |key_hash: u64| (key_hash % n as u64) as usize;
    let (tx, _) = source::begin(source).await.map_err(src)?;
    settings(&tx, &layout.view, layout.scope.settings.clone()).await?;
    // The cheaper superset of the scope: the recheck sorts out the rows of open windows.
    let src_q = layout.source_copy(&[], &layout.scope.superset);
    let tgt_q = layout.target_query();
    // With a range the target cannot be cut to it (its rows have no cursor): only the source's
    // rows count, looked up in the whole target.
    let ranged = layout.scope.range.is_some();
    let mut s = vec![Sum::default(); n];
    let mut t = vec![Sum::default(); n];
    let mut ds = Digester::new(&layout.norms, &layout.key, Side::Source, 0, false);
    let mut dt = Digester::new(&layout.norms, &layout.key, Side::Target, 1, false);
    let mut records = Records::new();
    let (a, b) = tokio::join!(
        each_source_line(&tx, &src_q, |line| {
            let (d, _) = ds.row(line)?;
            let b = bucket(d.key_hash);
            s[b].add(d.digest);
            records.push(b, d.digest, ds.key());
            Ok(())
        }),
        async {
            if ranged {
                return Ok(());
            }
            each_target_line(http, &tgt_q, |line| {
                let (d, rest) = dt.row(line)?;
                if rest[0] == b"0" {
                    t[bucket(d.key_hash)].add(d.digest);
                }
                Ok(())
            })
            .await
        }
    );
    a?;
    b?;
    let compared: u64 = s.iter().map(|x| x.rows).sum();
    let (what, rounds) = plan(&s, &t, ranged, layout.counts_extra);
    drop((s, t));
    let differ = what.iter().filter(|b| **b != Bucket::Same).count();
    tracing::debug!(job = %layout.view.job.name, buckets = n, differ, rounds, "bucket sums compared");
    for round in 0..rounds {
        // The source's rows of this round's buckets, by key (with their digest).
        let mut held: HashMap<Box<[u8]>, u64> = HashMap::new();
        let mut take = |b: usize, digest: u64, key: &[u8]| {
            match what[b] {
                Bucket::SourceOnly if round == 0 => spill.push(&key_text(key))?,
                Bucket::Held(r) if r == round => {
                    held.insert(key.into(), digest);
                }
                _ => {}
            }
            Ok(())
        };
        match records.read() {
            Some(r) => each_record(r, take)?,
            None => {
                each_source_line(&tx, &src_q, |line| {
                    let (d, _) = ds.row(line)?;
                    take(bucket(d.key_hash), d.digest, ds.key())
                })
                .await?
            }
        }
        each_target_line(http, &tgt_q, |line| {
            let (d, rest) = dt.row(line)?;
            if rest[0] != b"0" {
                return Ok(());
            }
            match what[bucket(d.key_hash)] {
                Bucket::TargetOnly if round == 0 => spill.push(&key_text(dt.key()))?,
                Bucket::Held(r) if r == round => match held.remove(dt.key()) {
                    Some(digest) if digest == d.digest => {}
                    Some(_) => spill.push(&key_text(dt.key()))?,
                    None if layout.counts_extra => spill.push(&key_text(dt.key()))?,
                    None => {}
                },
                _ => {}
            }
            Ok(())
        })
        .await?;
        // Held rows the target lacks; in key order, so that reports name the same keys.
        let mut missing: Vec<Box<[u8]>> = held.into_keys().collect();
        missing.sort_unstable();
        for k in missing {
            spill.push(&key_text(&k))?;
        }
    }
    drop(tx);
    Ok(compared)
}

/// What to do with each bucket, and in how many rounds (0 when every bucket agrees).
fn plan(s: &[Sum], t: &[Sum], ranged: bool, counts_extra: bool) -> (Vec<Bucket>, u32) {
    let mut out = Vec::with_capacity(s.len());
    let (mut round, mut held, mut any) = (0u32, 0u64, false);
    for (s, t) in s.iter().zip(t) {
        let b = if ranged {
            if s.rows == 0 {
                Bucket::Same
            } else {
                Bucket::Held(0)
            }
        } else if s == t || (s.rows == 0 && !counts_extra) {
            Bucket::Same
        } else if s.rows == 0 {
            Bucket::TargetOnly
        } else if t.rows == 0 {
            Bucket::SourceOnly
        } else {
            Bucket::Held(0)
        };
        let b = match b {
            Bucket::Held(_) => {
                if held > 0 && held + s.rows > HELD_ROWS {
                    round += 1;
                    held = 0;
                }
                held += s.rows;
                Bucket::Held(round)
            }
            b => b,
        };
        any |= b != Bucket::Same;
        out.push(b);
    }
    (out, if any { round + 1 } else { 0 })
}

/// About `ROWS_PER_BUCKET` rows a bucket, from the larger of the planner's estimate of the
/// main table and the target's row count (every version, a cheap upper bound).
async fn bucket_count(
    layout: &Layout,
    source: &Client,
    http: &mut Http,
) -> Result<usize, VerifyError> {
    let main = &layout.view.job.from.name;
    let main = crate::pg::quote_qualified(&main.schema, &main.name);
    let source_rows: i64 = source
        .query_one(
            "select coalesce((select reltuples::int8 from pg_class where oid = to_regclass($1)), -1)",
            &[&main],
        )
        .await
        .map_err(src)?
        .get(0);
    let target_rows: u64 = http
        .query(&format!(
            "select count() from {} format TabSeparated",
            layout.target
        ))
        .await
        .map_err(SinkError::from)?
        .trim()
        .parse()
        .unwrap_or(0);
    let rows = target_rows.max(source_rows.max(0) as u64);
    Ok((rows / ROWS_PER_BUCKET).clamp(1, MAX_BUCKETS) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(rows: u64, digests: u64) -> Sum {
        Sum { rows, digests }
    }

    #[test]
    fn buckets_that_differ_are_read_again_in_rounds_of_bounded_size() {
        let s = [
            sum(2, 5),
            sum(0, 0),
            sum(3, 1),
            sum(HELD_ROWS, 9),
            sum(1, 1),
        ];
        let t = [
            sum(2, 5),
            sum(1, 4),
            sum(0, 0),
            sum(HELD_ROWS, 8),
            sum(1, 2),
        ];
        let (p, rounds) = plan(&s, &t, false, true);
        assert_eq!(
            p,
            [
                Bucket::Same,
                Bucket::TargetOnly,
                Bucket::SourceOnly,
                Bucket::Held(0),
                Bucket::Held(1)
            ]
        );
        assert_eq!(rounds, 2);
        // Extra rows do not count: a bucket only the target has is no difference.
        let (p, _) = plan(&s, &t, false, false);
        assert_eq!(p[1], Bucket::Same);
        // With a range every bucket the source has is looked up in the target.
        let (p, rounds) = plan(&s, &t, true, false);
        assert_eq!(p[0], Bucket::Held(0));
        assert_eq!(p[1], Bucket::Same);
        assert_eq!(rounds, 3);
        let (_, rounds) = plan(&s[..1], &t[..1], false, true);
        assert_eq!(rounds, 0);
    }
}
