#!/usr/bin/env bash
# Soak: proves that pgtide loses nothing under every transaction shape real applications run.
#
# Starts three throwaway clusters on free loopback ports in a temporary directory: a source
# primary (wal_level replica, max_prepared_transactions > 0), a hot standby of it made with
# `pg_basebackup -R`, and a separate DWH cluster. Concurrent writers on the primary run plain
# inserts, updates, many-statement transactions, long transactions (insert early; nextval() or
# now() early and write late; update early), savepoints (released, rolled back and retried,
# nested), PL/pgSQL blocks with exception clauses, two-phase commit (held for seconds, some for
# tens of seconds, with and without savepoints, some rolled back) and updates that move rows
# between partitions. One `pgtide run` daemon follows seven jobs: poll jobs with `id` and
# `(updated_at, id)` watermarks, one on a partitioned table, two reading the standby, and a
# notify job. At random moments the daemon is SIGKILLed and started again, and the DWH is
# restarted. At the end the writers stop, every prepared transaction finishes, the standby
# replays everything, `pgtide run-once` runs every job and `pgtide verify JOB --json` compares
# every target with its view; the script also compares each target with the source by itself
# (an md5 of every row, by key), so a bug in verify cannot hide a lost row.
#
# Which table carries which shapes: 2PC writes only `ledger` and `shipments` (a notify job's
# tables must not be written by prepared transactions); every other shape writes all four
# tables (`orders`, `customers`, `ledger`, `shipments`).
#
#   scripts/soak.sh                 # about 2 minutes of writing
#   scripts/soak.sh --seconds 600   # longer
#   scripts/soak.sh --short         # about 20 s (the test suite's form); or SOAK_SECONDS=20
#   scripts/soak.sh --keep          # keep the temporary directory even when it passes
#   scripts/soak.sh --damage        # before comparing, delete and change a few target rows, to
#                                   # see that the comparisons catch them (the soak then fails)
#
# The binary: $PGTIDE if set; else target/release/pgtide if a release build exists (brought up
# to date with `cargo build --release`); else a debug build (`cargo build`).
# Exit 0 only if every job has zero differences. On failure the temporary directory (logs of
# the daemon, the writers and the servers) is kept and its path printed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. scripts/lib.sh

SECONDS_TO_WRITE=${SOAK_SECONDS:-120}
KEEP=0
DAMAGE=0
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) SECONDS_TO_WRITE=${2:?--seconds needs a number}; shift 2 ;;
    --seconds=*) SECONDS_TO_WRITE=${1#--seconds=}; shift ;;
    --short) SECONDS_TO_WRITE=20; shift ;;
    --keep) KEEP=1; shift ;;
    --damage) DAMAGE=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "soak: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
case $SECONDS_TO_WRITE in
  ''|*[!0-9]*) echo "soak: --seconds wants a whole number of seconds, not $SECONDS_TO_WRITE" >&2; exit 2 ;;
esac
[ "$SECONDS_TO_WRITE" -ge 5 ] || { echo "soak: write for at least 5 seconds" >&2; exit 2; }

ensure_postgres
BIN=${PGTIDE_PG_BIN:-$(pg_bindir)}
if [ -n "${PGTIDE:-}" ]; then
  [ -x "$PGTIDE" ] || { echo "soak: PGTIDE=$PGTIDE is not an executable" >&2; exit 2; }
elif [ -x target/release/pgtide ]; then
  ensure_cargo; cargo build --release --quiet; PGTIDE=$ROOT/target/release/pgtide
else
  ensure_cargo; cargo build --quiet; PGTIDE=$ROOT/target/debug/pgtide
fi

# The script's sessions speak UTC (pgtide's set it themselves), so row texts compare across
# clusters.
export PGTZ=UTC PGDATESTYLE=ISO PGOPTIONS='-c extra_float_digits=3'
WORK=$(mktemp -d /tmp/pgtide-soak-XXXXXX)
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$WORK"; fi
mkdir -p "$WORK/cfg/jobs" "$WORK/writers" "$WORK/verify"
STOP=$WORK/writers/stop
DAEMON_LOG=$WORK/daemon.log
WRITER_PIDS=()
DAEMON_PID=
CLUSTERS=()
PASSED=0

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PPORT=$(free_port); SPORT=$(free_port); DPORT=$(free_port)
while [ "$SPORT" = "$PPORT" ]; do SPORT=$(free_port); done
while [ "$DPORT" = "$PPORT" ] || [ "$DPORT" = "$SPORT" ]; do DPORT=$(free_port); done

# Server options of the source primary and its standby (a hot standby needs at least the
# primary's max_connections and max_prepared_transactions). fsync is off: the machine does not
# crash, only servers and pgtide are stopped, which keeps everything they committed.
SRC_OPTS="-c listen_addresses=127.0.0.1 -k $WORK -c fsync=off -c max_connections=100 \
-c max_prepared_transactions=30 -c wal_level=replica -c max_wal_senders=4 -c hot_standby=on \
-c hot_standby_feedback=on -c log_min_messages=warning"
DWH_OPTS="-c listen_addresses=127.0.0.1 -k $WORK -c fsync=off -c max_connections=100 \
-c log_min_messages=warning"

