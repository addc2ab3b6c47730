//! `pgtide verify`: compare a job's target with the view over its source, by key, and repair the
//! rows that differ.
//!
//! Only what the job has reached is compared: view rows up to a poll job's stored watermark
//! (the DWH's copy of the position), minus the rows its open recheck windows will still re-read;
//! for a notify job every view row once its first load is done, minus keys whose events are
//! still waiting.
//!
//! The comparison costs one read of each side, done by the databases themselves, at once. Each
//! side hashes its rows (`hash_record_extended`, by each type's own hash function, which agrees
//! with the type's equality; text in "C"; the source's values cast to the target's column
//! types) and sums the hashes per bucket of keys; a key's bucket comes from a hash of the key,
//! the same on every server. Only the sums cross the wire. The buckets whose sums differ are
//! read again from both sides, ordered by the key's hash (never by a collation, which may
//! differ between the servers), and merged; the keys that may differ go to a temporary file.
//! Servers before PostgreSQL 14 hash the md5 of the row's text instead. With `--from/--to` the
//! source drives: its rows in the range, batch by batch, looked up in the target by key.
//!
//! Hashes only find candidates. At the end every key found is read again on both sides and
//! compared in the DWH, as the job's upsert compares, with the values the job would write
//! (`pgtide.try_cast` included); a key counts only if it differs in two such reads, so a row
//! that changed while verify ran is not reported. Memory holds the bucket sums and one batch of
//! keys, never the table.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};
use std::sync::Arc;
use std::time::Instant;

use futures_util::{pin_mut, StreamExt};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, RowStream, Transaction};

use crate::config::{ColumnKind, JobSpec, Mode, OnDelete};
use crate::job::{self, Context, JobError};
use crate::pg::quote_ident;
use crate::position::Position;
use crate::sink::{self, SinkError};
use crate::source::{self, notify};
use crate::view::range::Range as Rows;
use crate::view::sql;
use crate::view::{Setting, View};

/// How many keys of each kind a report names.
pub const NAMED_KEYS: usize = 10;
/// Rows per bucket of keys: a bucket that differs is read again from both sides, so it should
/// be small; the sums of all buckets (one row of about 60 bytes each) stay a small fraction of
/// the table.
const ROWS_PER_BUCKET: i64 = 100;
/// At most this many buckets (about 30 bytes of memory each per side), whatever the table's
/// size: beyond 13 million rows, buckets grow instead.
const MAX_BUCKETS: i64 = 1 << 17;
/// Debug builds: digest rows by the md5 of their text, as with servers before PostgreSQL 14.
pub const TEXT_DIGEST: &str = "PGTIDE_VERIFY_TEXT_DIGEST";
/// How long a running job gets to apply what it is applying before a difference is confirmed
/// (a drain takes milliseconds).
const CONFIRM_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("target {0} does not exist in the dwh (has the job run yet?)")]
    NoTarget(String),
    #[error("--repair reads the view's rows by key, which needs a key column taken as it is from the main table (from = \"alias.column\" of [from]); reload with `pgtide replay` instead")]
    NoRepairKey,
    #[error("temporary file of differing keys: {0}")]
    Spill(#[source] std::io::Error),
}

impl From<SinkError> for VerifyError {
    fn from(e: SinkError) -> Self {
        VerifyError::Job(JobError::Sink(e))
    }
}

fn src(e: tokio_postgres::Error) -> VerifyError {
    VerifyError::Job(JobError::Source(e))
}

fn dwh_err(e: tokio_postgres::Error) -> VerifyError {
    VerifyError::Job(JobError::Sink(SinkError::Db(e)))
}

/// What `verify` was asked.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only view rows whose main-table cursor lies in `(from, to]` (values as given).
    pub from: Option<Vec<String>>,
    pub to: Option<Vec<String>>,
    /// Rewrite the rows that differ (holding the job's lock), then compare again.
    pub repair: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Missing,
    Different,
    Extra,
}

/// The first keys of each kind, each key as its values' text (in `key` order).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Keys {
    pub missing: Vec<Vec<String>>,
    pub different: Vec<Vec<String>>,
    pub extra: Vec<Vec<String>>,
}

/// What one comparison found.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Outcome {
    /// View rows the job has reached, compared with the target.
    pub compared: u64,
    /// In the view, not in the target.
    pub missing: u64,
    /// In both, with other values (or marked `_pgtide_deleted` in the target).
    pub different: u64,
    /// In the target, not in the view (counted for notify jobs that delete only).
    pub extra: u64,
    /// Up to `NAMED_KEYS` keys of each kind.
    pub keys: Keys,
}

impl Outcome {
    /// Nothing differs.
    pub fn clean(&self) -> bool {
        self.missing + self.different + self.extra == 0
    }

    fn add(&mut self, kind: Kind, key: &[String]) {
        let (n, named) = match kind {
            Kind::Missing => (&mut self.missing, &mut self.keys.missing),
            Kind::Different => (&mut self.different, &mut self.keys.different),
            Kind::Extra => (&mut self.extra, &mut self.keys.extra),
        };
        *n += 1;
        if named.len() < NAMED_KEYS {
            named.push(key.to_vec());
        }
    }
}

/// What `--repair` found and wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Repaired {
    /// The comparison before the repair.
    #[serde(flatten)]
    pub found: Outcome,
    /// Rows the DWH inserted or changed.
    pub written: u64,
    /// Target rows deleted or marked deleted.
    pub deleted: u64,
}

/// The result of `verify`: with `--repair`, `outcome` is the comparison after the repair.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub job: String,
    pub mode: &'static str,
    pub target: String,
    /// Whether rows extra in the target count: notify jobs with `on_delete` "delete" or "soft",
    /// over the whole view (a row that is not in the view has no cursor to lie in a range).
    pub extra_counted: bool,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub repaired: Option<Repaired>,
    pub seconds: f64,
}

impl Report {
    /// Nothing differs (after the repair, with `--repair`).
    pub fn clean(&self) -> bool {
        self.outcome.clean()
    }

