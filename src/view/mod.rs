//! The view: a job's columns resolved against the source catalog, and the SQL that reads it.
//!
//! `resolve` looks every table, column and type up with bound parameters and stops with a
//! message naming the table and column when something is missing; `sql` turns the resolved
//! view into the statements pgtide runs, every identifier quoted.

pub mod resolve;
pub mod sql;

use std::sync::Arc;

use crate::config::JobSpec;

pub use resolve::{resolve, ViewError};

/// One target column: its SQL expression in the source query and its type in the DWH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewColumn {
    pub name: String,
    /// Expression in the source query, already cast to `target_type` where needed.
    pub expr: String,
    /// The type the column has in the target (and the staging table), as SQL.
    pub target_type: String,
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
}

impl View {
    /// Positions of the key columns among `columns`.
    pub fn key_positions(&self) -> Vec<usize> {
        self.job
            .key
            .iter()
            .filter_map(|k| self.columns.iter().position(|c| &c.name == k))
            .collect()
    }
}
