//! `pgtide verify` with a ClickHouse DWH, end to end: a real PostgreSQL source, a real
//! ClickHouse server (Debian's `clickhouse-server`), the real binary. Values of every mapped
//! type compare equal as ClickHouse prints them back; rows damaged in ClickHouse are counted,
//! named and repaired; only what the job has reached is compared.

mod support;

use serde_json::Value;
use support::clickhouse::{self as ch, env, ORDERS, POLL_JOB};
use support::verify::{clean_with, counts, keys, lock_job, open_windows, strs, verify_with};
use support::{Env, Out};

/// Run `verify JOB --json ARGS...`; the exit code and the report.
async fn verify(env: &Env, job: &str, args: &[&str]) -> (i32, Value, Out) {
    verify_rereading(env, job, args, false).await
}

/// `verify`, its second pass reading the source again (as when the first pass's file of source
/// rows grew too large) when `reread` is set.
async fn verify_rereading(env: &Env, job: &str, args: &[&str], reread: bool) -> (i32, Value, Out) {
    let set = reread.then_some(pgtide::verify::REREAD_SOURCE);
    verify_with(env, job, args, set).await
}

/// Verify finds nothing; the report.
async fn clean(env: &Env, job: &str, args: &[&str]) -> Value {
    clean_with(env, job, args, None).await
}

/// Write a newer version of the row `id` of `db.table` in ClickHouse with column `col` set to
/// `expr` (a ClickHouse expression), as a job never would.
async fn damage(db: &str, table: &str, id: i64, col: &str, expr: &str) {
    let cols = ch::query(&format!(
        "select name from system.columns where database = '{db}' and table = '{table}' format TabSeparated"
    ))
    .await;
    let names: Vec<&str> = cols.lines().collect();
    assert!(names.contains(&col), "no column {col} in {names:?}");
    let select: Vec<String> = names
        .iter()
        .map(|&c| match c {
            _ if c == col => expr.to_string(),
            "_pgtide_version" => "_pgtide_version + 1".to_string(),
            _ => format!("`{c}`"),
        })
        .collect();
    let quoted: Vec<String> = names.iter().map(|c| format!("`{c}`")).collect();
    ch::execute(&format!(
        "insert into {db}.{table} ({}) select {} from {db}.{table} final where id = {id}",
        quoted.join(", "),
        select.join(", ")
    ))
    .await;
}

/// Every type the ClickHouse sink maps (src/sink/clickhouse/types.rs), with the values that
/// ClickHouse prints differently from the source: floats, quotes, backslashes and control
/// characters in text and in arrays, timestamps with fractions, NULLs. (No NaN in a float
/// array: ClickHouse 18.16 reads `nan` there as a misspelt NULL and refuses the batch.)
const TYPES: &str = r#"
    create type mood as enum ('sad', 'ok', 'happy');
    create table t (id integer primary key, s smallint, b bigint, r real, d double precision,
      n numeric(12, 4), nu numeric, flag boolean, day date, at timestamptz, local timestamp,
      u uuid, tx text, vc varchar(10), j jsonb, ia integer[], ta text[], fa float8[], m mood,
      iv interval);
    insert into t values
     (1, -3, 9007199254740993, 1.5, 0.1, 12345678.1234, 3.14159265358979323846, true,
      '2025-01-31', '2025-01-31 12:34:56.789+02', '2025-01-31 01:02:03', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
      e'tab\there\nnew ''q'' \\ back', 'short', '{"k": [1, "x"]}', '{1,NULL,3}', '{"a b","it''s",NULL}',
      '{0.1,-Infinity,1e300}', 'happy', '1 day 02:00:00'),
     (2, null, null, 'NaN', '-Infinity', null, null, false, null, null, null, null, null, null, null,
      null, '{}', null, null, null),
     (3, 32767, -9223372036854775808, 3.4028235e38, 1e-300, -0.0001, 'NaN', null, '2105-12-31',
      '1999-12-31 23:59:59.999999+00', '2000-02-29 00:00:00.5', null, e'\\N', e'\\', e'{"q": "it''s \\"x\\""}',
      '{}', array[e'tab\there', e'back\\slash', 'quote''d', 'NULL', '', 'a,b]'], '{-0,1.5}', 'sad', '-1 mons'),
     (4, 0, 0, -0, -0, 0, '0.10', true, '1970-01-02', '2038-01-19 03:14:07+00', '1970-01-02 00:00:00',
      '00000000-0000-0000-0000-000000000000', '', 'x', 'null', '{-2147483648}', '{NULL}', '{NULL}', 'ok', '0');
    insert into t (id, r, d, n, tx, ta, fa)
    select g, g / 3.0, g / 7.0, g / 9.0, 'row ' || g || e'\t' || repeat('é', g % 5),
           array['x' || g, e'y\\' || g], array[g / 11.0]
    from generate_series(5, 300) g;"#;

