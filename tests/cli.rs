//! The shipped examples, the demo, and commands that must change nothing.

mod support;

use support::Env;

#[tokio::test(flavor = "multi_thread")]
async fn the_example_config_and_jobs_pass_check_and_load_the_demo_shop() {
    let env = Env::new().await;
    env.src.batch_execute(pgtide::demo::SHOP_SQL).await.unwrap();
    // The repository's own pgtide.toml and jobs/, unchanged, with URLs from the environment.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("pgtide.toml"), env.config()).unwrap();
    for (name, text) in pgtide::demo::EXAMPLE_JOBS {
        assert_eq!(
            &std::fs::read_to_string(root.join("jobs").join(name)).unwrap(),
            text
        );
        env.job(name.trim_end_matches(".toml"), text);
    }
    let with_env = |args: &[&str]| {
        let mut c = env.command(args);
        c.env("SHOP_URL", &env.src_url).env("DWH_URL", &env.dwh_url);
        c
    };
    let out = with_env(&["check"]).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok   customers") && stdout.contains("ok   orders"),
        "{stdout}"
    );
    // The demo shop has the index the orders job's (updated_at, id) watermark needs.
    assert!(!stdout.contains("warn "), "{stdout}");

    let out = with_env(&["run-once"]).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(Env::count(&env.dwh, "analytics.orders_wide").await, 20000);
    assert_eq!(Env::count(&env.dwh, "analytics.customers").await, 500);
    // The transforms of the example: map with default, JSON fields, an expression.
    let src = Env::rows(
        &env.src,
        "select o.id, c.name, case o.status when 1 then 'created' when 2 then 'processing' when 3 then 'done' else 'unknown' end,
                (o.amount * 100)::bigint, o.payload->'meta'->>'channel', o.payload->'items'->0->>'sku'
         from orders o left join customers c on c.id = o.customer_id",
    )
    .await;
    let dwh = Env::rows(
        &env.dwh,
        "select order_id, customer_name, status_label, amount_cents, channel, first_sku from analytics.orders_wide",
    )
    .await;
    assert_eq!(src, dwh);

    // Without the variables, check names them.
    let out = env
        .command(&["check"])
        .env_remove("SHOP_URL")
        .env_remove("DWH_URL")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sources.shop.url: environment variable SHOP_URL is not set"),
        "{stderr}"
    );
    assert!(
        stderr.contains("dwh.url: environment variable DWH_URL is not set"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_runs_and_cleans_up() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgtide"))
        .arg("demo")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("job orders     first run: 20000 rows in 2 batches"),
        "{stdout}"
    );
    assert!(
        stdout.contains("after 3 updates and 1 insert: 4 rows read, 4 changed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("DWH holds 20001 orders and 500 customers."),
        "{stdout}"
    );
    assert!(
        stdout.contains("the throwaway PostgreSQL is stopped and removed"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_changes_nothing_and_uninstalled_notify_jobs_are_refused() {
    let env = Env::new().await;
    env.src
        .batch_execute("create table t (id bigint primary key, v text); insert into t select g, 'v' from generate_series(1, 7) g")
        .await
        .unwrap();
    env.job("t", "interval_secs = 5\nkey = [\"id\"]\n[from]\ntable = \"t\"\n[[column]]\nname = \"id\"\nfrom = \"t.id\"\n");
    let out = env
        .pgtide(&["replay", "t", "--from", "2", "--dry-run"])
        .await
        .ok();
    assert!(
        out.stdout().contains("replay would read 5 source rows"),
        "{}",
        out.stdout()
    );
    let tables: i64 = env
        .dwh
        .query_one("select count(*) from pg_tables where schemaname not in ('pg_catalog', 'information_schema')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "a dry run must not create anything in the DWH");

    // A notify job whose triggers are not installed is refused before anything is written.
    env.job("t", "mode = \"notify\"\nkey = [\"id\"]\n[from]\ntable = \"t\"\n[[column]]\nname = \"id\"\nfrom = \"t.id\"\n");
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("job t: its triggers are not installed in the source"),
        "{}",
        out.stderr()
    );
    assert_eq!(
        Env::count(&env.dwh, "pg_tables where schemaname = 'dw'").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_once_writes_a_metrics_file_for_the_textfile_collector() {
    let env = Env::new().await;
    env.src
        .batch_execute("create table t (id bigint primary key); insert into t select g from generate_series(1, 12) g")
        .await
        .unwrap();
    env.job("t", "interval_secs = 5\nbatch_size = 5\nkey = [\"id\"]\n[from]\ntable = \"t\"\n[[column]]\nname = \"id\"\nfrom = \"t.id\"\n");
    let file = env.dir.path().join("pgtide.prom");
    // Under the systemd unit's UMask=0077: node_exporter, another user, must still read it.
    let pgtide = env.command(&["run-once", "--metrics-file", file.to_str().unwrap()]);
    let status = tokio::process::Command::new("sh")
        .args(["-c", "umask 077; exec \"$0\" \"$@\""])
        .arg(pgtide.as_std().get_program())
        .args(pgtide.as_std().get_args())
        .env("RUST_LOG", "pgtide=info")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644, "{mode:o}");
    let text = std::fs::read_to_string(&file).unwrap();
    for want in [
        "pgtide_rows_written_total{job=\"t\"} 12\n",
        "pgtide_runs_total{job=\"t\",outcome=\"ok\"} 1\n",
        "pgtide_batch_duration_seconds_count{job=\"t\"} 3\n",
        "pgtide_waiting{job=\"t\"} 0\n",
        "pgtide_retry_attempt{job=\"t\"} 0\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(
        text.contains("pgtide_seconds_since_last_success{job=\"t\"} "),
        "{text}"
    );
    assert!(!env.dir.path().join("pgtide.tmp").exists());
}

/// Regression: a 71-byte target failed `check` and `run-once` with only `identifier too long`.
#[tokio::test(flavor = "multi_thread")]
async fn identifiers_longer_than_63_bytes_are_config_problems_naming_field_and_value() {
    let env = Env::new().await;
    env.src
        .batch_execute("create table t (id bigint primary key)")
        .await
        .unwrap();
    let target = "a".repeat(71);
    let column = "c".repeat(64);
    env.job(
        "orders",
        &format!("interval_secs = 5\ntarget = \"{target}\"\nkey = [\"id\"]\n[from]\ntable = \"t\"\n[[column]]\nname = \"id\"\nfrom = \"t.id\"\n[[column]]\nname = \"{column}\"\nfrom = \"t.id\"\n"),
    );
    for args in [&["check"][..], &["run-once"][..]] {
        let out = env.pgtide(args).await;
        assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr());
        let stderr = out.stderr();
        for want in [
            format!("jobs/orders.toml: target: \"{target}\" is 71 bytes long; PostgreSQL identifiers are at most 63 bytes"),
            format!("jobs/orders.toml: column[1].name: \"{column}\" is 64 bytes long; PostgreSQL identifiers are at most 63 bytes"),
        ] {
            assert!(stderr.contains(&want), "{args:?}: missing {want:?} in:\n{stderr}");
        }
        assert!(!stderr.contains("identifier too long"), "{stderr}");
    }
    assert_eq!(
        Env::count(&env.dwh, "pg_namespace where nspname in ('dw', 'pgtide')").await,
        0,
        "nothing is written for an invalid job"
    );
}

/// What `check`'s `warn` lines for job file `file` say, in order.
fn warnings(stdout: &str, file: &str) -> Vec<String> {
    let tail = format!("/jobs/{file}: ");
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("warn "))
        .filter_map(|l| l.split_once(&tail).map(|(_, w)| w.to_string()))
        .collect()
}

/// The statements a warning gives, run on `client` as printed.
async fn run_fix(client: &tokio_postgres::Client, warning: &str) {
    let (_, statements) = warning.rsplit_once(": ").unwrap();
    for s in statements.split("; ") {
        assert!(s.starts_with("create index "), "{warning}");
        client
            .batch_execute(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e:?}"));
    }
}

/// `pgtide check`, which must pass; its stdout.
async fn check_passes(env: &Env) -> String {
    let out = env.pgtide(&["check"]).await.ok();
    out.stdout()
}

fn poll_job(table: &str, watermark: &str) -> String {
    format!("interval_secs = 5\nkey = [\"id\"]\n{watermark}\n[from]\ntable = '{table}'\nas = \"o\"\n[[column]]\nname = \"id\"\nfrom = \"o.id\"\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn check_warns_about_a_watermark_no_index_serves_and_gives_the_statement() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "create table orders (id bigint primary key, updated_at timestamptz not null, v text);
             create schema \"Sales\";
             create table \"Sales\".\"Order Lines\" (id bigint primary key, \"order\" timestamptz not null)",
        )
        .await
        .unwrap();
    env.job(
        "orders",
        &poll_job("orders", "watermark = [\"updated_at\", \"id\"]"),
    );
    env.job("by_id", &poll_job("orders", ""));
    env.job(
        "lines",
        &poll_job("Sales.Order Lines", "watermark = [\"order\", \"id\"]"),
    );

    let stdout = check_passes(&env).await;
    let warned = warnings(&stdout, "orders.toml");
    assert_eq!(
        warned,
        ["watermark (updated_at, id): no index on public.orders starts with these columns in this order, \
          so every batch sorts or scans the table to find where it ends: \
          create index concurrently on public.orders (updated_at, id)"],
        "{stdout}"
    );
    // After the job's ok line; the primary key serves a cursor on it.
    let ok = stdout.find("ok   orders").expect("ok line");
    assert!(stdout.find("/jobs/orders.toml: ").unwrap() > ok, "{stdout}");
    assert!(warnings(&stdout, "by_id.toml").is_empty(), "{stdout}");
    // Identifiers are quoted where PostgreSQL needs it, and only there.
    let lines = warnings(&stdout, "lines.toml");
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0]
            .ends_with(": create index concurrently on \"Sales\".\"Order Lines\" (\"order\", id)"),
        "{stdout}"
    );

    // The columns in another order do not serve the cursor's order.
    env.src
        .batch_execute("create index swapped on orders (id, updated_at)")
        .await
        .unwrap();
    assert_eq!(warnings(&check_passes(&env).await, "orders.toml"), warned);

    // The statements as printed fix it.
    run_fix(&env.src, &warned[0]).await;
    run_fix(&env.src, &lines[0]).await;
    let stdout = check_passes(&env).await;
    assert!(!stdout.contains("warn "), "{stdout}");

    // A longer index led by the cursor serves too (PostgreSQL named the fix's index).
    env.src
        .batch_execute(
            "drop index orders_updated_at_id_idx; create index longer on orders (updated_at, id, v)",
        )
        .await
        .unwrap();
    let stdout = check_passes(&env).await;
    assert!(!stdout.contains("warn "), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_warns_about_every_partition_of_a_partitioned_main_table_without_the_index() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "create table events (id bigint not null, updated_at timestamptz not null) partition by range (updated_at);
             create table events_2024 partition of events for values from ('2024-01-01') to ('2025-01-01');
             create table events_2025 partition of events for values from ('2025-01-01') to ('2026-01-01');
             create index on events_2024 (updated_at, id)",
        )
        .await
        .unwrap();
    env.job(
        "events",
        &poll_job("events", "watermark = [\"updated_at\", \"id\"]"),
    );
    let stdout = check_passes(&env).await;
    let warned = warnings(&stdout, "events.toml");
    assert_eq!(
        warned,
        ["watermark (updated_at, id): no index on partition public.events_2025 of public.events starts with these columns in this order, \
          so every batch sorts or scans the table to find where it ends: \
          create index concurrently on public.events_2025 (updated_at, id)"],
        "{stdout}"
    );
    run_fix(&env.src, &warned[0]).await;
    let stdout = check_passes(&env).await;
    assert!(!stdout.contains("warn "), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_warns_about_notify_joins_without_indexes_on_either_side() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "create table customers (id bigint not null, name text);
             create table orders (id bigint primary key, customer_id bigint)",
        )
        .await
        .unwrap();
    env.job(
        "shop",
        "mode = \"notify\"\nkey = [\"id\"]\n[from]\ntable = \"orders\"\nas = \"o\"\n[[join]]\ntable = \"customers\"\nas = \"c\"\ntype = \"left\"\non = { \"o.customer_id\" = \"c.id\" }\n[[column]]\nname = \"id\"\nfrom = \"o.id\"\n[[column]]\nname = \"customer\"\nfrom = \"c.name\"\n",
    );
    env.pgtide(&["install", "shop"]).await.ok();
    let stdout = check_passes(&env).await;
    let warned = warnings(&stdout, "shop.toml");
    assert_eq!(
        warned,
        [
            "join c (id): no index on public.customers starts with these columns, \
             so every drain scans it to join the rows it re-reads: \
             create index concurrently on public.customers (id)",
            "join c (customer_id): no index on public.orders starts with these columns, \
             so every drain scans it to find the rows a change of public.customers affects: \
             create index concurrently on public.orders (customer_id)",
        ],
        "{stdout}"
    );
    for w in &warned {
        run_fix(&env.src, w).await;
    }
    let stdout = check_passes(&env).await;
    assert!(!stdout.contains("warn "), "{stdout}");
    assert!(stdout.contains("ok   shop"), "{stdout}");
}
