//! libpq connection strings, parsed by pgtide itself: `postgres://` / `postgresql://` URLs and
//! `key=value` strings, into one typed [`ConnInfo`].
//!
//! tokio-postgres has a parser of its own, but it refuses `sslmode=verify-ca`/`verify-full` and
//! the ssl file keys, so pgtide parses the string with libpq's rules and builds the driver's
//! configuration from the result.

use std::fmt;
use std::time::Duration;

/// `sslmode`, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// `target_session_attrs`, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    Any,
    ReadWrite,
    ReadOnly,
    Primary,
    Standby,
    PreferStandby,
}

impl SessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }
}

/// `channel_binding`: whether SCRAM binds the password exchange to the TLS channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    Disable,
    Prefer,
    Require,
}

/// One server to try: a host name, an address, or a Unix socket directory, and its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// As given (`db1`, `10.0.0.5`, `/var/run/postgresql`).
    pub host: String,
    /// `hostaddr`: the address to connect to instead of resolving `host`.
    pub hostaddr: Option<std::net::IpAddr>,
    pub port: u16,
}

impl Endpoint {
    /// A Unix socket directory rather than a TCP host.
    pub fn is_socket(&self) -> bool {
        self.host.starts_with('/')
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') && !self.is_socket() {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A parsed connection string. `password` is the only secret; `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub endpoints: Vec<Endpoint>,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub passfile: Option<String>,
    pub sslmode: SslMode,
    /// Whether `sslmode` was given (libpq makes `verify-full` the default with
    /// `sslrootcert=system`).
    pub sslmode_given: bool,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub connect_timeout: Option<Duration>,
    pub application_name: Option<String>,
    pub options: Option<String>,
    pub target_session_attrs: SessionAttrs,
    pub channel_binding: ChannelBinding,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnInfo")
            .field("endpoints", &self.endpoints)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("target_session_attrs", &self.target_session_attrs)
            .finish_non_exhaustive()
    }
}

impl ConnInfo {
    /// The user name a server sees: the given one, else the operating system's (as libpq).
    pub fn user_or_default(&self) -> String {
        self.user.clone().unwrap_or_else(os_user)
    }

    /// `host:port,host:port/dbname`: which server is meant, nothing secret.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self.endpoints.iter().map(|e| e.to_string()).collect();
        format!(
            "{}/{}",
            hosts.join(","),
            self.dbname
                .clone()
                .unwrap_or_else(|| self.user_or_default())
        )
    }
}

/// The operating system's name for the current user, libpq's default user name.
pub fn os_user() -> String {
    if let Ok(u) = std::env::var("USER") {
        if !u.is_empty() {
            return u;
        }
    }
    // SAFETY: getpwuid returns a pointer into static storage or null; the name is copied out
    // before any other call could overwrite it.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            return std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned();
        }
    }
    "postgres".into()
}

/// Where libpq looks for a server when no host is given: the default socket directory.
fn default_host() -> String {
    for dir in ["/var/run/postgresql", "/tmp"] {
        if std::path::Path::new(dir).is_dir() {
            return dir.into();
        }
    }
    "localhost".into()
}

/// Why a connection string was refused. Never holds the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(m.into()))
}

/// Parse either form, as libpq decides: a string starting with `postgres://` or
/// `postgresql://` is a URL, anything else `key=value` pairs.
pub fn parse(s: &str) -> Result<ConnInfo, ParseError> {
    let pairs = if url_scheme_len(s).is_some() {
        url_pairs(s)?
    } else {
        kv_pairs(s)?.into_iter().map(|(k, v, _)| (k, v)).collect()
    };
    from_pairs(pairs)
}

fn url_scheme_len(s: &str) -> Option<usize> {
    ["postgresql://", "postgres://"]
        .iter()
        .find(|p| s.starts_with(**p))
        .map(|p| p.len())
}

/// `key=value` pairs with the byte range of each value in `s` (for redaction).
fn kv_pairs(s: &str) -> Result<Vec<(String, String, std::ops::Range<usize>)>, ParseError> {
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
fn url_pairs(s: &str) -> Result<Vec<(String, String)>, ParseError> {
    let rest = &s[url_scheme_len(s).unwrap_or(0)..];
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

/// Split a comma list of per-host values (`hostaddr`, `port`): empty elements stay empty.
fn split_list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).collect()
}

