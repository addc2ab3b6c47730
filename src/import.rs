//! `pgtide import insightforge FILE`: an InsightForge view document turned into a job file.
//!
//! The document is walked by hand (not deserialized into fixed structs) so that every part
//! pgtide cannot translate is reported with its JSON path, all at once.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

/// Problems, each naming the JSON path of the part that could not be translated.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ImportError(pub Vec<String>);

struct Table {
    source: String,
    schema: String,
    name: String,
    alias: String,
    path: String,
    columns: Vec<Column>,
}

struct Column {
    name: String,
    ty: Option<String>,
    view_name: String,
    primary_key: bool,
    deleted: bool,
    transforms: Vec<Output>,
}

/// A view column that a transform adds next to its source column.
enum Output {
    Map {
        name: String,
        map: BTreeMap<String, String>,
    },
    Json {
        name: String,
        field: String,
        ty: String,
    },
}

struct JoinSpec {
    kind: &'static str,
    main: String,
    table: String,
    schema: Option<String>,
    first: String,
    second: String,
    path: String,
}

/// Translate `text` (an InsightForge document) into the text of a pgtide job file.
/// `source` overrides the document's source name.
pub fn insightforge(text: &str, source: Option<&str>) -> Result<String, ImportError> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| ImportError(vec![format!("$: not JSON: {e}")]))?;
    let mut p = Vec::new();
    let view_name = match doc.get("view_name").and_then(Value::as_str) {
        Some(v) if !v.is_empty() => v.to_string(),
        _ => {
            p.push("$.view_name: required, a non-empty string".to_string());
            String::new()
        }
    };
    known_keys(&doc, "$", &["view_name", "joins", "sources"], &mut p);

    let mut tables = Vec::new();
    for (si, src) in array(&doc, "sources", "$", &mut p).iter().enumerate() {
        let sp = format!("$.sources[{si}]");
        known_keys(src, &sp, &["name", "schemas"], &mut p);
        let src_name = string(src, "name", &sp, &mut p);
        for (ci, sch) in array(src, "schemas", &sp, &mut p).iter().enumerate() {
            let cp = format!("{sp}.schemas[{ci}]");
            known_keys(sch, &cp, &["name", "tables"], &mut p);
            let schema = string(sch, "name", &cp, &mut p);
            for (ti, t) in array(sch, "tables", &cp, &mut p).iter().enumerate() {
                let tp = format!("{cp}.tables[{ti}]");
                known_keys(t, &tp, &["name", "columns"], &mut p);
                let name = string(t, "name", &tp, &mut p);
                let columns = array(t, "columns", &tp, &mut p)
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| column(c, &format!("{tp}.columns[{i}]"), &mut p))
                    .collect();
                tables.push(Table {
                    source: src_name.clone(),
                    schema: schema.clone(),
                    name,
                    alias: String::new(),
                    path: tp,
                    columns,
                });
            }
        }
    }
    if tables.is_empty() && p.is_empty() {
        p.push("$.sources: no tables to take into the view".into());
    }
    let sources: Vec<&str> = tables.iter().map(|t| t.source.as_str()).collect();
    if sources.iter().any(|s| *s != sources[0]) {
        p.push(
            "$.sources: tables come from several sources; a pgtide job reads one source database"
                .into(),
        );
    }

    let mut joins = Vec::new();
    for (ji, j) in array(&doc, "joins", "$", &mut p).iter().enumerate() {
        let jp = format!("$.joins[{ji}]");
        let Some(obj) = j.as_object() else {
            p.push(format!(
                "{jp}: must be an object like {{\"inner\": {{...}}}}"
            ));
            continue;
        };
        if obj.len() != 1 {
            p.push(format!(
                "{jp}: must have exactly one key, \"inner\" or \"left\""
            ));
            continue;
        }
        let (kind, body) = obj.iter().next().expect("one key");
        let kind = match kind.as_str() {
            "inner" => "inner",
            "left" => "left",
            other => {
                p.push(format!("{jp}.{other}: join type {other:?} cannot be translated (pgtide has inner and left)"));
                continue;
            }
        };
        let bp = format!("{jp}.{kind}");
        known_keys(
            body,
            &bp,
            &[
                "main_table",
                "source",
                "schema",
                "table",
                "column_first",
                "column_second",
            ],
            &mut p,
        );
        joins.push(JoinSpec {
            kind,
            main: body
                .get("main_table")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            table: string(body, "table", &bp, &mut p),
            schema: body
                .get("schema")
                .and_then(Value::as_str)
                .map(str::to_string),
            first: string(body, "column_first", &bp, &mut p),
            second: string(body, "column_second", &bp, &mut p),
            path: bp,
        });
    }
    if !p.is_empty() {
        return Err(ImportError(p));
    }

    // Aliases: the table name, with the schema when two tables share a name.
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    for t in &mut tables {
        t.alias = if names.iter().filter(|n| **n == t.name).count() > 1 {
            format!("{}_{}", t.schema, t.name)
        } else {
            t.name.clone()
        };
    }
    let find = |name: &str, schema: Option<&str>| {
        tables
            .iter()
            .position(|t| t.name == name && schema.is_none_or(|s| s == t.schema))
    };
    // The main table: the one joins hang from, else the first listed.
    let main = joins
        .iter()
        .find(|j| !j.main.is_empty())
        .and_then(|j| find(&j.main, None))
        .unwrap_or(0);
    let mut order = vec![main];
    let mut join_lines = String::new();
    for j in &joins {
        let Some(ti) = find(&j.table, j.schema.as_deref()) else {
            p.push(format!(
                "{}.table: {:?} is not among the tables of $.sources",
                j.path, j.table
            ));
            continue;
        };
        let mi = if j.main.is_empty() {
            Some(main)
        } else {
            find(&j.main, None)
        };
        let Some(mi) = mi else {
            p.push(format!(
                "{}.main_table: {:?} is not among the tables of $.sources",
                j.path, j.main
            ));
            continue;
        };
        if !order.contains(&mi) {
            p.push(format!(
                "{}.main_table: {:?} is joined only later; list its join first",
                j.path, j.main
            ));
            continue;
        }
        if order.contains(&ti) {
            p.push(format!("{}.table: {:?} is joined twice", j.path, j.table));
            continue;
        }
        order.push(ti);
        let (t, m) = (&tables[ti], &tables[mi]);
        let _ = write!(
            join_lines,
            "\n[[join]]\ntable = {}\nas = {}\ntype = \"{}\"\non = {{ {} = {} }}\n",
            quote(&format!("{}.{}", t.schema, t.name)),
            quote(&t.alias),
            j.kind,
            quote(&format!("{}.{}", m.alias, j.first)),
            quote(&format!("{}.{}", t.alias, j.second))
        );
    }
    for (i, t) in tables.iter().enumerate() {
        if !order.contains(&i) {
            p.push(format!(
                "{}: table {:?} is not joined to the main table; add it to $.joins",
                t.path, t.name
            ));
        }
    }
    if !p.is_empty() {
        return Err(ImportError(p));
    }

    let mut columns = String::new();
    let mut key = Vec::new();
    let mut seen = BTreeMap::new();
    for &ti in &order {
        let t = &tables[ti];
        for (ci, c) in t.columns.iter().enumerate() {
            let path = format!("{}.columns[{ci}]", t.path);
            let mut add = |name: &str, body: String, p: &mut Vec<String>| {
                if let Some(first) = seen.insert(name.to_string(), path.clone()) {
                    p.push(format!(
                        "{path}: view column {name:?} is also produced by {first}"
                    ));
                }
                let _ = write!(columns, "\n[[column]]\nname = {}\n{body}", quote(name));
            };
            let from = format!("from = {}\n", quote(&format!("{}.{}", t.alias, c.name)));
            if c.deleted {
                let ty = c.ty.clone().unwrap_or_else(|| "text".into());
                add(
                    &c.view_name,
                    format!("{from}type = {}\ndeleted = true\n", quote(&ty)),
                    &mut p,
                );
                continue;
            }
            add(&c.view_name, from.clone(), &mut p);
            if c.primary_key {
                key.push(c.view_name.clone());
            }
            for o in &c.transforms {
                match o {
                    Output::Map { name, map } => {
                        let pairs: Vec<String> = map
                            .iter()
                            .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
                            .collect();
                        add(
                            name,
                            format!("{from}map = {{ {} }}\n", pairs.join(", ")),
                            &mut p,
                        );
                    }
                    Output::Json { name, field, ty } => {
                        add(
                            name,
                            format!("{from}json = {}\ntype = {}\n", quote(field), quote(ty)),
                            &mut p,
                        );
                    }
                }
            }
        }
    }
    if key.is_empty() {
        p.push("$.sources: no column has \"is_primary_key\": true, so the view has no key".into());
    }
    if !p.is_empty() {
        return Err(ImportError(p));
    }

    let m = &tables[main];
    let pk_type = m
        .columns
        .iter()
        .find(|c| c.primary_key)
        .and_then(|c| c.ty.clone());
    let mut out = String::new();
    let _ = writeln!(out, "# Imported from the InsightForge view {view_name:?}.");
    let _ = writeln!(
        out,
        "# Save as jobs/<name>.toml (the name: [a-z0-9_]+) and run `pgtide check`."
    );
    let _ = writeln!(out, "source = {}", quote(source.unwrap_or(&m.source)));
    let _ = writeln!(out, "interval_secs = 60");
    let _ = writeln!(out, "target = {}", quote(&view_name));
    let keys: Vec<String> = key.iter().map(|k| quote(k)).collect();
    let _ = writeln!(out, "key = [{}]", keys.join(", "));
    let _ = writeln!(
        out,
        "# InsightForge views have no watermark: this job polls past the main table's primary key.\n\
         # If the table has an increasing column such as updated_at, set watermark = [\"updated_at\", \"<key>\"]."
    );
    if pk_type
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case("uuid"))
    {
        let _ = writeln!(
            out,
            "# Warning: the primary key is a uuid. Random uuids do not grow, so rows inserted later can fall\n\
             # below the watermark: set a watermark on an increasing column before relying on this job."
        );
    }
    let _ = write!(
        out,
        "\n[from]\ntable = {}\nas = {}\n{join_lines}{columns}",
        quote(&format!("{}.{}", m.schema, m.name)),
        quote(&m.alias)
    );
    Ok(out)
}

