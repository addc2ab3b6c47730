//! Loads of many rows: several workers, resumed after a kill, throttled, and exact when
//! transactions commit out of order during the load.

mod support;

use std::time::{Duration, Instant};

use support::{wait_for, Env, CUSTOMER_ORDERS};

fn job(parallel: usize, batch: usize, extra: &str) -> String {
    format!(
        r#"
    interval_secs = 60
    batch_size = {batch}
    parallel = {parallel}
    key = ["order_id"]
    watermark = ["updated_at", "id"]
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
    name = "note"
    from = "o.note"
"#
    )
}

const SOURCE_VIEW: &str = "select o.id, c.name, o.amount, o.note
    from orders o left join customers c on o.customer_id = c.id";
const DWH_VIEW: &str = "select order_id, customer, amount, note from dw.orders";

async fn assert_converged(env: &Env) {
    assert_eq!(
        Env::rows(&env.src, SOURCE_VIEW).await,
        Env::rows(&env.dwh, DWH_VIEW).await,
        "DWH differs from the view"
    );
}

/// `n` orders with skewed timestamps: most share a few values, so chunks must cut inside a
/// timestamp by id.
async fn orders(env: &Env, n: usize) {
    env.src.batch_execute(CUSTOMER_ORDERS).await.unwrap();
    env.src
        .batch_execute(&format!(
            "insert into orders (customer_id, amount, note, updated_at)
             select 1 + g % 10, g, case when g % 7 = 0 then null else 'n' || g end,
                    '2025-01-01'::timestamptz + ((g % 3) || ' seconds')::interval
                      + case when g > {n} - 50 then (g || ' minutes')::interval else '0'::interval end
             from generate_series(1, {n}) g"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parallel_first_load_and_replay_are_exact() {
    let env = Env::new().await;
    orders(&env, 20_000).await;
    env.job("orders", &job(4, 700, ""));
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_read(), 20_000);
    assert_converged(&env).await;
    // The load ended at its last row: the next run reads only what is new.
    env.src
        .batch_execute(
            "insert into orders (customer_id, amount) values (1, 1);
             update orders set note = 'changed', updated_at = now() where id = 5;",
        )
        .await
        .unwrap();
    assert_eq!(env.pgtide(&["run-once"]).await.ok().rows_new(), 2);
    assert_converged(&env).await;
    // A replay of everything, in parallel, rewrites what was damaged.
    env.dwh
        .batch_execute(
            "update dw.orders set amount = -1 where order_id % 100 = 0;
             delete from dw.orders where order_id between 300 and 310;",
        )
        .await
        .unwrap();
    let out = env.pgtide(&["replay", "orders"]).await.ok();
    assert!(
        out.stdout().contains("replayed 20001 rows"),
        "{}",
        out.stdout()
    );
    assert_converged(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_parallel_load_resumes_without_reading_finished_chunks_again() {
    let env = Env::new().await;
    orders(&env, 60_000).await;
    // A rate cap, so the load takes long enough to be killed in the middle: each worker reads
    // 2,000 rows a second, so its chunks (two seconds of work) hold about 4,000 rows.
    env.job("orders", &job(3, 1000, "max_rows_per_sec = 6000"));
    let mut child = env
        .command(&["run-once"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_loaded(&env, 30_000).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    env.wait_until_gone("orders").await;
    let loaded = Env::count(&env.dwh, "dw.orders").await as u64;
    assert!(
        loaded < 60_000,
        "the kill came before the end ({loaded} rows)"
    );
    env.job("orders", &job(3, 1000, ""));
    let out = env.pgtide(&["run-once"]).await.ok();
    let read = out.rows_new();
    // What was committed is not read again; the chunks open when the kill came are (one per
    // worker and one waiting for a worker, each of about 4,000 rows: under 20,000).
    assert!(
        read <= 60_000 - loaded + 20_000,
        "read {read} rows after {loaded} were loaded"
    );
    assert!(
        read >= 60_000 - loaded,
        "read {read} rows after {loaded} were loaded"
    );
    assert_converged(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_load_stays_under_its_rate() {
    let env = Env::new().await;
    orders(&env, 6_000).await;
    env.job("orders", &job(2, 500, "max_rows_per_sec = 3000"));
    let started = Instant::now();
    let out = env.pgtide(&["run-once"]).await.ok();
    let took = started.elapsed().as_secs_f64();
    assert_eq!(out.rows_read(), 6_000);
    // 6,000 rows at 3,000 rows/s take at least 2 s, whatever the number of workers.
    assert!(
        took >= 1.9,
        "6,000 rows at 3,000 rows/s took only {took:.2} s"
    );
    assert!(took < 10.0, "took {took:.2} s");
    assert_converged(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_committing_out_of_order_during_a_parallel_load_is_not_lost() {
    let env = Env::new().await;
    orders(&env, 5_000).await;
    env.job("orders", &job(3, 400, ""));
    // A writer takes its row's cursor values, then stays open while the load runs.
    let writer = support::connect(&env.src_url).await;
    writer
        .batch_execute(
            "begin; insert into orders (customer_id, amount, note, updated_at)
             values (1, 42, 'late', '2025-01-01 00:00:01+00');",
        )
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(out.rows_read(), 5_000);
    writer.batch_execute("commit").await.unwrap();
    // Its row lies inside a chunk that was read before it committed: the next run finds it.
    env.pgtide(&["run-once"]).await.ok();
    assert_converged(&env).await;
    let late = Env::count(&env.dwh, "dw.orders where note = 'late'").await;
    assert_eq!(late, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_signal_during_a_parallel_load_finishes_the_chunks_in_hand() {
    let env = Env::new().await;
    // Chunks hold about two seconds of work: the three in hand when the signal comes hold
    // about 40,000 rows at this rate.
    orders(&env, 100_000).await;
    env.job("orders", &job(3, 1000, "max_rows_per_sec = 20000"));
    let child = run_once_in_background(&env);
    wait_loaded(&env, 5_000).await;
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("stops in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("finishing the chunks being written"),
        "{stderr}"
    );
    assert!(
        stderr.contains("stopped by a signal before every job had caught up"),
        "{stderr}"
    );
    let loaded = Env::count(&env.dwh, "dw.orders").await;
    assert!(loaded < 100_000, "stopped before the end");
    // Whatever was committed is recorded: the next run (unthrottled) reads only the rest.
    env.job("orders", &job(3, 1000, ""));
    let out = env.pgtide(&["run-once"]).await.ok();
    assert_eq!(
        out.rows_new() as i64,
        100_000 - loaded,
        "nothing committed is read again: {}",
        out.stdout()
    );
    assert_converged(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_moved_between_chunks_is_written_last_in_its_newest_version() {
    let env = Env::new().await;
    old_orders(&env).await;
    // Two workers; the second reads slowly, the first chunk (rows 1-100) waits after its
    // snapshot, so it commits last.
    env.job("orders", &job(2, 100, "max_rows_per_sec = 600"));
    let mut run = env
        .command(&["run-once"])
        .env("PGTIDE_HOLD_FIRST_CHUNK_MS", "3000")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Row 5 moves from the first chunk's range into a later chunk's, read after this commit.
    move_row5(&env).await;
    assert!(run.wait().await.unwrap().success());
    // The first chunk wrote the old version of row 5 after a later chunk wrote the new one.
    assert_eq!(
        row5(&env).await,
        "old",
        "the chunks did not commit out of order"
    );
    // The first chunk's window spans the load: the next run reads row 5 again.
    env.pgtide(&["run-once"]).await.ok();
    assert_eq!(row5(&env).await, "new");
    assert_converged(&env).await;
}

/// `run-once` started, its output to be read when it ends (`wait_with_output`).
fn run_once_in_background(env: &Env) -> tokio::process::Child {
    env.command(&["run-once"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until `dw.orders` holds at least `n` rows.
async fn wait_loaded(env: &Env, n: i64) {
    wait_for(60, "a part of the load", || async {
        env.dwh
            .query_opt("select count(*) from dw.orders", &[])
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, i64>(0) >= n)
    })
    .await;
}

/// `CUSTOMER_ORDERS` with 1,000 orders noted 'old', one a second from 2025-01-01 by id.
async fn old_orders(env: &Env) {
    env.src.batch_execute(CUSTOMER_ORDERS).await.unwrap();
    env.src
        .batch_execute(
            "insert into orders (id, customer_id, amount, note, updated_at)
             select g, 1, g, 'old', '2025-01-01'::timestamptz + (g || ' seconds')::interval
             from generate_series(1, 1000) g",
        )
        .await
        .unwrap();
}

/// Note row 5 'new' and move it to 950.5 s, among the last chunks' rows.
async fn move_row5(env: &Env) {
    env.src
        .batch_execute(
            "update orders set note = 'new', updated_at = '2025-01-01'::timestamptz + '950.5 seconds'::interval where id = 5",
        )
        .await
        .unwrap();
}

async fn row5(env: &Env) -> String {
    env.dwh
        .query_one("select note from dw.orders where order_id = 5", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parallel_replay_ends_with_the_newest_version_of_a_row_moved_during_it() {
    let env = Env::new().await;
    old_orders(&env).await;
    env.job("orders", &job(2, 100, "max_rows_per_sec = 600"));
    env.pgtide(&["run-once"]).await.ok();
    let mut replay = env
        .command(&["replay", "orders"])
        .env("PGTIDE_HOLD_FIRST_CHUNK_MS", "3000")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    move_row5(&env).await;
    assert!(replay.wait().await.unwrap().success());
    // The first chunk wrote row 5's old version last; the replay's closing re-read wrote the
    // new one after it.
    assert_eq!(row5(&env).await, "new");
    assert_converged(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_stops_when_the_session_holding_its_lock_is_gone() {
    let env = Env::new().await;
    orders(&env, 40_000).await;
    env.job("orders", &job(2, 1000, "max_rows_per_sec = 8000"));
    let child = run_once_in_background(&env);
    wait_loaded(&env, 3_000).await;
    // The session holding the job's lock ends (a dropped connection, idle_session_timeout):
    // another pgtide could take the lock now, so this one must stop writing.
    let ended: i64 = env
        .dwh
        .query_one(
            "select count(*) from (select pg_terminate_backend(l.pid) from pg_locks l
              where l.locktype = 'advisory' and l.granted and l.pid <> pg_backend_pid()
                and l.database = (select oid from pg_database where datname = current_database())) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 1, "one session holds the job's lock");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("stops in time")
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let loaded = Env::count(&env.dwh, "dw.orders").await;
    assert!(loaded < 40_000, "stopped before the end ({loaded} rows)");
    // The next run takes the lock again and finishes the load.
    env.job("orders", &job(2, 1000, ""));
    env.pgtide(&["run-once"]).await.ok();
    assert_converged(&env).await;
}