fn from_pairs(pairs: Vec<(String, String)>) -> Result<ConnInfo, ParseError> {
    let mut hosts = None;
    let mut hostaddrs = None;
    let mut ports = None;
    let mut info = ConnInfo {
        endpoints: Vec::new(),
        dbname: None,
        user: None,
        password: None,
        passfile: None,
        sslmode: SslMode::Prefer,
        sslmode_given: false,
        sslrootcert: None,
        sslcert: None,
        sslkey: None,
        connect_timeout: None,
        application_name: None,
        options: None,
        target_session_attrs: SessionAttrs::Any,
        channel_binding: ChannelBinding::Prefer,
    };
    for (key, value) in pairs {
        // libpq treats an empty value like an absent one for most keys.
        let some = |v: String| (!v.is_empty()).then_some(v);
        match key.as_str() {
            "host" => hosts = some(value),
            "hostaddr" => hostaddrs = some(value),
            "port" => ports = some(value),
            "dbname" => info.dbname = some(value),
            "user" => info.user = some(value),
            "password" => info.password = Some(value),
            "passfile" => info.passfile = some(value),
            "sslmode" => {
                info.sslmode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    "allow" => {
                        return err(
                            "sslmode \"allow\" is not supported by pgtide: use \"prefer\" or \"disable\"",
                        )
                    }
                    other => return err(format!("invalid sslmode value: \"{other}\"")),
                };
                info.sslmode_given = true;
            }
            "sslrootcert" => info.sslrootcert = some(value),
            "sslcert" => info.sslcert = some(value),
            "sslkey" => info.sslkey = some(value),
            "connect_timeout" => {
                let secs: i64 = value.trim().parse().map_err(|_| {
                    ParseError(format!("invalid integer value \"{value}\" for connection option \"connect_timeout\""))
                })?;
                // As libpq: zero or less waits forever, and less than 2 s counts as 2 s.
                info.connect_timeout = (secs > 0).then(|| Duration::from_secs(secs.max(2) as u64));
            }
            "application_name" | "fallback_application_name" => {
                if key == "application_name" || info.application_name.is_none() {
                    info.application_name = some(value);
                }
            }
            "options" => info.options = some(value),
            "target_session_attrs" => {
                info.target_session_attrs = match value.as_str() {
                    "any" => SessionAttrs::Any,
                    "read-write" => SessionAttrs::ReadWrite,
                    "read-only" => SessionAttrs::ReadOnly,
                    "primary" => SessionAttrs::Primary,
                    "standby" => SessionAttrs::Standby,
                    "prefer-standby" => SessionAttrs::PreferStandby,
                    other => {
                        return err(format!("invalid target_session_attrs value: \"{other}\""))
                    }
                }
            }
            "channel_binding" => {
                info.channel_binding = match value.as_str() {
                    "disable" => ChannelBinding::Disable,
                    "prefer" => ChannelBinding::Prefer,
                    "require" => ChannelBinding::Require,
                    other => return err(format!("invalid channel_binding value: \"{other}\"")),
                }
            }
            // libpq keys whose default is all pgtide does: accepted so that strings written for
            // psql keep working.
            "keepalives"
            | "keepalives_idle"
            | "keepalives_interval"
            | "keepalives_count"
            | "sslcompression"
            | "sslsni"
            | "client_encoding" => {}
            "gssencmode" if value != "require" => {}
            other => return err(format!("invalid connection option \"{other}\"")),
        }
    }
    let hosts = hosts.map(|h| split_list(&h));
    let addrs = hostaddrs.map(|h| split_list(&h));
    let n = hosts
        .as_ref()
        .map(Vec::len)
        .or(addrs.as_ref().map(Vec::len))
        .unwrap_or(1);
    if let (Some(h), Some(a)) = (&hosts, &addrs) {
        if h.len() != a.len() {
            return err(format!(
                "could not match {} host names to {} hostaddr values",
                h.len(),
                a.len()
            ));
        }
    }
    let ports: Vec<String> = ports.map(|p| split_list(&p)).unwrap_or_default();
    if ports.len() > 1 && ports.len() != n {
        return err(format!(
            "could not match {} port numbers to {n} hosts",
            ports.len()
        ));
    }
    for i in 0..n {
        let addr: Option<std::net::IpAddr> = match addrs.as_ref().map(|a| a[i].as_str()) {
            Some("") | None => None,
            Some(a) => Some(
                a.parse()
                    .map_err(|_| ParseError(format!("could not parse network address \"{a}\"")))?,
            ),
        };
        let host = match hosts.as_ref().map(|h| h[i].clone()) {
            Some(h) if !h.is_empty() => h,
            _ => match addr {
                Some(a) => a.to_string(),
                None => default_host(),
            },
        };
        let port = match ports.get(i).or(ports.first()).map(String::as_str) {
            None | Some("") => 5432,
            Some(p) => match p.parse::<u16>() {
                Ok(v) if v > 0 => v,
                _ => return err(format!("invalid port number: \"{p}\"")),
            },
        };
        info.endpoints.push(Endpoint {
            host,
            hostaddr: addr,
            port,
        });
    }
    Ok(info)
}

