//! Test support: one throwaway PostgreSQL per test binary (stopped at exit), a fresh source
//! and DWH database per test, a config directory per test, and the real `pgtide` binary;
//! `clickhouse`: the same for a throwaway ClickHouse; `verify`: `pgtide verify` and its report.
#![allow(dead_code)]

pub mod clickhouse;
pub mod verify;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgtide::cluster::Cluster;
use tokio_postgres::{Client, NoTls};

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static STANDBY: OnceLock<Cluster> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

extern "C" fn stop_cluster() {
    // Statics are never dropped: their directories are removed here, or each test binary
    // would leave a data directory behind.
    if let Some(c) = STANDBY.get() {
        c.discard();
    }
    if let Some(c) = CLUSTER.get() {
        c.discard();
    }
}

/// A hot standby of the shared cluster, made with `pg_basebackup -R` on first use.
pub fn standby() -> &'static Cluster {
    STANDBY.get_or_init(|| {
        cluster()
            .standby()
            .unwrap_or_else(|e| panic!("cannot start a hot standby: {e}"))
    })
}

/// The shared cluster. A machine without PostgreSQL fails here, loudly.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let c = Cluster::start().unwrap_or_else(|e| panic!("cannot start a test PostgreSQL: {e}"));
        unsafe { libc::atexit(stop_cluster) };
        c
    })
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub src_url: String,
    pub dwh_url: String,
    pub src: Client,
    pub dwh: Client,
}

impl Env {
    /// Fresh databases and a config directory with `pgtide.toml` (source "shop", DWH schema "dw").
    pub async fn new() -> Env {
        let c = cluster();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}_{n}", std::process::id());
        let admin = connect(&c.url("postgres")).await;
        for db in [format!("src_{tag}"), format!("dwh_{tag}")] {
            admin
                .batch_execute(&format!("create database {db}"))
                .await
                .unwrap();
        }
        let src_url = c.url(&format!("src_{tag}"));
        let dwh_url = c.url(&format!("dwh_{tag}"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("jobs")).unwrap();
        let env = Env {
            src: connect(&src_url).await,
            dwh: connect(&dwh_url).await,
            dir,
            src_url,
            dwh_url,
        };
        env.write_config(&env.src_url.clone(), &env.dwh_url.clone());
        env
    }

    pub fn write_config(&self, src: &str, dwh: &str) {
        let toml = format!(
            "state_path = \"state/pgtide.db\"\n[sources.shop]\nurl = \"{src}\"\n[dwh]\nurl = \"{dwh}\"\nschema = \"dw\"\n"
        );
        std::fs::write(self.config(), toml).unwrap();
    }

    /// The URL of this environment's source database on the hot standby.
    pub fn standby_url(&self) -> String {
        let db = self.src_url.rsplit('/').next().unwrap();
        standby().url(db)
    }

    /// Wait until the standby has replayed everything the primary has written so far (the
    /// test cluster runs with `synchronous_commit = off`: a commit's WAL is flushed later).
    pub async fn wait_replayed(&self) {
        // A commit that wrote WAL, with synchronous_commit on, flushes (and so sends) all WAL
        // before it. Rewriting public's comment is such a write, and changes nothing.
        self.src
            .batch_execute(
                "begin; set local synchronous_commit = on;
                 comment on schema public is 'standard public schema'; commit",
            )
            .await
            .unwrap();
        let lsn: String = self
            .src
            .query_one("select pg_current_wal_flush_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        // The test's database may not exist on the standby yet: ask through another one.
        let replica = connect(&standby().url("postgres")).await;
        let replica = &replica;
        wait_for(60, "the standby to replay the primary's changes", || {
            let lsn = lsn.clone();
            async move {
                replica
                    .query_one(
                        "select pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                        &[&lsn],
                    )
                    .await
                    .unwrap()
                    .get::<_, bool>(0)
            }
        })
        .await;
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("pgtide.toml")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state/pgtide.db")
    }

    pub fn job(&self, name: &str, toml: &str) {
        std::fs::write(
            self.dir.path().join("jobs").join(format!("{name}.toml")),
            toml,
        )
        .unwrap();
    }

    /// Run the real binary with this environment's config; every run has a deadline.
    pub async fn pgtide(&self, args: &[&str]) -> Out {
        let mut cmd = self.command(args);
        let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
            .await
            .expect("pgtide did not finish within 300 s")
            .expect("run pgtide");
        Out(out)
    }

    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgtide"));
        cmd.arg("--config")
            .arg(self.config())
            .args(args)
            .kill_on_drop(true);
        cmd.env("RUST_LOG", "pgtide=info");
        cmd
    }

