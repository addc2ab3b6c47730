//! The source side of a poll job: snapshot-consistent keyset reads streamed out as COPY.
//!
//! Each batch is one `repeatable read, read only` transaction: its first statement records
//! the snapshot (for the recheck windows of `position`), the second finds the batch's last
//! cursor value with bound parameters, and the COPY reads the view rows up to it in the same
//! snapshot. COPY takes no parameters, so the bounds travel as session settings set with
//! bound parameters and read back by `current_setting`.

pub mod checks;
pub mod indexes;
pub mod notify;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, CopyOutStream, IsolationLevel, Transaction};

use crate::position::{Horizon, Oldest, Snapshot, Unseen};
use crate::view::{resolve::settings_statement, sql, Setting, View};

/// Start a read transaction and record its snapshot, the horizon just after it, and the next
/// transaction id after that (the order `position` needs to settle a window at its read).
pub async fn begin(
    client: &mut Client,
) -> Result<(Transaction<'_>, Snapshot), tokio_postgres::Error> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // The first statement of a repeatable read transaction takes the snapshot before it runs;
    // `pg_current_snapshot()` returns it. The horizon is read while the statement runs, so
    // after it. The next id is the snapshot's xmin plus its age: `age()` counts from the next
    // id to be assigned (on a standby, past every id replayed), needs no id of its own, and
    // reads it once per transaction, at its first call: here, in a `case` that waits for the
    // horizon's rows, so after them.
    let q = format!(
        "with x as materialized (select pg_current_snapshot() as s), {HORIZON_CTES}
         select pg_snapshot_xmin(x.s)::text, pg_snapshot_xmax(x.s)::text,
                array(select pg_snapshot_xip(x.s)::text),
                case when h.hidden >= 0 and p.n >= 0
                     then age((pg_snapshot_xmin(x.s)::text::int8 % 4294967296)::text::xid)::int8 end,
                pg_is_in_recovery(),
                (extract(epoch from clock_timestamp()) * 1000000)::int8,
                {HORIZON_COLUMNS}
         from x, h, p"
    );
    let row = tx.query_one(q.as_str(), &[]).await?;
    let parse = |s: String| s.parse::<u64>().unwrap_or(0);
    let xmin = parse(row.get(0));
    let age: i64 = row.get(3);
    let recovery: bool = row.get(4);
    let snapshot = Snapshot {
        xmin,
        xmax: parse(row.get(1)),
        xip: row
            .get::<_, Vec<String>>(2)
            .into_iter()
            .map(parse)
            .collect(),
        next: xmin + age.max(0) as u64,
        recovery,
        at_us: row.get(5),
        after: Some(read_horizon(&row, 6, recovery)),
    };
    Ok((tx, snapshot))
}

/// The most transaction ids `unseen` asks the source about; with more (a transaction open
/// for a long time on a busy source), it re-reads every id from the lower bound instead.
const UNSEEN_SCAN_MAX: u64 = 200_000;

/// Which transaction ids at or above `from` a snapshot taken by `tx` could not see (see
/// [`Unseen`]). On a primary the source is asked which ids below the snapshot's `xmax` are
/// still in progress (`pg_xact_status` knows a subtransaction by its parent), and then which
/// of the snapshot's own transactions of this database have ended since: those may have had
/// subtransactions that now look committed, so the floor drops to the first of them, or to
/// `from` for one below it (its subtransactions' ids can lie anywhere above it).
pub async fn unseen(
    tx: &Transaction<'_>,
    snap: &Snapshot,
    from: u64,
) -> Result<Unseen, tokio_postgres::Error> {
    let start = from.max(snap.xmin);
    if snap.recovery {
        return Ok(Unseen {
            floor: start,
            xids: Vec::new(),
        });
    }
    if snap.xmax <= start {
        return Ok(Unseen {
            floor: start,
            xids: Vec::new(),
        });
    }
    if snap.xmax - start > UNSEEN_SCAN_MAX {
        return Ok(Unseen {
            floor: start,
            xids: Vec::new(),
        });
    }
    let running: Vec<String> = tx
        .query_one(
            "select coalesce(array_agg(x::text), '{}') from generate_series($1::int8, $2::int8 - 1) x
             where pg_xact_status(x::text::xid8) = 'in progress'",
            &[&(start as i64), &(snap.xmax as i64)],
        )
        .await?
        .get(0);
    // Transactions the horizon just after the snapshot showed running in other databases
    // wrote nothing here, subtransactions included: their ending does not lower the floor.
    let elsewhere: Vec<u64> = snap
        .after
        .iter()
        .flat_map(|h| h.elsewhere.iter().map(|x| snap.widen(*x)))
        .collect();
    let listed: Vec<String> = snap
        .xip
        .iter()
        .filter(|x| !elsewhere.contains(x))
        .map(|x| x.to_string())
        .collect();
    let ended: Vec<String> = if listed.is_empty() {
        Vec::new()
    } else {
        tx.query_one(
            "select coalesce(array_agg(x), '{}') from unnest($1::text[]) x
             where pg_xact_status(x::xid8) is distinct from 'in progress'",
            &[&listed],
        )
        .await?
        .get(0)
    };
    let parse = |v: Vec<String>| -> Vec<u64> { v.iter().filter_map(|x| x.parse().ok()).collect() };
    let floor = parse(ended)
        .into_iter()
        .map(|x| x.max(start))
        .chain([snap.xmax])
        .min()
        .unwrap_or(snap.xmax);
    let xids = parse(running).into_iter().filter(|x| *x < floor).collect();
    Ok(Unseen { floor, xids })
}

