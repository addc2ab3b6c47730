//! SQL text for a resolved view. Identifiers are quoted here and nowhere else in the read
//! path; values never appear: they are bound parameters, or session settings read back with
//! `current_setting` inside COPY statements (which take no parameters).

use crate::config::JoinKind;
use crate::pg::{quote_ident, quote_qualified};

use super::View;

/// The custom settings namespace pgtide uses on source sessions.
pub const SETTING_PREFIX: &str = "pgtide.";

/// `"o"."id"` for a column of a table alias.
pub fn column(alias: &str, column: &str) -> String {
    format!("{}.{}", quote_ident(alias), quote_ident(column))
}

/// `from "s"."main" as "m" left join ... on ...`.
pub fn from_clause(view: &View) -> String {
    from_joins(view, view.job.joins.len())
}

/// The from clause with only the first `joins` joins.
pub fn from_joins(view: &View, joins: usize) -> String {
    let job = &view.job;
    let mut s = format!(
        "from {} as {}",
        quote_qualified(&job.from.name.schema, &job.from.name.name),
        quote_ident(&job.from.alias)
    );
    for j in job.joins.iter().take(joins) {
        let kind = match j.kind {
            JoinKind::Inner => "join",
            JoinKind::Left => "left join",
        };
        let on: Vec<String> =
            j.on.iter()
                .map(|(a, b)| {
                    format!(
                        "{} = {}",
                        column(&a.alias, &a.column),
                        column(&b.alias, &b.column)
                    )
                })
                .collect();
        s.push_str(&format!(
            " {kind} {} as {} on {}",
            quote_qualified(&j.table.name.schema, &j.table.name.name),
            quote_ident(&j.table.alias),
            on.join(" and ")
        ));
    }
    s
}

/// The main table's cursor columns as a row, for row comparisons.
fn cursor_row(view: &View) -> String {
    let cols: Vec<String> = view
        .cursor
        .iter()
        .map(|c| column(&view.job.from.alias, &c.name))
        .collect();
    format!("({})", cols.join(", "))
}

/// `cursor > lo` and `cursor <= hi`, compared as rows, for the bounds given.
pub fn cursor_between(view: &View, lo: Option<&str>, hi: Option<&str>) -> Vec<String> {
    let cursor = cursor_row(view);
    let mut preds = Vec::new();
    if let Some(lo) = lo {
        preds.push(format!("{cursor} > {lo}"));
    }
    if let Some(hi) = hi {
        preds.push(format!("{cursor} <= {hi}"));
    }
    preds
}

/// A row of cursor values from bound parameters `$first..`, sent as text and cast.
fn param_row(view: &View, first: usize) -> String {
    let vals: Vec<String> = view
        .cursor
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::text::{}", first + i, c.sql_type))
        .collect();
    format!("({})", vals.join(", "))
}

/// The cursor value of the newest main-table row past `lo` (and up to `hi`): where a load
/// ends, and the last batch of a run. Parameters: the lower bound's values as text (when
/// `has_lo`), then the upper bound's (when `has_hi`).
pub fn last_cursor(view: &View, has_lo: bool, has_hi: bool) -> String {
    let n = view.cursor.len();
    debug_assert!(n > 0);
    let desc: Vec<String> = (0..n).map(|i| format!("c{i} desc")).collect();
    keyset(
        view,
        has_lo,
        has_hi,
        &format!("order by {} limit 1", desc.join(", ")),
    )
}

/// The last cursor value of the next batch when it is a whole one: the cursor of the
/// `offset + 1`-th main-table row past `lo` (and up to `hi`), found by walking the cursor's
/// index, none when fewer rows are left (then `last_cursor` gives the batch's end).
/// Parameters: the lower bound's values as text (when `has_lo`), the upper bound's (when
/// `has_hi`), then the offset.
pub fn batch_bound(view: &View, has_lo: bool, has_hi: bool) -> String {
    let n = view.cursor.len();
    let order: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let offset = 1 + n * (usize::from(has_lo) + usize::from(has_hi));
    keyset(
        view,
        has_lo,
        has_hi,
        &format!("order by {} offset ${offset} limit 1", order.join(", ")),
    )
}