/// The string with its password replaced by `***`, for messages and logs; both forms. A string
/// that does not parse has every `password=` value and URL user-info password masked as well as
/// its shape allows.
pub fn redact(s: &str) -> String {
    let mut out = s.to_string();
    if let Some(scheme) = url_scheme_len(s) {
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
        return out;
    }
    match kv_pairs(s) {
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

/// Give the string a password, in its own form, unless it already has one (for `password_file`).
pub fn with_password(s: &str, password: &str) -> String {
    if url_scheme_len(s).is_some() {
        let enc = percent_encode(password);
        let sep = if s.contains('?') { '&' } else { '?' };
        format!("{s}{sep}password={enc}")
    } else {
        let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
        format!("{s} password='{quoted}'")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            hostaddr: None,
            port,
        }
    }

    #[test]
    fn urls_with_several_hosts_percent_decoding_and_parameters() {
        let c = parse("postgresql://app%40x:p%3As%2Fw@db1:5432,db2:5433,[::1]/sh%20op?sslmode=verify-full&sslrootcert=/etc/ca.pem&target_session_attrs=read-write&application_name=a&connect_timeout=1").unwrap();
        assert_eq!(
            c.endpoints,
            vec![ep("db1", 5432), ep("db2", 5433), ep("::1", 5432)]
        );
        assert_eq!(c.user.as_deref(), Some("app@x"));
        assert_eq!(c.password.as_deref(), Some("p:s/w"));
        assert_eq!(c.dbname.as_deref(), Some("sh op"));
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(c.target_session_attrs, SessionAttrs::ReadWrite);
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.describe(), "db1:5432,db2:5433,[::1]:5432/sh op");
    }

    #[test]
    fn url_socket_directories_and_query_host() {
        let c = parse("postgres://app@%2Fvar%2Frun%2Fpostgresql/shop").unwrap();
        assert_eq!(c.endpoints, vec![ep("/var/run/postgresql", 5432)]);
        assert!(c.endpoints[0].is_socket());
        let c = parse("postgres:///shop?host=/tmp&port=6000&user=u").unwrap();
        assert_eq!(c.endpoints, vec![ep("/tmp", 6000)]);
        assert_eq!(c.user.as_deref(), Some("u"));
        assert_eq!(
            parse("postgres://h/db?ssl=true").unwrap().sslmode,
            SslMode::Require
        );
    }

    #[test]
    fn key_value_strings_with_quotes_and_escapes() {
        let c = parse(
            r"host=db1,db2 port=5432 dbname = 'my db' user=app password='it\'s a \\ secret' options='-c search_path=foo' sslmode=verify-ca",
        )
        .unwrap();
        assert_eq!(c.endpoints, vec![ep("db1", 5432), ep("db2", 5432)]);
        assert_eq!(c.dbname.as_deref(), Some("my db"));
        assert_eq!(c.password.as_deref(), Some(r"it's a \ secret"));
        assert_eq!(c.options.as_deref(), Some("-c search_path=foo"));
        assert_eq!(c.sslmode, SslMode::VerifyCa);
        let c = parse(r"host=/tmp hostaddr=127.0.0.1 port=7 user=a\ b").unwrap();
        assert_eq!(c.user.as_deref(), Some("a b"));
        assert_eq!(c.endpoints[0].hostaddr, Some("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        assert_eq!(
            parse("host=x colour=red").unwrap_err().0,
            "invalid connection option \"colour\""
        );
        assert_eq!(
            parse("postgres://x/y?colour=red").unwrap_err().0,
            "invalid connection option \"colour\""
        );
        assert!(parse("host=x sslmode=sometimes")
            .unwrap_err()
            .0
            .contains("invalid sslmode value"));
        assert!(parse("host=x port=abc")
            .unwrap_err()
            .0
            .contains("invalid port number"));
        assert!(parse("host='x").unwrap_err().0.contains("unterminated"));
        assert!(parse("host").unwrap_err().0.contains("missing \"=\""));
        assert!(parse("postgres://x/%zz").unwrap_err().0.contains("percent"));
        assert!(parse("host=a,b,c port=1,2")
            .unwrap_err()
            .0
            .contains("could not match 2 port numbers to 3 hosts"));
    }

    #[test]
    fn redaction_covers_both_forms() {
        for (input, want) in [
            (
                "postgres://app:s3cret@db:5432/shop",
                "postgres://app:***@db:5432/shop",
            ),
            (
                "postgres://app@db/shop?password=s3cret&x=1",
                "postgres://app@db/shop?password=***&x=1",
            ),
            (
                "postgres://app@db/shop?pass%77ord=s3cret",
                "postgres://app@db/shop?pass%77ord=***",
            ),
            (
                "host=db password=s3cret user=app",
                "host=db password=*** user=app",
            ),
            (
                r"host=db password = 'has s3cret \' inside' user=app",
                "host=db password = *** user=app",
            ),
            ("postgres://app@db/shop", "postgres://app@db/shop"),
            (
                "host=db password='unterminated s3cret",
                "host=db password=***",
            ),
        ] {
            assert_eq!(redact(input), want);
        }
    }

    #[test]
    fn a_password_added_in_either_form_parses_back() {
        for base in [
            "postgres://app@db/shop",
            "postgres://app@db/shop?x=",
            "host=db user=app",
        ] {
            let base = base.replace("?x=", "?sslmode=disable");
            let s = with_password(&base, r"p@ss w'o\rd&=%");
            assert_eq!(
                parse(&s).unwrap().password.as_deref(),
                Some(r"p@ss w'o\rd&=%"),
                "{s}"
            );
            assert!(!redact(&s).contains("ss w"), "{}", redact(&s));
        }
    }
}
