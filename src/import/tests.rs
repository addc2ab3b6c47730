//! The documented example translated and checked as a job; what cannot be translated named.

use std::path::Path;

use super::*;
use crate::config::{parse_job, ColumnKind, Problems};

/// The example of insightforge-view.md.
pub const EXAMPLE: &str = include_str!("../../tests/data/insightforge_example.json");

#[test]
fn the_documented_example_becomes_a_valid_job() {
    let text = insightforge(EXAMPLE, None).unwrap();
    let sources = [("postgres".to_string(), "postgres://x@y/z".to_string())].into();
    let mut p = Problems::new(Path::new("user_basic_info.toml"));
    let job = parse_job(
        Path::new("user_basic_info.toml"),
        &text,
        &sources,
        "public",
        Default::default(),
        &mut p,
    )
    .unwrap_or_else(|| panic!("{:?}\n{text}", p.list));
    assert_eq!(job.target.name, "user_basic_info");
    assert_eq!(job.key, vec!["user_id", "id"]);
    assert_eq!(job.from.name.name, "users");
    assert_eq!(job.joins[0].table.name.name, "profiles");
    assert_eq!(job.joins[0].on[0].0.to_string(), "users.id");
    assert_eq!(job.joins[0].on[0].1.to_string(), "profiles.user_id");
    let names: Vec<&str> = job.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "user_id",
            "email",
            "json_transform",
            "field1_view_column",
            "field2_view_column",
            "status",
            "status_label",
            "id",
            "age",
            "test"
        ]
    );
    assert!(
        matches!(&job.columns[3].kind, ColumnKind::Json { path, .. } if path == &["field1_in_json"])
    );
    assert_eq!(job.columns[3].ty.as_deref(), Some("int"));
    assert!(
        matches!(&job.columns[6].kind, ColumnKind::Map { map, default: None, .. } if map["2"] == "В обработке")
    );
    assert!(matches!(job.columns[9].kind, ColumnKind::Deleted { .. }));
    assert!(
        text.contains("Warning: the primary key is a uuid"),
        "{text}"
    );
    assert!(insightforge(EXAMPLE, Some("crm"))
        .unwrap()
        .contains("source = \"crm\""));
}

#[test]
fn what_cannot_be_translated_is_named_by_its_json_path() {
    let bad = EXAMPLE
        .replace("\"FieldTransform\", \"mode\"", "\"Lookup\", \"mode\"")
        .replace("\"inner\": {", "\"cross\": {")
        .replace(
            "\"is_nullable\": true, \"is_update_key\"",
            "\"colour\": 1, \"is_update_key\"",
        );
    let e = insightforge(&bad, None).unwrap_err().to_string();
    assert!(
        e.contains("$.joins[0].cross: join type \"cross\" cannot be translated"),
        "{e}"
    );
    assert!(e.contains("$.sources[0].schemas[0].tables[0].columns[3].transform.type: transform \"Lookup\" cannot be translated"), "{e}");
    assert!(
        e.contains("$.sources[0].schemas[0].tables[0].columns[0].colour: unknown key"),
        "{e}"
    );
    let e = insightforge("{\"view_name\": 3", None)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("$: not JSON"), "{e}");
}

#[test]
fn toml_strings_are_escaped() {
    assert_eq!(quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
}
