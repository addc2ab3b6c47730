//! Config validation: files and job fields, with every problem named where it is.

use super::*;

fn sources() -> BTreeMap<String, String> {
    [("shop".to_string(), "postgres://a@h/db".to_string())].into()
}

fn job(text: &str) -> Result<JobSpec, Vec<String>> {
    let mut p = Problems::new(Path::new("jobs/orders.toml"));
    parse_job(
        Path::new("jobs/orders.toml"),
        text,
        &sources(),
        "analytics",
        Default::default(),
        &mut p,
    )
    .ok_or_else(|| p.list.iter().map(|p| p.to_string()).collect())
}

const GOOD: &str = r#"
    interval_secs = 5
    key = ["order_id"]
    watermark = ["updated_at", "id"]
    [from]
    table = "public.orders"
    as = "o"
    [[join]]
    table = "customers"
    as = "c"
    type = "left"
    on = { "o.customer_id" = "c.id" }
    [[column]]
    name = "order_id"
    from = "o.id"
    [[column]]
    name = "customer"
    from = "c.name"
    type = "text"
    [[column]]
    name = "cents"
    sql = "(o.amount * 100)::bigint"
    [[column]]
    name = "legacy"
    type = "boolean"
    deleted = true
"#;

#[test]
fn a_good_job_gets_its_defaults() {
    let j = job(GOOD).unwrap();
    assert_eq!(j.name, "orders");
    assert_eq!(j.source, "shop");
    assert_eq!(
        j.target,
        QualifiedName {
            schema: "analytics".into(),
            name: "orders".into()
        }
    );
    assert_eq!(j.batch_size, DEFAULT_BATCH_SIZE);
    assert_eq!(j.schedule, Some(Schedule::Interval(5)));
    assert_eq!(j.joins[0].kind, JoinKind::Left);
    assert_eq!(j.joins[0].table.name.schema, "public");
    assert_eq!(j.joins[0].on[0].0.to_string(), "o.customer_id");
    assert_eq!(j.columns.len(), 4);
    assert!(matches!(j.columns[3].kind, ColumnKind::Deleted { .. }));
    assert_eq!(j.watermark, Some(vec!["updated_at".into(), "id".into()]));
}

/// Regression: a 71-byte target failed only with `identifier too long`, naming nothing.
#[test]
fn identifiers_longer_than_63_bytes_are_named_with_field_and_value() {
    let long = |c: char, n: usize| c.to_string().repeat(n);
    let (t, s, j, a, c, w, k) = (
        long('t', 71),
        long('s', 64),
        long('j', 64),
        long('a', 64),
        long('c', 64),
        long('w', 64),
        long('k', 64),
    );
    let text = format!(
        r#"
        interval_secs = 5
        target = "{s}.{t}"
        key = ["{k}"]
        watermark = ["o.{w}"]
        [from]
        table = "public.{t}"
        as = "o"
        [[join]]
        table = "{j}"
        as = "{a}"
        on = {{ "o.{c}" = "{a}.id" }}
        [[column]]
        name = "{k}"
        from = "o.id"
    "#
    );
    let all = job(&text).unwrap_err().join("\n");
    let too_long = |field: &str, v: &str| {
        format!(
            "jobs/orders.toml: {field}: {v:?} is {} bytes long; PostgreSQL identifiers are at most 63 bytes",
            v.len()
        )
    };
    for want in [
        too_long("target", &s),
        too_long("target", &t),
        too_long("key", &k),
        too_long("watermark", &w),
        too_long("from.table", &t),
        too_long("join[0].table", &j),
        too_long("join[0].as", &a),
        too_long(&format!("join[0].on.o.{c}"), &c),
        too_long("column[0].name", &k),
    ] {
        assert!(all.contains(&want), "missing {want:?} in:\n{all}");
    }
    // The join alias is reported once, where it is defined, not again in every reference.
    assert_eq!(all.matches(&format!("{a:?} is 64")).count(), 1, "{all}");

    // Exactly 63 bytes is fine, multi-byte letters count as bytes.
    let ok = GOOD.replace(
        "\"public.orders\"",
        &format!("\"public.{}\"", long('o', 63)),
    );
    assert!(job(&ok).is_ok());
    let cyrillic = GOOD.replace(
        "\"public.orders\"",
        &format!("\"public.{}\"", long('ж', 32)),
    );
    assert!(job(&cyrillic).unwrap_err()[0]
        .ends_with("is 64 bytes long; PostgreSQL identifiers are at most 63 bytes"));
}

