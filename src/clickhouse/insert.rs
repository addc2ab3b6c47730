//! Inserts: the caller's data streamed to the server in chunks while the server answers.

use std::pin::pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper::Response;
use tokio::sync::mpsc;

use super::transport::{Piece, RequestBody};
use super::{keep_alive, ChError, Client, InsertError, Kind, INSERT_PIPE, QUERY_MAX_BYTES};

impl Client {
    /// Insert data: `sql` is `insert into ... format TabSeparated` (or another input format),
    /// `body` the data in that format, streamed to the server in chunks as it comes (chunked
    /// transfer encoding) and never held whole. An error from `body` aborts the request, so
    /// the server sees a broken body rather than a short one.
    ///
    /// ClickHouse writes a large insert block by block (`max_insert_block_size` rows): an
    /// insert that fails part-way may have written its first blocks.
    pub async fn insert<S, E>(&mut self, sql: &str, body: S) -> Result<(), InsertError<E>>
    where
        S: Stream<Item = Result<Bytes, E>>,
    {
        let (tx, rx) = mpsc::channel(INSERT_PIPE);
        let request = self.request(
            Kind::Insert(sql),
            RequestBody::Streamed { rx, ended: false },
        )?;
        let timeout = self.request_timeout;
        let what = self.what.clone();
        let outcome = {
            let mut pump = pin!(pump(body, tx, timeout));
            let mut send = pin!(self.send(request));
            let deadline = tokio::time::sleep(Duration::MAX / 4);
            let mut deadline = pin!(deadline);
            let mut pumped = false;
            loop {
                tokio::select! {
                    biased;
                    r = &mut pump, if !pumped => match r {
                        Ok(()) => {
                            pumped = true;
                            deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
                        }
                        // hyper stopped taking the body: the response or its error says why.
                        Err(Pumped::Closed) => {
                            pumped = true;
                            deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
                        }
                        Err(Pumped::Body(e)) => break Outcome::Body(e),
                        Err(Pumped::Stalled) => break Outcome::Failed(ChError::Timeout {
                            what: format!("{what}: insert: the server stopped taking data"),
                            after: timeout,
                        }),
                    },
                    r = &mut send => break Outcome::Answered(r, pumped),
                    _ = &mut deadline, if pumped => break Outcome::Failed(ChError::Timeout {
                        what: format!("{what}: insert"),
                        after: timeout,
                    }),
                }
            }
        };
        match outcome {
            Outcome::Body(e) => {
                // The pump and the request are dropped: the body ends in an error, and hyper
                // closes the connection without the closing chunk.
                self.conn = None;
                Err(InsertError::Body(e))
            }
            Outcome::Failed(e) => {
                self.conn = None;
                Err(e.into())
            }
            Outcome::Answered(response, pumped) => {
                let response = response?;
                if !pumped {
                    // An answer before the whole body was sent is an error; the rest of the
                    // body is abandoned, and the connection with it.
                    let e = self
                        .check(response)
                        .await
                        .err()
                        .unwrap_or(ChError::Response {
                            what: self.what.clone(),
                            message: "the server answered an insert before its data was complete"
                                .into(),
                        });
                    self.conn = None;
                    return Err(e.into());
                }
                let response = self.check(response).await?;
                let keep = keep_alive(response.headers());
                self.read_all(response.into_body(), QUERY_MAX_BYTES).await?;
                self.finished(keep);
                Ok(())
            }
        }
    }
}

/// How an insert's exchange ended.
enum Outcome<E> {
    /// The caller's body failed.
    Body(E),
    Failed(ChError),
    /// The server answered; whether the whole body had been handed over by then.
    Answered(Result<Response<Incoming>, ChError>, bool),
}

enum Pumped<E> {
    Body(E),
    /// The server took no data for the whole request timeout.
    Stalled,
    /// The connection no longer takes the body.
    Closed,
}

/// Hand the caller's body to the connection piece by piece, then mark its end.
async fn pump<S, E>(body: S, tx: mpsc::Sender<Piece>, timeout: Duration) -> Result<(), Pumped<E>>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let mut body = pin!(body);
    let send = |piece| {
        let tx = &tx;
        async move {
            match tokio::time::timeout(timeout, tx.send(piece)).await {
                Err(_) => Err(Pumped::Stalled),
                Ok(Err(_)) => Err(Pumped::Closed),
                Ok(Ok(())) => Ok(()),
            }
        }
    };
    while let Some(item) = body.next().await {
        let data = item.map_err(Pumped::Body)?;
        // An empty chunk would read as the end of a chunked body.
        if !data.is_empty() {
            send(Piece::Data(data)).await?;
        }
    }
    send(Piece::End).await
}
