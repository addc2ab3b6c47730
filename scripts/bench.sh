#!/usr/bin/env bash
# Throughput of `pgtide run-once` against the physical baseline, in one run on one server:
#   baseline: psql "copy (...) to stdout (format binary)" | psql "copy ... from stdin (format binary)"
#             into an empty table with a primary key
#   pgtide:   run-once of a 1:1 job into an empty DWH, and of a job with a value map and two
#             JSON fields (the transforms' cost); then a replay of every row of the 1:1 job
#             into its loaded target (the staged upsert path incremental runs take)
# Prints rows/s for each, the ratios, and pgtide's peak RSS.  ROWS=... changes the size.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_time
ROWS=${ROWS:-1000000}
BATCH=${BATCH:-10000}
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide

start_bench_cluster "-c shared_buffers=512MB -c max_wal_size=8GB -c synchronous_commit=off"
trap stop_bench_cluster EXIT
work=$WORK
now() { date +%s.%N; }

bench_orders "$ROWS"
cols="id, customer_id, status, quantity, amount, payload, created_at, updated_at"
psql -d dwh -c "create table orders_base (id bigint primary key, customer_id integer, status integer, quantity integer, amount numeric(12,2), payload jsonb, created_at timestamptz, updated_at timestamptz)"
psql -d dwh -c checkpoint -d src -c checkpoint >/dev/null

t0=$(now)
psql -d src -c "copy (select $cols from orders) to stdout (format binary)" \
  | psql -d dwh -c "copy orders_base ($cols) from stdin (format binary)"
t1=$(now)
base=$(python3 -c "print($t1 - $t0)")

bench_config "$work/cfg"
bench_jobs "$work/cfg" "$BATCH"

run_job() { # job -> prints "seconds peak_kib"
  local t0 t1 rss
  t0=$(now)
  /usr/bin/time -f "%M" -o "$work/rss" "$PGTIDE" --config "$work/cfg/pgtide.toml" run-once "$1" >/dev/null
  t1=$(now)
  rss=$(tail -n 1 "$work/rss")
  echo "$(python3 -c "print($t1 - $t0)") $rss"
}
psql -d dwh -c checkpoint >/dev/null
read -r plain plain_rss < <(run_job plain)
psql -d dwh -c checkpoint >/dev/null
read -r mapped mapped_rss < <(run_job mapped)
# The staged path (what incremental runs use): replay every row into the loaded target.
psql -d dwh -c checkpoint >/dev/null
t0=$(now)
/usr/bin/time -f "%M" -o "$work/rss" "$PGTIDE" --config "$work/cfg/pgtide.toml" replay plain >/dev/null
t1=$(now)
replay=$(python3 -c "print($t1 - $t0)"); replay_rss=$(tail -n 1 "$work/rss")

n=$(psql -d dwh -Atc "select (select count(*) from orders_pgtide) || ' ' || (select count(*) from orders_mapped)")
[ "$n" = "$ROWS $ROWS" ] || { echo "row counts differ: $n, expected $ROWS each" >&2; exit 1; }
python3 - "$ROWS" "$base" "$plain" "$plain_rss" "$mapped" "$mapped_rss" "$replay" "$replay_rss" "$BATCH" <<'PY'
import sys
rows, base, plain, prss, mapped, mrss, replay, rrss, batch = int(sys.argv[1]), *map(float, sys.argv[2:9]), sys.argv[9]
print(f"\n{rows} rows, batch_size {batch}, source and DWH on one local PostgreSQL")
print(f"{'':34} {'seconds':>8} {'rows/s':>10} {'vs baseline':>12} {'peak RSS':>10}")
print(f"{'baseline copy | copy (binary)':34} {base:8.2f} {rows/base:10.0f} {1.0:12.2f} {'':>10}")
print(f"{'pgtide run-once, 1:1 job':34} {plain:8.2f} {rows/plain:10.0f} {base/plain:12.2f} {prss/1024:8.1f} MiB")
print(f"{'pgtide run-once, map + 2 json':34} {mapped:8.2f} {rows/mapped:10.0f} {base/mapped:12.2f} {mrss/1024:8.1f} MiB")
print(f"{'pgtide replay, staged upsert':34} {replay:8.2f} {rows/replay:10.0f} {base/replay:12.2f} {rrss/1024:8.1f} MiB")
print(f"transforms cost: map + 2 json job runs at {plain/mapped:.2f} of the 1:1 job's speed")
PY