/// The horizon's part of a query: `h` (this database's sessions: how many are hidden, the
/// start of the oldest open transaction, the ids running in other databases) and `p` (the
/// prepared transactions here and elsewhere). Sessions of other roles are hidden without
/// pg_read_all_stats: backend_type, state and backend_xid read NULL for them (checked on
/// PostgreSQL 15); so is a session with `track_activities` off (state `disabled`, no
/// `xact_start`). Every process that can write counts (client backends, background workers
/// such as pg_cron's, walsenders that run SQL); autovacuum and a parallel worker (its leader
/// counts) do not. pgtide's own sessions in this database only read and are left out;
/// elsewhere they count like any. pg_prepared_xacts is read after pg_stat_activity: a
/// transaction that prepares in between is seen in one or the other.
const HORIZON_CTES: &str = "a as materialized (
         select *, datname = current_database() as here,
                datname = current_database() and application_name like 'pgtide:%' as ours
         from pg_stat_activity
         where pid <> pg_backend_pid() and datname is not null
           and (backend_type is null
                or backend_type not in ('autovacuum worker', 'autovacuum launcher',
                                        'parallel worker', 'logical replication launcher'))),
     h as materialized (
         select count(*) filter (where here and not ours
                                  and (backend_type is null or state = 'disabled')) as hidden,
                min((extract(epoch from xact_start) * 1000000)::int8) filter (where here and not ours) as oldest,
                array_agg(backend_xid::text) filter (where not here and backend_xid is not null) as elsewhere
         from a),
     p as materialized (
         select count(*) as n,
                array_agg(transaction::text) filter (where database = current_database()) as here,
                array_agg(transaction::text) filter (where database <> current_database()) as elsewhere
         from pg_prepared_xacts)";

/// The columns `read_horizon` takes, in its order.
const HORIZON_COLUMNS: &str = "h.hidden, h.oldest, h.elsewhere, p.here, p.elsewhere";

/// The horizon from `HORIZON_COLUMNS`, starting at column `at`. On a standby the sessions
/// shown are the standby's own, not the primary's writers: nothing is known there.
fn read_horizon(row: &tokio_postgres::Row, at: usize, recovery: bool) -> Horizon {
    let hidden: i64 = row.get(at);
    let oldest: Option<i64> = row.get(at + 1);
    let xids = |i: usize| -> Vec<u32> {
        row.get::<_, Option<Vec<String>>>(at + i)
            .unwrap_or_default()
            .iter()
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    let mut elsewhere = xids(2);
    elsewhere.extend(xids(4));
    Horizon {
        oldest: match (recovery, hidden, oldest) {
            (true, _, _) => Oldest::Hidden,
            (false, 0, None) => Oldest::NoneOpen,
            (false, 0, Some(t)) => Oldest::Since(t),
            _ => Oldest::Hidden,
        },
        elsewhere: if recovery { Vec::new() } else { elsewhere },
        prepared: xids(3),
    }
}

/// What `pg_stat_activity` and `pg_prepared_xacts` show about other transactions, read before
/// a recheck's snapshot is taken (so a transaction that ends in between is visible to that
/// snapshot): the start of the oldest open transaction in this database, the transactions
/// running or prepared in other databases, and the prepared transactions of this one.
pub async fn horizon(client: &Client) -> Result<Horizon, tokio_postgres::Error> {
    let q = format!("with {HORIZON_CTES} select {HORIZON_COLUMNS}, pg_is_in_recovery() from h, p");
    let row = client.query_one(q.as_str(), &[]).await?;
    Ok(read_horizon(&row, 0, row.get(5)))
}

/// The last cursor value of the next batch: the `limit`-th main-table row past `lo` (and up
/// to `hi`), else the last one there; `None` when there is none.
pub async fn batch_bound(
    tx: &Transaction<'_>,
    view: &View,
    lo: Option<&[String]>,
    hi: Option<&[String]>,
    limit: i64,
) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    if let Some(nth) = nth_cursor(tx, view, lo, hi, limit).await? {
        return Ok(Some(nth));
    }
    // Fewer rows are left than a whole batch: it ends at the last one.
    let params = bound_params(lo, hi);
    let q = sql::last_cursor(view, lo.is_some(), hi.is_some());
    let row = tx.query_opt(&q, &params).await?;
    Ok(row.map(|r| cursor_text(view, &r)))
}

