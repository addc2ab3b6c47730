#!/usr/bin/env bash
# Throughput of `pgtide run-once` into a ClickHouse DWH against the physical baseline, in one run
# on one PostgreSQL source and one ClickHouse server:
#   pipe:   psql "copy (select <the columns pgtide sends>) to stdout" | clickhouse-client --query
#           "insert ... format TabSeparated" (the native protocol over TCP), and the same copy
#           streamed by curl (a chunked POST) into the HTTP interface pgtide uses, each into an
#           empty ReplacingMergeTree table of the shape pgtide creates
#   batched pipe: the curl pipe cut into inserts of batch_size rows (`split --filter`, a curl per
#           insert): what ClickHouse itself costs per insert (a part each, merged later)
#   pgtide: run-once of a 1:1 job into an empty ClickHouse database, once per batch size in
#           BATCHES, each right after the batched pipe of that size
# Prints seconds and rows/s for each, pgtide's speed as a ratio of each pipe's, and pgtide's peak
# RSS; checks that every table holds the source's rows (`final`) with the same values.
#
# How to run, from anywhere (installs PostgreSQL and ClickHouse through apt-get when missing):
#   scripts/bench-clickhouse.sh
#   ROWS=200000 BATCHES="10000 50000 200000" scripts/bench-clickhouse.sh
# ClickHouse is Debian's clickhouse-server (18.16), started for the run on free loopback ports
# with its config, data and logs in the bench's work dir, and stopped and removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_clickhouse
ensure_time
ROWS=${ROWS:-1000000}
BATCHES=${BATCHES:-10000 50000}
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide

start_bench_cluster "-c shared_buffers=512MB -c max_wal_size=8GB -c synchronous_commit=off"
trap 'stop_bench_clickhouse; stop_bench_cluster' EXIT
start_bench_clickhouse
work=$WORK
now() { date +%s.%N; }

bench_orders "$ROWS"

# What pgtide's copy sends for the 1:1 job to a ClickHouse before 20.1 (DateTime, whole
# seconds), with a version as long as pgtide's (microseconds) and the deleted flag.
ts() { echo "to_char(($1) at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS')"; }
copy="copy (select (o.id), (o.customer_id), (o.status), (o.quantity), (o.amount), (o.payload)::text, $(ts o.created_at), $(ts o.updated_at), 1700000000000000, 0 from orders o) to stdout"
ch_columns="id, customer_id, status, quantity, amount, payload, created_at, updated_at, _pgtide_version, _pgtide_deleted"
# The table pgtide creates for the 1:1 job (checked against it at the end).
create_target() {
  ch --query "create table $1 (id Int64, customer_id Int32, status Int32, quantity Int32, amount Decimal(12, 2), payload String, created_at DateTime('UTC'), updated_at DateTime('UTC'), _pgtide_loaded_at DateTime default now(), _pgtide_version UInt64, _pgtide_deleted UInt8 default 0) engine = ReplacingMergeTree(_pgtide_version) order by (id)"
}
insert_url() { # table -> the HTTP url inserting TabSeparated rows into it
  echo "http://127.0.0.1:$CH_HTTP/?query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' \
    "insert into $1 ($ch_columns) format TabSeparated")"
}
curl_insert="curl -sS --fail-with-body -H Expect: -X POST -T -"

# Let ClickHouse's background merges of the last load finish before the next one starts.
settle() {
  local i
  sleep 1
  for i in $(seq 1 600); do
    [ "$(ch --query "select count() from system.merges")" = 0 ] && return 0
    sleep 0.5
  done
  echo "ClickHouse still merging after 5 minutes" >&2
  exit 1
}
checkpoint() { psql -d src -c checkpoint >/dev/null; settle; }
seconds() { python3 -c "print($2 - $1)"; }

ch --query "create database pipe"
create_target pipe.orders_client
create_target pipe.orders_http
checkpoint
t0=$(now)
psql -d src -c "$copy" | ch --query "insert into pipe.orders_client ($ch_columns) format TabSeparated"
client=$(seconds "$t0" "$(now)")

