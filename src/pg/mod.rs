//! PostgreSQL plumbing shared by source and DWH: the one connection layer (libpq's connection
//! strings, TLS, the password file, several hosts), identifier quoting, secret-free
//! descriptions, and the one place that sorts errors by SQLSTATE.
//!
//! - `conninfo`: both forms of connection string, parsed into a typed `ConnInfo`;
//! - `tls`: `sslmode` on rustls, and TLS failures said plainly;
//! - `passfile`: `~/.pgpass` / `PGPASSFILE`, read as libpq reads it.

pub mod conninfo;
pub mod passfile;
pub mod tls;

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};

use conninfo::{ConnInfo, Endpoint, SessionAttrs, SslMode};

/// Long enough for a large batch on a busy server, short enough that a stuck statement is
/// noticed rather than holding a job forever.
pub const STATEMENT_TIMEOUT_MS: u64 = 15 * 60 * 1000;
/// How long a connection attempt may take before the server counts as down, unless the
/// connection string says otherwise with `connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's driver, with or without TLS.
pub type Connection =
    tokio_postgres::Connection<Socket, <tls::MakeTls as MakeTlsConnect<Socket>>::Stream>;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{what}: invalid connection string {url}: {message}")]
    Url {
        what: String,
        /// Redacted.
        url: String,
        message: String,
    },
    #[error("{what} ({target}): {}", message(.source))]
    Connect {
        what: String,
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A connection that could not be opened, said the way a user can act on it: which server,
    /// and whether TLS, the certificate, the host name or the password was the problem.
    #[error("{what} ({target}): {problem}")]
    Open {
        what: String,
        target: String,
        problem: String,
        retry: Retry,
    },
}

impl PgError {
    /// Whether trying again later can succeed.
    pub fn retry(&self) -> Retry {
        match self {
            PgError::Url { .. } => Retry::Permanent,
            PgError::Connect { source, .. } => classify(source),
            PgError::Open { retry, .. } => *retry,
        }
    }
}

/// Open a connection whose session identifies the job and runs in UTC with a statement timeout.
/// The connection's driver runs on its own task; it ends when the client is dropped.
pub async fn connect(url: &str, application: &str, what: &str) -> Result<Client, PgError> {
    let (client, connection) = connect_raw(url, application, what).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection closed");
        }
    });
    Ok(client)
}

/// pgtide's session settings, after the user's own `options` so that they win where both set
/// the same parameter.
fn session_options(user: Option<&str>) -> String {
    let ours = format!(
        "-c timezone=UTC -c statement_timeout={STATEMENT_TIMEOUT_MS} -c extra_float_digits=3 -c DateStyle=ISO,YMD -c IntervalStyle=postgres"
    );
    match user {
        Some(u) if !u.trim().is_empty() => format!("{} {ours}", u.trim()),
        _ => ours,
    }
}

