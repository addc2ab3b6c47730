//! ClickHouse errors: what went wrong on the way (connect, TLS, HTTP, the server's own error
//! text), and the one place that decides which of them are worth retrying.

use std::time::Duration;

use crate::pg::Retry;

/// ClickHouse error codes pgtide refers to by name.
pub mod codes {
    pub const NO_SUCH_COLUMN_IN_TABLE: u32 = 16;
    pub const TABLE_ALREADY_EXISTS: u32 = 57;
    pub const UNKNOWN_TABLE: u32 = 60;
    pub const SYNTAX_ERROR: u32 = 62;
    pub const UNKNOWN_DATABASE: u32 = 81;
    pub const DATABASE_ALREADY_EXISTS: u32 = 82;
    pub const TIMEOUT_EXCEEDED: u32 = 159;
    pub const UNKNOWN_USER: u32 = 192;
    pub const WRONG_PASSWORD: u32 = 193;
    pub const QUERY_WAS_CANCELLED: u32 = 394;
    pub const AUTHENTICATION_FAILED: u32 = 516;
}

/// The ClickHouse error codes that mean "the same request can succeed later": the server or a
/// replica is busy, overloaded, short of memory or disk, or briefly cut off from its peers or
/// ZooKeeper; or the network failed between servers. As PostgreSQL's classes 08, 40 and 53.
///
/// Left out on purpose: 159 TIMEOUT_EXCEEDED and 394 QUERY_WAS_CANCELLED (a query that ran into
/// `max_execution_time`, or was killed, meets the same end when retried: PostgreSQL's 57014 is
/// permanent for the same reason), 201 QUOTA_EXPIRED (a quota's interval can be an hour or a day:
/// the job stops and says so), and authentication, syntax, schema and data errors.
const TRANSIENT_CODES: &[(u32, &str)] = &[
    (173, "CANNOT_ALLOCATE_MEMORY"),
    (198, "DNS_ERROR"),
    (202, "TOO_MANY_SIMULTANEOUS_QUERIES"),
    (203, "NO_FREE_CONNECTION"),
    (209, "SOCKET_TIMEOUT"),
    (210, "NETWORK_ERROR"),
    (225, "NO_ZOOKEEPER"),
    (241, "MEMORY_LIMIT_EXCEEDED"),
    (242, "TABLE_IS_READ_ONLY"),
    (243, "NOT_ENOUGH_SPACE"),
    (244, "UNEXPECTED_ZOOKEEPER_ERROR"),
    (252, "TOO_MANY_PARTS"),
    (254, "NO_ACTIVE_REPLICAS"),
    (265, "NO_AVAILABLE_REPLICA"),
    (279, "ALL_CONNECTION_TRIES_FAILED"),
    (285, "TOO_FEW_LIVE_REPLICAS"),
    (286, "UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE"),
    (319, "UNKNOWN_STATUS_OF_INSERT"),
    (364, "RECEIVED_ERROR_TOO_MANY_REQUESTS"),
    (373, "SESSION_IS_LOCKED"),
    (384, "PART_IS_TEMPORARILY_LOCKED"),
    (415, "ALL_REPLICAS_LOST"),
    (416, "REPLICA_STATUS_CHANGED"),
    (425, "SYSTEM_ERROR"),
    (439, "CANNOT_SCHEDULE_TASK"),
    (473, "DEADLOCK_AVOIDED"),
    (519, "NO_REMOTE_SHARD_AVAILABLE"),
    (529, "NOT_A_LEADER"),
    (999, "KEEPER_EXCEPTION"),
];

