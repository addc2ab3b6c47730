//! One HTTP/1.1 connection to ClickHouse: TCP (and TLS) opened here, hyper's connection
//! driver on its own task, and the request body type every request uses, whole or streamed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use super::error::ChError;
use super::url::{SslMode, Url};
use crate::pg::tls as pgtls;

/// How a connection is secured: nothing, or TLS with a checked (or not) certificate.
pub(crate) struct Security {
    connector: TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
    files: pgtls::TlsFiles,
}

impl Security {
    /// The TLS setup of `url`, read once per client; `None` for plain HTTP. Certificate files
    /// that are missing or unreadable fail here, before any connection.
    pub(crate) fn of(url: &Url, what: &str) -> Result<Option<Security>, ChError> {
        let Some(tls) = url.tls() else {
            return Ok(None);
        };
        let fail = |message: String| ChError::Tls {
            what: what.to_string(),
            message,
        };
        let mut files = pgtls::TlsFiles::default();
        let roots = match &tls.sslrootcert {
            Some(path) => {
                files.roots = Some(path.display().to_string());
                Some(pgtls::load_roots(path).map_err(|e| fail(e.to_string()))?)
            }
            None if tls.sslmode == SslMode::Require => None,
            None => {
                files.roots = Some(pgtls::SYSTEM_ROOTS.into());
                Some(
                    pgtls::system_roots()
                        .map_err(|e| fail(format!("no sslrootcert given, and {e}")))?,
                )
            }
        };
        let client = match &tls.client_cert {
            Some((cert, key)) => {
                Some(pgtls::load_client_cert(cert, key).map_err(|e| fail(e.to_string()))?)
            }
            None => None,
        };
        let config = pgtls::rustls_config(roots, tls.sslmode == SslMode::VerifyFull, client)
            .map_err(|e| fail(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(url.host().to_string())
            .map_err(|e| fail(format!("host \"{}\" cannot be checked: {e}", url.host())))?;
        Ok(Some(Security {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            files,
        }))
    }
}

impl Security {
    /// A TLS failure somewhere in `e`'s chain, said the way a user can act on it. With TLS 1.3
    /// a server refuses a client certificate only after the handshake, so the refusal surfaces
    /// in the first request rather than in the handshake.
    pub(crate) fn explain(
        &self,
        e: &(dyn std::error::Error + 'static),
        host: &str,
    ) -> Option<String> {
        pgtls::explain(e, host, &self.files)
    }
}

/// An open connection: hyper's handle to send requests, the task driving the connection, and
/// whether it may carry another request.
pub(crate) struct Conn {
    pub(crate) sender: SendRequest<RequestBody>,
    task: tokio::task::JoinHandle<()>,
    /// The last response was read to its end: the connection is between requests. A request
    /// that was given up half-way leaves this false, and the connection is not used again.
    pub(crate) idle: bool,
    /// Until when the server keeps the idle connection open (its `Keep-Alive: timeout`, less a
    /// margin): a connection older than that is replaced rather than raced against the
    /// server's close.
    pub(crate) reuse_until: Instant,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Open a connection to `url`'s server within `timeout`: TCP, TLS when asked, then HTTP/1.1.
pub(crate) async fn open(
    url: &Url,
    security: Option<&Security>,
    what: &str,
    timeout: Duration,
) -> Result<Conn, ChError> {
    let attempt = async {
        let tcp = TcpStream::connect((url.host(), url.port()))
            .await
            .map_err(|e| ChError::Connect {
                what: what.to_string(),
                source: e,
            })?;
        // Requests are written in a few small pieces; Nagle's algorithm would hold them back.
        let _ = tcp.set_nodelay(true);
        match security {
            None => handshake(TokioIo::new(tcp), what).await,
            Some(s) => {
                let tls =
                    s.connector.connect(s.name.clone(), tcp).await.map_err(
                        |e| match pgtls::explain(&e, url.host(), &s.files) {
                            Some(message) => ChError::Tls {
                                what: what.to_string(),
                                message,
                            },
                            None => ChError::Connect {
                                what: what.to_string(),
                                source: e,
                            },
                        },
                    )?;
                handshake(TokioIo::new(tls), what).await
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ChError::Timeout {
            what: format!("{what}: connect"),
            after: timeout,
        }),
    }
}

async fn handshake<T>(io: T, what: &str) -> Result<Conn, ChError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| ChError::Broken {
            what: what.to_string(),
            source: e,
        })?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "clickhouse connection ended");
        }
    });
    Ok(Conn {
        sender,
        task,
        idle: true,
        reuse_until: Instant::now() + Duration::from_secs(3600),
    })
}

/// A piece of a streamed request body.
pub(crate) enum Piece {
    Data(Bytes),
    /// The body is complete: only now is the closing chunk written.
    End,
}

/// A request body: a statement sent whole (with `Content-Length`), or insert data streamed
/// from the caller through a small channel (chunked). A streamed body whose sender goes away
/// without [`Piece::End`] fails, so hyper aborts the request rather than ending it cleanly:
/// ClickHouse must never take a cut-off body for a complete one.
pub(crate) enum RequestBody {
    Whole(Option<Bytes>),
    Streamed {
        rx: mpsc::Receiver<Piece>,
        ended: bool,
    },
}

/// The error a streamed body ends with when its sender gave up.
#[derive(Debug, thiserror::Error)]
#[error("the request body was abandoned before its end")]
pub(crate) struct Abandoned;

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Abandoned;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Abandoned>>> {
        match self.get_mut() {
            RequestBody::Whole(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Streamed { ended: true, .. } => Poll::Ready(None),
            RequestBody::Streamed { rx, ended } => match rx.poll_recv(cx) {
                Poll::Ready(Some(Piece::Data(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Poll::Ready(Some(Piece::End)) => {
                    *ended = true;
                    Poll::Ready(None)
                }
                Poll::Ready(None) => Poll::Ready(Some(Err(Abandoned))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Whole(b) => b.is_none(),
            RequestBody::Streamed { ended, .. } => *ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Whole(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RequestBody::Streamed { .. } => SizeHint::default(),
        }
    }
}