# name port options: start the cluster in $WORK/name (its log in $WORK/name.log).
pg_start() {
  as_pg "$BIN/pg_ctl" -D "$WORK/$1" -l "$WORK/$1.log" -w -t 120 -o "-p $2 $3" start >/dev/null
}
pg_stop() { # name mode
  as_pg "$BIN/pg_ctl" -D "$WORK/$1" -m "$2" -w -t 120 stop >/dev/null 2>&1 || true
}
q() { # port db sql...: run SQL, unaligned tuples only
  local port=$1 db=$2; shift 2
  "$BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"
}
now_s() { date +%s; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  touch "$STOP" 2>/dev/null || true
  if [ -n "$DAEMON_PID" ]; then kill -KILL "$DAEMON_PID" 2>/dev/null || true; fi
  local p
  for p in "${WRITER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${CLUSTERS[@]}"; do pg_stop "$p" immediate; done
  for p in "${WRITER_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$PASSED" = 1 ] && [ "$KEEP" = 0 ]; then
    rm -rf "$WORK"
  else
    echo "soak: logs kept in $WORK (daemon.log, runonce.log, writers/, verify/, *.log of the servers)" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "soak: interrupted" >&2; exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Clusters: primary, its hot standby, and the DWH.
echo "soak: clusters in $WORK (primary :$PPORT, standby :$SPORT, dwh :$DPORT), pgtide $PGTIDE"
for c in primary dwh; do
  as_pg "$BIN/initdb" -D "$WORK/$c" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >/dev/null
done
CLUSTERS+=(primary); pg_start primary "$PPORT" "$SRC_OPTS"
CLUSTERS+=(dwh); pg_start dwh "$DPORT" "$DWH_OPTS"
q "$PPORT" postgres -c "create database shop"
q "$DPORT" postgres -c "create database dwh"

q "$PPORT" shop <<'SQL'
create table customers (
    id bigserial primary key,
    name text not null,
    country text not null,
    updated_at timestamptz not null default now(),
    soak_kind text
);
create table orders (
    id bigserial primary key,
    customer_id bigint not null,
    status integer not null,
    amount numeric(12, 2) not null,
    payload jsonb not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    soak_kind text
);
create index on orders (updated_at, id);
create index on orders (customer_id);
-- Written by two-phase commit (with shipments), so no notify job reads it.
create table ledger (
    id bigserial primary key,
    account integer not null,
    amount numeric(12, 2) not null,
    note text not null,
    updated_at timestamptz not null default now(),
    soak_kind text
);
create index on ledger (updated_at, id);
-- Partitioned by a column that updates change: such an update moves the row to another
-- partition (a delete and an insert underneath).
create table shipments (
    id bigserial,
    state text not null,
    order_ref bigint not null,
    weight numeric(8, 2) not null,
    updated_at timestamptz not null default now(),
    soak_kind text,
    primary key (id, state)
) partition by list (state);
create table shipments_new partition of shipments for values in ('new');
create table shipments_sent partition of shipments for values in ('sent');
create table shipments_done partition of shipments for values in ('done');
create index on shipments (updated_at, id);
-- One row per committed writer transaction, written last in it: the committed count by kind.
create table soak_log (kind text not null);

-- updated_at is kept by the database, as the exactness rules require; now() is the start
-- time of the writing transaction, which is what makes long transactions dangerous.
-- soak_kind names the shape of the transaction that last wrote the row (no job reads it): a
-- lost or stale row is reported with the shape that wrote it.
create function stamp() returns trigger language plpgsql as $$
begin
    new.soak_kind := coalesce(nullif(current_setting('soak.kind', true), ''), 'seed');
    if tg_op = 'UPDATE' then
        new.updated_at := now();
    end if;
    return new;
end $$;
create trigger stamp before insert or update on customers for each row execute function stamp();
create trigger stamp before insert or update on orders for each row execute function stamp();
create trigger stamp before insert or update on ledger for each row execute function stamp();
create trigger stamp before insert or update on shipments for each row execute function stamp();

