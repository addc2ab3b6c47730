#!/usr/bin/env bash
# Run every test (unit and against real PostgreSQL and ClickHouse). Installs PostgreSQL,
# ClickHouse and systemd-analyze when missing; the tests start their own throwaway servers and
# never touch a server of yours.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_clickhouse
ensure_systemd_analyze
ensure_openssl
stop_stale_test_clusters
stop_stale_test_clickhouse
cargo test --all-targets "$@"
