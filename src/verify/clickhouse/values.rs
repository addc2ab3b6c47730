//! One form for a value whichever side printed it. The source prints each view column as
//! ClickHouse reads it in `TabSeparated` (its text COPY); ClickHouse prints it back in its
//! own way: quotes escaped, floats in its shortest form, timestamps to its type's precision,
//! decimals padded to their scale. Each value is brought to the form its ClickHouse type gives
//! it, so that values the target holds as the same value compare equal.
//!
//! The form of a row is the concatenation of its fields' forms: a tag (NULL, a value, an
//! array) and the length of what follows, so no two rows share a form.
//!
//! Floats need more: ClickHouse reads decimal text to a float only approximately (a unit or
//! two in the last place off, where the source reads the nearest float), so the value it holds
//! can differ a little from the source's for the same text, however often it is written. Two
//! floats count as equal within [`MAX_ULPS`] units in the last place. A digest cannot compare
//! within a margin: the passes hash floats rounded (`Floats::Rounded`, the lowest
//! [`F64_ROUNDED_BITS`] bits of a Float64 dropped), and the final check takes them apart
//! (`Floats::Apart`) and compares them one by one.

use crate::sink::clickhouse::rows::unescape_into;

const NULL: u8 = 0;
const VALUE: u8 = 1;
const ARRAY: u8 = 2;
/// A float taken apart: its value is compared on its own.
const FLOAT: u8 = 3;

/// Floats this many units in the last place apart are equal: ClickHouse's reading of decimal
/// text is off by a unit or two, more with an exponent.
pub(super) const MAX_ULPS: u64 = 4;
/// The bits of a Float64 a digest leaves out: values a few units apart mostly hash alike (a
/// value close to a rounding edge is found and then compared within the margin); differences
/// below about 2^-44 of the value (6e-14) may go unnoticed.
pub(super) const F64_ROUNDED_BITS: u32 = 8;
/// The same for a Float32: ClickHouse reads it through a double, which is close enough.
pub(super) const F32_ROUNDED_BITS: u32 = 0;

/// What becomes of the float values of a row.
pub(super) enum Floats<'a> {
    /// Rounded into the form, for a digest.
    Rounded,
    /// Set apart here, in order, for a comparison within the margin; the form keeps their
    /// place.
    Apart(&'a mut Vec<Float>),
}

/// A float value as read, and whether its column is Float32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Float {
    value: f64,
    single: bool,
}

impl Float {
    /// Equal as the source says (NaN equals NaN, -0 equals 0), or at most [`MAX_ULPS`] units
    /// in the last place apart.
    pub(super) fn close(self, other: Float) -> bool {
        let (a, b) = (self.value, other.value);
        if a.is_nan() || b.is_nan() {
            return a.is_nan() && b.is_nan();
        }
        if a == b {
            return true;
        }
        if a.is_infinite() || b.is_infinite() || (a < 0.0) != (b < 0.0) {
            return false;
        }
        let ulps = if self.single || other.single {
            (a as f32).to_bits().abs_diff((b as f32).to_bits()) as u64
        } else {
            a.to_bits().abs_diff(b.to_bits())
        };
        ulps <= MAX_ULPS
    }
}

/// How a column's values compare, from its ClickHouse type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Norm {
    /// The bytes as they are: String, Date, UUID, Enum, and every type not named here.
    Text,
    /// FixedString: trailing zero bytes are its padding.
    Fixed,
    /// Integers, and booleans (UInt8): by value (`+7` and `007` are `7`).
    Int,
    /// By value as a 32-bit float (ClickHouse prints the shortest text that reads back as it).
    Float32,
    /// By value as a 64-bit float. NaN equals NaN and -0 equals 0, as the source's `=` says.
    Float64,
    /// A decimal of this scale, by value: written with exactly that many fraction digits.
    Decimal(usize),
    /// DateTime (0) or DateTime64 with this many fraction digits; finer ones are cut off, as
    /// ClickHouse cuts them when it reads the value.
    DateTime(usize),
    /// `[a,NULL,'b']`, each element compared by its own type.
    Array(Box<Norm>),
}

