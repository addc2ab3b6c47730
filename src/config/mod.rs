//! Configuration: `pgtide.toml` and `jobs/*.toml` parsed raw, then validated into specs.
//!
//! Every problem is collected with the file and the dotted field it concerns, so that a user
//! sees all of them at once (`jobs/orders.toml: column[2].from: ...`).

pub mod names;
mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use raw::{RawColumn, RawDaemon, RawDwh, RawFrom, RawInstance, RawJob, RawJoin, RawSource};

/// Rows per batch when a job does not say: large enough that per-batch costs (a transaction,
/// a staging table round trip) vanish, small enough to keep memory and lock times short.
pub const DEFAULT_BATCH_SIZE: i64 = 10_000;
/// Jobs the daemon runs at once unless told otherwise.
pub const DEFAULT_MAX_CONCURRENT_JOBS: usize = 4;
/// A notify job's safety sweep when it sets no schedule.
pub const DEFAULT_SWEEP_SECS: u64 = 60;
/// PostgreSQL keeps identifiers in `name` (NAMEDATALEN - 1 bytes): a longer one is refused as
/// a parameter and silently cut short in SQL text, where it would then name something else.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        }
    }
}

/// Every problem found while loading, in file order.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<Problem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid configuration ({n} problem{})",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub jobs_dir: PathBuf,
    pub state_path: PathBuf,
    pub sources: BTreeMap<String, String>,
    pub dwh: DwhConfig,
    pub daemon: DaemonConfig,
    pub jobs: Vec<Arc<JobSpec>>,
}

#[derive(Debug, Clone)]
pub struct DwhConfig {
    pub url: String,
    pub schema: String,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub max_concurrent_jobs: usize,
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Poll,
    Notify,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Poll => "poll",
            Mode::Notify => "notify",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Cron(String),
    Interval(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    Delete,
    Soft,
    Ignore,
}

/// A possibly schema-qualified relation name, unquoted; pgtide quotes it when it writes SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    pub name: QualifiedName,
    pub alias: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    Inner,
    Left,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub table: TableRef,
    pub kind: JoinKind,
    /// Equalities `earlier.column = this.column`.
    pub on: Vec<(ColumnRef, ColumnRef)>,
}

/// `alias.column` as written in a job file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ColumnRef {
    pub alias: String,
    pub column: String,
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.alias, self.column)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Fail,
    Null,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnKind {
    /// A source column, optionally cast to `type`.
    Direct(ColumnRef),
    /// A source value translated through a label map.
    Map {
        from: ColumnRef,
        map: BTreeMap<String, String>,
        default: Option<String>,
    },
    /// A field of a json/jsonb column, cast to `type`.
    Json {
        from: ColumnRef,
        path: Vec<String>,
        on_error: OnError,
    },
    /// A raw SQL expression evaluated by the source.
    Sql(String),
    /// A column gone from the source, kept in the target as NULL.
    Deleted { from: Option<ColumnRef> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    /// Target type as written (validated by the source's type parser before use).
    pub ty: Option<String>,
    pub kind: ColumnKind,
}

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    pub file: PathBuf,
    pub source: String,
    pub mode: Mode,
    pub schedule: Option<Schedule>,
    pub batch_size: i64,
    pub target: QualifiedName,
    pub key: Vec<String>,
    /// Main-table columns of the cursor; `None` means the main table's primary key.
    pub watermark: Option<Vec<String>>,
    pub on_delete: OnDelete,
    pub from: TableRef,
    pub joins: Vec<Join>,
    pub columns: Vec<ColumnSpec>,
}

impl JobSpec {
    /// Every table of the view, main table first.
    pub fn tables(&self) -> impl Iterator<Item = &TableRef> {
        std::iter::once(&self.from).chain(self.joins.iter().map(|j| &j.table))
    }
}

/// Where to find `pgtide.toml`: the flag, then `$PGTIDE_CONFIG`, then `./pgtide.toml`.
pub fn config_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("PGTIDE_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("pgtide.toml"),
    }
}