/// The cursor of the `n`-th main-table row past `lo` (and up to `hi`); `None` when fewer rows
/// are there.
pub async fn nth_cursor(
    tx: &Transaction<'_>,
    view: &View,
    lo: Option<&[String]>,
    hi: Option<&[String]>,
    n: i64,
) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    let mut params = bound_params(lo, hi);
    let offset = (n - 1).max(0);
    params.push(&offset);
    let q = sql::batch_bound(view, lo.is_some(), hi.is_some());
    let row = tx.query_opt(&q, &params).await?;
    Ok(row.map(|r| cursor_text(view, &r)))
}

/// The values of the bounds given, as parameters.
fn bound_params<'a>(
    lo: Option<&'a [String]>,
    hi: Option<&'a [String]>,
) -> Vec<&'a (dyn ToSql + Sync)> {
    lo.into_iter()
        .chain(hi)
        .flatten()
        .map(|v| v as &(dyn ToSql + Sync))
        .collect()
}

/// The cursor of the newest main-table row past `lo`, `None` when there is none.
pub async fn last_cursor(
    client: &Client,
    view: &View,
    lo: Option<&[String]>,
) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    let q = sql::last_cursor(view, lo.is_some(), false);
    let row = client.query_opt(&q, &bound_params(lo, None)).await?;
    Ok(row.map(|r| cursor_text(view, &r)))
}

/// A row of cursor values as text.
fn cursor_text(view: &View, row: &tokio_postgres::Row) -> Vec<String> {
    (0..view.cursor.len())
        .map(|i| row.get::<_, String>(i))
        .collect()
}

/// Bound the statements of the transaction `tx` (one batch) to `limit`, so that a batch
/// cannot hold its snapshot and locks on the source for longer.
pub async fn time_limit(
    tx: &Transaction<'_>,
    limit: std::time::Duration,
) -> Result<(), tokio_postgres::Error> {
    let ms = limit.as_millis().to_string();
    tx.execute("select set_config('statement_timeout', $1, true)", &[&ms])
        .await
        .map(|_| ())
}

/// Count main-table rows in `(lo, hi]`.
pub async fn count(
    client: &Client,
    view: &View,
    lo: Option<&[String]>,
    hi: Option<&[String]>,
) -> Result<i64, tokio_postgres::Error> {
    let q = sql::count_range(view, lo.is_some(), hi.is_some());
    let params: Vec<&(dyn ToSql + Sync)> = lo
        .into_iter()
        .chain(hi)
        .flatten()
        .map(|v| v as &(dyn ToSql + Sync))
        .collect();
    Ok(client.query_one(&q, &params).await?.get(0))
}

/// Main tables up to this size are counted exactly when their statistics say nothing: a scan
/// of 32 MiB takes well under a second, even from disk.
const COUNT_MAX_BYTES: i64 = 32 << 20;

