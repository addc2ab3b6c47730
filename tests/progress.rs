//! The progress of loads, through the real binary: `status` while a slow load runs (another
//! process), log lines without a terminal, and a bar on one.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::Env;

/// A job whose every row takes about 2 ms to read: a column sleeps.
fn slow_job(batch: usize) -> String {
    format!(
        "interval_secs = 60\nbatch_size = {batch}\nkey = [\"id\"]\n[from]\ntable = \"items\"\n\
         [[column]]\nname = \"id\"\nfrom = \"items.id\"\n\
         [[column]]\nname = \"slow\"\nsql = \"length(pg_sleep(0.002)::text)\"\n"
    )
}

async fn slow_env(rows: usize, batch: usize) -> Env {
    let env = Env::new().await;
    env.src
        .batch_execute(&format!(
            "create table items (id bigint primary key, v text);
             insert into items select g, 'v' || g from generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    env.job("items", &slow_job(batch));
    env
}

async fn status_json(env: &Env) -> serde_json::Value {
    serde_json::from_str(&env.pgtide(&["status", "--json"]).await.ok().stdout()).unwrap()
}

/// Bytes below 0x20 other than newline and tab, and DEL: what a terminal would act on.
fn control_characters(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .copied()
        .filter(|b| (*b < 0x20 && *b != b'\n' && *b != b'\t') || *b == 0x7f)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_load_shows_its_progress_in_status_and_in_log_lines_without_a_terminal() {
    let env = slow_env(3000, 100).await;
    let child = env
        .command(&["run-once"])
        .env("PGTIDE_PROGRESS_LOG_SECS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // `status` is another process: what it shows comes from the state store.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let mut table = String::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "status never showed the load's progress growing: {seen:?}"
        );
        let v = status_json(&env).await;
        if !v[0]["progress"].is_null() {
            seen.push(v[0]["progress"].clone());
            if table.is_empty() {
                table = env.pgtide(&["status"]).await.ok().stdout();
            }
        }
        let done = |p: &serde_json::Value| p["rows_done"].as_u64().unwrap();
        if seen.len() >= 2 && done(seen.last().unwrap()) > done(&seen[0]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let p = seen.last().unwrap();
    assert_eq!(p["rows_total"].as_u64(), Some(3000), "{p}");
    assert!(p["rows_per_sec"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["eta_secs"].is_u64(), "{p}");
    assert!(
        table.contains("running, loading ")
            && table.contains("/3,000 (")
            && table.contains(" rows/s"),
        "{table}"
    );

    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("run-once finished in time")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("job items: 3000 rows read"), "{stdout}");
    let v = status_json(&env).await;
    assert!(v[0]["progress"].is_null(), "{v}");
    assert_eq!(v[0]["last_run"]["outcome"], "ok");

    assert_eq!(control_characters(&out.stdout), b"", "{stdout}");
    assert_eq!(control_characters(&out.stderr), b"", "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(" loading ")).collect();
    assert!(lines.len() >= 2, "a line a second while loading:\n{stderr}");
    for l in &lines {
        for field in [
            "job=items",
            "rows_done=",
            "rows_total=3000",
            "rows_per_sec=",
            "eta_secs=",
        ] {
            assert!(l.contains(field), "{field} missing in {l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_on_a_terminal_shows_a_bar_with_rate_and_time_left() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no `script` (util-linux) to give pgtide a terminal");
        return;
    }
    let env = slow_env(600, 50).await;
    env.pgtide(&["run-once"]).await.ok();
    // Statistics, so that the estimate of the whole table is exact.
    env.src.batch_execute("analyze items").await.unwrap();
    let command = format!(
        "{} --config {} replay items",
        env!("CARGO_BIN_EXE_pgtide"),
        env.config().display()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("RUST_LOG", "pgtide=info")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("replay finished in time")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("job items: replayed 600 rows"), "{text}");
    assert!(
        text.contains("items [=") && text.contains("/600 (") && text.contains(" rows/s, ETA "),
        "no bar drawn: {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rows_of_a_load_are_estimated_cheaply_and_closely() {
    let env = slow_env(5000, 100).await;
    let config = pgtide::config::load(&env.config()).unwrap();
    let job = config.jobs[0].clone();
    let view = pgtide::view::resolve(&env.src, &job).await.unwrap();
    let estimate = |lo: Option<&str>, hi: Option<&str>| {
        let (lo, hi) = (
            lo.map(|v| vec![v.to_string()]),
            hi.map(|v| vec![v.to_string()]),
        );
        let (src, view) = (&env.src, &view);
        async move {
            pgtide::source::estimate(src, view, lo.as_deref(), hi.as_deref())
                .await
                .unwrap()
        }
    };
    // Never analyzed, and small: counted.
    assert_eq!(estimate(None, None).await, Some(5000));
    env.src
        .batch_execute(
            "insert into items select g, 'v' from generate_series(5001, 6000) g; analyze items",
        )
        .await
        .unwrap();
    assert_eq!(estimate(None, None).await, Some(6000));
    // Past a watermark, and a range: the planner's estimate, near the truth.
    let past = estimate(Some("4000"), None).await.unwrap();
    assert!((1800..=2200).contains(&past), "{past}");
    let range = estimate(Some("1000"), Some("2000")).await.unwrap();
    assert!((800..=1200).contains(&range), "{range}");
}
