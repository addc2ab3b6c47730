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
  local d
  for d in /tmp/pgtide-pg-*/data; do
    [ -f "$d/postmaster.pid" ] || continue
    if [ "$(id -u)" -eq 0 ]; then
      runuser -u postgres -- "$(pg_bindir)/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
    else
      "$(pg_bindir)/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$(dirname "$d")"
  done
}