/// An estimate of the main-table rows in `(lo, hi]`, cheap at any table size, for the progress
/// of a load: for the whole table the statistics (`pg_class.reltuples`, scaled to the table's
/// size now as the planner does), an exact `count(*)` when they say nothing (never vacuumed or
/// analyzed) and the table is small; otherwise, and for a range, the planner's estimate of
/// the rows. `None` when the planner gives no usable number.
pub async fn estimate(
    client: &Client,
    view: &View,
    lo: Option<&[String]>,
    hi: Option<&[String]>,
) -> Result<Option<u64>, tokio_postgres::Error> {
    if lo.is_none() && hi.is_none() {
        match table_stats(client, view).await? {
            Stats::Rows(n) => return Ok(Some(n)),
            Stats::None { bytes } if bytes <= COUNT_MAX_BYTES => {
                return Ok(Some(count(client, view, None, None).await?.max(0) as u64));
            }
            _ => {}
        }
    }
    let q = sql::estimate_range(view, lo.is_some(), hi.is_some());
    let params: Vec<&(dyn ToSql + Sync)> = lo
        .into_iter()
        .chain(hi)
        .flatten()
        .map(|v| v as &(dyn ToSql + Sync))
        .collect();
    let plan: serde_json::Value = client.query_one(&q, &params).await?.get(0);
    Ok(plan[0]["Plan"]["Plan Rows"]
        .as_f64()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map(|n| n.round() as u64))
}

/// What the statistics say about the size of a main table.
enum Stats {
    /// About this many rows (`pg_class.reltuples`, scaled to the table's size now as the
    /// planner does).
    Rows(u64),
    /// Nothing (never vacuumed or analyzed): the table's size in bytes.
    None { bytes: i64 },
    /// A partitioned or foreign table: no size or statistics of its own here.
    Unknown,
}

async fn table_stats(client: &Client, view: &View) -> Result<Stats, tokio_postgres::Error> {
    let main = &view.job.from.name;
    let row = client
        .query_one(
            "select c.reltuples::float8, c.relpages::int8, pg_relation_size(c.oid),
                    c.relkind in ('r', 'm'), current_setting('block_size')::int8
             from pg_class c where c.oid = $1::text::regclass",
            &[&crate::pg::quote_qualified(&main.schema, &main.name)],
        )
        .await?;
    let (tuples, pages, bytes, plain, block): (f64, i64, i64, bool, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    Ok(if !plain {
        Stats::Unknown
    } else if tuples > 0.0 && pages > 0 {
        let now = (bytes / block.max(1)) as f64;
        Stats::Rows((tuples / pages as f64 * now).round() as u64)
    } else {
        Stats::None { bytes }
    })
}

/// About how many rows the main table holds by its statistics, at the cost of one catalog
/// read; `None` when they say nothing.
pub async fn table_rows(
    client: &Client,
    view: &View,
) -> Result<Option<u64>, tokio_postgres::Error> {
    Ok(match table_stats(client, view).await? {
        Stats::Rows(n) => Some(n),
        _ => None,
    })
}

/// Set the view's own settings plus `extra` (range bounds) for this transaction.
pub async fn set_settings(
    tx: &Transaction<'_>,
    view: &View,
    extra: Vec<Setting>,
) -> Result<(), tokio_postgres::Error> {
    let mut settings = view.settings.clone();
    settings.extend(extra);
    if let Some((q, names, values)) = settings_statement(&settings) {
        tx.query_one(q.as_str(), &[&names, &values]).await?;
    }
    Ok(())
}

/// Open the COPY of the view rows of `ranges` (settings set before).
pub async fn copy_out(
    tx: &Transaction<'_>,
    statement: &str,
) -> Result<CopyOutStream, tokio_postgres::Error> {
    tx.copy_out(statement).await
}

/// Why the source refused a watermark value given on the command line.
#[derive(Debug, thiserror::Error)]
pub enum WatermarkValueError {
    /// Not one value per watermark column.
    #[error("the watermark has {} column(s) ({}), the value has {given}", .columns.len(), .columns.join(", "))]
    Arity { columns: Vec<String>, given: usize },
    /// A value the source cannot cast to its column's type.
    #[error("{value:?} for {column}: {}", crate::pg::message(.source))]
    Cast {
        value: String,
        column: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Cast command-line watermark values on the source, so a bad one is refused before anything
/// runs; returns them in the source's canonical text form.
pub async fn normalize(
    client: &Client,
    view: &View,
    values: &[String],
) -> Result<Vec<String>, WatermarkValueError> {
    if values.len() != view.cursor.len() {
        return Err(WatermarkValueError::Arity {
            columns: view.cursor.iter().map(|c| c.name.clone()).collect(),
            given: values.len(),
        });
    }
    let mut out = Vec::new();
    for (v, c) in values.iter().zip(&view.cursor) {
        let q = format!("select ($1::text::{})::text", c.sql_type);
        match client.query_one(&q, &[v]).await {
            Ok(row) => out.push(row.get(0)),
            Err(source) => {
                return Err(WatermarkValueError::Cast {
                    value: v.clone(),
                    column: c.name.clone(),
                    source,
                })
            }
        }
    }
    Ok(out)
}
