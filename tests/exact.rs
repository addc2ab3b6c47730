//! Exactness for every shape of writing transaction: rows whose transaction commits after
//! later rows were loaded still arrive, whatever the transaction did (savepoints, PL/pgSQL
//! exception blocks, two-phase commit, early `nextval()`, many statements, updates), for
//! `id` and `(updated_at, id)` cursors, on a primary and on a hot standby, and for a
//! partitioned main table. Views and their kind are refused with a message that says why.

mod support;

use std::time::Duration;

use support::{connect, wait_for, Env};

const ITEMS: &str = "
    create table items (
        id bigserial primary key,
        v int not null default 0,
        note text,
        updated_at timestamptz not null default now()
    );
    create index on items (updated_at, id);
    insert into items (v) select g from generate_series(1, 10) g;";

fn items_job(watermark: &str) -> String {
    format!(
        r#"
interval_secs = 60
batch_size = 4
key = ["id"]
watermark = {watermark}
[from]
table = "public.items"
as = "i"
[[column]]
name = "id"
from = "i.id"
[[column]]
name = "v"
from = "i.v"
[[column]]
name = "note"
from = "i.note"
"#
    )
}

const BOTH: &[&str] = &["by_id", "by_time"];
/// Updates of rows loaded before move only a timestamp cursor; an `id` job sees inserts.
const BY_TIME: &[&str] = &["by_time"];

