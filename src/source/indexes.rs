//! The indexes a job's reads rely on at scale, and the ones the source lacks.
//!
//! Every batch finds where it ends with `order by <cursor> limit batch_size` past the
//! watermark (`view::sql::batch_bound`): without a btree index led by the cursor columns in
//! that order, each batch sorts or scans the main table. A notify job's drain re-reads the view
//! rows of changed keys by the main table's key, joining each table by its join columns, and
//! maps a changed joined row to main-table keys by looking the earlier table up by its side of
//! the join (`view::sql::affected_keys`): each of those lookups scans its table without an
//! index led by its columns. `pgtide check` warns about what is missing; nothing here stops a
//! job.
//!
//! The catalog is read with bound parameters. The statements that fix a warning are quoted by
//! the source's own `quote_ident` (quotes only where that server needs them), so they read as
//! a person would write them.

use std::fmt;

use tokio_postgres::Client;

use crate::config::{Mode, QualifiedName};
use crate::view::View;

/// How an index's leading columns must be ordered to serve a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// A range read in cursor order: exactly these columns in this order, all ascending (or
    /// all descending, scanned backwards).
    Exact,
    /// Equality lookups: these columns in any order.
    Any,
}

/// What a job reads a table by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Use {
    /// The cursor: each batch's bound query (poll jobs, and a notify job's initial load).
    Watermark,
    /// A notify job's drain re-reads the view rows of changed keys by the main table's key.
    Key,
    /// A notify job's drain re-reads view rows joining this table (`alias`) by its side of the
    /// join.
    Joined { alias: String },
    /// A notify job's drain maps a change of joined table `alias` (`table`) to view rows by
    /// looking this table up by its side of that join.
    JoinLookup { alias: String, table: QualifiedName },
}

/// Columns of a table that a job ranges over or looks rows up by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub table: QualifiedName,
    pub columns: Vec<String>,
    pub order: Order,
    pub used: Use,
}

/// What a job's reads need of the source's indexes, most important first; one need per table
/// and set of columns (an index that serves the cursor's order serves lookups by its columns).
pub fn needs(view: &View) -> Vec<Need> {
    let job = &view.job;
    let mut out: Vec<Need> = Vec::new();
    let mut add = |need: Need| {
        let set = |c: &[String]| {
            let mut c = c.to_vec();
            c.sort();
            c
        };
        let covered = out
            .iter()
            .any(|n| n.table == need.table && set(&n.columns) == set(&need.columns));
        if !need.columns.is_empty() && !covered {
            out.push(need);
        }
    };
    add(Need {
        table: job.from.name.clone(),
        columns: view.cursor.iter().map(|c| c.name.clone()).collect(),
        order: Order::Exact,
        used: Use::Watermark,
    });
    if job.mode != Mode::Notify {
        return out;
    }
    if let Some(main) = view.captured.first() {
        add(Need {
            table: job.from.name.clone(),
            columns: main.columns.clone(),
            order: Order::Any,
            used: Use::Key,
        });
    }
    for j in &job.joins {
        add(Need {
            table: j.table.name.clone(),
            columns: j.on.iter().map(|(_, this)| this.column.clone()).collect(),
            order: Order::Any,
            used: Use::Joined {
                alias: j.table.alias.clone(),
            },
        });
        // The earlier side, per earlier table the join names (usually just one).
        let mut earlier: Vec<&str> = Vec::new();
        for (e, _) in &j.on {
            if !earlier.contains(&e.alias.as_str()) {
                earlier.push(&e.alias);
            }
        }
        for alias in earlier {
            let Some(table) = job.tables().find(|t| t.alias == alias) else {
                continue;
            };
            add(Need {
                table: table.name.clone(),
                columns: j
                    .on
                    .iter()
                    .filter(|(e, _)| e.alias == alias)
                    .map(|(e, _)| e.column.clone())
                    .collect(),
                order: Order::Any,
                used: Use::JoinLookup {
                    alias: j.table.alias.clone(),
                    table: j.table.name.clone(),
                },
            });
        }
    }
    out
}

/// One btree index's key columns, as the catalog has them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexKeys {
    /// Per key column its table column, `None` for an expression.
    columns: Vec<Option<String>>,
    /// Per key column `pg_index.indoption`: bit 0 descending, bit 1 nulls first.
    options: Vec<i16>,
    /// Per key column: the default operator class and the column's own collation, so the
    /// index sorts and compares as the query does.
    plain: Vec<bool>,
}

/// `indoption` of an ascending key column with nulls last (the default), and of a descending
/// one with nulls first, its exact reverse.
const ASC: i16 = 0;
const DESC_NULLS_FIRST: i16 = 3;

