#!/usr/bin/env bash
# Latency of a notify job under `pgtide run`, and the cost of its triggers to the source.
#   1. single-row insert transactions at 100/s, then 1000/s, 20 s each (pgbench --rate);
#      latency = when the row was written to the DWH - when its source transaction wrote it
#      (both clock_timestamp() on one local server); prints p50/p95/p99/max and the backlog
#   2. pgbench inserts into a captured and an uncaptured table (same shape), 20 s each, TPS
# RATES="100 1000" SECS=20 change the load.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
RATES=${RATES:-"100 1000"}
SECS=${SECS:-20}
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide

start_bench_cluster "-c shared_buffers=256MB -c max_connections=100"
work=$WORK
port=$PORT
daemon=""
cleanup() {
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
  stop_bench_cluster
}
trap cleanup EXIT

psql -d postgres -c "create database src" -c "create database dwh"
psql -d src -c "create table events (id bigserial primary key, rate int not null, payload text, created_at timestamptz not null default clock_timestamp())" \
            -c "create table events_plain (id bigserial primary key, rate int not null, payload text, created_at timestamptz not null default clock_timestamp())"
# The target as pgtide would create it, plus landed_at: when the row was written to the DWH.
psql -d dwh -c "create table events (id bigint primary key, rate integer, payload text, created_at timestamptz,
                 _pgtide_loaded_at timestamptz not null default now(), landed_at timestamptz not null default clock_timestamp())"

mkdir -p "$work/cfg/jobs"
cat > "$work/cfg/pgtide.toml" <<TOML
[sources.src]
url = "postgres://postgres@127.0.0.1:$port/src"
[dwh]
url = "postgres://postgres@127.0.0.1:$port/dwh"
TOML
cat > "$work/cfg/jobs/events.toml" <<'TOML'
mode = "notify"
key = ["id"]
[from]
table = "public.events"
as = "e"
[[column]]
name = "id"
from = "e.id"
[[column]]
name = "rate"
from = "e.rate"
[[column]]
name = "payload"
from = "e.payload"
[[column]]
name = "created_at"
from = "e.created_at"
TOML
"$PGTIDE" --config "$work/cfg/pgtide.toml" install events >/dev/null
RUST_LOG=pgtide=warn "$PGTIDE" --config "$work/cfg/pgtide.toml" run 2>"$work/daemon.log" &
daemon=$!
sleep 2

echo 'insert into events (rate, payload) values (:rate, repeat($$x$$, 100));' > "$work/insert.sql"
echo 'insert into events_plain (rate, payload) values (:rate, repeat($$x$$, 100));' > "$work/plain.sql"
waiting() { psql -d src -Atc "select count(*) from pgtide.events_events"; }
for rate in $RATES; do
  clients=$(( rate >= 1000 ? 4 : 2 ))
  echo "inserting single-row transactions at $rate/s for $SECS s..."
  pgbench -n -c "$clients" -j 2 -R "$rate" -T "$SECS" -D rate="$rate" -f "$work/insert.sql" src > "$work/pgbench.log" 2>&1 &
  bench=$!
  max_backlog=0
  while kill -0 "$bench" 2>/dev/null; do
    b=$(waiting); [ "$b" -gt "$max_backlog" ] && max_backlog=$b
    sleep 0.5
  done
  wait "$bench" || { cat "$work/pgbench.log" >&2; exit 1; }
  for _ in $(seq 1 100); do [ "$(waiting)" = 0 ] && break; sleep 0.1; done
  sent=$(psql -d src -Atc "select count(*) from events where rate = $rate")
  for _ in $(seq 1 100); do
    [ "$(psql -d dwh -Atc "select count(*) from events where rate = $rate")" = "$sent" ] && break; sleep 0.1
  done
  psql -d dwh -Atc "
    with l as (select extract(epoch from landed_at - created_at) * 1000 as ms, created_at from events where rate = $rate),
         t as (select min(created_at) + interval '5 s' as early, max(created_at) - interval '5 s' as late from l)
    select format('%s/s: %s rows  p50 %s ms  p95 %s ms  p99 %s ms  max %s ms  | p99 first 5 s %s ms, last 5 s %s ms  | max backlog $max_backlog events',
      $rate, count(*),
      round(percentile_cont(0.5) within group (order by ms)::numeric, 2),
      round(percentile_cont(0.95) within group (order by ms)::numeric, 2),
      round(percentile_cont(0.99) within group (order by ms)::numeric, 2),
      round(max(ms)::numeric, 2),
      (select round(percentile_cont(0.99) within group (order by ms)::numeric, 2) from l, t where l.created_at < t.early),
      (select round(percentile_cont(0.99) within group (order by ms)::numeric, 2) from l, t where l.created_at > t.late))
    from l"
  [ "$(psql -d dwh -Atc "select count(*) from events where rate = $rate")" = "$sent" ] || { echo "rows missing in the DWH for $rate/s" >&2; exit 1; }
done
kill "$daemon"; wait "$daemon" || true; daemon=""

echo "trigger cost: pgbench inserts, 4 clients, $SECS s each (daemon stopped)..."
tps() { pgbench -n -c 4 -j 2 -T "$SECS" -D rate=0 -f "$1" src 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n 1; }
plain=$(tps "$work/plain.sql")
captured=$(tps "$work/insert.sql")
# Where the cost lies: the same without the statement trigger that sends NOTIFY.
psql -d src -c 'drop trigger "pgtide_events_0_stmt" on events'
rows_only=$(tps "$work/insert.sql")
python3 -c "
p, c, r = float($plain), float($captured), float($rows_only)
print(f'uncaptured table: {p:.0f} TPS   captured table: {c:.0f} TPS   ratio: {c/p:.2f}')
print(f'captured without the NOTIFY statement trigger: {r:.0f} TPS   ratio: {r/p:.2f}')"
