#!/usr/bin/env bash
# Show pgtide doing its job: a throwaway PostgreSQL, a sample shop, the example jobs, the DWH.
# Installs PostgreSQL when missing, builds pgtide, runs `pgtide demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
cargo build --release --quiet
exec ./target/release/pgtide demo
