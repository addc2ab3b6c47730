//! Rows as both sides stream them, one `TabSeparated` line each: split into lines across the
//! pieces they arrive in, and each line brought to its key and its digest.

use std::hash::Hasher;

use futures_util::{pin_mut, StreamExt};
use tokio_postgres::Transaction;

use crate::clickhouse::Client as Http;
use crate::sink::SinkError;
use crate::source;
use crate::view::View;

use super::super::error::{src, VerifyError};
use super::values::{encode, Float, Floats, Norm};

/// Which side a row came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Source,
    Target,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "the source",
            Side::Target => "the target",
        }
    }
}

/// A row's key hash (its bucket) and its digest (a hash of the whole row's form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Digest {
    pub(super) key_hash: u64,
    pub(super) digest: u64,
}

/// Turns lines into digests, keeping the last row's key form (and its floats, when they are
/// set apart).
pub(super) struct Digester<'a> {
    norms: &'a [Norm],
    key: &'a [usize],
    side: Side,
    /// Fields after the compared ones (a flag), handed back as they are.
    trailing: usize,
    /// Floats are set apart (`floats`) rather than rounded into the digest.
    apart: bool,
    floats: Vec<Float>,
    row: Vec<u8>,
    key_form: Vec<u8>,
    spans: Vec<(usize, usize)>,
    scratch: Vec<u8>,
}

impl<'a> Digester<'a> {
    /// A digester of lines of `norms` fields and `trailing` more; `apart` sets floats apart.
    pub(super) fn new(
        norms: &'a [Norm],
        key: &'a [usize],
        side: Side,
        trailing: usize,
        apart: bool,
    ) -> Self {
        Digester {
            norms,
            key,
            side,
            trailing,
            apart,
            floats: Vec::new(),
            row: Vec::new(),
            key_form: Vec::new(),
            spans: Vec::with_capacity(norms.len()),
            scratch: Vec::new(),
        }
    }

    /// The digest of one line, and its trailing fields' text (escaped).
    pub(super) fn row<'l>(
        &mut self,
        line: &'l [u8],
    ) -> Result<(Digest, Vec<&'l [u8]>), VerifyError> {
        self.row.clear();
        self.spans.clear();
        self.floats.clear();
        let mut floats = if self.apart {
            Floats::Apart(&mut self.floats)
        } else {
            Floats::Rounded
        };
        let mut fields = line.split(|b| *b == b'\t');
        for norm in self.norms {
            let Some(field) = fields.next() else {
                return Err(self.malformed(line));
            };
            let start = self.row.len();
            encode(norm, field, &mut self.row, &mut self.scratch, &mut floats);
            self.spans.push((start, self.row.len()));
        }
        let trailing: Vec<&[u8]> = fields.collect();
        if trailing.len() != self.trailing {
            return Err(self.malformed(line));
        }
        self.key_form.clear();
        for &k in self.key {
            let (a, b) = self.spans[k];
            self.key_form.extend_from_slice(&self.row[a..b]);
        }
        Ok((
            Digest {
                key_hash: hash(&self.key_form),
                digest: hash(&self.row),
            },
            trailing,
        ))
    }

    /// The key form of the last row.
    pub(super) fn key(&self) -> &[u8] {
        &self.key_form
    }

    /// The floats of the last row, when they are set apart.
    pub(super) fn floats(&self) -> &[Float] {
        &self.floats
    }

    fn malformed(&self, line: &[u8]) -> VerifyError {
        VerifyError::Malformed {
            side: self.side.name(),
            fields: line.split(|b| *b == b'\t').count(),
            expected: self.norms.len() + self.trailing,
        }
    }
}

/// A 64-bit hash, the same for the same bytes on both sides (one process hashes both).
fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// Lines of a stream of pieces, a line possibly split between pieces.
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn feed(
        &mut self,
        piece: &[u8],
        each: &mut impl FnMut(&[u8]) -> Result<(), VerifyError>,
    ) -> Result<(), VerifyError> {
        let mut start = 0;
        for (i, b) in piece.iter().enumerate() {
            if *b != b'\n' {
                continue;
            }
            if self.partial.is_empty() {
                each(&piece[start..i])?;
            } else {
                self.partial.extend_from_slice(&piece[start..i]);
                each(&self.partial)?;
                self.partial.clear();
            }
            start = i + 1;
        }
        self.partial.extend_from_slice(&piece[start..]);
        Ok(())
    }

    fn finish(
        &mut self,
        each: &mut impl FnMut(&[u8]) -> Result<(), VerifyError>,
    ) -> Result<(), VerifyError> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.partial);
        each(&line)
    }
}

/// Stream the source's text COPY `statement` in `tx` (whose settings are set), each line to
/// `each`.
pub(super) async fn each_source_line(
    tx: &Transaction<'_>,
    statement: &str,
    mut each: impl FnMut(&[u8]) -> Result<(), VerifyError>,
) -> Result<(), VerifyError> {
    let out = source::copy_out(tx, statement).await.map_err(src)?;
    pin_mut!(out);
    let mut lines = Lines::default();
    while let Some(piece) = out.next().await {
        lines.feed(&piece.map_err(src)?, &mut each)?;
    }
    lines.finish(&mut each)
}

/// Stream ClickHouse's answer to `query` (`TabSeparated`), each line to `each`.
pub(super) async fn each_target_line(
    http: &mut Http,
    query: &str,
    mut each: impl FnMut(&[u8]) -> Result<(), VerifyError>,
) -> Result<(), VerifyError> {
    let out = http.query_stream(query).await.map_err(SinkError::from)?;
    pin_mut!(out);
    let mut lines = Lines::default();
    while let Some(piece) = out.next().await {
        lines.feed(&piece.map_err(SinkError::from)?, &mut each)?;
    }
    lines.finish(&mut each)
}

/// Set the view's settings and `extra` in `tx`.
pub(super) async fn settings(
    tx: &Transaction<'_>,
    view: &View,
    extra: Vec<crate::view::Setting>,
) -> Result<(), VerifyError> {
    source::set_settings(tx, view, extra).await.map_err(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_may_span_pieces() {
        let mut got = Vec::new();
        let mut each = |l: &[u8]| {
            got.push(String::from_utf8(l.to_vec()).unwrap());
            Ok(())
        };
        let mut lines = Lines::default();
        for piece in ["1\ta\n2", "\tb", "\n3\tc\n", "4\td"] {
            lines.feed(piece.as_bytes(), &mut each).unwrap();
        }
        lines.finish(&mut each).unwrap();
        assert_eq!(got, ["1\ta", "2\tb", "3\tc", "4\td"]);
    }

    #[test]
    fn rows_that_print_differently_but_hold_the_same_values_digest_alike() {
        let norms = [Norm::Int, Norm::Text, Norm::Float64];
        let key = [0];
        let mut s = Digester::new(&norms, &key, Side::Source, 1, false);
        let mut t = Digester::new(&norms, &key, Side::Target, 1, false);
        let (a, flag) = s.row(b"7\tit's\t1e+300\t1").unwrap();
        assert_eq!(flag, [b"1"]);
        let (b, _) = t.row(b"7\tit\\'s\t1e300\t0").unwrap();
        assert_eq!(a, b);
        assert_eq!(s.key(), t.key());
        let (c, _) = t.row(b"7\tits\t1e300\t0").unwrap();
        assert_eq!(a.key_hash, c.key_hash);
        assert_ne!(a.digest, c.digest);
        assert!(matches!(
            t.row(b"7\tx"),
            Err(VerifyError::Malformed {
                fields: 2,
                expected: 4,
                ..
            })
        ));
    }
}
