//! ClickHouse as a DWH, over its HTTP interface: one keep-alive HTTP/1.1 connection per
//! [`Client`] (hyper over our own TCP socket, TLS by rustls as for PostgreSQL), statements in
//! the request body, insert data streamed in chunks and never held whole, results read whole
//! or streamed.
//!
//! - `url`: `clickhouse://` and `clickhouses://` URLs;
//! - `error`: what can go wrong, the server's error texts, and which errors are transient;
//! - `transport`: the connection itself and the request body.
//!
//! Every request is a POST to `/` with `database` in the query string, Basic authentication
//! (which every server version takes), and `Accept-Encoding: identity` so that answers come
//! uncompressed. Statements travel in the body; an insert's statement travels in the `query`
//! parameter and its data in the body. Values never go into SQL text: data is only ever the
//! body of an insert.

pub mod error;
mod insert;
mod transport;
pub mod url;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use percent_encoding::utf8_percent_encode;

pub use error::{classify_code, codes, ChError, InsertError};
pub use url::{redact, SslMode, Url, UrlError};

use transport::{Conn, RequestBody, Security};

/// How long ClickHouse may take to answer, or to send the next piece of a streamed answer, or
/// to take the next piece of an insert's body: the bound PostgreSQL's `statement_timeout` sets
/// for the other DWH, long enough for a large batch on a busy server.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(crate::pg::STATEMENT_TIMEOUT_MS);

/// The most `query` and `execute` read of an answer: they are for small results;
/// `query_stream` is for large ones.
pub const QUERY_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The most of an error answer that is read: ClickHouse's error texts are far shorter.
const ERROR_MAX_BYTES: usize = 1024 * 1024;

/// How much of a streamed result is held back until the next piece arrives: an error that
/// ClickHouse writes after a success status is shorter than this, and is found in it whole.
const STREAM_HOLD: usize = 64 * 1024;

/// How many pieces of an insert's body may wait for the connection: enough to keep the socket
/// busy while the caller produces the next, few enough that memory stays bounded.
const INSERT_PIPE: usize = 4;

/// How long an idle connection is kept when the server did not say (ClickHouse has said 3 s
/// or 10 s by default).
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(3);

/// How long before the server's keep-alive timeout an idle connection is given up: a request
/// sent just as the server closes the connection would be lost with it.
const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(1);

