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
/// when asked, keeping the text of their key fields and refusing a NULL among them.
pub struct Tagger {
    suffix: Vec<u8>,
    /// Field positions of the key columns.
    key_fields: Vec<usize>,
    /// Keep every row's key in `keys`.
    keep_keys: bool,
    /// Refuse a row with a NULL in its key (some key column of the view can be NULL:
    /// ClickHouse would store a default value for it, one key for all such rows).
    refuse_null: bool,
    /// The unfinished row at the end of the last chunk (kept when keys are looked at).
    partial: Vec<u8>,
    pub rows: u64,
    /// Key field texts of every row seen, escaped as in the stream.
    pub keys: HashSet<Vec<Vec<u8>>>,
}

/// A row (its text, shortened) with a NULL in its key.
#[derive(Debug)]
pub struct NullKey(pub String);

impl Tagger {
    pub fn new(version: u64, key_fields: Vec<usize>, keep_keys: bool, refuse_null: bool) -> Tagger {
        Tagger {
            suffix: format!("\t{version}\t0\n").into_bytes(),
            key_fields,
            keep_keys,
            refuse_null,
            partial: Vec::new(),
            rows: 0,
            keys: HashSet::new(),
        }
    }

    /// Append `chunk` to `out` with every row tagged; a NULL key when refused stops it.
    pub fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), NullKey> {
        let looks = self.keep_keys || self.refuse_null;
        let mut start = 0;
        for (i, b) in chunk.iter().enumerate() {
            if *b != b'\n' {
                continue;
            }
            out.extend_from_slice(&chunk[start..i]);
            out.extend_from_slice(&self.suffix);
            if looks {
                let row = if self.partial.is_empty() {
                    &chunk[start..i]
                } else {
                    self.partial.extend_from_slice(&chunk[start..i]);
                    &self.partial[..]
                };
                let key = self.key_of(row);
                if self.refuse_null && key.iter().any(|f| f == b"\\N") {
                    // As the stream has it: `\N` for NULL.
                    let text: String = String::from_utf8_lossy(row).chars().take(200).collect();
                    return Err(NullKey(text.replace('\t', ", ")));
                }
                if self.keep_keys {
                    self.keys.insert(key);
                }
                self.partial.clear();
            }
            self.rows += 1;
            start = i + 1;
        }
        out.extend_from_slice(&chunk[start..]);
        if looks {
            self.partial.extend_from_slice(&chunk[start..]);
        }
        Ok(())
    }

    fn key_of(&self, row: &[u8]) -> Vec<Vec<u8>> {
        let last = self.key_fields.iter().max().copied().unwrap_or(0);
        let fields: Vec<&[u8]> = row.split(|b| *b == b'\t').take(last + 1).collect();
        self.key_fields
            .iter()
            .map(|i| fields.get(*i).map(|f| f.to_vec()).unwrap_or_default())
            .collect()
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
        let mut t = Tagger::new(7, vec![0], true, true);
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        t.feed(b"1\tx\n2\ty", &mut a).unwrap();
        t.feed(b"z\n3\t\\N\n", &mut b).unwrap();
        assert_eq!(&a[..], b"1\tx\t7\t0\n2\ty");
        assert_eq!(&b[..], b"z\t7\t0\n3\t\\N\t7\t0\n");
        assert_eq!(t.rows, 3);
        let keys: HashSet<Vec<Vec<u8>>> = ["1", "2", "3"]
            .iter()
            .map(|k| vec![k.as_bytes().to_vec()])
            .collect();
        assert_eq!(t.keys, keys);
        // A NULL in the key (here split across chunks) is refused, with the row.
        let mut t = Tagger::new(7, vec![1], false, true);
        let mut out = BytesMut::new();
        t.feed(b"1\tx\n2\t\\", &mut out).unwrap();
        let refused = t.feed(b"N\tz\n", &mut out).unwrap_err();
        assert_eq!(refused.0, "2, \\N, z");
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