checkpoint
url=$(insert_url pipe.orders_http)
t0=$(now)
psql -d src -c "$copy" | $curl_insert "$url"
http=$(seconds "$t0" "$(now)")

batched() { # batch_size -> prints seconds; loads pipe.orders_http_<batch_size>
  local url t0
  create_target "pipe.orders_http_$1"
  url=$(insert_url "pipe.orders_http_$1")
  checkpoint
  t0=$(now)
  psql -d src -c "$copy" | split -l "$1" --filter "$curl_insert '$url'"
  seconds "$t0" "$(now)"
}

run_job() { # batch_size -> prints "seconds peak_kib"; loads database pgtide_<batch_size>
  local cfg=$work/cfg-$1 t0
  ch --query "create database pgtide_$1"
  mkdir -p "$cfg/jobs"
  cat > "$cfg/pgtide.toml" <<TOML
[sources.src]
url = "postgres://postgres@127.0.0.1:$PORT/src"
[dwh]
url = "clickhouse://127.0.0.1:$CH_HTTP/pgtide_$1"
TOML
  bench_jobs "$cfg" "$1"
  rm "$cfg/jobs/mapped.toml"
  checkpoint
  t0=$(now)
  /usr/bin/time -f "%M" -o "$work/rss" "$PGTIDE" --config "$cfg/pgtide.toml" run-once plain >/dev/null
  echo "$(seconds "$t0" "$(now)") $(tail -n 1 "$work/rss")"
}

results=()
for b in $BATCHES; do
  split_secs=$(batched "$b")
  out=$(run_job "$b")
  read -r secs rss <<<"$out"
  results+=("$b" "$split_secs" "$secs" "$rss")
done

# Every table holds the source's rows, with the same values, in the same shape.
describe() { ch --query "describe table $1" | cut -f 1,2; }
values() { ch --query "select count(), sum(cityHash64(id, customer_id, status, quantity, toString(amount), payload, created_at, updated_at)) from $1 final"; }
n=$(psql -d src -Atc "select count(*) from orders")
want=$(values pipe.orders_client)
[ "${want%%$'\t'*}" = "$n" ] || { echo "pipe.orders_client holds ${want%%$'\t'*} rows, the source $n" >&2; exit 1; }
for t in pipe.orders_http $(for b in $BATCHES; do echo "pipe.orders_http_$b pgtide_$b.orders_pgtide"; done); do
  got=$(values "$t")
  [ "$got" = "$want" ] || { echo "$t: count and hash $got, pipe.orders_client $want" >&2; exit 1; }
done
for b in $BATCHES; do
  diff <(describe pipe.orders_client) <(describe "pgtide_$b.orders_pgtide") >&2 \
    || { echo "pgtide_$b.orders_pgtide is not the shape of the pipe's table" >&2; exit 1; }
done

python3 - "$ROWS" "$client" "$http" "$(ch --query "select version()")" "${results[@]}" <<'PY'
import sys
rows, client, http, version = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
runs = sys.argv[5:]
print(f"\n{rows} rows, PostgreSQL source, ClickHouse {version} DWH, one machine; ratios are speed / the pipe's")
print(f"{'':38} {'seconds':>8} {'rows/s':>9} {'vs client':>9} {'vs http':>8} {'vs batched':>10} {'peak RSS':>10}")
def line(name, secs, batched="", rss=""):
    print(f"{name:38} {secs:8.2f} {rows/secs:9.0f} {client/secs:9.2f} {http/secs:8.2f} {batched:>10} {rss:>10}")
line("pipe: copy | clickhouse-client (TCP)", client)
line("pipe: copy | curl (HTTP)", http)
for i in range(0, len(runs), 4):
    batch, split, secs, rss = runs[i], float(runs[i + 1]), float(runs[i + 2]), int(runs[i + 3])
    line(f"batched pipe: {batch}-row curl inserts", split)
    line(f"pgtide run-once, batch_size {batch}", secs, f"{split/secs:.2f}", f"{rss/1024:.1f} MiB")
PY
