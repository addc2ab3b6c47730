//! ClickHouse URLs: `clickhouse://` for its HTTP interface, `clickhouses://` for HTTPS, with
//! libpq's names for the TLS options so that both DWHs are configured alike:
//!
//! ```text
//! clickhouse[s]://[user[:password]@]host[:port][/database][?sslmode=..&sslrootcert=..&sslcert=..&sslkey=..&connect_timeout=..]
//! ```
//!
//! The user, password and database are percent-decoded; an IPv6 address goes in brackets.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// ClickHouse's own HTTP port.
pub const HTTP_PORT: u16 = 8123;
/// ClickHouse's usual HTTPS port (`https_port` in its example configuration).
pub const HTTPS_PORT: u16 = 8443;
/// The user ClickHouse logs in when none is named.
pub const DEFAULT_USER: &str = "default";
/// The database every ClickHouse server has.
pub const DEFAULT_DATABASE: &str = "default";

/// The parameters a ClickHouse URL may carry.
const PARAMS: &str = "sslmode, sslrootcert, sslcert, sslkey, connect_timeout";

/// Everything but RFC 3986's unreserved characters is encoded: safe in a URL's user
/// information, path and query alike.
pub(crate) const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How much of an HTTPS server's certificate is checked, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Encrypted; the certificate is not checked, unless `sslrootcert` names roots, then it is
    /// checked as `verify-ca` (as libpq does with a root certificate file).
    Require,
    /// The chain must lead to `sslrootcert` (default: the system's trusted roots).
    VerifyCa,
    /// The chain and the host name.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS settings of a `clickhouses://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub sslmode: SslMode,
    /// Root certificates (PEM); `None`: the system's trusted roots when verifying.
    pub sslrootcert: Option<PathBuf>,
    /// A client certificate and its key (PEM), always given together.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// A parsed ClickHouse URL. Its `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Url {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    database: String,
    tls: Option<Tls>,
    connect_timeout: Option<Duration>,
}

/// A URL that cannot be used, with the problem named; the URL shown has no password.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid clickhouse url {url}: {problem}")]
pub struct UrlError {
    /// The URL as given, its password replaced by `***`.
    pub url: String,
    pub problem: String,
}

impl Url {
    /// Parse a `clickhouse://` or `clickhouses://` URL.
    pub fn parse(s: &str) -> Result<Url, UrlError> {
        parse(s).map_err(|problem| UrlError {
            url: redact(s),
            problem,
        })
    }

    /// Whether `s` is meant as a ClickHouse URL (its scheme), valid or not: how a DWH URL is
    /// told from a PostgreSQL connection string.
    pub fn is_clickhouse(s: &str) -> bool {
        scheme(s).is_some_and(|(name, _)| {
            name.eq_ignore_ascii_case("clickhouse") || name.eq_ignore_ascii_case("clickhouses")
        })
    }

    /// The URL without its password (`***` in its place when there is one): for messages and
    /// logs.
    pub fn redacted(&self) -> String {
        let mut out = String::from(if self.tls.is_some() {
            "clickhouses://"
        } else {
            "clickhouse://"
        });
        out.push_str(&encode(&self.user));
        if self.password.is_some() {
            out.push_str(":***");
        }
        out.push('@');
        out.push_str(&self.authority());
        out.push('/');
        out.push_str(&encode(&self.database));
        let mut params = Vec::new();
        if let Some(t) = &self.tls {
            params.push(format!("sslmode={}", t.sslmode.as_str()));
            if let Some(p) = &t.sslrootcert {
                params.push(format!("sslrootcert={}", encode(&p.to_string_lossy())));
            }
            if let Some((c, k)) = &t.client_cert {
                params.push(format!("sslcert={}", encode(&c.to_string_lossy())));
                params.push(format!("sslkey={}", encode(&k.to_string_lossy())));
            }
        }
        if let Some(t) = self.connect_timeout {
            params.push(format!("connect_timeout={}", t.as_secs()));
        }
        if !params.is_empty() {
            out.push('?');
            out.push_str(&params.join("&"));
        }
        out
    }

