-- The sample shop that `pgtide demo` fills: customers, and orders with a jsonb payload.
create table customers (
    id bigserial primary key,
    name text not null,
    email text,
    country char(2),
    created_at timestamptz not null default now()
);

create table orders (
    id bigserial primary key,
    customer_id bigint references customers (id),
    status integer not null,
    amount numeric(12, 2) not null,
    payload jsonb not null default '{}',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
-- The orders job reads past (updated_at, id): this index makes each batch a range scan.
create index orders_updated_at_id on orders (updated_at, id);

insert into customers (name, email, country)
select 'customer ' || g, 'c' || g || '@example.com', (array['DE', 'FR', 'US', 'JP'])[1 + g % 4]
from generate_series(1, 500) g;

insert into orders (customer_id, status, amount, payload, created_at, updated_at)
select 1 + g % 500,
       1 + g % 4,
       round((g % 997) * 1.37, 2),
       jsonb_build_object(
           'meta', jsonb_build_object('channel', (array['web', 'app', 'phone'])[1 + g % 3]),
           'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (g % 50), 'qty', 1 + g % 3))),
       now() - make_interval(secs => 20000 - g),
       now() - make_interval(secs => 20000 - g)
from generate_series(1, 20000) g;
