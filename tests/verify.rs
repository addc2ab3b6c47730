//! `pgtide verify` against real databases, through the real binary: rows deleted, changed and
//! added in the DWH are counted and named, `--repair` fixes them, and only what the job has
//! reached is compared.

mod support;

use serde_json::Value;
use support::verify::{clean_with, counts, keys, lock_job, open_windows, strs, verify_with};
use support::{orders_notify_job, Env, Out};

/// Run `verify JOB --json ARGS...`; the exit code and the report.
async fn verify(env: &Env, job: &str, args: &[&str]) -> (i32, Value, Out) {
    verify_digest(env, job, args, false).await
}

/// `verify`, digesting rows by the md5 of their text (as with servers before PostgreSQL 14)
/// when `text` is set.
async fn verify_digest(env: &Env, job: &str, args: &[&str], text: bool) -> (i32, Value, Out) {
    let set = text.then_some(pgtide::verify::TEXT_DIGEST);
    verify_with(env, job, args, set).await
}

/// How many keys a verify read again at the end (from its log): those the digests flagged.
fn reread(out: &Out) -> u64 {
    let log = out.stderr();
    log.split("may differ again")
        .nth(1)
        .and_then(|l| l.split("keys=").nth(1))
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no count of keys read again in:\n{log}"))
}

async fn clean(env: &Env, job: &str, args: &[&str]) -> Value {
    clean_digest(env, job, args, false).await
}

async fn clean_digest(env: &Env, job: &str, args: &[&str], text: bool) -> Value {
    let set = text.then_some(pgtide::verify::TEXT_DIGEST);
    clean_with(env, job, args, set).await
}

/// Many types whose text must be the same on both sides, a join and an expression.
const ORDERS: &str = r#"
    create table customers (id bigint primary key, name text not null);
    create table orders (
        id bigint primary key,
        customer_id bigint,
        amount numeric(12, 2) not null,
        note text,
        ratio float8,
        paid boolean,
        tags text[],
        payload jsonb,
        at timestamptz not null default '2025-01-01 00:00:00+00',
        updated_at timestamptz not null default now()
    );
    create index on orders (updated_at, id);
    insert into customers select g, 'customer "' || g || '", a' from generate_series(1, 5) g;
    insert into orders (id, customer_id, amount, note, ratio, paid, tags, payload, at)
    select g, 1 + g % 5, g * 1.25, case when g % 3 = 0 then null else 'note, (' || g || ')' end,
           g / 7.0, g % 2 = 0, array['a' || g, 'b "x"'], jsonb_build_object('n', g, 's', 'x y'),
           timestamptz '2025-01-01 00:00:00+00' + make_interval(secs => g * 0.001)
    from generate_series(1, 40) g;"#;

fn orders_job(watermark: &str, extra: &str) -> String {
    format!(
        r#"
        interval_secs = 60
        batch_size = 7
        key = ["order_id"]
        {watermark}
        {extra}
        [from]
        table = "public.orders"
        as = "o"
        [[join]]
        table = "public.customers"
        as = "c"
        type = "left"
        on = {{ "o.customer_id" = "c.id" }}
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
        [[column]]
        name = "ratio"
        from = "o.ratio"
        [[column]]
        name = "paid"
        from = "o.paid"
        [[column]]
        name = "tags"
        from = "o.tags"
        [[column]]
        name = "payload"
        from = "o.payload"
        [[column]]
        name = "at"
        from = "o.at"
        "#
    )
}

