//! Connecting to a real server with TLS and passwords: a throwaway cluster with `ssl = on`, a CA,
//! server and client certificates made with `openssl` here, and a `pg_hba.conf` that allows TCP
//! only over TLS (`hostssl`), with `scram-sha-256`, and `cert` for one role. Every `sslmode`, a
//! wrong CA, a wrong host name, a client certificate, the password file, both forms of
//! connection string, the user's `options`, several hosts, and no password in any output of the
//! real binary.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pgtide::cluster::Cluster;
use tokio::sync::OnceCell;

const PASSWORD: &str = "Tide-s3cret-41";

struct Tls {
    cluster: Cluster,
    certs: tempfile::TempDir,
}

impl Tls {
    fn port(&self) -> u16 {
        self.cluster.port
    }
    fn file(&self, name: &str) -> String {
        self.certs.path().join(name).display().to_string()
    }
    /// A URL for `db` as `app` with the password and the given query.
    fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://app:{PASSWORD}@{host}:{}/shop?{query}",
            self.port()
        )
    }
}

static TLS: OnceCell<Tls> = OnceCell::const_new();

extern "C" fn stop_tls_cluster() {
    if let Some(t) = TLS.get() {
        t.cluster.discard();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl (needed by this test) cannot run: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a key and certificate signed by it for `cn` with the extensions in `ext`.
fn make_certs(dir: &Path) {
    for ca in ["ca", "wrong_ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=pgtide test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    for (name, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "other",
            "db.example.com",
            "subjectAltName=DNS:db.example.com\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "certuser",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"),
                "-subj", &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.crt", "-CAkey",
                "ca.key", "-CAcreateserial", "-out", &format!("{name}.crt"), "-days", "2",
                "-extfile", &format!("{name}.ext"),
            ],
        );
    }
    std::fs::set_permissions(
        dir.join("client.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

async fn tls() -> &'static Tls {
    TLS.get_or_init(|| async {
        let certs = tempfile::tempdir().unwrap();
        make_certs(certs.path());
        let cluster = Cluster::start()
            .unwrap_or_else(|e| panic!("cannot start a test PostgreSQL: {e}"));
        unsafe { libc::atexit(stop_tls_cluster) };
        let read = |n: &str| std::fs::read(certs.path().join(n)).unwrap();
        let crt = cluster.put_file("server.crt", &read("server.crt"), 0o644).unwrap();
        let key = cluster.put_file("server.key", &read("server.key"), 0o600).unwrap();
        let ca = cluster.put_file("ca.crt", &read("ca.crt"), 0o644).unwrap();
        cluster
            .reconfigure(
                &format!(
                    "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\npassword_encryption = 'scram-sha-256'",
                    crt.display(),
                    key.display(),
                    ca.display()
                ),
                "local all all trust\n\
                 hostssl all certuser 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n",
            )
            .unwrap_or_else(|e| panic!("cannot turn on TLS: {e}"));
        // The superuser comes in through the Unix socket, the one way without a password.
        let admin = pgtide::pg::connect(
            &format!("host={} port={} user=postgres dbname=postgres", cluster.dir().display(), cluster.port),
            "pgtide:test",
            "admin",
        )
        .await
        .unwrap();
        for sql in [
            format!("create role app login password '{PASSWORD}'"),
            "create role certuser login".into(),
            "create database shop owner app".into(),
            "create database dwh owner app".into(),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
        let shop = pgtide::pg::connect(
            &format!("host={} port={} user=app dbname=shop", cluster.dir().display(), cluster.port),
            "pgtide:test",
            "admin",
        )
        .await
        .unwrap();
        shop.batch_execute(
            "create table t (id int primary key, v text); \
             insert into t select g, 'v' || g from generate_series(1, 5) g; \
             grant select on t to certuser",
        )
        .await
        .unwrap();
        Tls { cluster, certs }
    })
    .await
}

/// Connect with pgtide's layer and say whether the session is encrypted, or the error.
async fn try_connect(url: &str) -> Result<bool, String> {
    let client = pgtide::pg::connect(url, "pgtide:test", "source shop")
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    Ok(row.get(0))
}

fn no_password(s: &str) {
    assert!(!s.contains(PASSWORD), "the password leaked: {s}");
}

#[tokio::test]
async fn each_sslmode_as_libpq() {
    let t = tls().await;
    // disable: the server allows TCP only over TLS.
    let e = try_connect(&t.url("localhost", "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(e.contains("no pg_hba.conf entry"), "{e}");
    assert!(
        e.contains(&format!("source shop (localhost:{}/shop)", t.port())),
        "{e}"
    );
    no_password(&e);
    // prefer (the default) and require: encrypted, the certificate not checked.
    assert!(try_connect(&t.url("localhost", "")).await.unwrap());
    assert!(try_connect(&t.url("localhost", "sslmode=prefer"))
        .await
        .unwrap());
    assert!(try_connect(&t.url("127.0.0.1", "sslmode=require"))
        .await
        .unwrap());
    // verify-ca: the chain, not the name.
    let ca = t.file("ca.crt");
    assert!(try_connect(&format!(
        "host=elsewhere.invalid hostaddr=127.0.0.1 port={} user=app password={PASSWORD} dbname=shop sslmode=verify-ca sslrootcert={ca}",
        t.port()
    ))
    .await
    .unwrap());
    // verify-full: by name (SNI) and by address (the certificate's IP entry).
    for host in ["localhost", "127.0.0.1"] {
        assert!(
            try_connect(&t.url(host, &format!("sslmode=verify-full&sslrootcert={ca}")))
                .await
                .unwrap()
        );
    }
}

#[tokio::test]
async fn untrusted_certificates_and_wrong_names_are_said_plainly() {
    let t = tls().await;
    let wrong = t.file("wrong_ca.crt");
    for mode in ["verify-ca", "verify-full", "require"] {
        // require with a root certificate file verifies like verify-ca, as libpq.
        let e = try_connect(&t.url("localhost", &format!("sslmode={mode}&sslrootcert={wrong}")))
            .await
            .unwrap_err();
        assert!(e.contains("certificate is not trusted"), "{mode}: {e}");
        assert!(e.contains("unknown CA"), "{mode}: {e}");
        no_password(&e);
    }
    // prefer: a failed handshake is tried again without TLS, which this server refuses.
    let e = try_connect(&t.url("localhost", &format!("sslmode=prefer&sslrootcert={wrong}")))
        .await
        .unwrap_err();
    assert!(e.contains("no pg_hba.conf entry"), "{e}");
    assert!(e.contains("no encryption"), "{e}");
    let e = try_connect(&format!(
        "host=elsewhere.invalid hostaddr=127.0.0.1 port={} user=app password={PASSWORD} dbname=shop sslmode=verify-full sslrootcert={}",
        t.port(),
        t.file("ca.crt")
    ))
    .await
    .unwrap_err();
    assert!(
        e.contains("does not match the host name \"elsewhere.invalid\""),
        "{e}"
    );
    no_password(&e);
    let e = try_connect(&t.url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .unwrap_err();
    assert!(
        e.contains("could not read root certificate file \"/nonexistent/ca.pem\""),
        "{e}"
    );
    let e = try_connect(&t.url("localhost", "sslmode=require&sslrootcert=system"))
        .await
        .unwrap_err();
    assert!(
        e.contains("weak sslmode \"require\" may not be used with sslrootcert=system"),
        "{e}"
    );
}

#[tokio::test]
async fn a_server_without_tls_is_refused_under_require() {
    let plain = support::cluster();
    let e = try_connect(&format!("{}?sslmode=require", plain.url("postgres")))
        .await
        .unwrap_err();
    assert!(e.contains("the server refused TLS"), "{e}");
    // prefer falls back to a plain connection.
    assert!(!try_connect(&plain.url("postgres")).await.unwrap());
}

#[tokio::test]
async fn a_client_certificate_authenticates_its_role() {
    let t = tls().await;
    let base = format!(
        "host=localhost port={} user=certuser dbname=shop sslmode=verify-full sslrootcert={}",
        t.port(),
        t.file("ca.crt")
    );
    let url = format!(
        "{base} sslcert={} sslkey={}",
        t.file("client.crt"),
        t.file("client.key")
    );
    assert!(try_connect(&url).await.unwrap());
    let client = pgtide::pg::connect(&url, "pgtide:test", "source shop")
        .await
        .unwrap();
    let n: i64 = client
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5);
    // Without the certificate the server says no.
    let e = try_connect(&format!("{base} sslcert=/nonexistent.crt"))
        .await
        .unwrap_err();
    assert!(
        e.contains("could not read client certificate file \"/nonexistent.crt\""),
        "{e}"
    );
    // A key that others may read is refused before connecting, as libpq.
    let loose = t.certs.path().join("loose.key");
    std::fs::copy(t.certs.path().join("client.key"), &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = try_connect(&format!(
        "{base} sslcert={} sslkey={}",
        t.file("client.crt"),
        loose.display()
    ))
    .await
    .unwrap_err();
    assert!(e.contains("has group or world access"), "{e}");
}

#[tokio::test]
async fn passwords_from_the_password_file_and_wrong_passwords() {
    let t = tls().await;
    let dir = tempfile::tempdir().unwrap();
    let pgpass = dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "# pgtide test\nlocalhost:{}:other:app:nope\nlocalhost:{}:shop:app:{PASSWORD}\n",
            t.port(),
            t.port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = format!(
        "host=localhost port={} user=app dbname=shop passfile={}",
        t.port(),
        pgpass.display()
    );
    assert!(try_connect(&url).await.unwrap());
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = try_connect(&url).await.unwrap_err();
    assert!(
        e.contains("the server asks for a password and none was given"),
        "{e}"
    );
    let e = try_connect(&format!(
        "host=localhost port={} user=app dbname=shop password=wrong-{PASSWORD}",
        t.port()
    ))
    .await
    .unwrap_err();
    assert!(
        e.contains("password authentication failed for user \"app\""),
        "{e}"
    );
    no_password(&e);
}

#[tokio::test]
async fn key_value_strings_keep_the_users_options_next_to_pgtides() {
    let t = tls().await;
    let url = format!(
        "host = localhost port={} dbname='shop' user=app password='{PASSWORD}' sslmode=verify-full sslrootcert='{}' options='-c search_path=foo,public -c work_mem=7MB'",
        t.port(),
        t.file("ca.crt")
    );
    let client = pgtide::pg::connect(&url, "pgtide:test", "source shop")
        .await
        .unwrap();
    for (setting, want) in [
        ("search_path", "foo,public"),
        ("work_mem", "7MB"),
        ("timezone", "UTC"),
        ("extra_float_digits", "3"),
        ("application_name", "pgtide:test"),
    ] {
        let got: String = client
            .query_one(&format!("show {setting}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{setting}");
    }
}

#[tokio::test]
async fn several_hosts_are_tried_in_order_for_the_wanted_kind() {
    let t = tls().await;
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!(
        "postgres://app:{PASSWORD}@127.0.0.1:{down},localhost:{}/shop?target_session_attrs=read-write&sslmode=require&connect_timeout=3",
        t.port()
    );
    assert!(try_connect(&url).await.unwrap());
    // The one server is a primary: a standby is looked for in vain, and each host is named.
    let e = try_connect(&url.replace("read-write", "standby"))
        .await
        .unwrap_err();
    assert!(e.contains(&format!("127.0.0.1:{down}: ")), "{e}");
    assert!(
        e.contains(&format!(
            "localhost:{}: server is not a standby (target_session_attrs=standby)",
            t.port()
        )),
        "{e}"
    );
    no_password(&e);
    // prefer-standby settles for the primary.
    assert!(try_connect(&url.replace("read-write", "prefer-standby"))
        .await
        .unwrap());
}

/// The real binary, with `check` and `run-once` at debug level: the password is in no line of
/// its output, whether it came from the url, `password_file` or the password file.
#[tokio::test]
async fn the_binary_connects_over_tls_and_never_prints_the_password() {
    let t = tls().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("jobs")).unwrap();
    std::fs::write(
        dir.path().join("jobs/t.toml"),
        "interval_secs = 5\nkey = [\"id\"]\n[from]\ntable = \"t\"\n[[column]]\nname = \"id\"\nfrom = \"t.id\"\n[[column]]\nname = \"v\"\nfrom = \"t.v\"\n",
    )
    .unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("dwh"), format!("{PASSWORD}\n")).unwrap();
    let config = dir.path().join("pgtide.toml");
    let ca = t.file("ca.crt");
    let write = |source: &str, dwh: &str| {
        std::fs::write(
            &config,
            format!("state_path = \"state/pgtide.db\"\n[sources.shop]\nurl = \"{source}\"\n[dwh]\n{dwh}\n"),
        )
        .unwrap()
    };
    let run = |args: &[&str], pgpass: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgtide"));
        cmd.arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "debug")
            .env("CREDENTIALS_DIRECTORY", &creds)
            .env("PGPASSFILE", pgpass.unwrap_or(Path::new("/nonexistent")));
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        no_password(&text);
        (out.status.success(), text)
    };
    write(
        &t.url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")),
        &format!(
            "url = \"host=127.0.0.1 port={} user=app dbname=dwh sslmode=verify-full sslrootcert={ca}\"\npassword_file = \"${{CREDENTIALS_DIRECTORY}}/dwh\"",
            t.port()
        ),
    );
    let (ok, text) = run(&["check"], None);
    assert!(ok, "{text}");
    let (ok, text) = run(&["run-once"], None);
    assert!(ok, "{text}");
    let dwh = pgtide::pg::connect(
        &format!(
            "host={} port={} user=postgres dbname=dwh",
            t.cluster.dir().display(),
            t.port()
        ),
        "pgtide:test",
        "dwh",
    )
    .await
    .unwrap();
    let n: i64 = dwh
        .query_one("select count(*) from public.t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5);

    // The DWH's password from a password file (PGPASSFILE); a wrong one for the source.
    let pgpass: PathBuf = dir.path().join("pgpass");
    std::fs::write(&pgpass, format!("*:*:dwh:app:{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dwh_line = format!(
        "url = \"postgresql://app@localhost:{}/dwh?sslmode=verify-ca&sslrootcert={ca}\"",
        t.port()
    );
    write(&t.url("localhost", "sslmode=require"), &dwh_line);
    let (ok, text) = run(&["check"], Some(&pgpass));
    assert!(ok, "{text}");
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, text) = run(&["check"], Some(&pgpass));
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "password file {} has group or world access and is ignored",
            pgpass.display()
        )),
        "{text}"
    );
    assert!(text.contains("dwh (localhost:"), "{text}");
    assert!(
        text.contains("the server asks for a password and none was given"),
        "{text}"
    );
    write(
        &t.url("localhost", "sslmode=require")
            .replace(PASSWORD, &format!("x{PASSWORD}x")),
        &dwh_line,
    );
    let (ok, text) = run(&["check"], None);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("source shop (localhost:{}/shop)", t.port())),
        "{text}"
    );
    assert!(
        text.contains("password authentication failed for user \"app\""),
        "{text}"
    );
}

