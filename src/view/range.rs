//! Which main-table rows a read takes, and the session settings that carry its values: built
//! together in one place, so the SQL text and the values it reads back always agree.
//!
//! COPY takes no parameters, so a range's values travel as settings (`pgtide.<prefix>...`,
//! set with bound parameters) that its predicate reads back with `current_setting`. Several
//! ranges in one statement need different prefixes.

use crate::position::Window;
use crate::view::resolve::text_array;

use super::sql::{column, cursor_between, in_arrays, SETTING_PREFIX};
use super::{Setting, View};

/// Whether a read of about `rows` rows of a main table of about `table_rows` is a large part
/// of it: the planner reads a quarter of a table or more by scanning it whole.
pub fn wide(rows: i64, table_rows: Option<u64>) -> bool {
    table_rows.is_some_and(|t| rows.max(0) as u64 >= t / 4)
}

/// A set of main-table rows.
#[derive(Debug, Clone, Copy)]
pub enum Range<'a> {
    /// Rows whose cursor lies in `(lo, hi]`; a missing bound is open. A `wide` range (a
    /// large part of the table, see [`wide`]) reads its values once per statement (scalar
    /// subqueries): the planner scans the table for it, and would otherwise evaluate each
    /// `current_setting` and its cast for every row. A narrow one keeps its values where the
    /// planner's estimates see them, which choose the cursor's index for it.
    Cursor {
        lo: Option<&'a [String]>,
        hi: Option<&'a [String]>,
        wide: bool,
    },
    /// The rows open recheck windows re-read: in a window's cursor range, and written by a
    /// transaction the window's snapshot may not have seen (`xmin` at or above its floor, or
    /// one of its ids; `age()` compares ids across wraparound, frozen rows are the oldest).
    Windows(&'a [Window]),
    /// The rows whose main-table key (the notify capture's key columns) is one of these.
    Keys(&'a [Vec<String>]),
    /// Every row.
    All,
}

/// A range made concrete: a boolean expression over the view's tables, and the settings it
/// reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bound {
    pub predicate: String,
    pub settings: Vec<Setting>,
}

impl Bound {
    /// These rows cut by the view's key at `ceiling` (the target's greatest key, one text
    /// value per key column): those whose key lies above it, and all the others (a NULL key
    /// among them). Read in one snapshot, with a key the source computes the same way each
    /// time (`View::key_is_plain`), each row is in exactly one of the two. The values are read
    /// once per statement (scalar subqueries): the test runs on every row.
    pub fn split_at_key(&self, view: &View, ceiling: &[String], prefix: &str) -> (Bound, Bound) {
        let mut settings = self.settings.clone();
        let (keys, values): (Vec<String>, Vec<String>) = view
            .key_positions()
            .into_iter()
            .zip(ceiling)
            .enumerate()
            .map(|(i, (at, value))| {
                let c = &view.columns[at];
                let name = format!("{prefix}key{i}");
                let read = format!(
                    "(select current_setting('{SETTING_PREFIX}{name}')::{})",
                    c.target_type
                );
                settings.push(Setting {
                    name,
                    value: value.clone(),
                });
                (c.expr.clone(), read)
            })
            .unzip();
        let above = format!("({}) > ({})", keys.join(", "), values.join(", "));
        let part = |predicate: String| Bound {
            predicate,
            settings: settings.clone(),
        };
        (
            part(format!("({}) and {above}", self.predicate)),
            part(format!(
                "({}) and not coalesce({above}, false)",
                self.predicate
            )),
        )
    }
}

impl Range<'_> {
    /// The predicate and settings of this range, its settings named under `prefix`.
    pub fn bind(&self, view: &View, prefix: &str) -> Bound {
        let mut settings = Vec::new();
        let mut set = |name: String, value: String| {
            settings.push(Setting {
                name: format!("{prefix}{name}"),
                value,
            });
            format!("current_setting('{SETTING_PREFIX}{prefix}{name}')")
        };
        let predicate = match *self {
            Range::All => "true".to_string(),
            Range::Cursor { lo, hi, wide } => {
                let lo = lo.map(|v| cursor_values(view, v, wide, |i, s| set(format!("lo{i}"), s)));
                let hi = hi.map(|v| cursor_values(view, v, wide, |i, s| set(format!("hi{i}"), s)));
                all_of(cursor_between(view, lo.as_deref(), hi.as_deref()))
            }
            Range::Windows(windows) => {
                let xmin = column(&view.job.from.alias, "xmin");
                let each: Vec<String> = windows
                    .iter()
                    .enumerate()
                    .map(|(w, window)| {
                        let lo = window.lo.as_deref().map(|v| {
                            cursor_values(view, v, false, |i, s| set(format!("w{w}lo{i}"), s))
                        });
                        let hi = cursor_values(view, &window.hi, false, |i, s| {
                            set(format!("w{w}hi{i}"), s)
                        });
                        let floor = set(format!("w{w}floor"), window.floor_xid());
                        let xids = set(format!("w{w}xids"), window.xids_literal());
                        // The xmin test first, its values read once (scalar subqueries): it
                        // rejects nearly every row, so a scan over many windows rarely gets
                        // to the cursor bounds, whose `current_setting` is evaluated anew for
                        // every row it looks at. The bounds stay as they are, where the
                        // planner sees their values: its estimates choose the cursor's index
                        // for a narrow window of a large table. (`any((select ...))` would be
                        // a subquery's rows; the cast makes it the array.)
                        let mut preds = vec![format!(
                            "(age({xmin}) <= age((select {floor}::xid)) \
                             or {xmin} = any((select {xids}::xid[])::xid[]))"
                        )];
                        preds.extend(cursor_between(view, lo.as_deref(), Some(&hi)));
                        format!("({})", all_of(preds))
                    })
                    .collect();
                if each.is_empty() {
                    "false".to_string()
                } else {
                    each.join(" or ")
                }
            }
            Range::Keys(keys) => {
                let main = &view.captured[0];
                let exprs: Vec<String> = main.matches.iter().map(|(e, _)| e.clone()).collect();
                let arrays: Vec<String> = main
                    .matches
                    .iter()
                    .enumerate()
                    .map(|(i, (_, ty))| {
                        let values: Vec<String> = keys.iter().map(|k| k[i].clone()).collect();
                        format!("{}::{ty}[]", set(format!("k{i}"), text_array(&values)))
                    })
                    .collect();
                in_arrays(&exprs, &arrays)
            }
        };
        Bound {
            predicate,
            settings,
        }
    }
}

/// A row of cursor values, each bound through `bind(i, value)` (which returns the expression
/// that reads it) and cast to its cursor column's type; with `once`, read once per statement.
fn cursor_values(
    view: &View,
    values: &[String],
    once: bool,
    mut bind: impl FnMut(usize, String) -> String,
) -> String {
    let vals: Vec<String> = view
        .cursor
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (c, v))| {
            let value = format!("{}::{}", bind(i, v.clone()), c.sql_type);
            if once {
                format!("(select {value})")
            } else {
                value
            }
        })
        .collect();
    format!("({})", vals.join(", "))
}

fn all_of(preds: Vec<String>) -> String {
    if preds.is_empty() {
        "true".to_string()
    } else {
        preds.join(" and ")
    }
}