/// `connect`, handing back the connection's driver for a caller that polls it itself (the
/// only way tokio-postgres delivers notifications).
///
/// The hosts are tried in order; with `target_session_attrs` other than `any`, a server that
/// is not of the wanted kind is passed over (for `prefer-standby`: a primary is taken only when
/// no standby answers).
pub async fn connect_raw(
    url: &str,
    application: &str,
    what: &str,
) -> Result<(Client, Connection), PgError> {
    let info = conninfo::parse(url).map_err(|e| PgError::Url {
        what: what.to_string(),
        url: redact(url),
        message: e.0,
    })?;
    let target = info.describe();
    let open_err = |problem: String, retry: Retry| PgError::Open {
        what: what.to_string(),
        target: target.clone(),
        problem,
        retry,
    };
    // TLS files are read once, and only matter for TCP hosts: a Unix socket is never
    // encrypted, so a missing root certificate does not stop a socket connection (as libpq).
    let tcp_tls = tls::client_config(&info);
    let socket_tls = || {
        let plain = ConnInfo {
            sslmode: SslMode::Disable,
            ..info.clone()
        };
        tls::client_config(&plain).map_err(|e| e.to_string())
    };
    let passes: &[SessionAttrs] = match info.target_session_attrs {
        SessionAttrs::PreferStandby => &[SessionAttrs::Standby, SessionAttrs::Any],
        ref a => std::slice::from_ref(a),
    };
    let mut failures: Vec<(String, String, Retry)> = Vec::new();
    for (pass, attrs) in passes.iter().enumerate() {
        for ep in &info.endpoints {
            let setup = if ep.is_socket() {
                socket_tls()
            } else {
                tcp_tls
                    .as_ref()
                    .map(|(tls, files)| (tls.clone(), files.clone()))
                    .map_err(ToString::to_string)
            };
            let outcome = match setup {
                Ok((tls, files)) => connect_one(&info, ep, *attrs, application, tls, &files).await,
                Err(m) => Err((m, Retry::Permanent)),
            };
            match outcome {
                Ok(pair) => return Ok(pair),
                // The second pass of prefer-standby repeats the hosts of the first, whose
                // failures are recorded already.
                Err((m, r)) if pass == 0 => failures.push((ep.to_string(), m, r)),
                Err(_) => {}
            }
        }
    }
    let retry = if failures.iter().any(|f| f.2 == Retry::Transient) {
        Retry::Transient
    } else {
        Retry::Permanent
    };
    let problem = if info.endpoints.len() == 1 && failures.len() == 1 {
        // One server: its address is in `target` already.
        failures[0].1.clone()
    } else {
        failures
            .iter()
            .map(|(ep, m, _)| format!("{ep}: {m}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Err(open_err(problem, retry))
}

/// One server of the list: connect, then check it is of the wanted kind.
async fn connect_one(
    info: &ConnInfo,
    ep: &Endpoint,
    attrs: SessionAttrs,
    application: &str,
    tls: tls::MakeTls,
    files: &tls::TlsFiles,
) -> Result<(Client, Connection), (String, Retry)> {
    let user = info.user_or_default();
    let dbname = info.dbname.clone().unwrap_or_else(|| user.clone());
    let mut config = tokio_postgres::Config::new();
    config
        .host(&ep.host)
        .port(ep.port)
        .user(&user)
        .dbname(&dbname)
        .application_name(application)
        .connect_timeout(info.connect_timeout.unwrap_or(CONNECT_TIMEOUT))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .options(session_options(info.options.as_deref()))
        .ssl_mode(match info.sslmode {
            // As libpq: a Unix socket is never encrypted, whatever sslmode says.
            _ if ep.is_socket() => tokio_postgres::config::SslMode::Disable,
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        })
        .channel_binding(match info.channel_binding {
            conninfo::ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
            conninfo::ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
            conninfo::ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
        });
    if let Some(addr) = ep.hostaddr {
        config.hostaddr(addr);
    }
    let mut from_file = None;
    match &info.password {
        Some(p) => {
            config.password(p);
        }
        None => {
            if let Some(path) = passfile::location(info.passfile.as_deref()) {
                if let Some(p) = passfile::lookup(&path, &ep.host, ep.port, &dbname, &user) {
                    config.password(p);
                    from_file = Some(path);
                }
            }
        }
    }
    let mut attempt = config.connect(tls.clone()).await;
    if let Err(e) = &attempt {
        // As libpq: under `prefer`, a TLS handshake that fails is tried again without TLS.
        if info.sslmode == SslMode::Prefer && tls::explain(e, &ep.host, files).is_some() {
            tracing::debug!(server = %ep, "tls handshake failed under sslmode=prefer: trying without tls");
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            attempt = config.connect(tls).await;
        }
    }
    let (client, mut connection) = attempt.map_err(|e| {
        let retry = classify(&e);
        if let Some(m) = tls::explain(&e, &ep.host, files) {
            return (m, Retry::Permanent);
        }
        let mut m = message(&e);
        if e.code() == Some(&SqlState::INVALID_PASSWORD) {
            if let Some(f) = &from_file {
                m.push_str(&format!(" (the password came from {})", f.display()));
            }
        } else if e.code().is_none() && m.contains("password missing") {
            m = format!(
                "the server asks for a password and none was given (not in the url, no password_file, no matching line in {})",
                passfile::location(info.passfile.as_deref())
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "~/.pgpass".into())
            );
        }
        (m, retry)
    })?;
    if attrs == SessionAttrs::Any {
        return Ok((client, connection));
    }
    let row = {
        let check = client.query_one(
            "select pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'",
            &[],
        );
        tokio::pin!(check);
        // The driver must run for the query to be answered; notices are dropped.
        loop {
            tokio::select! {
                r = &mut check => break r,
                m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err((message(&e), classify(&e))),
                    None => return Err(("connection closed".into(), Retry::Transient)),
                },
            }
        }
    }
    .map_err(|e| (message(&e), classify(&e)))?;
    let (recovery, read_only): (bool, bool) = (row.get(0), row.get(1));
    let (ok, why) = match attrs {
        SessionAttrs::ReadWrite => (!read_only, "is read-only"),
        SessionAttrs::ReadOnly => (read_only, "is not read-only"),
        SessionAttrs::Primary => (!recovery, "is a standby"),
        SessionAttrs::Standby => (recovery, "is not a standby"),
        SessionAttrs::Any | SessionAttrs::PreferStandby => (true, ""),
    };
    if ok {
        Ok((client, connection))
    } else {
        Err((
            format!(
                "server {why} (target_session_attrs={})",
                info.target_session_attrs.as_str()
            ),
            Retry::Transient,
        ))
    }
}

/// `"name"` with embedded quotes doubled: safe for any identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `"schema"."table"`.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// The connection string with any password replaced by `***`, for messages and logs; both forms.
pub fn redact(url: &str) -> String {
    conninfo::redact(url)
}

/// `host:port/db` of a connection string (every host when there are several): what a message
/// needs to say which server is meant, nothing secret.
pub fn describe(url: &str) -> String {
    match conninfo::parse(url) {
        Ok(c) => c.describe(),
        Err(_) => redact(url),
    }
}

/// Whether retrying the same work later can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Transient,
    Permanent,
}

