//! Configuration: `pgtide.toml` and `jobs/*.toml` parsed raw, then validated into specs.
//!
//! Every problem is collected with the file and the dotted field it concerns, so that a user
//! sees all of them at once (`jobs/orders.toml: column[2].from: ...`).

mod job;
pub mod names;
mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use raw::{RawDaemon, RawDwh, RawInstance, RawSource};

use job::*;
pub use job::{parse_job, validate_cron, CronError};

/// Rows per batch when a job does not say: large enough that per-batch costs (a transaction,
/// a staging table round trip) vanish, small enough to keep memory and lock times short.
pub const DEFAULT_BATCH_SIZE: i64 = 10_000;
/// The most workers a job's loads may use.
pub const MAX_PARALLEL: i64 = 64;
/// How long one batch's statements may run on the source (`batch_timeout_secs`).
pub const DEFAULT_BATCH_TIMEOUT_SECS: i64 = 900;
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
    /// The schema (PostgreSQL) or database (ClickHouse) of targets named without one.
    pub schema: String,
    pub kind: DwhKind,
}

/// Which kind of warehouse the DWH url names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DwhKind {
    #[default]
    Postgres,
    /// `clickhouse://` or `clickhouses://`: ClickHouse's HTTP interface.
    ClickHouse,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub max_concurrent_jobs: usize,
    pub metrics_listen: Option<std::net::SocketAddr>,
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
    /// Workers for loads of many rows (a first load, a reload after `reset`, `replay`).
    pub parallel: usize,
    /// A cap on the rows per second the job reads from its source.
    pub max_rows_per_sec: Option<u64>,
    /// How long one batch's statements may run on the source.
    pub batch_timeout: std::time::Duration,
    pub target: QualifiedName,
    pub key: Vec<String>,
    /// Main-table columns of the cursor; `None` means the main table's primary key.
    pub watermark: Option<Vec<String>>,
    pub on_delete: OnDelete,
    pub from: TableRef,
    pub joins: Vec<Join>,
    pub columns: Vec<ColumnSpec>,
    /// The kind of DWH the job writes to: a column's `type` names one of its types.
    pub dwh: DwhKind,
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
            let kind = if crate::clickhouse::Url::is_clickhouse(&d.url) {
                DwhKind::ClickHouse
            } else {
                DwhKind::Postgres
            };
            let mut default_schema = "public".to_string();
            match kind {
                DwhKind::Postgres => check_url(&d.url, "dwh.url", &mut problems),
                DwhKind::ClickHouse => match crate::clickhouse::Url::parse(&d.url) {
                    Ok(u) => default_schema = u.database().to_string(),
                    Err(e) => problems.push("dwh.url", format!("not a ClickHouse url ({e})")),
                },
            }
            let url = add_password_file(d.url, d.password_file, "dwh", &resolve, &mut problems);
            let schema = d.schema.unwrap_or(default_schema);
            if schema.is_empty() {
                problems.push("dwh.schema", "must not be empty");
            }
            check_identifier(&schema, "dwh.schema", &mut problems);
            DwhConfig { url, schema, kind }
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
            let metrics_listen = d.metrics_listen.as_ref().and_then(|addr| {
                let parsed = addr.parse::<std::net::SocketAddr>();
                if parsed.is_err() {
                    problems.push(
                        "daemon.metrics_listen",
                        format!("{addr:?} is not an address like 127.0.0.1:9464"),
                    );
                }
                parsed.ok()
            });
            DaemonConfig {
                max_concurrent_jobs: max,
                metrics_listen,
            }
        }),
    };

    let default_schema = dwh.as_ref().map(|d| d.schema.clone()).unwrap_or_default();
    let kind = dwh.as_ref().map(|d| d.kind).unwrap_or_default();
    let mut all = problems.list;
    let jobs = load_jobs(&jobs_dir, &sources, &default_schema, kind, &mut all);
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
    kind: DwhKind,
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
            .and_then(|text| parse_job(&file, &text, sources, default_schema, kind, &mut problems));
        all.append(&mut problems.list);
        if let Some(job) = job {
            jobs.push(Arc::new(job));
        }
    }
    jobs
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
    if crate::clickhouse::Url::is_clickhouse(&url) {
        return match crate::clickhouse::Url::parse(&url) {
            Ok(u) if u.has_password() => {
                problems.push(
                    &field,
                    format!("{section}.url has a password already: give it in one place"),
                );
                url
            }
            Ok(_) => clickhouse_with_password(&url, password),
            Err(_) => url,
        };
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

/// A ClickHouse url (known to parse, without a password) with `password` added to its user
/// information, percent-encoded; the user is `default` when the url names none.
fn clickhouse_with_password(url: &str, password: &str) -> String {
    let encoded =
        percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC);
    let (scheme, rest) = url.split_once("://").unwrap_or(("clickhouse", url));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://{}:{encoded}{}", &rest[..at], &rest[at..]),
        None => format!("{scheme}://default:{encoded}@{rest}"),
    }
}

/// Replace `${NAME}` in every string value by the environment variable `NAME`.
fn expand_env(value: &mut toml::Value, path: &str, problems: &mut Problems) {
    match value {
        toml::Value::String(s) => match expand(s) {
            Ok(e) => *s = e,
            Err(e) => problems.push(path, e.to_string()),
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

/// Why a value's `${NAME}` cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("unterminated ${{ in value")]
    Unterminated,
    /// The variables named that are not set, in the order of the value.
    #[error("environment variable {} is not set", .0.join(", "))]
    Unset(Vec<String>),
}

/// Expand `${NAME}`; a missing variable is an error naming it.
pub fn expand(s: &str) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut missing = Vec::new();
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(ExpandError::Unterminated);
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
        Err(ExpandError::Unset(missing))
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
mod tests;
