//! `verify` against a ClickHouse DWH.

use super::*;

pub(super) async fn verify(
    _ctx: &Context,
    _job: &Arc<JobSpec>,
    _opts: Options,
    _ch: crate::sink::clickhouse::ClickHouse,
) -> Result<Report, VerifyError> {
    Err(VerifyError::Unsupported(
        "verify is not available for a ClickHouse DWH",
    ))
}