/// Load and validate the instance file and every job file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let mut problems = Problems::new(path);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.push("", format!("cannot read: {e}"));
            return Err(ConfigError(problems.list));
        }
    };
    let mut value: toml::Value = match toml::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            problems.push("", toml_message(&e));
            return Err(ConfigError(problems.list));
        }
    };
    expand_env(&mut value, "", &mut problems);
    let Some(raw) = problems.parse::<RawInstance>("", value) else {
        return Err(ConfigError(problems.list));
    };
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &str| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            dir.join(p)
        }
    };
    let jobs_dir = resolve(raw.jobs_dir.as_deref().unwrap_or("jobs"));
    let state_path = resolve(raw.state_path.as_deref().unwrap_or("pgtide.db"));

    let mut sources = BTreeMap::new();
    for (name, v) in raw.sources {
        let field = format!("sources.{name}");
        if let Some(s) = problems.parse::<RawSource>(&field, v) {
            check_url(&s.url, &format!("{field}.url"), &mut problems);
            let url = add_password_file(s.url, s.password_file, &field, &resolve, &mut problems);
            sources.insert(name, url);
        }
    }
    if sources.is_empty() {
        problems.push(
            "sources",
            "at least one source is required ([sources.NAME] with url)",
        );
    }
    let dwh = match raw.dwh {
        None => {
            problems.push("dwh", "missing section [dwh] with url");
            None
        }
        Some(v) => problems.parse::<RawDwh>("dwh", v).map(|d| {
            check_url(&d.url, "dwh.url", &mut problems);
            let url = add_password_file(d.url, d.password_file, "dwh", &resolve, &mut problems);
            let schema = d.schema.unwrap_or_else(|| "public".into());
            if schema.is_empty() {
                problems.push("dwh.schema", "must not be empty");
            }
            check_identifier(&schema, "dwh.schema", &mut problems);
            DwhConfig { url, schema }
        }),
    };
    let daemon = match raw.daemon {
        None => Some(DaemonConfig {
            max_concurrent_jobs: DEFAULT_MAX_CONCURRENT_JOBS,
            metrics_listen: None,
        }),
        Some(v) => problems.parse::<RawDaemon>("daemon", v).map(|d| {
            let max = d.max_concurrent_jobs.unwrap_or(DEFAULT_MAX_CONCURRENT_JOBS);
            if max == 0 {
                problems.push("daemon.max_concurrent_jobs", "must be at least 1");
            }
            if let Some(addr) = &d.metrics_listen {
                if addr.parse::<std::net::SocketAddr>().is_err() {
                    problems.push(
                        "daemon.metrics_listen",
                        format!("{addr:?} is not an address like 127.0.0.1:9464"),
                    );
                }
            }
            DaemonConfig {
                max_concurrent_jobs: max,
                metrics_listen: d.metrics_listen,
            }
        }),
    };

    let default_schema = dwh.as_ref().map(|d| d.schema.clone()).unwrap_or_default();
    let mut all = problems.list;
    let jobs = load_jobs(&jobs_dir, &sources, &default_schema, &mut all);
    match (dwh, daemon) {
        (Some(dwh), Some(daemon)) if all.is_empty() => Ok(Config {
            path: path.to_path_buf(),
            jobs_dir,
            state_path,
            sources,
            dwh,
            daemon,
            jobs,
        }),
        _ => Err(ConfigError(all)),
    }
}

fn load_jobs(
    dir: &Path,
    sources: &BTreeMap<String, String>,
    default_schema: &str,
    all: &mut Vec<Problem>,
) -> Vec<Arc<JobSpec>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            all.push(Problem {
                file: dir.to_path_buf(),
                field: String::new(),
                message: format!("cannot read jobs directory: {e}"),
            });
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut jobs = Vec::new();
    for file in files {
        let mut problems = Problems::new(&file);
        let job = std::fs::read_to_string(&file)
            .map_err(|e| problems.push("", format!("cannot read: {e}")))
            .ok()
            .and_then(|text| parse_job(&file, &text, sources, default_schema, &mut problems));
        all.append(&mut problems.list);
        if let Some(job) = job {
            jobs.push(Arc::new(job));
        }
    }
    jobs
}

/// Parse and validate one job file's text.
pub fn parse_job(
    file: &Path,
    text: &str,
    sources: &BTreeMap<String, String>,
    default_schema: &str,
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
            Err(m) => {
                problems.push("cron", m);
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
        target: target?,
        key,
        watermark,
        on_delete,
        from: from?,
        joins,
        columns,
    })
}

