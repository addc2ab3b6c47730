#!/usr/bin/env bash
# The daily path, side by side in one run on one server: a 1,000,000-row orders target loaded
# by pgtide, then per round 100,000 new and 10,000 updated source rows (the updates'
# timestamps among the inserts'), applied by
#   pgtide:  run-once of a job with the (updated_at, id) watermark, default settings
#   script:  psql "copy (... where (updated_at, id) > last) to stdout (format binary)" into a
#            temporary staging table and one insert ... on conflict (id) do update, one
#            transaction (the watermark kept in the DWH, moved in it)
#   merge:   the same with merge instead of insert ... on conflict
# each into its own copy of the target, in rotating order, each after a checkpoint. Prints
# seconds and peak RSS per round; every target must hold exactly the source's rows after.
#   ROUNDS=3 ROWS=1000000 NEW=100000 UPDATED=10000 scripts/bench-daily.sh
# scripts/bench.sh runs the same rounds after its loads.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_time
ROWS=${ROWS:-1000000}
ROUNDS=${ROUNDS:-3}
cargo build --release --quiet
PGTIDE=${PGTIDE:-$PWD/target/release/pgtide}

start_bench_cluster "-c shared_buffers=512MB -c max_wal_size=8GB -c synchronous_commit=off"
trap stop_bench_cluster EXIT

bench_orders "$ROWS"
bench_config "$WORK/cfg"
daily_job daily "$WORK/cfg"
"$PGTIDE" --config "$WORK/cfg/pgtide.toml" run-once daily >/dev/null 2>>"$WORK/pgtide.log"
daily_setup daily
for r in $(seq 1 "$ROUNDS"); do
  daily_changes "$r"
  daily_round "$PGTIDE" "$r" daily
done
daily_check daily
daily_report
