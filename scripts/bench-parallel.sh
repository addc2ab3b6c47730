#!/usr/bin/env bash
# A load of many rows with 1, 2 and 4 workers, next to the physical baseline, in one run:
#   pipe:   psql "copy (...) to stdout (format binary)" | psql "copy ... from stdin (format binary)"
#           into an empty table with a primary key
#   pgtide: run-once of a 1:1 job with the (updated_at, id) watermark into an empty DWH table,
#           with `parallel` = 1, 2 and 4 and the default batch_size
# Prints seconds, rows/s, the ratio to the pipe and peak RSS of each.
#   scripts/bench-parallel.sh            ROWS=... changes the size, PARALLEL="1 2 4" the workers
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_time
ROWS=${ROWS:-1000000}
PARALLEL=${PARALLEL:-"1 2 4"}
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide

start_bench_cluster "-c shared_buffers=512MB -c max_wal_size=8GB -c synchronous_commit=off -c max_connections=100"
trap stop_bench_cluster EXIT
work=$WORK
now() { date +%s.%N; }

bench_orders "$ROWS"
cols="id, customer_id, status, quantity, amount, payload, created_at, updated_at"
bench_config "$work/cfg"
psql -d dwh -c "create table orders_base (id bigint primary key, customer_id integer, status integer, quantity integer, amount numeric(12,2), payload jsonb, created_at timestamptz, updated_at timestamptz)" >/dev/null
psql -d dwh -c checkpoint -d src -c checkpoint >/dev/null
t0=$(now)
psql -d src -c "copy (select $cols from orders) to stdout (format binary)" \
  | psql -d dwh -c "copy orders_base ($cols) from stdin (format binary)" >/dev/null
t1=$(now)
base=$(python3 -c "print($t1 - $t0)")

results=""
for p in $PARALLEL; do
  columns=""
  for c in id customer_id status quantity amount payload created_at updated_at; do
    columns+=$'[[column]]\nname = "'$c$'"\nfrom = "o.'$c$'"\n'
  done
  printf 'interval_secs = 60\nparallel = %s\ntarget = "orders_p%s"\nkey = ["id"]\nwatermark = ["updated_at", "id"]\n[from]\ntable = "public.orders"\nas = "o"\n%s' \
    "$p" "$p" "$columns" > "$work/cfg/jobs/p$p.toml"
  psql -d dwh -c checkpoint >/dev/null
  t0=$(now)
  /usr/bin/time -f "%M" -o "$work/rss" "$PGTIDE" --config "$work/cfg/pgtide.toml" run-once "p$p" >/dev/null
  t1=$(now)
  n=$(psql -d dwh -Atc "select count(*) from orders_p$p")
  [ "$n" = "$ROWS" ] || { echo "orders_p$p holds $n rows, expected $ROWS" >&2; exit 1; }
  results+="$p $(python3 -c "print($t1 - $t0)") $(tail -n 1 "$work/rss")"$'\n'
done
python3 - "$ROWS" "$base" "$results" <<'PY'
import sys
rows, base, results = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
print(f"\n{rows} rows, (updated_at, id) watermark, default batch_size, source and DWH on one local PostgreSQL")
print(f"{'':34} {'seconds':>8} {'rows/s':>10} {'vs pipe':>8} {'peak RSS':>10}")
print(f"{'pipe: copy | copy (binary)':34} {base:8.2f} {rows/base:10.0f} {1.0:8.2f}")
for line in results.strip().splitlines():
    p, secs, rss = line.split()
    secs = float(secs)
    print(f"{'pgtide run-once, parallel = ' + p:34} {secs:8.2f} {rows/secs:10.0f} {base/secs:8.2f} {int(rss)/1024:8.1f} MiB")
PY
