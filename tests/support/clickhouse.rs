//! A throwaway ClickHouse server per test binary: Debian's `clickhouse-server` on free loopback
//! ports (HTTP, HTTPS with certificates made here by `openssl`, and the native port it always
//! opens), its data, logs and certificates in one temporary directory, killed and removed at
//! exit. One fresh database per test. A machine without the server fails here, loudly.
//!
//! Users: `default` without a password, and `pgtide` with [`PASSWORD`]. HTTPS asks for a client
//! certificate and checks one that is shown (`verificationMode` relaxed), so tests can connect
//! with and without one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pgtide::clickhouse::{Client, Url};

use super::Env;

/// Where Debian's package puts the server; `PGTIDE_CLICKHOUSE_SERVER` overrides it.
const SERVER_BIN: &str = "/usr/sbin/clickhouse-server";
/// How long the server may take to answer its first request.
const START_SECS: u64 = 30;
/// The `pgtide` user's password: characters that must be percent-encoded in a URL.
pub const PASSWORD: &str = "t1de:p@ss/w%rd";
/// The server's keep-alive timeout, short so that tests see idle connections closed.
pub const KEEP_ALIVE_SECS: u64 = 2;

pub struct Server {
    dir: PathBuf,
    child: Mutex<Option<Child>>,
    pub http_port: u16,
    pub https_port: u16,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

extern "C" fn stop_server() {
    // Statics are never dropped: the server is killed (its data is thrown away anyway) and its
    // directory removed here.
    if let Some(s) = SERVER.get() {
        s.discard();
    }
}

/// The shared server, started on first use.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let s = Server::start();
        unsafe { libc::atexit(stop_server) };
        s
    })
}

/// A URL for database `db` as `default`, over HTTP.
pub fn clickhouse_url(db: &str) -> String {
    server().url(db)
}

/// A source in PostgreSQL, and a config whose DWH is a fresh ClickHouse database; the database.
pub async fn env() -> (Env, String) {
    let env = Env::new().await;
    let db = database().await;
    write_config(&env, &clickhouse_url(&db));
    (env, db)
}

/// Write `env`'s config: its source `shop`, and the DWH at `url`.
pub fn write_config(env: &Env, url: &str) {
    let toml = format!(
        "state_path = \"state/pgtide.db\"\n[sources.shop]\nurl = \"{}\"\n[dwh]\nurl = \"{url}\"\n",
        env.src_url
    );
    std::fs::write(env.config(), toml).unwrap();
}

/// Source table `orders` of 2,500 rows, every third note NULL.
pub const ORDERS: &str = "
    create table orders (id bigint primary key, amount numeric(10, 2) not null, note text,
                         updated_at timestamptz not null default now());
    insert into orders select g, g * 1.5, case when g % 3 = 0 then null else 'n' || g end
      from generate_series(1, 2500) g;";

/// A poll job of `orders` by `id`, in batches of 1,000.
pub const POLL_JOB: &str = r#"
    interval_secs = 60
    batch_size = 1000
    key = ["id"]
    [from]
    table = "orders"
    [[column]]
    name = "id"
    from = "orders.id"
    [[column]]
    name = "amount"
    from = "orders.amount"
    [[column]]
    name = "note"
    from = "orders.note"
    "#;

/// A notify job of `orders` in batches of 50; `ON_DELETE` stands for its `on_delete`.
pub const NOTIFY_JOB: &str = r#"
    mode = "notify"
    batch_size = 50
    key = ["id"]
    on_delete = "ON_DELETE"
    [from]
    table = "orders"
    [[column]]
    name = "id"
    from = "orders.id"
    [[column]]
    name = "amount"
    from = "orders.amount"
    [[column]]
    name = "note"
    from = "orders.note"
    "#;

/// [`env`] with [`ORDERS`] loaded once by an installed [`NOTIFY_JOB`] (`orders`) with
/// `on_delete`.
pub async fn notify_env(on_delete: &str) -> (Env, String) {
    let (env, db) = env().await;
    env.src.batch_execute(ORDERS).await.unwrap();
    env.job("orders", &NOTIFY_JOB.replace("ON_DELETE", on_delete));
    env.pgtide(&["install", "orders"]).await.ok();
    env.pgtide(&["run-once"]).await.ok();
    (env, db)
}

/// A fresh database, named for this process and test.
pub async fn database() -> String {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let db = format!("t_{}_{n}", std::process::id());
    execute(&format!("create database {db}")).await;
    db
}

/// A client for database `db` as `default`.
pub async fn client(db: &str) -> Client {
    let url = Url::parse(&clickhouse_url(db)).unwrap();
    Client::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect to the test clickhouse: {e}"))
}

