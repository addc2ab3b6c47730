//! One job file validated into a `JobSpec`: every field checked, every problem collected with
//! its dotted path (`column[2].json`), identifiers measured, cron strings parsed the way the
//! scheduler parses them.

use super::raw::{RawColumn, RawFrom, RawJob, RawJoin};
use super::*;

/// Parse and validate one job file's text.
pub fn parse_job(
    file: &Path,
    text: &str,
    sources: &BTreeMap<String, String>,
    default_schema: &str,
    dwh: DwhKind,
    problems: &mut Problems,
) -> Option<JobSpec> {
    let before = problems.list.len();
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        problems.push(
            "",
            format!("job name {name:?} (the file stem) must match [a-z0-9_]+"),
        );
    }
    let value: toml::Value = match toml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            problems.push("", toml_message(&e));
            return None;
        }
    };
    let raw = problems.parse::<RawJob>("", value)?;

    let source = match (&raw.source, sources.len()) {
        (Some(s), _) => {
            if !sources.contains_key(s) {
                let known: Vec<&str> = sources.keys().map(String::as_str).collect();
                problems.push(
                    "source",
                    format!("unknown source {s:?} (defined: {})", known.join(", ")),
                );
            }
            s.clone()
        }
        (None, 1) => sources.keys().next().cloned().unwrap_or_default(),
        (None, 0) => String::new(),
        (None, _) => {
            problems.push("source", "required when more than one source is defined");
            String::new()
        }
    };
    let mode = match raw.mode.as_deref() {
        None | Some("poll") => Mode::Poll,
        Some("notify") => Mode::Notify,
        Some(m) => {
            problems.push("mode", format!("{m:?} is not one of \"poll\", \"notify\""));
            Mode::Poll
        }
    };
    let schedule = match (&raw.cron, raw.interval_secs) {
        (Some(_), Some(_)) => {
            problems.push(
                "interval_secs",
                "set either cron or interval_secs, not both",
            );
            None
        }
        (Some(c), None) => match validate_cron(c) {
            Ok(()) => Some(Schedule::Cron(c.clone())),
            Err(e) => {
                problems.push("cron", e.to_string());
                None
            }
        },
        (None, Some(s)) if s <= 0 => {
            problems.push("interval_secs", "must be a positive number of seconds");
            None
        }
        (None, Some(s)) => Some(Schedule::Interval(s as u64)),
        (None, None) => {
            if mode == Mode::Poll {
                problems.push("cron", "a poll job needs a schedule: cron or interval_secs");
            }
            None
        }
    };
    let batch_size = raw.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
    if batch_size <= 0 {
        problems.push("batch_size", "must be a positive number of rows");
    }
    let parallel = raw.parallel.unwrap_or(1);
    if !(1..=MAX_PARALLEL).contains(&parallel) {
        problems.push(
            "parallel",
            format!("must be a number of workers from 1 to {MAX_PARALLEL}"),
        );
    }
    let max_rows_per_sec = match raw.max_rows_per_sec {
        Some(r) if r <= 0 => {
            problems.push(
                "max_rows_per_sec",
                "must be a positive number of rows (leave it out for no limit)",
            );
            None
        }
        r => r.map(|r| r as u64),
    };
    let batch_timeout_secs = raw.batch_timeout_secs.unwrap_or(DEFAULT_BATCH_TIMEOUT_SECS);
    if batch_timeout_secs <= 0 {
        problems.push("batch_timeout_secs", "must be a positive number of seconds");
    }
    let target = match raw.target.as_deref() {
        None => {
            if name.len() > MAX_IDENTIFIER_BYTES {
                problems.push(
                    "target",
                    format!(
                        "not set, so the job name {name:?} names the target table, and it is {} bytes long; PostgreSQL identifiers are at most {MAX_IDENTIFIER_BYTES} bytes",
                        name.len()
                    ),
                );
            }
            Some(QualifiedName {
                schema: default_schema.to_string(),
                name: name.clone(),
            })
        }
        Some(t) => qualified(t, default_schema, "target", problems),
    };
    let on_delete = match raw.on_delete.as_deref() {
        None | Some("delete") => OnDelete::Delete,
        Some("soft") => OnDelete::Soft,
        Some("ignore") => OnDelete::Ignore,
        Some(o) => {
            problems.push(
                "on_delete",
                format!("{o:?} is not one of \"delete\", \"soft\", \"ignore\""),
            );
            OnDelete::Delete
        }
    };
    if raw.on_delete.is_some() && mode == Mode::Poll {
        problems.push(
            "on_delete",
            "only notify jobs see deletes; remove it or set mode = \"notify\"",
        );
    }

    // Tables and aliases.
    let from = match raw.from {
        None => {
            problems.push("from", "missing section [from] with table");
            None
        }
        Some(v) => problems
            .parse::<RawFrom>("from", v)
            .and_then(|f| table_ref(&f.table, f.alias, "from", problems)),
    };
    let mut aliases: Vec<String> = from.iter().map(|f| f.alias.clone()).collect();
    let mut joins = Vec::new();
    for (i, v) in raw.join.into_iter().enumerate() {
        let field = format!("join[{i}]");
        let Some(j) = problems.parse::<RawJoin>(&field, v) else {
            continue;
        };
        let Some(table) = table_ref(&j.table, j.alias, &field, problems) else {
            continue;
        };
        if aliases.contains(&table.alias) {
            problems.push(
                &format!("{field}.as"),
                format!("alias {:?} is already used", table.alias),
            );
        }
        let kind = match j.kind.as_deref() {
            None | Some("inner") => JoinKind::Inner,
            Some("left") => JoinKind::Left,
            Some(k) => {
                problems.push(
                    &format!("{field}.type"),
                    format!("{k:?} is not one of \"inner\", \"left\""),
                );
                JoinKind::Inner
            }
        };
        let mut on = Vec::new();
        if j.on.is_empty() {
            problems.push(&format!("{field}.on"), "needs at least one equality");
        }
        for (l, r) in &j.on {
            let f = format!("{field}.on.{l}");
            let (Some(a), Some(b)) = (column_ref(l, &f, problems), column_ref(r, &f, problems))
            else {
                continue;
            };
            // Either order is fine as long as one side is this join and the other an earlier table.
            let (earlier, this) = if b.alias == table.alias {
                (a, b)
            } else {
                (b, a)
            };
            if this.alias != table.alias {
                problems.push(
                    &f,
                    format!("one side must name this join's alias {:?}", table.alias),
                );
            } else if !aliases.contains(&earlier.alias) {
                problems.push(
                    &f,
                    format!("{:?} is not the alias of an earlier table", earlier.alias),
                );
            } else {
                on.push((earlier, this));
            }
        }
        aliases.push(table.alias.clone());
        joins.push(Join { table, kind, on });
    }

    if mode == Mode::Notify {
        check_notify_names(&name, 1 + joins.len(), problems);
    }

    // Columns.
    let mut columns = Vec::new();
    let mut names = BTreeSet::new();
    if raw.column.is_empty() {
        problems.push("column", "a job needs at least one [[column]]");
    }
    for (i, v) in raw.column.into_iter().enumerate() {
        let field = format!("column[{i}]");
        let Some(c) = problems.parse::<RawColumn>(&field, v) else {
            continue;
        };
        check_identifier(&c.name, &format!("{field}.name"), problems);
        if c.name.is_empty() {
            problems.push(&format!("{field}.name"), "must not be empty");
        } else if !names.insert(c.name.clone()) {
            problems.push(
                &format!("{field}.name"),
                format!("column {:?} is defined twice", c.name),
            );
        } else if c.name.starts_with("_pgtide_") {
            problems.push(
                &format!("{field}.name"),
                "names starting with _pgtide_ are reserved",
            );
        }
        if let Some(kind) = column_kind(&c, &field, &aliases, problems) {
            columns.push(ColumnSpec {
                name: c.name,
                ty: c.ty,
                kind,
            });
        }
    }

    let key = raw.key.unwrap_or_default();
    if key.is_empty() {
        problems.push(
            "key",
            "required: the target column(s) forming its primary key",
        );
    }
    for k in &key {
        check_identifier(k, "key", problems);
        if !names.contains(k) {
            problems.push("key", format!("{k:?} is not one of the job's columns"));
        }
        if let Some(c) = columns.iter().find(|c| &c.name == k) {
            if matches!(c.kind, ColumnKind::Deleted { .. }) {
                problems.push(
                    "key",
                    format!("{k:?} is a deleted column and cannot be part of the key"),
                );
            }
        }
    }
    let watermark = raw.watermark.map(|w| {
        if w.is_empty() {
            problems.push("watermark", "must name at least one main-table column");
        }
        let main = from.as_ref().map(|f| f.alias.as_str()).unwrap_or("");
        w.into_iter()
            .map(|c| match c.split_once('.') {
                Some((a, col)) if a == main => col.to_string(),
                _ => c,
            })
            .inspect(|c| check_identifier(c, "watermark", problems))
            .collect::<Vec<_>>()
    });

    if problems.list.len() > before {
        return None;
    }
    Some(JobSpec {
        name,
        file: file.to_path_buf(),
        source,
        mode,
        schedule,
        batch_size,
        parallel: parallel.max(1) as usize,
        max_rows_per_sec,
        batch_timeout: std::time::Duration::from_secs(batch_timeout_secs.max(1) as u64),
        target: target?,
        key,
        watermark,
        on_delete,
        from: from?,
        joins,
        columns,
        dwh,
    })
}

