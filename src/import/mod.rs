//! `pgtide import insightforge FILE`: an InsightForge view document turned into a job file.
//!
//! The document is walked by hand (not deserialized into fixed structs) so that every part
//! pgtide cannot translate is reported with its JSON path, all at once (`read`); the parts are
//! then joined up and written out as TOML here.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

mod read;

use read::Output;

/// Problems, each naming the JSON path of the part that could not be translated.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ImportError(pub Vec<String>);

/// Translate `text` (an InsightForge document) into the text of a pgtide job file.
/// `source` overrides the document's source name.
pub fn insightforge(text: &str, source: Option<&str>) -> Result<String, ImportError> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| ImportError(vec![format!("$: not JSON: {e}")]))?;
    let read::Document {
        view_name,
        mut tables,
        joins,
    } = read::document(&doc)?;
    let mut p = Vec::new();

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
mod tests;