/// One main-table row's cursor values as text, picked by `tail` (an order and a limit over
/// the cursor columns `c0..`) from the rows in `(lo, hi]`.
fn keyset(view: &View, has_lo: bool, has_hi: bool, tail: &str) -> String {
    let main = &view.job.from;
    let n = view.cursor.len();
    let inner_cols: Vec<String> = view
        .cursor
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} as c{i}", column(&main.alias, &c.name)))
        .collect();
    // The text casts apply to the one row kept, not to every row walked past (a timestamp's
    // costs about as much as reading its index entry).
    let text: Vec<String> = (0..n).map(|i| format!("c{i}::text as t{i}")).collect();
    let lo = has_lo.then(|| param_row(view, 1));
    let hi = has_hi.then(|| param_row(view, if has_lo { n + 1 } else { 1 }));
    let mut preds = cursor_between(view, lo.as_deref(), hi.as_deref());
    // Rows with a NULL in the cursor are never read; a descending walk would meet them first.
    preds.extend(
        view.cursor
            .iter()
            .map(|c| format!("{} is not null", column(&main.alias, &c.name))),
    );
    format!(
        "select {} from (select {} from {} as {} where {} {tail}) b",
        text.join(", "),
        inner_cols.join(", "),
        quote_qualified(&main.name.schema, &main.name.name),
        quote_ident(&main.alias),
        preds.join(" and "),
    )
}

/// Count main-table rows past a watermark (for `status` and `replay --dry-run`).
/// Parameters: lower bound values (when `has_lo`), then upper bound values (when `has_hi`).
pub fn count_range(view: &View, has_lo: bool, has_hi: bool) -> String {
    main_rows(view, has_lo, has_hi, "select count(*)")
}

/// The planner's estimate of the same rows as `count_range`, with the same parameters: a JSON
/// plan whose top node's `Plan Rows` is the estimate.
pub fn estimate_range(view: &View, has_lo: bool, has_hi: bool) -> String {
    main_rows(view, has_lo, has_hi, "explain (format json) select 1")
}

/// `<select> from <main table> where <cursor in (lo, hi]>`.
fn main_rows(view: &View, has_lo: bool, has_hi: bool, select: &str) -> String {
    let main = &view.job.from;
    let lo = has_lo.then(|| param_row(view, 1));
    let hi = has_hi.then(|| param_row(view, if has_lo { view.cursor.len() + 1 } else { 1 }));
    let preds = cursor_between(view, lo.as_deref(), hi.as_deref());
    let pred = if preds.is_empty() {
        String::new()
    } else {
        format!(" where {}", preds.join(" and "))
    };
    format!(
        "{select} from {} as {}{pred}",
        quote_qualified(&main.name.schema, &main.name.name),
        quote_ident(&main.alias)
    )
}

/// `(a, b) in (select * from unnest(<arrays>))`, or `a = any(<array>)` for one column (which
/// an index serves best).
pub fn in_arrays(exprs: &[String], arrays: &[String]) -> String {
    if exprs.len() == 1 {
        format!("{} = any({})", exprs[0], arrays[0])
    } else {
        format!(
            "({}) in (select * from unnest({}))",
            exprs.join(", "),
            arrays.join(", ")
        )
    }
}

/// `from ... where <predicate>`: the view rows of a range (see `range::Bound`).
pub fn rows_of(view: &View, predicate: &str) -> String {
    format!("{} where {predicate}", from_clause(view))
}

/// `copy (select <view columns> from ... where <predicate>) to stdout (format binary)`.
pub fn copy_out(view: &View, predicate: &str) -> String {
    let cols: Vec<&str> = view.columns.iter().map(|c| c.expr.as_str()).collect();
    format!(
        "copy (select {} {}) to stdout (format binary)",
        cols.join(", "),
        rows_of(view, predicate)
    )
}

/// Per check of the view, over the rows of `predicate`: how many values it turned into NULL,
/// and a few of them. `None` when the view counts nothing.
pub fn check_stats(view: &View, predicate: &str) -> Option<String> {
    use super::CheckKind;
    use crate::config::OnError;
    let mut cols = Vec::new();
    for c in &view.checks {
        match &c.kind {
            CheckKind::Unmapped { raw, map_setting } => {
                let cond = format!(
                    "{raw} is not null and not (current_setting('{SETTING_PREFIX}{map_setting}')::jsonb ? {raw})"
                );
                cols.push(format!(
                    "count(*) filter (where {cond}), (array_agg(distinct {raw}) filter (where {cond}))[1:5]"
                ));
            }
            CheckKind::Json {
                on_error: OnError::Null,
                ..
            } => {
                let shape = c.kind.shape_ok().expect("a json check");
                cols.push(format!("count(*) filter (where not {shape}), null::text[]"));
            }
            CheckKind::Json { .. } => cols.push("0::int8, null::text[]".into()),
        }
    }
    let counts = view.checks.iter().any(|c| match &c.kind {
        CheckKind::Unmapped { .. } => true,
        CheckKind::Json { on_error, .. } => *on_error == OnError::Null,
    });
    counts.then(|| format!("select {} {}", cols.join(", "), rows_of(view, predicate)))
}

