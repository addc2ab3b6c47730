#!/usr/bin/env bash
# Throughput of `pgtide run-once` against the physical baseline, in one run on one server:
#   baseline: psql "copy (...) to stdout (format binary)" | psql "copy ... from stdin (format binary)"
#             into an empty table with a primary key
#   pgtide:   run-once of a 1:1 job into an empty DWH, and of a job with a value map and two
#             JSON fields (the transforms' cost); then a replay of every row of the 1:1 job
#             into its loaded target (the staged upsert path)
# Prints rows/s for each, the ratios, and pgtide's peak RSS.  ROWS=... changes the size.
# Then, for the (updated_at, id) watermark and default settings: run-once into an empty DWH
# with parallel 1, 2 and 4 (rows/s, ratio to the baseline, peak RSS), and the daily path of
# scripts/bench-daily.sh on the parallel 1 target: DAILY_ROUNDS (3) rounds of 100,000 new and
# 10,000 updated rows, run-once next to the hand-written script (insert ... on conflict, and
# merge), each with its time and peak RSS.
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

# The (updated_at, id) watermark, default batch_size, into an empty DWH, 1, 2 and 4 workers.
for p in 1 2 4; do
  daily_job "orders_p$p" "$work/cfg" "parallel = $p"
done
declare -A par par_rss
for p in 1 2 4; do
  psql -d dwh -c checkpoint >/dev/null
  read -r "par[$p]" "par_rss[$p]" < <(run_job "orders_p$p")
  n=$(psql -d dwh -Atc "select count(*) from orders_p$p")
  [ "$n" = "$ROWS" ] || { echo "orders_p$p has $n rows, expected $ROWS" >&2; exit 1; }
done
# The daily path on the parallel 1 target: its job is the default one.
daily_setup orders_p1
for r in $(seq 1 "${DAILY_ROUNDS:-3}"); do
  daily_changes "$r"
  daily_round "$PGTIDE" "$r" orders_p1
done
daily_check orders_p1
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
python3 - "$ROWS" "$base" "${par[1]}" "${par_rss[1]}" "${par[2]}" "${par_rss[2]}" "${par[4]}" "${par_rss[4]}" <<'PY'
import sys
rows, base = int(sys.argv[1]), float(sys.argv[2])
print(f"\n{rows} rows, (updated_at, id) watermark, default batch_size, into an empty DWH")
print(f"{'':34} {'seconds':>8} {'rows/s':>10} {'vs baseline':>12} {'peak RSS':>10}")
print(f"{'baseline copy | copy (binary)':34} {base:8.2f} {rows/base:10.0f} {1.0:12.2f} {'':>10}")
for i, p in enumerate((1, 2, 4)):
    t, rss = float(sys.argv[3 + 2 * i]), int(sys.argv[4 + 2 * i])
    print(f"{'pgtide run-once, parallel ' + str(p):34} {t:8.2f} {rows/t:10.0f} {base/t:12.2f} {rss/1024:8.1f} MiB")
PY
daily_report
