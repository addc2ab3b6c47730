#!/usr/bin/env bash
# Cost of `pgtide verify` with a ClickHouse DWH on the bench table (1,000,000 orders-like rows),
# against the cost of reading the table once:
#   baseline: psql -c "copy (select * from orders) to stdout (format binary)" > /dev/null
#   verify of a 1:1 job right after its load
#   verify after 1,000 of its ClickHouse rows were changed (400), marked deleted (400) or added
#   (200, not counted: a poll job cannot see deletes), spread over the whole table; then
#   verify --repair of them
# Source on a throwaway PostgreSQL, DWH on a throwaway ClickHouse (Debian's clickhouse-server,
# started for the run on free loopback ports and removed at exit), both on this machine. Prints
# wall time, peak RSS (/usr/bin/time -v) and the ratio to the baseline. ROWS=... changes the
# size.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_clickhouse
ensure_time
ROWS=${ROWS:-1000000}
BATCH=${BATCH:-10000}
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide

start_bench_cluster "-c shared_buffers=512MB -c max_wal_size=8GB -c synchronous_commit=off"
trap 'stop_bench_clickhouse; stop_bench_cluster' EXIT
start_bench_clickhouse
work=$WORK
port=$PORT
ch --query "create database bench"

bench_orders "$ROWS"

mkdir -p "$work/cfg/jobs"
cat >"$work/cfg/pgtide.toml" <<TOML
[sources.src]
url = "postgres://postgres@127.0.0.1:$port/src"
[dwh]
url = "clickhouse://127.0.0.1:$CH_HTTP/bench"
TOML
bench_plain_job "$work/cfg" "$BATCH"
echo "loading the job..."
"$PGTIDE" --config "$work/cfg/pgtide.toml" run-once plain >/dev/null
ch --query "optimize table bench.orders_pgtide final"
psql -d src -c checkpoint >/dev/null

bench_copy_baseline
bench_measure verify_plain 0 "$work/plain.json" "$PGTIDE" --config "$work/cfg/pgtide.toml" verify plain --json

# 400 rows changed, 400 marked deleted, 200 added, spread over every part of the table, each
# written as a newer version of its key.
cols="id, customer_id, status, quantity, amount, payload, created_at, updated_at"
ch --query "insert into bench.orders_pgtide ($cols, _pgtide_version, _pgtide_deleted)
     select id, customer_id, status, quantity, amount + 1, payload, created_at, updated_at, _pgtide_version + 1, 0
     from bench.orders_pgtide final where id % 2500 = 2"
ch --query "insert into bench.orders_pgtide ($cols, _pgtide_version, _pgtide_deleted)
     select $cols, _pgtide_version + 1, 1 from bench.orders_pgtide final where id % 2500 = 1"
ch --query "insert into bench.orders_pgtide ($cols, _pgtide_version, _pgtide_deleted)
     select id + $ROWS, customer_id, status, quantity, amount, payload, created_at, updated_at, _pgtide_version + 1, 0
     from bench.orders_pgtide final where id % 5000 = 3"
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
r = load("plain")
assert (r["compared"], r["missing"], r["different"], r["extra"]) == (rows, 0, 0, 0), r
d = load("damaged")
want = rows // 2500
assert (d["missing"], d["different"], d["extra"]) == (want, want, 0), d
r = load("repair")
assert (r["repaired"]["missing"], r["repaired"]["different"]) == (want, want), r
assert (r["missing"], r["different"]) == (0, 0), r
base = res["copy"][0]
print(f"\n{rows} rows, source on a local PostgreSQL, DWH on a local ClickHouse")
print(f"{'':46} {'seconds':>8} {'vs one COPY':>12} {'peak RSS':>10}")
labels = {
    "copy": "baseline: copy (select *) to stdout (binary)",
    "verify_plain": "verify, 1:1 job, nothing differs",
    "verify_damaged": f"verify, 1:1 job, {want}+{want} rows differ",
    "verify_repair": "verify --repair of those, then verify again",
}
for name, label in labels.items():
    secs, kib = res[name]
    rss = "" if name == "copy" else f"{kib / 1024:8.1f} MiB"
    print(f"{label:46} {secs:8.2f} {secs / base:12.2f} {rss:>10}")
PY