insert into customers (name, country)
select 'customer ' || g, (array['DE', 'FR', 'US', 'JP'])[1 + g % 4] from generate_series(1, 200) g;
insert into orders (customer_id, status, amount, payload)
select 1 + g % 200, 1 + g % 3, round((g % 1000) / 7.0, 2),
       jsonb_build_object('meta', jsonb_build_object('channel', (array['web', 'app', 'phone'])[1 + g % 3]),
                          'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || g % 100, 'qty', 1 + g % 5)))
from generate_series(1, 2000) g;
insert into ledger (account, amount, note)
select g % 50, round((g % 100) / 3.0, 2), 'seed ' || g from generate_series(1, 500) g;
insert into shipments (state, order_ref, weight)
select (array['new', 'sent', 'done'])[1 + g % 3], g, round((g % 50) / 3.0, 2) from generate_series(1, 500) g;
SQL

as_pg "$BIN/pg_basebackup" -h 127.0.0.1 -p "$PPORT" -U postgres -D "$WORK/standby" -R -X stream -c fast
CLUSTERS+=(standby); pg_start standby "$SPORT" "$SRC_OPTS"
for _ in $(seq 60); do
  [ "$(q "$SPORT" shop -c "select pg_is_in_recovery() and (select count(*) from orders) > 0" 2>/dev/null)" = t ] && break
  sleep 0.5
done
[ "$(q "$SPORT" shop -c "select pg_is_in_recovery()")" = t ] || { echo "soak: the standby did not come up" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# pgtide: one instance, seven jobs.
cat > "$WORK/cfg/pgtide.toml" <<TOML
state_path = "state/pgtide.db"
[sources.primary]
url = "postgres://postgres@127.0.0.1:$PPORT/shop"
[sources.replica]
url = "postgres://postgres@127.0.0.1:$SPORT/shop"
[dwh]
url = "postgres://postgres@127.0.0.1:$DPORT/dwh"
schema = "dw"
[daemon]
max_concurrent_jobs = 8
TOML

# job source table watermark(TOML or empty) columns(name=from ...): a poll job file.
poll_job() {
  local job=$1 source=$2 table=$3 watermark=$4; shift 4
  {
    printf 'source = "%s"\ninterval_secs = 1\nbatch_size = 500\nkey = ["id"]\n' "$source"
    [ -z "$watermark" ] || printf 'watermark = %s\n' "$watermark"
    printf '[from]\ntable = "public.%s"\nas = "t"\n' "$table"
    local c
    for c in "$@"; do printf '[[column]]\nname = "%s"\nfrom = "t.%s"\n' "$c" "$c"; done
  } > "$WORK/cfg/jobs/$job.toml"
}
# With an id watermark, updates of loaded rows are not picked up (README): such jobs read
# columns that no update changes.
poll_job orders_id primary orders "" id customer_id created_at
poll_job orders_ts primary orders '["updated_at", "id"]' id customer_id status amount payload created_at updated_at
cat >> "$WORK/cfg/jobs/orders_ts.toml" <<'TOML'
[[column]]
name = "amount_cents"
sql = "(t.amount * 100)::bigint"
[[column]]
name = "channel"
from = "t.payload"
json = "meta.channel"
type = "text"
TOML
poll_job shipments_ts primary shipments '["updated_at", "id"]' id state order_ref weight updated_at
poll_job ledger_ts primary ledger '["updated_at", "id"]' id account amount note updated_at
poll_job replica_orders_id replica orders "" id customer_id created_at
poll_job replica_ledger_ts replica ledger '["updated_at", "id"]' id account amount note updated_at
cat > "$WORK/cfg/jobs/orders_live.toml" <<'TOML'
source = "primary"
mode = "notify"
interval_secs = 5
batch_size = 500
key = ["order_id"]
[from]
table = "public.orders"
as = "o"
[[join]]
table = "public.customers"
as = "c"
type = "left"
on = { "o.customer_id" = "c.id" }
[[column]]
name = "order_id"
from = "o.id"
[[column]]
name = "customer_name"
from = "c.name"
[[column]]
name = "country"
from = "c.country"
[[column]]
name = "status"
from = "o.status"
[[column]]
name = "amount"
from = "o.amount"
[[column]]
name = "updated_at"
from = "o.updated_at"
TOML
JOBS=(orders_id orders_ts orders_live shipments_ts ledger_ts replica_orders_id replica_ledger_ts)

# The script's own comparison, per job: "key<TAB>md5 of the row" on the job's source and in its
# target (the same columns in the same order; the same types, so the same text), and on the
# source the shape of the transaction that last wrote the row.
declare -A XSRC XDWH XPORT
XSRC[orders_id]="select id, md5(row(id, customer_id, created_at)::text), soak_kind from orders"
XDWH[orders_id]="select id, md5(row(id, customer_id, created_at)::text) from dw.orders_id"
XSRC[orders_ts]="select id, md5(row(id, customer_id, status, amount, payload, created_at, updated_at, (amount * 100)::bigint, payload #>> '{meta,channel}')::text), soak_kind from orders"
XDWH[orders_ts]="select id, md5(row(id, customer_id, status, amount, payload, created_at, updated_at, amount_cents, channel)::text) from dw.orders_ts"
XSRC[orders_live]="select o.id, md5(row(o.id, c.name, c.country, o.status, o.amount, o.updated_at)::text), o.soak_kind from orders o left join customers c on o.customer_id = c.id"
XDWH[orders_live]="select order_id, md5(row(order_id, customer_name, country, status, amount, updated_at)::text) from dw.orders_live"
XSRC[shipments_ts]="select id, md5(row(id, state, order_ref, weight, updated_at)::text), soak_kind from shipments"
XDWH[shipments_ts]="select id, md5(row(id, state, order_ref, weight, updated_at)::text) from dw.shipments_ts"
XSRC[ledger_ts]="select id, md5(row(id, account, amount, note, updated_at)::text), soak_kind from ledger"
XDWH[ledger_ts]="select id, md5(row(id, account, amount, note, updated_at)::text) from dw.ledger_ts"
XSRC[replica_orders_id]=${XSRC[orders_id]}
XDWH[replica_orders_id]=${XDWH[orders_id]/dw.orders_id/dw.replica_orders_id}
XSRC[replica_ledger_ts]=${XSRC[ledger_ts]}
XDWH[replica_ledger_ts]=${XDWH[ledger_ts]/dw.ledger_ts/dw.replica_ledger_ts}
for j in "${JOBS[@]}"; do XPORT[$j]=$PPORT; done
XPORT[replica_orders_id]=$SPORT
XPORT[replica_ledger_ts]=$SPORT

pgtide() { "$PGTIDE" --config "$WORK/cfg/pgtide.toml" "$@"; }
pgtide install orders_live >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log" >&2; exit 1; }
pgtide check >"$WORK/check.log" 2>&1 || { cat "$WORK/check.log" >&2; echo "soak: pgtide check failed" >&2; exit 1; }

start_daemon() {
  "$PGTIDE" --config "$WORK/cfg/pgtide.toml" --log-format json run >>"$DAEMON_LOG" 2>&1 &
  DAEMON_PID=$!
}

# ---------------------------------------------------------------------------------------------
# Writers. Each is one psql session fed one unit (a transaction, or a prepared one and its
# commit) at a time; psql acknowledges each unit, so a writer stops within one unit of the stop
# file appearing. A unit's shape depends on the writer's turn (round robin), so every shape runs
# even in a short soak; values and sleeps are random.
PAYLOAD="jsonb_build_object('meta', jsonb_build_object('channel', (array['web', 'app', 'phone'])[1 + floor(random() * 3)::int]), 'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || floor(random() * 1000)::int, 'qty', 1 + floor(random() * 5)::int)))"
RID_O="(select 1 + floor(random() * last_value)::bigint from orders_id_seq)"
RID_C="(select 1 + floor(random() * last_value)::bigint from customers_id_seq)"
RID_L="(select 1 + floor(random() * last_value)::bigint from ledger_id_seq)"
RID_S="(select 1 + floor(random() * last_value)::bigint from shipments_id_seq)"
ORDER_VALUES="$RID_C, 1 + floor(random() * 3)::int, round((random() * 1000)::numeric, 2), $PAYLOAD"
INS_O="insert into orders (customer_id, status, amount, payload) values ($ORDER_VALUES)"
UPD_O="update orders set status = 1 + floor(random() * 3)::int, amount = round((random() * 1000)::numeric, 2), payload = jsonb_set(payload, '{meta,channel}', to_jsonb((array['web', 'app', 'phone', 'store'])[1 + floor(random() * 4)::int])) where id = $RID_O"
INS_C="insert into customers (name, country) values ('customer ' || floor(random() * 1e6)::int, (array['DE', 'FR', 'US', 'JP'])[1 + floor(random() * 4)::int])"
UPD_C="update customers set name = 'renamed ' || floor(random() * 1e6)::int, country = (array['DE', 'FR', 'US', 'JP', 'BR'])[1 + floor(random() * 5)::int] where id = $RID_C"
LEDGER_VALUES="floor(random() * 50)::int, round((random() * 100)::numeric, 2), 'note ' || floor(random() * 1e6)::int"
INS_L="insert into ledger (account, amount, note) values ($LEDGER_VALUES)"
UPD_L="update ledger set amount = round((random() * 100)::numeric, 2), note = 'changed ' || floor(random() * 1e6)::int where id = $RID_L"
SHIP_VALUES="(array['new', 'sent', 'done'])[1 + floor(random() * 3)::int], floor(random() * 10000)::int, round((random() * 50)::numeric, 2)"
INS_S="insert into shipments (state, order_ref, weight) values ($SHIP_VALUES)"
UPD_S="update shipments set weight = round((random() * 50)::numeric, 2) where id = $RID_S"
MOVE_S="update shipments set state = case state when 'new' then 'sent' when 'sent' then 'done' else 'new' end where id = $RID_S"
SLEEP_LONG="select pg_sleep(1 + random() * 4);"
SLEEP_SHORT="select pg_sleep(0.2 + random() * 1.5);"
# The shape's name goes into the transaction first (soak_kind of the rows it writes) and last
# (one soak_log row: committed transactions by shape).
tx_begin() { echo "begin;"; echo "set local soak.kind = '$1';"; }
log_kind() { echo "insert into soak_log (kind) values ('$1');"; }
tx_commit() { log_kind "$1"; echo "commit;"; }
# Turn n of a list of statements: every shape writes every table in turn.
pick() { local n=$1; shift; local a=("$@"); echo "${a[n % ${#a[@]}]}"; }

unit_insert() { # plain inserts, one statement and a row or several
  local n=$1
  tx_begin insert
  case $((n % 5)) in
    0) echo "$INS_O;" ;;
    1) echo "insert into orders (customer_id, status, amount, payload) select $ORDER_VALUES from generate_series(1, $((2 + RANDOM % 9)));" ;;
    2) echo "$INS_C;" ;;
    3) echo "$INS_L;" ;;
    4) echo "$INS_S;" ;;
  esac
  tx_commit insert
}