    /// The same URL with `password` (from a password file or the environment, say).
    pub fn with_password(mut self, password: String) -> Url {
        self.password = Some(password);
        self
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Whether a password is set (in the URL or by `with_password`).
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// The TLS settings; `None` for plain HTTP.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// `connect_timeout` from the URL, if given.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    /// `host:port`, an IPv6 address in brackets: what a message says to name the server.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Url({})", self.redacted())
    }
}

/// A URL string as given, valid or not, with the password of its user information replaced by
/// `***`: for messages about a URL that may not parse.
pub fn redact(s: &str) -> String {
    let Some((_, rest_at)) = scheme(s) else {
        return s.to_string();
    };
    let rest = &s[rest_at..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}{}***{}", &s[..rest_at], &rest[..colon + 1], &rest[at..]),
            None => s.to_string(),
        },
        None => s.to_string(),
    }
}

fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

fn decode(s: &str, what: &str) -> Result<String, String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{what} is not UTF-8 once percent-decoded"))
}

/// The scheme's name and where the rest begins, after `://`.
fn scheme(s: &str) -> Option<(&str, usize)> {
    let i = s.find("://")?;
    let name = &s[..i];
    (!name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
    .then_some((name, i + 3))
}

fn parse(s: &str) -> Result<Url, String> {
    let Some((name, rest_at)) = scheme(s) else {
        return Err("not a URL: expected clickhouse://host or clickhouses://host".into());
    };
    let https = if name.eq_ignore_ascii_case("clickhouse") {
        false
    } else if name.eq_ignore_ascii_case("clickhouses") {
        true
    } else {
        return Err(format!(
            "unknown scheme \"{name}\": use clickhouse:// (HTTP) or clickhouses:// (HTTPS)"
        ));
    };
    let rest = &s[rest_at..];
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, p),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        None => (DEFAULT_USER.to_string(), None),
        Some(u) => {
            let (name, pass) = match u.split_once(':') {
                Some((n, p)) => (n, Some(decode(p, "the password")?)),
                None => (u, None),
            };
            let name = decode(name, "the user name")?;
            let name = if name.is_empty() {
                DEFAULT_USER.to_string()
            } else {
                name
            };
            (name, pass)
        }
    };
    let (host, port) = split_host_port(hostport)?;
    let port = match port {
        None => {
            if https {
                HTTPS_PORT
            } else {
                HTTP_PORT
            }
        }
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "invalid port \"{p}\": expected a number from 1 to 65535"
                ))
            }
        },
    };
    let database = decode(path, "the database name")?;
    if database.contains('/') {
        return Err(format!(
            "invalid database name \"{database}\": a database name cannot contain \"/\""
        ));
    }
    let database = if database.is_empty() {
        DEFAULT_DATABASE.to_string()
    } else {
        database
    };

    let mut sslmode = None;
    let mut sslrootcert = None;
    let mut sslcert = None;
    let mut sslkey = None;
    let mut connect_timeout = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!(
                "parameter \"{pair}\" has no value (expected name=value)"
            ));
        };
        let k = decode(k, "a parameter name")?;
        let v = decode(v, &format!("the value of {k}"))?;
        let slot = match k.as_str() {
            "sslmode" => &mut sslmode,
            "sslrootcert" => &mut sslrootcert,
            "sslcert" => &mut sslcert,
            "sslkey" => &mut sslkey,
            "connect_timeout" => &mut connect_timeout,
            _ => return Err(format!("unknown parameter \"{k}\" (known: {PARAMS})")),
        };
        if slot.replace(v).is_some() {
            return Err(format!("parameter \"{k}\" is given twice"));
        }
    }

    let connect_timeout = match connect_timeout {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n > 0 => Some(Duration::from_secs(n)),
            _ => {
                return Err(format!(
                "invalid connect_timeout \"{v}\": expected a whole number of seconds, at least 1"
            ))
            }
        },
    };

    let tls = if https {
        let sslmode = match sslmode.as_deref() {
            None | Some("verify-full") => SslMode::VerifyFull,
            Some("verify-ca") => SslMode::VerifyCa,
            Some("require") => SslMode::Require,
            Some(m @ ("disable" | "allow" | "prefer")) => {
                return Err(format!(
                    "sslmode={m} contradicts clickhouses://, which always uses TLS (use clickhouse:// for plain HTTP)"
                ))
            }
            Some(m) => {
                return Err(format!(
                    "invalid sslmode \"{m}\": expected require, verify-ca or verify-full"
                ))
            }
        };
        let client_cert = match (sslcert, sslkey) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some(_), None) => return Err("sslcert is given without sslkey".into()),
            (None, Some(_)) => return Err("sslkey is given without sslcert".into()),
        };
        Some(Tls {
            sslmode,
            sslrootcert: sslrootcert.map(PathBuf::from),
            client_cert,
        })
    } else {
        match sslmode.as_deref() {
            None | Some("disable") => {}
            Some(m) => {
                return Err(format!(
                    "sslmode={m} needs TLS: use clickhouses:// (clickhouse:// is plain HTTP)"
                ))
            }
        }
        for (name, v) in [
            ("sslrootcert", &sslrootcert),
            ("sslcert", &sslcert),
            ("sslkey", &sslkey),
        ] {
            if v.is_some() {
                return Err(format!(
                    "{name} applies to clickhouses:// only (clickhouse:// is plain HTTP)"
                ));
            }
        }
        None
    };

    Ok(Url {
        host,
        port,
        user,
        password,
        database,
        tls,
        connect_timeout,
    })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Result<(String, Option<&str>), String> {
    let (host, port) = if let Some(inner) = s.strip_prefix('[') {
        let Some((addr, after)) = inner.split_once(']') else {
            return Err(format!("unclosed \"[\" in host \"{s}\""));
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address \"{addr}\""));
        }
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return Err(format!("unexpected \"{p}\" after \"[{addr}]\"")),
            },
        };
        (addr.to_string(), port)
    } else {
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if let Some(p) = port {
            if p.contains(':') {
                return Err(format!(
                    "invalid host \"{s}\": an IPv6 address goes in brackets, as [::1]:8123"
                ));
            }
        }
        if host.is_empty() {
            return Err("no host (expected clickhouse://host[:port]/database)".into());
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(format!("invalid host name \"{host}\""));
        }
        (host.to_string(), port)
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(s: &str) -> String {
        Url::parse(s).unwrap_err().problem
    }

    #[test]
    fn defaults() {
        let u = Url::parse("clickhouse://db.local").unwrap();
        assert_eq!(u.host(), "db.local");
        assert_eq!(u.port(), 8123);
        assert_eq!(u.user(), "default");
        assert!(!u.has_password());
        assert_eq!(u.database(), "default");
        assert!(u.tls().is_none());
        assert_eq!(u.redacted(), "clickhouse://default@db.local:8123/default");
        let u = Url::parse("clickhouse://db.local:9123/").unwrap();
        assert_eq!((u.port(), u.database()), (9123, "default"));
    }

    #[test]
    fn https_defaults_to_verify_full_and_port_8443() {
        let u = Url::parse("clickhouses://ch.example.com/analytics").unwrap();
        assert_eq!(u.port(), 8443);
        assert_eq!(u.database(), "analytics");
        let t = u.tls().unwrap();
        assert_eq!(t.sslmode, SslMode::VerifyFull);
        assert_eq!(t.sslrootcert, None);
        assert_eq!(t.client_cert, None);
        let u = Url::parse(
            "ClickHouses://u@[::1]:9443/d?sslmode=verify-ca&sslrootcert=/etc/ca%20root.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(u.host(), "::1");
        assert_eq!(u.authority(), "[::1]:9443");
        let t = u.tls().unwrap();
        assert_eq!(t.sslmode, SslMode::VerifyCa);
        assert_eq!(t.sslrootcert.as_deref(), Some("/etc/ca root.pem".as_ref()));
        assert_eq!(
            t.client_cert,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        assert_eq!(
            u.redacted(),
            "clickhouses://u@[::1]:9443/d?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca%20root.pem&sslcert=%2Fc.pem&sslkey=%2Fk.pem"
        );
        // The redacted form parses back to the same URL.
        assert_eq!(Url::parse(&u.redacted()).unwrap(), u);
    }

    #[test]
    fn percent_encoded_user_password_and_database() {
        let u = Url::parse("clickhouse://pg%40tide:p%3Ass%2Fw%40rd%25@h:1/my%20db").unwrap();
        assert_eq!(u.user(), "pg@tide");
        assert_eq!(u.password(), Some("p:ss/w@rd%"));
        assert_eq!(u.database(), "my db");
        // A raw '@' in the password: the last '@' ends the user information.
        let u = Url::parse("clickhouse://u:a@b@h").unwrap();
        assert_eq!((u.password(), u.host()), (Some("a@b"), "h"));
    }

    #[test]
    fn no_password_in_any_form() {
        let u = Url::parse("clickhouse://u:Sup3rSecret@h/d?connect_timeout=3").unwrap();
        for shown in [u.redacted(), u.to_string(), format!("{u:?}")] {
            assert!(!shown.contains("Sup3rSecret"), "{shown}");
            assert!(shown.contains("u:***@h:8123"), "{shown}");
        }
        assert_eq!(u.connect_timeout(), Some(Duration::from_secs(3)));
        let u = u.with_password("Other-S3cret".into());
        assert_eq!(u.password(), Some("Other-S3cret"));
        assert!(!format!("{u:?}").contains("Other-S3cret"));
        let e = Url::parse("clickhouse://u:Sup3rSecret@h:port/d").unwrap_err();
        assert!(!e.to_string().contains("Sup3rSecret"), "{e}");
        assert_eq!(
            e.to_string(),
            "invalid clickhouse url clickhouse://u:***@h:port/d: invalid port \"port\": expected a number from 1 to 65535"
        );
    }

    #[test]
    fn is_clickhouse() {
        assert!(Url::is_clickhouse("clickhouse://h"));
        assert!(Url::is_clickhouse("CLICKHOUSES://h:x"));
        assert!(!Url::is_clickhouse("postgres://h/db"));
        assert!(!Url::is_clickhouse("host=h dbname=clickhouse://"));
        assert!(!Url::is_clickhouse("clickhouse"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(problem("postgres://h/db").contains("unknown scheme \"postgres\""));
        assert!(problem("h:8123").contains("not a URL"));
        assert!(problem("clickhouse://h:0").contains("invalid port \"0\""));
        assert!(problem("clickhouse://h:70000").contains("invalid port \"70000\""));
        assert!(problem("clickhouse://h:/d").contains("invalid port \"\""));
        assert!(problem("clickhouse:///d").contains("no host"));
        assert!(problem("clickhouse://::1/d").contains("brackets"));
        assert!(problem("clickhouse://[::1/d").contains("unclosed"));
        assert!(problem("clickhouse://[zz]/d").contains("invalid IPv6 address"));
        assert!(problem("clickhouse://h/a/b").contains("cannot contain \"/\""));
        assert!(problem("clickhouse://h?user=x").contains("unknown parameter \"user\""));
        assert!(problem("clickhouse://h?sslmode").contains("has no value"));
        assert!(problem("clickhouse://h?sslmode=require").contains("use clickhouses://"));
        assert!(problem("clickhouse://h?sslrootcert=/ca").contains("clickhouses:// only"));
        assert!(problem("clickhouses://h?sslmode=disable").contains("contradicts"));
        assert!(problem("clickhouses://h?sslmode=strict").contains("invalid sslmode"));
        assert!(problem("clickhouses://h?sslcert=/c").contains("without sslkey"));
        assert!(problem("clickhouses://h?sslkey=/k").contains("without sslcert"));
        assert!(problem("clickhouse://h?connect_timeout=0").contains("connect_timeout"));
        assert!(problem("clickhouse://h?connect_timeout=1&connect_timeout=2").contains("twice"));
        assert!(problem("clickhouse://u:%ff@h").contains("password is not UTF-8"));
        assert!(problem("clickhouse://h h").contains("invalid host name"));
        // Plain HTTP accepts sslmode=disable, which says what it is.
        assert!(Url::parse("clickhouse://h?sslmode=disable").is_ok());
    }

    #[test]
    fn redact_raw_strings() {
        assert_eq!(
            redact("clickhouse://u:pw@h:x/d"),
            "clickhouse://u:***@h:x/d"
        );
        assert_eq!(redact("clickhouse://u@h/d"), "clickhouse://u@h/d");
        assert_eq!(redact("clickhouse://h/d@x"), "clickhouse://h/d@x");
        assert_eq!(redact("no url"), "no url");
    }
}
