//! The shipped systemd units (`deploy/systemd`): `systemd-analyze verify` accepts them without
//! a single warning, `systemd-analyze security --offline=true` rates every service unit 3.0
//! ("OK") or better, and the settings pgtide depends on survive the hardening.
//!
//! `systemd-analyze` comes with Debian's `systemd` package and needs no running systemd;
//! `scripts/test.sh` installs the package when it is missing. Without it these tests fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the units are installed from, and where their `ExecStart=` points.
const INSTALLED_BINARY: &str = "/usr/local/bin/pgtide";
const UNITS: [&str; 3] = ["pgtide.service", "pgtide-job@.service", "pgtide-job@.timer"];
const SERVICES: [&str; 2] = ["pgtide.service", "pgtide-job@.service"];
/// The highest overall exposure `systemd-analyze security` calls "OK".
const MAX_EXPOSURE: f64 = 3.0;

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd")
}

fn unit_text(name: &str) -> String {
    let path = unit_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `systemd-analyze`, or a failure that says how to get it.
fn analyze() -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join("systemd-analyze"))
        .find(|p| p.is_file());
    match found {
        Some(path) => Command::new(path),
        None => panic!(
            "systemd-analyze not found: install Debian's systemd package \
             (scripts/test.sh does: apt-get install systemd)"
        ),
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The units copied to a temporary directory with `ExecStart=` pointing at the binary under
/// test: `verify` checks that the command exists, and the tests must not need pgtide installed.
fn staged_units() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_pgtide");
    for name in UNITS {
        let text = unit_text(name);
        if name.ends_with(".service") {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("ExecStart={INSTALLED_BINARY} "))),
                "{name}: ExecStart= does not run {INSTALLED_BINARY}"
            );
        }
        std::fs::write(
            dir.path().join(name),
            text.replace(INSTALLED_BINARY, binary),
        )
        .unwrap();
    }
    dir
}

/// `systemd-analyze verify` on the given files: its exit code and everything it printed.
fn verify(paths: &[PathBuf]) -> (bool, String) {
    let out = run(analyze().arg("verify").arg("--no-pager").args(paths));
    (out.status.success(), text(&out))
}

#[test]
fn verify_accepts_every_unit_without_a_warning() {
    let dir = staged_units();
    let paths: Vec<PathBuf> = UNITS.iter().map(|n| dir.path().join(n)).collect();
    let (ok, printed) = verify(&paths);
    assert!(ok, "systemd-analyze verify failed:\n{printed}");
    // verify exits 0 on an unknown or misspelt setting and only prints a warning: any line at
    // all is a problem (none is known to come from the environment, as root or not, in a
    // container without systemd running).
    assert_eq!(printed.trim(), "", "systemd-analyze verify warned");
}

/// The check above would notice a misspelt hardening setting (verify's exit code would not).
#[test]
fn verify_reports_a_misspelt_setting() {
    let dir = staged_units();
    let path = dir.path().join("pgtide.service");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\nProtectSystem=strict\n"));
    std::fs::write(
        &path,
        text.replace("\nProtectSystem=strict\n", "\nProtectSytem=strict\n"),
    )
    .unwrap();
    let (_, printed) = verify(&[path]);
    assert!(
        printed.contains("Unknown key") && printed.contains("ProtectSytem"),
        "{printed}"
    );
}

/// The overall exposure `systemd-analyze security --offline=true` gives the shipped unit.
fn exposure(name: &str) -> (f64, String) {
    let out = run(analyze()
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit_dir().join(name)));
    let printed = text(&out);
    let value = printed
        .lines()
        .find_map(|l| {
            let rest = l.split("Overall exposure level for ").nth(1)?;
            let (_, after) = rest.split_once(": ")?;
            after.split_whitespace().next()?.parse::<f64>().ok()
        })
        .unwrap_or_else(|| panic!("{name}: no overall exposure level in:\n{printed}"));
    (value, printed)
}

#[test]
fn every_service_unit_is_rated_ok_by_systemd_analyze_security() {
    for name in SERVICES {
        let (value, printed) = exposure(name);
        assert!(
            value <= MAX_EXPOSURE,
            "{name}: exposure {value} > {MAX_EXPOSURE}:\n{printed}"
        );
    }
}

/// The parsing above reads the number systemd-analyze prints: a unit without any sandboxing
/// is rated far above the limit.
#[test]
fn an_unhardened_unit_is_rated_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bare.service");
    std::fs::write(&path, "[Service]\nExecStart=/bin/true\n").unwrap();
    let out = run(analyze()
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path));
    let printed = text(&out);
    let line = printed
        .lines()
        .find(|l| l.contains("Overall exposure level for bare.service: "))
        .unwrap_or_else(|| panic!("{printed}"));
    let value: f64 = line
        .rsplit(": ")
        .next()
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(value > MAX_EXPOSURE, "{line}");
}

/// The values a setting has in a unit file, in order.
fn values(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn hardening_keeps_what_pgtide_needs() {
    for name in SERVICES {
        let text = unit_text(name);
        let one = |key: &str| {
            let v = values(&text, key);
            assert_eq!(v.len(), 1, "{name}: {key}= {v:?}");
            v[0].clone()
        };
        // TCP and Unix sockets (/run/postgresql); nothing else.
        assert_eq!(
            one("RestrictAddressFamilies"),
            "AF_INET AF_INET6 AF_UNIX",
            "{name}"
        );
        // The SQLite state file; the rest of the file system is read-only.
        assert_eq!(one("StateDirectory"), "pgtide", "{name}");
        assert_eq!(one("ProtectSystem"), "strict", "{name}");
        // The daemon and the timer units share /var/lib/pgtide: the same user.
        assert_eq!(one("User"), "pgtide", "{name}");
        assert_eq!(one("DynamicUser"), "yes", "{name}");
        // The DWH password as ${CREDENTIALS_DIRECTORY}/dwh, and ${VAR}s from the env file.
        assert_eq!(one("LoadCredential"), "dwh:pgtide.dwh", "{name}");
        assert_eq!(one("EnvironmentFile"), "-/etc/pgtide/env", "{name}");
        assert_eq!(
            one("Environment"),
            "PGTIDE_CONFIG=/etc/pgtide/pgtide.toml",
            "{name}"
        );
        // tokio's threads and epoll, SQLite's locks and mmap are ordinary system calls.
        assert_eq!(
            values(&text, "SystemCallFilter"),
            ["@system-service", "~@privileged @resources"],
            "{name}"
        );
    }

    let daemon = unit_text("pgtide.service");
    // SIGTERM, and time for pgtide's own 60 s deadline to finish the batches in hand.
    assert!(values(&daemon, "KillSignal").iter().all(|v| v == "SIGTERM"));
    let stop: Vec<u64> = values(&daemon, "TimeoutStopSec")
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(matches!(stop[..], [s] if s > 60), "TimeoutStopSec={stop:?}");

    let job = unit_text("pgtide-job@.service");
    // Exit 3: the job is held by another pgtide, not a failure.
    assert_eq!(values(&job, "SuccessExitStatus"), ["3"]);
    // run-once writes node_exporter's textfile; the directory may not exist.
    assert_eq!(
        values(&job, "ReadWritePaths"),
        ["-/var/lib/prometheus/node-exporter"]
    );
    assert!(values(&job, "ExecStart")[0]
        .contains("--metrics-file /var/lib/prometheus/node-exporter/pgtide-%i.prom"));
}