/// A ClickHouse client: one HTTP/1.1 connection, kept alive between requests and reopened
/// when the server has closed it. Requests take `&mut self`, so there is one at a time.
pub struct Client {
    url: Url,
    /// `clickhouse host:port`: how messages name the server.
    what: String,
    security: Option<Security>,
    authorization: HeaderValue,
    host: HeaderValue,
    conn: Option<Conn>,
    version: String,
    version_number: (u32, u32),
    connect_timeout: Duration,
    request_timeout: Duration,
    opened: u64,
    /// ClickHouse settings sent with every request, as URL parameters.
    settings: Vec<(String, String)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connect to `url`'s server and ask its version (which also checks the user, the password
    /// and the database).
    pub async fn connect(url: &Url) -> Result<Client, ChError> {
        let what = format!("clickhouse {}", url.authority());
        let security = Security::of(url, &what)?;
        let credentials = format!("{}:{}", url.user(), url.password().unwrap_or(""));
        let mut authorization = HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        ))
        .map_err(|_| ChError::Response {
            what: what.clone(),
            message: "the user name or password cannot be sent in an HTTP header".into(),
        })?;
        authorization.set_sensitive(true);
        let host = HeaderValue::from_str(&url.authority()).map_err(|_| ChError::Response {
            what: what.clone(),
            message: format!("invalid host \"{}\"", url.host()),
        })?;
        let mut client = Client {
            url: url.clone(),
            what,
            security,
            authorization,
            host,
            conn: None,
            version: String::new(),
            version_number: (0, 0),
            connect_timeout: url.connect_timeout().unwrap_or(crate::pg::CONNECT_TIMEOUT),
            request_timeout: REQUEST_TIMEOUT,
            opened: 0,
            settings: Vec::new(),
        };
        // The first answer is part of connecting: a server that takes the connection but does
        // not answer counts as down after the connect timeout, not the request timeout.
        client.request_timeout = client.connect_timeout;
        let version = client.query("select version()").await;
        client.request_timeout = REQUEST_TIMEOUT;
        let version = version?;
        client.version_number = parse_version(&version).ok_or_else(|| ChError::Response {
            what: client.what.clone(),
            message: format!(
                "unexpected answer to select version(): {:?}",
                version.trim()
            ),
        })?;
        client.version = version.trim().to_string();
        tracing::debug!(server = %client.url.authority(), version = %client.version, "connected to clickhouse");
        Ok(client)
    }

    /// The server's version: major and minor, e.g. `(18, 16)`.
    pub fn version(&self) -> (u32, u32) {
        self.version_number
    }

    /// The server's version as it says it, e.g. `18.16.1`.
    pub fn version_string(&self) -> &str {
        &self.version
    }

    /// The URL this client was made from.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// How many connections this client has opened so far: one while the server keeps it
    /// alive.
    pub fn connections_opened(&self) -> u64 {
        self.opened
    }

    /// Send the ClickHouse setting `name` = `value` with every request that follows (as a URL
    /// parameter, as ClickHouse's HTTP interface takes settings), replacing an earlier value.
    /// The server checks it, on the next request. A name that is not a setting's (letters,
    /// digits and `_`, or a parameter of the HTTP interface itself) is refused here.
    pub fn set_setting(&mut self, name: &str, value: &str) -> Result<(), ChError> {
        let reserved = ["database", "query", "user", "password", "wait_end_of_query"];
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || reserved.contains(&name)
        {
            return Err(ChError::Response {
                what: self.what.clone(),
                message: format!("\"{name}\" is not a setting pgtide can send"),
            });
        }
        self.settings.retain(|(n, _)| n != name);
        self.settings.push((name.to_string(), value.to_string()));
        Ok(())
    }

    /// Replace [`REQUEST_TIMEOUT`] for the requests that follow.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// Run a statement whose answer does not matter: DDL, `insert ... select`, `optimize`.
    pub async fn execute(&mut self, sql: &str) -> Result<(), ChError> {
        self.whole(sql).await.map(|_| ())
    }

    /// Run a query and return its whole answer (`TabSeparated` text unless the query says
    /// `format`). For small results; at most [`QUERY_MAX_BYTES`].
    pub async fn query(&mut self, sql: &str) -> Result<String, ChError> {
        let body = self.whole(sql).await?;
        String::from_utf8(body.to_vec()).map_err(|_| ChError::Response {
            what: self.what.clone(),
            message: "the answer is not UTF-8 text".into(),
        })
    }

    /// Run a query and stream its answer as it comes, in memory bounded by a few pieces
    /// whatever its size. An error ClickHouse reports part-way (after a success status, at the
    /// end of the body) ends the stream as an error; the pieces before it were partial.
    pub async fn query_stream(
        &mut self,
        sql: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, ChError>> + Send + Unpin + '_, ChError> {
        let request = self.request(
            Kind::Streamed,
            RequestBody::Whole(Some(Bytes::from(sql.to_string()))),
        )?;
        let response = match tokio::time::timeout(self.request_timeout, self.send(request)).await {
            Ok(r) => r?,
            Err(_) => return Err(self.timed_out("query")),
        };
        let response = self.check(response).await?;
        let keep = keep_alive(response.headers());
        let state = Streamed {
            body: response.into_body(),
            held: BytesMut::new(),
            keep,
            done: false,
            client: self,
        };
        // Boxed once per query, so that callers can poll it without pinning it themselves.
        Ok(Box::pin(futures_util::stream::unfold(
            state,
            |mut s| async move {
                if s.done {
                    return None;
                }
                match s.next().await {
                    Ok(Some(b)) => Some((Ok(b), s)),
                    Ok(None) => None,
                    Err(e) => {
                        s.done = true;
                        Some((Err(e), s))
                    }
                }
            },
        )))
    }

    /// Send a statement and read its whole answer.
    async fn whole(&mut self, sql: &str) -> Result<Bytes, ChError> {
        let request = self.request(
            Kind::Whole,
            RequestBody::Whole(Some(Bytes::from(sql.to_string()))),
        )?;
        let timeout = self.request_timeout;
        let attempt = async {
            let response = self.send(request).await?;
            let response = self.check(response).await?;
            let keep = keep_alive(response.headers());
            let body = self.read_all(response.into_body(), QUERY_MAX_BYTES).await?;
            self.finished(keep);
            Ok(body)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out("query")),
        }
    }

    /// A POST to `/` with the database and what `kind` asks.
    fn request(&self, kind: Kind<'_>, body: RequestBody) -> Result<Request<RequestBody>, ChError> {
        let mut uri = format!(
            "/?database={}",
            utf8_percent_encode(self.url.database(), url::COMPONENT)
        );
        for (name, value) in &self.settings {
            uri.push('&');
            uri.push_str(name);
            uri.push('=');
            uri.extend(utf8_percent_encode(value, url::COMPONENT));
        }
        match kind {
            Kind::Insert(sql) => {
                uri.push_str("&query=");
                uri.extend(utf8_percent_encode(sql, url::COMPONENT));
            }
            // The whole answer is made before it is sent, so that an error part-way comes with
            // an error status, not after a success status and some data.
            Kind::Whole => uri.push_str("&wait_end_of_query=1"),
            Kind::Streamed => {}
        }
        Request::post(uri)
            .header(hyper::header::HOST, self.host.clone())
            .header(hyper::header::AUTHORIZATION, self.authorization.clone())
            .header(hyper::header::ACCEPT_ENCODING, "identity")
            .header(
                hyper::header::USER_AGENT,
                concat!("pgtide/", env!("CARGO_PKG_VERSION")),
            )
            .body(body)
            .map_err(|e| ChError::Response {
                what: self.what.clone(),
                message: format!("cannot make the request: {e}"),
            })
    }

    /// A connection ready for a request: the kept one while the server keeps it, else a new
    /// one.
    async fn ready(&mut self) -> Result<(), ChError> {
        let mut usable = false;
        if let Some(c) = &mut self.conn {
            if c.idle && Instant::now() < c.reuse_until {
                // Resolves at once for a live idle connection, with an error for one the
                // server closed (once hyper's driver has seen the close).
                usable = matches!(
                    tokio::time::timeout(self.connect_timeout, c.sender.ready()).await,
                    Ok(Ok(()))
                );
            }
            if !usable {
                tracing::debug!(server = %self.url.authority(), "clickhouse connection not reusable: reconnecting");
            }
        }
        if !usable {
            self.conn = None;
            let conn = transport::open(
                &self.url,
                self.security.as_ref(),
                &self.what,
                self.connect_timeout,
            )
            .await?;
            self.opened += 1;
            self.conn = Some(conn);
        }
        if let Some(c) = &mut self.conn {
            c.idle = false;
        }
        Ok(())
    }

    /// Send a request. When the kept connection turns out closed before the request went out
    /// (hyper hands the request back), it is sent again on a new connection: nothing reached
    /// the server, so nothing can happen twice.
    async fn send(
        &mut self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ChError> {
        let mut resent = false;
        loop {
            let before = self.opened;
            self.ready().await?;
            let reused = self.opened == before;
            let conn = self.conn.as_mut().expect("ready leaves a connection");
            match conn.sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut e) => {
                    self.conn = None;
                    match e.take_message() {
                        Some(r) if reused && !resent => {
                            tracing::debug!(server = %self.url.authority(), "clickhouse closed the kept connection: sending again on a new one");
                            request = r;
                            resent = true;
                        }
                        _ => return Err(self.broken(e.into_error())),
                    }
                }
            }
        }
    }

    /// The response when it is a success; otherwise the error its body says (ClickHouse's own
    /// text, else the HTTP status).
    async fn check(&mut self, response: Response<Incoming>) -> Result<Response<Incoming>, ChError> {
        let status = response.status();
        let exception = response
            .headers()
            .get("x-clickhouse-exception-code")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|c| *c != 0);
        if status == StatusCode::OK && exception.is_none() {
            return Ok(response);
        }
        let keep = keep_alive(response.headers());
        let body = self.read_all(response.into_body(), ERROR_MAX_BYTES).await;
        let body = match body {
            Ok(b) => {
                self.finished(keep);
                String::from_utf8_lossy(&b).into_owned()
            }
            // The status is known; the text is lost with the connection.
            Err(_) => String::new(),
        };
        Err(match error::parse_server_error(&body) {
            Some((code, message)) => ChError::Server { code, message },
            None => match exception {
                Some(code) => ChError::Server {
                    code,
                    message: body.trim().to_string(),
                },
                None => ChError::Http {
                    what: self.what.clone(),
                    status: status.as_u16(),
                    body,
                },
            },
        })
    }

    /// Read a body to its end, at most `limit` bytes, each piece within the request timeout.
    async fn read_all(&mut self, mut body: Incoming, limit: usize) -> Result<Bytes, ChError> {
        let mut out = BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(self.request_timeout, body.frame()).await {
                Err(_) => return Err(self.timed_out("answer")),
                Ok(None) => return Ok(out.freeze()),
                Ok(Some(Err(e))) => {
                    self.conn = None;
                    return Err(self.broken(e));
                }
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > limit {
                    self.conn = None;
                    return Err(ChError::Response {
                        what: self.what.clone(),
                        message: format!(
                            "the answer is larger than {} MiB (use query_stream for large results)",
                            limit / (1024 * 1024)
                        ),
                    });
                }
                out.extend_from_slice(&data);
            }
        }
    }

    /// A response was read to its end: the connection may carry the next request, until the
    /// server's keep-alive timeout.
    fn finished(&mut self, keep: Duration) {
        if let Some(c) = &mut self.conn {
            c.idle = true;
            c.reuse_until = Instant::now() + keep.saturating_sub(KEEP_ALIVE_MARGIN);
        }
    }

    /// A connection that failed during a request: a TLS refusal when that is what it was.
    fn broken(&self, e: hyper::Error) -> ChError {
        if let Some(message) = self
            .security
            .as_ref()
            .and_then(|s| s.explain(&e, self.url.host()))
        {
            return ChError::Tls {
                what: self.what.clone(),
                message,
            };
        }
        ChError::Broken {
            what: self.what.clone(),
            source: e,
        }
    }

    fn timed_out(&mut self, step: &str) -> ChError {
        self.conn = None;
        ChError::Timeout {
            what: format!("{}: {step}", self.what),
            after: self.request_timeout,
        }
    }
}