#[test]
fn names_derived_from_the_job_name_must_fit() {
    let file = |stem: &str| PathBuf::from(format!("jobs/{stem}.toml"));
    let parse = |stem: &str, text: &str| {
        let mut p = Problems::new(&file(stem));
        parse_job(
            &file(stem),
            text,
            &sources(),
            "analytics",
            Default::default(),
            &mut p,
        )
        .ok_or_else(|| p.list.iter().map(|p| p.to_string()).collect::<Vec<_>>())
    };
    let notify = GOOD.replace("interval_secs = 5", "mode = \"notify\"");
    // Two tables: the longest name is pgtide_<job>_1_stmt, 14 bytes more than the job name.
    let fits = "n".repeat(49);
    assert!(parse(&fits, &notify).is_ok());
    let over = "n".repeat(50);
    let errs = parse(&over, &notify).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        errs[0],
        format!("jobs/{over}.toml: job name \"{over}\" is too long for a notify job: \"pgtide_{over}_1_stmt\", named after it in the source, would be 64 bytes long; PostgreSQL identifiers are at most 63 bytes, so this job's name (the file stem) can have at most 49 bytes")
    );
    // A poll job names nothing after itself, except its target when `target` is not set.
    assert!(parse(&over, GOOD).is_ok());
    let untargeted = "u".repeat(64);
    let errs = parse(&untargeted, GOOD).unwrap_err();
    assert!(
        errs[0].contains(&format!("target: not set, so the job name \"{untargeted}\" names the target table, and it is 64 bytes long")),
        "{errs:?}"
    );
}

#[test]
fn every_problem_is_listed_with_its_field() {
    let errs = job(r#"
        cron = "* * *"
        batch_size = 0
        key = ["nope"]
        [from]
        table = "orders"
        as = "o"
        [[join]]
        table = "c"
        on = { "x.id" = "c.id" }
        [[column]]
        name = "a"
        frm = "o.id"
        [[column]]
        name = "b"
        from = "z.id"
        [[column]]
        name = "b"
        from = "o.id"
    "#)
    .unwrap_err();
    let all = errs.join("\n");
    for want in [
        "jobs/orders.toml: cron: \"* * *\" has 3 fields",
        "batch_size: must be a positive",
        "key: \"nope\" is not one of the job's columns",
        "join[0].on.x.id: \"x\" is not the alias of an earlier table",
        "column[0]: unknown field `frm`",
        "column[1].from: \"z\" is not an alias",
        "column[2].name: column \"b\" is defined twice",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
}

#[test]
fn unknown_top_level_field_and_bad_enums() {
    let errs = job("interval_secs = 1\nkey=[\"a\"]\nmode = \"push\"\n[from]\ntable=\"t\"\n[[column]]\nname=\"a\"\nfrom=\"t.a\"\njson=\"x..y\"\non_error=\"skip\"").unwrap_err();
    let all = errs.join("\n");
    assert!(all.contains("mode: \"push\" is not one of"), "{all}");
    assert!(
        all.contains("column[0].json: \"x..y\" is not a dotted path"),
        "{all}"
    );
    let errs = job("colour = 1").unwrap_err();
    assert!(errs[0].contains("unknown field `colour`"), "{errs:?}");
}

#[test]
fn type_names_that_could_carry_sql_are_refused() {
    for bad in [
        "text; drop table x",
        "DateTime('UTC",
        "DateTime('UTC'); drop table x",
        "DateTime('a b')",
    ] {
        let errs = job(&GOOD.replace("type = \"text\"", &format!("type = \"{bad}\""))).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("column[1].type") && e.contains("is not a type name")),
            "{bad}: {errs:?}"
        );
    }
    // A ClickHouse time zone in quotes is a type name.
    job(&GOOD.replace(
        "type = \"text\"",
        "type = \"DateTime64(3, 'Europe/Berlin')\"",
    ))
    .unwrap();
}

#[test]
fn cron_strings_are_parsed_like_the_scheduler_does() {
    assert!(validate_cron("*/5 * * * * *").is_ok());
    assert!(validate_cron("0 0 3 * * Mon-Fri").is_ok());
    assert!(validate_cron("0 61 * * * *")
        .unwrap_err()
        .to_string()
        .contains("is not a cron schedule"));
    assert!(validate_cron("* * * * *")
        .unwrap_err()
        .to_string()
        .contains("has 5 fields"));
}

