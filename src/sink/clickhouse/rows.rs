//! The batch's rows on their way to ClickHouse: the source's text COPY, which is
//! `TabSeparated` already, with the version and the deleted flag appended to every row.
//!
//! A raw newline ends a row and a raw tab separates fields: both are escaped inside values.

use std::collections::HashSet;

use bytes::BytesMut;

/// How many of the source's COPY messages (one row each) at most go into one piece of the
/// insert body: the rows already received are joined, so that the connection writes (and the
/// server reads) pieces of many rows rather than one row at a time. Joining only what is
/// there never waits for more rows.
pub const PIECE_ROWS: usize = 1024;

/// Tags every row of a `TabSeparated` stream with `\t<version>\t0`, counting the rows and,
/// when asked, keeping the text of their key fields.
pub struct Tagger {
    suffix: Vec<u8>,
    /// Field positions of the key columns, when the keys are wanted.
    key_fields: Option<Vec<usize>>,
    /// The unfinished row at the end of the last chunk (only kept when keys are wanted).
    partial: Vec<u8>,
    pub rows: u64,
    /// Key field texts of every row seen, escaped as in the stream.
    pub keys: HashSet<Vec<Vec<u8>>>,
}

impl Tagger {
    pub fn new(version: u64, key_fields: Option<Vec<usize>>) -> Tagger {
        Tagger {
            suffix: format!("\t{version}\t0\n").into_bytes(),
            key_fields,
            partial: Vec::new(),
            rows: 0,
            keys: HashSet::new(),
        }
    }

    /// Append `chunk` to `out` with every row tagged.
    pub fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        let mut start = 0;
        for (i, b) in chunk.iter().enumerate() {
            if *b != b'\n' {
                continue;
            }
            out.extend_from_slice(&chunk[start..i]);
            out.extend_from_slice(&self.suffix);
            if self.key_fields.is_some() {
                let row = if self.partial.is_empty() {
                    &chunk[start..i]
                } else {
                    self.partial.extend_from_slice(&chunk[start..i]);
                    &self.partial[..]
                };
                let key = self.key_of(row);
                self.keys.insert(key);
                self.partial.clear();
            }
            self.rows += 1;
            start = i + 1;
        }
        out.extend_from_slice(&chunk[start..]);
        if self.key_fields.is_some() {
            self.partial.extend_from_slice(&chunk[start..]);
        }
    }

    fn key_of(&self, row: &[u8]) -> Vec<Vec<u8>> {
        let fields: Vec<&[u8]> = row.split(|b| *b == b'\t').collect();
        self.key_fields
            .as_ref()
            .map(|k| {
                k.iter()
                    .map(|i| fields.get(*i).map(|f| f.to_vec()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `s` escaped for `TabSeparated` (and as the source's text COPY writes it).
pub fn escape(s: &str, out: &mut Vec<u8>) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x0b => out.extend_from_slice(b"\\v"),
            _ => out.push(b),
        }
    }
}

/// A `TabSeparated` field read back as text.
pub fn unescape(field: &[u8]) -> String {
    let mut out = Vec::with_capacity(field.len());
    unescape_into(field, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A `TabSeparated` field's bytes, unescaped, appended to `out`. ClickHouse also escapes the
/// quote (`\'`) that the source's text COPY leaves as it is: both read back the same.
pub fn unescape_into(field: &[u8], out: &mut Vec<u8>) {
    let mut it = field.iter();
    while let Some(&b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b't') => out.push(b'\t'),
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b'b') => out.push(0x08),
            Some(b'f') => out.push(0x0c),
            Some(b'v') => out.push(0x0b),
            Some(b'0') => out.push(0),
            Some(&c) => out.push(c),
            None => out.push(b'\\'),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_gets_the_version_and_rows_may_span_chunks() {
        let mut t = Tagger::new(7, Some(vec![0]));
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        t.feed(b"1\tx\n2\ty", &mut a);
        t.feed(b"z\n3\t\\N\n", &mut b);
        assert_eq!(&a[..], b"1\tx\t7\t0\n2\ty");
        assert_eq!(&b[..], b"z\t7\t0\n3\t\\N\t7\t0\n");
        assert_eq!(t.rows, 3);
        let keys: HashSet<Vec<Vec<u8>>> = ["1", "2", "3"]
            .iter()
            .map(|k| vec![k.as_bytes().to_vec()])
            .collect();
        assert_eq!(t.keys, keys);
    }

    #[test]
    fn escaping_round_trips() {
        let s = "a\tb\nc\\d\re";
        let mut out = Vec::new();
        escape(s, &mut out);
        assert_eq!(out, b"a\\tb\\nc\\\\d\\re");
        assert!(!out.contains(&b'\t') && !out.contains(&b'\n'));
        assert_eq!(unescape(&out), s);
    }
}