/// The comparison of a ClickHouse type (`Nullable(...)` and `LowCardinality(...)` make no
/// difference).
pub(super) fn norm(ch_type: &str) -> Norm {
    let t = ch_type.trim();
    for wrapper in ["Nullable(", "LowCardinality("] {
        if let Some(inner) = t.strip_prefix(wrapper).and_then(|r| r.strip_suffix(')')) {
            return norm(inner);
        }
    }
    if let Some(inner) = t.strip_prefix("Array(").and_then(|r| r.strip_suffix(')')) {
        return Norm::Array(Box::new(norm(inner)));
    }
    let args = |prefix: &str| -> Option<Vec<String>> {
        let inner = t
            .strip_prefix(prefix)?
            .strip_prefix('(')?
            .strip_suffix(')')?;
        Some(inner.split(',').map(|a| a.trim().to_string()).collect())
    };
    let number = |a: Option<&String>| a.and_then(|a| a.parse::<usize>().ok());
    match t {
        "Float32" => Norm::Float32,
        "Float64" => Norm::Float64,
        "DateTime" => Norm::DateTime(0),
        _ if t.starts_with("Int") || t.starts_with("UInt") => Norm::Int,
        _ if t.starts_with("FixedString(") => Norm::Fixed,
        _ if t.starts_with("DateTime64") => match args("DateTime64") {
            Some(a) => number(a.first()).map_or(Norm::Text, Norm::DateTime),
            None => Norm::Text,
        },
        _ if t.starts_with("DateTime(") => Norm::DateTime(0),
        _ => {
            if let Some(a) = args("Decimal") {
                return number(a.get(1)).map_or(Norm::Text, Norm::Decimal);
            }
            for p in ["Decimal32", "Decimal64", "Decimal128", "Decimal256"] {
                if let Some(a) = args(p) {
                    return number(a.first()).map_or(Norm::Text, Norm::Decimal);
                }
            }
            Norm::Text
        }
    }
}

/// Append the form of one `TabSeparated` field (NULL is `\N`) to `out`; `scratch` is reused
/// between calls.
pub(super) fn encode(
    norm: &Norm,
    field: &[u8],
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    floats: &mut Floats<'_>,
) {
    if field == b"\\N" {
        out.push(NULL);
        return;
    }
    if let Norm::Array(el) = norm {
        if let Some(items) = elements(field) {
            out.push(ARRAY);
            out.extend_from_slice(&(items.len() as u32).to_le_bytes());
            for item in items {
                match item {
                    None => out.push(NULL),
                    Some(text) => value(el, &text, out, floats),
                }
            }
            return;
        }
    }
    scratch.clear();
    unescape_into(field, scratch);
    value(norm, scratch, out, floats);
}

/// Append the form of one value given as text (unescaped).
fn value(norm: &Norm, text: &[u8], out: &mut Vec<u8>, floats: &mut Floats<'_>) {
    let single = *norm == Norm::Float32;
    if single || *norm == Norm::Float64 {
        let read = std::str::from_utf8(text).ok().and_then(|t| {
            if single {
                float::<f32>(t).map(f64::from)
            } else {
                float::<f64>(t)
            }
        });
        if let Some(value) = read {
            match floats {
                Floats::Apart(apart) => {
                    out.push(FLOAT);
                    apart.push(Float { value, single });
                }
                Floats::Rounded => {
                    out.push(VALUE);
                    let bits = if single {
                        rounded((value as f32).to_bits() as u64, F32_ROUNDED_BITS)
                    } else {
                        rounded(value.to_bits(), F64_ROUNDED_BITS)
                    };
                    if value.is_nan() {
                        out.extend_from_slice(&[3, 0, 0, 0, b'n', b'a', b'n']);
                    } else if value == 0.0 {
                        out.extend_from_slice(&[1, 0, 0, 0, b'0']);
                    } else {
                        out.extend_from_slice(&[8, 0, 0, 0]);
                        out.extend_from_slice(&bits.to_le_bytes());
                    }
                }
            }
            return;
        }
    }
    out.push(VALUE);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let done = match norm {
        // Floats that do not read as floats are compared as text.
        Norm::Text | Norm::Array(_) | Norm::Float32 | Norm::Float64 => false,
        Norm::Fixed => {
            let end = text.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            out.extend_from_slice(&text[..end]);
            true
        }
        Norm::Int => match std::str::from_utf8(text).ok().and_then(int) {
            Some(i) => {
                out.extend_from_slice(i.to_string().as_bytes());
                true
            }
            None => false,
        },
        Norm::Decimal(scale) => decimal(text, *scale, out),
        Norm::DateTime(digits) => {
            datetime(text, *digits, out);
            true
        }
    };
    if !done {
        out.extend_from_slice(text);
    }
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

fn int(s: &str) -> Option<i128> {
    let s = s.trim();
    s.strip_prefix('+').unwrap_or(s).parse().ok()
}

fn float<F: std::str::FromStr>(s: &str) -> Option<F> {
    // Rust reads `nan`, `inf`, `-inf`, `infinity` in any case; ClickHouse also prints `-nan`.
    let s = s.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    let s = if s.eq_ignore_ascii_case("-nan") {
        "nan"
    } else {
        s
    };
    s.parse().ok()
}

/// A float's bits without the lowest `drop` bits of its mantissa, rounded.
fn rounded(bits: u64, drop: u32) -> u64 {
    if drop == 0 {
        return bits;
    }
    (bits + (1 << (drop - 1))) & !((1 << drop) - 1)
}

/// `-0012.5` of scale 2 as `-12.50`; false (nothing written) when it is not a plain decimal.
fn decimal(text: &[u8], scale: usize, out: &mut Vec<u8>) -> bool {
    let t = text.trim_ascii();
    let (negative, t) = match t.first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (int, frac) = match t.iter().position(|b| *b == b'.') {
        Some(i) => (&t[..i], &t[i + 1..]),
        None => (t, &t[..0]),
    };
    if int.is_empty() && frac.is_empty() || !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return false;
    }
    let int = &int[int.iter().position(|b| *b != b'0').unwrap_or(int.len())..];
    let mut frac = frac.to_vec();
    while frac.len() > scale && frac.last() == Some(&b'0') {
        frac.pop();
    }
    frac.resize(frac.len().max(scale), b'0');
    let zero = int.is_empty() && frac.iter().all(|b| *b == b'0');
    if negative && !zero {
        out.push(b'-');
    }
    if int.is_empty() {
        out.push(b'0');
    } else {
        out.extend_from_slice(int);
    }
    if !frac.is_empty() {
        out.push(b'.');
        out.extend_from_slice(&frac);
    }
    true
}