unit_update() {
  tx_begin update; echo "$(pick "$1" "$UPD_O" "$UPD_C" "$UPD_L" "$UPD_S");"; tx_commit update
}

unit_many() { # an ORM's request: a new customer, its orders, changes here and there
  local i
  tx_begin many
  echo "$INS_C returning id as cid \\gset"
  for i in $(seq $((3 + RANDOM % 10))); do
    case $((RANDOM % 6)) in
      0|1) echo "insert into orders (customer_id, status, amount, payload) values (:cid, 1, round((random() * 1000)::numeric, 2), $PAYLOAD);" ;;
      2) echo "$UPD_O;" ;;
      3) echo "$INS_L;" ;;
      4) echo "$INS_S;" ;;
      5) echo "$UPD_C;" ;;
    esac
  done
  echo "update orders set status = 2 where customer_id = :cid;"
  tx_commit many
}

unit_long() { # 1-5 s transactions that write, or take their cursor values, early
  local n=$1 table kind ins upd cols vals
  table=$(pick $((n / 4)) orders ledger shipments)
  case $table in
    orders) ins=$INS_O; upd=$UPD_O; cols="customer_id, status, amount, payload"; vals=$ORDER_VALUES ;;
    ledger) ins=$INS_L; upd=$UPD_L; cols="account, amount, note"; vals=$LEDGER_VALUES ;;
    shipments) ins=$INS_S; upd=$MOVE_S; cols="state, order_ref, weight"; vals=$SHIP_VALUES ;;
  esac
  kind=$(pick "$n" long_insert_early long_nextval_late long_now_late long_update)
  tx_begin "$kind"
  case $kind in
    long_insert_early) echo "$ins;"; echo "$SLEEP_LONG"; echo "$ins;" ;;
    long_nextval_late) # the id is taken (no xid yet) long before the row is written
       echo "select nextval('${table}_id_seq') as nid \\gset"; echo "$SLEEP_LONG"
       echo "insert into $table (id, $cols) values (:nid, $vals);" ;;
    long_now_late) # now() is fixed at the start: the row's updated_at lies seconds in the past
       echo "select now();"; echo "$SLEEP_LONG"; echo "$ins;"; echo "$upd;" ;;
    long_update) echo "$upd;"; echo "$SLEEP_LONG"; echo "$upd;" ;;
  esac
  tx_commit "$kind"
}