/// The main-table keys of the view rows that a change of table `table` (an index into the
/// view's tables, 1 for the first join) affects. Parameters: one text array per recorded
/// column. Only the tables up to the changed one's partner are read, so rows that the change
/// removes from the view (an inner join that no longer matches) are found too.
pub fn affected_keys(view: &View, table: usize) -> String {
    let cap = &view.captured[table];
    let keys: Vec<String> = view.captured[0]
        .matches
        .iter()
        .map(|(e, _)| format!("{e}::text"))
        .collect();
    let exprs: Vec<String> = cap.matches.iter().map(|(e, _)| e.clone()).collect();
    let arrays: Vec<String> = cap
        .matches
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("${}::text[]::{ty}[]", i + 1))
        .collect();
    format!(
        "select distinct {} {} where {}",
        keys.join(", "),
        from_joins(view, table - 1),
        in_arrays(&exprs, &arrays)
    )
}

/// `row(<key expressions>)::text` of a view row, to name it in messages.
pub fn key_text(view: &View) -> String {
    let keys: Vec<&str> = view
        .columns
        .iter()
        .filter(|c| view.job.key.contains(&c.name))
        .map(|c| c.expr.as_str())
        .collect();
    format!("row({})::text", keys.join(", "))
}

/// The view's select over no rows, to check that it plans on the source.
pub fn probe(view: &View) -> String {
    let cols: Vec<&str> = view.columns.iter().map(|c| c.expr.as_str()).collect();
    format!("select {} {} limit 0", cols.join(", "), from_clause(view))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::{parse_job, Problems};
    use crate::position::Window;
    use crate::view::range::Range;
    use crate::view::{CursorColumn, ViewColumn};

    fn view() -> View {
        let text = r#"
            interval_secs = 5
            key = ["id"]
            watermark = ["updated at", "id"]
            [from]
            table = "Sales.Order\"s"
            as = "o"
            [[join]]
            table = "public.Кли"
            as = "c"
            type = "left"
            on = { "o.cust" = "c.id" }
            [[column]]
            name = "id"
            from = "o.id"
        "#;
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
            columns: vec![ViewColumn {
                name: "id".into(),
                expr: r#""o"."id""#.into(),
                target_type: "bigint".into(),
                stage_type: "bigint".into(),
                load: None,
                origin: "o.id".into(),
                nullable: false,
                dwh_type: None,
            }],
            cursor: vec![
                CursorColumn {
                    name: "updated at".into(),
                    sql_type: "timestamp with time zone".into(),
                },
                CursorColumn {
                    name: "id".into(),
                    sql_type: "bigint".into(),
                },
            ],
            settings: vec![],
            checks: vec![],
            captured: vec![],
        }
    }

    #[test]
    fn from_clause_quotes_everything() {
        assert_eq!(
            from_clause(&view()),
            r#"from "Sales"."Order""s" as "o" left join "public"."Кли" as "c" on "o"."cust" = "c"."id""#
        );
    }

    #[test]
    fn batch_bound_is_a_keyset_query_with_bound_values() {
        let v = view();
        assert_eq!(
            batch_bound(&v, true, false),
            "select c0::text as t0, c1::text as t1 from (select \"o\".\"updated at\" as c0, \"o\".\"id\" as c1 from \"Sales\".\"Order\"\"s\" as \"o\" \
             where (\"o\".\"updated at\", \"o\".\"id\") > ($1::text::timestamp with time zone, $2::text::bigint) \
             and \"o\".\"updated at\" is not null and \"o\".\"id\" is not null \
             order by c0, c1 offset $3 limit 1) b"
        );
        assert!(batch_bound(&v, false, false).contains("offset $1 limit 1)"));
        let last = last_cursor(&v, true, true);
        assert!(
            last.contains("<= ($3::text::timestamp with time zone, $4::text::bigint) and"),
            "{last}"
        );
        assert!(
            last.ends_with("\"o\".\"id\" is not null order by c0 desc, c1 desc limit 1) b"),
            "{last}"
        );
        assert!(
            batch_bound(&v, false, false).contains(" where \"o\".\"updated at\" is not null and")
        );
    }

    #[test]
    fn copy_reads_bounds_from_settings() {
        let v = view();
        let (lo, hi) = (
            vec!["2025-01-01".to_string(), "5".to_string()],
            vec!["2025-01-02".to_string(), "9".to_string()],
        );
        let bound = Range::Cursor {
            lo: Some(&lo),
            hi: Some(&hi),
            wide: false,
        }
        .bind(&v, "b");
        let sql = copy_out(&v, &bound.predicate);
        assert!(
            sql.starts_with("copy (select \"o\".\"id\" from \"Sales\""),
            "{sql}"
        );
        assert!(sql.contains("(\"o\".\"updated at\", \"o\".\"id\") > (current_setting('pgtide.blo0')::timestamp with time zone, current_setting('pgtide.blo1')::bigint)"), "{sql}");
        assert!(sql.contains("<= (current_setting('pgtide.bhi0')"), "{sql}");
        assert!(sql.ends_with("to stdout (format binary)"), "{sql}");
        // Every setting the SQL reads is bound, with its value.
        let names: Vec<(&str, &str)> = bound
            .settings
            .iter()
            .map(|s| (s.name.as_str(), s.value.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("blo0", "2025-01-01"),
                ("blo1", "5"),
                ("bhi0", "2025-01-02"),
                ("bhi1", "9")
            ]
        );
    }

    #[test]
    fn wide_ranges_read_their_bounds_once_per_statement() {
        let v = view();
        let (lo, hi) = (
            vec!["2025-01-01".to_string(), "5".to_string()],
            vec!["2025-01-02".to_string(), "9".to_string()],
        );
        let wide = Range::Cursor {
            lo: Some(&lo),
            hi: Some(&hi),
            wide: true,
        }
        .bind(&v, "b");
        assert_eq!(
            wide.predicate,
            "(\"o\".\"updated at\", \"o\".\"id\") > ((select current_setting('pgtide.blo0')::timestamp with time zone), (select current_setting('pgtide.blo1')::bigint)) \
             and (\"o\".\"updated at\", \"o\".\"id\") <= ((select current_setting('pgtide.bhi0')::timestamp with time zone), (select current_setting('pgtide.bhi1')::bigint))"
        );
        let narrow = Range::Cursor {
            lo: Some(&lo),
            hi: Some(&hi),
            wide: false,
        }
        .bind(&v, "b");
        // The same values, bound the same way.
        assert_eq!(wide.settings, narrow.settings);
        assert!(!narrow.predicate.contains("select"), "{}", narrow.predicate);
        // A quarter of the table or more is wide; without statistics nothing is.
        assert!(crate::view::range::wide(250, Some(1000)));
        assert!(!crate::view::range::wide(249, Some(1000)));
        assert!(!crate::view::range::wide(1_000_000, None));
    }

    #[test]
    fn recheck_windows_are_ored_and_filter_on_xmin() {
        let v = view();
        let window = |lo: Option<Vec<String>>, floor: u64, xids: Vec<u64>| Window {
            lo,
            hi: vec!["2025-01-02".into(), "9".into()],
            floor,
            xids,
            next: floor,
            read_at_us: 0,
            mark: None,
            settled: false,
        };
        let windows = [
            window(None, 700, vec![]),
            window(
                Some(vec!["2025-01-01".into(), "5".into()]),
                800,
                vec![790, 795],
            ),
        ];
        let bound = Range::Windows(&windows).bind(&v, "");
        let sql = copy_out(&v, &bound.predicate);
        assert!(
            sql.contains(
                "(age(\"o\".\"xmin\") <= age((select current_setting('pgtide.w0floor')::xid))"
            ),
            "{sql}"
        );
        assert!(
            sql.contains(
                "\"o\".\"xmin\" = any((select current_setting('pgtide.w1xids')::xid[])::xid[]))"
            ),
            "{sql}"
        );
        assert!(sql.contains(") or ("), "{sql}");
        assert!(
            !sql.contains("pgtide.w0lo0"),
            "the first window is open below: {sql}"
        );
        let get = |n: &str| {
            bound
                .settings
                .iter()
                .find(|s| s.name == n)
                .map(|s| s.value.clone())
        };
        assert_eq!(get("w1floor").as_deref(), Some("800"));
        assert_eq!(get("w1xids").as_deref(), Some("{790,795}"));
        assert_eq!(get("w1lo1").as_deref(), Some("5"));
        assert_eq!(get("w0lo0"), None);
        assert_eq!(Range::Windows(&[]).bind(&v, "").predicate, "false");
    }
}
