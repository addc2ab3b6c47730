#!/usr/bin/env bash
# Run every test (unit and against real PostgreSQL). Installs PostgreSQL and systemd-analyze
# when missing; the tests start their own throwaway cluster and never touch a server of yours.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_systemd_analyze
ensure_openssl
stop_stale_test_clusters
cargo test --all-targets "$@"