    /// A short report for people.
    pub fn human(&self) -> String {
        let mut out = String::new();
        if let Some(r) = &self.repaired {
            if r.found.clean() {
                out.push_str(&format!("job {}: nothing to repair\n", self.job));
            } else {
                out.push_str(&format!(
                    "job {}: repaired {} missing, {} different, {} extra ({} rows written, {} deleted)\n",
                    self.job, r.found.missing, r.found.different, r.found.extra, r.written, r.deleted
                ));
                out.push_str(&named_keys(&r.found));
            }
        }
        let o = &self.outcome;
        let scope = if self.repaired.as_ref().is_some_and(|r| !r.found.clean()) {
            "after the repair, "
        } else {
            ""
        };
        if o.clean() {
            out.push_str(&format!(
                "job {}: {scope}target {} matches the view ({} rows compared{})\n",
                self.job,
                self.target,
                o.compared,
                self.extra_note()
            ));
        } else {
            out.push_str(&format!(
                "job {}: {scope}target {} differs from the view: {} missing, {} different, {} extra ({} rows compared{})\n",
                self.job, self.target, o.missing, o.different, o.extra, o.compared, self.extra_note()
            ));
            out.push_str(&named_keys(o));
        }
        out
    }

    fn extra_note(&self) -> &'static str {
        if self.extra_counted {
            ""
        } else if self.mode == Mode::Poll.as_str() {
            "; extra rows are not counted for poll jobs"
        } else {
            "; extra rows are not counted for this job"
        }
    }
}

fn named_keys(o: &Outcome) -> String {
    let mut out = String::new();
    for (label, n, keys) in [
        ("missing", o.missing, &o.keys.missing),
        ("different", o.different, &o.keys.different),
        ("extra", o.extra, &o.keys.extra),
    ] {
        if keys.is_empty() {
            continue;
        }
        let shown: Vec<String> = keys
            .iter()
            .map(|k| match k.as_slice() {
                [one] => one.clone(),
                many => format!("({})", many.join(", ")),
            })
            .collect();
        let more = if n as usize > keys.len() { ", ..." } else { "" };
        out.push_str(&format!("  {label}: {}{more}\n", shown.join("; ")));
    }
    out
}

/// Compare the job's target with the view over its source; with `repair`, rewrite what
/// differs and compare again. Differences are a report, not an error.
pub async fn verify(
    ctx: &Context,
    job: &Arc<JobSpec>,
    opts: Options,
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let mut dwh = ctx.connect_dwh(job).await?;
    // A repair must never race a run of the job; a plain comparison takes no lock.
    if opts.repair && !sink::try_lock(&dwh, &job.name).await? {
        return Err(JobError::Locked.into());
    }
    let result = run(ctx, job, &opts, &mut dwh).await;
    if opts.repair {
        if let Err(e) = sink::unlock(&dwh, &job.name).await {
            tracing::debug!(job = %job.name, error = %e, "unlock failed; the lock ends with the session");
        }
    }
    let mut report = result?;
    report.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    let o = &report.outcome;
    tracing::info!(job = %job.name, compared = o.compared, missing = o.missing, different = o.different,
        extra = o.extra, ms = started.elapsed().as_millis() as u64, "verified");
    Ok(report)
}

async fn run(
    ctx: &Context,
    job: &Arc<JobSpec>,
    opts: &Options,
    dwh: &mut Client,
) -> Result<Report, VerifyError> {
    let mut source = ctx.connect_source(job).await?;
    let view = crate::view::resolve(&source, job)
        .await
        .map_err(JobError::from)?;
    if opts.repair {
        sink::ensure_control(dwh).await?;
        sink::ensure_target(dwh, &view).await?;
        sink::create_staging(dwh, &view).await?;
    }
    let pos = position(dwh, &job.name).await?;
    let plan = Plan::new(&source, dwh, view, pos.as_ref(), opts).await?;
    let mut repair = opts.repair.then(|| Repair::new(&plan.view));
    let first = compare(&plan, &mut source, dwh, repair.as_mut()).await?;
    let (outcome, repaired) = match repair {
        None => (first, None),
        Some(r) => {
            let after = if first.clean() {
                first.clone()
            } else {
                compare(&plan, &mut source, dwh, None).await?
            };
            let repaired = Repaired {
                found: first,
                written: r.written,
                deleted: r.deleted,
            };
            (after, Some(repaired))
        }
    };
    Ok(Report {
        job: job.name.clone(),
        mode: job.mode.as_str(),
        target: job.target.to_string(),
        extra_counted: plan.counts_extra,
        outcome,
        repaired,
        seconds: 0.0,
    })
}

/// The job's position as the DWH holds it (the truth), `None` before its first batch.
async fn position(dwh: &Client, job: &str) -> Result<Option<Position>, VerifyError> {
    let control = format!("{}.positions", quote_ident(sink::CONTROL_SCHEMA));
    let exists: bool = dwh
        .query_one("select to_regclass($1) is not null", &[&control])
        .await
        .map_err(dwh_err)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(sink::read_position(dwh, job).await?)
}

/// A watermark value from the command line, checked and canonicalized by the source.
async fn normalize(
    source: &Client,
    view: &View,
    v: Option<&[String]>,
    flag: &str,
) -> Result<Option<Vec<String>>, VerifyError> {
    match v {
        None => Ok(None),
        Some(v) => source::normalize(source, view, v)
            .await
            .map(Some)
            .map_err(|m| JobError::Input(format!("{flag}: {m}")).into()),
    }
}

/// How far the job has read the view.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    /// Nothing yet.
    Nothing,
    /// The rows up to this cursor value.
    UpTo(Vec<String>),
    /// Every row (a notify job past its first load).
    All,
}

/// One view column as verify compares it (columns marked `deleted` are not compared: the
/// source has no value for them, and the target keeps its old ones).
struct Col {
    name: String,
    /// The view's expression.
    expr: String,
    /// The type the view gives it (what `pgtide.try_cast` casts to).
    view_type: String,
    /// Its type in the target (the view's when the target lacks the column, or when the
    /// source does not know the target's type).
    ty: String,
    in_target: bool,
    /// Cast by the DWH (`on_error = "null"`): the source sends text.
    dwh_cast: bool,
    /// Its type has no hash function: hashed as text.
    hash_as_text: bool,
    /// Its type has a collation: hashed in "C", the bytes, whatever collation the source
    /// column has (a case-insensitive one would hash 'a' and 'A' alike).
    collatable: bool,
    /// Compared as text, as the job's upsert does (types without equality).
    compare_as_text: bool,
}

/// `(from, to]` of the cursor; either side may be open.
type Range = (Option<Vec<String>>, Option<Vec<String>>);

