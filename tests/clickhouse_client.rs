//! The ClickHouse client against a real server (the throwaway one of `support::clickhouse`)
//! and against small fake HTTP servers for what a real one does not do on demand: statements,
//! queries whole and streamed, a streamed million-row insert, errors with code and message,
//! passwords kept out of messages, retry classes, keep-alive and reconnection, timeouts, HTTPS.

mod support;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use pgtide::clickhouse::{ChError, Client, InsertError, Url};
use pgtide::pg::Retry;
use support::clickhouse::{self as ch, server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn connect(url: &str) -> Result<Client, ChError> {
    Client::connect(&Url::parse(url).unwrap()).await
}

/// `rows` rows `id\tname` from `from`, as TabSeparated.
fn rows(from: u64, count: u64) -> Bytes {
    let mut s = String::with_capacity(count as usize * 24);
    for id in from..from + count {
        s.push_str(&format!("{id}\tname {id}\n"));
    }
    Bytes::from(s)
}

async fn table(client: &mut Client) {
    client
        .execute("create table t (id UInt64, name String) engine = MergeTree order by id")
        .await
        .unwrap();
}

fn server_error(e: &ChError) -> (u32, &str) {
    match e {
        ChError::Server { code, message } => (*code, message),
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_and_version() {
    let db = ch::database().await;
    let client = ch::client(&db).await;
    let said = ch::query("select version()").await;
    let (major, minor) = client.version();
    assert!(major >= 18, "{said}");
    assert!(
        said.starts_with(&format!("{major}.{minor}.")),
        "{said} vs {major}.{minor}"
    );
    assert_eq!(client.version_string(), said.trim());
    assert_eq!(client.url().database(), db);
}

#[tokio::test]
async fn execute_ddl_and_query() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    table(&mut client).await;
    client
        .insert(
            "insert into t format TabSeparated",
            stream::iter([Ok::<_, io::Error>(Bytes::from("2\tb\\tc\n1\ta\n"))]),
        )
        .await
        .unwrap();
    // An empty body inserts nothing.
    client
        .insert(
            "insert into t format TabSeparated",
            stream::empty::<Result<Bytes, io::Error>>(),
        )
        .await
        .unwrap();
    // The statement ran in the URL's database: `t` needs no qualification.
    let out = client
        .query("select id, name from t order by id")
        .await
        .unwrap();
    assert_eq!(out, "1\ta\n2\tb\\tc\n");
    let out = ch::query(&format!("select count() from {db}.t")).await;
    assert_eq!(out, "2\n");
    client.execute("drop table t").await.unwrap();
    let out = client
        .query(&format!(
            "select count() from system.tables where database = '{db}'"
        ))
        .await
        .unwrap();
    assert_eq!(out, "0\n");
}

#[tokio::test]
async fn insert_streams_a_million_rows() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    table(&mut client).await;
    const CHUNK: u64 = 10_000;
    const ROWS: u64 = 1_000_000;
    let made = Arc::new(AtomicU32::new(0));
    let counter = made.clone();
    // Chunks are made one at a time as the connection takes them.
    let body = stream::iter(0..ROWS / CHUNK).map(move |i| {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok::<_, io::Error>(rows(i * CHUNK, CHUNK))
    });
    let started = Instant::now();
    client
        .insert("insert into t format TabSeparated", body)
        .await
        .unwrap();
    eprintln!("inserted {ROWS} rows in {:?}", started.elapsed());
    assert_eq!(made.load(Ordering::SeqCst) as u64, ROWS / CHUNK);
    let out = client
        .query("select count(), sum(id), uniqExact(name), max(name) from t")
        .await
        .unwrap();
    assert_eq!(
        out,
        format!("{ROWS}\t{}\t{ROWS}\tname 999999\n", ROWS * (ROWS - 1) / 2)
    );
    assert_eq!(client.connections_opened(), 1);
}

#[tokio::test]
async fn insert_body_is_sent_before_it_ends() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    table(&mut client).await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    // ClickHouse 18.16 reads the body in blocks of 1 MiB, and up to `max_query_size` (256 KiB)
    // of it before it runs the statement: the first part is larger than both.
    let body =
        stream::iter([Ok::<_, io::Error>(rows(1, 150_000))]).chain(stream::once(async move {
            released.await.unwrap();
            Ok(rows(150_001, 1000))
        }));
    let mut other = ch::client(&db).await;
    let sql = format!("insert into {db}.t format TabSeparated");
    let watch = async {
        // The server runs the insert while its body is still open: nothing waited for the
        // whole body.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = other
                .query(&format!(
                    "select count() from system.processes where query like 'insert into {db}.t format TabSeparated%'"
                ))
                .await
                .unwrap();
            if n == "1\n" {
                break;
            }
            if Instant::now() > deadline {
                let all = other
                    .query("select query, elapsed from system.processes")
                    .await
                    .unwrap();
                panic!("the insert never showed up running: {all}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        release.send(()).unwrap();
    };
    let (inserted, ()) = tokio::join!(client.insert(&sql, body), watch);
    inserted.unwrap();
    assert_eq!(
        client.query("select count() from t").await.unwrap(),
        "151000\n"
    );
}

#[tokio::test]
async fn body_error_aborts_the_insert() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    table(&mut client).await;
    let body = stream::iter([
        Ok(rows(1, 5000)),
        Err(io::Error::other("source read failed")),
        Ok(rows(5001, 5000)),
    ]);
    let e = client
        .insert("insert into t format TabSeparated", body)
        .await
        .unwrap_err();
    match e {
        InsertError::Body(e) => assert_eq!(e.to_string(), "source read failed"),
        other => panic!("expected the body's error, got {other:?}"),
    }
    // The server saw a broken body, not a short one: nothing of it was inserted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.query("select count() from t").await.unwrap(), "0\n");
    assert_eq!(client.connections_opened(), 2);
}

#[tokio::test]
async fn insert_errors_come_back_with_code_and_message() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    table(&mut client).await;
    // A bad row.
    let e = client
        .insert(
            "insert into t format TabSeparated",
            stream::iter([Ok::<_, io::Error>(Bytes::from("1\tx\n2\n"))]),
        )
        .await
        .unwrap_err();
    let InsertError::ClickHouse(e) = e else {
        panic!("expected clickhouse's error, got {e:?}")
    };
    let (code, message) = server_error(&e);
    assert_eq!(code, 27, "{message}");
    assert!(message.starts_with("Cannot parse input"), "{message}");
    assert_eq!(e.retry(), Retry::Permanent);
    // A missing table, with a large body the server does not read: the answer comes without
    // waiting for the body's end.
    let started = Instant::now();
    let body = stream::iter(0..200).map(|i| Ok::<_, io::Error>(rows(i * 10_000, 10_000)));
    let e = client
        .insert("insert into missing format TabSeparated", body)
        .await
        .unwrap_err();
    let InsertError::ClickHouse(e) = e else {
        panic!("expected clickhouse's error, got {e:?}")
    };
    let (code, message) = server_error(&e);
    assert_eq!(code, 60, "{message}");
    assert!(message.contains("missing"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The client goes on.
    assert_eq!(client.query("select 1").await.unwrap(), "1\n");
}

#[tokio::test]
async fn server_errors_have_code_and_message() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    let e = client.execute("create tabel x (a Int8)").await.unwrap_err();
    let (code, message) = server_error(&e);
    assert_eq!(code, 62);
    assert!(message.starts_with("Syntax error"), "{message}");
    assert_eq!(e.retry(), Retry::Permanent);
    assert!(
        e.to_string()
            .starts_with("clickhouse error 62: Syntax error"),
        "{e}"
    );
    let e = client
        .query("select * from no_such_table")
        .await
        .unwrap_err();
    let (code, message) = server_error(&e);
    assert_eq!(code, 60);
    assert!(
        message.contains("no_such_table") && message.contains("doesn't exist"),
        "{message}"
    );
    assert_eq!(e.code(), Some(60));
    // An error after the server began its answer still comes back as the error: `query`
    // asks for the whole answer before it is sent.
    let e = client
        .query("select throwIf(number = 3000000) from system.numbers limit 4000000")
        .await
        .unwrap_err();
    assert_eq!(server_error(&e).0, 395);
    assert_eq!(client.query("select 2").await.unwrap(), "2\n");
    assert_eq!(client.connections_opened(), 1);
}

#[tokio::test]
async fn settings_go_with_every_request() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    client.set_setting("readonly", "1").unwrap();
    let e = client
        .execute("create table t (a Int8) engine = Memory")
        .await
        .unwrap_err();
    assert_eq!(server_error(&e).0, 164, "{e}");
    client.set_setting("readonly", "0").unwrap();
    table(&mut client).await;
    for bad in ["query", "database", "a&b", ""] {
        assert!(client.set_setting(bad, "1").is_err(), "{bad}");
    }
}

