//! Poll jobs against real PostgreSQL databases, through the real binary.

mod support;

use support::{wait_for, Env, CUSTOMER_ORDERS};

/// Orders joined with customers, past (updated_at, id), in batches of 10.
const ORDERS_JOB: &str = r#"
    interval_secs = 60
    batch_size = 10
    key = ["order_id"]
    watermark = ["updated_at", "id"]
    [from]
    table = "public.orders"
    as = "o"
    [[join]]
    table = "public.customers"
    as = "c"
    type = "left"
    on = { "o.customer_id" = "c.id" }
    [[column]]
    name = "order_id"
    from = "o.id"
    [[column]]
    name = "customer"
    from = "c.name"
    [[column]]
    name = "amount"
    from = "o.amount"
    [[column]]
    name = "cents"
    sql = "(o.amount * 100)::bigint"
    [[column]]
    name = "note"
    from = "o.note"
"#;

const SOURCE_VIEW: &str = "select o.id, c.name, o.amount, (o.amount * 100)::bigint, o.note
    from orders o left join customers c on o.customer_id = c.id";
const DWH_VIEW: &str = "select order_id, customer, amount, cents, note from dw.orders";

async fn assert_converged(env: &Env) {
    assert_eq!(
        Env::rows(&env.src, SOURCE_VIEW).await,
        Env::rows(&env.dwh, DWH_VIEW).await,
        "DWH differs from the view"
    );
}