/// Everything the comparison queries need, fixed at the start.
struct Plan {
    view: View,
    /// The target, quoted.
    target: String,
    cols: Vec<Col>,
    /// Positions in `cols` of the key's columns, in `key` order.
    key: Vec<usize>,
    /// The target has `_pgtide_deleted` and the job marks deletes there.
    marks: bool,
    /// The rows the job has reached, as a condition over the view's tables.
    scope: String,
    /// The settings `scope` reads (the view's own are added by `source::set_settings`).
    settings: Vec<Setting>,
    counts_extra: bool,
    /// The source has `pg_input_is_valid` (PostgreSQL 16): values the DWH casts with
    /// `try_cast` can be cast the same way on the source.
    soft_input: bool,
    /// Both servers have `hash_record_extended` (PostgreSQL 14): rows are hashed by their
    /// types' own hash functions (consistent with equality, as the job's upsert compares),
    /// else by the md5 of their text.
    hashing: bool,
    /// `--from` / `--to`, checked and canonicalized by the source.
    range: Option<Range>,
    reach: Reach,
    /// A notify job's event table, when it exists.
    events: Option<String>,
}

impl Plan {
    async fn new(
        source: &Client,
        dwh: &Client,
        view: View,
        pos: Option<&Position>,
        opts: &Options,
    ) -> Result<Plan, VerifyError> {
        let job = view.job.clone();
        let target_cols: HashMap<String, String> = dwh
            .query(
                "select a.attname::text, format_type(a.atttypid, a.atttypmod) from pg_attribute a
                 join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
                 where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')
                   and a.attnum > 0 and not a.attisdropped",
                &[&job.target.schema, &job.target.name],
            )
            .await
            .map_err(dwh_err)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if target_cols.is_empty() {
            return Err(VerifyError::NoTarget(job.target.to_string()));
        }
        let mut cols = Vec::new();
        for c in &view.columns {
            let deleted = job
                .columns
                .iter()
                .any(|s| s.name == c.name && matches!(s.kind, ColumnKind::Deleted { .. }));
            if deleted {
                continue;
            }
            let (mut ty, in_target) = match target_cols.get(&c.name) {
                Some(t) => (t.clone(), true),
                None => (c.target_type.clone(), false),
            };
            if ty != c.target_type {
                let known: bool = source
                    .query_one("select to_regtype($1) is not null", &[&ty])
                    .await
                    .map_err(src)?
                    .get(0);
                if !known {
                    ty = c.target_type.clone();
                }
            }
            let collatable: bool = source
                .query_one(
                    "select coalesce((select typcollation <> 0 from pg_type where oid = to_regtype($1)), false)",
                    &[&ty],
                )
                .await
                .map_err(src)?
                .get(0);
            cols.push(Col {
                name: c.name.clone(),
                expr: c.expr.clone(),
                view_type: c.target_type.clone(),
                compare_as_text: sink::compare_as_text(&ty),
                ty,
                in_target,
                dwh_cast: c.load.is_some(),
                hash_as_text: false,
                collatable,
            });
        }
        let version = "select current_setting('server_version_num')::int";
        let src_version: i32 = source.query_one(version, &[]).await.map_err(src)?.get(0);
        let dwh_version: i32 = dwh.query_one(version, &[]).await.map_err(dwh_err)?.get(0);
        // Tests of debug builds reach the path of older servers with this variable.
        let forced_text = cfg!(debug_assertions) && std::env::var_os(TEXT_DIGEST).is_some();
        let hashing = src_version >= 140000 && dwh_version >= 140000 && !forced_text;
        if hashing {
            for c in &mut cols {
                // The server's own answer: hashing a NULL of the type fails without a hash
                // function (json, point, xml, ...).
                let probe = format!("select hash_record_extended(row(null::{}), 0)", c.ty);
                let hashable = |r: Result<Row, tokio_postgres::Error>| match r {
                    Ok(_) => Ok(true),
                    Err(e) if e.code().is_some() => Ok(false),
                    Err(e) => Err(e),
                };
                let on_source =
                    hashable(source.query_one(probe.as_str(), &[]).await).map_err(src)?;
                let on_dwh = hashable(dwh.query_one(probe.as_str(), &[]).await).map_err(dwh_err)?;
                c.hash_as_text = !(on_source && on_dwh);
            }
        }
        let mut key = Vec::new();
        for k in &job.key {
            match cols.iter().position(|c| &c.name == k) {
                Some(i) => key.push(i),
                None => {
                    return Err(JobError::Input(format!(
                        "key column {k} is not a compared column of the view"
                    ))
                    .into())
                }
            }
        }
        let marks = job.mode == Mode::Notify
            && job.on_delete == OnDelete::Soft
            && target_cols.contains_key(sink::DELETED);
        let soft_input = src_version >= 160000;
        let from = normalize(source, &view, opts.from.as_deref(), "--from").await?;
        let to = normalize(source, &view, opts.to.as_deref(), "--to").await?;
        let range = (from.is_some() || to.is_some()).then_some((from, to));
        let reach = match (job.mode, pos) {
            (_, None) => Reach::Nothing,
            (Mode::Notify, Some(p)) if p.initial_done => Reach::All,
            (_, Some(p)) => p.watermark.clone().map_or(Reach::Nothing, Reach::UpTo),
        };
        let mut parts = Vec::new();
        let mut settings = Vec::new();
        if let Some((from, to)) = &range {
            let b = Rows::Cursor {
                lo: from.as_deref(),
                hi: to.as_deref(),
            }
            .bind(&view, "vr");
            parts.push(b.predicate);
            settings.extend(b.settings);
        }
        match &reach {
            Reach::Nothing => parts.push("false".into()),
            Reach::All => {}
            Reach::UpTo(w) => {
                let b = Rows::Cursor {
                    lo: None,
                    hi: Some(w),
                }
                .bind(&view, "vm");
                parts.push(b.predicate);
                settings.extend(b.settings);
            }
        }
        // A poll job re-reads the rows of its open windows that late transactions wrote: it
        // has not reached them yet. (A notify job has events for those.)
        if let (Mode::Poll, Some(p)) = (job.mode, pos) {
            if !p.windows.is_empty() {
                let b = Rows::Windows(&p.windows).bind(&view, "vw");
                parts.push(format!("not ({})", b.predicate));
                settings.extend(b.settings);
            }
        }
        let scope = if parts.is_empty() {
            "true".to_string()
        } else {
            parts
                .iter()
                .map(|p| format!("({p})"))
                .collect::<Vec<_>>()
                .join(" and ")
        };
        let events = if job.mode == Mode::Notify {
            let table = notify::event_table(&job.name);
            let exists: bool = source
                .query_one("select to_regclass($1) is not null", &[&table])
                .await
                .map_err(src)?
                .get(0);
            exists.then_some(table)
        } else {
            None
        };
        Ok(Plan {
            target: crate::pg::quote_qualified(&job.target.schema, &job.target.name),
            counts_extra: job.mode == Mode::Notify
                && job.on_delete != OnDelete::Ignore
                && range.is_none(),
            view,
            cols,
            key,
            marks,
            scope,
            settings,
            soft_input,
            hashing,
            range,
            reach,
            events,
        })
    }