#[tokio::test]
async fn unknown_database() {
    let e = connect(&ch::clickhouse_url("no_such_db"))
        .await
        .unwrap_err();
    let (code, message) = server_error(&e);
    assert_eq!(code, 81);
    assert!(message.contains("no_such_db"), "{message}");
}

#[tokio::test]
async fn passwords() {
    let db = ch::database().await;
    // The password has characters that are percent-encoded in the URL.
    let mut client = connect(&server().pgtide_url(&db)).await.unwrap();
    assert_eq!(
        client
            .query("select user from system.processes where query like '%whoami-7364%'")
            .await
            .unwrap(),
        "pgtide\n"
    );
    let url = Url::parse(&server().pgtide_url(&db))
        .unwrap()
        .with_password("Wr0ng-S3cret".into());
    let e = Client::connect(&url).await.unwrap_err();
    let (code, message) = server_error(&e);
    assert!(code == 193 || code == 516, "{code}: {message}");
    assert!(
        message.contains("password") && message.contains("pgtide"),
        "{message}"
    );
    for shown in [e.to_string(), format!("{e:?}"), format!("{client:?}")] {
        assert!(!shown.contains("Wr0ng-S3cret"), "{shown}");
        assert!(!shown.contains(ch::PASSWORD), "{shown}");
    }
    assert_eq!(e.retry(), Retry::Permanent);
    // No password at all.
    let url = Url::parse(&format!(
        "clickhouse://pgtide@127.0.0.1:{}/{db}",
        server().http_port
    ))
    .unwrap();
    let e = Client::connect(&url).await.unwrap_err();
    assert!(matches!(e, ChError::Server { .. }), "{e:?}");
}