    /// Sorted text forms of the rows of `query` on `client`.
    pub async fn rows(client: &Client, query: &str) -> Vec<String> {
        let q = format!("select whole_row_::text from ({query}) whole_row_");
        let mut v: Vec<String> = client
            .query(&q, &[])
            .await
            .unwrap_or_else(|e| panic!("{q}: {e:?}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        v.sort();
        v
    }

    /// Wait until no session of job `job` is left in the source: a killed pgtide's sessions
    /// (and its job lock) live on until the server notices, at the latest when their current
    /// statement ends.
    pub async fn wait_until_gone(&self, job: &str) {
        let app = format!("pgtide:{job}");
        let src = &self.src;
        wait_for(
            60,
            &format!("the sessions of a killed pgtide ({app}) to end"),
            || {
                let app = app.clone();
                async move {
                    src.query_one(
                        "select count(*) from pg_stat_activity where application_name = $1",
                        &[&app],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
                        == 0
                }
            },
        )
        .await;
    }

    pub async fn count(client: &Client, table: &str) -> i64 {
        client
            .query_one(&format!("select count(*) from {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// A finished pgtide process.
pub struct Out(pub Output);

impl Out {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// The `N` of `job x: N rows read, ...` in the output of `run-once`.
    pub fn rows_read(&self) -> u64 {
        let out = self.stdout();
        let before = out.split(" rows read").next().unwrap_or_default();
        before
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no rows read in: {out}"))
    }

    /// Rows the run re-read by rechecking open windows (`0` when it says nothing of them).
    pub fn rows_rechecked(&self) -> u64 {
        let out = self.stdout();
        out.split(" re-read by recheck")
            .next()
            .filter(|before| before.len() < out.len())
            .and_then(|before| before.rsplit('(').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Rows the run read as new: read, less those re-read by recheck. Other tests' transactions
    /// on the shared server can keep a window open (conservatively) and make a recheck re-read
    /// rows that did not change.
    pub fn rows_new(&self) -> u64 {
        self.rows_read() - self.rows_rechecked()
    }

    /// Assert success, showing everything pgtide said otherwise.
    pub fn ok(self) -> Out {
        assert_eq!(
            self.code(),
            0,
            "pgtide failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// Customers 1 to 10, and an empty `orders` of theirs (a `bigserial` id) indexed on
/// `(updated_at, id)`.
pub const CUSTOMER_ORDERS: &str = "
    create table customers (id bigint primary key, name text not null);
    create table orders (
        id bigserial primary key,
        customer_id bigint references customers (id),
        amount numeric(12, 2) not null,
        note text,
        updated_at timestamptz not null default now()
    );
    create index on orders (updated_at, id);
    insert into customers select g, 'customer ' || g from generate_series(1, 10) g;";

/// A notify job of `orders` (as `o`) joined (`join`) with `customers` (as `c`), in batches of 7:
/// `order_id`, `customer`, `amount` and `note`.
pub fn orders_notify_job(join: &str, on_delete: &str) -> String {
    format!(
        r#"mode = "notify"
        batch_size = 7
        key = ["order_id"]
        on_delete = "{on_delete}"
        [from]
        table = "orders"
        as = "o"
        [[join]]
        table = "customers"
        as = "c"
        type = "{join}"
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

/// `[[column]]` tables of a job: each of `names` taken as it is from `table`.
pub fn columns(table: &str, names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("[[column]]\nname = \"{n}\"\nfrom = \"{table}.{n}\"\n"))
        .collect()
}

/// Wait for `cond` up to `secs`, or panic with `what`.
pub async fn wait_for<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {secs} s waiting for {what}");
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