pub(super) fn column_kind(
    c: &RawColumn,
    field: &str,
    aliases: &[String],
    problems: &mut Problems,
) -> Option<ColumnKind> {
    let f = |s: &str| format!("{field}.{s}");
    let from = match &c.from {
        Some(s) => {
            let r = column_ref(s, &f("from"), problems)?;
            if !aliases.contains(&r.alias) {
                problems.push(
                    &f("from"),
                    format!("{:?} is not an alias of [from] or a [[join]]", r.alias),
                );
                return None;
            }
            Some(r)
        }
        None => None,
    };
    if let Some(ty) = &c.ty {
        check_type_name(ty, &f("type"), problems);
    }
    if c.on_error.is_some() && c.json.is_none() {
        problems.push(&f("on_error"), "only json columns take on_error");
    }
    if c.map_default.is_some() && c.map.is_none() {
        problems.push(&f("map_default"), "needs map");
    }
    if c.deleted == Some(true) {
        if c.sql.is_some() || c.map.is_some() || c.json.is_some() {
            problems.push(
                &f("deleted"),
                "a deleted column takes only name, type and from",
            );
        }
        if c.ty.is_none() {
            problems.push(
                &f("type"),
                "a deleted column needs its type, since the source no longer has it",
            );
            return None;
        }
        return Some(ColumnKind::Deleted { from });
    }
    if let Some(sql) = &c.sql {
        if from.is_some() || c.map.is_some() || c.json.is_some() {
            problems.push(
                &f("sql"),
                "set either sql or from (with map or json), not both",
            );
            return None;
        }
        if sql.trim().is_empty() {
            problems.push(&f("sql"), "must not be empty");
            return None;
        }
        return Some(ColumnKind::Sql(sql.clone()));
    }
    let Some(from) = from else {
        problems.push(
            &f("from"),
            "required: alias.column (or sql = ..., or deleted = true)",
        );
        return None;
    };
    match (&c.map, &c.json) {
        (Some(_), Some(_)) => {
            problems.push(&f("json"), "set either map or json, not both");
            None
        }
        (Some(map), None) => Some(ColumnKind::Map {
            from,
            map: map.clone(),
            default: c.map_default.clone(),
        }),
        (None, Some(path)) => {
            let parts: Vec<String> = path.split('.').map(str::to_string).collect();
            if parts.iter().any(String::is_empty) {
                problems.push(
                    &f("json"),
                    format!("{path:?} is not a dotted path like meta.channel"),
                );
                return None;
            }
            let on_error = match c.on_error.as_deref() {
                None | Some("fail") => OnError::Fail,
                Some("null") => OnError::Null,
                Some(o) => {
                    problems.push(
                        &f("on_error"),
                        format!("{o:?} is not one of \"fail\", \"null\""),
                    );
                    OnError::Fail
                }
            };
            Some(ColumnKind::Json {
                from,
                path: parts,
                on_error,
            })
        }
        (None, None) => Some(ColumnKind::Direct(from)),
    }
}