/// Run a query in the `default` database and return its answer (TabSeparated).
pub async fn query(sql: &str) -> String {
    client("default")
        .await
        .query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Run a statement in the `default` database.
pub async fn execute(sql: &str) {
    client("default")
        .await
        .execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A loopback port that nothing listens on (just now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Server {
    fn start() -> Server {
        let bin = std::env::var("PGTIDE_CLICKHOUSE_SERVER").unwrap_or_else(|_| SERVER_BIN.into());
        assert!(
            Path::new(&bin).exists(),
            "{bin} not found: the ClickHouse tests need Debian's clickhouse-server package \
             (scripts/test.sh installs it) or PGTIDE_CLICKHOUSE_SERVER"
        );
        let dir = tempfile::Builder::new()
            .prefix("pgtide-ch-")
            .tempdir()
            .expect("temporary directory")
            .keep();
        // For scripts/lib.sh's stop_stale_test_clickhouse: a server whose test process is gone
        // was left behind by a killed run.
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string()).unwrap();
        for sub in ["data", "tmp", "user_files", "format_schemas", "certs"] {
            std::fs::create_dir(dir.join(sub)).unwrap();
        }
        make_certs(&dir.join("certs"));
        let (http_port, tcp_port, https_port) = (free_port(), free_port(), free_port());
        let d = dir.display();
        let config = format!(
            r#"<yandex>
    <logger>
        <level>warning</level>
        <log>{d}/log.txt</log>
        <errorlog>{d}/err.txt</errorlog>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <https_port>{https_port}</https_port>
    <tcp_port>{tcp_port}</tcp_port>
    <keep_alive_timeout>{KEEP_ALIVE_SECS}</keep_alive_timeout>
    <openSSL>
        <server>
            <certificateFile>{d}/certs/server.crt</certificateFile>
            <privateKeyFile>{d}/certs/server.key</privateKeyFile>
            <caConfig>{d}/certs/ca.crt</caConfig>
            <verificationMode>relaxed</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>false</cacheSessions>
            <disableProtocols>sslv2,sslv3</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>536870912</mark_cache_size>
</yandex>
"#
        );
        let users = format!(
            r#"<yandex>
    <profiles><default></default></profiles>
    <quotas><default></default></quotas>
    <users>
        <default>
            <password></password>
            <networks><ip>::/0</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <pgtide>
            <password>{PASSWORD}</password>
            <networks><ip>::/0</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </pgtide>
    </users>
</yandex>
"#
        );
        std::fs::write(dir.join("config.xml"), config).unwrap();
        std::fs::write(dir.join("users.xml"), users).unwrap();
        let out = std::fs::File::create(dir.join("stdout.txt")).unwrap();
        let err = out.try_clone().unwrap();
        // As root too: the 18.16 server runs as whatever user starts it, and everything it
        // writes is in this directory.
        let child = Command::new(&bin)
            .arg(format!(
                "--config-file={}",
                dir.join("config.xml").display()
            ))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        std::fs::write(dir.join("server.pid"), child.id().to_string()).unwrap();
        let server = Server {
            dir,
            child: Mutex::new(Some(child)),
            http_port,
            https_port,
        };
        server.wait_ready();
        server
    }

    /// Wait until the server answers `/ping`, or fail with its logs.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(START_SECS);
        loop {
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let logs = self.logs();
                self.discard();
                panic!("clickhouse-server exited ({status}) before answering:\n{logs}");
            }
            if ping(self.http_port) {
                return;
            }
            if Instant::now() > deadline {
                let logs = self.logs();
                self.discard();
                panic!("clickhouse-server did not answer within {START_SECS} s:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of the server's output and logs.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["stdout.txt", "err.txt", "log.txt"] {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            out.push_str(&format!("--- {name}\n{tail}\n"));
        }
        out
    }

    /// Kill the server and remove its directory.
    pub fn discard(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// A URL for `db` as `default`, over HTTP.
    pub fn url(&self, db: &str) -> String {
        format!("clickhouse://127.0.0.1:{}/{db}", self.http_port)
    }

    /// A URL for `db` as `pgtide` with its password, percent-encoded, over HTTP.
    pub fn pgtide_url(&self, db: &str) -> String {
        let password: String =
            percent_encoding::utf8_percent_encode(PASSWORD, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        format!(
            "clickhouse://pgtide:{password}@127.0.0.1:{}/{db}",
            self.http_port
        )
    }

    /// A URL for `db` as `default` over HTTPS to `host`, with the query `params`.
    pub fn https_url(&self, host: &str, db: &str, params: &str) -> String {
        format!("clickhouses://{host}:{}/{db}?{params}", self.https_port)
    }

    /// A certificate or key made for the tests: `ca.crt`, `wrong_ca.crt`, `client.crt`,
    /// `client.key`, `wrong_client.crt`, `wrong_client.key`.
    pub fn cert(&self, name: &str) -> String {
        self.dir.join("certs").join(name).display().to_string()
    }
}

/// Whether the HTTP port answers `GET /ping` with `Ok.`.
fn ping(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("Ok.")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("openssl (needed for the test clickhouse's https) cannot run: {e}")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two CAs; the server's certificate from `ca`, for 127.0.0.1 only (so that `localhost` does
/// not match it); a client certificate from each CA.
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "wrong_ca"] {
        let (key, crt, subj) = (
            format!("{ca}.key"),
            format!("{ca}.crt"),
            format!("/CN=pgtide test {ca}"),
        );
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &args);
    }
    for (name, ca, cn, ext) in [
        (
            "server",
            "ca",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "ca",
            "pgtide",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        ),
        (
            "wrong_client",
            "wrong_ca",
            "pgtide",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, crt, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("/CN={cn}"),
        );
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &args);
        let (ca_crt, ca_key, ext_file) = (
            format!("{ca}.crt"),
            format!("{ca}.key"),
            format!("{name}.ext"),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext_file,
            ],
        );
    }
    use std::os::unix::fs::PermissionsExt;
    for key in ["client.key", "wrong_client.key"] {
        std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}