unit_savepoint() {
  local n=$1 kind
  kind=$(pick "$n" sp_released sp_retry sp_nested)
  tx_begin "$kind"
  case $kind in
    sp_released)
       echo "savepoint a;"; echo "$(pick $((n / 3)) "$INS_O" "$INS_L" "$INS_S");"
       echo "$(pick $((n / 3)) "$UPD_O" "$UPD_L" "$MOVE_S");"; echo "release savepoint a;" ;;
    sp_retry) # an ORM's retry: the first attempt fails (a duplicate key), is rolled back, retried
       echo "savepoint a;"
       if [ $((n / 3 % 2)) -eq 0 ]; then
         echo "insert into orders (id, customer_id, status, amount, payload) values (1, $ORDER_VALUES);"
         echo "rollback to savepoint a;"; echo "$INS_O;"
       else
         echo "insert into ledger (id, account, amount, note) values (1, $LEDGER_VALUES);"
         echo "rollback to savepoint a;"; echo "$INS_L;"
       fi
       echo "release savepoint a;"
       echo "savepoint b;"; echo "$UPD_O;"; echo "rollback to savepoint b;"; echo "$UPD_L;"; echo "release savepoint b;" ;;
    sp_nested) # the first write of the transaction is two levels down
       echo "savepoint a;"; echo "savepoint b;"; echo "$INS_O;"
       echo "savepoint c;"; echo "$INS_S;"; echo "$MOVE_S;"; echo "release savepoint c;"
       echo "savepoint d;"; echo "$INS_L;"; echo "rollback to savepoint d;"; echo "$UPD_L;"
       echo "release savepoint b;"; echo "$UPD_O;"; echo "release savepoint a;"
       echo "savepoint e;"; echo "$INS_C;"; echo "release savepoint e;" ;;
  esac
  echo "$SLEEP_SHORT"
  tx_commit "$kind"
}

unit_plpgsql() { # exception blocks: each block is a subtransaction
  local n=$1
  tx_begin plpgsql_exception
  if [ $((n % 2)) -eq 0 ]; then
    cat <<SQL
do \$body\$
declare i int;
begin
    for i in 1 .. 3 + floor(random() * 5)::int loop
        begin
            $INS_O;
            $INS_S;
            if random() < 0.4 then
                raise exception 'try again';
            end if;
        exception when others then
            $INS_L;
        end;
    end loop;
    begin
        $UPD_O;
        $MOVE_S;
    exception when others then
        null;
    end;
end
\$body\$;
SQL
  else
    cat <<SQL
do \$body\$
begin
    -- an upsert the old way: insert, and update when the key exists
    begin
        insert into ledger (id, account, amount, note) values ($RID_L, $LEDGER_VALUES);
    exception when unique_violation then
        $UPD_L;
    end;
    begin
        $UPD_C;
        $INS_O;
        perform 1 / 0;
    exception when division_by_zero then
        $INS_O;
    end;
end
\$body\$;
SQL
  fi
  echo "$SLEEP_SHORT"
  tx_commit plpgsql_exception
}

ROLLED_BACK_2PC=$WORK/writers/2pc_rolled_back
unit_2pc() { # prepared, held 1-5 s, then committed (every fifth rolled back)
  local n=$1 gid="soak_${2}_$n" kind
  kind=$(pick "$n" 2pc 2pc_savepoint 2pc_savepoint 2pc)
  tx_begin "$kind"
  case $((n % 4)) in
    0) echo "$INS_L;"; echo "$INS_S;"; echo "$MOVE_S;" ;;
    1) echo "$INS_L;"; echo "savepoint a;"; echo "$UPD_L;"; echo "$INS_S;"; echo "release savepoint a;" ;;
    2) echo "savepoint a;"; echo "$INS_S;"; echo "rollback to savepoint a;"; echo "savepoint b;"; echo "$INS_L;"; echo "$MOVE_S;"
       echo "release savepoint b;" ;;
    3) echo "$UPD_S;"; echo "$SLEEP_SHORT"; echo "$INS_L;" ;;
  esac
  log_kind "$kind"
  echo "prepare transaction '$gid';"
  echo "$SLEEP_LONG"
  if [ $((n % 5)) -eq 4 ]; then
    echo "rollback prepared '$gid';"; echo x >> "$ROLLED_BACK_2PC"
  else
    echo "commit prepared '$gid';"
  fi
}

unit_2pc_long() { # prepared and held for 8-25 s (no longer than the soak's writing lasts)
  local n=$1 gid="soak_${2}_$n" hold left
  left=$((END_WRITING - $(now_s)))
  hold=$((8 + RANDOM % 18)); [ "$hold" -le "$left" ] || hold=$left; [ "$hold" -ge 2 ] || hold=2
  tx_begin 2pc_long
  if [ $((n % 2)) -eq 0 ]; then
    echo "$INS_L;"; echo "$INS_S;"
  else
    echo "savepoint a;"; echo "$INS_S;"; echo "$MOVE_S;"; echo "release savepoint a;"; echo "$INS_L;"
  fi
  log_kind 2pc_long
  echo "prepare transaction '$gid';"
  echo "select pg_sleep($hold);"
  echo "commit prepared '$gid';"
}

unit_move() { # rows move between partitions
  tx_begin move; echo "$MOVE_S;"; [ $((RANDOM % 2)) -ne 0 ] || echo "$MOVE_S;"; tx_commit move
}

