-- What a poll job runs on the source: read-only, one short transaction per batch.
-- Privileges it needs: connect, usage on the schemas, select on the tables of the view.
-- Values ($1, settings) are always bound parameters, never spliced into the SQL text.

begin transaction isolation level repeatable read, read only;

-- 1. The snapshot this batch is read in (kept to find late commits, see below).
select pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text, array(select pg_snapshot_xip(s)::text)
from (select pg_current_snapshot() as s) x;

-- 2. The last cursor value of the next batch (keyset pagination on the main table;
--    an index on the watermark columns makes this a short index scan).
select c0::text as t0, c1::text as t1
from (select o.updated_at as c0, o.id as c1 from public.orders as o
      where (o.updated_at, o.id) > ($1::text::timestamptz, $2::text::bigint)
      order by c0, c1 limit $3) b
order by c0 desc, c1 desc limit 1;

-- 3. The view rows of the batch, streamed to the DWH as binary COPY. COPY takes no
--    parameters, so the bounds travel as transaction-local settings set with bound values.
select count(set_config(k, v, true)) from unnest($1::text[], $2::text[]) as s(k, v);
copy (
    select o.id, c.name, current_setting('pgtide.map3')::jsonb ->> (o.status)::text, ...
    from public.orders as o left join public.customers as c on o.customer_id = c.id
    where (o.updated_at, o.id) >  (current_setting('pgtide.blo0')::timestamptz, current_setting('pgtide.blo1')::bigint)
      and (o.updated_at, o.id) <= (current_setting('pgtide.bhi0')::timestamptz, current_setting('pgtide.bhi1')::bigint)
) to stdout (format binary);

commit;

-- 4. Late commits. A transaction that wrote a row below the watermark but committed after the
--    batch was read was in progress in that batch's snapshot (or had no transaction id yet).
--    Later runs re-read exactly those rows, by the system column xmin:
copy (
    select ... from public.orders as o ...
    where (o.updated_at, o.id) > (...lo...) and (o.updated_at, o.id) <= (...hi...)
      and (o.xmin = any(current_setting('pgtide.w0xip')::xid[])          -- in progress then
           or age(o.xmin) <= age(current_setting('pgtide.w0xmax')::xid)) -- started after
) to stdout (format binary);