/// A primary and its hot standby (no TLS, trust): each `target_session_attrs` finds its kind,
/// whichever host comes first.
#[tokio::test]
async fn target_session_attrs_tell_a_primary_from_a_standby() {
    let primary = support::cluster();
    let standby = support::standby();
    let recovery = |url: String| async move {
        let client = pgtide::pg::connect(&url, "pgtide:test", "source shop")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r: bool = client
            .query_one("select pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        r
    };
    let hosts = |first: u16, second: u16, attrs: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{first},127.0.0.1:{second}/postgres?target_session_attrs={attrs}&sslmode=disable"
        )
    };
    let (p, s) = (primary.port, standby.port);
    assert!(!recovery(hosts(s, p, "read-write")).await);
    assert!(!recovery(hosts(s, p, "primary")).await);
    assert!(recovery(hosts(p, s, "standby")).await);
    assert!(recovery(hosts(p, s, "read-only")).await);
    assert!(recovery(hosts(p, s, "prefer-standby")).await);
    assert!(recovery(hosts(s, p, "any")).await);
    let e = pgtide::pg::connect(&hosts(s, s, "primary"), "pgtide:test", "dwh")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "127.0.0.1:{s}: server is a standby (target_session_attrs=primary)"
        )),
        "{e}"
    );
}