fn column_kind(
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
fn check_type_name(ty: &str, field: &str, problems: &mut Problems) {
    let ok = !ty.trim().is_empty()
        && ty
            .chars()
            .all(|c| c.is_alphanumeric() || " _(),[]\".".contains(c))
        && ty.matches('"').count().is_multiple_of(2);
    if !ok {
        problems.push(field, format!("{ty:?} is not a type name"));
    }
}

fn table_ref(
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

fn qualified(
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

fn column_ref(s: &str, field: &str, problems: &mut Problems) -> Option<ColumnRef> {
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
fn check_identifier(value: &str, field: &str, problems: &mut Problems) {
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
fn check_notify_names(job: &str, tables: usize, problems: &mut Problems) {
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

fn check_url(url: &str, field: &str, problems: &mut Problems) {
    if let Err(e) = crate::pg::conninfo::parse(url) {
        problems.push(
            field,
            format!(
                "not a PostgreSQL connection string ({e}): {}",
                crate::pg::redact(url)
            ),
        );
    }
}

/// The url with the password read from `password_file` (systemd's `LoadCredential=` puts one
/// there): relative to the config file, one trailing newline dropped. A file that cannot be read
/// is a problem of the field; so is a url that has a password already.
fn add_password_file(
    url: String,
    file: Option<String>,
    section: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    problems: &mut Problems,
) -> String {
    let Some(file) = file else {
        return url;
    };
    let field = format!("{section}.password_file");
    let path = resolve(&file);
    let password = match std::fs::read_to_string(&path) {
        Ok(p) => p,
        Err(e) => {
            problems.push(&field, format!("cannot read {}: {e}", path.display()));
            return url;
        }
    };
    let password = password
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&password);
    if password.is_empty() {
        problems.push(&field, format!("{} is empty", path.display()));
        return url;
    }
    match crate::pg::conninfo::parse(&url) {
        Ok(c) if c.password.is_some() => {
            problems.push(
                &field,
                format!("{section}.url has a password already: give it in one place"),
            );
            url
        }
        Ok(_) => crate::pg::conninfo::with_password(&url, password),
        // The url's own problem is reported for its field.
        Err(_) => url,
    }
}

/// Six fields, seconds first (an optional seventh is the year), parsed exactly as the daemon's
/// scheduler (tokio-cron-scheduler) will parse it.
pub fn validate_cron(expr: &str) -> Result<(), String> {
    let fields = expr.split_whitespace().count();
    if !(6..=7).contains(&fields) {
        return Err(format!(
            "{expr:?} has {fields} fields; pgtide wants six, seconds first: \"sec min hour day-of-month month day-of-week\""
        ));
    }
    croner::Cron::new(expr)
        .with_seconds_required()
        .with_dom_and_dow()
        .parse()
        .map(|_| ())
        .map_err(|e| format!("{expr:?} is not a cron schedule: {e}"))
}

/// Replace `${NAME}` in every string value by the environment variable `NAME`.
fn expand_env(value: &mut toml::Value, path: &str, problems: &mut Problems) {
    match value {
        toml::Value::String(s) => match expand(s) {
            Ok(e) => *s = e,
            Err(m) => problems.push(path, m),
        },
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                expand_env(v, &p, problems);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter_mut().enumerate() {
                expand_env(v, &format!("{path}[{i}]"), problems);
            }
        }
        _ => {}
    }
}

/// Expand `${NAME}`; a missing variable is an error naming it.
pub fn expand(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut missing = Vec::new();
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err("unterminated ${ in value".into());
        };
        let name = &rest[start + 2..start + end];
        match std::env::var(name) {
            Ok(v) => out.push_str(&v),
            Err(_) => missing.push(name.to_string()),
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(format!(
            "environment variable {} is not set",
            missing.join(", ")
        ))
    }
}

fn toml_message(e: &toml::de::Error) -> String {
    let mut m = e.message().to_string();
    if let Some(span) = e.span() {
        m = format!("{m} (at byte {})", span.start);
    }
    m
}

/// Problems of one file.
pub struct Problems {
    file: PathBuf,
    pub list: Vec<Problem>,
}

impl Problems {
    pub fn new(file: &Path) -> Self {
        Problems {
            file: file.to_path_buf(),
            list: Vec::new(),
        }
    }

    pub fn push(&mut self, field: &str, message: impl Into<String>) {
        self.list.push(Problem {
            file: self.file.clone(),
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn parse<T: DeserializeOwned>(&mut self, field: &str, value: toml::Value) -> Option<T> {
        match value.try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(field, e.message().trim().to_string());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
            parse_job(&file(stem), text, &sources(), "analytics", &mut p)
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
        let errs =
            job(&GOOD.replace("type = \"text\"", "type = \"text; drop table x\"")).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("column[1].type") && e.contains("is not a type name")),
            "{errs:?}"
        );
    }

    #[test]
    fn cron_strings_are_parsed_like_the_scheduler_does() {
        assert!(validate_cron("*/5 * * * * *").is_ok());
        assert!(validate_cron("0 0 3 * * Mon-Fri").is_ok());
        assert!(validate_cron("0 61 * * * *")
            .unwrap_err()
            .contains("is not a cron schedule"));
        assert!(validate_cron("* * * * *")
            .unwrap_err()
            .contains("has 5 fields"));
    }

    #[test]
    fn env_expansion_names_missing_variables() {
        std::env::set_var("PGTIDE_TEST_HOST", "db1");
        assert_eq!(
            expand("postgres://u@${PGTIDE_TEST_HOST}/x").unwrap(),
            "postgres://u@db1/x"
        );
        let e = expand("${PGTIDE_TEST_SURELY_MISSING}").unwrap_err();
        assert!(e.contains("PGTIDE_TEST_SURELY_MISSING"), "{e}");
    }

    #[test]
    fn instance_file_problems_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("jobs")).unwrap();
        std::fs::write(dir.path().join("jobs/Bad-Name.toml"), GOOD).unwrap();
        let path = dir.path().join("pgtide.toml");
        std::fs::write(&path, "colour = 1\n[sources.a]\nurl = \"${PGTIDE_TEST_NOPE}\"\n[dwh]\nurl=\"postgres://x@y/z\"\n").unwrap();
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
}
