//! What `pgtide verify` can fail with, and the mapping of either server's errors onto it.

use crate::job::JobError;
use crate::sink::SinkError;

/// Why `verify` failed (rows that differ are a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("target {0} does not exist in the dwh (has the job run yet?)")]
    NoTarget(String),
    #[error("--repair reads the view's rows by key, which needs a key column taken as it is from the main table (from = \"alias.column\" of [from]); reload with `pgtide replay` instead")]
    NoRepairKey,
    /// A line of one side's `TabSeparated` rows (ClickHouse DWH) without the fields asked for.
    #[error("a row from {side} has {fields} fields, {expected} were asked for")]
    Malformed {
        side: &'static str,
        fields: usize,
        expected: usize,
    },
    #[error("temporary file of differing keys: {0}")]
    Spill(#[source] std::io::Error),
}

impl From<SinkError> for VerifyError {
    fn from(e: SinkError) -> Self {
        VerifyError::Job(JobError::Sink(e))
    }
}

pub(super) fn src(e: tokio_postgres::Error) -> VerifyError {
    VerifyError::Job(JobError::Source(e))
}

pub(super) fn dwh_err(e: tokio_postgres::Error) -> VerifyError {
    VerifyError::Job(JobError::Sink(SinkError::Db(e)))
}
