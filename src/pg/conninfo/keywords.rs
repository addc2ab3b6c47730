//! The `key=value` form, `host=db1 dbname='my db'`: pairs read as libpq reads them (single
//! quotes, backslash escapes, spaces around `=`).

use super::{err, ParseError};

/// `key=value` pairs with the byte range of each value in `s` (for redaction).
pub(super) fn pairs(s: &str) -> Result<Vec<(String, String, std::ops::Range<usize>)>, ParseError> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[ks..i].to_string();
        skip_ws(&mut i);
        if i >= b.len() || b[i] != b'=' {
            return err(format!("missing \"=\" after \"{key}\""));
        }
        i += 1;
        skip_ws(&mut i);
        let mut val = Vec::new();
        let vs = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                if i >= b.len() {
                    return err(format!("unterminated quoted value of \"{key}\""));
                }
                match b[i] {
                    b'\\' if i + 1 < b.len() => {
                        val.push(b[i + 1]);
                        i += 2;
                    }
                    b'\'' => {
                        i += 1;
                        break;
                    }
                    c => {
                        val.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    val.push(b[i + 1]);
                    i += 2;
                } else {
                    val.push(b[i]);
                    i += 1;
                }
            }
        }
        let val = String::from_utf8(val).map_err(|_| ParseError("invalid UTF-8".into()))?;
        out.push((key, val, vs..i));
    }
    Ok(out)
}

/// `s` (`key=value` pairs) with every `password` value replaced by `***`; a string that does
/// not parse is masked from its first `password` to the end.
pub(super) fn redact(s: &str) -> String {
    let mut out = s.to_string();
    match pairs(s) {
        Ok(pairs) => {
            for (key, _, range) in pairs.into_iter().rev() {
                if key == "password" {
                    out.replace_range(range, "***");
                }
            }
            out
        }
        Err(_) => {
            // Unparseable: mask from each `password` to the end, the only safe choice.
            match s.find("password") {
                Some(i) => format!("{}password=***", &s[..i]),
                None => out,
            }
        }
    }
}

/// `s` (`key=value` pairs) with a quoted `password` pair added.
pub(super) fn with_password(s: &str, password: &str) -> String {
    let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
    format!("{s} password='{quoted}'")
}