/// A type name is spliced into SQL only after the source's own type parser accepted it; this
/// first check keeps anything that could not be a type name out of SQL text altogether.
pub(super) fn check_type_name(ty: &str, field: &str, problems: &mut Problems) {
    // Single quotes enclose a ClickHouse time zone (`DateTime64(3, 'UTC')`): a name of
    // letters, digits and `_/+-` only.
    let mut quoted = false;
    let chars_ok = ty.chars().all(|c| match c {
        '\'' => {
            quoted = !quoted;
            true
        }
        _ if quoted => c.is_ascii_alphanumeric() || "_/+-".contains(c),
        _ => c.is_alphanumeric() || " _(),[]\".".contains(c),
    });
    let ok =
        !ty.trim().is_empty() && chars_ok && !quoted && ty.matches('"').count().is_multiple_of(2);
    if !ok {
        problems.push(field, format!("{ty:?} is not a type name"));
    }
}

pub(super) fn table_ref(
    table: &str,
    alias: Option<String>,
    field: &str,
    problems: &mut Problems,
) -> Option<TableRef> {
    let name = qualified(table, "public", &format!("{field}.table"), problems)?;
    if let Some(a) = &alias {
        check_identifier(a, &format!("{field}.as"), problems);
    }
    let alias = alias.unwrap_or_else(|| name.name.clone());
    if alias.is_empty() || alias.contains('.') {
        problems.push(
            &format!("{field}.as"),
            format!("{alias:?} is not a usable alias (empty or with a dot)"),
        );
        return None;
    }
    Some(TableRef { name, alias })
}

