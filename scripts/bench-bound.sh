#!/usr/bin/env bash
# What a watermark without a fitting index costs per batch: the bound query every batch runs
# (view::sql::batch_bound, `order by <cursor> limit batch_size` past the last bound) walked
# over a whole 1,000,000-row orders table (ROWS=... changes it, BATCH=... the batch size) on
# an (updated_at, id) watermark, with an index on (updated_at, id), on updated_at alone, on
# updated_at alone where rows share their updated_at (86,400 per value, as after a bulk
# update), and with no index. Each bound is planned afresh, as pgtide's are. Prints ms per
# batch for each.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_postgres
ROWS=${ROWS:-1000000}
BATCH=${BATCH:-10000}

start_bench_cluster "-c shared_buffers=512MB -c max_wal_size=8GB -c synchronous_commit=off"
trap stop_bench_cluster EXIT

bench_orders "$ROWS" >/dev/null

# One walk over the table, bound after bound, as pgtide's batches go (same query shape as
# view::sql::batch_bound with a lower bound); the first bound starts below every row.
walk() { # label
  psql -d src -c "vacuum analyze orders" -c "
do \$\$
declare
  lo_u timestamptz := '-infinity';
  lo_id bigint := 0;
  u timestamptz;
  i bigint;
  n int := 0;
  t0 timestamptz := clock_timestamp();
begin
  loop
    execute 'select c0, c1 from (select o.updated_at as c0, o.id as c1 from public.orders as o
             where (o.updated_at, o.id) > (\$1, \$2) order by c0, c1 limit \$3) b
             order by c0 desc, c1 desc limit 1'
      into u, i using lo_u, lo_id, $BATCH;
    exit when u is null;
    lo_u := u;
    lo_id := i;
    n := n + 1;
  end loop;
  raise notice '%: % batches, % ms per batch', '$1', n,
    round((extract(epoch from clock_timestamp() - t0) * 1000 / n)::numeric, 2);
end
\$\$" 2>&1 | sed -n 's/^.*NOTICE:  //p'
}

walk "index on (updated_at, id)"
psql -d src -c "drop index orders_updated_at_id_idx" -c "create index orders_updated_at_idx on orders (updated_at)"
walk "index on (updated_at)"
psql -d src -c "update orders set updated_at = date_trunc('day', updated_at)"
walk "index on (updated_at), 86,400 rows per updated_at"
psql -d src -c "drop index orders_updated_at_idx"
walk "no index"