/// Delete, change and add DWH rows of `dw.orders`.
async fn damage(env: &Env) {
    env.dwh
        .batch_execute(
            "delete from dw.orders where order_id in (3, 17);
             update dw.orders set amount = amount + 1 where order_id = 5;
             update dw.orders set note = null where order_id = 8;
             insert into dw.orders (order_id, customer, amount) values (1000, 'nobody', 1), (1001, 'nobody', 2);",
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn poll_job_missing_and_different_rows_are_named_and_repaired() {
    let env = Env::new().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job("orders", &orders_job("", ""));
    // Before the first run there is no target.
    let out = env.pgtide(&["verify", "orders"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr().contains("target dw.orders does not exist"),
        "{}",
        out.stderr()
    );
    env.pgtide(&["run-once", "orders"]).await.ok();
    let report = clean(&env, "orders", &[]).await;
    assert_eq!(report["compared"], 40, "{report}");
    assert_eq!(report["extra_counted"], false, "{report}");
    let human = env.pgtide(&["verify", "orders"]).await.ok().stdout();
    assert!(
        human.contains("target dw.orders matches the view (40 rows compared"),
        "{human}"
    );

    damage(&env).await;
    // Rows past the watermark are not the job's yet: not missing.
    env.src
        .batch_execute("insert into orders (id, customer_id, amount) select g, 1, g from generate_series(41, 60) g")
        .await
        .unwrap();
    let (code, report, _) = verify(&env, "orders", &[]).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(
        counts(&report),
        (2, 2, 0),
        "poll jobs count no extra rows: {report}"
    );
    assert_eq!(keys(&report, "missing"), strs(&["17", "3"]));
    assert_eq!(keys(&report, "different"), strs(&["5", "8"]));
    assert_eq!(report["job"], "orders");
    let out = env.pgtide(&["verify", "orders"]).await;
    assert_eq!(out.code(), 1);
    assert!(
        out.stdout()
            .contains("differs from the view: 2 missing, 2 different, 0 extra"),
        "{}",
        out.stdout()
    );
    assert!(out.stdout().contains("  missing: "), "{}", out.stdout());
    assert!(
        out.stderr()
            .contains("job orders: the target differs from the view"),
        "{}",
        out.stderr()
    );

    // --from/--to: only the view rows whose watermark lies in (from, to].
    let (_, r, _) = verify(&env, "orders", &["--from", "10"]).await;
    assert_eq!(counts(&r), (1, 0, 0), "{r}");
    assert_eq!(keys(&r, "missing"), strs(&["17"]));
    let (_, r, _) = verify(&env, "orders", &["--to", "5"]).await;
    assert_eq!(counts(&r), (1, 1, 0), "{r}");
    assert_eq!(keys(&r, "different"), strs(&["5"]));
    let (_, r, _) = verify(&env, "orders", &["--from", "3", "--to", "17"]).await;
    assert_eq!(counts(&r), (1, 2, 0), "(3, 17] holds 17 but not 3: {r}");
    assert_eq!(r["compared"], 14, "{r}");
    let (_, r, _) = verify(&env, "orders", &["--from", "40", "--to", "60"]).await;
    assert_eq!(
        (counts(&r), r["compared"].as_u64()),
        ((0, 0, 0), Some(0)),
        "rows past the watermark are not compared: {r}"
    );
    let out = env.pgtide(&["verify", "orders", "--from", "abc"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("--from"), "{}", out.stderr());

    let (code, r, out) = verify(&env, "orders", &["--repair"]).await;
    assert_eq!(code, 0, "{r}\n{}", out.stderr());
    assert_eq!(counts(&r["repaired"]), (2, 2, 0), "{r}");
    assert_eq!(r["repaired"]["written"], 4, "{r}");
    assert_eq!(keys(&r["repaired"], "missing"), strs(&["17", "3"]));
    clean(&env, "orders", &[]).await;
    // The repair rewrote exactly those rows: the extra rows stay, the rows past the
    // watermark are still the next run's.
    assert_eq!(
        Env::count(&env.dwh, "dw.orders where order_id >= 41").await,
        2
    );
    env.pgtide(&["run-once", "orders"]).await.ok();
    let r = clean(&env, "orders", &[]).await;
    assert_eq!(r["compared"], 60, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_an_open_window_will_reread_are_not_counted_until_it_closes() {
    let env = Env::new().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job("orders", &orders_job("", ""));
    // A session whose transaction started before the run's read keeps the window open (with
    // none, the read would settle it at once).
    let holder = support::connect(&env.src_url).await;
    holder.batch_execute("begin; select now()").await.unwrap();
    env.pgtide(&["run-once", "orders"]).await.ok();
    // Below the `id` watermark, inside the window the run left open: its recheck re-reads it.
    env.src
        .batch_execute("update orders set amount = 1000 where id = 6")
        .await
        .unwrap();
    assert!(
        open_windows(&env, "orders").await > 0,
        "the run leaves its window open"
    );
    clean(&env, "orders", &[]).await;
    holder.batch_execute("commit").await.unwrap();
    env.pgtide(&["run-once", "orders"]).await.ok();
    assert_eq!(
        open_windows(&env, "orders").await,
        0,
        "the recheck closed the window"
    );
    assert_eq!(
        Env::rows(&env.dwh, "select amount from dw.orders where order_id = 6").await,
        strs(&["(1000.00)"])
    );
    clean(&env, "orders", &[]).await;
    // With the window closed, an `id` watermark never sees this update: verify does.
    env.src
        .batch_execute("update orders set amount = 2000 where id = 6")
        .await
        .unwrap();
    let (code, r, _) = verify(&env, "orders", &[]).await;
    assert_eq!((code, counts(&r)), (1, (0, 1, 0)), "{r}");
    assert_eq!(keys(&r, "different"), strs(&["6"]));
    let (code, r, _) = verify(&env, "orders", &["--repair"]).await;
    assert_eq!(code, 0, "{r}");
    assert_eq!(
        Env::rows(&env.dwh, "select amount from dw.orders where order_id = 6").await,
        strs(&["(2000.00)"])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn composite_watermark_rows_changed_after_the_run_are_not_counted() {
    let env = Env::new().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job(
        "orders",
        &orders_job(r#"watermark = ["updated_at", "id"]"#, ""),
    );
    env.src
        .batch_execute("update orders set updated_at = timestamptz '2025-02-01 00:00:00+00' + make_interval(days => (id % 4)::int)")
        .await
        .unwrap();
    env.pgtide(&["run-once", "orders"]).await.ok();
    clean(&env, "orders", &[]).await;
    damage(&env).await;
    // A source row changed after the run moves past the watermark: not compared, although the
    // target still holds its old version.
    env.src
        .batch_execute(
            "update orders set amount = 999, updated_at = '2026-01-01' where id in (9, 17)",
        )
        .await
        .unwrap();
    let (code, r, _) = verify(&env, "orders", &[]).await;
    assert_eq!(code, 1);
    assert_eq!(counts(&r), (1, 2, 0), "{r}");
    assert_eq!(keys(&r, "missing"), strs(&["3"]));
    assert_eq!(keys(&r, "different"), strs(&["5", "8"]));
    assert_eq!(r["compared"], 38, "{r}");
    // A composite value on the command line: updated_at of day 1 (ids 1, 5, 9, ...).
    let (_, r, _) = verify(
        &env,
        "orders",
        &[
            "--from",
            r#"["2025-02-02 00:00:00+00", 0]"#,
            "--to",
            r#"["2025-02-02 00:00:00+00", 1000]"#,
        ],
    )
    .await;
    assert_eq!(counts(&r), (0, 1, 0), "{r}");
    assert_eq!(keys(&r, "different"), strs(&["5"]));
    let out = env
        .pgtide(&["verify", "orders", "--to", r#"["2025-02-02"]"#])
        .await;
    assert_eq!(out.code(), 2, "{}", out.stderr());

    let (code, r, _) = verify(&env, "orders", &["--repair"]).await;
    assert_eq!(code, 0, "{r}");
    assert_eq!(counts(&r["repaired"]), (1, 2, 0), "{r}");
    clean(&env, "orders", &[]).await;
    env.pgtide(&["run-once", "orders"]).await.ok();
    let r = clean(&env, "orders", &[]).await;
    assert_eq!(r["compared"], 40, "{r}");
}

const SHOP: &str = "
    create table customers (id bigint primary key, name text not null);
    create table orders (id bigint primary key, customer_id bigint, amount numeric(10, 2), note text);
    insert into customers select g, 'customer ' || g from generate_series(1, 5) g;
    insert into orders select g, 1 + g % 5, g, null from generate_series(1, 30) g;";

async fn notify_env(on_delete: &str) -> Env {
    let env = Env::new().await;
    env.src.batch_execute(SHOP).await.unwrap();
    env.job("orders", &orders_notify_job("left", on_delete));
    env.pgtide(&["install", "orders"]).await.ok();
    env.pgtide(&["run-once", "orders"]).await.ok();
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_job_that_deletes_counts_extra_rows_and_skips_waiting_events() {
    let env = notify_env("delete").await;
    let r = clean(&env, "orders", &[]).await;
    assert_eq!(r["extra_counted"], true, "{r}");
    assert_eq!(r["compared"], 30, "{r}");
    env.dwh
        .batch_execute(
            "delete from dw.orders where order_id in (4, 12);
             update dw.orders set customer = 'someone else' where order_id = 7;
             insert into dw.orders (order_id, customer, amount) values (500, 'x', 1), (501, 'y', 2), (502, 'z', 3);",
        )
        .await
        .unwrap();
    // Changes with events still waiting are the job's next drain, not differences: a deleted
    // source row (its target row is still there), a changed one, and a joined-table change
    // (customer 3's orders: 2, 7, 12, ...) .
    env.src
        .batch_execute(
            "delete from orders where id = 20;
             update orders set note = 'changed' where id = 21;
             update customers set name = 'renamed' where id = 3;",
        )
        .await
        .unwrap();
    let (code, r, _) = verify(&env, "orders", &[]).await;
    assert_eq!(code, 1);
    assert_eq!(counts(&r), (1, 0, 3), "{r}");
    assert_eq!(
        keys(&r, "missing"),
        strs(&["4"]),
        "12 and 7 belong to customer 3, whose change waits"
    );
    assert_eq!(keys(&r, "extra"), strs(&["500", "501", "502"]));
    // With a range, rows not in the view have no cursor: extra rows are not counted.
    let (_, r, _) = verify(&env, "orders", &["--to", "10"]).await;
    assert_eq!(counts(&r), (1, 0, 0), "{r}");
    assert_eq!(r["extra_counted"], false, "{r}");

    let (code, r, out) = verify(&env, "orders", &["--repair"]).await;
    assert_eq!(code, 0, "{r}\n{}", out.stderr());
    assert_eq!(counts(&r["repaired"]), (1, 0, 3), "{r}");
    assert_eq!(r["repaired"]["deleted"], 3, "{r}");
    assert_eq!(
        Env::count(&env.dwh, "dw.orders where order_id >= 500").await,
        0
    );
    assert_eq!(
        Env::count(&env.src, "pgtide.orders_events").await,
        3,
        "a repair leaves the events to the job"
    );
    // The drain brings the rest; after it everything compares.
    env.pgtide(&["run-once", "orders"]).await.ok();
    let r = clean(&env, "orders", &[]).await;
    assert_eq!(r["compared"], 29, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_deletes_marked_rows_in_the_view_differ_and_unmarked_extra_rows_count() {
    let env = notify_env("soft").await;
    env.src
        .batch_execute("delete from orders where id = 30")
        .await
        .unwrap();
    env.pgtide(&["run-once", "orders"]).await.ok();
    assert_eq!(
        Env::count(&env.dwh, "dw.orders where _pgtide_deleted").await,
        1
    );
    clean(&env, "orders", &[]).await;
    env.dwh
        .batch_execute(
            "update dw.orders set _pgtide_deleted = true where order_id = 6;
             insert into dw.orders (order_id, customer, _pgtide_deleted) values (600, 'gone', true), (601, 'stray', false);",
        )
        .await
        .unwrap();
    let (code, r, _) = verify(&env, "orders", &[]).await;
    assert_eq!(code, 1);
    assert_eq!(counts(&r), (0, 1, 1), "{r}");
    assert_eq!(keys(&r, "different"), strs(&["6"]));
    assert_eq!(keys(&r, "extra"), strs(&["601"]));
    let (code, r, _) = verify(&env, "orders", &["--repair"]).await;
    assert_eq!(code, 0, "{r}");
    assert_eq!(counts(&r["repaired"]), (0, 1, 1), "{r}");
    assert_eq!(
        Env::rows(
            &env.dwh,
            "select order_id, _pgtide_deleted from dw.orders where order_id in (6, 30, 600, 601)"
        )
        .await,
        strs(&["(30,t)", "(6,f)", "(600,t)", "(601,t)"])
    );
    clean(&env, "orders", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mixed_case_text_keys_compare_whatever_the_collations() {
    mixed_case_text_keys(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mixed_case_text_keys_compare_by_text_digests_too() {
    mixed_case_text_keys(true).await;
}

async fn mixed_case_text_keys(text: bool) {
    let env = Env::new().await;
    let icu: bool = env
        .src
        .query_one(
            "select exists (select from pg_collation where collname = 'und-x-icu')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(icu, "the test server has no ICU collations");
    // The source sorts its keys by ICU rules ('apple' < 'Apple' < 'banana'), the DWH by bytes
    // ('Apple' < 'Zebra' < 'apple'): several thousand keys spread over several buckets. Its
    // labels compare without case, the DWH's with.
    env.src
        .batch_execute(
            r#"create collation nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
               create table items (code text collate "und-x-icu" primary key, qty int, label text collate nocase);
               insert into items
               select case g % 3 when 0 then upper(h) when 1 then lower(h) else initcap(h) end || g, g, 'L' || g
               from (select g, substr(md5(g::text), 1, 6) as h from generate_series(1, 4000) g) x;
               insert into items values ('Apple', 1, 'a'), ('apple', 2, 'b'), ('APPLE', 3, 'c'),
                   ('Äpfel', 4, 'd'), ('äpfel', 5, 'e'), ('Zebra', 6, 'f'), ('zebra', 7, 'g'),
                   ('a b', 8, 'h'), ('a"b', 9, 'i'), ('a,b', 10, 'j');"#,
        )
        .await
        .unwrap();
    env.job(
        "items",
        r#"interval_secs = 60
        batch_size = 500
        key = ["code"]
        [from]
        table = "items"
        [[column]]
        name = "code"
        from = "items.code"
        [[column]]
        name = "qty"
        from = "items.qty"
        [[column]]
        name = "label"
        from = "items.label"
        "#,
    );
    env.pgtide(&["run-once", "items"]).await.ok();
    // Other tests' transactions on the shared server can keep the run's window open, and verify
    // leaves the rows an open window will re-read uncounted: run until it has closed.
    for _ in 0..60 {
        let st = env
            .pgtide(&["status", "--json", "items"])
            .await
            .ok()
            .stdout();
        let v: serde_json::Value = serde_json::from_str(&st).unwrap();
        if v[0]["open_windows"].as_u64() == Some(0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        env.pgtide(&["run-once", "items"]).await.ok();
    }
    let r = clean_digest(&env, "items", &[], text).await;
    assert_eq!(r["compared"], 4010, "{r}");
    env.dwh
        .batch_execute(
            r#"delete from dw.items where code in ('apple', 'Äpfel', 'a"b');
               update dw.items set qty = 0 where code in ('APPLE', 'zebra');
               update dw.items set label = null where code = 'a,b';
               update dw.items set label = upper(label) where code = 'Zebra';"#,
        )
        .await
        .unwrap();
    let (code, r, out) = verify_digest(&env, "items", &[], text).await;
    assert_eq!(code, 1);
    assert_eq!(counts(&r), (3, 4, 0), "{r}");
    // Digests are taken in bytes, not in the source's collations: no other row is flagged.
    assert_eq!(reread(&out), 7, "{}", out.stderr());
    assert_eq!(keys(&r, "missing"), strs(&["a\"b", "apple", "Äpfel"]));
    assert_eq!(
        keys(&r, "different"),
        strs(&["APPLE", "Zebra", "a,b", "zebra"])
    );
    // The range is the source's cursor, in the source's collation: ICU puts 'äpfel' just before
    // 'Äpfel' (bytes put it after).
    let (_, r, _) = verify_digest(&env, "items", &["--from", "äpfel", "--to", "Äpfel"], text).await;
    assert_eq!(
        (counts(&r), r["compared"].as_u64()),
        ((1, 0, 0), Some(1)),
        "{r}"
    );
    assert_eq!(keys(&r, "missing"), strs(&["Äpfel"]), "{r}");
    let (code, r, _) = verify_digest(&env, "items", &["--repair"], text).await;
    assert_eq!(code, 0, "{r}");
    assert_eq!(counts(&r["repaired"]), (3, 4, 0), "{r}");
    clean_digest(&env, "items", &[], text).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn values_are_compared_as_the_job_writes_them() {
    values_as_written(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn values_are_compared_as_the_job_writes_them_by_text_digests_too() {
    values_as_written(true).await;
}

async fn values_as_written(text: bool) {
    let env = Env::new().await;
    env.src
        .batch_execute(
            r#"create table events (id int primary key, status int, payload jsonb, legacy text);
               insert into events values
                 (1, 1, '{"n": 5, "ok": true, "at": "2025-01-31T12:00:00Z"}', 'x'),
                 (2, 2, '{"n": "abc", "ok": "maybe", "at": "soon"}', 'y'),
                 (3, 9, '{"n": 1.5, "ok": false, "at": null}', null),
                 (4, null, null, null);"#,
        )
        .await
        .unwrap();
    let job = |deleted: bool| {
        format!(
            r#"interval_secs = 60
            key = ["id"]
            [from]
            table = "events"
            as = "e"
            [[column]]
            name = "id"
            from = "e.id"
            type = "bigint"
            [[column]]
            name = "status"
            from = "e.status"
            map = {{ "1" = "created", "2" = "paid" }}
            [[column]]
            name = "n"
            from = "e.payload"
            json = "n"
            type = "integer"
            on_error = "null"
            [[column]]
            name = "ok"
            from = "e.payload"
            json = "ok"
            type = "boolean"
            on_error = "null"
            [[column]]
            name = "at"
            from = "e.payload"
            json = "at"
            type = "timestamptz"
            on_error = "null"
            [[column]]
            name = "legacy"
            {}
            "#,
            if deleted {
                "type = \"text\"\ndeleted = true"
            } else {
                "from = \"e.legacy\""
            }
        )
    };
    env.job("events", &job(false));
    env.pgtide(&["run-once", "events"]).await.ok();
    assert_eq!(
        Env::count(&env.dwh, "dw.events where n is null").await,
        3,
        "abc and 1.5 do not cast to integer"
    );
    clean_digest(&env, "events", &[], text).await;
    // A column marked deleted keeps its old values in the target: no difference.
    env.job("events", &job(true));
    clean_digest(&env, "events", &[], text).await;
    env.dwh
        .batch_execute(
            "update dw.events set n = 6 where id = 1;
             update dw.events set ok = true where id = 2;
             update dw.events set at = '2025-01-31 12:00:01+00' where id = 1;
             update dw.events set status = 'created' where id = 3;
             update dw.events set legacy = 'whatever' where id = 4;",
        )
        .await
        .unwrap();
    let (code, r, _) = verify_digest(&env, "events", &[], text).await;
    assert_eq!(code, 1);
    assert_eq!(counts(&r), (0, 3, 0), "{r}");
    assert_eq!(keys(&r, "different"), strs(&["1", "2", "3"]));
    let (code, r, _) = verify_digest(&env, "events", &["--repair"], text).await;
    assert_eq!(code, 0, "{r}");
    assert_eq!(
        Env::rows(
            &env.dwh,
            "select id, status, n, ok, at, legacy from dw.events"
        )
        .await,
        strs(&[
            // The job writes a deleted column as NULL when it rewrites a row.
            "(1,created,5,t,\"2025-01-31 12:00:00+00\",)",
            "(2,paid,,,,)",
            "(3,,,f,,)",
            "(4,,,,,whatever)",
        ])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_config_locks_and_unknown_jobs() {
    let env = Env::new().await;
    env.src.batch_execute(SHOP).await.unwrap();
    env.job("orders", &orders_notify_job("left", "delete"));
    env.pgtide(&["install", "orders"]).await.ok();
    env.pgtide(&["run-once", "orders"]).await.ok();
    // Another pgtide holds the job: a plain comparison works, a repair exits 3.
    let (holder, held) = lock_job(&env.dwh_url, "orders").await;
    assert!(held);
    clean(&env, "orders", &[]).await;
    let out = env.pgtide(&["verify", "orders", "--repair"]).await;
    assert_eq!(out.code(), 3, "{}", out.stderr());
    assert!(
        out.stderr().contains("already running elsewhere"),
        "{}",
        out.stderr()
    );
    drop(holder);

    let out = env.pgtide(&["verify", "nosuchjob"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains("unknown job \"nosuchjob\""),
        "{}",
        out.stderr()
    );
    env.job(
        "broken",
        "key = [\"id\"]\nbogus = 1\n[from]\ntable = \"orders\"\n",
    );
    let out = env.pgtide(&["verify", "orders"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("broken.toml"), "{}", out.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_changing_while_the_daemon_follows_them_are_not_reported() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "create table hot (id int primary key, v int not null);
             insert into hot select g, 0 from generate_series(1, 3000) g;",
        )
        .await
        .unwrap();
    env.job(
        "hot",
        "mode = \"notify\"\nbatch_size = 500\nkey = [\"id\"]\n[from]\ntable = \"hot\"\n[[column]]\nname = \"id\"\nfrom = \"hot.id\"\n[[column]]\nname = \"v\"\nfrom = \"hot.v\"\n",
    );
    env.pgtide(&["install", "hot"]).await.ok();
    env.pgtide(&["run-once", "hot"]).await.ok();
    let mut daemon = env
        .command(&["run"])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Single-row transactions as fast as one session goes: updates, inserts, deletes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let src = support::connect(&env.src_url).await;
        tokio::spawn(async move {
            let mut n: i32 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let q = match n % 4 {
                    0 => "insert into hot values (3000 + $1, 0)",
                    1 => "delete from hot where id = 1 + ($1 * 7) % 3000",
                    _ => "update hot set v = v + 1 where id = 1 + ($1 * 13) % 3000",
                };
                src.execute(q, &[&n]).await.unwrap();
            }
            n
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // Keys read again at the end: rows that looked different mid-flight. Verify until some
    // were (every run must be clean), at least 3 times.
    let mut reread_keys = 0;
    let mut runs = 0;
    while runs < 3 || (reread_keys == 0 && runs < 30) {
        let (code, r, out) = verify(&env, "hot", &[]).await;
        assert_eq!((code, counts(&r)), (0, (0, 0, 0)), "{r}\n{}", out.stderr());
        reread_keys += reread(&out);
        runs += 1;
    }
    assert!(
        reread_keys > 0,
        "no row was in flight while verify ran {runs} times: the test proves nothing"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 100, "the writer wrote {writes} times only");
    unsafe { libc::kill(daemon.id().unwrap() as i32, libc::SIGTERM) };
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn composite_keys_are_named_by_all_their_values() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "create table lines (order_id int, line int, sku text, qty int, primary key (order_id, line));
             insert into lines select o, l, 'SKU ' || o || '/' || l, o * l from generate_series(1, 30) o, generate_series(1, 3) l;",
        )
        .await
        .unwrap();
    let job = |mode: &str| {
        format!(
            "{mode}\nbatch_size = 20\nkey = [\"order_id\", \"line\"]\nwatermark = [\"order_id\", \"line\"]\n[from]\ntable = \"lines\"\nas = \"l\"\n\
             [[column]]\nname = \"order_id\"\nfrom = \"l.order_id\"\n[[column]]\nname = \"line\"\nfrom = \"l.line\"\n\
             [[column]]\nname = \"sku\"\nfrom = \"l.sku\"\n[[column]]\nname = \"qty\"\nfrom = \"l.qty\"\n"
        )
    };
    env.job("lines", &job("interval_secs = 60"));
    env.job("live", &job("mode = \"notify\"\ntarget = \"lines_live\""));
    env.pgtide(&["install", "live"]).await.ok();
    env.pgtide(&["run-once"]).await.ok();
    for (job, table) in [("lines", "dw.lines"), ("live", "dw.lines_live")] {
        clean(&env, job, &[]).await;
        env.dwh
            .batch_execute(&format!(
                "delete from {table} where (order_id, line) in ((2, 1), (20, 3));
                 update {table} set qty = -1 where (order_id, line) = (3, 2);
                 insert into {table} (order_id, line, sku) values (99, 1, 'stray');"
            ))
            .await
            .unwrap();
        let (code, r, _) = verify(&env, job, &[]).await;
        assert_eq!(code, 1);
        assert_eq!(keys(&r, "missing"), strs(&["20|3", "2|1"]), "{r}");
        assert_eq!(keys(&r, "different"), strs(&["3|2"]), "{r}");
        let extra: &[&str] = if job == "live" { &["99|1"] } else { &[] };
        assert_eq!(keys(&r, "extra"), strs(extra), "{r}");
        let (_, r, _) = verify(&env, job, &["--from", "[3, 1]", "--to", "[20, 3]"]).await;
        assert_eq!(counts(&r), (1, 1, 0), "(3,1) < (3,2) .. (20,3]: {r}");
        let (code, r, _) = verify(&env, job, &["--repair"]).await;
        assert_eq!(code, 0, "{r}");
        clean(&env, job, &[]).await;
    }
}