/// Whether `index` serves reading by `columns` in `order`: its leading key columns are those
/// columns (plain, no expression). A longer index serves too. Partial indexes are not fetched:
/// the reads' conditions do not imply an index's own, so the planner cannot use one.
fn serves(index: &IndexKeys, columns: &[String], order: Order) -> bool {
    let n = columns.len();
    if n == 0 || index.columns.len() < n || index.plain.len() < n || index.options.len() < n {
        return false;
    }
    if !index.plain[..n].iter().all(|p| *p) {
        return false;
    }
    let lead = &index.columns[..n];
    match order {
        Order::Exact => {
            let options = &index.options[..n];
            lead.iter().zip(columns).all(|(i, c)| i.as_ref() == Some(c))
                && (options.iter().all(|o| *o == ASC)
                    || options.iter().all(|o| *o == DESC_NULLS_FIRST))
        }
        Order::Any => columns.iter().all(|c| lead.contains(&Some(c.clone()))),
    }
}

/// A need the source does not meet, and the statements that meet it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub need: Need,
    /// For a partitioned table, the partitions lacking the index (`schema.name`); empty for a
    /// table.
    pub partitions: Vec<String>,
    /// `create index concurrently ...`, one per table to index.
    pub statements: Vec<String>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let need = &self.need;
        let cols = need.columns.join(", ");
        let on = if self.partitions.is_empty() {
            format!("on {}", need.table)
        } else {
            format!(
                "on partition{} {} of {}",
                if self.partitions.len() == 1 { "" } else { "s" },
                self.partitions.join(", "),
                need.table
            )
        };
        let lead = match need.order {
            Order::Exact => "starts with these columns in this order",
            Order::Any => "starts with these columns",
        };
        match &need.used {
            Use::Watermark => write!(
                f,
                "watermark ({cols}): no index {on} {lead}, so every batch sorts or scans the table to find where it ends"
            )?,
            Use::Key => write!(
                f,
                "key ({cols}): no index {on} {lead}, so every drain scans the table to re-read the changed rows"
            )?,
            Use::Joined { alias } => write!(
                f,
                "join {alias} ({cols}): no index {on} {lead}, so every drain scans it to join the rows it re-reads"
            )?,
            Use::JoinLookup { alias, table } => write!(
                f,
                "join {alias} ({cols}): no index {on} {lead}, so every drain scans it to find the rows a change of {table} affects"
            )?,
        }
        write!(f, ": {}", self.statements.join("; "))
    }
}

/// What the source lacks of what `view`'s reads need (see [`needs`]). Tables that cannot have
/// indexes (views, foreign tables) are left out.
pub async fn missing(client: &Client, view: &View) -> Result<Vec<Missing>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for need in needs(view) {
        if let Some(m) = lookup(client, need).await? {
            out.push(m);
        }
    }
    Ok(out)
}

/// `create index concurrently on <table> (<columns>)`, names quoted already. A partitioned
/// table takes no concurrent build: its statement (for a table without partitions) is plain.
fn statement(table: &str, columns: &[String], concurrently: bool) -> String {
    format!(
        "create index {}on {table} ({})",
        if concurrently { "concurrently " } else { "" },
        columns.join(", ")
    )
}

async fn lookup(client: &Client, need: Need) -> Result<Option<Missing>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "select c.oid, c.relkind, quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                    array(select quote_ident(u.col) from unnest($3::text[]) with ordinality u(col, i) order by u.i)
             from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = $1 and c.relname = $2",
            &[&need.table.schema, &need.table.name, &need.columns],
        )
        .await?;
    // Gone since the view was resolved: the next resolve says so.
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let kind: i8 = row.get(1);
    let quoted: String = row.get(2);
    let columns: Vec<String> = row.get(3);
    let served = |indexes: &[(u32, IndexKeys)], rel: u32| {
        indexes
            .iter()
            .any(|(r, i)| *r == rel && serves(i, &need.columns, need.order))
    };
    match kind as u8 {
        b'r' | b'm' => {
            if served(&indexes(client, &[oid]).await?, oid) {
                return Ok(None);
            }
            let statements = vec![statement(&quoted, &columns, true)];
            Ok(Some(Missing {
                need,
                partitions: Vec::new(),
                statements,
            }))
        }
        b'p' => {
            // A valid partitioned index is on every partition; otherwise every leaf partition
            // needs one of its own.
            if served(&indexes(client, &[oid]).await?, oid) {
                return Ok(None);
            }
            let leaves = client
                .query(
                    "select c.oid, n.nspname || '.' || c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                     from pg_partition_tree($1::oid::regclass) t
                     join pg_class c on c.oid = t.relid join pg_namespace n on n.oid = c.relnamespace
                     where t.isleaf and c.relkind = 'r'
                     order by n.nspname, c.relname",
                    &[&oid],
                )
                .await?;
            if leaves.is_empty() {
                return Ok(Some(Missing {
                    need,
                    partitions: Vec::new(),
                    statements: vec![statement(&quoted, &columns, false)],
                }));
            }
            let oids: Vec<u32> = leaves.iter().map(|r| r.get(0)).collect();
            let found = indexes(client, &oids).await?;
            let lacking: Vec<_> = leaves
                .iter()
                .filter(|r| !served(&found, r.get(0)))
                .collect();
            if lacking.is_empty() {
                return Ok(None);
            }
            Ok(Some(Missing {
                partitions: lacking.iter().map(|r| r.get(1)).collect(),
                statements: lacking
                    .iter()
                    .map(|r| statement(&r.get::<_, String>(2), &columns, true))
                    .collect(),
                need,
            }))
        }
        // Views and foreign tables have no indexes of their own.
        _ => Ok(None),
    }
}

