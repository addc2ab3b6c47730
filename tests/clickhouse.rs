//! ClickHouse as the DWH, end to end: a real PostgreSQL source, a real ClickHouse server
//! (Debian's `clickhouse-server`), the real binary.

mod support;

use support::clickhouse::{self as ch, env, NOTIFY_JOB, ORDERS, POLL_JOB};
use support::Env;

/// The view as ClickHouse should hold it, one TabSeparated line per row, by id.
async fn expected(env: &Env) -> String {
    let rows = env
        .src
        .query(
            "select id::text || E'\\t' || amount::text || E'\\t' || coalesce(note, '\\N') from orders order by id",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| format!("{}\n", r.get::<_, String>(0)))
        .collect()
}

/// What a reader of the target sees: the newest version of every key not deleted.
async fn target(db: &str, table: &str, cols: &str) -> String {
    ch::query(&format!(
        "select {cols} from {db}.{table} final where _pgtide_deleted = 0 order by id format TabSeparated"
    ))
    .await
}

/// `select count() from DB.FROM` as ClickHouse answers it; `from` is a table, maybe followed by
/// `final` and a `where` clause.
async fn count_of(db: &str, from: &str) -> String {
    ch::query(&format!(
        "select count() from {db}.{from} format TabSeparated"
    ))
    .await
}

/// Whether table `db.table` exists in ClickHouse.
async fn exists(db: &str, table: &str) -> bool {
    ch::query(&format!("exists table {db}.{table} format TabSeparated")).await == "1\n"
}

/// Start `pgtide run`, its stderr in `daemon.log` of the config directory; the process and the
/// log's path.
fn start_daemon(env: &Env) -> (tokio::process::Child, std::path::PathBuf) {
    let log = env.dir.path().join("daemon.log");
    let daemon = env
        .command(&["run"])
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (daemon, log)
}

/// Stop `daemon` with SIGTERM; its exit status, which must come within 70 s.
async fn stop_daemon(daemon: &mut tokio::process::Child) -> std::process::ExitStatus {
    unsafe { libc::kill(daemon.id().unwrap() as i32, libc::SIGTERM) };
    tokio::time::timeout(std::time::Duration::from_secs(70), daemon.wait())
        .await
        .expect("the daemon stops in time")
        .unwrap()
}

#[tokio::test]
async fn poll_job_first_and_incremental_loads() {
    let (env, db) = env().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job("orders", POLL_JOB);
    env.pgtide(&["check"]).await.ok();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_read(), 2500);
    assert_eq!(
        target(&db, "orders", "id, amount, note").await,
        expected(&env).await
    );
    let ty = ch::query(&format!(
        "select name, type from system.columns where database = '{db}' and table = 'orders' format TabSeparated"
    ))
    .await;
    assert!(ty.contains("id\tInt64\n"), "{ty}");
    assert!(ty.contains("amount\tDecimal(10, 2)\n"), "{ty}");
    assert!(ty.contains("note\tNullable(String)\n"), "{ty}");
    assert!(ty.contains("_pgtide_version\tUInt64\n"), "{ty}");

    // New and changed rows: only they are read, and the newest version wins.
    env.src
        .batch_execute(
            "insert into orders select g, g, 'new' from generate_series(2501, 2600) g;
             update orders set note = 'changed', updated_at = now() where id = 2600;",
        )
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_read(), 100);
    assert_eq!(
        target(&db, "orders", "id, amount, note").await,
        expected(&env).await
    );
    // The position is in ClickHouse as well.
    let pos = ch::query(&format!(
        "select argMax(position, seq) from {db}.pgtide_positions where job = 'orders' format TabSeparated"
    ))
    .await;
    assert!(pos.contains("2600"), "{pos}");
    // A run with nothing new writes nothing.
    assert_eq!(env.pgtide(&["run-once"]).await.ok().rows_new(), 0);
}

