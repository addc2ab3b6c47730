# Shared by the scripts: find or install what pgtide's demo, tests and benchmarks need.
# shellcheck shell=bash

# Run as root directly, otherwise through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# PostgreSQL's server binaries (initdb, pg_ctl, postgres) from Debian's postgresql package.
pg_bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return 0; fi
  return 1
}

ensure_postgres() {
  if pg_bindir >/dev/null; then return 0; fi
  echo "PostgreSQL server binaries not found: installing Debian's postgresql package" >&2
  as_root apt-get update -q
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q postgresql postgresql-client
  pg_bindir >/dev/null || { echo "initdb still not found after installing postgresql" >&2; exit 1; }
}

# Debian's clickhouse-server (18.16 on Debian 12) for the ClickHouse tests, which start their own
# throwaway server from /usr/sbin/clickhouse-server. The package's own service is not started:
# a policy-rc.d that denies every start is put in place for the install when none is there.
ensure_clickhouse() {
  if [ -x /usr/sbin/clickhouse-server ]; then return 0; fi
  echo "clickhouse-server not found: installing Debian's clickhouse-server and clickhouse-client packages" >&2
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
  fi
  as_root apt-get update -q
  local rc=0
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q --no-install-recommends \
    clickhouse-server clickhouse-client || rc=$?
  if [ -n "$policy" ]; then as_root rm -f "$policy"; fi
  [ "$rc" -eq 0 ] || { echo "installing clickhouse-server failed" >&2; exit 1; }
  [ -x /usr/sbin/clickhouse-server ] || { echo "/usr/sbin/clickhouse-server still not found after installing clickhouse-server" >&2; exit 1; }
}

# systemd-analyze, for tests/systemd.rs (verify and security --offline of the shipped units):
# Debian's systemd package; no running systemd is needed.
ensure_systemd_analyze() {
  if command -v systemd-analyze >/dev/null; then return 0; fi
  echo "systemd-analyze not found: installing Debian's systemd package" >&2
  as_root apt-get update -q
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q --no-install-recommends systemd
  command -v systemd-analyze >/dev/null || { echo "systemd-analyze still not found after installing systemd" >&2; exit 1; }
}

# The openssl command, which the TLS tests and scripts/bench-connect.sh make certificates with
# (Debian's postgresql package usually brings it along through ssl-cert).
ensure_openssl() {
  command -v openssl >/dev/null && return 0
  as_root apt-get update -q
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q openssl
}

# Debian's ClickHouse server and client (18.16), for the ClickHouse benchmarks.
ensure_clickhouse() {
  command -v /usr/sbin/clickhouse-server >/dev/null && return 0
  echo "clickhouse-server not found: installing Debian's clickhouse-server and clickhouse-client" >&2
  as_root apt-get update -q
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q clickhouse-server clickhouse-client
  command -v /usr/sbin/clickhouse-server >/dev/null || { echo "clickhouse-server still not found after installing it" >&2; exit 1; }
}

# GNU time, for peak memory figures.
ensure_time() {
  [ -x /usr/bin/time ] && return 0
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q time
}

ensure_cargo() {
  if command -v cargo >/dev/null; then return 0; fi
  if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; return 0; fi
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
}

# Stop PostgreSQL servers left behind by test runs that were killed before they could clean up.
stop_stale_test_clusters() {
  local d owner
  for d in /tmp/pgtide-standby-*/data /tmp/pgtide-pg-*/data; do
    [ -f "$d/postmaster.pid" ] || continue
    # A cluster whose owning process still runs belongs to a test run going on elsewhere.
    owner=$(cat "$(dirname "$d")/owner.pid" 2>/dev/null || true)
    if [ -n "$owner" ] && kill -0 "$owner" 2>/dev/null; then continue; fi
    if [ "$(id -u)" -eq 0 ]; then
      runuser -u postgres -- "$(pg_bindir)/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
    else
      "$(pg_bindir)/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$(dirname "$d")"
  done
}