fn column(c: &Value, path: &str, p: &mut Vec<String>) -> Option<Column> {
    known_keys(
        c,
        path,
        &[
            "name",
            "type",
            "view_key",
            "is_nullable",
            "is_update_key",
            "is_primary_key",
            "is_deleted",
            "transform",
        ],
        p,
    );
    let name = string(c, "name", path, p);
    if name.is_empty() {
        return None;
    }
    let flag = |k: &str, p: &mut Vec<String>| match c.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            p.push(format!("{path}.{k}: must be true or false"));
            false
        }
    };
    let primary_key = flag("is_primary_key", p);
    let deleted = flag("is_deleted", p);
    flag("is_nullable", p);
    flag("is_update_key", p);
    let view_name = c
        .get("view_key")
        .and_then(Value::as_str)
        .unwrap_or(&name)
        .to_string();
    let mut transforms = Vec::new();
    if let Some(t) = c.get("transform").filter(|t| !t.is_null()) {
        transforms = transform(t, &format!("{path}.transform"), p);
    }
    Some(Column {
        ty: c.get("type").and_then(Value::as_str).map(str::to_string),
        name,
        view_name,
        primary_key,
        deleted,
        transforms,
    })
}

fn transform(t: &Value, path: &str, p: &mut Vec<String>) -> Vec<Output> {
    known_keys(t, path, &["type", "mode", "output_column", "mapping"], p);
    let kind = string(t, "type", path, p);
    if let Some(mode) = t.get("mode").and_then(Value::as_str) {
        if mode != "Mapping" {
            p.push(format!(
                "{path}.mode: {mode:?} cannot be translated (only \"Mapping\")"
            ));
            return Vec::new();
        }
    }
    let mp = format!("{path}.mapping");
    let Some(mapping) = t.get("mapping") else {
        p.push(format!("{mp}: required"));
        return Vec::new();
    };
    match kind.as_str() {
        "FieldTransform" => {
            known_keys(
                mapping,
                &mp,
                &["type_map", "alias_new_column_transform", "mapping"],
                p,
            );
            let name = mapping
                .get("alias_new_column_transform")
                .or_else(|| t.get("output_column"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if name.is_empty() {
                p.push(format!(
                    "{mp}.alias_new_column_transform: required: the name of the label column"
                ));
            }
            let mut map = BTreeMap::new();
            match mapping.get("mapping").and_then(Value::as_object) {
                Some(m) => {
                    for (k, v) in m {
                        match v {
                            Value::String(s) => {
                                map.insert(k.clone(), s.clone());
                            }
                            Value::Number(n) => {
                                map.insert(k.clone(), n.to_string());
                            }
                            other => {
                                p.push(format!("{mp}.mapping.{k}: label {other} is not a string"))
                            }
                        }
                    }
                }
                None => p.push(format!(
                    "{mp}.mapping: required: an object of value -> label"
                )),
            }
            vec![Output::Map { name, map }]
        }
        "JSON" => {
            known_keys(mapping, &mp, &["type_map", "mapping_json"], p);
            let mut out = Vec::new();
            for (i, group) in array(mapping, "mapping_json", &mp, p).iter().enumerate() {
                let gp = format!("{mp}.mapping_json[{i}]");
                known_keys(group, &gp, &["type_field", "mapping"], p);
                let ty = string(group, "type_field", &gp, p);
                match group.get("mapping").and_then(Value::as_object) {
                    Some(m) => {
                        for (field, col) in m {
                            match col.as_str() {
                                Some(col) => out.push(Output::Json {
                                    name: col.to_string(),
                                    field: field.clone(),
                                    ty: ty.clone(),
                                }),
                                None => p.push(format!(
                                    "{gp}.mapping.{field}: the view column must be a string"
                                )),
                            }
                        }
                    }
                    None => p.push(format!(
                        "{gp}.mapping: required: an object of JSON key -> view column"
                    )),
                }
            }
            out
        }
        "" => Vec::new(),
        other => {
            p.push(format!(
                "{path}.type: transform {other:?} cannot be translated (pgtide knows \"FieldTransform\" and \"JSON\")"
            ));
            Vec::new()
        }
    }
}

fn known_keys(v: &Value, path: &str, keys: &[&str], p: &mut Vec<String>) {
    if let Some(obj) = v.as_object() {
        for k in obj.keys() {
            if !keys.contains(&k.as_str()) {
                p.push(format!("{path}.{k}: unknown key, cannot be translated"));
            }
        }
    } else {
        p.push(format!("{path}: must be an object"));
    }
}

fn string(v: &Value, key: &str, path: &str, p: &mut Vec<String>) -> String {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            if v.is_object() {
                p.push(format!("{path}.{key}: required, a non-empty string"));
            }
            String::new()
        }
    }
}

fn array<'a>(v: &'a Value, key: &str, path: &str, p: &mut Vec<String>) -> &'a [Value] {
    match v.get(key) {
        None | Some(Value::Null) => &[],
        Some(Value::Array(a)) => a,
        Some(_) => {
            p.push(format!("{path}.{key}: must be an array"));
            &[]
        }
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{parse_job, ColumnKind, Problems};

    /// The example of insightforge-view.md.
    pub const EXAMPLE: &str = include_str!("../tests/data/insightforge_example.json");

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
}
