#!/usr/bin/env bash
# Cost of `pgtide verify` with a ClickHouse DWH on the bench table (1,000,000 orders-like rows),
# against the cost of reading the table once:
#   baseline: psql -c "copy (select * from orders) to stdout (format binary)" > /dev/null
#   verify of a 1:1 job right after its load
#   verify after 1,000 of its ClickHouse rows were changed (400), marked deleted (400) or added
#   (200, not counted: a poll job cannot see deletes), spread over the whole table; then
#   verify --repair of them
# Source on a throwaway PostgreSQL, DWH on a throwaway ClickHouse (Debian's clickhouse-server),
# both on this machine. Prints wall time, peak RSS (/usr/bin/time -v) and the ratio to the
# baseline. ROWS=... changes the size.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_time
ROWS=${ROWS:-1000000}
BATCH=${BATCH:-10000}
CH_SERVER=${PGTIDE_CLICKHOUSE_SERVER:-/usr/sbin/clickhouse-server}
[ -x "$CH_SERVER" ] || { echo "$CH_SERVER not found: install Debian's clickhouse-server" >&2; exit 1; }
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide

start_bench_cluster "-c shared_buffers=512MB -c max_wal_size=8GB -c synchronous_commit=off"
work=$WORK
port=$PORT
ch_pid=
stop_all() {
  if [ -n "$ch_pid" ]; then kill "$ch_pid" 2>/dev/null || true; wait "$ch_pid" 2>/dev/null || true; fi
  stop_bench_cluster
}
trap stop_all EXIT
now() { date +%s.%N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The ClickHouse server, its data in the bench directory.
ch=$work/clickhouse
mkdir -p "$ch/data" "$ch/tmp" "$ch/user_files" "$ch/format_schemas"
ch_http=$(free_port)
ch_tcp=$(free_port)
cat >"$ch/config.xml" <<XML
<yandex>
    <logger><level>warning</level><log>$ch/log.txt</log><errorlog>$ch/err.txt</errorlog></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$ch_http</http_port>
    <tcp_port>$ch_tcp</tcp_port>
    <path>$ch/data/</path>
    <tmp_path>$ch/tmp/</tmp_path>
    <user_files_path>$ch/user_files/</user_files_path>
    <format_schema_path>$ch/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>536870912</mark_cache_size>
</yandex>
XML
cat >"$ch/users.xml" <<XML
<yandex>
    <profiles><default></default></profiles>
    <quotas><default></default></quotas>
    <users><default><password></password><networks><ip>::/0</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
</yandex>
XML
(cd "$ch" && exec "$CH_SERVER" --config-file="$ch/config.xml" >"$ch/stdout.txt" 2>&1) &
ch_pid=$!
chq() { curl -sS --fail-with-body "http://127.0.0.1:$ch_http/" --data-binary "$1"; }
for _ in $(seq 1 300); do
  curl -s "http://127.0.0.1:$ch_http/ping" 2>/dev/null | grep -q Ok && break
  sleep 0.1
done
chq "create database bench"

bench_orders "$ROWS"

mkdir -p "$work/cfg/jobs"
cat >"$work/cfg/pgtide.toml" <<TOML
[sources.src]
url = "postgres://postgres@127.0.0.1:$port/src"
[dwh]
url = "clickhouse://127.0.0.1:$ch_http/bench"
TOML
columns=""
for c in id customer_id status quantity amount payload created_at updated_at; do
  columns+=$'[[column]]\nname = "'$c$'"\nfrom = "o.'$c$'"\n'
done
printf 'interval_secs = 60\nbatch_size = %s\ntarget = "orders_pgtide"\nkey = ["id"]\n[from]\ntable = "public.orders"\nas = "o"\n%s' "$BATCH" "$columns" > "$work/cfg/jobs/plain.toml"
echo "loading the job..."
"$PGTIDE" --config "$work/cfg/pgtide.toml" run-once plain >/dev/null
chq "optimize table bench.orders_pgtide final"
psql -d src -c checkpoint >/dev/null

# measure NAME EXPECTED_EXIT STDOUT_FILE COMMAND... : appends "NAME seconds peak_kib" to results
measure() {
  local name=$1 want=$2 out=$3 t0 t1 code
  shift 3
  t0=$(now)
  set +e
  /usr/bin/time -v -o "$work/time" "$@" >"$out" 2>"$work/stderr"
  code=$?
  set -e
  t1=$(now)
  if [ "$code" != "$want" ]; then
    echo "$name exited $code, expected $want" >&2
    cat "$work/stderr" >&2
    exit 1
  fi
  echo "$name $(python3 -c "print($t1 - $t0)") $(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time")" >>"$work/results"
}
: >"$work/results"

# The baseline twice, so both see a warm cache; the second one counts.
"$BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d src -c "copy (select * from orders) to stdout (format binary)" >/dev/null
measure copy 0 /dev/null "$BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d src \
  -c "copy (select * from orders) to stdout (format binary)"
measure verify_plain 0 "$work/plain.json" "$PGTIDE" --config "$work/cfg/pgtide.toml" verify plain --json

# 400 rows changed, 400 marked deleted, 200 added, spread over every part of the table, each
# written as a newer version of its key.
cols="id, customer_id, status, quantity, amount, payload, created_at, updated_at"
chq "insert into bench.orders_pgtide ($cols, _pgtide_version, _pgtide_deleted)
     select id, customer_id, status, quantity, amount + 1, payload, created_at, updated_at, _pgtide_version + 1, 0
     from bench.orders_pgtide final where id % 2500 = 2"
chq "insert into bench.orders_pgtide ($cols, _pgtide_version, _pgtide_deleted)
     select $cols, _pgtide_version + 1, 1 from bench.orders_pgtide final where id % 2500 = 1"
chq "insert into bench.orders_pgtide ($cols, _pgtide_version, _pgtide_deleted)
     select id + $ROWS, customer_id, status, quantity, amount, payload, created_at, updated_at, _pgtide_version + 1, 0
     from bench.orders_pgtide final where id % 5000 = 3"
measure verify_damaged 1 "$work/damaged.json" "$PGTIDE" --config "$work/cfg/pgtide.toml" verify plain --json
measure verify_repair 0 "$work/repair.json" "$PGTIDE" --config "$work/cfg/pgtide.toml" verify plain --repair --json

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