# Kill ClickHouse servers left behind by test runs that were killed before they could clean up:
# those whose test process (owner.pid, written by tests/support/clickhouse.rs) is gone.
stop_stale_test_clickhouse() {
  local d owner pid
  for d in /tmp/pgtide-ch-*; do
    [ -d "$d" ] || continue
    owner=$(cat "$d/owner.pid" 2>/dev/null || true)
    if [ -n "$owner" ] && kill -0 "$owner" 2>/dev/null; then continue; fi
    pid=$(cat "$d/server.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$d/config.xml"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf "$d"
  done
}

# Run as the postgres user when root (PostgreSQL refuses to run as root).
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# A throwaway cluster for a benchmark, on a free port, with the given extra server options.
# Sets BIN, WORK, PORT; psql and pgbench then talk to it. stop_bench_cluster removes it.
start_bench_cluster() {
  BIN=$(pg_bindir)
  WORK=$(mktemp -d /tmp/pgtide-bench-XXXXXX)
  if [ "$(id -u)" -eq 0 ]; then chown postgres: "$WORK"; fi
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_pg "$BIN/initdb" -D "$WORK/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w -o \
    "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 $1" start >/dev/null
}

stop_bench_cluster() {
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}

# A throwaway ClickHouse server for a benchmark, in $WORK/clickhouse (so start_bench_cluster
# first) on two free loopback ports, with its own config, data and logs. Sets CH_HTTP, CH_TCP
# and CH_PID; ch then talks to it. stop_bench_clickhouse stops it (stop_bench_cluster removes
# its directory with $WORK).
start_bench_clickhouse() {
  local d=$WORK/clickhouse i
  mkdir -p "$d"
  read -r CH_HTTP CH_TCP < <(python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')
  cat > "$d/config.xml" <<XML
<yandex><logger><level>warning</level><log>$d/log.txt</log><errorlog>$d/err.txt</errorlog></logger>
<http_port>$CH_HTTP</http_port><tcp_port>$CH_TCP</tcp_port><listen_host>127.0.0.1</listen_host>
<path>$d/data/</path><tmp_path>$d/tmp/</tmp_path><user_files_path>$d/user_files/</user_files_path><format_schema_path>$d/fs/</format_schema_path>
<users_config>users.xml</users_config><default_profile>default</default_profile><default_database>default</default_database><mark_cache_size>5368709120</mark_cache_size></yandex>
XML
  cat > "$d/users.xml" <<XML
<yandex><profiles><default></default></profiles><users><default><password></password><networks><ip>::/0</ip></networks><profile>default</profile><quota>default</quota></default></users><quotas><default></default></quotas></yandex>
XML
  /usr/sbin/clickhouse-server --config-file="$d/config.xml" >"$d/stdout.txt" 2>&1 &
  CH_PID=$!
  # Wait for an answer from this server (its data path), not from another one that got the port.
  for i in $(seq 1 150); do
    if ! kill -0 "$CH_PID" 2>/dev/null; then
      echo "clickhouse-server exited:" >&2; tail -n 5 "$d/err.txt" >&2; exit 1
    fi
    [ "$(curl -s "http://127.0.0.1:$CH_HTTP/" --data-binary "select data_path from system.databases where name = 'default'")" = "$d/data/data/default/" ] && return 0
    sleep 0.2
  done
  echo "clickhouse-server did not answer on port $CH_HTTP within 30 s" >&2
  exit 1
}

stop_bench_clickhouse() {
  local i
  [ -n "${CH_PID:-}" ] || return 0
  kill "$CH_PID" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$CH_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$CH_PID" 2>/dev/null || true
  wait "$CH_PID" 2>/dev/null || true
  CH_PID=""
}

psql() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }
pgbench() { "$BIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }
ch() { clickhouse-client --host 127.0.0.1 --port "$CH_TCP" "$@"; }

# The bench's source: databases src and dwh, and in src an orders-like table of $1 rows
# (integers, numeric, a jsonb payload, timestamps) with an (updated_at, id) index.
bench_orders() {
  psql -d postgres -c "create database src" -c "create database dwh"
  echo "generating $1 orders-like rows..."
  psql -d src <<SQL
create table orders (
    id bigint primary key,
    customer_id integer not null,
    status integer not null,
    quantity integer not null,
    amount numeric(12, 2) not null,
    payload jsonb not null,
    created_at timestamptz not null,
    updated_at timestamptz not null
);
insert into orders
select g, 1 + g % 50000, 1 + g % 4, 1 + g % 7, round((g % 100000) / 7.0, 2),
       jsonb_build_object('meta', jsonb_build_object('channel', (array['web','app','phone'])[1 + g % 3], 'campaign', 'c' || g % 100),
                          'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || g % 1000, 'qty', 1 + g % 5))),
       timestamptz '2025-01-01' + make_interval(secs => g), timestamptz '2025-01-01' + make_interval(secs => g)
from generate_series(1, $1) g;
create index on orders (updated_at, id);
vacuum analyze orders;
SQL
  # As autovacuum leaves a table: its pages marked all-visible, which a vacuum right after the
  # insert does not do yet. BENCH_FRESH=1 leaves the table as just loaded.
  if [ -z "${BENCH_FRESH:-}" ]; then
    sleep 1
    psql -d src -c "vacuum orders" >/dev/null
  fi
}

# pgtide.toml for the bench cluster in directory $1 (sources.src and the dwh database).
bench_config() {
  mkdir -p "$1/jobs"
  cat > "$1/pgtide.toml" <<TOML
[sources.src]
url = "postgres://postgres@127.0.0.1:$PORT/src"
[dwh]
url = "postgres://postgres@127.0.0.1:$PORT/dwh"
TOML
}

# The [[column]] tables of a job taking every orders column (as `o`) as it is.
bench_columns() {
  local c
  for c in id customer_id status quantity amount payload created_at updated_at; do
    printf '[[column]]\nname = "%s"\nfrom = "o.%s"\n' "$c" "$c"
  done
}

# The bench's job `plain` in $1/jobs, with batch_size $2: every column as it is, into
# orders_pgtide.
bench_plain_job() {
  printf 'interval_secs = 60\nbatch_size = %s\ntarget = "orders_pgtide"\nkey = ["id"]\n[from]\ntable = "public.orders"\nas = "o"\n%s\n' "$2" "$(bench_columns)" > "$1/jobs/plain.toml"
}

# The bench's two jobs in $1/jobs, with batch_size $2: `plain` (bench_plain_job) and `mapped` (a
# value map and two JSON fields, into orders_mapped).
bench_jobs() {
  bench_plain_job "$1" "$2"
  cat > "$1/jobs/mapped.toml" <<TOML
interval_secs = 60
batch_size = $2
target = "orders_mapped"
key = ["id"]
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
name = "status_label"
from = "o.status"
map = { "1" = "created", "2" = "processing", "3" = "done" }
map_default = "other"
[[column]]
name = "amount"
from = "o.amount"
[[column]]
name = "channel"
from = "o.payload"
json = "meta.channel"
type = "text"
[[column]]
name = "first_qty"
from = "o.payload"
json = "items.0.qty"
type = "integer"
[[column]]
name = "updated_at"
from = "o.updated_at"
TOML
}

# bench_measure NAME EXPECTED_EXIT STDOUT_FILE COMMAND...: runs COMMAND under /usr/bin/time -v,
# its stdout into STDOUT_FILE, and appends "NAME seconds peak_kib" to $WORK/results; exits if
# COMMAND does not exit with EXPECTED_EXIT.
bench_measure() {
  local name=$1 want=$2 out=$3 t0 t1 code
  shift 3
  t0=$(date +%s.%N)
  set +e
  /usr/bin/time -v -o "$WORK/time" "$@" >"$out" 2>"$WORK/stderr"
  code=$?
  set -e
  t1=$(date +%s.%N)
  if [ "$code" != "$want" ]; then
    echo "$name exited $code, expected $want" >&2
    cat "$WORK/stderr" >&2
    exit 1
  fi
  echo "$name $(python3 -c "print($t1 - $t0)") $(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time")" >>"$WORK/results"
}

# Starts $WORK/results with `copy`, the baseline: src's orders read once by COPY (binary), after
# a first read so that both see a warm cache.
bench_copy_baseline() {
  local copy="copy (select * from orders) to stdout (format binary)"
  : >"$WORK/results"
  "$BIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d src -c "$copy" >/dev/null
  bench_measure copy 0 /dev/null "$BIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d src -c "$copy"
}

# The daily path (scripts/bench-daily.sh, scripts/bench.sh), after bench_orders and
# bench_config in $WORK/cfg.
DAILY_COLS="id, customer_id, status, quantity, amount, payload, created_at, updated_at"

# Job $1 in $2/jobs: every orders column into table $1, the (updated_at, id) watermark, and
# default settings but for the extra lines $3 (e.g. "parallel = 4").
daily_job() {
  printf 'interval_secs = 60\n%s\ntarget = "%s"\nkey = ["id"]\nwatermark = ["updated_at", "id"]\n[from]\ntable = "public.orders"\nas = "o"\n%s\n' \
    "${3:-}" "$1" "$(bench_columns)" > "$2/jobs/$1.toml"
}

# After pgtide loaded table $1 (its job of the same name), orders_script and orders_merge are
# copies of it for the hand-written script (with insert ... on conflict, and with merge), whose
# watermark lives in the DWH table daily_marks; then the server restarts. $WORK/byhand.sh
# TABLE insert|merge is that script.
daily_setup() {
  local last c sets="" values=""
  last=$(psql -d src -Atc "select quote_literal(updated_at) || ', ' || id from orders order by updated_at desc, id desc limit 1")
  psql -d dwh <<SQL
create table orders_script (like $1 including all);
insert into orders_script select * from $1;
create table orders_merge (like $1 including all);
insert into orders_merge select * from $1;
create table daily_marks (name text primary key, updated_at timestamptz not null, id bigint not null);
insert into daily_marks values ('orders_script', $last), ('orders_merge', $last);
vacuum analyze;
SQL
  # The copies were just written through shared buffers, pgtide's table long before: a restart
  # starts the three alike (every page in the OS's cache, none in the server's).
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -m fast -w restart >/dev/null
  for c in customer_id status quantity amount payload created_at updated_at; do
    sets+="$c = s.$c, "
  done
  for c in id customer_id status quantity amount payload created_at updated_at; do
    values+="s.$c, "
  done
  cat > "$WORK/byhand.sh" <<SH
#!/usr/bin/env bash
# The hand-written daily load: rows past the DWH's watermark, staged and upserted (or merged)
# in one DWH transaction that also moves the watermark.
set -euo pipefail
psql() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $PORT -U postgres "\$@"; }
table=\$1
last=\$(psql -d dwh -Atc "select quote_literal(updated_at) || ', ' || id from daily_marks where name = '\$table'")
if [ "\$2" = merge ]; then
  apply="merge into \$table t using stage s on t.id = s.id
         when matched then update set ${sets}_pgtide_loaded_at = now()
         when not matched then insert ($DAILY_COLS) values (${values%, })"
else
  apply="insert into \$table as t ($DAILY_COLS) select $DAILY_COLS from stage s
         on conflict (id) do update set ${sets//s./excluded.}_pgtide_loaded_at = now()"
fi
psql -d src -c "copy (select $DAILY_COLS from orders where (updated_at, id) > (\$last)) to stdout (format binary)" \\
  | psql -d dwh -1 \\
      -c "create temp table stage (like \$table including defaults) on commit drop" \\
      -c "copy stage ($DAILY_COLS) from stdin (format binary)" \\
      -c "\$apply" \\
      -c "update daily_marks m set updated_at = l.updated_at, id = l.id
          from (select updated_at, id from stage order by updated_at desc, id desc limit 1) l
          where m.name = '\$table'"
SH
  chmod +x "$WORK/byhand.sh"
}

# Round $1 of the daily changes on the source: NEW (100,000) rows inserted, UPDATED (10,000)
# existing rows updated, all with timestamps past every earlier round's; the updates' are
# spread among the inserts', so most batches hold both.
daily_changes() {
  local new=${NEW:-100000} updated=${UPDATED:-10000}
  local base=$((ROWS + ($1 - 1) * new)) every=$((ROWS / updated))
  psql -d src <<SQL
insert into orders
select g, 1 + g % 50000, 1 + g % 4, 1 + g % 7, round((g % 100000) / 7.0, 2),
       jsonb_build_object('meta', jsonb_build_object('channel', (array['web','app','phone'])[1 + g % 3], 'campaign', 'c' || g % 100),
                          'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || g % 1000, 'qty', 1 + g % 5))),
       now(), timestamptz '2030-01-01' + make_interval(days => $1, secs => (g - $base) / 1000.0)
from generate_series($base + 1, $base + $new) g;
update orders set status = 1 + status % 4, amount = amount + 1,
       updated_at = timestamptz '2030-01-01' + make_interval(days => $1, secs => (id * 7919 % $new) / 1000.0 + 0.0005)
where id <= $ROWS and id % $every = $1 % $every;
vacuum analyze orders;
SQL
  psql -d src -c checkpoint >/dev/null
  psql -d dwh -c checkpoint >/dev/null
}

# Round $2: pgtide $1 run-once of job $3, the script with insert ... on conflict and with merge,
# in an order that rotates with the round, each after a checkpoint; "round name seconds
# peak_kib" lines go to $WORK/daily.tsv.
daily_round() {
  local i name t0 t1 order=(pgtide script merge)
  for i in 0 1 2; do
    name=${order[$(( (i + $2) % 3 ))]}
    psql -d dwh -c checkpoint >/dev/null
    t0=$(date +%s.%N)
    case $name in
      pgtide) /usr/bin/time -f %M -o "$WORK/rss" "$1" --config "$WORK/cfg/pgtide.toml" run-once "$3" >/dev/null 2>>"$WORK/pgtide.log" ;;
      script) /usr/bin/time -f %M -o "$WORK/rss" "$WORK/byhand.sh" orders_script insert ;;
      merge) /usr/bin/time -f %M -o "$WORK/rss" "$WORK/byhand.sh" orders_merge merge ;;
    esac
    t1=$(date +%s.%N)
    echo "$2 $name $(python3 -c "print($t1 - $t0)") $(tail -n 1 "$WORK/rss")" >> "$WORK/daily.tsv"
  done
}

# Table $1 (pgtide's) and the script's tables hold exactly the source's rows.
daily_check() {
  local q="select count(*) || ' ' || md5(string_agg(row($DAILY_COLS)::text, ',' order by id))"
  local want got t
  want=$(psql -d src -Atc "$q from orders")
  for t in "$1" orders_script orders_merge; do
    got=$(psql -d dwh -Atc "$q from $t")
    [ "$got" = "$want" ] || { echo "$t differs from the source: $got, expected $want" >&2; exit 1; }
  done
}

# The daily rounds of $WORK/daily.tsv: seconds per round, the median, peak RSS, and pgtide's
# time as a share of the script's and of merge's in each round.
daily_report() {
  python3 - "$WORK/daily.tsv" "$ROWS" "${NEW:-100000}" "${UPDATED:-10000}" <<'PY'
import statistics, sys
runs = [l.split() for l in open(sys.argv[1])]
rows, new, updated = sys.argv[2:5]
print(f"\ndaily path: {rows} rows loaded by pgtide, then per round {new} new and {updated} updated rows")
label = {"pgtide": "pgtide run-once", "script": "script, insert ... on conflict", "merge": "script, merge"}
rounds = sorted({int(r[0]) for r in runs})
print(f"{'':32} " + " ".join(f"{'round ' + str(r):>8}" for r in rounds) + f" {'median':>8} {'peak RSS':>10}")
secs = {}
for n in label:
    secs[n] = {int(r[0]): float(r[2]) for r in runs if r[1] == n}
    rss = max(int(r[3]) for r in runs if r[1] == n)
    med = statistics.median(secs[n].values())
    print(f"{label[n]:32} " + " ".join(f"{secs[n][r]:7.3f}s" for r in rounds) + f" {med:7.3f}s {rss / 1024:6.1f} MiB")
for other in ("script", "merge"):
    print(f"pgtide / {other}, per round: " + ", ".join(f"{secs['pgtide'][r] / secs[other][r]:.2f}" for r in rounds))
PY
}