async fn items_env() -> Env {
    let env = Env::new().await;
    env.src.batch_execute(ITEMS).await.unwrap();
    env.job("by_id", &items_job(r#"["id"]"#));
    env.job("by_time", &items_job(r#"["updated_at", "id"]"#));
    env
}

/// The targets of `jobs` hold exactly the source's rows.
async fn assert_exact(env: &Env, jobs: &[&str], what: &str) {
    let src = Env::rows(&env.src, "select id, v, note from items").await;
    for job in jobs {
        let dwh = Env::rows(&env.dwh, &format!("select id, v, note from dw.{job}")).await;
        assert_eq!(src, dwh, "{what}: dw.{job} differs from the source");
    }
}

/// The `id` job's target holds every row the source has (it does not follow updates).
async fn assert_inserts(env: &Env) {
    assert_eq!(
        Env::rows(&env.src, "select id, v from items").await,
        Env::rows(&env.dwh, "select id, v from dw.by_id").await,
        "dw.by_id misses inserted rows"
    );
}

/// Run every job once, after the standby (if that is the source) has caught up.
async fn run(env: &Env, standby: bool) {
    if standby {
        env.wait_replayed().await;
    }
    env.pgtide(&["run-once"]).await.ok();
}

/// A writer runs `steps[0]` (opening its transaction and perhaps writing); a short transaction
/// inserts a row with a higher id (and a later timestamp) and commits; pgtide runs. Then each
/// further step runs (the last ends the writer's transaction), each followed by a run; then
/// two more runs, and the targets must hold exactly the source's rows.
async fn late_commit(env: &Env, jobs: &[&str], standby: bool, steps: &[&str]) {
    run(env, standby).await;
    assert_exact(env, jobs, "initial load").await;
    let writer = connect(&env.src_url).await;
    writer.batch_execute(steps[0]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    env.src
        .batch_execute("insert into items (v, note) values (100, 'short')")
        .await
        .unwrap();
    run(env, standby).await;
    for step in &steps[1..] {
        writer.batch_execute(step).await.unwrap();
        run(env, standby).await;
    }
    run(env, standby).await;
    assert_exact(env, jobs, steps[0]).await;
}

/// A name for a prepared transaction, unique in the cluster.
fn gid(env: &Env, what: &str) -> String {
    let db = env.src_url.rsplit('/').next().unwrap();
    format!("{db}_{what}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_inserted_in_a_released_savepoint_arrives() {
    // Regression: the row carries its subtransaction's xid, which no snapshot lists.
    let env = items_env().await;
    late_commit(
        &env,
        BOTH,
        false,
        &[
            "begin; savepoint s1; insert into items (v, note) values (1, 'savepoint'); release s1",
            "select pg_sleep(0.1)",
            "commit",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn savepoints_rolled_back_retried_and_nested_lose_nothing() {
    let env = items_env().await;
    late_commit(
        &env,
        BY_TIME,
        false,
        &[
            "begin;
             savepoint a; insert into items (v, note) values (2, 'rolled back'); rollback to a;
             savepoint a; insert into items (v, note) values (2, 'retried'); release a;
             savepoint b; savepoint c; insert into items (v, note) values (3, 'nested');
             release c; savepoint d; update items set note = 'nested update', updated_at = now() where id = 4;
             release d; release b",
            "savepoint e; insert into items (v, note) values (4, 'later savepoint'); release e",
            "commit",
        ],
    )
    .await;
    assert_inserts(&env).await;
    let notes = Env::rows(
        &env.dwh,
        "select note from dw.by_time where note is not null",
    )
    .await;
    assert!(!notes.contains(&"rolled back".to_string()), "{notes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plpgsql_exception_block_loses_nothing() {
    let env = items_env().await;
    late_commit(
        &env,
        BY_TIME,
        false,
        &[
            "begin; do $$ begin
                 begin
                     insert into items (v, note) values (5, 'exception block');
                     update items set note = 'updated in block', updated_at = now() where id = 2;
                 exception when others then raise;
                 end;
                 begin
                     insert into items (v, note) values (6, 'caught');
                     perform 1 / 0;
                 exception when division_by_zero then null;
                 end;
             end $$",
            "commit",
        ],
    )
    .await;
    assert_inserts(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_in_a_savepoint_of_a_long_transaction_arrives() {
    let env = items_env().await;
    late_commit(
        &env,
        BY_TIME,
        false,
        &[
            "begin; savepoint s; update items set v = 99, note = 'late update', updated_at = now() where id = 7; release s",
            "select pg_sleep(0.1)",
            "commit",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_that_takes_nextval_early_and_inserts_late_loses_nothing() {
    let env = items_env().await;
    late_commit(
        &env,
        BOTH,
        false,
        &[
            "begin; select set_config('t.id', nextval('items_id_seq')::text, false)",
            "insert into items (id, v, note) values (current_setting('t.id')::bigint, 7, 'early id')",
            "insert into items (v) select g from generate_series(1, 50) g; update items set note = 'many' where id = current_setting('t.id')::bigint",
            "commit",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_transactions_commit_late_without_loss() {
    let env = items_env().await;
    let (a, b) = (gid(&env, "plain"), gid(&env, "savepoint"));
    late_commit(
        &env,
        BOTH,
        false,
        &[
            &format!("begin; insert into items (v, note) values (8, 'prepared'); prepare transaction '{a}'"),
            &format!("begin; savepoint s; insert into items (v, note) values (9, 'prepared savepoint'); release s; prepare transaction '{b}'"),
            "select pg_sleep(0.2)",
            &format!("commit prepared '{b}'"),
            &format!("commit prepared '{a}'"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_transaction_that_took_its_id_late_holds_its_window() {
    // No session shows a prepared transaction; it took its cursor value before the read.
    let env = items_env().await;
    let g = gid(&env, "late");
    late_commit(
        &env,
        BOTH,
        false,
        &[
            "begin; select set_config('t.id', nextval('items_id_seq')::text, false)",
            &format!(
                "insert into items (id, v, note) values (current_setting('t.id')::bigint, 10, 'prepared late');
                 prepare transaction '{g}'"
            ),
            "select 1",
            &format!("commit prepared '{g}'"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_main_table_with_rows_moving_between_partitions() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "create table parts (id bigint not null, region text not null, v int,
                                 updated_at timestamptz not null default now(),
                                 primary key (id, region)) partition by list (region);
             create table parts_a partition of parts for values in ('a');
             create table parts_b partition of parts for values in ('b');
             create sequence parts_id;
             insert into parts select nextval('parts_id'), 'a', g from generate_series(1, 10) g;",
        )
        .await
        .unwrap();
    env.job(
        "parts",
        r#"
interval_secs = 60
batch_size = 3
key = ["id"]
watermark = ["updated_at", "id"]
[from]
table = "public.parts"
as = "p"
[[column]]
name = "id"
from = "p.id"
[[column]]
name = "region"
from = "p.region"
[[column]]
name = "v"
from = "p.v"
"#,
    );
    env.pgtide(&["run-once"]).await.ok();
    let writer = connect(&env.src_url).await;
    writer
        .batch_execute(
            "begin; savepoint s;
             update parts set region = 'b', updated_at = now() where id = 2;
             insert into parts values (nextval('parts_id'), 'b', 11);
             release s",
        )
        .await
        .unwrap();
    env.src
        .batch_execute("insert into parts values (nextval('parts_id'), 'a', 12)")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    writer.batch_execute("commit").await.unwrap();
    env.pgtide(&["run-once"]).await.ok();
    env.pgtide(&["run-once"]).await.ok();
    assert_eq!(
        Env::rows(&env.src, "select id, region, v from parts").await,
        Env::rows(&env.dwh, "select id, region, v from dw.parts").await
    );
    let moved: String = env
        .dwh
        .query_one("select region from dw.parts where id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(moved, "b");
}

#[tokio::test(flavor = "multi_thread")]
async fn views_materialized_views_and_foreign_tables_are_refused_with_the_reason() {
    let env = items_env().await;
    env.src
        .batch_execute(
            "create view items_v as select * from items;
             create materialized view items_m as select * from items;",
        )
        .await
        .unwrap();
    for (name, table, kind) in [
        ("from_view", "public.items_v", "is a view"),
        ("from_matview", "public.items_m", "is a materialized view"),
    ] {
        env.job(name, &items_job(r#"["id"]"#).replace("public.items", table));
        let check = env.pgtide(&["check", name]).await;
        assert_ne!(check.code(), 0, "check must refuse {table}");
        let said = check.stdout() + &check.stderr();
        assert!(
            said.contains(table) && said.contains(kind) && said.contains("xmin"),
            "{said}"
        );
        let run = env.pgtide(&["run-once", name]).await;
        assert_eq!(run.code(), 1, "run-once must refuse {table}");
        assert!(
            run.stderr().contains(table) && run.stderr().contains(kind),
            "{}",
            run.stderr()
        );
        // Never a load on the first run and a failure on the second.
        assert!(
            !env.dwh
                .query_one(
                    "select to_regclass($1) is not null",
                    &[&format!("dw.{name}")]
                )
                .await
                .unwrap()
                .get::<_, bool>(0),
            "nothing may be loaded from {table}"
        );
        std::fs::remove_file(env.dir.path().join(format!("jobs/{name}.toml"))).unwrap();
    }
}

/// A standby as the source: the primary's long transaction inserts early, later ids are read
/// from the standby, and the long transaction commits after.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_hot_standby_late_rows_arrive() {
    let env = items_env().await;
    env.write_config(&env.standby_url(), &env.dwh_url);
    late_commit(
        &env,
        BY_TIME,
        true,
        &[
            "begin; insert into items (v, note) values (11, 'early insert')",
            "savepoint s; insert into items (v, note) values (12, 'savepoint'); update items set note = 'standby update', updated_at = now() where id = 5; release s",
            "commit",
        ],
    )
    .await;
    let recovery: bool = connect(&env.standby_url())
        .await
        .query_one("select pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(recovery, "the source must be a standby");
    assert_inserts(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_hot_standby_early_nextval_and_two_phase_commit_lose_nothing() {
    let env = items_env().await;
    env.write_config(&env.standby_url(), &env.dwh_url);
    let g = gid(&env, "standby");
    late_commit(
        &env,
        BOTH,
        true,
        &[
            "begin; select set_config('t.id', nextval('items_id_seq')::text, false)",
            "insert into items (id, v, note) values (current_setting('t.id')::bigint, 13, 'early id')",
            "commit",
        ],
    )
    .await;
    late_commit(
        &env,
        BOTH,
        true,
        &[
            &format!("begin; savepoint s; insert into items (v, note) values (14, 'prepared on the primary'); release s; prepare transaction '{g}'"),
            &format!("commit prepared '{g}'"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn standby_windows_close_after_the_grace_time() {
    let env = items_env().await;
    env.write_config(&env.standby_url(), &env.dwh_url);
    run(&env, true).await;
    env.src
        .batch_execute("insert into items (v) values (15)")
        .await
        .unwrap();
    run(&env, true).await;
    let open = |env: &Env| {
        let mut cmd = env.command(&["status", "--json"]);
        cmd.env("PGTIDE_SETTLE_GRACE_SECS", "1");
        async move {
            let out = cmd.output().await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .map(|j| j["open_windows"].as_u64().unwrap())
                .sum::<u64>()
        }
    };
    assert!(
        open(&env).await > 0,
        "a standby's windows wait for the grace time"
    );
    // With a grace time of 1 s, windows take their mark and close once every transaction
    // the standby knew of then has ended (other tests' transactions may delay that).
    let envr = &env;
    wait_for(90, "the standby's windows to close", || async move {
        let mut cmd = envr.command(&["run-once"]);
        cmd.env("PGTIDE_SETTLE_GRACE_SECS", "1");
        assert_eq!(cmd.output().await.unwrap().status.code(), Some(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
        open(envr).await == 0
    })
    .await;
    assert_exact(&env, BOTH, "after the windows closed").await;
}

/// The open windows of `job`, as `status --json` shows them.
async fn open_windows(env: &Env, job: &str) -> u64 {
    let out = env.pgtide(&["status", "--json"]).await.ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|j| j["job"] == job)
        .unwrap_or_else(|| panic!("no job {job} in {v}"))["open_windows"]
        .as_u64()
        .unwrap()
}

/// While `writer`'s transaction is open: a short transaction inserts a row and a run reads it,
/// leaving a window that must stay open (`why`); then the writer inserts a row stamped with its
/// start (below that row) and commits.
async fn read_past_an_open_writer(env: &Env, writer: &tokio_postgres::Client, why: &str) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    env.src
        .batch_execute("insert into items (v, note) values (21, 'short')")
        .await
        .unwrap();
    env.pgtide(&["run-once", "by_time"]).await.ok();
    assert!(open_windows(env, "by_time").await > 0, "{why}");
    writer
        .batch_execute("insert into items (v, note, updated_at) values (22, 'late', now()); commit")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_settles_its_window_at_once_unless_a_session_started_before_it() {
    let env = items_env().await;
    // Nothing of this database is open while the rows are read: each read leaves no window,
    // so the next run re-reads nothing. (A transaction of another database that takes an id
    // and ends between a read's snapshot and its horizon keeps that window, conservatively:
    // other tests run on this server, so a few tries are allowed.)
    let mut tries = 0;
    loop {
        env.src
            .batch_execute("insert into items (v, note) values (20, 'quiet')")
            .await
            .unwrap();
        env.pgtide(&["run-once", "by_time"]).await.ok();
        if open_windows(&env, "by_time").await == 0 {
            break;
        }
        tries += 1;
        assert!(tries < 5, "every run left a window open");
    }
    // A session whose transaction started before the read, with no id yet: it may write a
    // row stamped with its start (below the watermark) later, so the window stays open.
    let writer = connect(&env.src_url).await;
    writer.batch_execute("begin; select now()").await.unwrap();
    let id: Option<String> = writer
        .query_one("select pg_current_xact_id_if_assigned()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        id, None,
        "the writer must hold no id while the batch is read"
    );
    read_past_an_open_writer(
        &env,
        &writer,
        "a session open since before the read keeps the window",
    )
    .await;
    let below: bool = env
        .src
        .query_one(
            "select (select updated_at from items where note = 'late')
                  < (select updated_at from items where note = 'short')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(below, "the late row must sit below the watermark");
    env.pgtide(&["run-once", "by_time"]).await.ok();
    assert_exact(
        &env,
        BY_TIME,
        "a row committed late by a session open at the read",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_with_activity_tracking_off_keeps_the_window_open() {
    let env = items_env().await;
    env.pgtide(&["run-once", "by_time"]).await.ok();
    // With track_activities off, pg_stat_activity shows the session as `disabled`, without
    // the start of its transaction: it may be open since before a read, as if hidden.
    let writer = connect(&env.src_url).await;
    writer
        .batch_execute("set track_activities = off; begin; select now()")
        .await
        .unwrap();
    read_past_an_open_writer(
        &env,
        &writer,
        "a session that shows nothing keeps the window",
    )
    .await;
    env.pgtide(&["run-once", "by_time"]).await.ok();
    assert_exact(
        &env,
        BY_TIME,
        "a row committed late by a session with activity tracking off",
    )
    .await;
}