# name unit pause [first turn]: run units until the stop file appears; the psql session's errors
# go to writers/name.err, the number of units done to writers/name.units.
writer() {
  local name=$1 unit=$2 pause=$3 n=${4:-0} ack
  set +e
  trap '' PIPE INT
  coproc PSQL { PGAPPNAME=soak_$name exec "$BIN/psql" -X -q -v ON_ERROR_STOP=0 -v VERBOSITY=terse \
    -h 127.0.0.1 -p "$PPORT" -U postgres -d shop -f - 2>>"$WORK/writers/$name.err"; }
  local psql_pid=$PSQL_PID to from
  exec {to}>&"${PSQL[1]}" {from}<&"${PSQL[0]}"
  trap 'kill -TERM $psql_pid 2>/dev/null; exit 0' TERM
  echo '\o /dev/null' >&"$to"
  while [ ! -e "$STOP" ]; do
    { "$unit" "$n" "$name"; echo '\echo ack'; } >&"$to" 2>/dev/null || break
    read -r -u "$from" ack || { echo "psql session ended" >> "$WORK/writers/$name.err"; break; }
    n=$((n + 1))
    echo "$((n - ${4:-0}))" > "$WORK/writers/$name.units"
    [ "$pause" = 0 ] || sleep "$pause"
  done
  echo '\q' >&"$to" 2>/dev/null
  exec {to}>&- {from}<&-
  wait "$psql_pid" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# The soak.
start_daemon
START=$(now_s)
END_WRITING=$((START + SECONDS_TO_WRITE))
start_writer() { writer "$@" & WRITER_PIDS+=($!); }
start_writer inserts unit_insert 0.03
start_writer updates unit_update 0.03
start_writer many unit_many 0.05
start_writer long1 unit_long 0
start_writer long2 unit_long 0 2   # the other shapes first: each comes early in one of the two
start_writer savepoints unit_savepoint 0
start_writer plpgsql unit_plpgsql 0
start_writer moves unit_move 0.05
start_writer twophase1 unit_2pc 0
start_writer twophase2 unit_2pc 0 1
start_writer twophase_long unit_2pc_long 0

# Disturbances at random moments: SIGKILLs of the daemon (one per 15 s, at least 2) and DWH
# restarts (one in a short soak, two otherwise: fast, then immediate).
EVENTS=()
KILLS_PLANNED=$((SECONDS_TO_WRITE / 15)); [ "$KILLS_PLANNED" -ge 2 ] || KILLS_PLANNED=2
for _ in $(seq "$KILLS_PLANNED"); do EVENTS+=("$((2 + RANDOM % (SECONDS_TO_WRITE - 3))) kill"); done
EVENTS+=("$((SECONDS_TO_WRITE / 5 + RANDOM % (SECONDS_TO_WRITE * 3 / 10 + 1))) dwh_fast")
[ "$SECONDS_TO_WRITE" -lt 60 ] || EVENTS+=("$((SECONDS_TO_WRITE / 2 + RANDOM % (SECONDS_TO_WRITE * 3 / 10 + 1))) dwh_immediate")
mapfile -t EVENTS < <(printf '%s\n' "${EVENTS[@]}" | sort -n)
KILLS=0; DWH_RESTARTS=0; DAEMON_DIED=()
echo "soak: writing for $SECONDS_TO_WRITE s; $KILLS_PLANNED daemon SIGKILLs and $(( ${#EVENTS[@]} - KILLS_PLANNED )) DWH restarts planned"
ev=0
while [ "$(now_s)" -lt "$END_WRITING" ]; do
  sleep 0.5
  if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
    rc=0; wait "$DAEMON_PID" || rc=$?
    DAEMON_DIED+=("exit $rc at $(( $(now_s) - START )) s")
    echo "soak: WARNING: the daemon exited by itself (exit $rc); starting it again" >&2
    start_daemon
  fi
  elapsed=$(( $(now_s) - START ))
  while [ "$ev" -lt "${#EVENTS[@]}" ] && [ "${EVENTS[ev]%% *}" -le "$elapsed" ]; do
    case ${EVENTS[ev]#* } in
      kill)
        kill -KILL "$DAEMON_PID" 2>/dev/null || true; wait "$DAEMON_PID" 2>/dev/null || true
        KILLS=$((KILLS + 1)); echo "soak: ${elapsed}s: SIGKILL pgtide run (pid $DAEMON_PID)"
        sleep "0.$((RANDOM % 10))"; start_daemon ;;
      dwh_fast)
        echo "soak: ${elapsed}s: DWH restart (fast)"
        as_pg "$BIN/pg_ctl" -D "$WORK/dwh" -l "$WORK/dwh.log" -m fast -w -t 120 restart >/dev/null
        DWH_RESTARTS=$((DWH_RESTARTS + 1)) ;;
      dwh_immediate)
        echo "soak: ${elapsed}s: DWH stop (immediate), down 2 s, start"
        pg_stop dwh immediate; sleep 2; pg_start dwh "$DPORT" "$DWH_OPTS"
        DWH_RESTARTS=$((DWH_RESTARTS + 1)) ;;
    esac
    ev=$((ev + 1))
  done
done

# ---------------------------------------------------------------------------------------------
# The end: writers stop, prepared transactions finish, the daemon stops, the standby catches
# up, every job runs once more and is compared.
touch "$STOP"
echo "soak: writing stopped; waiting for the writers' last transactions"
deadline=$(( $(now_s) + 120 ))
for p in "${WRITER_PIDS[@]}"; do
  while kill -0 "$p" 2>/dev/null && [ "$(now_s)" -lt "$deadline" ]; do sleep 0.2; done
  if kill -0 "$p" 2>/dev/null; then echo "soak: a writer did not stop within 120 s" >&2; exit 1; fi
  wait "$p" 2>/dev/null || true