/// What a request carries: a statement whose answer is read whole or streamed, or an insert's
/// statement (its data is the body).
enum Kind<'a> {
    Whole,
    Streamed,
    Insert(&'a str),
}

/// A streamed answer being read: everything but its last [`STREAM_HOLD`] bytes is passed on
/// as it comes; those are checked for an error text when the body ends.
struct Streamed<'a> {
    client: &'a mut Client,
    body: Incoming,
    held: BytesMut,
    keep: Duration,
    done: bool,
}

impl Streamed<'_> {
    async fn next(&mut self) -> Result<Option<Bytes>, ChError> {
        loop {
            let timeout = self.client.request_timeout;
            let frame = match tokio::time::timeout(timeout, self.body.frame()).await {
                Err(_) => return Err(self.client.timed_out("answer")),
                Ok(f) => f,
            };
            match frame {
                None => {
                    self.done = true;
                    self.client.finished(self.keep);
                    if let Some((_, code, message)) = error::trailing_error(&self.held) {
                        return Err(ChError::Server { code, message });
                    }
                    return Ok((!self.held.is_empty()).then(|| self.held.split().freeze()));
                }
                Some(Err(e)) => {
                    self.client.conn = None;
                    // A server that gives up part-way may close the connection after its
                    // error text.
                    if let Some((_, code, message)) = error::trailing_error(&self.held) {
                        return Err(ChError::Server { code, message });
                    }
                    return Err(self.client.broken(e));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.held.extend_from_slice(&data);
                        if self.held.len() >= 2 * STREAM_HOLD {
                            let pass = self.held.len() - STREAM_HOLD;
                            return Ok(Some(self.held.split_to(pass).freeze()));
                        }
                    }
                }
            }
        }
    }
}

