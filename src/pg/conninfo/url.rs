//! The URL form, `postgres://user:password@host:port,host:port/dbname?key=value`, read into
//! the `key=value` pairs it stands for, as libpq reads it (percent-decoding, `[v6]` hosts,
//! query parameters overriding the URL's parts).

use super::{err, ParseError};

/// The length of the URL scheme `s` starts with, if it is a URL.
pub(super) fn scheme_len(s: &str) -> Option<usize> {
    ["postgresql://", "postgres://"]
        .iter()
        .find(|p| s.starts_with(**p))
        .map(|p| p.len())
}

fn percent_decode(s: &str, what: &str) -> Result<String, ParseError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) if v != 0 => out.push(v),
                _ => return err(format!("invalid percent-encoded token in {what}")),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ParseError(format!("invalid UTF-8 in {what}")))
}

/// The URL form as `key=value` pairs, in libpq's order: what the URL's parts say, then its query
/// parameters (which override them, as in libpq).
pub(super) fn pairs(s: &str) -> Result<Vec<(String, String)>, ParseError> {
    let rest = &s[scheme_len(s).unwrap_or(0)..];
    let (main, query) = match rest.find('?') {
        Some(q) => (&rest[..q], Some(&rest[q + 1..])),
        None => (rest, None),
    };
    let (authority, path) = match main.find('/') {
        Some(p) => (&main[..p], Some(&main[p + 1..])),
        None => (main, None),
    };
    let mut pairs = Vec::new();
    let hostspec = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let (user, password) = match userinfo.find(':') {
                Some(c) => (&userinfo[..c], Some(&userinfo[c + 1..])),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                pairs.push(("user".into(), percent_decode(user, "the user name")?));
            }
            if let Some(p) = password {
                pairs.push(("password".into(), percent_decode(p, "the password")?));
            }
            &authority[at + 1..]
        }
        None => authority,
    };
    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for part in hostspec.split(',') {
            let (host, port) = if let Some(r) = part.strip_prefix('[') {
                let Some(end) = r.find(']') else {
                    return err(format!("missing \"]\" in IPv6 host address \"{part}\""));
                };
                let after = &r[end + 1..];
                let port = match after.strip_prefix(':') {
                    Some(p) => p,
                    None if after.is_empty() => "",
                    None => {
                        return err(format!(
                            "unexpected \"{after}\" after IPv6 host address \"{part}\""
                        ))
                    }
                };
                (&r[..end], port)
            } else {
                match part.rfind(':') {
                    Some(c) => (&part[..c], &part[c + 1..]),
                    None => (part, ""),
                }
            };
            hosts.push(percent_decode(host, "a host")?);
            ports.push(percent_decode(port, "a port")?);
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            pairs.push(("host".into(), hosts.join(",")));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            pairs.push(("port".into(), ports.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        pairs.push(("dbname".into(), percent_decode(db, "the database name")?));
    }
    for param in query.into_iter().flat_map(|q| q.split('&')) {
        if param.is_empty() {
            continue;
        }
        let Some(eq) = param.find('=') else {
            return err(format!("missing \"=\" in URI query parameter \"{param}\""));
        };
        let key = percent_decode(&param[..eq], "a query parameter")?;
        let value = percent_decode(&param[eq + 1..], "a query parameter")?;
        // libpq's one translation: the JDBC spelling `ssl=true`.
        if key == "ssl" && value == "true" {
            pairs.push(("sslmode".into(), "require".into()));
        } else {
            pairs.push((key, value));
        }
    }
    Ok(pairs)
}

/// `s` (a URL) with its user-info password and any `password` query parameter replaced by
/// `***`.
pub(super) fn redact(s: &str, scheme: usize) -> String {
    let mut out = s.to_string();
    // user-info password
    let rest = &s[scheme..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    if let Some(at) = rest[..auth_end].rfind('@') {
        if let Some(colon) = rest[..at].find(':') {
            out.replace_range(scheme + colon + 1..scheme + at, "***");
        }
    }
    // query parameters named password (possibly percent-encoded)
    if let Some(q) = out.find('?') {
        let mut params: Vec<String> = out[q + 1..].split('&').map(String::from).collect();
        for p in &mut params {
            let key = p.split('=').next().unwrap_or("");
            if percent_decode(key, "").map_or(key.to_string(), |k| k) == "password" {
                *p = format!("{}=***", &p[..key.len()]);
            }
        }
        out = format!("{}?{}", &out[..q], params.join("&"));
    }
    out
}

/// `s` (a URL) with `password` added as a query parameter.
pub(super) fn with_password(s: &str, password: &str) -> String {
    let enc = percent_encode(password);
    let sep = if s.contains('?') { '&' } else { '?' };
    format!("{s}{sep}password={enc}")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