#[tokio::test]
async fn every_mapped_type_arrives_as_its_clickhouse_type() {
    let (env, db) = env().await;
    env.src
        .batch_execute(
            "create type mood as enum ('sad', 'ok', 'happy');
             create table t (id integer primary key, s smallint, b bigint, r real, d double precision,
               n numeric(12, 4), nu numeric, flag boolean, day date, at timestamptz, local timestamp,
               u uuid, tx text, vc varchar(10), j jsonb, ia integer[], ta text[], m mood, iv interval,
               ua uuid[]);
             insert into t values
              (1, -3, 9007199254740993, 1.5, 0.1, 12345678.1234, 3.14159265358979323846, true,
               '2025-01-31', '2025-01-31 12:34:56.789+02', '2025-01-31 01:02:03', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
               e'tab\\there\\nnew ''q'' \\\\ back', 'short', '{\"k\": [1, \"x\"]}', '{1,NULL,3}', '{\"a b\",\"it''s\",NULL}',
               'happy', '1 day 02:00:00', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}'),
              (2, null, null, 'NaN', '-Infinity', null, null, false, null, null, null, null, null, null, null, null, '{}', null, null, null);",
        )
        .await
        .unwrap();
    let columns = support::columns(
        "t",
        &[
            "id", "s", "b", "r", "d", "n", "nu", "flag", "day", "at", "local", "u", "tx", "vc",
            "j", "ia", "ta", "m", "iv", "ua",
        ],
    );
    env.job(
        "t",
        &format!(
            r#"interval_secs = 60
        key = ["id"]
        [from]
        table = "t"
        {columns}
        [[column]]
        name = "at_ms"
        from = "t.at"
        type = "Nullable(String)"
        "#
        ),
    );
    env.pgtide(&["run-once"]).await.ok();
    let types = ch::query(&format!(
        "select name, type from system.columns where database = '{db}' and table = 't' format TabSeparated"
    ))
    .await
    .replace("\\'", "'");
    let version = ch::query("select version()").await;
    let datetime64 = !version.starts_with("18.") && !version.starts_with("19.");
    let ts = if datetime64 {
        "DateTime64(6, 'UTC')"
    } else {
        "DateTime('UTC')"
    };
    for expected in [
        "id\tInt32".to_string(),
        "s\tNullable(Int16)".into(),
        "b\tNullable(Int64)".into(),
        "r\tNullable(Float32)".into(),
        "d\tNullable(Float64)".into(),
        "n\tNullable(Decimal(12, 4))".into(),
        "nu\tNullable(String)".into(),
        "flag\tNullable(UInt8)".into(),
        "day\tNullable(Date)".into(),
        format!("at\tNullable({ts})"),
        format!("local\tNullable({ts})"),
        "u\tNullable(UUID)".into(),
        "tx\tNullable(String)".into(),
        "vc\tNullable(String)".into(),
        "j\tNullable(String)".into(),
        "ia\tArray(Nullable(Int32))".into(),
        "ta\tArray(Nullable(String))".into(),
        "m\tNullable(String)".into(),
        "iv\tNullable(String)".into(),
        "ua\tArray(Nullable(UUID))".into(),
        "at_ms\tNullable(String)".into(),
    ] {
        assert!(
            types.contains(&format!("{expected}\n")),
            "{expected} not in:\n{types}"
        );
    }
    let row = |cols: &str| {
        let db = db.clone();
        let cols = cols.to_string();
        async move {
            ch::query(&format!(
                "select {cols} from {db}.t final order by id format TabSeparated"
            ))
            .await
        }
    };
    assert_eq!(
        row("s, b, r, d, n, nu, flag, day").await,
        "-3\t9007199254740993\t1.5\t0.1\t12345678.1234\t3.14159265358979323846\t1\t2025-01-31\n\
         \\N\t\\N\tnan\t-inf\t\\N\t\\N\t0\t\\N\n"
    );
    let at = if datetime64 {
        "2025-01-31 10:34:56.789000\t2025-01-31 01:02:03.000000"
    } else {
        "2025-01-31 10:34:56\t2025-01-31 01:02:03"
    };
    assert_eq!(row("at, local").await, format!("{at}\n\\N\t\\N\n"));
    assert_eq!(
        row("u, tx, vc, j").await,
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\ttab\\there\\nnew \\'q\\' \\\\ back\tshort\t{\"k\": [1, \"x\"]}\n\
         \\N\t\\N\t\\N\t\\N\n"
    );
    assert_eq!(
        row("ia, ta, m, iv").await,
        "[1,NULL,3]\t['a b','it\\'s',NULL]\thappy\t1 day 02:00:00\n[]\t[]\t\\N\t\\N\n"
    );
    assert_eq!(
        row("ua").await,
        "['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',NULL]\n[]\n"
    );
    // A text element with a quote arrives whole.
    let el = ch::query(&format!(
        "select ta[2] as el, length(ta[2]) as n from {db}.t final where id = 1 format JSONEachRow"
    ))
    .await;
    assert_eq!(el.trim(), r#"{"el":"it's","n":"4"}"#);
}

#[tokio::test]
async fn notify_job_with_deletes_and_soft_deletes() {
    for on_delete in ["delete", "soft"] {
        let (env, db) = ch::notify_env(on_delete).await;
        assert_eq!(
            target(&db, "orders", "id, amount, note").await,
            expected(&env).await
        );
        env.src
            .batch_execute(
                "delete from orders where id between 10 and 19;
                 update orders set note = 'upd' where id = 5;
                 insert into orders values (9000, 1, 'late');",
            )
            .await
            .unwrap();
        env.pgtide(&["run-once"]).await.ok();
        assert_eq!(
            target(&db, "orders", "id, amount, note").await,
            expected(&env).await,
            "on_delete = {on_delete}"
        );
        let marked = ch::query(&format!(
            "select count(), min(id), max(id), countIf(amount != 0) from {db}.orders final where _pgtide_deleted = 1 format TabSeparated"
        ))
        .await;
        let kept = if on_delete == "soft" { 10 } else { 0 };
        assert_eq!(
            marked,
            format!("10\t10\t19\t{kept}\n"),
            "on_delete = {on_delete}"
        );
        // A TRUNCATE marks every key.
        env.src
            .batch_execute("truncate orders; insert into orders values (1, 2, 'again');")
            .await
            .unwrap();
        env.pgtide(&["run-once"]).await.ok();
        assert_eq!(
            target(&db, "orders", "id, amount, note").await,
            "1\t2.00\tagain\n",
            "on_delete = {on_delete}"
        );
    }
}

#[tokio::test]
async fn a_crash_between_rows_and_position_converges_on_the_next_run() {
    let (env, db) = env().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job("orders", POLL_JOB);
    let out = env
        .command(&["run-once"])
        .env("PGTIDE_CRASH_BEFORE_CH_POSITION", "1")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "the crash point must stop the run");
    env.wait_until_gone("orders").await;
    // The rows of the first batch are in, its position is not.
    let n = count_of(&db, "orders").await;
    assert_eq!(n, "1000\n");
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(
        out.rows_read(),
        2500,
        "the batch without a position is read again"
    );
    assert_eq!(
        target(&db, "orders", "id, amount, note").await,
        expected(&env).await
    );
    let n = count_of(&db, "orders").await;
    assert_eq!(n, "3500\n", "the first batch written twice");
    // Written twice, read once: `final` shows each key once.
    let dup = count_of(&db, "orders final").await;
    assert_eq!(dup, "2500\n");
}

#[tokio::test]
async fn a_sigkill_mid_load_then_a_run_converges() {
    let (env, db) = env().await;
    env.src
        .batch_execute(
            "create table orders (id bigint primary key, amount numeric(10, 2) not null, note text,
                                  updated_at timestamptz not null default now());
             insert into orders select g, g, repeat('x', 200) from generate_series(1, 200000) g;",
        )
        .await
        .unwrap();
    // Throttled, so the load is still going when the kill comes (two-second chunks).
    env.job(
        "orders",
        &POLL_JOB.replace(
            "batch_size = 1000",
            "batch_size = 5000\nmax_rows_per_sec = 50000",
        ),
    );
    let mut child = env.command(&["run-once"]).spawn().unwrap();
    let count = || async {
        if !exists(&db, "orders").await {
            return 0;
        }
        count_of(&db, "orders")
            .await
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count().await < 20000 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "pgtide was killed mid-load");
    assert!(count().await < 200000, "the kill came before the end");
    env.wait_until_gone("orders").await;
    env.pgtide(&["run-once"]).await.ok();
    let seen = ch::query(&format!(
        "select count(), sum(id), min(amount), max(amount) from {db}.orders final where _pgtide_deleted = 0 format TabSeparated"
    ))
    .await;
    assert_eq!(seen, "200000\t20000100000\t1.00\t200000.00\n");
}