    /// A column's value in the source's digest: cast to the target's type, as the job writes it.
    fn src_value(&self, c: &Col) -> String {
        match (c.dwh_cast, self.soft_input) {
            (false, _) => self.hashed(format!("({})::{}", c.expr, c.ty), c, false),
            (true, true) => self.hashed(
                format!(
                    "(case when pg_input_is_valid({e}, '{vt}') then ({e})::{vt} end)::{ty}",
                    e = c.expr,
                    vt = c.view_type.replace('\'', "''"),
                    ty = c.ty
                ),
                c,
                false,
            ),
            // Without pg_input_is_valid the source cannot cast as try_cast does: compare the
            // text, which equals the target value's text whenever the cast kept it as it was.
            // Rows where it did not are read again and compared in the DWH at the end.
            (true, false) => self.hashed(format!("({})", c.expr), c, true),
        }
    }

    /// A column's value in the target's digest.
    fn tgt_value(&self, c: &Col) -> String {
        let col = format!("t.{}", quote_ident(&c.name));
        match (c.in_target, c.dwh_cast && !self.soft_input) {
            (false, _) => "null::text".into(),
            (true, true) => self.hashed(format!("{col}::text"), c, true),
            (true, false) => self.hashed(col, c, false),
        }
    }

    /// A value as it goes into a row hash: as text where its type has no hash function, in
    /// "C" where it has a collation.
    fn hashed(&self, e: String, c: &Col, is_text: bool) -> String {
        if !self.hashing {
            return e;
        }
        let e = if c.hash_as_text && !is_text {
            format!("({e})::text")
        } else {
            e
        };
        if c.collatable || c.hash_as_text || is_text {
            format!("({e}) collate \"C\"")
        } else {
            e
        }
    }

    /// A column's value as text for the comparison in the DWH: its text in the target's type,
    /// or for columns the DWH casts, the text the job sends.
    fn src_text(&self, c: &Col) -> String {
        if c.dwh_cast {
            format!("({})", c.expr)
        } else {
            format!("(({})::{})::text", c.expr, c.ty)
        }
    }

    /// The DWH's value of column `i` rebuilt from the text in `s.v<i>`, as the job writes it.
    fn rebuilt(&self, i: usize, c: &Col) -> String {
        if c.dwh_cast {
            format!(
                "{}.try_cast(s.v{i}, null::{})::{}",
                quote_ident(sink::CONTROL_SCHEMA),
                c.view_type,
                c.ty
            )
        } else {
            format!("s.v{i}::{}", c.ty)
        }
    }

    fn src_keys(&self) -> Vec<String> {
        self.key
            .iter()
            .map(|&i| self.src_text(&self.cols[i]))
            .collect()
    }

    fn tgt_keys(&self) -> Vec<String> {
        self.key
            .iter()
            .map(|&i| format!("t.{}::text", quote_ident(&self.cols[i].name)))
            .collect()
    }

    /// A 64-bit hash (int8) of the view row.
    fn src_digest(&self) -> String {
        self.row_hash(self.cols.iter().map(|c| self.src_value(c)).collect())
    }

    /// A 64-bit hash (int8) of the target row.
    fn tgt_digest(&self) -> String {
        self.row_hash(self.cols.iter().map(|c| self.tgt_value(c)).collect())
    }

    /// A 64-bit hash (int8) of the view row's key: its bucket, and the merge's order.
    fn src_key_hash(&self) -> String {
        if self.hashing {
            self.row_hash(
                self.key
                    .iter()
                    .map(|&i| self.src_value(&self.cols[i]))
                    .collect(),
            )
        } else {
            md5_hash(&format!("array[{}]::text", self.src_keys().join(", ")))
        }
    }

    fn tgt_key_hash(&self) -> String {
        if self.hashing {
            self.row_hash(
                self.key
                    .iter()
                    .map(|&i| self.tgt_value(&self.cols[i]))
                    .collect(),
            )
        } else {
            md5_hash(&format!("array[{}]::text", self.tgt_keys().join(", ")))
        }
    }

    fn row_hash(&self, values: Vec<String>) -> String {
        if self.hashing {
            format!("hash_record_extended(row({}), 0)", values.join(", "))
        } else {
            md5_hash(&format!("row({})::text", values.join(", ")))
        }
    }

    /// The view rows compared: reached by the job, with a whole key.
    fn src_where(&self) -> String {
        let not_null: Vec<String> = self
            .key
            .iter()
            .map(|&i| format!("({}) is not null", self.cols[i].expr))
            .collect();
        format!("({}) and {}", self.scope, not_null.join(" and "))
    }

    /// The view rows up to the job's watermark, with a whole key: the whole-table passes' cheap
    /// form of `src_where`, the watermark's values bound from parameter `$first` on (so the
    /// server plans with them). Rows it takes that the job has not reached (its open windows,
    /// a range) are sorted out when the keys found are read again.
    fn src_where_bound(&self, first: usize) -> (String, Vec<String>) {
        let not_null: Vec<String> = self
            .key
            .iter()
            .map(|&i| format!("({}) is not null", self.cols[i].expr))
            .collect();
        let (reach, values) = match &self.reach {
            Reach::Nothing => ("false".to_string(), Vec::new()),
            Reach::All => ("true".to_string(), Vec::new()),
            Reach::UpTo(w) => {
                let alias = &self.view.job.from.alias;
                let cols: Vec<String> = self
                    .view
                    .cursor
                    .iter()
                    .map(|c| sql::column(alias, &c.name))
                    .collect();
                let params: Vec<String> = self
                    .view
                    .cursor
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("${}::text::{}", first + i, c.sql_type))
                    .collect();
                (
                    format!("({}) <= ({})", cols.join(", "), params.join(", ")),
                    w.clone(),
                )
            }
        };
        (format!("{reach} and {}", not_null.join(" and ")), values)
    }

    fn marked(&self) -> String {
        if self.marks {
            format!("coalesce(t.{}, false)", quote_ident(sink::DELETED))
        } else {
            "false".into()
        }
    }

    /// `(<key exprs>) in (<arrays $first..>)`: rows of the keys given as text arrays.
    fn key_in(&self, exprs: &[String], first: usize) -> String {
        let arrays: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("${}::text[]::{}[]", first + n, self.cols[i].ty))
            .collect();
        sql::in_arrays(exprs, &arrays)
    }
}