/// `2025-01-31 10:34:56.789123` with `digits` fraction digits (padded or cut off).
fn datetime(text: &[u8], digits: usize, out: &mut Vec<u8>) {
    let (base, frac) = match text.iter().position(|b| *b == b'.') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, &text[..0]),
    };
    out.extend_from_slice(base);
    if digits > 0 {
        out.push(b'.');
        for i in 0..digits {
            out.push(frac.get(i).copied().unwrap_or(b'0'));
        }
    }
}

/// The elements of an array literal as both sides print it in `TabSeparated`: `[1,NULL,3]`,
/// `['a\tb','it\'s','it''s']` (ClickHouse escapes a quote with a backslash, the source doubles
/// it); `None` when the field is no such literal. Quoted elements come unescaped.
fn elements(field: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
    let inner = field.trim_ascii().strip_prefix(b"[")?.strip_suffix(b"]")?;
    let mut items = Vec::new();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while inner.get(*i).is_some_and(|b| b.is_ascii_whitespace()) {
            *i += 1;
        }
    };
    skip_space(&mut i);
    if i == inner.len() {
        return Some(items);
    }
    loop {
        skip_space(&mut i);
        if inner.get(i) == Some(&b'\'') {
            i += 1;
            let mut text = Vec::new();
            loop {
                match *inner.get(i)? {
                    b'\\' => {
                        let mut one = Vec::new();
                        unescape_into(inner.get(i..i + 2)?, &mut one);
                        text.extend_from_slice(&one);
                        i += 2;
                    }
                    b'\'' if inner.get(i + 1) == Some(&b'\'') => {
                        text.push(b'\'');
                        i += 2;
                    }
                    b'\'' => {
                        i += 1;
                        break;
                    }
                    b => {
                        text.push(b);
                        i += 1;
                    }
                }
            }
            items.push(Some(text));
            skip_space(&mut i);
        } else {
            let start = i;
            while inner.get(i).is_some_and(|b| *b != b',') {
                i += 1;
            }
            let token = inner[start..i].trim_ascii();
            if token.is_empty() {
                return None;
            }
            items.push((token != b"NULL").then(|| token.to_vec()));
        }
        match inner.get(i) {
            None => return Some(items),
            Some(b',') => i += 1,
            Some(_) => return None,
        }
    }
}

