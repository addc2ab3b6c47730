#!/usr/bin/env bash
# A load of many rows with 1, 2 and 4 workers, next to the physical baseline, in rounds that
# alternate them (so a ratio holds on a noisy machine):
#   pipe:   psql "copy (...) to stdout (format binary)" | psql "copy ... from stdin (format binary)"
#           into an empty table with a primary key
#   pgtide: run-once of a 1:1 job with the (updated_at, id) watermark into an empty DWH table,
#           with `parallel` = 1, 2 and 4 and the default batch_size
# Prints each round's seconds and ratios to the pipe of the same round, then the median ratio
# and peak RSS of each.
#   scripts/bench-parallel.sh   ROWS=... changes the size, PARALLEL="1 2 4" the workers,
#                               ROUNDS=3 the rounds
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_time
ROWS=${ROWS:-1000000}
PARALLEL=${PARALLEL:-"1 2 4"}
ROUNDS=${ROUNDS:-3}
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide

start_bench_cluster "-c shared_buffers=512MB -c max_wal_size=8GB -c synchronous_commit=off -c max_connections=100"
trap stop_bench_cluster EXIT
work=$WORK
now() { date +%s.%N; }

bench_orders "$ROWS"
cols="id, customer_id, status, quantity, amount, payload, created_at, updated_at"
bench_config "$work/cfg"
results=""
for round in $(seq "$ROUNDS"); do
  psql -d dwh -c "drop table if exists orders_base" \
    -c "create table orders_base (id bigint primary key, customer_id integer, status integer, quantity integer, amount numeric(12,2), payload jsonb, created_at timestamptz, updated_at timestamptz)" >/dev/null
  psql -d dwh -c checkpoint -d src -c checkpoint >/dev/null
  t0=$(now)
  psql -d src -c "copy (select $cols from orders) to stdout (format binary)" \
    | psql -d dwh -c "copy orders_base ($cols) from stdin (format binary)" >/dev/null
  t1=$(now)
  results+="$round pipe $(python3 -c "print($t1 - $t0)") 0"$'\n'
  for p in $PARALLEL; do
    job="p${p}r$round"
    columns=""
    for c in id customer_id status quantity amount payload created_at updated_at; do
      columns+=$'[[column]]\nname = "'$c$'"\nfrom = "o.'$c$'"\n'
    done
    printf 'interval_secs = 60\nparallel = %s\ntarget = "orders_%s"\nkey = ["id"]\nwatermark = ["updated_at", "id"]\n[from]\ntable = "public.orders"\nas = "o"\n%s' \
      "$p" "$job" "$columns" > "$work/cfg/jobs/$job.toml"
    psql -d dwh -c checkpoint >/dev/null
    t0=$(now)
    /usr/bin/time -f "%M" -o "$work/rss" "$PGTIDE" --config "$work/cfg/pgtide.toml" run-once "$job" >/dev/null
    t1=$(now)
    n=$(psql -d dwh -Atc "select count(*) from orders_$job")
    [ "$n" = "$ROWS" ] || { echo "orders_$job holds $n rows, expected $ROWS" >&2; exit 1; }
    rm "$work/cfg/jobs/$job.toml"
    psql -d dwh -c "drop table orders_$job" >/dev/null
    results+="$round $p $(python3 -c "print($t1 - $t0)") $(tail -n 1 "$work/rss")"$'\n'
  done
done
python3 - "$ROWS" "$results" <<'PY'
import statistics, sys
rows, results = int(sys.argv[1]), sys.argv[2]
runs = {}
for line in results.strip().splitlines():
    r, what, secs, rss = line.split()
    runs.setdefault(int(r), {})[what] = (float(secs), int(rss))
whats = [w for w in runs[1] if w != "pipe"]
print(f"\n{rows} rows, (updated_at, id) watermark, default batch_size, source and DWH on one local PostgreSQL")
print(f"{'round':>5} {'pipe s':>8} " + " ".join(f"{'parallel ' + w:>20}" for w in whats))
for r, m in sorted(runs.items()):
    base = m["pipe"][0]
    cells = " ".join(f"{m[w][0]:8.2f} s = {base / m[w][0]:4.2f}x" for w in whats)
    print(f"{r:>5} {base:8.2f} {cells}")
print(f"\n{'':34} {'median vs pipe':>15} {'rows/s (median)':>16} {'peak RSS':>10}")
print(f"{'pipe: copy | copy (binary)':34} {1.0:15.2f} {rows / statistics.median(m['pipe'][0] for m in runs.values()):16.0f}")
for w in whats:
    ratio = statistics.median(m["pipe"][0] / m[w][0] for m in runs.values())
    secs = statistics.median(m[w][0] for m in runs.values())
    rss = max(m[w][1] for m in runs.values())
    print(f"{'pgtide run-once, parallel = ' + w:34} {ratio:15.2f} {rows / secs:16.0f} {rss / 1024:8.1f} MiB")
PY