/// What kind of refusal a database error is, beyond retrying: the one place besides
/// [`classify`] that reads SQLSTATE classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Class 22: a value the statement cannot take (a bad cast, a JSON path through a scalar).
    Data,
    /// Class 23: an integrity constraint (a key that exists, a NULL or repeated key).
    Constraint,
    /// Any other error the server answered with.
    Other,
}

/// The kind of refusal behind `e`; `None` when the server did not answer (no SQLSTATE: the
/// connection broke or could not be made).
pub fn refusal(e: &tokio_postgres::Error) -> Option<Refusal> {
    let code = e.code()?.code();
    Some(if code.starts_with("22") {
        Refusal::Data
    } else if code.starts_with("23") {
        Refusal::Constraint
    } else {
        Refusal::Other
    })
}

/// The one place that decides retry policy from a database error: connection trouble,
/// shutdowns, serialization failures, deadlocks and resource exhaustion pass; syntax,
/// privileges, missing objects, bad data and statement timeouts do not.
pub fn classify(e: &tokio_postgres::Error) -> Retry {
    match e.code() {
        None => {
            // No SQLSTATE: the connection broke or could not be made.
            if e.is_closed()
                || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
            {
                Retry::Transient
            } else {
                Retry::Permanent
            }
        }
        Some(code) => classify_state(code),
    }
}

/// The retry policy of a SQLSTATE: classes 08 (connection), 40 (serialization failure,
/// deadlock), 53 (insufficient resources) and 57 (operator intervention: shutdowns, a server
/// not yet accepting connections) are transient, except 57014.
pub fn classify_state(code: &SqlState) -> Retry {
    // 57014 is a statement that ran into `statement_timeout` or was cancelled on purpose
    // (`pg_cancel_backend`). The same statement would meet the same end when retried at once,
    // forever, hiding the cause: the run fails with it, and the next tick tries again.
    if code == &SqlState::QUERY_CANCELED {
        return Retry::Permanent;
    }
    let c = code.code();
    if ["08", "40", "53", "57"]
        .iter()
        .any(|class| c.starts_with(class))
    {
        Retry::Transient
    } else {
        Retry::Permanent
    }
}

/// A database error as one readable line: the server's message, detail and hint when present.
pub fn message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = db.message().to_string();
            if let Some(d) = db.detail() {
                m.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                m.push_str(&format!("; hint: {h}"));
            }
            m
        }
        None => {
            let mut m = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            m
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(
            quote_qualified("Sales Data", "Заказы"),
            r#""Sales Data"."Заказы""#
        );
    }

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/shop"),
            "postgres://app:***@db:5432/shop"
        );
        assert_eq!(
            redact("postgres://app@db/shop?password=s3cret&x=1"),
            "postgres://app@db/shop?password=***&x=1"
        );
        assert_eq!(
            redact("host=db password=s3cret user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(redact("postgres://app@db/shop"), "postgres://app@db/shop");
    }

    #[test]
    fn statement_timeouts_are_permanent_and_shutdowns_transient() {
        for (code, want) in [
            (SqlState::QUERY_CANCELED, Retry::Permanent),
            (SqlState::ADMIN_SHUTDOWN, Retry::Transient),
            (SqlState::CRASH_SHUTDOWN, Retry::Transient),
            (SqlState::CANNOT_CONNECT_NOW, Retry::Transient),
            (SqlState::CONNECTION_FAILURE, Retry::Transient),
            (SqlState::T_R_SERIALIZATION_FAILURE, Retry::Transient),
            (SqlState::T_R_DEADLOCK_DETECTED, Retry::Transient),
            (SqlState::TOO_MANY_CONNECTIONS, Retry::Transient),
            (SqlState::UNDEFINED_TABLE, Retry::Permanent),
            (SqlState::UNIQUE_VIOLATION, Retry::Permanent),
            (SqlState::INVALID_PASSWORD, Retry::Permanent),
            (SqlState::INVALID_TEXT_REPRESENTATION, Retry::Permanent),
        ] {
            assert_eq!(classify_state(&code), want, "{}", code.code());
        }
    }

    #[test]
    fn describe_names_host_port_db_only() {
        assert_eq!(
            describe("postgres://app:s3cret@db:6543/shop"),
            "db:6543/shop"
        );
    }
}