pub(super) fn qualified(
    s: &str,
    default_schema: &str,
    field: &str,
    problems: &mut Problems,
) -> Option<QualifiedName> {
    let (schema, name) = match s.split_once('.') {
        Some((a, b)) => (a.to_string(), b.to_string()),
        None => (default_schema.to_string(), s.to_string()),
    };
    if schema.is_empty() || name.is_empty() || name.contains('.') {
        problems.push(field, format!("{s:?} is not \"table\" or \"schema.table\""));
        return None;
    }
    if s.contains('.') {
        check_identifier(&schema, field, problems);
    }
    check_identifier(&name, field, problems);
    Some(QualifiedName { schema, name })
}

pub(super) fn column_ref(s: &str, field: &str, problems: &mut Problems) -> Option<ColumnRef> {
    match s.split_once('.') {
        Some((a, c)) if !a.is_empty() && !c.is_empty() => {
            // Aliases are checked where they are defined; a reference to one is either to a
            // defined alias or reported as unknown.
            check_identifier(c, field, problems);
            Some(ColumnRef {
                alias: a.to_string(),
                column: c.to_string(),
            })
        }
        _ => {
            problems.push(field, format!("{s:?} is not alias.column"));
            None
        }
    }
}

/// An identifier the job gives must fit in PostgreSQL's `name`.
pub(super) fn check_identifier(value: &str, field: &str, problems: &mut Problems) {
    if value.len() > MAX_IDENTIFIER_BYTES {
        problems.push(
            field,
            format!(
                "{value:?} is {} bytes long; PostgreSQL identifiers are at most {MAX_IDENTIFIER_BYTES} bytes",
                value.len()
            ),
        );
    }
}

/// A notify job names its event table, functions, triggers and channel after itself: the
/// longest of them must fit in an identifier too.
pub(super) fn check_notify_names(job: &str, tables: usize, problems: &mut Problems) {
    let names = names::all(job, tables);
    let Some(longest) = names.iter().max_by_key(|n| n.len()) else {
        return;
    };
    if longest.len() > MAX_IDENTIFIER_BYTES {
        problems.push(
            "",
            format!(
                "job name {job:?} is too long for a notify job: {longest:?}, named after it in the source, would be {} bytes long; PostgreSQL identifiers are at most {MAX_IDENTIFIER_BYTES} bytes, so this job's name (the file stem) can have at most {} bytes",
                longest.len(),
                MAX_IDENTIFIER_BYTES + job.len() - longest.len()
            ),
        );
    }
}

/// Why a `cron` value is refused.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    #[error("{expr:?} has {fields} fields; pgtide wants six, seconds first: \"sec min hour day-of-month month day-of-week\"")]
    Fields { expr: String, fields: usize },
    #[error("{expr:?} is not a cron schedule: {source}")]
    Invalid {
        expr: String,
        #[source]
        source: croner::errors::CronError,
    },
}

/// Six fields, seconds first (an optional seventh is the year), parsed exactly as the daemon's
/// scheduler (tokio-cron-scheduler) will parse it.
pub fn validate_cron(expr: &str) -> Result<(), CronError> {
    let fields = expr.split_whitespace().count();
    if !(6..=7).contains(&fields) {
        return Err(CronError::Fields {
            expr: expr.to_string(),
            fields,
        });
    }
    croner::Cron::new(expr)
        .with_seconds_required()
        .with_dom_and_dow()
        .parse()
        .map(|_| ())
        .map_err(|source| CronError::Invalid {
            expr: expr.to_string(),
            source,
        })
}
