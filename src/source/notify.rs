//! The source side of notify jobs: the event table and triggers pgtide installs, and taking
//! events out of the table.
//!
//! Row triggers on the main table and on every joined table write what identifies the view
//! rows a change affects (the key, or the join columns; old and new values when an update
//! changes them) into the job's event table, with the transaction id. A statement trigger
//! sends one NOTIFY per statement with a constant payload, and records TRUNCATE. The event
//! table is the truth; the NOTIFY only wakes pgtide up.

use std::collections::BTreeSet;

use tokio_postgres::{Client, Transaction};

use crate::config::names::{self, channel, trigger_prefix};
use crate::pg::{quote_ident, quote_qualified};
use crate::view::View;

/// Schema of pgtide's objects in the source.
pub use crate::config::names::SCHEMA;

/// The job's event table, quoted.
pub fn event_table(job: &str) -> String {
    quote_qualified(SCHEMA, &names::event_table(job))
}

/// The DDL `install` runs, in one transaction: readable, idempotent, and keeping the events
/// already recorded.
pub fn install_sql(view: &View) -> String {
    let job = &view.job.name;
    let events = event_table(job);
    let mut sql = format!(
        "-- pgtide notify job {job}: what changed in the tables of its view.
create schema if not exists {schema};

create table if not exists {events} (
    id bigint generated always as identity primary key,
    xid xid8 not null default pg_current_xact_id(),
    at timestamptz not null default clock_timestamp(),   -- for the age of the oldest event only
    source smallint not null,                            -- which table: 0 is the main table
    op \"char\" not null,                                  -- I, U, D, or T (truncate)
    old_values text[],                                   -- key or join columns before the change
    new_values text[]                                    -- and after
);

-- One NOTIFY per statement, with a constant payload; TRUNCATE is recorded here too.
create or replace function {schema}.{notify}() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $pgtide$
begin
    if tg_op = 'TRUNCATE' then
        insert into {events} (source, op) values (tg_argv[0]::smallint, 'T');
    end if;
    perform pg_notify('{channel}', '');
    return null;
end
$pgtide$;
",
        schema = quote_ident(SCHEMA),
        notify = quote_ident(&names::notify_function(job)),
        channel = channel(job),
    );
    for (i, (table, cap)) in view.job.tables().zip(&view.captured).enumerate() {
        let func = quote_ident(&names::capture_function(job, i));
        let list = |rec: &str| {
            let vals: Vec<String> = cap
                .columns
                .iter()
                .map(|c| format!("{rec}.{}::text", quote_ident(c)))
                .collect();
            format!("array[{}]", vals.join(", "))
        };
        let row = |rec: &str| {
            let vals: Vec<String> = cap
                .columns
                .iter()
                .map(|c| format!("{rec}.{}", quote_ident(c)))
                .collect();
            format!("({})", vals.join(", "))
        };
        let target = quote_qualified(&table.name.schema, &table.name.name);
        sql.push_str(&format!(
            "
-- {target} as {alias}: records ({cols}).
create or replace function {schema}.{func}() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $pgtide$
begin
    if tg_op = 'INSERT' then
        insert into {events} (source, op, new_values) values ({i}, 'I', {new});
    elsif tg_op = 'DELETE' then
        insert into {events} (source, op, old_values) values ({i}, 'D', {old});
    elsif {old_row} is distinct from {new_row} then
        insert into {events} (source, op, old_values, new_values) values ({i}, 'U', {old}, {new});
    else
        insert into {events} (source, op, new_values) values ({i}, 'U', {new});
    end if;
    return null;
end
$pgtide$;
drop trigger if exists {row_trigger} on {target};
create trigger {row_trigger} after insert or update or delete on {target}
    for each row execute function {schema}.{func}();
drop trigger if exists {stmt_trigger} on {target};
create trigger {stmt_trigger} after insert or update or delete or truncate on {target}
    for each statement execute function {schema}.{notify}('{i}');
",
            alias = table.alias,
            cols = cap.columns.join(", "),
            schema = quote_ident(SCHEMA),
            notify = quote_ident(&names::notify_function(job)),
            new = list("new"),
            old = list("old"),
            old_row = row("old"),
            new_row = row("new"),
            row_trigger = quote_ident(&names::row_trigger(job, i)),
            stmt_trigger = quote_ident(&names::statement_trigger(job, i)),
        ));
    }
    sql
}