/// The text of each field of a key's form (keys are never NULL and never arrays).
pub(super) fn key_text(form: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < form.len() {
        match form[i] {
            VALUE if i + 5 <= form.len() => {
                let len = u32::from_le_bytes(form[i + 1..i + 5].try_into().expect("4 bytes"));
                let end = (i + 5 + len as usize).min(form.len());
                out.push(String::from_utf8_lossy(&form[i + 5..end]).into_owned());
                i = end;
            }
            _ => {
                out.push(String::new());
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(norm: &Norm, field: &str) -> Vec<u8> {
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        encode(
            norm,
            field.as_bytes(),
            &mut out,
            &mut scratch,
            &mut Floats::Rounded,
        );
        out
    }

    /// The form with the floats apart, and the floats.
    fn apart(norm: &Norm, field: &str) -> (Vec<u8>, Vec<Float>) {
        let (mut out, mut scratch, mut floats) = (Vec::new(), Vec::new(), Vec::new());
        encode(
            norm,
            field.as_bytes(),
            &mut out,
            &mut scratch,
            &mut Floats::Apart(&mut floats),
        );
        (out, floats)
    }

    /// The two texts (source's, ClickHouse's) compare as `equal` for `ty`, as the final check
    /// compares them.
    fn same(ty: &str, source: &str, clickhouse: &str, equal: bool) {
        let n = norm(ty);
        let (a, x) = apart(&n, source);
        let (b, y) = apart(&n, clickhouse);
        let close = x.len() == y.len() && x.iter().zip(&y).all(|(x, y)| x.close(*y));
        assert_eq!(a == b && close, equal, "{ty}: {source:?} vs {clickhouse:?}");
        // Whatever the final check calls equal, a digest mostly does too.
        if equal && !ty.contains("Float") {
            assert_eq!(form(&n, source), form(&n, clickhouse), "{ty}: {source:?}");
        }
    }

    #[test]
    fn clickhouse_types_pick_their_comparison() {
        assert_eq!(norm("Int64"), Norm::Int);
        assert_eq!(norm("Nullable(UInt8)"), Norm::Int);
        assert_eq!(norm("Nullable(Decimal(12, 4))"), Norm::Decimal(4));
        assert_eq!(norm("Decimal64(3)"), Norm::Decimal(3));
        assert_eq!(norm("DateTime('UTC')"), Norm::DateTime(0));
        assert_eq!(norm("Nullable(DateTime64(6, 'UTC'))"), Norm::DateTime(6));
        assert_eq!(norm("DateTime64(3)"), Norm::DateTime(3));
        assert_eq!(norm("DateTime"), Norm::DateTime(0));
        assert_eq!(norm("Date"), Norm::Text);
        assert_eq!(norm("UUID"), Norm::Text);
        assert_eq!(norm("LowCardinality(Nullable(String))"), Norm::Text);
        assert_eq!(norm("FixedString(4)"), Norm::Fixed);
        assert_eq!(
            norm("Array(Nullable(Float32))"),
            Norm::Array(Box::new(Norm::Float32))
        );
    }

    /// Every mapped type (sink::clickhouse::types), as the source prints it and as ClickHouse
    /// 18.16 prints it back.
    #[test]
    fn each_mapped_type_compares_as_clickhouse_holds_it() {
        same("Int16", "-3", "-3", true);
        same("Int64", "9007199254740993", "9007199254740993", true);
        same("Int64", "9007199254740993", "9007199254740992", false);
        same("Int32", "007", "7", true);
        same("Float32", "1.5", "1.5", true);
        same("Float32", "0.1", "0.1", true);
        // The source's real prints 3.4028235e+38; ClickHouse 3.4028235e38.
        same("Float32", "3.4028235e+38", "3.4028235e38", true);
        same("Float32", "nan", "nan", true);
        same("Float32", "-inf", "-inf", true);
        same("Float32", "inf", "-inf", false);
        same("Float64", "0.1", "0.1", true);
        // ClickHouse reads 2.857142857142857 as 2.8571428571428568, a unit in the last place
        // below the nearest double: equal within the margin.
        same("Float64", "2.857142857142857", "2.8571428571428568", true);
        same("Float64", "0.1", "0.10000000000000002", true);
        same("Float64", "0.1", "0.1000000000000001", false);
        same("Float64", "0.1", "-0.1", false);
        same("Float64", "inf", "1.7976931348623157e308", false);
        same("Float32", "0.1", "0.10000001", true);
        same("Float32", "0.1", "0.1000001", false);
        same("Float64", "-0", "0", true);
        same("Float64", "1e+300", "1e300", true);
        same("Float64", "nan", "-nan", true);
        same("Float64", "\\N", "nan", false);
        same("Decimal(12, 4)", "12345678.1234", "12345678.1234", true);
        same("Decimal(10, 2)", "1.5", "1.50", true);
        same("Decimal(10, 2)", "1.50", "1.51", false);
        same("Decimal(10, 0)", "-0", "0", true);
        same(
            "String",
            "3.14159265358979323846",
            "3.14159265358979323846",
            true,
        );
        same(
            "String",
            "3.14159265358979323846",
            "3.1415926535897932385",
            false,
        );
        same("Nullable(UInt8)", "1", "1", true);
        same("Nullable(UInt8)", "0", "1", false);
        same("Date", "2025-01-31", "2025-01-31", true);
        same(
            "DateTime('UTC')",
            "2025-01-31 10:34:56",
            "2025-01-31 10:34:56",
            true,
        );
        same(
            "DateTime64(6, 'UTC')",
            "2025-01-31 10:34:56.789000",
            "2025-01-31 10:34:56.789000",
            true,
        );
        same(
            "DateTime64(3)",
            "2025-01-31 10:34:56.789123",
            "2025-01-31 10:34:56.789",
            true,
        );
        same(
            "DateTime64(6, 'UTC')",
            "2025-01-31 10:34:56.789001",
            "2025-01-31 10:34:56.789000",
            false,
        );
        same(
            "UUID",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            true,
        );
        // The source's COPY leaves quotes as they are; ClickHouse escapes them.
        same(
            "Nullable(String)",
            "tab\\there\\nnew 'q' \\\\ back",
            "tab\\there\\nnew \\'q\\' \\\\ back",
            true,
        );
        same("Nullable(String)", "a\\\\b", "a\\b", false);
        same("Nullable(String)", "\\N", "\\\\N", false);
        same("Nullable(String)", "\\N", "", false);
        same("Nullable(String)", "\\N", "\\N", true);
        same("String", "{\"k\": [1, \"x\"]}", "{\"k\": [1, \"x\"]}", true);
        same("FixedString(4)", "ab", "ab\\0\\0", true);
        same("Array(Nullable(Int32))", "[1,NULL,3]", "[1,NULL,3]", true);
        same("Array(Nullable(Int32))", "[1,NULL,3]", "[1,3,NULL]", false);
        same("Array(Nullable(Int32))", "[]", "[]", true);
        same("Array(Nullable(Int32))", "[]", "[NULL]", false);
        same(
            "Array(Nullable(String))",
            "['a b','it''s',NULL]",
            "['a b','it\\'s',NULL]",
            true,
        );
        same("Array(Nullable(String))", "['NULL']", "[NULL]", false);
        same(
            "Array(Nullable(String))",
            "['a\\tb','c\\\\d','e,f]']",
            "['a\\tb','c\\\\d','e,f]']",
            true,
        );
        same("Array(Nullable(String))", "['a','b']", "['a,b']", false);
        same(
            "Array(Nullable(Float64))",
            "[0.1,nan,-inf,1e+300]",
            "[0.1,nan,-inf,1e300]",
            true,
        );
        same(
            "Array(Nullable(Float64))",
            "[0.1,NULL]",
            "[0.10000000000000002,NULL]",
            true,
        );
        same(
            "Array(Nullable(Float64))",
            "[0.1,NULL]",
            "[NULL,0.1]",
            false,
        );
        same("Array(Nullable(Float64))", "[0.1]", "[0.1,0.1]", false);
        same(
            "Array(Nullable(Decimal(10, 2)))",
            "[1.50,NULL]",
            "[1.50,NULL]",
            true,
        );
        same(
            "Array(Nullable(DateTime('UTC')))",
            "['2025-01-31 10:34:56']",
            "['2025-01-31 10:34:56']",
            true,
        );
        same(
            "Array(Nullable(UUID))",
            "['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']",
            "['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']",
            true,
        );
        // Not an array literal: compared as text.
        same("Array(Int32)", "[1,", "[1,", true);
    }

    #[test]
    fn digests_round_floats_but_not_away_their_differences() {
        let n = Norm::Float64;
        // A unit in the last place mostly rounds alike...
        assert_eq!(form(&n, "0.1"), form(&n, "0.10000000000000002"));
        // ...a difference a digest can see does not.
        assert_ne!(form(&n, "0.1"), form(&n, "0.1000000000001"));
        assert_ne!(form(&n, "0"), form(&n, "5e-324"));
        assert_eq!(form(&n, "-0"), form(&n, "0"));
        assert_eq!(form(&n, "nan"), form(&n, "-nan"));
        assert_ne!(form(&n, "nan"), form(&n, "inf"));
        assert_ne!(
            form(&Norm::Float32, "0.1"),
            form(&Norm::Float32, "0.10000001")
        );
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        let n = Norm::Text;
        let row = |a: &str, b: &str| [form(&n, a), form(&n, b)].concat();
        assert_ne!(row("ab", "c"), row("a", "bc"));
    }

    #[test]
    fn keys_read_back_as_text() {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        for (n, field) in [
            (Norm::Int, &b"0042"[..]),
            (Norm::Text, b"it\\'s"),
            (Norm::Decimal(2), b"1.5"),
        ] {
            encode(&n, field, &mut out, &mut scratch, &mut Floats::Rounded);
        }
        assert_eq!(key_text(&out), ["42", "it's", "1.50"]);
    }
}
