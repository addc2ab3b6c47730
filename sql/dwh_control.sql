-- What pgtide creates in the DWH, besides your target tables.
--
-- pgtide.positions holds each job's position, written in the same transaction as the rows of
-- every batch. If the local SQLite file is lost, stale, or ahead of a DWH restored from a
-- backup, pgtide continues from this row, so it neither reloads everything nor skips rows.
create schema if not exists pgtide;
create table if not exists pgtide.positions (
    job text primary key,
    position jsonb not null,   -- {"watermark": [...], "windows": [...], "seq": n}
    seq bigint not null,       -- grows with every committed batch
    updated_at timestamptz not null default now()
);

-- One run of a job at a time, across hosts: a session-level advisory lock on the DWH,
-- held for the whole run and released when the session ends.
--   select pg_try_advisory_lock(hashtextextended('pgtide job ' || 'orders', 0));
-- To see who holds it:
--   select l.pid, a.application_name, a.client_addr from pg_locks l join pg_stat_activity a using (pid)
--   where l.locktype = 'advisory';

-- A target table as pgtide creates it (job "orders_wide", key ["order_id"]):
--   create table analytics.orders_wide (
--       order_id bigint, customer_name text, ...,
--       _pgtide_loaded_at timestamptz not null default now(),   -- when the row was last written
--       primary key (order_id)
--   );

-- Each batch, in one DWH transaction:
--   copy pg_temp._pgtide_stage (order_id, ...) from stdin (format binary);   -- rows streamed from the source
--   insert into analytics.orders_wide as t (order_id, ...)
--   select order_id, ... from pg_temp._pgtide_stage
--   on conflict (order_id) do update set customer_name = excluded.customer_name, ..., _pgtide_loaded_at = now()
--   where (t.customer_name, ...) is distinct from (excluded.customer_name, ...);  -- unchanged rows are not rewritten
--   insert into pgtide.positions ... on conflict (job) do update ...;
--   commit;
