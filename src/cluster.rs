//! A throwaway PostgreSQL cluster from the local binaries, for `pgtide demo` and the tests:
//! `initdb` into a temporary directory, a free port on 127.0.0.1, trust authentication.
//! As root, the server runs as the `postgres` user (PostgreSQL refuses to run as root).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a throwaway cluster cannot be started or changed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install Debian's postgresql package (apt-get install postgresql) or set PGTIDE_PG_BIN")]
    NoBinaries,
    #[error("no free port: {0}")]
    NoPort(#[source] std::io::Error),
    #[error("temporary directory: {0}")]
    TempDir(#[source] std::io::Error),
    /// A file of the cluster that cannot be written, as the message names it.
    #[error("{file}: {source}")]
    File {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// A program that cannot be started.
    #[error("{program:?}: {source}")]
    Spawn {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
    /// A program that failed, with what it printed.
    #[error("{program:?} failed: {stdout}{stderr}")]
    Failed {
        program: OsString,
        stdout: String,
        stderr: String,
    },
}

pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: Debian's newest
/// `/usr/lib/postgresql/N/bin`, else wherever `pg_config --bindir` or `PATH` says.
pub fn find_bin() -> Result<PathBuf, ClusterError> {
    if let Ok(dir) = std::env::var("PGTIDE_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    Err(ClusterError::NoBinaries)
}

/// Name this process as the owner of a cluster directory, so that cleaning up after killed test
/// runs (`scripts/lib.sh`) spares the clusters of runs still going.
fn mark_owner(dir: &Path) {
    let _ = std::fs::write(dir.join("owner.pid"), std::process::id().to_string());
}

fn free_port() -> Result<u16, ClusterError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(ClusterError::NoPort)
}

impl Cluster {
    /// Create and start a cluster; it is stopped and removed when dropped.
    pub fn start() -> Result<Cluster, ClusterError> {
        let bin = find_bin()?;
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::Builder::new()
            .prefix("pgtide-pg-")
            .tempdir()
            .map_err(ClusterError::TempDir)?;
        mark_owner(dir.path());
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(dir.path()))?;
        }
        let port = free_port()?;
        let cluster = Cluster {
            dir,
            bin,
            port,
            as_postgres,
        };
        cluster.pg(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        cluster.resume()?;
        Ok(cluster)
    }

    /// A hot standby of this cluster (`pg_basebackup -R`, streaming), started on its own port.
    pub fn standby(&self) -> Result<Cluster, ClusterError> {
        let dir = tempfile::Builder::new()
            .prefix("pgtide-standby-")
            .tempdir()
            .map_err(ClusterError::TempDir)?;
        mark_owner(dir.path());
        if self.as_postgres {
            run(Command::new("chown").arg("postgres:").arg(dir.path()))?;
        }
        let standby = Cluster {
            dir,
            bin: self.bin.clone(),
            port: free_port()?,
            as_postgres: self.as_postgres,
        };
        standby.pg(
            "pg_basebackup",
            &[
                "-D",
                &standby.data(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ],
        )?;
        standby.resume()?;
        Ok(standby)
    }

    /// Server options: fast and unsafe (throwaway data), two-phase commit allowed.
    fn options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300 -c shared_buffers=256MB \
             -c max_prepared_transactions=64 -c hot_standby=on",
            self.port,
            self.dir.path().display()
        )
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pg(&self, tool: &str, args: &[&str]) -> Result<(), ClusterError> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).current_dir(self.dir.path());
        run(&mut cmd)
    }

    /// A URL for database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Write `name` into the cluster's directory, owned by the server's user, with `mode`: for
    /// files the server reads itself, such as TLS keys (it refuses a key others may read).
    pub fn put_file(&self, name: &str, data: &[u8], mode: u32) -> Result<PathBuf, ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        let file = |source| ClusterError::File {
            file: path.display().to_string(),
            source,
        };
        std::fs::write(&path, data).map_err(file)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(file)?;
        if self.as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&path))?;
        }
        Ok(path)
    }

    /// Add `settings` to `postgresql.conf`, replace `pg_hba.conf` by `hba`, and restart: a
    /// server with TLS or other authentication than trust.
    pub fn reconfigure(&self, settings: &str, hba: &str) -> Result<(), ClusterError> {
        use std::io::Write;
        let data = self.dir.path().join("data");
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(format!("\n{settings}\n").as_bytes()))
            .map_err(|source| ClusterError::File {
                file: "postgresql.conf".into(),
                source,
            })?;
        std::fs::write(data.join("pg_hba.conf"), hba).map_err(|source| ClusterError::File {
            file: "pg_hba.conf".into(),
            source,
        })?;
        self.pause()?;
        self.resume()
    }

    /// Stop the server at once (the data is thrown away anyway).
    pub fn stop(&self) {
        let _ = self.pg(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    /// Stop the server and remove its files now: for a cluster that is never dropped (one kept
    /// in a static for a whole test binary, stopped at exit), whose directory would stay.
    pub fn discard(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }

    /// Stop the server, keeping its files.
    pub fn pause(&self) -> Result<(), ClusterError> {
        self.pg("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
    }

    /// Start a paused server again on the same port.
    pub fn resume(&self) -> Result<(), ClusterError> {
        let log = self.dir.path().join("server.log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log.to_string_lossy(),
                "-o",
                &self.options(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(cmd: &mut Command) -> Result<(), ClusterError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ClusterError::Spawn {
            program: cmd.get_program().to_owned(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Failed {
            program: cmd.get_program().to_owned(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