/// The server's keep-alive timeout from `Keep-Alive: timeout=N`.
fn keep_alive(headers: &HeaderMap) -> Duration {
    headers
        .get("keep-alive")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',').find_map(|part| {
                let (k, v) = part.split_once('=')?;
                (k.trim().eq_ignore_ascii_case("timeout"))
                    .then(|| v.trim().parse::<u64>().ok())
                    .flatten()
            })
        })
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_KEEP_ALIVE)
}

/// `18.16.1` (or `24.3.1.2672`) as `(18, 16)`.
fn parse_version(s: &str) -> Option<(u32, u32)> {
    let mut parts = s.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's futures can be spawned on tokio's multi-threaded runtime.
    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: T) {}
        fn check(client: &mut Client) {
            send(client.execute("select 1"));
        }
        fn check_query(client: &mut Client) {
            send(client.query("select 1"));
        }
        fn check_stream(client: &mut Client) {
            send(client.query_stream("select 1"));
        }
        fn check_insert(client: &mut Client) {
            let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::new())]);
            send(client.insert("insert into t format TabSeparated", body));
        }
        fn connect(url: &Url) {
            send(Client::connect(url));
        }
        let _ = (check, check_query, check_stream, check_insert, connect);
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("18.16.1\n"), Some((18, 16)));
        assert_eq!(parse_version("24.3.1.2672"), Some((24, 3)));
        assert_eq!(parse_version("x"), None);
        assert_eq!(parse_version("18"), None);
    }

    #[test]
    fn keep_alive_header() {
        let mut h = HeaderMap::new();
        assert_eq!(keep_alive(&h), DEFAULT_KEEP_ALIVE);
        h.insert("keep-alive", HeaderValue::from_static("timeout=10"));
        assert_eq!(keep_alive(&h), Duration::from_secs(10));
        h.insert("keep-alive", HeaderValue::from_static("max=100, timeout=2"));
        assert_eq!(keep_alive(&h), Duration::from_secs(2));
    }
}