#[tokio::test]
async fn server_down_is_a_transient_connect_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = connect(&format!("clickhouse://u:Pw-S3cret@127.0.0.1:{port}/db"))
        .await
        .unwrap_err();
    assert!(matches!(e, ChError::Connect { .. }), "{e:?}");
    assert_eq!(e.retry(), Retry::Transient);
    let m = e.to_string();
    assert!(
        m.starts_with(&format!("clickhouse 127.0.0.1:{port}: ")),
        "{m}"
    );
    assert!(m.to_lowercase().contains("refused"), "{m}");
    assert!(!m.contains("Pw-S3cret"), "{m}");
}

/// A fake server: accepts connections and hands each to `serve`; counts them.
async fn fake<F, Fut>(serve: F) -> (u16, Arc<AtomicU32>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU32::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    (port, accepted)
}

/// Read one request (headers and a body of `Content-Length`).
async fn read_request(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some(head)
}

#[tokio::test]
async fn a_server_that_does_not_answer_times_out() {
    let (port, _) = fake(|mut s| async move {
        let _ = read_request(&mut s).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let started = Instant::now();
    let e = connect(&format!(
        "clickhouse://127.0.0.1:{port}/db?connect_timeout=1"
    ))
    .await
    .unwrap_err();
    assert!(matches!(e, ChError::Timeout { .. }), "{e:?}");
    assert_eq!(e.retry(), Retry::Transient);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        e.to_string(),
        format!("clickhouse 127.0.0.1:{port}: query: no answer within 1 s")
    );
}

#[tokio::test]
async fn a_gateway_error_without_clickhouse_text() {
    let (port, _) = fake(|mut s| async move {
        while read_request(&mut s).await.is_some() {
            let body = "<html><body>502 Bad Gateway</body></html>\n";
            let answer = format!(
                "HTTP/1.1 502 Bad Gateway\r\nContent-Length: {}\r\nContent-Type: text/html\r\n\r\n{body}",
                body.len()
            );
            s.write_all(answer.as_bytes()).await.unwrap();
        }
    })
    .await;
    let e = connect(&format!("clickhouse://127.0.0.1:{port}/db"))
        .await
        .unwrap_err();
    match &e {
        ChError::Http { status, .. } => assert_eq!(*status, 502),
        other => panic!("expected an http error, got {other:?}"),
    }
    assert_eq!(e.retry(), Retry::Transient);
    assert_eq!(
        e.to_string(),
        format!("clickhouse 127.0.0.1:{port}: http status 502: <html><body>502 Bad Gateway</body></html>")
    );
}

#[tokio::test]
async fn the_connection_is_kept_between_requests() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    for i in 0..20 {
        assert_eq!(
            client.query(&format!("select {i}")).await.unwrap(),
            format!("{i}\n")
        );
    }
    table(&mut client).await;
    client
        .insert(
            "insert into t format TabSeparated",
            stream::iter([Ok::<_, io::Error>(rows(1, 10))]),
        )
        .await
        .unwrap();
    let mut s = client
        .query_stream("select id from t order by id")
        .await
        .unwrap();
    while let Some(b) = s.next().await {
        b.unwrap();
    }
    drop(s);
    assert_eq!(client.query("select count() from t").await.unwrap(), "10\n");
    assert_eq!(client.connections_opened(), 1);
}