done
for _ in $(seq 120); do
  [ "$(q "$PPORT" shop -c "select count(*) from pg_prepared_xacts")" = 0 ] && break
  sleep 0.5
done
left=$(q "$PPORT" shop -c "select count(*) from pg_prepared_xacts")
[ "$left" = 0 ] || { echo "soak: $left prepared transactions still open after 60 s" >&2; exit 1; }

kill -TERM "$DAEMON_PID" 2>/dev/null || true
for _ in $(seq 700); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$DAEMON_PID" 2>/dev/null; then
  echo "soak: WARNING: the daemon did not stop within 70 s of SIGTERM; killed" >&2
  kill -KILL "$DAEMON_PID" 2>/dev/null || true
fi
wait "$DAEMON_PID" 2>/dev/null || true
DAEMON_PID=

lsn=$(q "$PPORT" shop -c "select pg_current_wal_lsn()")
for _ in $(seq 240); do
  [ "$(q "$SPORT" shop -c "select pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn")" = t ] && break
  sleep 0.5
done
[ "$(q "$SPORT" shop -c "select pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn")" = t ] \
  || { echo "soak: the standby did not replay up to $lsn within 120 s" >&2; exit 1; }

for j in "${JOBS[@]}"; do
  for _ in $(seq 30); do
    set +e
    "$PGTIDE" --config "$WORK/cfg/pgtide.toml" --log-format json run-once "$j" \
      >>"$WORK/runonce.out" 2>>"$WORK/runonce.log"
    rc=$?
    set -e
    echo "$rc" > "$WORK/runonce.rc.$j"
    [ "$rc" = 3 ] || break   # held by a killed pgtide's session the DWH has not noticed yet
    sleep 2
  done
done

if [ "$DAMAGE" = 1 ]; then
  echo "soak: --damage: deleting 3 rows of dw.orders_ts and changing 2 of dw.replica_ledger_ts"
  q "$DPORT" dwh -c "delete from dw.orders_ts where id in (select id from dw.orders_ts order by id desc limit 3)" \
    -c "update dw.replica_ledger_ts set note = note || ' (damaged)' where id in (select id from dw.replica_ledger_ts order by id limit 2)"
fi

# verify, and the script's own comparison, for every job.
VERIFY_MISSING=0
for j in "${JOBS[@]}"; do
  set +e
  "$PGTIDE" --config "$WORK/cfg/pgtide.toml" verify "$j" --json >"$WORK/verify/$j.json" 2>"$WORK/verify/$j.err"
  echo $? > "$WORK/verify/$j.rc"
  set -e
  if [ "$(cat "$WORK/verify/$j.rc")" = 2 ] && grep -q "unrecognized subcommand" "$WORK/verify/$j.err"; then
    VERIFY_MISSING=1
  fi
  q "${XPORT[$j]}" shop -F $'\t' -c "${XSRC[$j]}" > "$WORK/verify/$j.source.tsv"
  q "$DPORT" dwh -F $'\t' -c "${XDWH[$j]}" > "$WORK/verify/$j.target.tsv" 2>"$WORK/verify/$j.target.err" || true
done

q "$PPORT" shop -F $'\t' -c "select kind, count(*) from soak_log group by kind order by kind" > "$WORK/kinds.tsv"
ROLLED_BACK=0; [ ! -f "$ROLLED_BACK_2PC" ] || ROLLED_BACK=$(wc -l < "$ROLLED_BACK_2PC")
cat "$WORK"/writers/*.err 2>/dev/null | grep -o 'ERROR: .*' | sed 's/ [0-9][0-9]*/ N/g; s/"[^"]*"/"..."/g' \
  | sort | uniq -c | sort -rn > "$WORK/writer_errors.txt" || true

set +e
python3 - "$WORK" "$SECONDS_TO_WRITE" "$KILLS" "$DWH_RESTARTS" "$ROLLED_BACK" "$VERIFY_MISSING" \
  "${#DAEMON_DIED[@]}" "${JOBS[@]}" <<'PY'
import json, os, sys
work, seconds, kills, restarts, rolled_back, verify_missing, died = sys.argv[1:8]
jobs = sys.argv[8:]
verify_missing = verify_missing == "1"

print(f"\n=== soak summary: {seconds} s of writing ===")
print("transactions committed, by kind:")
total = 0
for line in open(os.path.join(work, "kinds.tsv")):
    kind, n = line.rstrip("\n").split("\t")
    total += int(n)
    print(f"  {kind:<20} {int(n):>8}")
print(f"  {'total':<20} {total:>8}")
print(f"  {'2pc rolled back':<20} {int(rolled_back):>8}   (prepared, then rolled back: nothing to load)")
errs = open(os.path.join(work, "writer_errors.txt")).read().strip()
if errs:
    print("errors the writers saw (the duplicate keys are sp_retry's first attempts; other errors roll back their transaction, which is then not counted):")
    for line in errs.splitlines()[:8]:
        print("  " + line.strip())
ended = sum(open(os.path.join(work, "writers", f)).read().count("psql session ended")
            for f in os.listdir(os.path.join(work, "writers")) if f.endswith(".err"))
if ended:
    print(f"WARNING: {ended} writer sessions ended before the soak did (see writers/*.err)")
print(f"daemon SIGKILLs: {kills}, DWH restarts: {restarts}, daemon exits on its own: {died}")

