//! The plan of a comparison, fixed at the start: which view rows the job has reached (its
//! watermark, open recheck windows, `--from/--to`), which columns are compared and how each is
//! cast, hashed and compared on either side.

use std::collections::HashMap;

use tokio_postgres::{Client, Row};

use crate::config::{ColumnKind, JobSpec, Mode, OnDelete};
use crate::job::{InputError, JobError};
use crate::pg::quote_ident;
use crate::position::Position;
use crate::sink;
use crate::source::{self, notify};
use crate::view::range::Range as Rows;
use crate::view::sql;
use crate::view::{Setting, View};

use super::error::{dwh_err, src, VerifyError};

/// Debug builds: digest rows by the md5 of their text, as with servers before PostgreSQL 14.
pub const TEXT_DIGEST: &str = "PGTIDE_VERIFY_TEXT_DIGEST";

/// What `verify` was asked.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only view rows whose main-table cursor lies in `(from, to]` (values as given).
    pub from: Option<Vec<String>>,
    pub to: Option<Vec<String>>,
    /// Rewrite the rows that differ (holding the job's lock), then compare again.
    pub repair: bool,
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
            .map_err(|source| {
                JobError::Input(InputError::Watermark {
                    flag: flag.to_string(),
                    source,
                })
                .into()
            }),
    }
}

/// How far the job has read the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reach {
    /// Nothing yet.
    Nothing,
    /// The rows up to this cursor value.
    UpTo(Vec<String>),
    /// Every row (a notify job past its first load).
    All,
}

/// One view column as verify compares it (columns marked `deleted` are not compared: the
/// source has no value for them, and the target keeps its old ones).
pub(super) struct Col {
    pub(super) name: String,
    /// The view's expression.
    pub(super) expr: String,
    /// The type the view gives it (what `pgtide.try_cast` casts to).
    view_type: String,
    /// Its type in the target (the view's when the target lacks the column, or when the
    /// source does not know the target's type).
    pub(super) ty: String,
    pub(super) in_target: bool,
    /// Cast by the DWH (`on_error = "null"`): the source sends text.
    dwh_cast: bool,
    /// Its type has no hash function: hashed as text.
    hash_as_text: bool,
    /// Its type has a collation: hashed in "C", the bytes, whatever collation the source
    /// column has (a case-insensitive one would hash 'a' and 'A' alike).
    collatable: bool,
    /// Compared as text, as the job's upsert does (types without equality).
    pub(super) compare_as_text: bool,
}

/// `(from, to]` of the cursor; either side may be open.
pub(super) type Range = (Option<Vec<String>>, Option<Vec<String>>);

/// The view rows a comparison covers, whatever the DWH: what the job has reached, within
/// `--from/--to`.
pub(super) struct Scope {
    /// A condition over the view's tables.
    pub(super) predicate: String,
    /// `predicate` without the open windows' condition, which costs a test of each row's
    /// transaction: the cheaper superset a read of the whole view takes. The rows it takes that
    /// the job has not reached are sorted out when the keys found are read again.
    pub(super) superset: String,
    /// The settings `predicate` reads (the view's own are added by `source::set_settings`).
    pub(super) settings: Vec<Setting>,
    pub(super) reach: Reach,
    /// `--from` / `--to`, checked and canonicalized by the source.
    pub(super) range: Option<Range>,
    /// A notify job's event table, when it exists.
    pub(super) events: Option<String>,
}

impl Scope {
    /// The scope of a comparison of `view`: the job's reach from its position `pos` (the
    /// DWH's copy), minus the rows a poll job's open recheck windows will still re-read,
    /// within `opts`' range.
    pub(super) async fn new(
        source: &Client,
        view: &View,
        pos: Option<&Position>,
        opts: &Options,
    ) -> Result<Scope, VerifyError> {
        let job = &view.job;
        let from = normalize(source, view, opts.from.as_deref(), "--from").await?;
        let to = normalize(source, view, opts.to.as_deref(), "--to").await?;
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
                wide: false,
            }
            .bind(view, "vr");
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
                    // Up to the watermark: most of the table, as a rule.
                    wide: true,
                }
                .bind(view, "vm");
                parts.push(b.predicate);
                settings.extend(b.settings);
            }
        }
        let all_of = |parts: &[String]| {
            if parts.is_empty() {
                "true".to_string()
            } else {
                parts
                    .iter()
                    .map(|p| format!("({p})"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            }
        };
        let superset = all_of(&parts);
        // A poll job re-reads the rows of its open windows that late transactions wrote: it
        // has not reached them yet. (A notify job has events for those.)
        if let (Mode::Poll, Some(p)) = (job.mode, pos) {
            if !p.windows.is_empty() {
                let b = Rows::Windows(&p.windows).bind(view, "vw");
                parts.push(format!("not ({})", b.predicate));
                settings.extend(b.settings);
            }
        }
        let predicate = all_of(&parts);
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
        Ok(Scope {
            predicate,
            superset,
            settings,
            reach,
            range,
            events,
        })
    }
}

