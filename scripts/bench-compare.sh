#!/usr/bin/env bash
# Catch-up speed of two pgtide builds, side by side on one server, in alternating runs:
#   scripts/bench-compare.sh OTHER_PGTIDE [ROUNDS]
# Each round loads every row of a 1,000,000-row orders table (ROWS=... changes it) into an
# empty DWH table with `run-once` of a 1:1 job, once with this checkout's release build and
# once with OTHER_PGTIDE (e.g. a build of an earlier commit), in alternating order. Prints
# each run, the medians, and this build's speed as a ratio of the other's.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
OTHER=${1:?usage: scripts/bench-compare.sh OTHER_PGTIDE [ROUNDS]}
ROUNDS=${2:-3}
ROWS=${ROWS:-1000000}
BATCH=${BATCH:-10000}
cargo build --release --quiet
THIS=$PWD/target/release/pgtide

start_bench_cluster "-c shared_buffers=512MB -c max_wal_size=8GB -c synchronous_commit=off"
trap stop_bench_cluster EXIT
work=$WORK
now() { date +%s.%N; }

bench_orders "$ROWS"
bench_config "$work/cfg"

job() { # name
  cat > "$work/cfg/jobs/$1.toml" <<TOML
interval_secs = 60
batch_size = $BATCH
target = "$1"
key = ["id"]
watermark = ["updated_at", "id"]
[from]
table = "public.orders"
as = "o"
[[column]]
name = "id"
from = "o.id"
[[column]]
name = "customer_id"
from = "o.customer_id"
[[column]]
name = "status"
from = "o.status"
[[column]]
name = "amount"
from = "o.amount"
[[column]]
name = "payload"
from = "o.payload"
[[column]]
name = "updated_at"
from = "o.updated_at"
TOML
}
timed() { # binary job -> seconds
  local t0 t1
  psql -d dwh -c checkpoint >/dev/null
  t0=$(now)
  "$1" --config "$work/cfg/pgtide.toml" run-once "$2" >/dev/null 2>>"$work/pgtide.log"
  t1=$(now)
  n=$(psql -d dwh -Atc "select count(*) from \"$2\"")
  [ "$n" = "$ROWS" ] || { echo "$2 loaded $n rows, expected $ROWS" >&2; exit 1; }
  psql -d dwh -c "drop table \"$2\""
  python3 -c "print($t1 - $t0)"
}
this=(); other=()
for r in $(seq 1 "$ROUNDS"); do
  job "this_$r"; job "other_$r"
  if [ $((r % 2)) -eq 1 ]; then
    o=$(timed "$OTHER" "other_$r"); t=$(timed "$THIS" "this_$r")
  else
    t=$(timed "$THIS" "this_$r"); o=$(timed "$OTHER" "other_$r")
  fi
  echo "round $r: this build ${t}s, other build ${o}s"
  this+=("$t"); other+=("$o")
done
python3 - "$ROWS" "${this[*]}" "${other[*]}" <<'PY'
import statistics, sys
rows = int(sys.argv[1])
this = [float(x) for x in sys.argv[2].split()]
other = [float(x) for x in sys.argv[3].split()]
t, o = statistics.median(this), statistics.median(other)
print(f"\n{rows} rows, (updated_at, id) watermark, median of {len(this)} runs each")
print(f"this build:  {t:6.2f} s  {rows / t:9.0f} rows/s")
print(f"other build: {o:6.2f} s  {rows / o:9.0f} rows/s")
print(f"this build's speed / other build's: {o / t:.3f}  (per-round: " +
      ", ".join(f"{b / a:.3f}" for a, b in zip(this, other)) + ")")
PY