/// The first 64 bits of the md5 of a text, as int8.
fn md5_hash(text: &str) -> String {
    format!("('x' || substr(md5({text}), 1, 16))::bit(64)::int8")
}

/// The bucket of a key hash, among `$1` buckets.
fn bucket_of(kh: &str) -> String {
    format!("((({kh}) & 1073741823)::int4 % $1)")
}

/// Keys that may differ, kept on disk until they are read again.
struct Spill {
    out: BufWriter<std::fs::File>,
    keys: u64,
}

impl Spill {
    fn new() -> Result<Spill, VerifyError> {
        Ok(Spill {
            out: BufWriter::new(tempfile::tempfile().map_err(VerifyError::Spill)?),
            keys: 0,
        })
    }

    fn push(&mut self, key: &[String]) -> Result<(), VerifyError> {
        serde_json::to_writer(&mut self.out, key).map_err(|e| VerifyError::Spill(e.into()))?;
        self.keys += 1;
        self.out.write_all(b"\n").map_err(VerifyError::Spill)
    }

    fn read(self) -> Result<std::io::Lines<BufReader<std::fs::File>>, VerifyError> {
        let mut f = self
            .out
            .into_inner()
            .map_err(|e| VerifyError::Spill(e.into_error()))?;
        f.rewind().map_err(VerifyError::Spill)?;
        Ok(BufReader::new(f).lines())
    }
}

/// One comparison: find the keys that may differ, then read them again on both sides.
async fn compare(
    plan: &Plan,
    source: &mut Client,
    dwh: &mut Client,
    repair: Option<&mut Repair>,
) -> Result<Outcome, VerifyError> {
    let mut spill = Spill::new()?;
    let mut outcome = Outcome {
        compared: match plan.range {
            None => by_buckets(plan, source, dwh, &mut spill).await?,
            Some(_) => by_range(plan, source, dwh, &mut spill).await?,
        },
        ..Outcome::default()
    };
    tracing::info!(job = %plan.view.job.name, compared = outcome.compared, keys = spill.keys, "reading the keys that may differ again");
    recheck(plan, source, dwh, spill, &mut outcome, repair).await?;
    Ok(outcome)
}

/// Per bucket: its row count, and a hash of its count and digest sums.
type Sums = HashMap<i32, (i64, u64)>;

/// The bucket sums a query streams, kept as they arrive.
async fn sums(
    rows: Result<RowStream, tokio_postgres::Error>,
) -> Result<Sums, tokio_postgres::Error> {
    use std::hash::{Hash, Hasher};
    let rows = rows?;
    pin_mut!(rows);
    let mut out = Sums::new();
    while let Some(r) = rows.next().await {
        let r = r?;
        let count: i64 = r.get(1);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (count, r.get::<_, &str>(2)).hash(&mut h);
        out.insert(r.get(0), (count, h.finish()));
    }
    Ok(out)
}

/// Compare bucket sums, then merge the rows of the buckets that differ; returns how many view
/// rows were compared.
async fn by_buckets(
    plan: &Plan,
    source: &mut Client,
    dwh: &Client,
    spill: &mut Spill,
) -> Result<u64, VerifyError> {
    // The planner's estimates of both tables' sizes (a count where there is none).
    let estimate =
        "select coalesce((select reltuples::int8 from pg_class where oid = to_regclass($1)), -1)";
    let main = &plan.view.job.from.name;
    let main = crate::pg::quote_qualified(&main.schema, &main.name);
    let source_rows: i64 = source
        .query_one(estimate, &[&main])
        .await
        .map_err(src)?
        .get(0);
    let mut target_rows: i64 = dwh
        .query_one(estimate, &[&plan.target])
        .await
        .map_err(dwh_err)?
        .get(0);
    if target_rows < 0 {
        target_rows = dwh
            .query_one(&format!("select count(*) from {}", plan.target), &[])
            .await
            .map_err(dwh_err)?
            .get(0);
    }
    let buckets = (target_rows.max(source_rows) / ROWS_PER_BUCKET).clamp(1, MAX_BUCKETS) as i32;
    // The digests are taken below the grouping (`offset 0`), so a sort, if the server picks
    // one, sorts two numbers per row rather than the rows.
    let agg = |kh: &str, digest: &str, rows: &str| {
        format!(
            "select b, count(*), sum(d)::text from (select {} as b, {digest} as d {rows} offset 0) x group by b",
            bucket_of(kh)
        )
    };
    let (bound, bound_values) = plan.src_where_bound(2);
    let src_rows = format!("{} where {bound}", sql::from_clause(&plan.view));
    let tgt_rows = format!("from {} t where not {}", plan.target, plan.marked());
    let src_kh = plan.src_key_hash();
    let tgt_kh = plan.tgt_key_hash();
    let (tx, _) = source::begin(source).await.map_err(src)?;
    source::set_settings(&tx, &plan.view, plan.settings.clone())
        .await
        .map_err(src)?;
    let src_q = agg(&src_kh, &plan.src_digest(), &src_rows);
    let tgt_q = agg(&tgt_kh, &plan.tgt_digest(), &tgt_rows);
    let mut src_params: Vec<&(dyn ToSql + Sync)> = vec![&buckets];
    src_params.extend(bound_values.iter().map(|v| v as &(dyn ToSql + Sync)));
    let count: [&(dyn ToSql + Sync); 1] = [&buckets];
    let (s, t) = tokio::join!(
        async {
            sums(
                tx.query_raw(src_q.as_str(), src_params.iter().copied())
                    .await,
            )
            .await
        },
        async { sums(dwh.query_raw(tgt_q.as_str(), count.iter().copied()).await).await }
    );
    let (s, t) = (s.map_err(src)?, t.map_err(dwh_err)?);
    let compared: i64 = s.values().map(|v| v.0).sum();
    let mut differ: Vec<i32> = s
        .iter()
        .filter(|(b, v)| t.get(b) != Some(v))
        .map(|(b, _)| *b)
        .collect();
    // A bucket only the target has holds extra rows only.
    if plan.counts_extra {
        differ.extend(t.keys().filter(|b| !s.contains_key(b)));
    }
    tracing::debug!(job = %plan.view.job.name, buckets, differ = differ.len(), "bucket sums compared");
    if differ.is_empty() {
        return Ok(compared as u64);
    }
    let rows = |kh: &str, keys: &[String], digest: &str, rows: &str| {
        format!(
            "select kh, k, d from (select {kh} as kh, array[{}] as k, {digest} as d {rows}) r
             where {} = any($2::int4[]) order by kh, k collate \"C\"",
            keys.join(", "),
            bucket_of("kh")
        )
    };
    let (bound, bound_values) = plan.src_where_bound(3);
    let src_rows = format!("{} where {bound}", sql::from_clause(&plan.view));
    let src_q = rows(&src_kh, &plan.src_keys(), &plan.src_digest(), &src_rows);
    let tgt_q = rows(&tgt_kh, &plan.tgt_keys(), &plan.tgt_digest(), &tgt_rows);
    let params: [&(dyn ToSql + Sync); 2] = [&buckets, &differ];
    let mut src_params: Vec<&(dyn ToSql + Sync)> = vec![&buckets, &differ];
    src_params.extend(bound_values.iter().map(|v| v as &(dyn ToSql + Sync)));
    let s = tx
        .query_raw(src_q.as_str(), src_params)
        .await
        .map_err(src)?;
    let t = dwh
        .query_raw(tgt_q.as_str(), params.iter().copied())
        .await
        .map_err(dwh_err)?;
    pin_mut!(s);
    pin_mut!(t);
    let mut a = next_row(s.as_mut()).await.map_err(src)?;
    let mut b = next_row(t.as_mut()).await.map_err(dwh_err)?;
    loop {
        let order = match (&a, &b) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => (x.0, &x.1).cmp(&(y.0, &y.1)),
        };
        match order {
            std::cmp::Ordering::Less => {
                spill.push(&a.as_ref().expect("a source row").1)?;
                a = next_row(s.as_mut()).await.map_err(src)?;
            }
            std::cmp::Ordering::Greater => {
                if plan.counts_extra {
                    spill.push(&b.as_ref().expect("a target row").1)?;
                }
                b = next_row(t.as_mut()).await.map_err(dwh_err)?;
            }
            std::cmp::Ordering::Equal => {
                let (x, y) = (a.as_ref().expect("a row"), b.as_ref().expect("a row"));
                if x.2 != y.2 {
                    spill.push(&x.1)?;
                }
                a = next_row(s.as_mut()).await.map_err(src)?;
                b = next_row(t.as_mut()).await.map_err(dwh_err)?;
            }
        }
    }
    drop(tx);
    Ok(compared as u64)
}