#[tokio::test]
async fn an_idle_connection_the_server_closed_is_replaced() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    assert_eq!(client.query("select 1").await.unwrap(), "1\n");
    // The server closes connections idle for longer than its keep-alive timeout.
    tokio::time::sleep(Duration::from_secs(ch::KEEP_ALIVE_SECS + 1)).await;
    assert_eq!(client.query("select 2").await.unwrap(), "2\n");
    assert_eq!(client.connections_opened(), 2);
}

#[tokio::test]
async fn a_connection_closed_without_notice_is_replaced() {
    // A server that promises a long keep-alive but closes each connection after one answer:
    // the client learns of the close only from the connection itself.
    let (port, accepted) = fake(|mut s| async move {
        if read_request(&mut s).await.is_some() {
            let answer =
                "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nKeep-Alive: timeout=60\r\n\r\n18.16.1\n";
            s.write_all(answer.as_bytes()).await.unwrap();
        }
    })
    .await;
    let mut client = connect(&format!("clickhouse://127.0.0.1:{port}/db"))
        .await
        .unwrap();
    assert_eq!(client.version(), (18, 16));
    // At once: hyper's driver sees the close while the client waits for the connection to
    // be ready.
    for _ in 0..3 {
        assert_eq!(client.query("select version()").await.unwrap(), "18.16.1\n");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.query("select version()").await.unwrap(), "18.16.1\n");
    assert_eq!(client.connections_opened(), 5);
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn query_stream_streams_and_reports_late_errors() {
    let db = ch::database().await;
    let mut client = ch::client(&db).await;
    let mut s = client
        .query_stream("select number from system.numbers limit 2000000")
        .await
        .unwrap();
    let (mut lines, mut pieces, mut largest) = (0usize, 0usize, 0usize);
    let mut last = Bytes::new();
    while let Some(b) = s.next().await {
        let b = b.unwrap();
        lines += b.iter().filter(|c| **c == b'\n').count();
        pieces += 1;
        largest = largest.max(b.len());
        last = b;
    }
    drop(s);
    assert_eq!(lines, 2_000_000);
    assert!(last.ends_with(b"1999999\n"));
    assert!(pieces > 10, "{pieces} pieces");
    assert!(largest < 4 * 1024 * 1024, "a piece of {largest} bytes");

    // ClickHouse has sent a success status and data when the error comes: it ends the body.
    let mut s = client
        .query_stream("select throwIf(number = 3000000) from system.numbers limit 4000000")
        .await
        .unwrap();
    let mut ok = 0usize;
    let mut failed = None;
    while let Some(b) = s.next().await {
        match b {
            Ok(b) => ok += b.len(),
            Err(e) => failed = Some(e),
        }
    }
    drop(s);
    assert!(ok > 0, "the error came before any data");
    let e = failed.expect("the late error was reported");
    let (code, message) = server_error(&e);
    assert_eq!(code, 395);
    assert!(message.contains("throwIf"), "{message}");

    // A stream dropped half-way leaves a connection that is not used again.
    let mut s = client
        .query_stream("select number from system.numbers limit 5000000")
        .await
        .unwrap();
    s.next().await.unwrap().unwrap();
    drop(s);
    assert_eq!(client.query("select 3").await.unwrap(), "3\n");
    // A streamed answer that is an error from the start.
    let e = client
        .query_stream("select * from no_such_table")
        .await
        .err()
        .unwrap();
    assert_eq!(server_error(&e).0, 60);
}

mod https {
    use super::*;

    fn url(host: &str, params: &str) -> String {
        server().https_url(host, "default", params)
    }

    fn tls_message(e: ChError) -> String {
        assert_eq!(e.retry(), Retry::Permanent, "{e:?}");
        match e {
            ChError::Tls { message, .. } => message,
            other => panic!("expected a tls error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn verify_full() {
        let ca = server().cert("ca.crt");
        let mut client = connect(&url("127.0.0.1", &format!("sslrootcert={ca}")))
            .await
            .unwrap();
        assert_eq!(client.query("select 1").await.unwrap(), "1\n");
        assert_eq!(client.query("select 2").await.unwrap(), "2\n");
        assert_eq!(client.connections_opened(), 1);
        // The certificate names 127.0.0.1 only.
        let e = connect(&url("localhost", &format!("sslrootcert={ca}")))
            .await
            .unwrap_err();
        let m = tls_message(e);
        assert!(
            m.contains("does not match the host name \"localhost\""),
            "{m}"
        );
    }

    #[tokio::test]
    async fn verify_ca_and_require() {
        let ca = server().cert("ca.crt");
        connect(&url(
            "localhost",
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ))
        .await
        .unwrap();
        connect(&url("localhost", "sslmode=require")).await.unwrap();
        let wrong = server().cert("wrong_ca.crt");
        let e = connect(&url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={wrong}"),
        ))
        .await
        .unwrap_err();
        let m = tls_message(e);
        assert!(m.contains("not trusted"), "{m}");
        // Without sslrootcert, the system's roots, which do not know the test CA.
        let e = connect(&url("127.0.0.1", "")).await.unwrap_err();
        let m = tls_message(e);
        assert!(
            m.contains("not trusted") || m.contains("no trusted root"),
            "{m}"
        );
        // A missing root file is named.
        let e = connect(&url("127.0.0.1", "sslrootcert=/nonexistent/ca.crt"))
            .await
            .unwrap_err();
        let m = tls_message(e);
        assert!(m.contains("/nonexistent/ca.crt"), "{m}");
    }

    #[tokio::test]
    async fn client_certificates() {
        let ca = server().cert("ca.crt");
        let (crt, key) = (server().cert("client.crt"), server().cert("client.key"));
        let mut client = connect(&url(
            "127.0.0.1",
            &format!("sslrootcert={ca}&sslcert={crt}&sslkey={key}"),
        ))
        .await
        .unwrap();
        assert_eq!(client.query("select 1").await.unwrap(), "1\n");
        // The server checks a certificate it is shown against its CA.
        let (crt, key) = (
            server().cert("wrong_client.crt"),
            server().cert("wrong_client.key"),
        );
        let e = connect(&url(
            "127.0.0.1",
            &format!("sslrootcert={ca}&sslcert={crt}&sslkey={key}"),
        ))
        .await
        .unwrap_err();
        let m = tls_message(e);
        assert!(m.contains("client certificate"), "{m}");
    }
}
