-- What `pgtide install` creates in the source for a notify job, as printed by `pgtide sql JOB`
-- for this job (orders joined with customers, key order_id):
--
--   mode = "notify"
--   key = ["order_id"]
--   [from]  table = "public.orders", as = "o"
--   [[join]] table = "public.customers", as = "c", type = "left", on = { "o.customer_id" = "c.id" }
--
-- install runs it in one transaction (after dropping triggers of an earlier install), so it
-- is idempotent and keeps events already recorded; uninstall drops the triggers, functions and
-- event table, and the schema when nothing else is left in it.
--
-- Privileges: install needs to own the tables (or be superuser); the trigger functions are
-- security definer, so the application's role needs nothing new.
-- Caveats: a transaction that sent NOTIFY cannot PREPARE TRANSACTION; and sessions with
-- session_replication_role = replica (logical replication apply, some restore tools) skip
-- these triggers, so their changes are not seen until the next full reload (reset).

-- pgtide notify job orders_live: what changed in the tables of its view.
create schema if not exists "pgtide";

create table if not exists "pgtide"."orders_live_events" (
    id bigint generated always as identity primary key,
    xid xid8 not null default pg_current_xact_id(),
    at timestamptz not null default clock_timestamp(),   -- for the age of the oldest event only
    source smallint not null,                            -- which table: 0 is the main table
    op "char" not null,                                  -- I, U, D, or T (truncate)
    old_values text[],                                   -- key or join columns before the change
    new_values text[]                                    -- and after
);

-- One NOTIFY per statement, with a constant payload; TRUNCATE is recorded here too.
create or replace function "pgtide"."orders_live_notify"() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $pgtide$
begin
    if tg_op = 'TRUNCATE' then
        insert into "pgtide"."orders_live_events" (source, op) values (tg_argv[0]::smallint, 'T');
    end if;
    perform pg_notify('pgtide_orders_live', '');
    return null;
end
$pgtide$;

-- "public"."orders" as o: records (id).
create or replace function "pgtide"."orders_live_capture_0"() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $pgtide$
begin
    if tg_op = 'INSERT' then
        insert into "pgtide"."orders_live_events" (source, op, new_values) values (0, 'I', array[new."id"::text]);
    elsif tg_op = 'DELETE' then
        insert into "pgtide"."orders_live_events" (source, op, old_values) values (0, 'D', array[old."id"::text]);
    elsif (old."id") is distinct from (new."id") then
        insert into "pgtide"."orders_live_events" (source, op, old_values, new_values) values (0, 'U', array[old."id"::text], array[new."id"::text]);
    else
        insert into "pgtide"."orders_live_events" (source, op, new_values) values (0, 'U', array[new."id"::text]);
    end if;
    return null;
end
$pgtide$;
drop trigger if exists "pgtide_orders_live_0_row" on "public"."orders";
create trigger "pgtide_orders_live_0_row" after insert or update or delete on "public"."orders"
    for each row execute function "pgtide"."orders_live_capture_0"();
drop trigger if exists "pgtide_orders_live_0_stmt" on "public"."orders";
create trigger "pgtide_orders_live_0_stmt" after insert or update or delete or truncate on "public"."orders"
    for each statement execute function "pgtide"."orders_live_notify"('0');

-- "public"."customers" as c: records (id).
create or replace function "pgtide"."orders_live_capture_1"() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $pgtide$
begin
    if tg_op = 'INSERT' then
        insert into "pgtide"."orders_live_events" (source, op, new_values) values (1, 'I', array[new."id"::text]);
    elsif tg_op = 'DELETE' then
        insert into "pgtide"."orders_live_events" (source, op, old_values) values (1, 'D', array[old."id"::text]);
    elsif (old."id") is distinct from (new."id") then
        insert into "pgtide"."orders_live_events" (source, op, old_values, new_values) values (1, 'U', array[old."id"::text], array[new."id"::text]);
    else
        insert into "pgtide"."orders_live_events" (source, op, new_values) values (1, 'U', array[new."id"::text]);
    end if;
    return null;
end
$pgtide$;
drop trigger if exists "pgtide_orders_live_1_row" on "public"."customers";
create trigger "pgtide_orders_live_1_row" after insert or update or delete on "public"."customers"
    for each row execute function "pgtide"."orders_live_capture_1"();
drop trigger if exists "pgtide_orders_live_1_stmt" on "public"."customers";
create trigger "pgtide_orders_live_1_stmt" after insert or update or delete or truncate on "public"."customers"
    for each statement execute function "pgtide"."orders_live_notify"('1');