/// Whether rows extra in the target count: for notify jobs that delete, over the whole view
/// (a row that is not in the view has no cursor to lie in a range).
pub(super) fn counts_extra(job: &JobSpec, ranged: bool) -> bool {
    job.mode == Mode::Notify && job.on_delete != OnDelete::Ignore && !ranged
}

/// Everything the comparison queries need, fixed at the start.
pub(super) struct Plan {
    pub(super) view: View,
    /// The target, quoted.
    pub(super) target: String,
    pub(super) cols: Vec<Col>,
    /// Positions in `cols` of the key's columns, in `key` order.
    pub(super) key: Vec<usize>,
    /// The target has `_pgtide_deleted` and the job marks deletes there.
    marks: bool,
    /// The rows the job has reached, as a condition over the view's tables.
    pub(super) scope: String,
    /// The settings `scope` reads (the view's own are added by `source::set_settings`).
    pub(super) settings: Vec<Setting>,
    pub(super) counts_extra: bool,
    /// The source has `pg_input_is_valid` (PostgreSQL 16): values the DWH casts with
    /// `try_cast` can be cast the same way on the source.
    soft_input: bool,
    /// Both servers have `hash_record_extended` (PostgreSQL 14): rows are hashed by their
    /// types' own hash functions (consistent with equality, as the job's upsert compares),
    /// else by the md5 of their text.
    hashing: bool,
    /// `--from` / `--to`, checked and canonicalized by the source.
    pub(super) range: Option<Range>,
    pub(super) reach: Reach,
    /// A notify job's event table, when it exists.
    pub(super) events: Option<String>,
}

impl Plan {
    pub(super) async fn new(
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
                    return Err(
                        JobError::Input(InputError::KeyNotCompared { column: k.clone() }).into(),
                    )
                }
            }
        }
        let marks = job.mode == Mode::Notify
            && job.on_delete == OnDelete::Soft
            && target_cols.contains_key(sink::DELETED);
        let soft_input = src_version >= 160000;
        let Scope {
            predicate: scope,
            settings,
            reach,
            range,
            events,
            ..
        } = Scope::new(source, &view, pos, opts).await?;
        Ok(Plan {
            target: crate::pg::quote_qualified(&job.target.schema, &job.target.name),
            counts_extra: counts_extra(&job, range.is_some()),
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
    pub(super) fn src_text(&self, c: &Col) -> String {
        if c.dwh_cast {
            format!("({})", c.expr)
        } else {
            format!("(({})::{})::text", c.expr, c.ty)
        }
    }

    /// The DWH's value of column `i` rebuilt from the text in `s.v<i>`, as the job writes it.
    pub(super) fn rebuilt(&self, i: usize, c: &Col) -> String {
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

    pub(super) fn src_keys(&self) -> Vec<String> {
        self.key
            .iter()
            .map(|&i| self.src_text(&self.cols[i]))
            .collect()
    }

    pub(super) fn tgt_keys(&self) -> Vec<String> {
        self.key
            .iter()
            .map(|&i| format!("t.{}::text", quote_ident(&self.cols[i].name)))
            .collect()
    }

    /// A 64-bit hash (int8) of the view row.
    pub(super) fn src_digest(&self) -> String {
        self.row_hash(self.cols.iter().map(|c| self.src_value(c)).collect())
    }

    /// A 64-bit hash (int8) of the target row.
    pub(super) fn tgt_digest(&self) -> String {
        self.row_hash(self.cols.iter().map(|c| self.tgt_value(c)).collect())
    }

    /// A 64-bit hash (int8) of the view row's key: its bucket, and the merge's order.
    pub(super) fn src_key_hash(&self) -> String {
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

    pub(super) fn tgt_key_hash(&self) -> String {
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
    pub(super) fn src_where(&self) -> String {
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
    pub(super) fn src_where_bound(&self, first: usize) -> (String, Vec<String>) {
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

    pub(super) fn marked(&self) -> String {
        if self.marks {
            format!("coalesce(t.{}, false)", quote_ident(sink::DELETED))
        } else {
            "false".into()
        }
    }

    /// `(<key exprs>) in (<arrays $first..>)`: rows of the keys given as text arrays.
    pub(super) fn key_in(&self, exprs: &[String], first: usize) -> String {
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
pub(super) fn md5_hash(text: &str) -> String {
    format!("('x' || substr(md5({text}), 1, 16))::bit(64)::int8")
}