/// An error talking to ClickHouse. Messages name the server by `host:port`, never by its URL,
/// so they never hold the password.
#[derive(Debug, thiserror::Error)]
pub enum ChError {
    /// The server could not be reached: refused, reset, unreachable, or its name not resolved.
    #[error("{what}: {source}")]
    Connect {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be set up: a certificate file, the server's certificate, the handshake.
    #[error("{what}: {message}")]
    Tls { what: String, message: String },
    /// An HTTP error status whose body is not a ClickHouse error: a proxy or load balancer
    /// answered, or something else listens on the port.
    #[error("{what}: http status {status}{}", excerpt(.body))]
    Http {
        what: String,
        status: u16,
        /// The start of the body, if any.
        body: String,
    },
    /// An error ClickHouse reported, with its code and message.
    #[error("clickhouse error {code}: {message}")]
    Server { code: u32, message: String },
    /// No answer within the time allowed.
    #[error("{what}: no answer within {} s", .after.as_secs())]
    Timeout { what: String, after: Duration },
    /// The connection broke during a request.
    #[error("{what}: {}", chain(.source))]
    Broken {
        what: String,
        #[source]
        source: hyper::Error,
    },
    /// An answer pgtide cannot use: too large, not UTF-8, a version it cannot read.
    #[error("{what}: {message}")]
    Response { what: String, message: String },
}

impl ChError {
    /// Whether trying again later can succeed: connection trouble, timeouts, a gateway that
    /// could not reach the server, and the server codes in [`TRANSIENT_CODES`].
    pub fn retry(&self) -> Retry {
        match self {
            ChError::Connect { .. } | ChError::Timeout { .. } | ChError::Broken { .. } => {
                Retry::Transient
            }
            ChError::Tls { .. } | ChError::Response { .. } => Retry::Permanent,
            // 429: a proxy's rate limit; 502-504: a proxy or load balancer without a server.
            ChError::Http { status, .. } => match status {
                429 | 502 | 503 | 504 => Retry::Transient,
                _ => Retry::Permanent,
            },
            ChError::Server { code, .. } => classify_code(*code),
        }
    }