# "caught up" lines of the daemon and the final run-once: rows read (`rows`, re-reads included)
# and rows re-read by recheck (`rechecked`).
loaded, reread, has_reread = {}, {}, False
for name in ("daemon.log", "runonce.log"):
    path = os.path.join(work, name)
    if not os.path.exists(path):
        continue
    for line in open(path, errors="replace"):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("message") != "caught up" or "job" not in ev:
            continue
        j = ev["job"]
        if j == "orders_live":
            continue
        loaded[j] = loaded.get(j, 0) + int(ev.get("rows", 0))
        if "rechecked" in ev:
            has_reread = True
            reread[j] = reread.get(j, 0) + int(ev["rechecked"])

def load_tsv(path):
    """key -> (md5 of the row, shape that last wrote it)"""
    rows = {}
    for line in open(path):
        f = line.rstrip("\n").split("\t")
        rows[f[0]] = (f[1], f[2] if len(f) > 2 else "")
    return rows

def sample(keys):
    return sorted(keys, key=lambda k: (len(k), k))[:10]

def by_shape(keys, src):
    count = {}
    for k in keys:
        shape = src[k][1] or "seed"
        count[shape] = count.get(shape, 0) + 1
    return ", ".join(f"{s} {n}" for s, n in sorted(count.items(), key=lambda x: -x[1]))

failed = []
print("jobs (rows in the target; missing, different, extra by `pgtide verify --json`"
      + (", which this pgtide does not have yet: the script's own comparison stands in" if verify_missing else "")
      + "):")
for j in jobs:
    vdir = os.path.join(work, "verify")
    src = load_tsv(os.path.join(vdir, j + ".source.tsv"))
    target_err = open(os.path.join(vdir, j + ".target.err")).read().strip()
    dst = load_tsv(os.path.join(vdir, j + ".target.tsv")) if not target_err else {}
    x_missing = [k for k in src if k not in dst]
    x_extra = [k for k in dst if k not in src]
    x_diff = [k for k in src if k in dst and src[k][0] != dst[k][0]]
    verify, vrc = None, open(os.path.join(vdir, j + ".rc")).read().strip()
    if not verify_missing:
        try:
            verify = json.loads(open(os.path.join(vdir, j + ".json")).read())
        except ValueError:
            verify = None
    if verify is not None:
        m, d, e = int(verify["missing"]), int(verify["different"]), int(verify["extra"])
        keys = verify.get("keys") or {}
    else:
        m, d, e = len(x_missing), len(x_diff), len(x_extra)
        keys = {"missing": sample(x_missing), "different": sample(x_diff), "extra": sample(x_extra)}
    rc_file = os.path.join(work, "runonce.rc." + j)
    run_rc = open(rc_file).read().strip() if os.path.exists(rc_file) else "?"
    print(f"job {j}: rows {len(dst)}, missing {m}, different {d}, extra {e}")
    poll = j != "orders_live"   # the notify job's drains in the daemon log no row counts
    line = f"    read {loaded.get(j, 0)} rows" if poll else "    rows read: not logged by the daemon (notify)"
    if has_reread and poll:
        r = reread.get(j, 0)
        b = loaded.get(j, 0) - r
        line += f": {b} past the watermark, {r} re-read by recheck ({(r / b if b else 0):.2f} per row past the watermark)"
    if verify is not None:
        line += f"; verify compared {verify.get('compared')}"
    line += f"; own comparison: missing {len(x_missing)}, different {len(x_diff)}, extra {len(x_extra)}"
    print(line)
    problems = []
    if target_err:
        problems.append(f"target unreadable: {target_err.splitlines()[-1]}")
    if not verify_missing and verify is None:
        err = open(os.path.join(vdir, j + ".err")).read().strip().splitlines()
        problems.append(f"verify failed (exit {vrc}): {err[-1] if err else 'no json'}")
    elif verify is not None and vrc != ("0" if m + d + e == 0 else "1"):
        problems.append(f"verify exited {vrc} after counting {m} missing, {d} different, {e} extra")
    if run_rc != "0":
        problems.append(f"the final run-once exited {run_rc}")
    for kind, n in (("missing", m), ("different", d), ("extra", e)):
        if n:
            ks = [k if isinstance(k, str) else "(" + ", ".join(map(str, k)) + ")" if len(k) > 1 else str(k[0])
                  for k in keys.get(kind, [])]
            problems.append(f"{n} {kind}, first keys: {', '.join(ks)}")
    for kind, ks, n in (("missing", x_missing, m), ("different", x_diff, d), ("extra", x_extra, e)):
        if len(ks) != n and verify is not None:
            problems.append(f"own comparison (verify said {n}): {len(ks)} {kind}, first keys: {', '.join(sample(ks))}")
        if ks and kind != "extra":
            problems.append(f"{kind} rows by the shape that last wrote them: {by_shape(ks, src)}")
    for p in problems:
        print(f"    DIFFERENCE: {p}")
    if problems:
        failed.append(j)

if has_reread:
    tr = sum(reread.values())
    tb = sum(loaded.values()) - tr
    print(f"recheck (poll jobs): {tr} rows re-read, {tb} rows read past the watermark: "
          f"{(tr / tb if tb else 0):.2f} re-read per row loaded (runs cut short by a SIGKILL log nothing)")
else:
    print("recheck: this pgtide does not log `rechecked` on \"caught up\" lines; no figure")
if failed:
    print(f"RESULT: FAIL: {len(failed)} of {len(jobs)} jobs differ ({', '.join(failed)})")
    sys.exit(1)
print(f"RESULT: PASS: {len(jobs)} jobs, zero differences")
PY
rc=$?
set -e
[ "$rc" = 0 ] && PASSED=1
exit "$rc"