#[tokio::test]
async fn a_server_that_is_down_names_the_job_and_keeps_the_password_out() {
    let env = Env::new().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    let port = ch::free_port();
    ch::write_config(
        &env,
        &format!("clickhouse://pgtide:s3cr3t-pw@127.0.0.1:{port}/x"),
    );
    env.job("orders", POLL_JOB);
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    let err = out.stderr();
    assert!(err.contains("job orders"), "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
    assert!(!err.contains("s3cr3t-pw"), "{err}");
    // A wrong password: ClickHouse's own message, without the password.
    let db = ch::database().await;
    let bad = ch::server().pgtide_url(&db).replace("@127", "wrong@127");
    ch::write_config(&env, &bad);
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    let err = out.stderr();
    assert!(
        err.contains("job orders") && err.contains("password"),
        "{err}"
    );
    assert!(!err.contains("wrong"), "{err}");
}

#[tokio::test]
async fn replay_rewrites_a_range_with_newer_versions() {
    let (env, db) = env().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job("orders", POLL_JOB);
    env.pgtide(&["run-once"]).await.ok();
    // Someone damaged the target, with a version newer than pgtide's.
    ch::execute(&format!(
        "insert into {db}.orders (id, amount, note, _pgtide_version) values (7, 0, 'damaged', 4000000000000000000)"
    ))
    .await;
    assert!(target(&db, "orders", "id, amount, note")
        .await
        .contains("damaged"));
    let out = env
        .pgtide(&["replay", "orders", "--from", "5", "--to", "10"])
        .await
        .ok();
    assert!(out.stdout().contains("replayed 5 rows"), "{}", out.stdout());
    assert_eq!(
        target(&db, "orders", "id, amount, note").await,
        expected(&env).await
    );
    // The stored position did not move.
    let st = env.pgtide(&["status", "--json"]).await.ok();
    assert!(st.stdout().contains("\"2500\""), "{}", st.stdout());
}

#[tokio::test]
async fn check_reports_an_incompatible_column_before_anything_is_written() {
    let (env, db) = env().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job("orders", POLL_JOB);
    ch::execute(&format!(
        "create table {db}.orders (id Int64, amount String, note Nullable(String), _pgtide_loaded_at DateTime, \
         _pgtide_version UInt64, _pgtide_deleted UInt8) engine = ReplacingMergeTree(_pgtide_version) order by id"
    ))
    .await;
    let out = env.pgtide(&["check"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("column amount is String, the job writes Decimal(10, 2)"),
        "{}",
        out.stderr()
    );
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1);
    assert_eq!(count_of(&db, "orders").await, "0\n");
    // A column the job gained is added.
    ch::execute(&format!("drop table {db}.orders")).await;
    env.pgtide(&["run-once"]).await.ok();
    env.job(
        "orders",
        &format!("{POLL_JOB}\n[[column]]\nname = \"updated\"\nfrom = \"orders.updated_at\"\n"),
    );
    env.pgtide(&["reset", "orders"]).await.ok();
    env.pgtide(&["run-once"]).await.ok();
    let n = count_of(
        &db,
        "orders final where updated > toDateTime('2000-01-01 00:00:00')",
    )
    .await;
    assert_eq!(n, "2500\n");
}

#[tokio::test]
async fn the_daemon_follows_a_notify_job_and_polls_into_clickhouse() {
    let (env, db) = env().await;
    env.src
        .batch_execute(
            "create table orders (id bigint primary key, amount numeric(10, 2) not null, note text,
                                  updated_at timestamptz not null default now());
             insert into orders select g, g, 'x' from generate_series(1, 300) g;
             create table events (id bigint primary key, v text);
             insert into events select g, 'e' || g from generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    env.job("orders", &NOTIFY_JOB.replace("ON_DELETE", "delete"));
    env.job(
        "events",
        "interval_secs = 1\nkey = [\"id\"]\n[from]\ntable = \"events\"\n[[column]]\nname = \"id\"\nfrom = \"events.id\"\n[[column]]\nname = \"v\"\nfrom = \"events.v\"\n",
    );
    env.pgtide(&["install", "orders"]).await.ok();
    let (mut daemon, log) = start_daemon(&env);
    let live = |table: &'static str| {
        let db = db.clone();
        async move {
            if !exists(&db, table).await {
                return 0;
            }
            count_of(&db, &format!("{table} final where _pgtide_deleted = 0"))
                .await
                .trim()
                .parse::<u64>()
                .unwrap()
        }
    };
    support::wait_for(60, "the first loads", || async {
        live("orders").await == 300 && live("events").await == 50
    })
    .await;
    env.src
        .batch_execute(
            "delete from orders where id <= 100; insert into orders values (1000, 1, 'new');
             insert into events values (51, 'late');",
        )
        .await
        .unwrap();
    support::wait_for(60, "the changes to arrive", || async {
        live("orders").await == 201 && live("events").await == 51
    })
    .await;
    assert_eq!(
        target(&db, "orders", "id, amount, note").await,
        expected(&env).await
    );
    let status = stop_daemon(&mut daemon).await;
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let st = env.pgtide(&["status", "--json"]).await.ok();
    let v: serde_json::Value = serde_json::from_str(&st.stdout()).unwrap();
    let events = v
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job"] == "events")
        .unwrap();
    assert_eq!(events["watermark"], serde_json::json!(["51"]));
    assert_eq!(events["last_run"]["outcome"], "ok");
    // A reset reloads everything on the next run; what a reader sees stays the same.
    env.pgtide(&["reset", "events"]).await.ok();
    let out = env.pgtide(&["run-once", "events"]).await.ok();
    assert_eq!(out.rows_read(), 51);
    assert_eq!(live("events").await, 51);
}

