//! The names of what `install` creates in a source for a notify job, derived from the job's
//! name. They live here, below both config (which checks that each fits in a PostgreSQL
//! identifier when it loads the job) and the notify source (which creates and finds them).

/// The schema of pgtide's own objects, in the sources (event tables, trigger functions) and
/// in the DWH (the control table, `try_cast`).
pub const SCHEMA: &str = "pgtide";

/// The event table (in schema `pgtide`).
pub fn event_table(job: &str) -> String {
    format!("{job}_events")
}

/// The statement trigger's function: one NOTIFY per statement, and TRUNCATE recorded.
pub fn notify_function(job: &str) -> String {
    format!("{job}_notify")
}

/// The row trigger's function of the view's table `i` (0 is the main table).
pub fn capture_function(job: &str, i: usize) -> String {
    format!("{job}_capture_{i}")
}

/// The LISTEN/NOTIFY channel (job names are `[a-z0-9_]+`).
pub fn channel(job: &str) -> String {
    format!("pgtide_{job}")
}

/// The prefix of every trigger name of a job, for finding them in the catalog.
pub fn trigger_prefix(job: &str) -> String {
    format!("pgtide_{job}_")
}

/// The row trigger on the view's table `i`.
pub fn row_trigger(job: &str, i: usize) -> String {
    format!("{}{i}_row", trigger_prefix(job))
}

/// The statement trigger on the view's table `i`.
pub fn statement_trigger(job: &str, i: usize) -> String {
    format!("{}{i}_stmt", trigger_prefix(job))
}

/// Every name `install` creates for a job whose view reads `tables` tables.
pub fn all(job: &str, tables: usize) -> Vec<String> {
    let mut names = vec![event_table(job), notify_function(job), channel(job)];
    for i in 0..tables {
        names.push(capture_function(job, i));
        names.push(row_trigger(job, i));
        names.push(statement_trigger(job, i));
    }
    names
}
