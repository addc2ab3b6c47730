//! Notify jobs against real databases: triggers, events, joined-table changes, deletes.

mod support;

use support::{orders_notify_job, Env};

const SHOP: &str = "
    create table customers (id bigint primary key, name text not null);
    create table orders (id bigint primary key, customer_id bigint, amount numeric(10, 2), note text);
    insert into customers select g, 'customer ' || g from generate_series(1, 5) g;
    insert into orders select g, 1 + g % 5, g, null from generate_series(1, 20) g;";

const LEFT_VIEW: &str = "select o.id, c.name, o.amount, o.note from orders o left join customers c on o.customer_id = c.id";
const INNER_VIEW: &str =
    "select o.id, c.name, o.amount, o.note from orders o join customers c on o.customer_id = c.id";
const DWH_VIEW: &str = "select order_id, customer, amount, note from dw.orders";

async fn env(join: &str, on_delete: &str) -> Env {
    let env = Env::new().await;
    env.src.batch_execute(SHOP).await.unwrap();
    env.job("orders", &orders_notify_job(join, on_delete));
    env.pgtide(&["install", "orders"]).await.ok();
    env
}

async fn converged(env: &Env, view: &str) {
    assert_eq!(
        Env::rows(&env.src, view).await,
        Env::rows(&env.dwh, DWH_VIEW).await,
        "DWH differs from the view"
    );
    let events: i64 = env
        .src
        .query_one("select count(*) from pgtide.orders_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 0, "events left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn install_and_uninstall_are_idempotent_and_leave_nothing_behind() {
    let env = Env::new().await;
    env.src.batch_execute(SHOP).await.unwrap();
    env.job("orders", &orders_notify_job("left", "delete"));
    let out = env.pgtide(&["check"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("its triggers are not installed in the source"),
        "{}",
        out.stderr()
    );
    let sql = env.pgtide(&["sql", "orders"]).await.ok().stdout();
    for want in [
        "security definer set search_path = pg_catalog, pg_temp",
        "for each statement",
        "pg_notify('pgtide_orders', '')",
        "pg_current_xact_id()",
    ] {
        assert!(sql.contains(want), "missing {want:?} in:\n{sql}");
    }
    let count = |q: &'static str| {
        let src = &env.src;
        async move { src.query_one(q, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let triggers = "select count(*) from pg_trigger where tgname like 'pgtide\\_%'";
    let objects = "select (select count(*) from pg_namespace where nspname = 'pgtide')
                        + (select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'pgtide')";
    for _ in 0..2 {
        env.pgtide(&["install", "orders"]).await.ok();
        assert_eq!(
            count(triggers).await,
            4,
            "a row and a statement trigger on each of two tables"
        );
    }
    env.src
        .batch_execute("insert into orders values (100, 1, 1, 'kept')")
        .await
        .unwrap();
    env.pgtide(&["install", "orders"]).await.ok();
    assert_eq!(
        count("select count(*) from pgtide.orders_events").await,
        1,
        "reinstalling keeps events"
    );
    for _ in 0..2 {
        env.pgtide(&["uninstall", "orders"]).await.ok();
        assert_eq!(count(triggers).await, 0);
        assert_eq!(count(objects).await, 0, "schema and functions are gone");
    }
    // Poll jobs have no triggers.
    env.job("plain", "interval_secs = 5\nkey = [\"id\"]\n[from]\ntable = \"orders\"\n[[column]]\nname = \"id\"\nfrom = \"orders.id\"\n");
    let out = env.pgtide(&["install", "plain"]).await;
    assert_eq!(out.code(), 2);
    assert!(
        out.stderr().contains("job plain is a poll job"),
        "{}",
        out.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn first_load_then_inserts_updates_deletes_of_the_main_table() {
    let env = env("left", "delete").await;
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(out.stdout().contains("20 rows read"), "{}", out.stdout());
    converged(&env, LEFT_VIEW).await;

    // Changes while pgtide is not running wait in the event table.
    env.src
        .batch_execute(
            "insert into orders values (21, 1, 21, 'new');
             update orders set note = 'changed', amount = 99 where id in (2, 3);
             delete from orders where id in (4, 5);",
        )
        .await
        .unwrap();
    let status: serde_json::Value =
        serde_json::from_str(&env.pgtide(&["status", "--json"]).await.ok().stdout()).unwrap();
    assert_eq!(status[0]["mode"], "notify");
    assert_eq!(status[0]["waiting"], 5);
    assert!(status[0]["oldest_event_secs"].as_f64().unwrap() >= 0.0);
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(
        out.stdout().contains("5 events, 2 deleted"),
        "{}",
        out.stdout()
    );
    converged(&env, LEFT_VIEW).await;

    // A key that changes: the old view row goes, the new one comes.
    env.src
        .batch_execute("update orders set id = 1000 where id = 1")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    converged(&env, LEFT_VIEW).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_in_the_joined_table_reach_every_view_row_that_uses_them() {
    let env = env("left", "delete").await;
    env.pgtide(&["run-once"]).await.ok();
    // Customer 2 has four orders: all of them change.
    env.src
        .batch_execute("update customers set name = 'renamed' where id = 2")
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(out.stdout().contains("4 rows read"), "{}", out.stdout());
    converged(&env, LEFT_VIEW).await;
    // An order moves to another customer.
    env.src
        .batch_execute("update orders set customer_id = 3 where id = 1")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    converged(&env, LEFT_VIEW).await;
    // A customer is deleted: with a left join its orders stay, without a name.
    env.src
        .batch_execute("delete from customers where id = 3")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    converged(&env, LEFT_VIEW).await;
    // A customer's key changes: orders pointing at the new key find it, those at the old lose it.
    env.src.batch_execute("update customers set id = 33 where id = 4; update orders set customer_id = 33 where id = 3").await.unwrap();
    env.pgtide(&["run-once"]).await.ok();
    converged(&env, LEFT_VIEW).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inner_join_that_stops_matching_removes_view_rows() {
    let env = env("inner", "delete").await;
    env.pgtide(&["run-once"]).await.ok();
    env.src
        .batch_execute("delete from customers where id = 2")
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(out.stdout().contains("4 deleted"), "{}", out.stdout());
    converged(&env, INNER_VIEW).await;
    env.src
        .batch_execute("insert into customers values (2, 'back')")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    converged(&env, INNER_VIEW).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_of_either_table() {
    let env = env("left", "delete").await;
    env.pgtide(&["run-once"]).await.ok();
    env.src.batch_execute("truncate customers").await.unwrap();
    env.pgtide(&["run-once"]).await.ok();
    converged(&env, LEFT_VIEW).await;
    env.src
        .batch_execute("truncate orders; insert into orders values (1, 1, 5, 'after')")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    converged(&env, LEFT_VIEW).await;
    assert_eq!(Env::count(&env.dwh, "dw.orders").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_deletes_ignored_deletes_and_resurrection() {
    let env = env("left", "soft").await;
    env.pgtide(&["run-once"]).await.ok();
    env.src
        .batch_execute("delete from orders where id in (1, 2)")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    let soft = "select order_id, _pgtide_deleted from dw.orders where order_id <= 3";
    assert_eq!(
        Env::rows(&env.dwh, soft).await,
        vec!["(1,t)", "(2,t)", "(3,f)"]
    );
    // The key comes back: un-deleted, with its new values.
    env.src
        .batch_execute("insert into orders values (1, 1, 7, 'again')")
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    assert_eq!(
        Env::rows(&env.dwh, soft).await,
        vec!["(1,f)", "(2,t)", "(3,f)"]
    );
    let note: String = env
        .dwh
        .query_one("select note from dw.orders where order_id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(note, "again");

    let env = self::env("left", "ignore").await;
    env.pgtide(&["run-once"]).await.ok();
    env.src
        .batch_execute(
            "delete from orders where id = 1; update orders set note = 'seen' where id = 2",
        )
        .await
        .unwrap();
    env.pgtide(&["run-once"]).await.ok();
    assert_eq!(
        Env::count(&env.dwh, "dw.orders").await,
        20,
        "the deleted row stays"
    );
    let note: String = env
        .dwh
        .query_one("select note from dw.orders where order_id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(note, "seen");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_the_dwh_commit_and_the_source_commit_replays_the_events() {
    let env = env("left", "delete").await;
    env.pgtide(&["run-once"]).await.ok();
    env.src
        .batch_execute("update orders set note = 'x' where id = 5; delete from orders where id = 6")
        .await
        .unwrap();
    let out = env
        .command(&["run-once"])
        .env("PGTIDE_CRASH_BETWEEN_COMMITS", "1")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "the run must have crashed");
    assert!(String::from_utf8_lossy(&out.stderr).contains("PGTIDE_CRASH_BETWEEN_COMMITS is set"));
    // The DWH has the change, the events are still there: the next run applies them again.
    let events: i64 = env
        .src
        .query_one("select count(*) from pgtide.orders_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 2);
    env.wait_until_gone("orders").await;
    env.pgtide(&["run-once"]).await.ok();
    converged(&env, LEFT_VIEW).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_updates_of_one_key_in_one_transaction_are_one_row() {
    let env = env("left", "delete").await;
    env.pgtide(&["run-once"]).await.ok();
    env.src
        .batch_execute("do $$ begin for i in 1..10000 loop update orders set amount = i where id = 7; end loop; end $$")
        .await
        .unwrap();
    env.job(
        "orders",
        &orders_notify_job("left", "delete").replace("batch_size = 7", "batch_size = 10000"),
    );
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(
        out.stdout()
            .contains("1 rows read, 1 changed, 1 batches, 10000 events"),
        "{}",
        out.stdout()
    );
    converged(&env, LEFT_VIEW).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_during_the_first_load_are_not_lost() {
    let env = Env::new().await;
    env.src.batch_execute(SHOP).await.unwrap();
    env.src
        .batch_execute(
            "insert into orders select g, 1 + g % 5, g, null from generate_series(21, 30000) g",
        )
        .await
        .unwrap();
    env.job(
        "orders",
        &orders_notify_job("left", "delete").replace("batch_size = 7", "batch_size = 500"),
    );
    env.pgtide(&["install", "orders"]).await.ok();
    let load = env.command(&["run-once"]).output();
    let writer = async {
        for i in 0..40 {
            env.src
                .batch_execute(&format!(
                    "update orders set note = 'w{i}' where id = {}; delete from orders where id = {}; insert into orders values ({}, 2, 1, 'late')",
                    30000 - i * 7,
                    29000 - i,
                    40000 + i
                ))
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let (out, ()) = tokio::join!(load, writer);
    assert!(out.unwrap().status.success());
    env.pgtide(&["run-once"]).await.ok();
    converged(&env, LEFT_VIEW).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_follows_events_and_survives_a_killed_listener() {
    let env = env("left", "delete").await;
    let log = env.dir.path().join("daemon.log");
    let mut daemon = env
        .command(&["run"])
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dwh = &env.dwh;
    let has = |id: i64| async move {
        dwh.query_opt("select 1 from dw.orders where order_id = $1", &[&id])
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
    };
    support::wait_for(30, "the first load", || has(20)).await;

    env.src
        .batch_execute("insert into orders values (500, 1, 5, 'live')")
        .await
        .unwrap();
    support::wait_for(5, "a notified insert to land", || has(500)).await;

    // Kill the listening connection: the daemon notices, reconnects, and drains what it missed.
    let killed: i64 = env
        .src
        .query_one("select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = 'pgtide:orders:listen'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    env.src
        .batch_execute("insert into orders values (501, 2, 5, 'while reconnecting')")
        .await
        .unwrap();
    support::wait_for(
        10,
        "the row inserted while the listener was gone (the sweep is 60 s away)",
        || has(501),
    )
    .await;
    let src = &env.src;
    support::wait_for(10, "a new listener", || async {
        src.query_one(
            "select count(*) from pg_stat_activity where application_name = 'pgtide:orders:listen'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    })
    .await;
    env.src
        .batch_execute("update customers set name = 'after reconnect' where id = 1")
        .await
        .unwrap();
    support::wait_for(5, "a joined-table change after the reconnect", || async {
        dwh.query_one(
            "select count(*) from dw.orders where customer = 'after reconnect'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            > 0
    })
    .await;
    converged(&env, LEFT_VIEW).await;

    // SIGTERM: exit 0 promptly, the run recorded as finished.
    unsafe { libc::kill(daemon.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), daemon.wait())
        .await
        .unwrap()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status:?}\n{text}");
    assert!(
        text.contains("listening connection lost; reconnecting"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&env.pgtide(&["status", "--json"]).await.ok().stdout()).unwrap();
    assert_eq!(v[0]["last_run"]["outcome"], "ok", "{v}");
}