/// A server whose certificate names only `db.example.com`, reached at 127.0.0.1: verify-full
/// says the name (here an address) does not match; verify-ca, which checks the chain only, and
/// a Unix socket, which is never encrypted, connect.
#[tokio::test]
async fn an_address_the_certificate_does_not_name_fails_verify_full() {
    let t = tls().await;
    let other = Cluster::start().unwrap_or_else(|e| panic!("cannot start a test PostgreSQL: {e}"));
    let read = |n: &str| std::fs::read(t.certs.path().join(n)).unwrap();
    let crt = other
        .put_file("server.crt", &read("other.crt"), 0o644)
        .unwrap();
    let key = other
        .put_file("server.key", &read("other.key"), 0o600)
        .unwrap();
    other
        .reconfigure(
            &format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'",
                crt.display(),
                key.display()
            ),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
    let url = |mode: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={mode}&sslrootcert={}",
            other.port,
            t.file("ca.crt")
        )
    };
    let e = try_connect(&url("verify-full")).await.unwrap_err();
    assert!(
        e.contains("does not match the host name \"127.0.0.1\""),
        "{e}"
    );
    assert!(try_connect(&url("verify-ca")).await.unwrap());
    let socket = format!(
        "host={} port={} user=postgres dbname=postgres sslmode=verify-full",
        other.dir().display(),
        other.port
    );
    assert!(!try_connect(&socket).await.unwrap());
    other.stop();
}
