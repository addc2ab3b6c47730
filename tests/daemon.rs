//! `pgtide run` against real databases: schedules, overlapping ticks, signals, a DWH that goes
//! away, permanent errors, two processes, metrics.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::{wait_for, Env};

fn poll_job(table: &str, schedule: &str, batch: usize) -> String {
    format!(
        "{schedule}\nbatch_size = {batch}\nkey = [\"id\"]\n[from]\ntable = \"{table}\"\n[[column]]\nname = \"id\"\nfrom = \"{table}.id\"\n[[column]]\nname = \"v\"\nfrom = \"{table}.v\"\n"
    )
}

struct Daemon {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Daemon {
    fn start(env: &Env) -> Daemon {
        Daemon::start_with(env, &[])
    }

    /// `start`, with these environment variables set for the daemon.
    fn start_with(env: &Env, vars: &[(&str, &str)]) -> Daemon {
        let log = env.dir.path().join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = env
            .command(&["run"])
            .envs(vars.iter().copied())
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the exit status (it must come within the deadline).
    async fn stop(mut self) -> (std::process::ExitStatus, String) {
        unsafe { libc::kill(self.child.id().unwrap() as i32, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(70), self.child.wait())
            .await
            .expect("stopped in time")
            .unwrap();
        (status, self.log())
    }
}

async fn count(env: &Env, table: &str) -> i64 {
    match env
        .dwh
        .query_one(&format!("select count(*) from dw.{table}"), &[])
        .await
    {
        Ok(r) => r.get(0),
        Err(_) => 0,
    }
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Prometheus text: every sample line is `name{labels} value` with a number for a value.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l}"));
            (
                name.to_string(),
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("not a number: {l}")),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cron_and_interval_jobs_fire_and_metrics_match_what_was_loaded() {
    let env = Env::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = std::fs::read_to_string(env.config()).unwrap()
        + &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n");
    std::fs::write(env.config(), toml).unwrap();
    env.src
        .batch_execute("create table a (id bigint primary key, v text); create table b (id bigint primary key, v text);
                        insert into a select g, 'a' from generate_series(1, 10) g; insert into b select g, 'b' from generate_series(1, 20) g;")
        .await
        .unwrap();
    env.job("by_cron", &poll_job("a", "cron = \"*/1 * * * * *\"", 1000));
    env.job("by_interval", &poll_job("b", "interval_secs = 1", 1000));
    let daemon = Daemon::start(&env);
    wait_for(20, "both jobs' first runs", || async {
        count(&env, "by_cron").await == 10 && count(&env, "by_interval").await == 20
    })
    .await;
    env.src
        .batch_execute("insert into a values (11, 'a'); insert into b values (21, 'b'), (22, 'b')")
        .await
        .unwrap();
    wait_for(20, "the next ticks", || async {
        count(&env, "by_cron").await == 11 && count(&env, "by_interval").await == 22
    })
    .await;
    // A run is counted when it has ended, a moment after its last rows landed.
    wait_for(20, "the runs that loaded them to end", || async {
        let response = http_get(port, "/metrics").await;
        samples(response.split("\r\n\r\n").nth(1).unwrap_or(""))
            .iter()
            .any(|(n, v)| n == "pgtide_runs_total{job=\"by_cron\",outcome=\"ok\"}" && *v >= 2.0)
    })
    .await;

    assert!(http_get(port, "/healthz").await.ends_with("\r\n\r\nok\n"));
    let response = http_get(port, "/metrics").await;
    assert!(
        response.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4"),
        "{response}"
    );
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    let s = samples(body);
    let get = |name: &str| {
        s.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
    };
    assert_eq!(get("pgtide_rows_written_total{job=\"by_cron\"}"), 11.0);
    assert_eq!(get("pgtide_rows_written_total{job=\"by_interval\"}"), 22.0);
    assert!(get("pgtide_runs_total{job=\"by_cron\",outcome=\"ok\"}") >= 2.0);
    assert_eq!(
        get("pgtide_runs_total{job=\"by_cron\",outcome=\"failed\"}"),
        0.0
    );
    assert!(get("pgtide_batch_duration_seconds_count{job=\"by_interval\"}") >= 2.0);
    assert!(get("pgtide_seconds_since_last_success{job=\"by_cron\"}") < 10.0);
    assert_eq!(get("pgtide_retry_attempt{job=\"by_cron\"}"), 0.0);
    assert_eq!(
        http_get(port, "/nope").await.lines().next().unwrap(),
        "HTTP/1.1 404 Not Found"
    );

    let (status, log) = daemon.stop().await;
    assert!(status.success(), "{status:?}\n{log}");
    let v: serde_json::Value =
        serde_json::from_str(&env.pgtide(&["status", "--json"]).await.ok().stdout()).unwrap();
    assert!(
        v[0]["seconds_since_last_success"].as_f64().unwrap() < 30.0,
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_in_hand_is_in_the_metrics_and_the_log_until_it_ends() {
    let env = Env::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = std::fs::read_to_string(env.config()).unwrap()
        + &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n");
    std::fs::write(env.config(), toml).unwrap();
    env.src
        .batch_execute("create table slow (id bigint primary key, v text); insert into slow select g, 'v' from generate_series(1, 3000) g")
        .await
        .unwrap();
    // Every row takes about 2 ms to read: a load of some seconds.
    env.job(
        "slow",
        &(poll_job("slow", "interval_secs = 60", 100)
            + "[[column]]\nname = \"pause\"\nsql = \"length(pg_sleep(0.002)::text)\"\n"),
    );
    let daemon = Daemon::start_with(&env, &[("PGTIDE_PROGRESS_LOG_SECS", "1")]);
    let metrics = || async {
        let response = http_get(port, "/metrics").await;
        samples(response.split("\r\n\r\n").nth(1).unwrap_or(""))
    };
    let get = |s: &[(String, f64)], name: &str| {
        s.iter()
            .find(|(n, _)| n == &format!("{name}{{job=\"slow\"}}"))
            .map(|(_, v)| *v)
    };
    wait_for(30, "the daemon to serve /metrics", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let s = metrics().await;
        if get(&s, "pgtide_load_rows_done").unwrap_or(0.0) > 0.0 {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the metrics never showed the load under way"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(get(&seen, "pgtide_load_rows_total"), Some(3000.0));
    assert!(get(&seen, "pgtide_load_rows_per_second").unwrap() > 0.0);
    assert!(get(&seen, "pgtide_load_eta_seconds").is_some());
    wait_for(60, "the load to end", || async {
        count(&env, "slow").await == 3000
            && get(&metrics().await, "pgtide_load_rows_done").is_none()
    })
    .await;
    let (status, log) = daemon.stop().await;
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        log.lines().any(|l| l.contains(" loading ")
            && l.contains("job=slow")
            && l.contains("rows_total=3000")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overlapping_tick_is_skipped_and_sigterm_mid_load_exits_0() {
    let env = Env::new().await;
    env.src
        .batch_execute("create table big (id bigint primary key, v text); insert into big select g, repeat('x', 50) from generate_series(1, 300000) g")
        .await
        .unwrap();
    // Held to a rate, so that the load (chunks that grow) is still going at the next tick.
    env.job(
        "big",
        &poll_job("big", "interval_secs = 1\nmax_rows_per_sec = 30000", 500),
    );
    let daemon = Daemon::start(&env);
    wait_for(30, "the load to be under way", || async {
        count(&env, "big").await > 5000
    })
    .await;
    wait_for(10, "a tick to find the run still going", || async {
        daemon
            .log()
            .contains("tick skipped: the previous run is still going")
    })
    .await;
    // A second pgtide cannot run the job while the daemon does.
    let out = env.pgtide(&["run-once", "big"]).await;
    assert_eq!(out.code(), 3, "{}", out.stderr());

    let (status, log) = daemon.stop().await;
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        log.contains("stopping: finishing the chunks being written"),
        "{log}"
    );
    let landed = count(&env, "big").await;
    assert!(landed < 300000, "the stop came too late to test anything");
    let out = env.pgtide(&["run-once"]).await.ok();
    let read = out.rows_new() as i64;
    assert_eq!(
        read,
        300000 - landed,
        "the next run continues where the stopped one committed"
    );
    assert_eq!(count(&env, "big").await, 300000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dwh_that_goes_away_is_waited_for_and_caught_up_with() {
    let env = Env::new().await;
    // The DWH on a server of its own, to stop it without disturbing other tests.
    let dwh_cluster = tokio::task::spawn_blocking(pgtide::cluster::Cluster::start)
        .await
        .unwrap()
        .unwrap();
    let admin = support::connect(&dwh_cluster.url("postgres")).await;
    admin.batch_execute("create database dwh").await.unwrap();
    env.write_config(&env.src_url, &dwh_cluster.url("dwh"));
    env.src.batch_execute("create table t (id bigint primary key, v text); insert into t select g, 'v' from generate_series(1, 5) g").await.unwrap();
    env.job("t", &poll_job("t", "interval_secs = 1", 1000));
    let daemon = Daemon::start(&env);
    let dwh_count = |url: String| async move {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                c.query_one("select count(*) from dw.t", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0))
                    .unwrap_or(0)
            }
            Err(_) => -1,
        }
    };
    let url = dwh_cluster.url("dwh");
    wait_for(20, "the first load", || async {
        dwh_count(url.clone()).await == 5
    })
    .await;

    drop(admin);
    tokio::task::block_in_place(|| dwh_cluster.pause()).unwrap();
    env.src
        .batch_execute("insert into t select g, 'during' from generate_series(6, 50) g")
        .await
        .unwrap();
    wait_for(30, "the daemon to notice and retry", || async {
        daemon.log().contains("transient failure; retrying")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| dwh_cluster.resume()).unwrap();
    wait_for(60, "the daemon to catch up by itself", || async {
        dwh_count(url.clone()).await == 50
    })
    .await;
    let (status, log) = daemon.stop().await;
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("attempt=1"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_error_fails_that_job_only_and_shows_in_status() {
    let env = Env::new().await;
    env.src
        .batch_execute("create table good (id bigint primary key, v text); create table gone (id bigint primary key, v text);
                        insert into good values (1, 'g'); insert into gone values (1, 'x');")
        .await
        .unwrap();
    env.job("good", &poll_job("good", "interval_secs = 1", 1000));
    env.job("gone", &poll_job("gone", "interval_secs = 1", 1000));
    let daemon = Daemon::start(&env);
    wait_for(20, "both first runs", || async {
        count(&env, "good").await == 1 && count(&env, "gone").await == 1
    })
    .await;
    env.src
        .batch_execute("drop table gone; insert into good values (2, 'g')")
        .await
        .unwrap();
    wait_for(20, "the good job to go on", || async {
        count(&env, "good").await == 2
    })
    .await;
    wait_for(20, "the failure to be recorded", || async {
        let v: serde_json::Value =
            serde_json::from_str(&env.pgtide(&["status", "--json", "gone"]).await.stdout())
                .unwrap_or_default();
        v[0]["last_run"]["outcome"] == "failed"
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(
        &env.pgtide(&["status", "--json", "gone"])
            .await
            .ok()
            .stdout(),
    )
    .unwrap();
    assert!(
        v[0]["last_run"]["error"]
            .as_str()
            .unwrap()
            .contains("table public.gone does not exist"),
        "{v}"
    );
    let (status, log) = daemon.stop().await;
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        log.contains("run failed; waiting for the next tick"),
        "{log}"
    );
    assert!(
        !log.contains("job=gone") || !log.contains("transient failure"),
        "a missing table is not retried as transient:\n{log}"
    );
}
