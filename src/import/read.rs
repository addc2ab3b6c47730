//! The InsightForge document walked by hand: its tables with their columns and transforms,
//! and its joins, every part pgtide cannot translate named by its JSON path.

use std::collections::BTreeMap;

use serde_json::Value;

use super::ImportError;

/// What the document holds, before any of it is checked against the rest.
pub(super) struct Document {
    pub(super) view_name: String,
    pub(super) tables: Vec<Table>,
    pub(super) joins: Vec<JoinSpec>,
}

/// A table of `$.sources`, with the JSON path it was found at.
pub(super) struct Table {
    pub(super) source: String,
    pub(super) schema: String,
    pub(super) name: String,
    /// Given when the tables are joined up (empty until then).
    pub(super) alias: String,
    pub(super) path: String,
    pub(super) columns: Vec<Column>,
}

/// A column of a table, and the view columns its transforms add.
pub(super) struct Column {
    pub(super) name: String,
    pub(super) ty: Option<String>,
    pub(super) view_name: String,
    pub(super) primary_key: bool,
    pub(super) deleted: bool,
    pub(super) transforms: Vec<Output>,
}

/// A view column that a transform adds next to its source column.
pub(super) enum Output {
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

/// A join of `$.joins`, as the document names its tables and columns.
pub(super) struct JoinSpec {
    pub(super) kind: &'static str,
    pub(super) main: String,
    pub(super) table: String,
    pub(super) schema: Option<String>,
    pub(super) first: String,
    pub(super) second: String,
    pub(super) path: String,
}

/// The parts of `doc`, or every problem found in reading them.
pub(super) fn document(doc: &Value) -> Result<Document, ImportError> {
    let mut p = Vec::new();
    let view_name = match doc.get("view_name").and_then(Value::as_str) {
        Some(v) if !v.is_empty() => v.to_string(),
        _ => {
            p.push("$.view_name: required, a non-empty string".to_string());
            String::new()
        }
    };
    known_keys(doc, "$", &["view_name", "joins", "sources"], &mut p);

    let mut tables = Vec::new();
    for (si, src) in array(doc, "sources", "$", &mut p).iter().enumerate() {
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
    for (ji, j) in array(doc, "joins", "$", &mut p).iter().enumerate() {
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
    Ok(Document {
        view_name,
        tables,
        joins,
    })
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
