//! View transforms against real databases: value maps, JSON fields, bad values, schema drift,
//! and InsightForge documents.

mod support;

use support::Env;

const EVENTS: &str = r#"
    create type state as enum ('new', 'paid', 'gone');
    create table events (
        id bigint primary key,
        status int,
        state state,
        payload jsonb,
        note text,
        legacy boolean
    );"#;

fn job(columns: &str) -> String {
    format!("interval_secs = 5\nbatch_size = 3\nkey = [\"id\"]\n[from]\ntable = \"events\"\nas = \"e\"\n[[column]]\nname = \"id\"\nfrom = \"e.id\"\n{columns}")
}

async fn status(env: &Env) -> serde_json::Value {
    let out = env.pgtide(&["status", "--json"]).await.ok();
    serde_json::from_str::<serde_json::Value>(&out.stdout()).unwrap()[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn value_maps_with_and_without_a_default() {
    let env = Env::new().await;
    env.src.batch_execute(EVENTS).await.unwrap();
    env.src
        .batch_execute(
            "insert into events (id, status, state) values
             (1, 1, 'new'), (2, 2, 'paid'), (3, 7, 'gone'), (4, 9, 'new'), (5, 7, null), (6, null, 'paid'), (7, 8, 'gone')",
        )
        .await
        .unwrap();
    env.job(
        "events",
        &job(r#"
[[column]]
name = "label"
from = "e.status"
map = { "1" = "created", "2" = "paid" }
[[column]]
name = "label_or_other"
from = "e.status"
map = { "1" = "created", "2" = "paid" }
map_default = "other"
[[column]]
name = "state_label"
from = "e.state"
map = { "new" = "Neu", "paid" = "Bezahlt", "gone" = "Weg" }
"#),
    );
    let out = env.pgtide(&["run-once"]).await.ok();
    // 7, 9, 7, 8 are not in the map; NULL is no value at all and not counted.
    assert!(
        out.stdout().contains("label: 4 unmapped ("),
        "{}",
        out.stdout()
    );
    assert!(
        !out.stdout().contains("label_or_other:"),
        "{}",
        out.stdout()
    );
    assert!(
        out.stderr()
            .contains("values missing from the map were written as NULL"),
        "{}",
        out.stderr()
    );
    assert_eq!(
        Env::rows(
            &env.dwh,
            "select id, label, label_or_other, state_label from dw.events"
        )
        .await,
        vec![
            "(1,created,created,Neu)",
            "(2,paid,paid,Bezahlt)",
            "(3,,other,Weg)",
            "(4,,other,Neu)",
            "(5,,other,)",
            "(6,,other,Bezahlt)",
            "(7,,other,Weg)",
        ]
    );
    let s = status(&env).await;
    assert_eq!(s["last_run"]["unmapped"], 4);
    let mut named: Vec<String> =
        serde_json::from_value(s["last_run"]["columns"]["label"]["values"].clone()).unwrap();
    named.sort();
    assert_eq!(
        named,
        vec!["7", "8", "9"],
        "distinct values, each named once"
    );
    let text = env.pgtide(&["status"]).await.ok().stdout();
    assert!(text.contains("label: 4 unmapped"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_fields_missing_keys_array_elements_and_types() {
    let env = Env::new().await;
    env.src.batch_execute(EVENTS).await.unwrap();
    env.src
        .batch_execute(
            r#"insert into events (id, payload) values
             (1, '{"meta": {"channel": "web", "n": "42"}, "items": [{"sku": "A-1", "qty": 2}], "at": "2025-01-02T03:04:05Z"}'),
             (2, '{"meta": {}, "items": []}'),
             (3, '{}'),
             (4, null),
             (5, '{"meta": null, "items": [{"sku": "B"}, {"sku": "C", "qty": 5}]}');"#,
        )
        .await
        .unwrap();
    env.job(
        "events",
        &job(r#"
[[column]]
name = "channel"
from = "e.payload"
json = "meta.channel"
[[column]]
name = "n"
from = "e.payload"
json = "meta.n"
type = "int"
[[column]]
name = "first_sku"
from = "e.payload"
json = "items.0.sku"
type = "text"
[[column]]
name = "first_qty"
from = "e.payload"
json = "items.0.qty"
type = "smallint"
[[column]]
name = "at"
from = "e.payload"
json = "at"
type = "timestamptz"
"#),
    );
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(out.stdout().contains("5 rows read"), "{}", out.stdout());
    assert_eq!(
        Env::rows(
            &env.dwh,
            "select id, channel, n, first_sku, first_qty, at from dw.events"
        )
        .await,
        vec![
            "(1,web,42,A-1,2,\"2025-01-02 03:04:05+00\")",
            "(2,,,,,)",
            "(3,,,,,)",
            "(4,,,,,)",
            "(5,,,B,,)",
        ]
    );
    let types: Vec<String> = env
        .dwh
        .query("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'dw.events'::regclass and attnum between 2 and 6 order by attnum", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        types,
        [
            "text",
            "integer",
            "text",
            "smallint",
            "timestamp with time zone"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_json_values_stop_the_batch_naming_the_row_or_become_null() {
    let env = Env::new().await;
    env.src.batch_execute(EVENTS).await.unwrap();
    env.src
        .batch_execute(
            r#"insert into events (id, payload) values
             (1, '{"meta": {"n": "1"}}'), (2, '{"meta": {"n": "2"}}'), (3, '{"meta": {"n": "3"}}'),
             (4, '{"meta": {"n": "4"}}'), (5, '{"meta": {"n": "abc"}}'), (6, '{"meta": {"n": "6"}}');"#,
        )
        .await
        .unwrap();
    let fail = job(r#"
[[column]]
name = "n"
from = "e.payload"
json = "meta.n"
type = "integer"
"#);
    env.job("events", &fail);
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr().contains(
            "job events: column n (e.payload json meta.n): row with key (id)=(5): value \"abc\" cannot be cast to integer (invalid input syntax for type integer: \"abc\")"
        ),
        "{}",
        out.stderr()
    );
    // The first batch (ids 1-3) is committed and stays; the bad one left nothing.
    assert_eq!(
        Env::rows(&env.dwh, "select id, n from dw.events").await,
        vec!["(1,1)", "(2,2)", "(3,3)"]
    );

    // A path through a scalar stops it too, with what was found instead of an object.
    env.src.batch_execute(r#"update events set payload = '{"meta": {"n": "5"}}' where id = 5; update events set payload = '{"meta": "flat"}' where id = 6"#).await.unwrap();
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr().contains(
            "row with key (id)=(6): meta is a string, not an object, so meta.n cannot be read"
        ),
        "{}",
        out.stderr()
    );
    assert_eq!(Env::count(&env.dwh, "dw.events").await, 3);

    // on_error = "null": both become NULL and are counted; the rest loads.
    env.src.batch_execute(r#"update events set payload = '{"meta": {"n": "x1"}}' where id = 4; insert into events (id, payload) values (7, '{"meta": {"n": 7}}')"#).await.unwrap();
    env.job(
        "events",
        &fail.replace(
            "type = \"integer\"",
            "type = \"integer\"\non_error = \"null\"",
        ),
    );
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(
        out.stdout().contains("n: 2 JSON values set to NULL"),
        "{}",
        out.stdout()
    );
    assert_eq!(
        Env::rows(&env.dwh, "select id, n from dw.events").await,
        vec!["(1,1)", "(2,2)", "(3,3)", "(4,)", "(5,5)", "(6,)", "(7,7)"]
    );
    assert_eq!(status(&env).await["last_run"]["nulled"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_and_added_columns() {
    let env = Env::new().await;
    env.src.batch_execute(EVENTS).await.unwrap();
    env.src
        .batch_execute(
            "insert into events (id, note, legacy) values (1, 'one', true), (2, 'two', false)",
        )
        .await
        .unwrap();
    let with_legacy = job("[[column]]\nname = \"note\"\nfrom = \"e.note\"\n[[column]]\nname = \"legacy\"\nfrom = \"e.legacy\"\n");
    env.job(
        "events",
        &with_legacy.replace("key = [\"id\"]", "key = [\"id\"]\nwatermark = [\"id\"]"),
    );
    env.pgtide(&["run-once"]).await.ok();

    // The source drops a column the job reads: check and run stop before reading, naming it.
    env.src.batch_execute("alter table events drop column legacy; insert into events (id, note) values (3, 'three')").await.unwrap();
    for cmd in ["check", "run-once"] {
        let out = env.pgtide(&[cmd]).await;
        assert_ne!(out.code(), 0, "{cmd}");
        assert!(
            out.stderr().contains("column[2] (legacy): source column public.events.legacy does not exist (was it dropped? then mark the column deleted = true)"),
            "{cmd}: {}",
            out.stderr()
        );
    }
    assert_eq!(
        Env::count(&env.dwh, "dw.events").await,
        2,
        "nothing was read"
    );

    // Marked deleted: the target keeps the column and its old values; new rows get NULL.
    env.job(
        "events",
        &with_legacy.replace(
            "name = \"legacy\"\nfrom = \"e.legacy\"",
            "name = \"legacy\"\nfrom = \"e.legacy\"\ntype = \"boolean\"\ndeleted = true",
        ),
    );
    env.pgtide(&["check"]).await.ok();
    env.pgtide(&["run-once"]).await.ok();
    assert_eq!(
        Env::rows(&env.dwh, "select id, note, legacy from dw.events").await,
        vec!["(1,one,t)", "(2,two,f)", "(3,three,)"]
    );

    // A column added to the job is added to the populated target (nullable) and filled from now on.
    env.job(
        "events",
        &(with_legacy.replace(
            "name = \"legacy\"\nfrom = \"e.legacy\"",
            "name = \"legacy\"\ntype = \"boolean\"\ndeleted = true",
        ) + "[[column]]\nname = \"status\"\nfrom = \"e.status\"\n"),
    );
    env.src
        .batch_execute("insert into events (id, note, status) values (4, 'four', 44)")
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await.ok();
    assert!(
        out.stderr().contains("add column \\\"status\\\" integer")
            || out.stderr().contains("add column \"status\" integer"),
        "{}",
        out.stderr()
    );
    assert_eq!(
        Env::rows(&env.dwh, "select id, note, legacy, status from dw.events").await,
        vec!["(1,one,t,)", "(2,two,f,)", "(3,three,,)", "(4,four,,44)"]
    );

    // A column whose type changed incompatibly stops the run, naming it.
    env.src
        .batch_execute("alter table events alter column status type text")
        .await
        .unwrap();
    env.dwh
        .batch_execute("alter table dw.events alter column status type numeric")
        .await
        .unwrap();
    let out = env.pgtide(&["run-once"]).await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("column status is numeric in the target but the view gives text"),
        "{}",
        out.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_insightforge_example_imports_and_runs() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            r#"create table users (id uuid primary key, email text, json_transform jsonb, status int);
            create table profiles (user_id uuid primary key references users (id), age int);
            insert into users values
              ('00000000-0000-0000-0000-000000000001', 'a@example.com', '{"field1_in_json": 7, "field2_in_json": "x"}', 1),
              ('00000000-0000-0000-0000-000000000002', 'b@example.com', '{"field1_in_json": "8"}', 3),
              ('00000000-0000-0000-0000-000000000003', 'c@example.com', null, 2);
            insert into profiles values ('00000000-0000-0000-0000-000000000001', 31), ('00000000-0000-0000-0000-000000000002', 42);"#,
        )
        .await
        .unwrap();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/insightforge_example.json"
    );
    let out = env
        .pgtide(&["import", "insightforge", example, "--source", "shop"])
        .await
        .ok();
    env.job("user_basic_info", &out.stdout());
    env.pgtide(&["check"]).await.ok();
    env.pgtide(&["run-once"]).await.ok();
    assert_eq!(
        Env::rows(
            &env.dwh,
            "select user_id, email, field1_view_column, field2_view_column, status, status_label, id, age, test from dw.user_basic_info"
        )
        .await,
        vec![
            "(00000000-0000-0000-0000-000000000001,a@example.com,7,x,1,Создан,00000000-0000-0000-0000-000000000001,31,)",
            "(00000000-0000-0000-0000-000000000002,b@example.com,8,,3,Завершен,00000000-0000-0000-0000-000000000002,42,)",
        ]
    );

    // A document it cannot translate: exit 2, the JSON path of each part named.
    let bad = env.dir.path().join("bad.json");
    std::fs::write(
        &bad,
        std::fs::read_to_string(example)
            .unwrap()
            .replace("\"inner\"", "\"outer\"")
            .replace("\"JSON\", \"mode\"", "\"XML\", \"mode\""),
    )
    .unwrap();
    let out = env
        .pgtide(&["import", "insightforge", bad.to_str().unwrap()])
        .await;
    assert_eq!(out.code(), 2);
    assert!(
        out.stderr()
            .contains("$.joins[0].outer: join type \"outer\" cannot be translated"),
        "{}",
        out.stderr()
    );
    assert!(out.stderr().contains("$.sources[0].schemas[0].tables[0].columns[2].transform.type: transform \"XML\" cannot be translated"), "{}", out.stderr());
    let out = env
        .pgtide(&["import", "insightforge", "/nonexistent.json"])
        .await;
    assert_eq!(out.code(), 2);
    assert!(
        out.stderr().contains("/nonexistent.json"),
        "{}",
        out.stderr()
    );
}