    /// ClickHouse's error code, when the server answered with one.
    pub fn code(&self) -> Option<u32> {
        match self {
            ChError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The retry policy of a ClickHouse error code.
pub fn classify_code(code: u32) -> Retry {
    if TRANSIENT_CODES.iter().any(|(c, _)| *c == code) {
        Retry::Transient
    } else {
        Retry::Permanent
    }
}

/// An insert that failed: its body (the caller's stream) or ClickHouse.
#[derive(Debug, thiserror::Error)]
pub enum InsertError<E> {
    /// The body stream failed; the request was aborted, so ClickHouse saw a broken body and
    /// inserted nothing of its last, unfinished block.
    #[error(transparent)]
    Body(E),
    #[error(transparent)]
    ClickHouse(#[from] ChError),
}

fn excerpt(body: &str) -> String {
    let line = body.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if line.is_empty() {
        return String::new();
    }
    let mut cut: String = line.trim().chars().take(200).collect();
    if cut.len() < line.trim().len() {
        cut.push_str("...");
    }
    format!(": {cut}")
}

/// An error and its causes, joined by ": ": hyper's own message says only which step failed.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.ends_with(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// The code and message of a ClickHouse error text, in the forms servers have used:
///
/// - `Code: 60, e.displayText() = DB::Exception: Table t doesn't exist, e.what() = DB::Exception`
///   (18.x to 20.x);
/// - `Code: 60, e.displayText() = DB::Exception: Table t doesn't exist (version 21.3.1.1)`;
/// - `Code: 60. DB::Exception: Table t doesn't exist. (UNKNOWN_TABLE) (version 23.8.1.1)`.
///
/// `None` when `text` does not start with such a header.
pub fn parse_server_error(text: &str) -> Option<(u32, String)> {
    let rest = text.trim_start().strip_prefix("Code: ")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let code: u32 = rest[..digits].parse().ok()?;
    let rest = rest[digits..].strip_prefix([',', '.'])?.trim_start();
    let rest = rest.strip_prefix("e.displayText() = ").unwrap_or(rest);
    // `DB::Exception: `, `DB::NetException: `, `Poco::Exception. ` and the like.
    let rest = match rest.split_once(": ") {
        Some((kind, msg)) if kind.contains("::") && !kind.contains(' ') => msg,
        _ => rest,
    };
    let mut message = rest.trim_end();
    if let Some(i) = message.rfind(", e.what() = ") {
        if !message[i..].contains('\n') {
            message = message[..i].trim_end();
        }
    }
    if let Some(i) = message.rfind(" (version ") {
        if message.ends_with(')') && !message[i..].contains('\n') {
            message = message[..i].trim_end();
        }
    }
    Some((code, message.to_string()))
}

/// An error ClickHouse wrote at the end of a response whose status said success (it had
/// started streaming the result when the error came): where it starts in `tail`, with its
/// code and message. The error must run to the end of the body and start with a full header,
/// `Code: N, e.displayText() = DB::` or `Code: N. DB::`.
pub fn trailing_error(tail: &[u8]) -> Option<(usize, u32, String)> {
    let mut from = 0;
    while let Some(i) = find(&tail[from..], b"Code: ") {
        let at = from + i;
        let text = String::from_utf8_lossy(&tail[at..]);
        if has_error_header(&text) {
            if let Some((code, message)) = parse_server_error(&text) {
                return Some((at, code, message));
            }
        }
        from = at + 1;
    }
    None
}

fn has_error_header(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("Code: ") else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return false;
    }
    let rest = &rest[digits..];
    rest.starts_with(", e.displayText() = ") || rest.starts_with(". DB::")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_and_new_error_texts() {
        assert_eq!(
            parse_server_error("Code: 81, e.displayText() = DB::Exception: Database nosuchdb doesn't exist, e.what() = DB::Exception\n"),
            Some((81, "Database nosuchdb doesn't exist".into()))
        );
        assert_eq!(
            parse_server_error("Code: 60, e.displayText() = DB::Exception: Table default.wtf doesn't exist (version 21.3.1.1)\n"),
            Some((60, "Table default.wtf doesn't exist".into()))
        );
        assert_eq!(
            parse_server_error("Code: 60. DB::Exception: Table default.t does not exist. (UNKNOWN_TABLE) (version 23.8.2.7 (official build))\n"),
            Some((60, "Table default.t does not exist. (UNKNOWN_TABLE)".into()))
        );
        assert_eq!(
            parse_server_error(
                "Code: 210. DB::NetException: Connection refused (localhost:9000). (NETWORK_ERROR)"
            ),
            Some((
                210,
                "Connection refused (localhost:9000). (NETWORK_ERROR)".into()
            ))
        );
        // A message of several lines keeps them; the trailer after the last is cut.
        let (code, m) = parse_server_error(
            "Code: 27, e.displayText() = DB::Exception: Cannot parse input: expected \\t before: \\n: (at row 2)\n\nRow 1:\nColumn 0\n\n, e.what() = DB::Exception\n",
        )
        .unwrap();
        assert_eq!(code, 27);
        assert!(m.starts_with("Cannot parse input"), "{m}");
        assert!(m.ends_with("\nColumn 0"), "{m}");
        assert_eq!(parse_server_error("<html>Bad Gateway</html>"), None);
        assert_eq!(parse_server_error("Code: x"), None);
    }

    #[test]
    fn trailing_errors_after_data() {
        let body = b"0\n0\n1\nCode: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero, e.what() = DB::Exception\n";
        let (at, code, message) = trailing_error(body).unwrap();
        assert_eq!(&body[..at], b"0\n0\n1\n");
        assert_eq!(code, 395);
        assert_eq!(message, "Value passed to 'throwIf' function is non zero");
        let body = b"a\tCode: 1\nCode: 241. DB::Exception: Memory limit exceeded. (MEMORY_LIMIT_EXCEEDED) (version 24.3.1)\n";
        assert_eq!(trailing_error(body).unwrap().1, 241);
        assert_eq!(trailing_error(b"1\n2\nCode: 3\n"), None);
        assert_eq!(trailing_error(b""), None);
    }

    #[test]
    fn retry_policy() {
        let server = |code| ChError::Server {
            code,
            message: String::new(),
        };
        for code in [202, 203, 209, 210, 241, 242, 252, 425, 999] {
            assert_eq!(server(code).retry(), Retry::Transient, "{code}");
        }
        for code in [16, 27, 60, 62, 81, 159, 193, 201, 394, 516, 1000] {
            assert_eq!(server(code).retry(), Retry::Permanent, "{code}");
        }
        let http = |status| ChError::Http {
            what: "clickhouse h:1".into(),
            status,
            body: String::new(),
        };
        assert_eq!(http(502).retry(), Retry::Transient);
        assert_eq!(http(503).retry(), Retry::Transient);
        assert_eq!(http(504).retry(), Retry::Transient);
        assert_eq!(http(404).retry(), Retry::Permanent);
        assert_eq!(http(500).retry(), Retry::Permanent);
        assert_eq!(http(502).to_string(), "clickhouse h:1: http status 502");
        let e = ChError::Http {
            what: "clickhouse h:1".into(),
            status: 502,
            body: "\n<html><body>Bad Gateway</body></html>\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "clickhouse h:1: http status 502: <html><body>Bad Gateway</body></html>"
        );
        let refused = ChError::Connect {
            what: "clickhouse h:1".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(refused.retry(), Retry::Transient);
        let tls = ChError::Tls {
            what: "clickhouse h:1".into(),
            message: "bad certificate".into(),
        };
        assert_eq!(tls.retry(), Retry::Permanent);
    }
}