#[test]
fn env_expansion_names_missing_variables() {
    std::env::set_var("PGTIDE_TEST_HOST", "db1");
    assert_eq!(
        expand("postgres://u@${PGTIDE_TEST_HOST}/x").unwrap(),
        "postgres://u@db1/x"
    );
    let e = expand("${PGTIDE_TEST_SURELY_MISSING}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("PGTIDE_TEST_SURELY_MISSING"), "{e}");
}

#[test]
fn instance_file_problems_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("jobs")).unwrap();
    std::fs::write(dir.path().join("jobs/Bad-Name.toml"), GOOD).unwrap();
    let path = dir.path().join("pgtide.toml");
    std::fs::write(
        &path,
        "colour = 1\n[sources.a]\nurl = \"${PGTIDE_TEST_NOPE}\"\n[dwh]\nurl=\"postgres://x@y/z\"\n",
    )
    .unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(e.contains("unknown field `colour`"), "{e}");
    std::fs::write(
        &path,
        "[sources.a]\nurl = \"${PGTIDE_TEST_NOPE}\"\n[dwh]\nurl=\"postgres://x@y/z\"\n",
    )
    .unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(
        e.contains("sources.a.url: environment variable PGTIDE_TEST_NOPE is not set"),
        "{e}"
    );
    assert!(e.contains("Bad-Name.toml: job name \"Bad-Name\""), "{e}");
}

#[test]
fn password_files_are_read_relative_to_the_config_and_named_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("jobs")).unwrap();
    std::fs::write(dir.path().join("dwh.pw"), "s3cret it's\n").unwrap();
    let path = dir.path().join("pgtide.toml");
    std::fs::write(
        &path,
        "[sources.a]\nurl = \"host=y user=x dbname=z\"\npassword_file = \"dwh.pw\"\n[dwh]\nurl = \"postgres://x@y/w\"\npassword_file = \"dwh.pw\"\n",
    )
    .unwrap();
    let c = load(&path).unwrap();
    for url in [&c.sources["a"], &c.dwh.url] {
        let info = crate::pg::conninfo::parse(url).unwrap();
        assert_eq!(info.password.as_deref(), Some("s3cret it's"));
    }
    std::fs::write(
        &path,
        "[sources.a]\nurl = \"postgres://x:pw@y/z\"\npassword_file = \"dwh.pw\"\n[dwh]\nurl = \"postgres://x@y/w\"\npassword_file = \"${PGTIDE_TEST_CREDS_DIR}/missing\"\n",
    )
    .unwrap();
    std::env::set_var("PGTIDE_TEST_CREDS_DIR", dir.path());
    let e = load(&path).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "dwh.password_file: cannot read {}/missing: No such file",
            dir.path().display()
        )),
        "{e}"
    );
    assert!(
        e.contains("sources.a.password_file: sources.a.url has a password already"),
        "{e}"
    );
    assert!(!e.contains("pw@"), "{e}");
}

#[test]
fn a_dwh_schema_longer_than_63_bytes_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("jobs")).unwrap();
    let path = dir.path().join("pgtide.toml");
    let schema = "d".repeat(64);
    std::fs::write(
        &path,
        format!("[sources.a]\nurl = \"postgres://x@y/z\"\n[dwh]\nurl = \"postgres://x@y/w\"\nschema = \"{schema}\"\n"),
    )
    .unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(
        e.contains(&format!("pgtide.toml: dwh.schema: \"{schema}\" is 64 bytes long; PostgreSQL identifiers are at most 63 bytes")),
        "{e}"
    );
}

#[test]
fn a_clickhouse_dwh_takes_its_database_as_the_default_schema_and_its_password_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("jobs")).unwrap();
    std::fs::write(dir.path().join("ch.pw"), "p@ss/w%rd\n").unwrap();
    let path = dir.path().join("pgtide.toml");
    std::fs::write(
        &path,
        "[sources.a]\nurl = \"postgres://x@y/z\"\n[dwh]\nurl = \"clickhouse://loader@ch:8123/analytics\"\npassword_file = \"ch.pw\"\n",
    )
    .unwrap();
    let c = load(&path).unwrap();
    assert_eq!(c.dwh.kind, DwhKind::ClickHouse);
    assert_eq!(c.dwh.schema, "analytics");
    let url = crate::clickhouse::Url::parse(&c.dwh.url).unwrap();
    assert_eq!(url.user(), "loader");
    assert!(url.has_password());
    assert!(!url.to_string().contains("p@ss"), "{url}");
    std::fs::write(
        &path,
        "[sources.a]\nurl = \"postgres://x@y/z\"\n[dwh]\nurl = \"clickhouse://ch:99999/analytics\"\n",
    )
    .unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(e.contains("dwh.url: not a ClickHouse url"), "{e}");
}
