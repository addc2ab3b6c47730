//! Both forms parsed, redacted and given a password.

use super::*;

fn ep(host: &str, port: u16) -> Endpoint {
    Endpoint {
        host: host.into(),
        hostaddr: None,
        port,
    }
}

#[test]
fn urls_with_several_hosts_percent_decoding_and_parameters() {
    let c = parse("postgresql://app%40x:p%3As%2Fw@db1:5432,db2:5433,[::1]/sh%20op?sslmode=verify-full&sslrootcert=/etc/ca.pem&target_session_attrs=read-write&application_name=a&connect_timeout=1").unwrap();
    assert_eq!(
        c.endpoints,
        vec![ep("db1", 5432), ep("db2", 5433), ep("::1", 5432)]
    );
    assert_eq!(c.user.as_deref(), Some("app@x"));
    assert_eq!(c.password.as_deref(), Some("p:s/w"));
    assert_eq!(c.dbname.as_deref(), Some("sh op"));
    assert_eq!(c.sslmode, SslMode::VerifyFull);
    assert_eq!(c.sslrootcert.as_deref(), Some("/etc/ca.pem"));
    assert_eq!(c.target_session_attrs, SessionAttrs::ReadWrite);
    assert_eq!(c.connect_timeout, Some(Duration::from_secs(2)));
    assert_eq!(c.describe(), "db1:5432,db2:5433,[::1]:5432/sh op");
}

#[test]
fn url_socket_directories_and_query_host() {
    let c = parse("postgres://app@%2Fvar%2Frun%2Fpostgresql/shop").unwrap();
    assert_eq!(c.endpoints, vec![ep("/var/run/postgresql", 5432)]);
    assert!(c.endpoints[0].is_socket());
    let c = parse("postgres:///shop?host=/tmp&port=6000&user=u").unwrap();
    assert_eq!(c.endpoints, vec![ep("/tmp", 6000)]);
    assert_eq!(c.user.as_deref(), Some("u"));
    assert_eq!(
        parse("postgres://h/db?ssl=true").unwrap().sslmode,
        SslMode::Require
    );
}

#[test]
fn key_value_strings_with_quotes_and_escapes() {
    let c = parse(
        r"host=db1,db2 port=5432 dbname = 'my db' user=app password='it\'s a \\ secret' options='-c search_path=foo' sslmode=verify-ca",
    )
    .unwrap();
    assert_eq!(c.endpoints, vec![ep("db1", 5432), ep("db2", 5432)]);
    assert_eq!(c.dbname.as_deref(), Some("my db"));
    assert_eq!(c.password.as_deref(), Some(r"it's a \ secret"));
    assert_eq!(c.options.as_deref(), Some("-c search_path=foo"));
    assert_eq!(c.sslmode, SslMode::VerifyCa);
    let c = parse(r"host=/tmp hostaddr=127.0.0.1 port=7 user=a\ b").unwrap();
    assert_eq!(c.user.as_deref(), Some("a b"));
    assert_eq!(c.endpoints[0].hostaddr, Some("127.0.0.1".parse().unwrap()));
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    assert_eq!(
        parse("host=x colour=red").unwrap_err().0,
        "invalid connection option \"colour\""
    );
    assert_eq!(
        parse("postgres://x/y?colour=red").unwrap_err().0,
        "invalid connection option \"colour\""
    );
    assert!(parse("host=x sslmode=sometimes")
        .unwrap_err()
        .0
        .contains("invalid sslmode value"));
    assert!(parse("host=x port=abc")
        .unwrap_err()
        .0
        .contains("invalid port number"));
    assert!(parse("host='x").unwrap_err().0.contains("unterminated"));
    assert!(parse("host").unwrap_err().0.contains("missing \"=\""));
    assert!(parse("postgres://x/%zz").unwrap_err().0.contains("percent"));
    assert!(parse("host=a,b,c port=1,2")
        .unwrap_err()
        .0
        .contains("could not match 2 port numbers to 3 hosts"));
}

#[test]
fn redaction_covers_both_forms() {
    for (input, want) in [
        (
            "postgres://app:s3cret@db:5432/shop",
            "postgres://app:***@db:5432/shop",
        ),
        (
            "postgres://app@db/shop?password=s3cret&x=1",
            "postgres://app@db/shop?password=***&x=1",
        ),
        (
            "postgres://app@db/shop?pass%77ord=s3cret",
            "postgres://app@db/shop?pass%77ord=***",
        ),
        (
            "host=db password=s3cret user=app",
            "host=db password=*** user=app",
        ),
        (
            r"host=db password = 'has s3cret \' inside' user=app",
            "host=db password = *** user=app",
        ),
        ("postgres://app@db/shop", "postgres://app@db/shop"),
        (
            "host=db password='unterminated s3cret",
            "host=db password=***",
        ),
    ] {
        assert_eq!(redact(input), want);
    }
}

#[test]
fn a_password_added_in_either_form_parses_back() {
    for base in [
        "postgres://app@db/shop",
        "postgres://app@db/shop?x=",
        "host=db user=app",
    ] {
        let base = base.replace("?x=", "?sslmode=disable");
        let s = with_password(&base, r"p@ss w'o\rd&=%");
        assert_eq!(
            parse(&s).unwrap().password.as_deref(),
            Some(r"p@ss w'o\rd&=%"),
            "{s}"
        );
        assert!(!redact(&s).contains("ss w"), "{}", redact(&s));
    }
}
