#!/usr/bin/env bash
# Cost of `pgtide verify` on the bench table (1,000,000 orders-like rows), in one run on one
# server, against the cost of reading the table once:
#   baseline: psql -c "copy (select * from orders) to stdout (format binary)" > /dev/null
#   verify of a 1:1 job and of a job with a value map and two JSON fields, right after their load
#   verify of the 1:1 job after 1,000 of its DWH rows were deleted, changed or added, spread over
#   the whole table; then verify --repair of them
# Prints wall time, peak RSS (/usr/bin/time -v) and the ratio to the baseline.  ROWS=... changes
# the size.
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

bench_orders "$ROWS"

bench_config "$work/cfg"
bench_jobs "$work/cfg" "$BATCH"
echo "loading both jobs..."
"$PGTIDE" --config "$work/cfg/pgtide.toml" run-once plain mapped >/dev/null
psql -d dwh -c "vacuum analyze" -c checkpoint >/dev/null
psql -d src -c checkpoint >/dev/null

bench_copy_baseline
bench_measure verify_plain 0 "$work/plain.json" "$PGTIDE" --config "$work/cfg/pgtide.toml" verify plain --json
bench_measure verify_mapped 0 "$work/mapped.json" "$PGTIDE" --config "$work/cfg/pgtide.toml" verify mapped --json

# 400 rows deleted, 400 changed, 200 added in the DWH, spread over every part of the table.
psql -d dwh <<SQL
delete from orders_pgtide where id % 2500 = 1;
update orders_pgtide set amount = amount + 1 where id % 2500 = 2;
insert into orders_pgtide select id + $ROWS, customer_id, status, quantity, amount, payload, created_at, updated_at
from orders_pgtide where id % 5000 = 3;
SQL
bench_measure verify_damaged 1 "$work/damaged.json" "$PGTIDE" --config "$work/cfg/pgtide.toml" verify plain --json
bench_measure verify_repair 0 "$work/repair.json" "$PGTIDE" --config "$work/cfg/pgtide.toml" verify plain --repair --json

python3 - "$ROWS" "$work" <<'PY'
import json, sys
rows, work = int(sys.argv[1]), sys.argv[2]
res = {}
for line in open(f"{work}/results"):
    name, secs, kib = line.split()
    res[name] = (float(secs), int(kib))
def load(n): return json.load(open(f"{work}/{n}.json"))
for n in ("plain", "mapped"):
    r = load(n)
    assert (r["compared"], r["missing"], r["different"], r["extra"]) == (rows, 0, 0, 0), r
d = load("damaged")
want = rows // 2500
assert (d["missing"], d["different"], d["extra"]) == (want, want, 0), d
r = load("repair")
assert (r["repaired"]["missing"], r["repaired"]["different"]) == (want, want), r
assert (r["missing"], r["different"]) == (0, 0), r
base = res["copy"][0]
print(f"\n{rows} rows, source and DWH on one local PostgreSQL")
print(f"{'':46} {'seconds':>8} {'vs one COPY':>12} {'peak RSS':>10}")
labels = {
    "copy": "baseline: copy (select *) to stdout (binary)",
    "verify_plain": "verify, 1:1 job, nothing differs",
    "verify_mapped": "verify, map + 2 json job, nothing differs",
    "verify_damaged": f"verify, 1:1 job, {want}+{want} rows differ",
    "verify_repair": "verify --repair of those, then verify again",
}
for name, label in labels.items():
    secs, kib = res[name]
    rss = "" if name == "copy" else f"{kib / 1024:8.1f} MiB"
    print(f"{label:46} {secs:8.2f} {secs / base:12.2f} {rss:>10}")
PY
