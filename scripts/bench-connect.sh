#!/usr/bin/env bash
# What TLS costs a connection: N runs (default 50) of `pgtide check` on a one-table job (each
# run is a process that connects to the source and to the DWH, as `run-once` from a timer does)
# against a throwaway server with TLS on, with sslmode=disable, require and verify-full, and the
# same for libpq (`psql -c 'select 1'`) as a yardstick. Prints ms per run and the ratio to the
# plain connection. N=... changes the count.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_postgres
ensure_openssl
N=${N:-50}
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide

start_bench_cluster ""
trap stop_bench_cluster EXIT
work=$WORK

# A CA and a server certificate for localhost / 127.0.0.1, then TLS on (a reload is enough).
(
  cd "$work"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt \
    -days 2 -subj "/CN=pgtide bench ca" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.csr \
    -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 \
    -extfile server.ext 2>/dev/null
  chmod 600 server.key
  if [ "$(id -u)" -eq 0 ]; then chown postgres: server.key server.crt; fi
)
psql -d postgres -c "alter system set ssl = on" \
  -c "alter system set ssl_cert_file = '$work/server.crt'" \
  -c "alter system set ssl_key_file = '$work/server.key'" -c "select pg_reload_conf()" >/dev/null
psql -d postgres -c "create database src" -c "create database dwh" >/dev/null
psql -d src -c "create table t (id int primary key, v text)" >/dev/null

mkdir -p "$work/cfg/jobs"
printf 'interval_secs = 60\nkey = ["id"]\n[from]\ntable = "t"\n[[column]]\nname = "id"\nfrom = "t.id"\n' \
  > "$work/cfg/jobs/t.toml"
config() {
  cat > "$work/cfg/pgtide.toml" <<TOML
state_path = "state/pgtide.db"
[sources.src]
url = "postgres://postgres@localhost:$PORT/src?$1"
[dwh]
url = "postgres://postgres@localhost:$PORT/dwh?$1"
TOML
}

now() { date +%s.%N; }
per_run_ms() { python3 -c "print(f'{($2 - $1) * 1000 / $N:.1f}')"; }

declare -A ms
for mode in disable require verify-full; do
  q="sslmode=$mode"
  [ "$mode" = verify-full ] && q="$q&sslrootcert=$work/ca.crt"
  config "$q"
  "$PGTIDE" --config "$work/cfg/pgtide.toml" check >/dev/null   # warm up, and fail early
  start=$(now)
  for _ in $(seq "$N"); do "$PGTIDE" --config "$work/cfg/pgtide.toml" check >/dev/null; done
  ms[pgtide-$mode]=$(per_run_ms "$start" "$(now)")
  start=$(now)
  for _ in $(seq "$N"); do
    "$BIN/psql" -X -q "postgres://postgres@localhost:$PORT/src?$q" -c 'select 1' >/dev/null
  done
  ms[psql-$mode]=$(per_run_ms "$start" "$(now)")
done

echo "$N runs each, ms per run (ratio to sslmode=disable):"
for tool in pgtide psql; do
  base=${ms[$tool-disable]}
  for mode in disable require verify-full; do
    v=${ms[$tool-$mode]}
    python3 -c "print(f'  {\"$tool\":7} {\"$mode\":12} {$v:7.1f} ms   x{$v / $base:.2f}')"
  done
done
echo "(pgtide check connects twice per run, to the source and to the DWH, and reads the catalog)"
