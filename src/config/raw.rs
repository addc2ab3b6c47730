//! Raw serde shapes of `pgtide.toml` and `jobs/*.toml`, exactly as users write them.
//!
//! Every struct denies unknown fields; turning these into validated specs is `config::load`'s job.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstance {
    pub jobs_dir: Option<String>,
    pub state_path: Option<String>,
    #[serde(default)]
    pub sources: BTreeMap<String, toml::Value>,
    pub dwh: Option<toml::Value>,
    pub daemon: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub url: String,
    pub password_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDwh {
    pub url: String,
    pub password_file: Option<String>,
    pub schema: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub max_concurrent_jobs: Option<usize>,
    pub metrics_listen: Option<String>,
}

/// The top level of a job file; sections are kept as values so that every element can be
/// checked on its own and all problems reported at once.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub source: Option<String>,
    pub mode: Option<String>,
    pub cron: Option<String>,
    pub interval_secs: Option<i64>,
    pub batch_size: Option<i64>,
    pub parallel: Option<i64>,
    pub max_rows_per_sec: Option<i64>,
    pub batch_timeout_secs: Option<i64>,
    pub target: Option<String>,
    pub key: Option<Vec<String>>,
    pub watermark: Option<Vec<String>>,
    pub on_delete: Option<String>,
    pub from: Option<toml::Value>,
    #[serde(default)]
    pub join: Vec<toml::Value>,
    #[serde(default)]
    pub column: Vec<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrom {
    pub table: String,
    #[serde(rename = "as")]
    pub alias: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJoin {
    pub table: String,
    #[serde(rename = "as")]
    pub alias: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub on: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawColumn {
    pub name: String,
    pub from: Option<String>,
    #[serde(rename = "type")]
    pub ty: Option<String>,
    pub sql: Option<String>,
    pub deleted: Option<bool>,
    pub map: Option<BTreeMap<String, String>>,
    pub map_default: Option<String>,
    pub json: Option<String>,
    pub on_error: Option<String>,
}
