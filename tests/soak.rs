//! The soak in its short form (`scripts/soak.sh --short`): about 20 s of every transaction
//! shape (savepoints, exception blocks, two-phase commit, long transactions, partition moves)
//! on a primary with a hot standby, pgtide's daemon SIGKILLed and the DWH restarted meanwhile,
//! then every job is run once more and compared with its source. Passes only when the script
//! exits 0 and its summary shows zero differences for all seven jobs.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The jobs the soak defines; each must appear in the summary with zero differences.
const JOBS: [&str; 7] = [
    "orders_id",
    "orders_ts",
    "orders_live",
    "shipments_ts",
    "ledger_ts",
    "replica_orders_id",
    "replica_ledger_ts",
];

/// The transaction shapes the writers run; each must have committed at least once, or the soak
/// proved nothing about it.
const SHAPES: [&str; 15] = [
    "insert",
    "update",
    "many",
    "long_insert_early",
    "long_nextval_late",
    "long_now_late",
    "long_update",
    "sp_released",
    "sp_retry",
    "sp_nested",
    "plpgsql_exception",
    "2pc",
    "2pc_savepoint",
    "2pc_long",
    "move",
];

/// Setup, 20 s of writing, the writers' last transactions (a prepared one may be held until
/// the end), the final runs and the comparisons take about a minute; this is far beyond it.
const DEADLINE: Duration = Duration::from_secs(900);

/// `job NAME: rows R, missing M, different D, extra E` -> (R, M, D, E).
fn job_line(summary: &str, job: &str) -> Option<(u64, u64, u64, u64)> {
    let prefix = format!("job {job}: rows ");
    let line = summary.lines().find(|l| l.starts_with(&prefix))?;
    let mut numbers = line[prefix.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>().unwrap());
    Some((
        numbers.next()?,
        numbers.next()?,
        numbers.next()?,
        numbers.next()?,
    ))
}

/// `  SHAPE    N` in the section of committed transactions.
fn committed(summary: &str, shape: &str) -> Option<u64> {
    summary.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(shape) && l.starts_with("  "))
            .then(|| f.next()?.parse().ok())
            .flatten()
    })
}

/// `daemon SIGKILLs: K, DWH restarts: R, ...` -> (K, R).
fn disturbances(summary: &str) -> Option<(u64, u64)> {
    let line = summary
        .lines()
        .find(|l| l.starts_with("daemon SIGKILLs: "))?;
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>().unwrap());
    Some((numbers.next()?, numbers.next()?))
}

#[test]
fn short_soak_loses_nothing() {
    // The script would try to install PostgreSQL; the test fails instead, loudly.
    pgtide::cluster::find_bin().unwrap_or_else(|e| panic!("the soak needs PostgreSQL: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/soak.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("--short")
        .env("PGTIDE", env!("CARGO_BIN_EXE_pgtide"))
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            // SIGTERM, so the script's trap stops its servers and processes.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            panic!(
                "the soak did not finish within {DEADLINE:?}\nstdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&out_path).unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    let shown = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(status.success(), "the soak failed ({status})\n{shown}");
    assert!(
        out.contains("RESULT: PASS"),
        "no passing result line\n{shown}"
    );
    for job in JOBS {
        let (rows, missing, different, extra) =
            job_line(&out, job).unwrap_or_else(|| panic!("no summary line for job {job}\n{shown}"));
        assert!(rows > 0, "job {job} loaded nothing\n{shown}");
        assert_eq!(
            (missing, different, extra),
            (0, 0, 0),
            "job {job} differs from its source\n{shown}"
        );
    }
    for shape in SHAPES {
        let n = committed(&out, shape)
            .unwrap_or_else(|| panic!("no committed count for {shape}\n{shown}"));
        assert!(n > 0, "no {shape} transaction committed\n{shown}");
    }
    let (kills, restarts) =
        disturbances(&out).unwrap_or_else(|| panic!("no disturbances\n{shown}"));
    assert!(kills >= 2, "pgtide was SIGKILLed {kills} times\n{shown}");
    assert!(restarts >= 1, "the DWH was not restarted\n{shown}");
}

/// The parsers above, on a piece of a real summary.
#[test]
fn summary_lines_parse() {
    let sample = "transactions committed, by kind:\n  2pc_long                    2\n  \
        insert                    478\ndaemon SIGKILLs: 2, DWH restarts: 1, daemon exits on its own: 0\n\
        job orders_id: rows 3394, missing 27, different 0, extra 0\n    loaded 7139 rows\n";
    assert_eq!(job_line(sample, "orders_id"), Some((3394, 27, 0, 0)));
    assert_eq!(job_line(sample, "orders"), None);
    assert_eq!(committed(sample, "insert"), Some(478));
    assert_eq!(committed(sample, "2pc_long"), Some(2));
    assert_eq!(committed(sample, "2pc"), None);
    assert_eq!(disturbances(sample), Some((2, 1)));
}
