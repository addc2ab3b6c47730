//! libpq connection strings, parsed by pgtide itself: `postgres://` / `postgresql://` URLs and
//! `key=value` strings, into one typed [`ConnInfo`].
//!
//! tokio-postgres has a parser of its own, but it refuses `sslmode=verify-ca`/`verify-full` and
//! the ssl file keys, so pgtide parses the string with libpq's rules and builds the driver's
//! configuration from the result. Each form (`url`, `keywords`) reads into the same `key=value`
//! pairs, which one function turns into a `ConnInfo`.

use std::fmt;
use std::time::Duration;

mod keywords;
mod url;

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
    let pairs = if url::scheme_len(s).is_some() {
        url::pairs(s)?
    } else {
        keywords::pairs(s)?
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect()
    };
    from_pairs(pairs)
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
    match url::scheme_len(s) {
        Some(scheme) => url::redact(s, scheme),
        None => keywords::redact(s),
    }
}

/// Give the string a password, in its own form, unless it already has one (for `password_file`).
pub fn with_password(s: &str, password: &str) -> String {
    if url::scheme_len(s).is_some() {
        url::with_password(s, password)
    } else {
        keywords::with_password(s, password)
    }
}

#[cfg(test)]
mod tests;
