//! `pgtide verify --json` through the real binary, and what its report says.

use serde_json::Value;

use super::{Env, Out};

/// Run `verify JOB --json ARGS...` with the variable `set`, if any, set to `1`; the exit code,
/// the report and the output.
pub async fn verify_with(
    env: &Env,
    job: &str,
    args: &[&str],
    set: Option<&str>,
) -> (i32, Value, Out) {
    let mut all = vec!["verify", job, "--json"];
    all.extend_from_slice(args);
    let mut cmd = env.command(&all);
    if let Some(var) = set {
        cmd.env(var, "1");
    }
    let out = Out(
        tokio::time::timeout(std::time::Duration::from_secs(300), cmd.output())
            .await
            .expect("verify did not finish within 300 s")
            .expect("run pgtide"),
    );
    let report = serde_json::from_str(&out.stdout()).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON report ({e})\nstdout:\n{}\nstderr:\n{}",
            out.stdout(),
            out.stderr()
        )
    });
    (out.code(), report, out)
}

/// `verify_with` finds nothing; the report.
pub async fn clean_with(env: &Env, job: &str, args: &[&str], set: Option<&str>) -> Value {
    let (code, report, out) = verify_with(env, job, args, set).await;
    assert_eq!(
        (code, counts(&report)),
        (0, (0, 0, 0)),
        "verify should find nothing\n{report}\nstderr:\n{}",
        out.stderr()
    );
    report
}

/// `(missing, different, extra)` of a report.
pub fn counts(report: &Value) -> (u64, u64, u64) {
    let n = |k: &str| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {report}"))
    };
    (n("missing"), n("different"), n("extra"))
}

/// The keys of one kind in a report, sorted, each as its values joined by `|`.
pub fn keys(report: &Value, kind: &str) -> Vec<String> {
    let mut v: Vec<String> = report["keys"][kind]
        .as_array()
        .unwrap_or_else(|| panic!("no keys.{kind} in {report}"))
        .iter()
        .map(|k| {
            k.as_array()
                .expect("a key is an array of values")
                .iter()
                .map(|x| x.as_str().expect("key values are text").to_string())
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    v.sort();
    v
}

/// Owned copies of `v`, to compare with [`keys`].
pub fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// How many windows job `job` has open, from `status --json`.
pub async fn open_windows(env: &Env, job: &str) -> u64 {
    let out = Out(env
        .command(&["status", "--json", job])
        .output()
        .await
        .unwrap());
    let v: Value = serde_json::from_str(&out.stdout()).unwrap();
    v[0]["open_windows"].as_u64().unwrap()
}

/// A session of `url` that tried to take job `job`'s lock, as another pgtide running it would,
/// and whether it got it; the lock is held until the client is dropped.
pub async fn lock_job(url: &str, job: &str) -> (tokio_postgres::Client, bool) {
    let holder = super::connect(url).await;
    let held: bool = holder
        .query_one(
            "select pg_try_advisory_lock(hashtextextended('pgtide job ' || $1::text, 0))",
            &[&job],
        )
        .await
        .unwrap()
        .get(0);
    (holder, held)
}