/// The valid, non-partial btree indexes of the relations `oids`, by relation.
async fn indexes(
    client: &Client,
    oids: &[u32],
) -> Result<Vec<(u32, IndexKeys)>, tokio_postgres::Error> {
    // `indkey`, `indoption`, `indclass` and `indcollation` are vectors subscripted from 0; a
    // key column of 0 is an expression, whose name reads NULL and never matches. Only key
    // columns count (`indnkeyatts`), not `include` ones.
    let rows = client
        .query(
            "select i.indrelid,
                    array(select a.attname from generate_series(0, i.indnkeyatts - 1) k
                          left join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[k]
                          order by k),
                    array(select i.indoption[k] from generate_series(0, i.indnkeyatts - 1) k order by k),
                    array(select coalesce(oc.opcdefault and i.indcollation[k] = a.attcollation, false)
                          from generate_series(0, i.indnkeyatts - 1) k
                          left join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[k]
                          left join pg_opclass oc on oc.oid = i.indclass[k]
                          order by k)
             from pg_index i
             join pg_class ic on ic.oid = i.indexrelid
             join pg_am am on am.oid = ic.relam
             where i.indrelid = any($1::oid[]) and am.amname = 'btree'
               and i.indisvalid and i.indpred is null",
            &[&oids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                IndexKeys {
                    columns: r.get(1),
                    options: r.get(2),
                    plain: r.get(3),
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::{parse_job, Problems};
    use crate::view::{Captured, CursorColumn};

    fn view(text: &str, cursor: &[&str], key: &[&str]) -> View {
        let sources = [("s".to_string(), "postgres://x@y/z".to_string())].into();
        let mut p = Problems::new(Path::new("j.toml"));
        let job = parse_job(
            Path::new("j.toml"),
            text,
            &sources,
            "public",
            Default::default(),
            &mut p,
        )
        .expect("valid job");
        View {
            job: Arc::new(job),
            columns: vec![],
            cursor: cursor
                .iter()
                .map(|c| CursorColumn {
                    name: c.to_string(),
                    sql_type: "bigint".into(),
                })
                .collect(),
            settings: vec![],
            checks: vec![],
            captured: vec![Captured {
                alias: "o".into(),
                columns: key.iter().map(|c| c.to_string()).collect(),
                matches: vec![],
            }],
        }
    }

    const JOINS: &str = r#"
        key = ["id"]
        [from]
        table = "orders"
        as = "o"
        [[join]]
        table = "customers"
        as = "c"
        on = { "o.customer_id" = "c.id" }
        [[join]]
        table = "shop.regions"
        as = "r"
        type = "left"
        on = { "c.country" = "r.country", "c.region" = "r.code" }
        [[column]]
        name = "id"
        from = "o.id"
    "#;

    fn table(schema: &str, name: &str) -> QualifiedName {
        QualifiedName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    fn summary(needs: &[Need]) -> Vec<(String, Vec<String>, Order)> {
        needs
            .iter()
            .map(|n| (n.table.to_string(), n.columns.clone(), n.order))
            .collect()
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn a_poll_job_needs_only_its_cursor_order() {
        let text = format!("interval_secs = 5\n{JOINS}");
        let v = view(&text, &["updated_at", "id"], &["id"]);
        assert_eq!(
            summary(&needs(&v)),
            [(
                "public.orders".to_string(),
                strings(&["updated_at", "id"]),
                Order::Exact
            )]
        );
    }

    #[test]
    fn a_notify_job_needs_both_sides_of_every_join() {
        let text = format!("mode = \"notify\"\n{JOINS}");
        let v = view(&text, &["updated_at", "id"], &["id"]);
        let needs = needs(&v);
        assert_eq!(
            summary(&needs),
            [
                (
                    "public.orders".to_string(),
                    strings(&["updated_at", "id"]),
                    Order::Exact
                ),
                ("public.orders".to_string(), strings(&["id"]), Order::Any),
                ("public.customers".to_string(), strings(&["id"]), Order::Any),
                (
                    "public.orders".to_string(),
                    strings(&["customer_id"]),
                    Order::Any
                ),
                (
                    "shop.regions".to_string(),
                    strings(&["country", "code"]),
                    Order::Any
                ),
                (
                    "public.customers".to_string(),
                    strings(&["country", "region"]),
                    Order::Any
                ),
            ]
        );
        assert_eq!(
            needs[3].used,
            Use::JoinLookup {
                alias: "c".into(),
                table: table("public", "customers")
            }
        );
    }

    #[test]
    fn one_need_per_table_and_set_of_columns() {
        // The cursor is the key: the index that serves the cursor serves the key's lookups.
        let text = format!("mode = \"notify\"\n{JOINS}");
        let v = view(&text, &["id"], &["id"]);
        let needs = needs(&v);
        assert_eq!(needs[0].used, Use::Watermark);
        assert_eq!(
            needs.iter().filter(|n| n.table.name == "orders").count(),
            2,
            "{needs:?}"
        );
    }

    fn index(columns: &[Option<&str>], options: &[i16]) -> IndexKeys {
        IndexKeys {
            columns: columns.iter().map(|c| c.map(String::from)).collect(),
            options: options.to_vec(),
            plain: vec![true; columns.len()],
        }
    }

    #[test]
    fn an_index_serves_when_it_leads_with_the_columns() {
        let cursor = strings(&["updated_at", "id"]);
        let both = index(&[Some("updated_at"), Some("id")], &[0, 0]);
        assert!(serves(&both, &cursor, Order::Exact));
        let longer = index(&[Some("updated_at"), Some("id"), Some("v")], &[0, 0, 0]);
        assert!(serves(&longer, &cursor, Order::Exact));
        let backwards = index(&[Some("updated_at"), Some("id")], &[3, 3]);
        assert!(serves(&backwards, &cursor, Order::Exact));

        let swapped = index(&[Some("id"), Some("updated_at")], &[0, 0]);
        assert!(!serves(&swapped, &cursor, Order::Exact));
        assert!(serves(&swapped, &cursor, Order::Any), "equality: any order");
        let mixed = index(&[Some("updated_at"), Some("id")], &[0, 3]);
        assert!(!serves(&mixed, &cursor, Order::Exact));
        let nulls_first = index(&[Some("updated_at"), Some("id")], &[2, 2]);
        assert!(!serves(&nulls_first, &cursor, Order::Exact));
        let short = index(&[Some("updated_at")], &[0]);
        assert!(!serves(&short, &cursor, Order::Exact));
        assert!(!serves(&short, &cursor, Order::Any));
        let expression = index(&[None, Some("id")], &[0, 0]);
        assert!(!serves(&expression, &cursor, Order::Exact));
        let trailing_expression = index(&[Some("updated_at"), Some("id"), None], &[0, 0, 0]);
        assert!(serves(&trailing_expression, &cursor, Order::Exact));
        let mut collated = both.clone();
        collated.plain[1] = false;
        assert!(!serves(&collated, &cursor, Order::Exact));
        assert!(!serves(&both, &[], Order::Exact));
    }

    #[test]
    fn a_warning_names_columns_table_reason_and_statement() {
        let m = Missing {
            need: Need {
                table: table("public", "orders"),
                columns: strings(&["updated_at", "id"]),
                order: Order::Exact,
                used: Use::Watermark,
            },
            partitions: vec![],
            statements: vec![statement(
                "public.orders",
                &strings(&["updated_at", "id"]),
                true,
            )],
        };
        assert_eq!(
            m.to_string(),
            "watermark (updated_at, id): no index on public.orders starts with these columns in this order, \
             so every batch sorts or scans the table to find where it ends: \
             create index concurrently on public.orders (updated_at, id)"
        );
        let m = Missing {
            need: Need {
                table: table("public", "events"),
                columns: strings(&["customer_id"]),
                order: Order::Any,
                used: Use::JoinLookup {
                    alias: "c".into(),
                    table: table("public", "customers"),
                },
            },
            partitions: strings(&["public.events_1", "public.events_2"]),
            statements: vec![
                statement("public.events_1", &strings(&["customer_id"]), true),
                statement("public.events_2", &strings(&["customer_id"]), true),
            ],
        };
        assert_eq!(
            m.to_string(),
            "join c (customer_id): no index on partitions public.events_1, public.events_2 of public.events starts with these columns, \
             so every drain scans it to find the rows a change of public.customers affects: \
             create index concurrently on public.events_1 (customer_id); create index concurrently on public.events_2 (customer_id)"
        );
        assert_eq!(
            statement("public.p", &strings(&["a"]), false),
            "create index on public.p (a)"
        );
    }
}