/// Forward connections on `port` to the test ClickHouse server's HTTP port, from now on.
async fn proxy(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let to = ch::server().http_port;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    })
}

#[tokio::test]
async fn the_daemon_waits_for_a_clickhouse_that_is_not_up_yet() {
    let env = Env::new().await;
    let db = ch::database().await;
    let port = ch::free_port();
    ch::write_config(&env, &format!("clickhouse://127.0.0.1:{port}/{db}"));
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job(
        "orders",
        &POLL_JOB.replace("interval_secs = 60", "interval_secs = 1"),
    );
    let (mut daemon, log) = start_daemon(&env);
    support::wait_for(30, "a failed attempt to be retried", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("retry")
    })
    .await;
    let proxy = proxy(port).await;
    support::wait_for(90, "the load once ClickHouse is up", || async {
        exists(&db, "orders").await
            && target(&db, "orders", "id, amount, note").await == expected(&env).await
    })
    .await;
    let status = stop_daemon(&mut daemon).await;
    proxy.abort();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("transient failure; retrying"), "{log}");
    assert!(
        !log.contains("run failed"),
        "a refused connection is transient:\n{log}"
    );
}

#[tokio::test]
async fn an_infinite_timestamp_fails_the_batch_and_says_so() {
    let (env, _db) = env().await;
    env.src
        .batch_execute(
            "create table t (id integer primary key, at timestamptz, days date[]);
             insert into t values (1, '2025-01-01', '{2025-01-01}'), (2, 'infinity', null);",
        )
        .await
        .unwrap();
    let columns = support::columns("t", &["id", "at", "days"]);
    env.job(
        "t",
        &format!("interval_secs = 60\nkey = [\"id\"]\n[from]\ntable = \"t\"\n{columns}"),
    );
    let out = env.pgtide(&["run-once"]).await;
    assert_ne!(out.code(), 0, "{}", out.stdout());
    assert!(
        out.stderr().contains("infinity has no ClickHouse value"),
        "{}",
        out.stderr()
    );
    // An infinite element of an array too, rather than a shorter array.
    env.src
        .batch_execute("update t set at = '2025-01-02', days = '{2025-01-01,-infinity,2025-01-03}' where id = 2")
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await;
    assert!(
        out.stderr().contains("-infinity has no ClickHouse value"),
        "{}",
        out.stderr()
    );
}