/// (key hash, key, digest) of the next row of a merge, if any.
async fn next_row(
    s: std::pin::Pin<&mut RowStream>,
) -> Result<Option<(i64, Vec<String>, i64)>, tokio_postgres::Error> {
    let mut s = s;
    Ok(s.next()
        .await
        .transpose()?
        .map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// With `--from/--to`: the source's rows of the range, batch by batch along the cursor, looked
/// up in the target by key; returns how many view rows were compared.
async fn by_range(
    plan: &Plan,
    source: &mut Client,
    dwh: &Client,
    spill: &mut Spill,
) -> Result<u64, VerifyError> {
    let (from, to) = plan.range.clone().expect("a range");
    let upper = match (&plan.reach, to) {
        (Reach::Nothing, _) => return Ok(0),
        (_, Some(to)) => Some(to),
        (Reach::UpTo(w), None) => Some(w.clone()),
        (Reach::All, None) => None,
    };
    let tgt_keys: Vec<String> = plan
        .key
        .iter()
        .map(|&i| format!("t.{}", quote_ident(&plan.cols[i].name)))
        .collect();
    let lookup = format!(
        "select array[{}], {}, {} from {} t where {}",
        plan.tgt_keys().join(", "),
        plan.tgt_digest(),
        plan.marked(),
        plan.target,
        plan.key_in(&tgt_keys, 1)
    );
    let mut compared = 0;
    let mut lo = from;
    loop {
        let (tx, _) = source::begin(source).await.map_err(src)?;
        let hi = source::batch_bound(
            &tx,
            &plan.view,
            lo.as_deref(),
            upper.as_deref(),
            plan.view.job.batch_size,
        )
        .await
        .map_err(src)?;
        let Some(hi) = hi else { break };
        let b = Rows::Cursor {
            lo: lo.as_deref(),
            hi: Some(&hi),
        }
        .bind(&plan.view, "vb");
        let mut settings = plan.settings.clone();
        settings.extend(b.settings);
        source::set_settings(&tx, &plan.view, settings)
            .await
            .map_err(src)?;
        let batch = b.predicate;
        let q = format!(
            "select array[{}], {} {} where {} and ({batch})",
            plan.src_keys().join(", "),
            plan.src_digest(),
            sql::from_clause(&plan.view),
            plan.src_where()
        );
        let rows = tx.query(q.as_str(), &[]).await.map_err(src)?;
        drop(tx);
        compared += rows.len() as u64;
        let found: Vec<(Vec<String>, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let columns: Vec<Vec<String>> = (0..plan.key.len())
            .map(|i| found.iter().map(|(k, _)| k[i].clone()).collect())
            .collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let target: HashMap<Vec<String>, (i64, bool)> = dwh
            .query(lookup.as_str(), &params)
            .await
            .map_err(dwh_err)?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        for (key, digest) in &found {
            match target.get(key) {
                Some((d, marked)) if d == digest && !marked => {}
                _ => spill.push(key)?,
            }
        }
        lo = Some(hi);
    }
    Ok(compared)
}

/// Read every key found again on both sides and count those that still differ (the job not
/// having reached them now is no difference); with `repair`, rewrite them.
async fn recheck(
    plan: &Plan,
    source: &mut Client,
    dwh: &mut Client,
    spill: Spill,
    outcome: &mut Outcome,
    mut repair: Option<&mut Repair>,
) -> Result<(), VerifyError> {
    let mut lines = spill.read()?;
    let chunk_size = plan.view.job.batch_size.max(1) as usize;
    let queries = Recheck::new(plan);
    loop {
        let mut chunk: Vec<Vec<String>> = Vec::new();
        for line in lines.by_ref() {
            let line = line.map_err(VerifyError::Spill)?;
            chunk.push(serde_json::from_str(&line).map_err(|e| VerifyError::Spill(e.into()))?);
            if chunk.len() == chunk_size {
                break;
            }
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let first = queries.classify(plan, source, dwh, &chunk).await?;
        if first.is_empty() {
            continue;
        }
        // A change the source committed between the two reads of a round and that the job
        // applied before the DWH's read looks like a difference: confirm in a second round,
        // once the job has had a moment to apply what it was applying.
        tokio::time::sleep(CONFIRM_AFTER).await;
        let chunk: Vec<Vec<String>> = first.into_iter().map(|(i, _)| chunk[i].clone()).collect();
        let confirmed = queries.classify(plan, source, dwh, &chunk).await?;
        let mut write = Vec::new();
        let mut gone = Vec::new();
        for (i, kind) in confirmed {
            outcome.add(kind, &chunk[i]);
            match kind {
                Kind::Extra => gone.push(chunk[i].clone()),
                _ => write.push(chunk[i].clone()),
            }
        }
        if let Some(r) = repair.as_deref_mut() {
            r.fix(plan, source, dwh, write, gone).await?;
        }
    }
}

/// The statements of one round of re-reading keys.
struct Recheck {
    /// The source's view rows of the keys: key, reached by the job, values as text.
    source: String,
    /// See `dwh_compare`.
    dwh: String,
}

impl Recheck {
    fn new(plan: &Plan) -> Recheck {
        let src_keys: Vec<String> = plan
            .key
            .iter()
            .map(|&i| format!("({})::{}", plan.cols[i].expr, plan.cols[i].ty))
            .collect();
        let source = format!(
            "select array[{}], ({}), array[{}]::text[] {} where {}",
            plan.src_keys().join(", "),
            plan.scope,
            plan.cols
                .iter()
                .map(|c| plan.src_text(c))
                .collect::<Vec<_>>()
                .join(", "),
            sql::from_clause(&plan.view),
            plan.key_in(&src_keys, 1)
        );
        Recheck {
            source,
            dwh: dwh_compare(plan),
        }
    }

    /// Read `keys` on both sides now; the positions in `keys` of those that differ, and how.
    async fn classify(
        &self,
        plan: &Plan,
        source: &mut Client,
        dwh: &Client,
        keys: &[Vec<String>],
    ) -> Result<Vec<(usize, Kind)>, VerifyError> {
        let columns: Vec<Vec<String>> = (0..plan.key.len())
            .map(|i| keys.iter().map(|k| k[i].clone()).collect())
            .collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let (tx, _) = source::begin(source).await.map_err(src)?;
        source::set_settings(&tx, &plan.view, plan.settings.clone())
            .await
            .map_err(src)?;
        let now: HashMap<Vec<String>, (bool, Vec<Option<String>>)> = tx
            .query(self.source.as_str(), &params)
            .await
            .map_err(src)?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        // What counts: view rows in reach, and (where extra rows count) keys the view lacks.
        let mut entries: Vec<(usize, Option<&Vec<Option<String>>>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match now.get(key) {
                Some((true, values)) => entries.push((i, Some(values))),
                Some((false, _)) => {}
                None if plan.counts_extra => entries.push((i, None)),
                None => {}
            }
        }
        if let Some(events) = &plan.events {
            let held: Vec<&Vec<String>> = entries.iter().map(|(i, _)| &keys[*i]).collect();
            let waiting = waiting(&tx, plan, events, &held).await.map_err(src)?;
            entries = entries
                .into_iter()
                .enumerate()
                .filter(|(n, _)| !waiting.contains(n))
                .map(|(_, e)| e)
                .collect();
        }
        drop(tx);
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let idx: Vec<i32> = entries.iter().map(|(i, _)| *i as i32).collect();
        let present: Vec<bool> = entries.iter().map(|(_, v)| v.is_some()).collect();
        let key_columns: Vec<Vec<String>> = (0..plan.key.len())
            .map(|k| entries.iter().map(|(i, _)| keys[*i][k].clone()).collect())
            .collect();
        let values: Vec<Vec<Option<String>>> = (0..plan.cols.len())
            .map(|c| {
                entries
                    .iter()
                    .map(|(_, v)| v.and_then(|v| v.get(c).cloned().flatten()))
                    .collect()
            })
            .collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&idx, &present];
        params.extend(key_columns.iter().map(|c| c as &(dyn ToSql + Sync)));
        params.extend(values.iter().map(|c| c as &(dyn ToSql + Sync)));
        let rows = dwh
            .query(self.dwh.as_str(), &params)
            .await
            .map_err(dwh_err)?;
        let mut out: Vec<(usize, Kind)> = rows
            .iter()
            .map(|r| {
                let kind = match r.get::<_, &str>(1) {
                    "m" => Kind::Missing,
                    "d" => Kind::Different,
                    _ => Kind::Extra,
                };
                (r.get::<_, i32>(0) as usize, kind)
            })
            .collect();
        // In the order they were found, so reports name the same keys run after run.
        out.sort_by_key(|(i, _)| *i);
        Ok(out)
    }
}

/// The DWH query that classifies re-read keys: parameters are the entries' positions, whether
/// the view has the key, the key's values (one text array per key column) and the view row's
/// values (one text array per compared column). Returns (position, 'm' | 'd' | 'e').
fn dwh_compare(plan: &Plan) -> String {
    let mut arrays = vec!["$1::int4[]".to_string(), "$2::bool[]".to_string()];
    let mut names = vec!["i".to_string(), "present".to_string()];
    for n in 0..plan.key.len() {
        arrays.push(format!("${}::text[]", arrays.len() + 1));
        names.push(format!("k{n}"));
    }
    for n in 0..plan.cols.len() {
        arrays.push(format!("${}::text[]", arrays.len() + 1));
        names.push(format!("v{n}"));
    }
    let join: Vec<String> = plan
        .key
        .iter()
        .enumerate()
        .map(|(n, &i)| {
            let c = &plan.cols[i];
            format!("t.{} = s.k{n}::{}", quote_ident(&c.name), c.ty)
        })
        .collect();
    let first_key = format!("t.{}", quote_ident(&plan.cols[plan.key[0]].name));
    // Equal as the job's upsert sees it (`is distinct from`, types without equality as text):
    // what the job would not rewrite is no difference.
    let as_compared = |e: String, c: &Col| {
        if c.compare_as_text {
            format!("({e})::text")
        } else {
            e
        }
    };
    let target: Vec<String> = plan
        .cols
        .iter()
        .map(|c| {
            if c.in_target {
                as_compared(format!("t.{}", quote_ident(&c.name)), c)
            } else {
                format!("null::{}", if c.compare_as_text { "text" } else { &c.ty })
            }
        })
        .collect();
    let rebuilt: Vec<String> = plan
        .cols
        .iter()
        .enumerate()
        .map(|(i, c)| as_compared(plan.rebuilt(i, c), c))
        .collect();
    let marked = plan.marked();
    format!(
        "select i, kind from (
             select s.i, case
                 when s.present and {first_key} is null then 'm'
                 when s.present and {marked} then 'd'
                 when s.present and ({}) is distinct from ({}) then 'd'
                 when not s.present and {first_key} is not null and not {marked} then 'e'
             end as kind
             from unnest({}) as s({})
             left join {} t on {}
         ) x where kind is not null",
        target.join(", "),
        rebuilt.join(", "),
        arrays.join(", "),
        names.join(", "),
        plan.target,
        join.join(" and ")
    )
}

/// Positions in `keys` of the keys a notify job has events waiting for (a waiting TRUNCATE
/// holds every key): the job has not reached them yet.
async fn waiting(
    tx: &Transaction<'_>,
    plan: &Plan,
    events: &str,
    keys: &[&Vec<String>],
) -> Result<HashSet<usize>, tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let truncated: bool = tx
        .query_one(
            &format!("select exists (select from {events} where op = 'T')"),
            &[],
        )
        .await?
        .get(0);
    if truncated {
        return Ok((0..keys.len()).collect());
    }
    let view = &plan.view;
    let main = &view.captured[0].matches;
    let idx: Vec<i32> = (0..keys.len() as i32).collect();
    let columns: Vec<Vec<String>> = (0..main.len())
        .map(|i| keys.iter().map(|k| k[i].clone()).collect())
        .collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&idx];
    params.extend(columns.iter().map(|c| c as &(dyn ToSql + Sync)));
    let arrays: Vec<String> = (0..main.len())
        .map(|i| format!("${}::text[]", i + 2))
        .collect();
    let names: Vec<String> = (0..main.len()).map(|i| format!("c{i}")).collect();
    let unnest = format!(
        "unnest($1::int4[], {}) as k(i, {})",
        arrays.join(", "),
        names.join(", ")
    );
    // The trigger records the main table's key columns as text of their own type.
    let recorded: Vec<String> = main
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("(k.c{i}::{ty})::text"))
        .collect();
    let recorded = format!("array[{}]", recorded.join(", "));
    let typed: Vec<String> = main
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("k.c{i}::{ty}"))
        .collect();
    let main_exprs: Vec<String> = main.iter().map(|(e, _)| e.clone()).collect();
    let mut queries = vec![format!(
        "select k.i from {unnest} where exists (select from {events} e where e.source = 0
             and (e.old_values = {recorded} or e.new_values = {recorded}))"
    )];
    // A change of a joined table affects the view rows it joins to (as the drain finds them).
    for (table, cap) in view.captured.iter().enumerate().skip(1) {
        let exprs: Vec<String> = cap.matches.iter().map(|(e, _)| e.clone()).collect();
        let values: Vec<String> = cap
            .matches
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("x.v[{}]::{ty}", i + 1))
            .collect();
        queries.push(format!(
            "select k.i from {unnest} where exists (
                 select {} where ({}) = ({}) and ({}) in (
                     select {} from {events} e cross join lateral (values (e.old_values), (e.new_values)) x(v)
                     where e.source = {table} and x.v is not null))",
            sql::from_joins(view, table - 1),
            main_exprs.join(", "),
            typed.join(", "),
            exprs.join(", "),
            values.join(", ")
        ));
    }
    let mut out = HashSet::new();
    for q in queries {
        for r in tx.query(q.as_str(), &params).await? {
            out.insert(r.get::<_, i32>(0) as usize);
        }
    }
    Ok(out)
}