async fn orders_env() -> Env {
    let env = Env::new().await;
    env.src.batch_execute(CUSTOMER_ORDERS).await.unwrap();
    env.job("orders", ORDERS_JOB);
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn first_and_incremental_loads_with_ties_across_batch_boundaries() {
    let env = orders_env().await;
    // 25 rows share one updated_at: batches of 10 split them, and none may be skipped.
    env.src
        .batch_execute(
            "insert into orders (customer_id, amount, updated_at)
             select 1 + g % 10, g * 1.5, '2025-01-01 00:00:00+00' from generate_series(1, 25) g;
             insert into orders (customer_id, amount, updated_at)
             select 1 + g % 10, g, '2025-01-02 00:00:00+00' from generate_series(1, 7) g;",
        )
        .await
        .unwrap();
    // The first chunk holds batch_size rows, cutting the tie; the next is cut before the first
    // has reported its speed, or after (then it holds the rest).
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(
        out.stdout().contains("32 rows read, 32 changed, 3 batches")
            || out.stdout().contains("32 rows read, 32 changed, 2 batches"),
        "{}",
        out.stdout()
    );
    assert_converged(&env).await;

    // Updates move rows past the watermark; inserts arrive; unchanged rows are not rewritten.
    env.src
        .batch_execute(
            "update orders set note = 'changed', updated_at = '2025-01-03 00:00:00+00' where id in (3, 12, 20);
             update orders set updated_at = '2025-01-03 00:00:00+00' where id = 4;
             insert into orders (customer_id, amount, updated_at) values (2, 9.99, '2025-01-03 00:00:00+00');",
        )
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_new(), 5, "{}", out.stdout());
    assert!(out.stdout().contains(" 4 changed"), "{}", out.stdout());
    assert_converged(&env).await;

    // Nothing new: nothing read.
    let out = env.pgtide(&["run-once", "orders"]).await.ok();
    assert_eq!(out.rows_new(), 0, "{}", out.stdout());

    let status = env.pgtide(&["status", "--json"]).await.ok();
    let v: serde_json::Value = serde_json::from_str(&status.stdout()).unwrap();
    assert_eq!(v[0]["job"], "orders");
    assert_eq!(v[0]["mode"], "poll");
    assert_eq!(v[0]["waiting"], 0);
    assert_eq!(v[0]["watermark"][1], "33");
    assert_eq!(v[0]["last_run"]["outcome"], "ok");
    // The target got its key and load timestamp.
    let pk: String = env
        .dwh
        .query_one("select pg_get_constraintdef(oid) from pg_constraint where conrelid = 'dw.orders'::regclass and contype = 'p'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pk, "PRIMARY KEY (order_id)");
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_committing_out_of_order_are_not_lost() {
    let env = orders_env().await;
    // A long transaction takes id 1 (and an earlier timestamp) and commits last.
    let slow = support::connect(&env.src_url).await;
    slow.batch_execute("begin; insert into orders (customer_id, amount) values (1, 1.00)")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    env.src
        .batch_execute("insert into orders (customer_id, amount) values (2, 2.00), (3, 3.00)")
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(out.stdout().contains("2 rows read"), "{}", out.stdout());
    assert_eq!(Env::count(&env.dwh, "dw.orders").await, 2);

    slow.batch_execute("commit").await.unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(
        out.stdout()
            .contains("1 rows read, 1 changed, 0 batches (1 re-read by recheck)"),
        "{}",
        out.stdout()
    );
    assert_converged(&env).await;

    // Concurrent writers under load: many transactions, some held open across runs.
    let mut held = Vec::new();
    for i in 0..5 {
        let c = support::connect(&env.src_url).await;
        c.batch_execute(&format!(
            "begin; insert into orders (customer_id, amount) values (1, {i})"
        ))
        .await
        .unwrap();
        held.push(c);
        env.src.batch_execute("insert into orders (customer_id, amount) select 1, g from generate_series(1, 13) g").await.unwrap();
        env.pgtide(&["run-once"]).await.ok();
    }
    for c in &held {
        c.batch_execute("commit").await.unwrap();
    }
    env.pgtide(&["run-once"]).await.ok();
    assert_converged(&env).await;
    assert_eq!(Env::count(&env.dwh, "dw.orders").await, 3 + 5 * 14);

    // The timestamp trap: a transaction reads now() (its start time) long before its first
    // write, so it has no transaction id while later rows are loaded past its timestamp.
    let early = support::connect(&env.src_url).await;
    early.batch_execute("begin; select now()").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    env.src
        .batch_execute("insert into orders (customer_id, amount) values (4, 4.00)")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    // A run while it is still open must keep the window open.
    env.pgtide(&["run-once"]).await.ok();
    early
        .batch_execute("insert into orders (customer_id, amount) values (5, 5.00); commit")
        .await
        .unwrap();
    let late: (String, String) = {
        let r = env.src.query_one("select max(updated_at)::text, (select updated_at::text from orders where customer_id = 5) from orders where customer_id = 4", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        late.1 < late.0,
        "the late row must sit below the watermark: {late:?}"
    );
    // Rechecks may re-read rows loaded before (other transactions on the server hold windows
    // open); what counts is that the late row arrives, and is the one row that changed.
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(
        out.stdout().contains("1 changed, 0 batches"),
        "{}",
        out.stdout()
    );
    assert!(
        out.stdout().contains("re-read by recheck"),
        "{}",
        out.stdout()
    );
    assert_converged(&env).await;

    // With every session visible and no transaction open, the windows close by themselves.
    env.pgtide(&["run-once"]).await.ok();
    let v: serde_json::Value =
        serde_json::from_str(&env.pgtide(&["status", "--json"]).await.ok().stdout()).unwrap();
    assert_eq!(v[0]["open_windows"], 0, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_and_reset() {
    let env = orders_env().await;
    env.src
        .batch_execute("insert into orders (customer_id, amount, updated_at) select 1, g, '2025-01-01'::timestamptz + make_interval(days => g) from generate_series(1, 30) g")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    // Damage the DWH, then replay a range: exactly that range is repaired.
    env.dwh
        .batch_execute("update dw.orders set note = 'damaged'")
        .await
        .unwrap();
    let dry = env
        .pgtide(&[
            "replay",
            "orders",
            "--from",
            r#"["2025-01-05 00:00:00+00", 0]"#,
            "--to",
            r#"["2025-01-10 00:00:00+00", 999]"#,
            "--dry-run",
        ])
        .await
        .ok();
    assert!(
        dry.stdout().contains("would read 6 source rows"),
        "{}",
        dry.stdout()
    );
    let before = env.pgtide(&["status", "--json"]).await.ok().stdout();
    let out = env
        .pgtide(&[
            "replay",
            "orders",
            "--from",
            r#"["2025-01-05 00:00:00+00", 0]"#,
            "--to",
            r#"["2025-01-10 00:00:00+00", 999]"#,
        ])
        .await
        .ok();
    assert!(
        out.stdout().contains("replayed 6 rows (6 changed)"),
        "{}",
        out.stdout()
    );
    let damaged: i64 = env
        .dwh
        .query_one("select count(*) from dw.orders where note = 'damaged'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(damaged, 24);
    let after = env.pgtide(&["status", "--json"]).await.ok().stdout();
    let wm =
        |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()[0]["watermark"].clone();
    assert_eq!(
        wm(&before),
        wm(&after),
        "replay must not move the watermark"
    );

    // Replay everything repairs the rest.
    env.pgtide(&["replay", "orders"]).await.ok();
    assert_converged(&env).await;

    // Reset to a point: the next run reads from there.
    let out = env
        .pgtide(&[
            "reset",
            "orders",
            "--to",
            r#"["2025-01-28 00:00:00+00", 0]"#,
        ])
        .await
        .ok();
    assert!(
        out.stdout()
            .contains("watermark set to 2025-01-28 00:00:00+00, 0"),
        "{}",
        out.stdout()
    );
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_new(), 4, "{}", out.stdout());
    // Reset to the beginning: everything is read again, nothing changes.
    env.pgtide(&["reset", "orders"]).await.ok();
    let v: serde_json::Value =
        serde_json::from_str(&env.pgtide(&["status", "--json"]).await.ok().stdout()).unwrap();
    assert_eq!(v[0]["watermark"], serde_json::Value::Null);
    assert_eq!(v[0]["waiting"], 30);
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(
        out.stdout().contains("30 rows read, 0 changed"),
        "{}",
        out.stdout()
    );

    // A value that does not fit the watermark is refused before anything runs.
    let bad = env.pgtide(&["reset", "orders", "--to", "1500"]).await;
    assert_eq!(bad.code(), 2, "{}", bad.stderr());
    assert!(
        bad.stderr()
            .contains("--to: the watermark has 2 column(s) (updated_at, id), the value has 1"),
        "{}",
        bad.stderr()
    );
    let bad = env
        .pgtide(&["reset", "orders", "--to", r#"["yesterday-ish", 1]"#])
        .await;
    assert_eq!(bad.code(), 2, "{}", bad.stderr());
    assert!(
        bad.stderr().contains("\"yesterday-ish\" for updated_at"),
        "{}",
        bad.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_common_type_survives_exactly() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            r#"create type mood as enum ('sad', 'ok', 'happy');
            create table t (
                id integer primary key,
                a smallint, b integer, c bigint, d numeric, e numeric(10, 3), f real, g double precision,
                h text, i varchar(20), j char(5), k boolean, l date, m time, n timestamp, o timestamptz,
                p interval, q uuid, r json, s jsonb, u bytea, v integer[], w text[], x mood, y mood[],
                z numeric[]
            );
            insert into t values
              (1, -32768, 2147483647, -9223372036854775808, 123456789012345678901234567890.123456789, 3.142,
               3.4028235e38, 1.7976931348623157e308, 'tab	and ünïcödé', 'varchar', 'ch', true, '2024-02-29',
               '23:59:59.999999', '2024-01-01 12:34:56.789', '2024-06-30 23:59:59.123456+02', '1 year 2 mons 3 days 04:05:06.7',
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1, "a": [1, 2.50]}', '{"b": 1, "a": [1, 2.50], "n": null}',
               '\xdeadbeef00', '{1,NULL,3}', '{"x y","",NULL}', 'happy', '{sad,ok}', '{1.5,NaN}'),
              (2, null, null, null, 'NaN', null, 'NaN', '-Infinity', '', null, null, false, 'infinity', null, '-infinity',
               'infinity', '-1 day', null, 'null', '[]', '', '{}', '{}', null, '{}', null),
              (3, null, null, null, null, null, null, null, null, null, null, null, null, null, null,
               null, null, null, null, null, null, null, null, null, null, null);"#,
        )
        .await
        .unwrap();
    let cols = "id,a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,u,v,w,x,y,z";
    let columns: String = cols
        .split(',')
        .map(|c| format!("[[column]]\nname = \"{c}\"\nfrom = \"t.{c}\"\n"))
        .collect();
    env.job(
        "types",
        &format!("interval_secs = 5\nkey = [\"id\"]\n[from]\ntable = \"t\"\n{columns}"),
    );
    env.pgtide(&["run-once"]).await.ok();
    let q = |table: &str| format!("select {cols} from {table}");
    assert_eq!(
        Env::rows(&env.src, &q("t")).await,
        Env::rows(&env.dwh, &q("dw.types")).await
    );
    // Enums arrive as text, everything else keeps its type.
    let types: Vec<String> = env
        .dwh
        .query(
            "select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'dw.types'::regclass and attnum > 0 order by attnum",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types[5], "numeric(10,3)");
    assert_eq!(types[10], "character(5)");
    assert_eq!(types[23], "text");
    assert_eq!(types[24], "text[]");
    assert_eq!(
        types.last().unwrap(),
        "timestamp with time zone",
        "the _pgtide_loaded_at column"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_identifiers_are_quoted_everywhere() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            r#"create schema "Sales Data";
            create table "Sales Data"."Order""s" ("ID" bigint primary key, "Größe" text, "a ""quoted"" col" int, "When" timestamptz not null);
            create table "Sales Data"."Kunden Ü" ("Nr" bigint primary key, "Name" text);
            insert into "Sales Data"."Kunden Ü" values (1, 'Müller');
            insert into "Sales Data"."Order""s" select g, 'g' || g, g, '2025-01-01'::timestamptz + make_interval(mins => g) from generate_series(1, 12) g;"#,
        )
        .await
        .unwrap();
    env.job(
        "odd",
        r#"interval_secs = 5
        batch_size = 5
        target = 'Zielschema.Tabelle "X"'
        key = ["Order ID"]
        watermark = ["When", "ID"]
        [from]
        table = "Sales Data.Order\"s"
        as = "Ö"
        [[join]]
        table = "Sales Data.Kunden Ü"
        as = "k k"
        type = "left"
        on = { "Ö.ID" = "k k.Nr" }
        [[column]]
        name = "Order ID"
        from = "Ö.ID"
        [[column]]
        name = "Größe"
        from = "Ö.Größe"
        [[column]]
        name = "a \"quoted\" col"
        from = "Ö.a \"quoted\" col"
        [[column]]
        name = "Kunde"
        from = "k k.Name"
        "#,
    );
    env.pgtide(&["check"]).await.ok();
    env.pgtide(&["run-once"]).await.ok();
    let src = Env::rows(&env.src, r#"select o."ID", o."Größe", o."a ""quoted"" col", k."Name" from "Sales Data"."Order""s" o left join "Sales Data"."Kunden Ü" k on o."ID" = k."Nr""#).await;
    let dwh = Env::rows(&env.dwh, r#"select "Order ID", "Größe", "a ""quoted"" col", "Kunde" from "Zielschema"."Tabelle ""X""""#).await;
    assert_eq!(src.len(), 12);
    assert_eq!(src, dwh);

    // A table name that carries SQL is looked up, not executed.
    env.job(
        "odd",
        &ORDERS_JOB.replace(
            "public.orders",
            "public.orders\\\"; drop table customers; --",
        ),
    );
    let out = env.pgtide(&["check"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("table public.orders\"; drop table customers; -- does not exist"),
        "{}",
        out.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_in_the_middle_of_a_load_then_a_converging_run() {
    let env = orders_env().await;
    env.src
        .batch_execute("insert into orders (customer_id, amount, note) select 1 + g % 10, g % 1000, repeat('x', g % 50) from generate_series(1, 200000) g")
        .await
        .unwrap();
    // Throttled, so the load is still going when the kill comes (chunks of two seconds).
    let unthrottled = ORDERS_JOB.replace("batch_size = 10", "batch_size = 2000");
    env.job(
        "orders",
        &unthrottled.replace(
            "batch_size = 2000",
            "batch_size = 2000\nmax_rows_per_sec = 50000",
        ),
    );
    let mut child = env
        .command(&["run-once"])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dwh = &env.dwh;
    wait_for(60, "the first batches to land", || async {
        dwh.query_one(
            "select count(*) from pg_tables where schemaname = 'dw'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            > 0
            && Env::count(dwh, "dw.orders").await >= 20_000
    })
    .await;
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "pgtide must have been killed mid-load");
    env.wait_until_gone("orders").await;
    let landed = Env::count(dwh, "dw.orders").await;
    assert!(
        landed < 200_000,
        "the kill came too late to test anything ({landed} rows)"
    );

    env.job("orders", &unthrottled);
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_converged(&env).await;
    // The second run continued from the committed position instead of starting over.
    let read = out.rows_new();
    assert!(
        read <= 200_000 - landed as u64 + 2000,
        "second run read {read} rows, {landed} had landed"
    );
    let v: serde_json::Value =
        serde_json::from_str(&env.pgtide(&["status", "--json"]).await.ok().stdout()).unwrap();
    assert_eq!(v[0]["last_run"]["outcome"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_is_down_fails_the_run_without_showing_the_password() {
    let env = orders_env().await;
    env.src
        .batch_execute("insert into orders (customer_id, amount) values (1, 1)")
        .await
        .unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.write_config(
        &env.src_url,
        &format!("postgres://loader:Sup3rSecret@127.0.0.1:{closed}/dwh"),
    );
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr().contains("job orders: dwh (127.0.0.1:"),
        "{}",
        out.stderr()
    );
    assert!(
        out.stderr().to_lowercase().contains("refused"),
        "{}",
        out.stderr()
    );
    assert!(!format!("{}{}", out.stdout(), out.stderr()).contains("Sup3rSecret"));

    env.write_config(
        &format!("postgres://app:Sup3rSecret@127.0.0.1:{closed}/shop"),
        &env.dwh_url,
    );
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr().contains("source shop (127.0.0.1:"),
        "{}",
        out.stderr()
    );
    assert!(!format!("{}{}", out.stdout(), out.stderr()).contains("Sup3rSecret"));
    let status = env.pgtide(&["status"]).await;
    assert!(!format!("{}{}", status.stdout(), status.stderr()).contains("Sup3rSecret"));

    // Back up: the run goes through and nothing was lost.
    env.write_config(&env.src_url, &env.dwh_url);
    env.pgtide(&["run-once"]).await.ok();
    assert_converged(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_or_stale_state_file_is_recovered_from_the_dwh() {
    let env = orders_env().await;
    env.src
        .batch_execute(
            "insert into orders (customer_id, amount) select 1, g from generate_series(1, 40) g",
        )
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    let stale = env.dir.path().join("stale.db");
    std::fs::copy(env.state(), &stale).unwrap();

    // Lost: the position comes back from the DWH, only new rows are read.
    for f in ["pgtide.db", "pgtide.db-wal", "pgtide.db-shm"] {
        let _ = std::fs::remove_file(env.dir.path().join("state").join(f));
    }
    env.src
        .batch_execute(
            "insert into orders (customer_id, amount) select 2, g from generate_series(1, 5) g",
        )
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_new(), 5, "{}", out.stdout());
    assert!(
        out.stderr().contains("recovered it from the dwh"),
        "{}",
        out.stderr()
    );
    assert_converged(&env).await;

    // Stale: an old copy of the file does not make pgtide reload or skip.
    for f in ["pgtide.db-wal", "pgtide.db-shm"] {
        let _ = std::fs::remove_file(env.dir.path().join("state").join(f));
    }
    std::fs::copy(&stale, env.state()).unwrap();
    env.src
        .batch_execute(
            "insert into orders (customer_id, amount) select 3, g from generate_series(1, 3) g",
        )
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_new(), 3, "{}", out.stdout());
    assert!(
        out.stderr().contains("state store was behind the dwh"),
        "{}",
        out.stderr()
    );
    assert_converged(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_that_is_not_unique_is_named_and_nothing_is_lost() {
    let env = orders_env().await;
    env.src
        .batch_execute(
            "insert into orders (customer_id, amount, updated_at) select 1, g, '2025-01-01' from generate_series(1, 5) g;
             create table tags (order_id bigint, tag text);
             insert into tags values (1, 'a'), (4, 'b'), (4, 'c');",
        )
        .await
        .unwrap();
    env.job(
        "orders",
        &ORDERS_JOB
            .replace("[[column]]\n    name = \"order_id\"", "[[join]]\n    table = \"tags\"\n    as = \"t\"\n    type = \"left\"\n    on = { \"o.id\" = \"t.order_id\" }\n    [[column]]\n    name = \"order_id\"")
            .replace("batch_size = 10", "batch_size = 2"),
    );
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("the view's key is not unique: (order_id)=(4) appears 2 times"),
        "{}",
        out.stderr()
    );
    // The batches before the bad one are committed and stay.
    assert_eq!(Env::count(&env.dwh, "dw.orders").await, 2);
    let v: serde_json::Value =
        serde_json::from_str(&env.pgtide(&["status", "--json"]).await.ok().stdout()).unwrap();
    assert_eq!(v[0]["last_run"]["outcome"], "failed");
    assert!(v[0]["last_run"]["error"]
        .as_str()
        .unwrap()
        .contains("not unique"));
    assert_eq!(v[0]["watermark"][1], "2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_held_by_another_pgtide_exits_3() {
    let env = orders_env().await;
    env.src
        .batch_execute("insert into orders (customer_id, amount) values (1, 1)")
        .await
        .unwrap();
    let holder = support::connect(&env.dwh_url).await;
    holder
        .execute(
            "select pg_advisory_lock(hashtextextended('pgtide job ' || 'orders', 0))",
            &[],
        )
        .await
        .unwrap();
    let out = env.pgtide(&["run-once", "orders"]).await;
    assert_eq!(out.code(), 3, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("job orders: is already running elsewhere"),
        "{}",
        out.stderr()
    );
    drop(holder);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    env.pgtide(&["run-once", "orders"]).await.ok();
    assert_converged(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_lists_every_problem() {
    let env = orders_env().await;
    env.pgtide(&["check"]).await.ok();
    // A config problem: exit 2, every problem with file and field.
    env.job("broken", "interval_secs = 0\nkey = []\nfrobnicate = 1\n");
    env.job("other", "interval_secs = 5\nkey = [\"x\"]\n[from]\ntable = \"t\"\n[[column]]\nname = \"x\"\nfrom = \"nope.x\"\n");
    let out = env.pgtide(&["check"]).await;
    assert_eq!(out.code(), 2);
    assert!(
        out.stderr()
            .contains("broken.toml: unknown field `frobnicate`"),
        "{}",
        out.stderr()
    );
    assert!(
        out.stderr()
            .contains("other.toml: column[0].from: \"nope\" is not an alias"),
        "{}",
        out.stderr()
    );
    std::fs::remove_file(env.dir.path().join("jobs/broken.toml")).unwrap();
    std::fs::remove_file(env.dir.path().join("jobs/other.toml")).unwrap();

    // Against the databases: a dropped column, a missing watermark column, an incompatible target.
    env.src
        .batch_execute("alter table orders drop column note")
        .await
        .unwrap();
    env.dwh
        .batch_execute("create schema dw; create table dw.orders (order_id text primary key)")
        .await
        .unwrap();
    let out = env.pgtide(&["check"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains("source column public.orders.note does not exist (was it dropped? then mark the column deleted = true)"),
        "{}",
        out.stderr()
    );
    env.src
        .batch_execute("alter table orders add column note text")
        .await
        .unwrap();
    let out = env.pgtide(&["check"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains(
            "target dw.orders: column order_id is text in the target but the view gives bigint"
        ),
        "{}",
        out.stderr()
    );
    // run-once refuses too, before writing anything.
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1);
    assert_eq!(Env::count(&env.dwh, "dw.orders").await, 0);
    // An unknown job on the command line.
    let out = env.pgtide(&["run-once", "nope"]).await;
    assert_eq!(out.code(), 2);
    assert!(
        out.stderr().contains("unknown job \"nope\""),
        "{}",
        out.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_first_load_that_meets_a_key_again_falls_back_to_upserts() {
    // The view keeps each customer's latest event: a key repeats in a later batch, which the
    // direct COPY of a first load cannot take; that batch and the rest are staged and upserted.
    let env = Env::new().await;
    env.src
        .batch_execute(
            "create table events (id bigint primary key, customer_id int not null, what text);
             insert into events values (1, 1, 'a'), (2, 2, 'b'), (3, 1, 'c'), (4, 3, 'd'), (5, 2, 'e'), (6, 4, 'f');",
        )
        .await
        .unwrap();
    env.job(
        "latest",
        r#"interval_secs = 5
        batch_size = 2
        key = ["customer_id"]
        [from]
        table = "events"
        [[column]]
        name = "customer_id"
        from = "events.customer_id"
        [[column]]
        name = "event_id"
        from = "events.id"
        [[column]]
        name = "what"
        from = "events.what"
        "#,
    );
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(out.stdout().contains("6 rows read"), "{}", out.stdout());
    assert!(
        out.stderr()
            .contains("a key is in the target already; staging and upserting"),
        "{}",
        out.stderr()
    );
    assert_eq!(
        Env::rows(
            &env.dwh,
            "select customer_id, event_id, what from dw.latest"
        )
        .await,
        vec!["(1,3,c)", "(2,5,e)", "(3,4,d)", "(4,6,f)"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_batches_copy_new_keys_straight_in_and_upsert_the_others() {
    let env = orders_env().await;
    env.src
        .batch_execute(
            "insert into orders (customer_id, amount)
             select 1 + g % 10, g from generate_series(1, 30) g",
        )
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    assert_converged(&env).await;
    // New rows (above the target's greatest key, and one below it that the target lacks)
    // among updates, in batches that hold both.
    env.dwh
        .batch_execute("delete from dw.orders where order_id = 7")
        .await
        .unwrap();
    env.src
        .batch_execute(
            "insert into orders (customer_id, amount) select 1, g from generate_series(100, 114) g;
             update orders set note = 'updated', updated_at = now() where id % 6 = 0 or id = 7;",
        )
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_new(), 15 + 5 + 1, "{}", out.stdout());
    assert_converged(&env).await;
    assert!(
        !out.stderr().contains("staging and upserting every row"),
        "the split held: {}",
        out.stderr()
    );
    // The target's greatest key now is one the source will not write again: rows below it
    // are upserted, whether the target has them or not.
    env.dwh
        .batch_execute("insert into dw.orders (order_id, amount) values (1000, 0)")
        .await
        .unwrap();
    env.src
        .batch_execute(
            "delete from orders where id = 9; insert into orders (id, customer_id, amount) values (9, 3, 9.99);
             update orders set note = 'again', updated_at = now() where id = 3;",
        )
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    env.dwh
        .batch_execute("delete from dw.orders where order_id = 1000")
        .await
        .unwrap();
    assert_converged(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_null_key_is_named_with_its_row() {
    let env = orders_env().await;
    env.src
        .batch_execute(
            "create table refs (order_id bigint, code text);
             insert into orders (customer_id, amount) values (1, 1), (2, 2);
             insert into refs values (1, 'A');",
        )
        .await
        .unwrap();
    env.job(
        "refs",
        r#"interval_secs = 5
        key = ["code"]
        watermark = ["id"]
        [from]
        table = "orders"
        as = "o"
        [[join]]
        table = "refs"
        as = "r"
        type = "left"
        on = { "o.id" = "r.order_id" }
        [[column]]
        name = "code"
        from = "r.code"
        [[column]]
        name = "order_id"
        from = "o.id"
        "#,
    );
    let out = env.pgtide(&["run-once", "refs"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains(r#"a view row has NULL in its key (code): {"code":null,"order_id":2}"#),
        "{}",
        out.stderr()
    );
    assert_eq!(
        Env::count(&env.dwh, "dw.refs").await,
        0,
        "the failed batch left nothing behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_with_a_null_in_the_watermark_are_never_read() {
    let env = Env::new().await;
    // The newest row's timestamp is NULL: a load that looked for its end by walking the
    // cursor backwards would meet it first.
    env.src
        .batch_execute(
            "create table events (id bigint primary key, at timestamptz);
             insert into events
             select g, case when g % 5 = 0 then null
                            else '2025-01-01'::timestamptz + g * interval '1 second' end
             from generate_series(1, 100) g;
             insert into events values (101, null);",
        )
        .await
        .unwrap();
    env.job(
        "events",
        r#"
    interval_secs = 60
    batch_size = 10
    key = ["id"]
    watermark = ["at", "id"]
    [from]
    table = "public.events"
    [[column]]
    name = "id"
    from = "events.id"
    [[column]]
    name = "at"
    from = "events.at"
"#,
    );
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_new(), 80, "{}", out.stdout());
    assert_eq!(Env::count(&env.dwh, "dw.events where at is null").await, 0);
    assert_eq!(Env::count(&env.dwh, "dw.events").await, 80);
    // A replay of everything reads the same rows.
    let out = env.pgtide(&["replay", "events"]).await.ok();
    assert!(
        out.stdout().contains("replayed 80 rows"),
        "{}",
        out.stdout()
    );
}
