//! PostgreSQL plumbing shared by source and DWH: connecting with pgtide's session settings,
//! identifier quoting, secret-free URLs, and the one place that sorts errors by SQLSTATE.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// Long enough for a large batch on a busy server, short enough that a stuck statement is
/// noticed rather than holding a job forever.
pub const STATEMENT_TIMEOUT_MS: u64 = 15 * 60 * 1000;
/// How long a connection attempt may take before the server counts as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid connection string {0}")]
    Url(String),
    #[error("{what} ({target}): {}", message(.source))]
    Connect {
        what: String,
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
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

/// `connect`, handing back the connection's driver for a caller that polls it itself (the
/// only way tokio-postgres delivers notifications).
pub async fn connect_raw(
    url: &str,
    application: &str,
    what: &str,
) -> Result<
    (
        Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    ),
    PgError,
> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|_| PgError::Url(redact(url)))?;
    config
        .application_name(application)
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .options(format!(
            "-c timezone=UTC -c statement_timeout={STATEMENT_TIMEOUT_MS} -c extra_float_digits=3 -c DateStyle=ISO,YMD -c IntervalStyle=postgres"
        ));
    config
        .connect(NoTls)
        .await
        .map_err(|source| PgError::Connect {
            what: what.to_string(),
            target: describe(url),
            source,
        })
}

/// `"name"` with embedded quotes doubled: safe for any identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `"schema"."table"`.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    // URL form: scheme://user:password@host
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..auth_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                let start = scheme_end + 3 + colon + 1;
                let end = scheme_end + 3 + at;
                out.replace_range(start..end, "***");
            }
        }
    }
    // key=value form and query parameters: password=...
    let lower = out.to_ascii_lowercase();
    if let Some(i) = lower.find("password=") {
        let start = i + "password=".len();
        let end = out[start..]
            .find(|c: char| c == '&' || c.is_whitespace())
            .map_or(out.len(), |e| start + e);
        out.replace_range(start..end, "***");
    }
    out
}

/// `host:port/db` of a URL: what a message needs to say which server is meant, nothing secret.
pub fn describe(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", c.get_dbname().unwrap_or(""))
        }
        Err(_) => redact(url),
    }
}

/// Whether retrying the same work later can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Transient,
    Permanent,
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