/// `--repair`: rewrites what differs through the job's own write path.
struct Repair {
    /// Positions in `key` of the main-table key columns the view's rows are read by.
    by: Vec<usize>,
    written: u64,
    deleted: u64,
}

impl Repair {
    fn new(view: &View) -> Repair {
        let job = &view.job;
        // The key columns `view.captured[0]` records, in its order.
        let by = job
            .key
            .iter()
            .enumerate()
            .filter(|(_, k)| {
                job.columns.iter().any(|c| {
                    &c.name == *k
                        && matches!(&c.kind, ColumnKind::Direct(r) if r.alias == job.from.alias)
                })
            })
            .map(|(i, _)| i)
            .collect();
        Repair {
            by,
            written: 0,
            deleted: 0,
        }
    }

    /// Rewrite the view rows of `write` (missing or different), and apply the job's
    /// `on_delete` to `gone` (extra).
    async fn fix(
        &mut self,
        plan: &Plan,
        source: &mut Client,
        dwh: &mut Client,
        write: Vec<Vec<String>>,
        gone: Vec<Vec<String>>,
    ) -> Result<(), VerifyError> {
        if write.is_empty() && gone.is_empty() {
            return Ok(());
        }
        if self.by.is_empty() || self.by.len() != plan.view.captured[0].columns.len() {
            return Err(VerifyError::NoRepairKey);
        }
        let mut all = write;
        all.extend(gone);
        // A poll job reads by the main-table columns of its key: a superset of these rows,
        // which rewrites nothing that is equal.
        let by: Vec<Vec<String>> = all
            .iter()
            .map(|k| self.by.iter().map(|&i| k[i].clone()).collect())
            .collect();
        let deletes =
            plan.view.job.mode == Mode::Notify && plan.view.job.on_delete != OnDelete::Ignore;
        let (tx, _) = source::begin(source).await.map_err(src)?;
        let done = job::apply_keys(&tx, dwh, &plan.view, &by, deletes.then_some(&all[..])).await?;
        drop(tx);
        self.written += done.changed;
        self.deleted += done.deleted;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_name_at_most_ten_keys_of_each_kind() {
        let mut o = Outcome::default();
        for i in 0..25 {
            o.add(Kind::Missing, &[i.to_string()]);
        }
        o.add(Kind::Extra, &["a".into(), "b".into()]);
        assert_eq!(o.missing, 25);
        assert_eq!(o.keys.missing.len(), NAMED_KEYS);
        assert!(!o.clean());
        let text = named_keys(&o);
        assert!(text.contains("  missing: 0; 1; 2"), "{text}");
        assert!(text.contains("9, ..."), "{text}");
        assert!(text.contains("  extra: (a, b)\n"), "{text}");
    }

    #[test]
    fn buckets_come_from_the_key_hash_alone() {
        assert_eq!(
            md5_hash("x"),
            "('x' || substr(md5(x), 1, 16))::bit(64)::int8"
        );
        assert_eq!(bucket_of("kh"), "(((kh) & 1073741823)::int4 % $1)");
    }
}