/// Create the event table and triggers, replacing triggers of an earlier install (also on
/// tables the job no longer reads), in one transaction.
pub async fn install(client: &mut Client, view: &View) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    drop_triggers(&tx, &view.job.name).await?;
    tx.batch_execute(&install_sql(view)).await?;
    tx.commit().await
}

/// Drop everything `install` created, events included, in one transaction; the schema goes
/// too when nothing else is left in it.
pub async fn uninstall(client: &mut Client, job: &str) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    drop_triggers(&tx, job).await?;
    let schema = quote_ident(SCHEMA);
    tx.batch_execute(&format!(
        "drop table if exists {events};
         drop function if exists {schema}.{notify}();",
        events = event_table(job),
        notify = quote_ident(&names::notify_function(job)),
    ))
    .await?;
    let funcs = tx
        .query(
            "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where n.nspname = $1 and p.proname like $2",
            &[&SCHEMA, &format!("{job}\\_capture\\_%")],
        )
        .await?;
    for f in funcs {
        let name: String = f.get(0);
        tx.batch_execute(&format!(
            "drop function if exists {schema}.{}()",
            quote_ident(&name)
        ))
        .await?;
    }
    let left: i64 = tx
        .query_one(
            "select (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = $1)
                  + (select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = $1)
                  + (select count(*) from pg_type t join pg_namespace n on n.oid = t.typnamespace where n.nspname = $1)",
            &[&SCHEMA],
        )
        .await?
        .get(0);
    if left == 0 {
        tx.batch_execute(&format!("drop schema if exists {schema}"))
            .await?;
    }
    tx.commit().await
}

async fn drop_triggers(tx: &Transaction<'_>, job: &str) -> Result<(), tokio_postgres::Error> {
    let rows = tx
        .query(
            "select tgname, c.relname, n.nspname from pg_trigger t
             join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
             where not t.tgisinternal and t.tgname like $1",
            &[&format!("{}%", trigger_prefix(job).replace('_', "\\_"))],
        )
        .await?;
    for r in rows {
        let (name, table, schema): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        tx.batch_execute(&format!(
            "drop trigger if exists {} on {}",
            quote_ident(&name),
            quote_qualified(&schema, &table)
        ))
        .await?;
    }
    Ok(())
}

/// Whether the job's event table and every trigger of its current tables exist.
pub async fn installed(client: &Client, view: &View) -> Result<bool, tokio_postgres::Error> {
    let job = &view.job.name;
    let row = client
        .query_one(
            "select to_regclass($1) is not null,
                    (select count(*) from pg_trigger where not tgisinternal and tgname like $2)",
            &[
                &format!(
                    "{}.{}",
                    quote_ident(SCHEMA),
                    quote_ident(&names::event_table(job))
                ),
                &format!("{}%", trigger_prefix(job).replace('_', "\\_")),
            ],
        )
        .await?;
    let (table, triggers): (bool, i64) = (row.get(0), row.get(1));
    Ok(table && triggers as usize == 2 * view.captured.len())
}

/// Events waiting, and the age in seconds of the oldest.
pub async fn waiting(
    client: &Client,
    job: &str,
) -> Result<(i64, Option<f64>), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "select count(*), extract(epoch from clock_timestamp() - min(at))::float8 from {}",
                event_table(job)
            ),
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// What the listening connection reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// A NOTIFY on the job's channel: events are waiting.
    Notified,
    /// The connection is gone (terminated, network, server restart).
    Lost(String),
}

/// A dedicated, idle connection that LISTENs on a job's channel.
pub struct Listener {
    client: Client,
    pub wakes: tokio::sync::mpsc::UnboundedReceiver<Wake>,
}

