//! Where positions live, under concurrency: one state file shared by many pgtide processes
//! started at the same instant (through the real binary; waiting for another process's lock
//! is never an error), and the DWH's copy of a position, which never moves backwards.

mod support;

use support::{Env, Out};

const ROWS: i64 = 20_000;

/// A poll job over `t`, in batches small enough that a run takes a while.
async fn env_with_job() -> Env {
    let env = Env::new().await;
    env.src
        .batch_execute(&format!(
            "create table t (id bigint primary key, v text not null);
             insert into t select g, 'row ' || g from generate_series(1, {ROWS}) g"
        ))
        .await
        .unwrap();
    env.job(
        "t",
        "interval_secs = 60\nbatch_size = 1000\nkey = [\"id\"]\n[from]\ntable = \"t\"\n[[column]]\nname = \"id\"\nfrom = \"t.id\"\n[[column]]\nname = \"v\"\nfrom = \"t.v\"\n",
    );
    assert!(!env.state().exists(), "the state file must be new");
    env
}

/// Start every command at the same instant and collect them all. Each is a shell waiting to
/// open a FIFO for reading (which blocks until a writer opens it); once every shell waits there
/// (or after 10 s), the FIFO is opened for writing and all of them exec pgtide together. The
/// original failure needed two opens of the new file within about a millisecond.
async fn all_at_once(env: &Env, commands: &[&[&str]]) -> Vec<Out> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = env.dir.path().join("start");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let children: Vec<_> = commands
        .iter()
        .map(|args| {
            tokio::process::Command::new("sh")
                .arg("-c")
                .arg(r#"exec 3<"$0"; exec 3<&-; exec "$@""#)
                .arg(&fifo)
                .arg(env!("CARGO_BIN_EXE_pgtide"))
                .arg("--config")
                .arg(env.config())
                .args(*args)
                .env("RUST_LOG", "pgtide=info")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("start pgtide")
        })
        .collect();
    let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline
        && !pids.iter().all(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/wchan"))
                .is_ok_and(|w| w.contains("partner") || w.contains("fifo"))
        })
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Kept open until every child is done, so that a late shell does not wait forever.
    let _go = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the start FIFO for writing");
    let mut outs = Vec::new();
    for child in children {
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(300),
            child.wait_with_output(),
        )
        .await
        .expect("pgtide did not finish within 300 s")
        .expect("wait for pgtide");
        outs.push(Out(out));
    }
    outs
}

fn never_locked(outs: &[Out]) {
    for o in outs {
        assert!(
            !o.stderr().contains("database is locked")
                && !o.stdout().contains("database is locked"),
            "a busy state file failed a command:\n{}",
            o.stderr()
        );
    }
}

async fn assert_every_row_loaded(env: &Env) {
    assert_eq!(
        Env::rows(&env.src, "select id, v from t").await,
        Env::rows(&env.dwh, "select id, v from dw.t").await,
        "DWH differs from the source"
    );
}

/// Regression: two `run-once` on one new state file, one failed with `database is locked`.
#[tokio::test(flavor = "multi_thread")]
async fn runs_started_together_on_a_new_state_file_each_work_or_exit_3() {
    for _ in 0..8 {
        let env = env_with_job().await;
        let run: &[&str] = &["run-once", "t"];
        let outs = all_at_once(&env, &[run; 6]).await;
        never_locked(&outs);
        for o in &outs {
            assert!(
                o.code() == 0 || o.code() == 3,
                "exit {}:\n{}",
                o.code(),
                o.stderr()
            );
            if o.code() == 3 {
                assert!(
                    o.stderr().contains("job t: is already running elsewhere"),
                    "{}",
                    o.stderr()
                );
            }
        }
        assert!(
            outs.iter().any(|o| o.code() == 0),
            "no run worked: {:?}",
            outs.iter().map(Out::code).collect::<Vec<_>>()
        );
        let read: u64 = outs
            .iter()
            .filter(|o| o.code() == 0)
            .map(Out::rows_read)
            .sum();
        assert_eq!(read, ROWS as u64, "every row is read once, by one run");
        assert_every_row_loaded(&env).await;
        let status = env.pgtide(&["status", "--json"]).await.ok();
        let v: serde_json::Value = serde_json::from_str(&status.stdout()).unwrap();
        assert_eq!(v[0]["watermark"], serde_json::json!([ROWS.to_string()]));
        assert_eq!(v[0]["last_run"]["outcome"], "ok");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_commands_next_to_a_run_on_a_new_state_file_never_fail() {
    for _ in 0..8 {
        let env = env_with_job().await;
        let run: &[&str] = &["run-once", "t"];
        let status: &[&str] = &["status", "--json"];
        let outs = all_at_once(&env, &[status, status, run, status, status, status]).await;
        never_locked(&outs);
        for (i, o) in outs.iter().enumerate() {
            assert_eq!(o.code(), 0, "command {i} failed:\n{}", o.stderr());
        }
        for o in outs.iter().filter(|o| o.stdout().starts_with('[')) {
            let v: serde_json::Value = serde_json::from_str(&o.stdout()).unwrap();
            assert_eq!(v[0]["job"], "t");
        }
        assert_eq!(outs[2].rows_read(), ROWS as u64);
        assert_every_row_loaded(&env).await;
    }
}

/// The control row refuses a position whose seq is not greater than the stored one, in SQL,
/// and the caller's transaction (rows included) rolls back.
#[tokio::test(flavor = "multi_thread")]
async fn the_dwh_copy_of_a_position_never_moves_backwards() {
    use pgtide::position::Position;
    use pgtide::sink::{self, SinkError};
    let env = Env::new().await;
    let mut dwh = support::connect(&env.dwh_url).await;
    sink::ensure_control(&mut dwh).await.unwrap();
    dwh.batch_execute("create table rows_of_batch (id int)")
        .await
        .unwrap();
    let at = |seq: i64, wm: &str| Position {
        watermark: Some(vec![wm.to_string()]),
        seq,
        ..Position::default()
    };
    let stored = at(5, "50");
    let tx = dwh.transaction().await.unwrap();
    sink::write_position(&tx, "j", &stored).await.unwrap();
    tx.commit().await.unwrap();
    let row = "select job, position::text, seq, updated_at::text from pgtide.positions";
    let before = Env::rows(&dwh, row).await;

    for older in [at(3, "30"), at(5, "55")] {
        let tx = dwh.transaction().await.unwrap();
        tx.execute("insert into rows_of_batch values (1)", &[])
            .await
            .unwrap();
        let e = sink::write_position(&tx, "j", &older).await.unwrap_err();
        assert!(
            matches!(e, SinkError::Backwards { seq, stored: 5, .. } if seq == older.seq),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "position of job j would move backwards (seq {}, stored 5): another pgtide wrote it",
                older.seq
            )
        );
        drop(tx);
        assert_eq!(
            Env::rows(&dwh, row).await,
            before,
            "the control row is unchanged"
        );
        assert_eq!(
            sink::read_position(&dwh, "j").await.unwrap(),
            Some(stored.clone())
        );
        assert_eq!(
            Env::count(&dwh, "rows_of_batch").await,
            0,
            "rows rolled back"
        );
    }

    // A newer position is taken.
    let tx = dwh.transaction().await.unwrap();
    sink::write_position(&tx, "j", &at(6, "60")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        sink::read_position(&dwh, "j").await.unwrap(),
        Some(at(6, "60"))
    );
}
