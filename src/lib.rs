//! pgtide keeps analytical views in a PostgreSQL warehouse (DWH) fresh from PostgreSQL OLTP
//! sources, without Kafka.
//!
//! - `config`: `pgtide.toml` and `jobs/*.toml`, parsed raw then validated, every problem listed.
//! - `view`: a job resolved against the source catalog, and the SQL that reads it.
//! - `source`: snapshot-consistent keyset reads of the source, streamed out as binary COPY;
//!   notify jobs' triggers, event tables and listeners; the indexes those reads need.
//! - `sink`: the DWH target table, staging COPY, set-based upsert, job locks, control table.
//! - `position`: watermarks and the recheck windows that keep them exact.
//! - `state`: the local SQLite store of positions and runs.
//! - `progress`: a load's rows done, estimate, rate and time left; shown as a bar on a
//!   terminal or as log lines.
//! - `job`: one run of a job, batch by batch; a notify job followed between drains.
//! - `scheduler`: `pgtide run`: poll jobs' cron and interval ticks (one run of a job at a
//!   time), notify jobs followed, one retry-with-backoff for both.
//! - `shutdown`: the one shutdown signal passed down to every task; SIGINT and SIGTERM.
//! - `pg`: the one connection layer (libpq connection strings, TLS, the password file, several
//!   hosts), quoting, secret-free messages, error classification.
//! - `clickhouse`: ClickHouse as a DWH over its HTTP interface: URLs, a keep-alive client
//!   with streamed inserts and results, its errors and their retry policy.
//! - `cluster`: a throwaway local PostgreSQL (for `demo` and the tests).
//! - `demo`: the `pgtide demo` command.
//! - `import`: InsightForge view documents turned into job files.
//! - `metrics`: per-job figures in Prometheus text (`/metrics`, `--metrics-file`).
//! - `verify`: `pgtide verify`: the target compared with the view by key, and repaired.
//! - `cli`: the command line; `telemetry`: logging.

pub mod cli;
pub mod clickhouse;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod import;
pub mod job;
pub mod metrics;
pub mod pg;
pub mod position;
pub mod progress;
pub mod scheduler;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod verify;
pub mod view;