impl Listener {
    /// Connect and LISTEN. Notifications arrive on `wakes`; so does the loss of the connection.
    pub async fn start(url: &str, job: &str, what: &str) -> Result<Listener, crate::pg::PgError> {
        use futures_util::StreamExt;
        let (client, mut connection) =
            crate::pg::connect_raw(url, &format!("pgtide:{job}:listen"), what).await?;
        let (tx, wakes) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            let why = loop {
                match messages.next().await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                        if tx.send(Wake::Notified).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break crate::pg::message(&e),
                    None => break "connection closed".to_string(),
                };
            };
            let _ = tx.send(Wake::Lost(why));
        });
        client
            .batch_execute(&format!("listen {}", quote_ident(&channel(job))))
            .await
            .map_err(|source| crate::pg::PgError::Connect {
                what: what.to_string(),
                target: crate::pg::describe(url),
                source,
            })?;
        Ok(Listener { client, wakes })
    }

    /// A round trip on the listening connection, to notice a dead socket that sends nothing.
    pub async fn ping(&self) -> Result<(), PingError> {
        match tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.client.simple_query(""),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(PingError::Failed(e)),
            Err(_) => Err(PingError::Timeout),
        }
    }
}

/// Why the listening connection failed its round trip.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error("{}", crate::pg::message(.0))]
    Failed(#[source] tokio_postgres::Error),
    #[error("no answer within 10 s")]
    Timeout,
}

/// What a batch of events says changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Events taken.
    pub events: usize,
    /// A table of the view was truncated: every view row may have changed.
    pub truncated: bool,
    /// Per table of the view (main first), the distinct values its trigger recorded.
    pub values: Vec<BTreeSet<Vec<Option<String>>>>,
}

/// Take up to `limit` events (oldest first, skipping those another session holds) in `tx`;
/// they are gone when `tx` commits, and back if it does not.
pub async fn take(
    tx: &Transaction<'_>,
    view: &View,
    limit: i64,
) -> Result<Changes, tokio_postgres::Error> {
    let events = event_table(&view.job.name);
    let rows = tx
        .query(
            &format!(
                "delete from {events} where id in (select id from {events} order by id limit $1 for update skip locked)
                 returning source, op, old_values, new_values"
            ),
            &[&limit],
        )
        .await?;
    let mut changes = Changes {
        events: rows.len(),
        truncated: false,
        values: vec![BTreeSet::new(); view.captured.len()],
    };
    for r in rows {
        let source: i16 = r.get(0);
        let op: i8 = r.get(1);
        if op as u8 == b'T' {
            changes.truncated = true;
            continue;
        }
        let Some(set) = changes.values.get_mut(source as usize) else {
            continue;
        };
        for col in [2, 3] {
            if let Some(v) = r.get::<_, Option<Vec<Option<String>>>>(col) {
                set.insert(v);
            }
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_per_job() {
        assert_eq!(event_table("orders"), "\"pgtide\".\"orders_events\"");
        assert_eq!(channel("orders"), "pgtide_orders");
    }

    #[test]
    fn object_names_lists_every_name_install_creates() {
        let text = r#"
            mode = "notify"
            key = ["id"]
            [from]
            table = "orders"
            as = "o"
            [[join]]
            table = "customers"
            as = "c"
            on = { "o.customer_id" = "c.id" }
            [[column]]
            name = "id"
            from = "o.id"
        "#;
        let sources = [("s".to_string(), "postgres://x@y/z".to_string())].into();
        let file = std::path::Path::new("jobs/shop.toml");
        let mut p = crate::config::Problems::new(file);
        let job =
            crate::config::parse_job(file, text, &sources, "public", Default::default(), &mut p)
                .expect("valid");
        let captured = |alias: &str, column: &str| crate::view::Captured {
            alias: alias.into(),
            columns: vec![column.into()],
            matches: vec![(column.into(), "bigint".into())],
        };
        let view = View {
            job: std::sync::Arc::new(job),
            columns: vec![],
            cursor: vec![],
            settings: vec![],
            checks: vec![],
            captured: vec![captured("o", "id"), captured("c", "id")],
        };
        let sql = install_sql(&view);
        let names = names::all("shop", 2);
        assert_eq!(names.len(), 9);
        for name in names {
            assert!(
                sql.contains(&quote_ident(&name)) || sql.contains(&format!("'{name}'")),
                "{name} is not in:\n{sql}"
            );
        }
    }
}