#[tokio::test]
async fn a_null_in_the_key_refuses_the_batch_and_writes_none_of_it() {
    let (env, db) = env().await;
    env.src
        .batch_execute(
            "create table t (id integer primary key, code text, v integer);
             insert into t select g, 'c' || g, g from generate_series(1, 500) g;
             update t set code = null where id = 250;",
        )
        .await
        .unwrap();
    let columns = support::columns("t", &["code", "v"]);
    env.job(
        "t",
        &format!(
            "interval_secs = 60\nkey = [\"code\"]\nwatermark = [\"id\"]\n[from]\ntable = \"t\"\n{columns}"
        ),
    );
    let out = env.pgtide(&["run-once"]).await;
    assert_ne!(out.code(), 0, "{}", out.stdout());
    assert!(
        out.stderr()
            .contains("a view row has NULL in its key (code): \\N, 250"),
        "{}",
        out.stderr()
    );
    // ClickHouse would have stored '' for it, one key for every such row: nothing of the
    // batch is there.
    let rows = ch::query(&format!("select count() from {db}.t format TabSeparated")).await;
    assert_eq!(rows, "0\n");
}

#[tokio::test]
async fn a_named_datetime_without_utc_is_refused() {
    let (env, db) = env().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job(
        "orders",
        &format!(
            "{POLL_JOB}\n[[column]]\nname = \"updated\"\nfrom = \"orders.updated_at\"\ntype = \"DateTime\"\n"
        ),
    );
    let out = env.pgtide(&["check"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains(
            "type \"DateTime\": ClickHouse reads a time in the column's time zone, and pgtide writes them in UTC"
        ),
        "{}",
        out.stderr()
    );
    assert!(!exists(&db, "orders").await, "nothing is created");
    // Naming the zone is fine.
    env.job(
        "orders",
        &format!(
            "{POLL_JOB}\n[[column]]\nname = \"updated\"\nfrom = \"orders.updated_at\"\ntype = \"DateTime('UTC')\"\n"
        ),
    );
    env.pgtide(&["run-once"]).await.ok();
    assert_eq!(count_of(&db, "orders").await, "2500\n");
}
