//! The view: a job's columns resolved against the source catalog, and the SQL that reads it.
//!
//! `resolve` looks every table, column and type up with bound parameters and stops with a
//! message naming the table and column when something is missing; `sql` turns the resolved
//! view into the statements pgtide runs, every identifier quoted.

pub mod range;
pub mod resolve;
pub mod sql;

use std::sync::Arc;

use crate::config::JobSpec;

pub use resolve::{resolve, ViewError};

/// The `origin` of a column computed by a job's own `sql` expression.
pub const SQL_ORIGIN: &str = "sql";

/// One target column: its SQL expression in the source query and its type in the DWH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewColumn {
    pub name: String,
    /// Expression in the source query; its type is `stage_type`.
    pub expr: String,
    /// The type the column has in the target, as SQL.
    pub target_type: String,
    /// The type the source sends and the staging table holds (usually `target_type`).
    pub stage_type: String,
    /// How the DWH turns the staged value (`s."name"`) into the target value, when it is not
    /// taken as it is.
    pub load: Option<String>,
    /// Where the value comes from, for messages: `o.payload json meta.channel`.
    pub origin: String,
    /// Whether the view can hold NULL here (a nullable column, a left join, an expression).
    pub nullable: bool,
    /// The DWH type a job names with `type` when the DWH is not PostgreSQL (ClickHouse);
    /// `target_type` is then the source's type of the value.
    pub dwh_type: Option<String>,
}

/// A column whose values pgtide counts or checks beyond what SQL does by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub column: String,
    pub origin: String,
    pub kind: CheckKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A value map without a default: values it does not know become NULL and are counted.
    Unmapped {
        /// The source value as text.
        raw: String,
        /// The setting holding the map (jsonb).
        map_setting: String,
    },
    /// A JSON field: every step of the path must be an object (or an array, for a numeric
    /// step) or missing; the value must cast to `ty`.
    Json {
        /// The document, as jsonb.
        doc: String,
        /// The extracted value as text.
        raw: String,
        /// Per step: the setting holding the path up to it, and whether an array may hold it.
        steps: Vec<(String, bool)>,
        path: Vec<String>,
        ty: String,
        on_error: crate::config::OnError,
    },
}

impl CheckKind {
    /// A boolean expression: every step of a JSON path is traversable (never NULL).
    pub fn shape_ok(&self) -> Option<String> {
        let CheckKind::Json { doc, steps, .. } = self else {
            return None;
        };
        let parts: Vec<String> = steps
            .iter()
            .map(|(setting, array_ok)| {
                format!(
                    "coalesce(jsonb_typeof({doc} #> current_setting('{}{setting}')::text[]), 'null') in ('null', 'object'{})",
                    sql::SETTING_PREFIX,
                    if *array_ok { ", 'array'" } else { "" }
                )
            })
            .collect();
        Some(format!("({})", parts.join(" and ")))
    }

    /// `array[jsonb_typeof(...)]` of every step, to say which one is wrong.
    pub fn step_types(&self) -> Option<String> {
        let CheckKind::Json { doc, steps, .. } = self else {
            return None;
        };
        let parts: Vec<String> = steps
            .iter()
            .map(|(setting, _)| {
                format!(
                    "coalesce(jsonb_typeof({doc} #> current_setting('{}{setting}')::text[]), 'null')",
                    sql::SETTING_PREFIX
                )
            })
            .collect();
        Some(format!("array[{}]", parts.join(", ")))
    }
}

/// One column of the keyset cursor, on the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorColumn {
    pub name: String,
    /// The column's type as SQL, for casting a watermark value given as text.
    pub sql_type: String,
}

/// A value passed to the source session with `set_config` (a bound parameter) and read by
/// the query with `current_setting`, because COPY statements take no parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone)]
pub struct View {
    pub job: Arc<JobSpec>,
    pub columns: Vec<ViewColumn>,
    pub cursor: Vec<CursorColumn>,
    /// Settings the view query itself needs (value maps, JSON paths).
    pub settings: Vec<Setting>,
    /// Columns whose values are counted (unmapped, set NULL) or checked (JSON shape).
    pub checks: Vec<Check>,
    /// Per table of the view (main table first): what a notify job's trigger records.
    pub captured: Vec<Captured>,
}

/// What a notify job's trigger records about a changed row of one table of the view, and how
/// those values lead back to the view rows the change affects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The table's alias.
    pub alias: String,
    /// The columns the trigger records: for the main table those behind the view's key, for a
    /// joined table its side of the join's equalities.
    pub columns: Vec<String>,
    /// Per recorded column, what it is compared with in the view query (for the main table the
    /// column itself, for a joined table the earlier table's side) and that column's type.
    pub matches: Vec<(String, String)>,
}

impl View {
    /// Whether binary COPY output fits the target as is (no column is cast in the DWH).
    pub fn copies_as_is(&self) -> bool {
        self.columns
            .iter()
            .all(|c| c.load.is_none() && c.stage_type == c.target_type)
    }

    /// Whether every key column is a column of the view's tables or a transform of one (not
    /// a `sql` expression, which may give another value each time it is evaluated): two
    /// reads of the same rows in one snapshot give the same keys.
    pub fn key_is_plain(&self) -> bool {
        self.key_positions().len() == self.job.key.len()
            && self
                .key_positions()
                .iter()
                .all(|i| self.columns[*i].origin != SQL_ORIGIN)
    }

    /// Positions of the key columns among `columns`.
    pub fn key_positions(&self) -> Vec<usize> {
        self.job
            .key
            .iter()
            .filter_map(|k| self.columns.iter().position(|c| &c.name == k))
            .collect()
    }
}