/// A job of `t`: every column as it is, and two with a type of their own.
fn types_job() -> String {
    let columns = support::columns(
        "t",
        &[
            "id", "s", "b", "r", "d", "n", "nu", "flag", "day", "at", "local", "u", "tx", "vc",
            "j", "ia", "ta", "fa", "m", "iv",
        ],
    );
    format!(
        r#"
    interval_secs = 60
    batch_size = 100
    key = ["id"]
    [from]
    table = "t"
    {columns}
    [[column]]
    name = "at_text"
    from = "t.at"
    type = "Nullable(String)"
    [[column]]
    name = "d32"
    from = "t.d"
    type = "Nullable(Float32)"
    "#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mapped_type_compares_equal_after_a_load() {
    let (env, db) = env().await;
    env.src.batch_execute(TYPES).await.unwrap();
    env.job("t", &types_job());
    env.pgtide(&["run-once"]).await.ok();
    let r = clean(&env, "t", &[]).await;
    assert_eq!(r["compared"], 300, "{r}");
    assert_eq!(r["extra_counted"], false, "{r}");
    // The comparison is not blind: a changed value of each kind of column is found.
    let changes = [
        (5, "r", "toFloat32(1.6667)"),
        (6, "d", "6 / 7 + 1e-12"),
        (1, "tx", "'tab\\there\\nnew \\'q\\' \\\\ bac'"),
        (
            3,
            "ta",
            "['tab\\there', 'back\\\\slash', 'quote\\'d', NULL, '', 'a,b]']",
        ),
        (4, "local", "toDateTime('1970-01-02 00:00:01', 'UTC')"),
        (2, "fa", "[toNullable(nan)]"),
        (8, "n", "toDecimal64(1, 4)"),
        (9, "at_text", "'2025'"),
    ];
    for (id, col, expr) in changes {
        damage(&db, "t", id, col, expr).await;
    }
    // ClickHouse reads decimal text to a float only within a unit or two in the last place:
    // floats that close are equal (10 / 7.0 is 1.4285714285714286 on the source).
    damage(&db, "t", 10, "d", "1.4285714285714288").await;
    let (code, r, out) = verify(&env, "t", &[]).await;
    assert_eq!(code, 1, "{r}\n{}", out.stderr());
    assert_eq!(counts(&r), (0, 8, 0), "{r}");
    assert_eq!(
        keys(&r, "different"),
        strs(&["1", "2", "3", "4", "5", "6", "8", "9"])
    );
    let (code, r, out) = verify(&env, "t", &["--repair"]).await;
    assert_eq!(code, 0, "{r}\n{}", out.stderr());
    assert_eq!(counts(&r["repaired"]), (0, 8, 0), "{r}");
    clean(&env, "t", &[]).await;
}

/// Mark the row `id` of `db.orders` deleted with a newer version, as a job never would.
async fn mark_deleted(db: &str, id: i64) {
    ch::execute(&format!(
        "insert into {db}.orders (id, amount, note, _pgtide_version, _pgtide_deleted)
         select id, amount, note, _pgtide_version + 1, 1 from {db}.orders final where id = {id}"
    ))
    .await;
}

/// Add a row the view does not have, newer than every version written.
async fn stray(db: &str, id: i64) {
    ch::execute(&format!(
        "insert into {db}.orders (id, amount, note, _pgtide_version, _pgtide_deleted)
         select {id}, 1, 'stray', max(_pgtide_version) + 1, 0 from {db}.orders"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poll_job_damaged_rows_are_named_and_repaired() {
    let (env, db) = env().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job("orders", POLL_JOB);
    // Before the first run there is no target.
    let out = env.pgtide(&["verify", "orders"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr().contains("does not exist in the dwh"),
        "{}",
        out.stderr()
    );
    env.pgtide(&["run-once"]).await.ok();
    let r = clean(&env, "orders", &[]).await;
    assert_eq!(r["compared"], 2500, "{r}");
    // Rows past the watermark are the job's next run, not differences.
    env.src
        .batch_execute("insert into orders select g, g, 'late' from generate_series(2501, 2600) g")
        .await
        .unwrap();
    let r = clean(&env, "orders", &[]).await;
    assert_eq!(r["compared"], 2500, "{r}");

    damage(&db, "orders", 5, "amount", "toDecimal64(999, 2)").await;
    damage(&db, "orders", 9, "note", "'n9'").await;
    mark_deleted(&db, 7).await;
    mark_deleted(&db, 1500).await;
    // A poll job cannot see deletes: a row the view lacks is not counted.
    stray(&db, 99999).await;
    let (code, r, out) = verify(&env, "orders", &[]).await;
    assert_eq!(code, 1, "{r}\n{}", out.stderr());
    assert_eq!(counts(&r), (2, 2, 0), "{r}");
    assert_eq!(keys(&r, "missing"), strs(&["1500", "7"]));
    assert_eq!(keys(&r, "different"), strs(&["5", "9"]));
    assert_eq!(r["compared"], 2500, "{r}");
    // The same when the second pass reads the source again rather than the first pass's file.
    let (code, again, _) = verify_rereading(&env, "orders", &[], true).await;
    assert_eq!(code, 1);
    assert_eq!(again["keys"], r["keys"], "{again}");
    // The whole report, as the README documents it.
    let fields: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    for f in [
        "job",
        "mode",
        "target",
        "compared",
        "missing",
        "different",
        "extra",
        "keys",
        "extra_counted",
        "repaired",
        "seconds",
    ] {
        assert!(fields.contains(&f), "no {f} in {r}");
    }
    assert_eq!(r["job"], "orders");
    assert_eq!(r["mode"], "poll");
    assert_eq!(r["target"], format!("{db}.orders"));
    assert_eq!(r["extra_counted"], false);
    assert!(r["repaired"].is_null(), "{r}");
    assert!(r["seconds"].as_f64().is_some(), "{r}");
    assert_eq!(keys(&r, "extra"), Vec::<String>::new());

    // The text report names the keys.
    let out = env.pgtide(&["verify", "orders"]).await;
    assert_eq!(out.code(), 1);
    let text = out.stdout();
    assert!(
        text.contains("differs from the view: 2 missing, 2 different, 0 extra (2500 rows compared; extra rows are not counted for poll jobs)"),
        "{text}"
    );
    assert!(text.contains("  missing: 7; 1500\n"), "{text}");

    // A range compares its rows only.
    let (code, r, _) = verify(&env, "orders", &["--from", "4", "--to", "8"]).await;
    assert_eq!(code, 1);
    assert_eq!(counts(&r), (1, 1, 0), "{r}");
    assert_eq!(r["compared"], 4, "{r}");
    clean(&env, "orders", &["--from", "10", "--to", "1000"]).await;

    // Another pgtide holds the job (the lock of a ClickHouse DWH's job lives on the source): a
    // plain comparison runs, a repair exits 3.
    let (holder, held) = lock_job(&env.src_url, "orders").await;
    assert!(held);
    assert_eq!(verify(&env, "orders", &[]).await.0, 1);
    let out = env.pgtide(&["verify", "orders", "--repair"]).await;
    assert_eq!(out.code(), 3, "{}", out.stderr());
    drop(holder);

    let (code, r, out) = verify(&env, "orders", &["--repair"]).await;
    assert_eq!(code, 0, "{r}\n{}", out.stderr());
    assert_eq!(counts(&r["repaired"]), (2, 2, 0), "{r}");
    assert_eq!(keys(&r["repaired"], "missing"), strs(&["1500", "7"]));
    assert!(r["repaired"]["written"].as_u64().unwrap() >= 4, "{r}");
    assert_eq!(counts(&r), (0, 0, 0), "{r}");
    // The repair wrote what the job writes, and moved no watermark: the late rows are the
    // next run's.
    assert_eq!(
        ch::query(&format!(
            "select id, amount, note from {db}.orders final where _pgtide_deleted = 0 and id in (5, 7, 9, 1500, 2501) order by id format TabSeparated"
        ))
        .await,
        "5\t7.50\tn5\n7\t10.50\tn7\n9\t13.50\t\\N\n1500\t2250.00\t\\N\n"
    );
    let r = clean(&env, "orders", &[]).await;
    assert_eq!(r["compared"], 2500, "{r}");
    env.pgtide(&["run-once"]).await.ok();
    let r = clean(&env, "orders", &[]).await;
    assert_eq!(r["compared"], 2600, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_job_with_deletes_counts_extra_rows_and_skips_waiting_events() {
    for on_delete in ["delete", "soft"] {
        let (env, db) = ch::notify_env(on_delete).await;
        env.src
            .batch_execute("delete from orders where id between 10 and 19")
            .await
            .unwrap();
        env.pgtide(&["run-once"]).await.ok();
        let r = clean(&env, "orders", &[]).await;
        assert_eq!(r["compared"], 2490, "on_delete = {on_delete}: {r}");
        assert_eq!(r["extra_counted"], true, "{r}");

        stray(&db, 77777).await;
        stray(&db, 77778).await;
        mark_deleted(&db, 20).await;
        // Changes with events still waiting are the job's next drain, not differences: a
        // deleted source row (its target row is still there) and a changed one.
        env.src
            .batch_execute(
                "delete from orders where id = 30; update orders set note = 'changed' where id = 31;",
            )
            .await
            .unwrap();
        let (code, r, out) = verify(&env, "orders", &[]).await;
        assert_eq!(code, 1, "{r}\n{}", out.stderr());
        assert_eq!(counts(&r), (1, 0, 2), "on_delete = {on_delete}: {r}");
        assert_eq!(keys(&r, "missing"), strs(&["20"]));
        assert_eq!(keys(&r, "extra"), strs(&["77777", "77778"]));
        // With a range, rows not in the view have no cursor: extra rows are not counted.
        let (_, r, _) = verify(&env, "orders", &["--to", "100"]).await;
        assert_eq!(counts(&r), (1, 0, 0), "{r}");
        assert_eq!(r["extra_counted"], false, "{r}");

        let (code, r, out) = verify(&env, "orders", &["--repair"]).await;
        assert_eq!(code, 0, "on_delete = {on_delete}: {r}\n{}", out.stderr());
        assert_eq!(counts(&r["repaired"]), (1, 0, 2), "{r}");
        assert_eq!(r["repaired"]["deleted"], 2, "{r}");
        let marked = ch::query(&format!(
            "select id, note from {db}.orders final where _pgtide_deleted = 1 and id > 70000 order by id format TabSeparated"
        ))
        .await;
        // Soft deletes keep the row's values; deletes mark the key alone.
        let note = if on_delete == "soft" { "stray" } else { "\\N" };
        assert_eq!(
            marked,
            format!("77777\t{note}\n77778\t{note}\n"),
            "on_delete = {on_delete}"
        );
        assert_eq!(
            Env::count(&env.src, "pgtide.orders_events").await,
            2,
            "a repair leaves the events to the job"
        );
        // The drain brings the rest; after it everything compares.
        env.pgtide(&["run-once"]).await.ok();
        let r = clean(&env, "orders", &[]).await;
        assert_eq!(r["compared"], 2489, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_not_taken_from_the_main_table_is_checked_again_over_the_whole_view() {
    let (env, db) = env().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job(
        "orders",
        r#"interval_secs = 60
        key = ["id"]
        [from]
        table = "orders"
        [[column]]
        name = "id"
        sql = "orders.id + 0"
        [[column]]
        name = "amount"
        from = "orders.amount"
        "#,
    );
    env.pgtide(&["run-once"]).await.ok();
    clean(&env, "orders", &[]).await;
    damage(&db, "orders", 42, "amount", "toDecimal64(0, 2)").await;
    let (code, r, _) = verify(&env, "orders", &[]).await;
    assert_eq!(code, 1);
    assert_eq!(counts(&r), (0, 1, 0), "{r}");
    assert_eq!(keys(&r, "different"), strs(&["42"]));
    // Reading the view by key needs a key column taken as it is from the main table.
    let out = env.pgtide(&["verify", "orders", "--repair"]).await;
    assert_eq!(out.code(), 1);
    assert!(out.stderr().contains("replay"), "{}", out.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_an_open_window_will_reread_are_not_counted_until_it_closes() {
    let (env, db) = env().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job("orders", POLL_JOB);
    // A session holding a transaction id while the run reads: its window cannot close at once.
    let holder = support::connect(&env.src_url).await;
    holder
        .batch_execute("begin; select pg_current_xact_id();")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
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
    env.pgtide(&["run-once"]).await.ok();
    assert_eq!(
        open_windows(&env, "orders").await,
        0,
        "the recheck closed the window"
    );
    let amount = |db: &str| {
        let q = format!("select amount from {db}.orders final where id = 6 format TabSeparated");
        async move { ch::query(&q).await }
    };
    assert_eq!(amount(&db).await, "1000.00\n");
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
    assert_eq!(amount(&db).await, "2000.00\n");
}
