//! A job's position: the watermark, and the recheck windows that make it exact.
//!
//! Reading `cursor > watermark` alone loses rows whose transaction commits after a later row
//! was read. So every batch is read in one snapshot, and each move of the watermark from `lo`
//! to `hi` leaves a window over `(lo, hi]` that remembers what that snapshot could not see.
//!
//! What a snapshot could not see, and why the window keeps a *floor* rather than a list of
//! transactions: a row written inside a savepoint (or a PL/pgSQL exception block, or an ORM's
//! nested transaction) carries its subtransaction's id in `xmin`, which no snapshot function
//! lists; and on a hot standby `pg_current_snapshot()` lists no running transaction at all.
//! What holds everywhere is that every transaction running when a snapshot is taken, and every
//! one of its subtransactions, has an id at or above the snapshot's `xmin`. Between that
//! `xmin` and the snapshot's `xmax`, most ids belong to transactions that had committed (and
//! were read); the source tells which were still in progress (`pg_xact_status`, which knows a
//! subtransaction by its parent), so a window keeps those ids, and a `floor` from which on it
//! re-reads every row: [`Unseen`]. A recheck re-reads the rows of the range whose `xmin` is
//! one of those ids or at least the floor, and narrows both to what its own snapshot could
//! not see (rows of ids that have ended since are final, and were read by it).
//!
//! A window closes, after one last recheck, when nothing can still add rows to its range:
//! 1. every transaction that had an id when the range was read has ended (ids below `next`,
//!    the next id to be assigned then; transactions of other databases do not count);
//! 2. no transaction that was open then without an id, holding a cursor value (a `nextval()`,
//!    or the `now()` of its start) can still write. On a primary whose every session pgtide can
//!    see, that is known at once: no session's transaction started before the read, and no
//!    prepared transaction got its id after it. Otherwise (hidden sessions, or a standby, which
//!    sees none of the primary's sessions) a grace time stands in: once it has passed, the
//!    window takes the next id as its `mark`, and waits until every transaction below the
//!    mark has ended. A writer is then missed only if it held a cursor value for longer than
//!    the grace time before its first write.
//!
//! The read itself can be that last recheck, and its window is then *settled* when it is made
//! (never kept, never re-read). `source::begin` takes the snapshot, then reads the horizon,
//! then the next id, in that order. The window settles when the snapshot shows no transaction
//! of this database in progress, the horizon shows no session of this database whose
//! transaction started before the read (all sessions visible) and no prepared transaction of
//! it, and the next id has not passed the snapshot's `xmax` except for ids the horizon shows
//! running in other databases. Then every transaction of this database that was open at the
//! snapshot had no id then, and has none yet or ended without one (having written nothing):
//! one that took an id and committed before the horizon was read left that id between the
//! snapshot's `xmax` and the next id, and one still open then is in the horizon, started
//! before the read. Transactions that start later take their cursor values later, as rule 2
//! assumes. A horizon read before the snapshot would miss a transaction that starts in
//! between; a next id read before the horizon, one that takes its id and commits in between.
//! On a standby no window settles this way.
//!
//! Times are the source's clock. Positions move forward only: `seq` grows with every
//! committed change.

use serde::{Deserialize, Serialize};

mod load;
pub use load::{Chunk, Done, Load};

/// How long a window waits, when pgtide cannot see every transaction that might hold a cursor
/// value, before it takes its `mark`: covers a writer that took its cursor value (`nextval()`,
/// `now()`) up to this long before its first write. Debug builds read
/// `PGTIDE_SETTLE_GRACE_SECS` (tests).
pub const SETTLE_GRACE_US: i64 = 300 * 1_000_000;
/// More open windows than this are merged (oldest first) so the recheck query stays small;
/// merging only widens what is re-read.
pub const MAX_WINDOWS: usize = 32;

fn grace_us() -> i64 {
    if cfg!(debug_assertions) {
        if let Some(s) = std::env::var("PGTIDE_SETTLE_GRACE_SECS")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
        {
            return s * 1_000_000;
        }
    }
    SETTLE_GRACE_US
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The cursor of the last row read, one text value per cursor column; `None` before the first.
    pub watermark: Option<Vec<String>>,
    /// Ranges below the watermark that may still receive rows.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// Grows by one with every committed change of position.
    pub seq: i64,
    /// Notify jobs: the load of the rows that existed before the triggers is done; from here
    /// on the job follows its events.
    #[serde(default)]
    pub initial_done: bool,
    /// A load of many rows in progress (several workers, chunks committed in any order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
}

/// A range below the watermark that may still receive rows, and how to find them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredWindow")]
pub struct Window {
    pub lo: Option<Vec<String>>,
    pub hi: Vec<String>,
    /// Rows whose `xmin` is this transaction id (xid8) or later may not have been seen.
    pub floor: u64,
    /// Rows whose `xmin` is one of these ids (xid8, below `floor`) may not have been seen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xids: Vec<u64>,
    /// The next transaction id when the range was read (xid8): every transaction that had an
    /// id then is below it.
    pub next: u64,
    /// When the range was read (the source's clock, microseconds since the epoch).
    pub read_at_us: i64,
    /// The next transaction id once the grace time had passed; `None` before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<u64>,
    /// Settled when it was read (see the module documentation): nothing can add rows to its
    /// range, so it is never kept in `Position::windows`; merged into a neighbour (chunks of a
    /// load) it adds only its range.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub settled: bool,
}

/// A window as stored, including the form written by earlier versions (`xip` and `xmax`
/// instead of `floor` and `next`).
#[derive(Deserialize)]
struct StoredWindow {
    lo: Option<Vec<String>>,
    hi: Vec<String>,
    floor: Option<u64>,
    #[serde(default)]
    xids: Vec<u64>,
    next: Option<u64>,
    read_at_us: i64,
    #[serde(default)]
    mark: Option<u64>,
    #[serde(default)]
    settled: bool,
    #[serde(default)]
    xip: Vec<u64>,
    #[serde(default)]
    xmax: u64,
}

impl From<StoredWindow> for Window {
    fn from(s: StoredWindow) -> Window {
        let floor = s
            .floor
            .unwrap_or_else(|| s.xip.iter().copied().chain([s.xmax]).min().unwrap_or(0));
        Window {
            lo: s.lo,
            hi: s.hi,
            floor,
            xids: s.xids,
            next: s.next.unwrap_or(s.xmax),
            read_at_us: s.read_at_us,
            mark: s.mark,
            settled: s.settled,
        }
    }
}

/// What `pg_current_snapshot()` said, and when (the source's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    /// Top-level transactions in progress below `xmax` (always empty on a standby).
    pub xip: Vec<u64>,
    /// The next transaction id to be assigned (on a standby: past every id replayed so far).
    pub next: u64,
    /// Taken on a hot standby (`pg_is_in_recovery()`).
    pub recovery: bool,
    /// When it was taken, or a little later (the source's clock, microseconds since the epoch).
    pub at_us: i64,
    /// What `pg_stat_activity` and `pg_prepared_xacts` showed just after the snapshot was
    /// taken, with `next` read after them: lets a read settle its window at once.
    pub after: Option<Horizon>,
}

impl Snapshot {
    /// The oldest transaction id of this database that may still be running: every transaction
    /// of this database below it has ended (and its rows, subtransactions included, are visible
    /// to this snapshot if it committed). `elsewhere` are ids running in other databases, which
    /// cannot write here: passed over among the snapshot's running ids and from its `xmax` on
    /// (where a transaction elsewhere that took its id around the snapshot sits). A standby
    /// cannot tell them apart.
    pub fn oldest_running(&self, elsewhere: &[u64]) -> u64 {
        if self.recovery {
            return self.xmin;
        }
        let mut top = self.xmax;
        while elsewhere.contains(&top) {
            top += 1;
        }
        self.xip
            .iter()
            .copied()
            .filter(|x| !elsewhere.contains(x))
            .chain([top])
            .min()
            .unwrap_or(top)
    }

    /// A 32-bit xid (as `pg_stat_activity` and `pg_prepared_xacts` show them) widened to xid8,
    /// taking the epoch from this snapshot: the xid was assigned before the snapshot's next.
    pub fn widen(&self, xid: u32) -> u64 {
        let candidate = (self.next & !0xffff_ffff) | u64::from(xid);
        if candidate > self.next && candidate >= 1 << 32 {
            candidate - (1 << 32)
        } else {
            candidate
        }
    }
}

/// The transaction ids (at or above some lower bound) whose rows a snapshot may not have
/// seen: `xids`, and every id from `floor` on. On a primary, `floor` is the snapshot's `xmax`
/// and `xids` the ids below it still in progress (subtransactions included); when one of the
/// snapshot's transactions ended before the source was asked, `floor` drops to it, since its
/// subtransactions could no longer be told from committed transactions. On a standby (whose
/// snapshots list nothing), `floor` is the snapshot's `xmin`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unseen {
    pub floor: u64,
    pub xids: Vec<u64>,
}

/// What `pg_stat_activity` and `pg_prepared_xacts` showed just before a snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Horizon {
    pub oldest: Oldest,
    /// Transactions (32-bit xids) running or prepared in other databases: they cannot write
    /// this one's rows.
    pub elsewhere: Vec<u32>,
    /// Prepared transactions of this database (32-bit xids): no session shows them, and
    /// they may have taken a cursor value long before they got their id.
    pub prepared: Vec<u32>,
}

/// The oldest open transaction among this database's other sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oldest {
    /// Every session was visible and none was in a transaction.
    NoneOpen,
    /// Every session was visible; the oldest open transaction started then (microseconds).
    Since(i64),
    /// Some sessions were hidden (pgtide's role lacks `pg_read_all_stats`), or the source is
    /// a standby (which does not see the primary's sessions).
    Hidden,
}

impl Horizon {
    /// Nothing known: windows close only by the grace time.
    pub fn unknown() -> Horizon {
        Horizon {
            oldest: Oldest::Hidden,
            elsewhere: Vec::new(),
            prepared: Vec::new(),
        }
    }
}

/// What a recheck in one snapshot did to the windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Windows closed.
    pub closed: usize,
    /// Whether the position changed at all (windows closed, floors raised, marks taken).
    pub changed: bool,
}

impl Window {
    /// Whether a recheck taken in `snap` (with `horizon` read just before it) is the last
    /// one this window needs; see the module documentation for the rule. For the read that
    /// makes the window, `snap` is its snapshot and `horizon` the one read just after it.
    fn settled_in(&self, snap: &Snapshot, horizon: &Horizon, oldest_running: u64) -> bool {
        if oldest_running < self.next {
            return false;
        }
        if self.mark.is_some_and(|mark| oldest_running >= mark) {
            return true;
        }
        if snap.recovery {
            return false;
        }
        let prepared_late = horizon.prepared.iter().any(|x| snap.widen(*x) >= self.next);
        let no_old_transaction = match horizon.oldest {
            Oldest::NoneOpen => true,
            Oldest::Since(oldest) => oldest > self.read_at_us,
            Oldest::Hidden => false,
        };
        no_old_transaction && !prepared_late
    }

    /// `floor` as a 32-bit xid, for `age(xmin) <= age(floor)`.
    pub fn floor_xid(&self) -> String {
        (self.floor & 0xffff_ffff).to_string()
    }

    /// `xids` as 32-bit xids in an array literal, for `xmin = any(...)`.
    pub fn xids_literal(&self) -> String {
        let ids: Vec<String> = self
            .xids
            .iter()
            .map(|x| (x & 0xffff_ffff).to_string())
            .collect();
        format!("{{{}}}", ids.join(","))
    }

    /// Narrow what this window re-reads to what a recheck's snapshot could not see (`unseen`,
    /// computed from a bound at or below this window's floor): rows of ids below
    /// `oldest_running` are final, and were read by that recheck.
    fn narrow(&mut self, unseen: &Unseen, oldest_running: u64) {
        let floor = self.floor;
        self.xids.retain(|x| *x >= oldest_running);
        self.xids
            .extend(unseen.xids.iter().copied().filter(|x| *x >= floor));
        self.floor = self.floor.max(unseen.floor).max(oldest_running);
        self.tidy();
    }

    /// Keep `xids` sorted, unique and below `floor`.
    fn tidy(&mut self) {
        let floor = self.floor;
        self.xids.retain(|x| *x < floor);
        self.xids.sort_unstable();
        self.xids.dedup();
    }

    /// Widen this window by `later`, the window of the range that follows it.
    pub fn absorb(&mut self, later: Window) {
        // Keep the widest view: re-read from the lower floor, wait for the later next, mark
        // and read time.
        if later.lo.is_none() || self.lo.is_none() {
            self.lo = None;
        }
        // A settled window adds only its range: nothing can add rows there.
        if later.settled {
            self.hi = later.hi;
            return;
        }
        if self.settled {
            *self = Window {
                lo: self.lo.take(),
                ..later
            };
            return;
        }
        // Keep the widest view: re-read from the lower floor, wait for the later next, mark
        // and read time.
        self.hi = later.hi;
        self.floor = self.floor.min(later.floor);
        self.xids.extend(later.xids);
        self.tidy();
        self.next = self.next.max(later.next);
        self.read_at_us = self.read_at_us.max(later.read_at_us);
        self.mark = match (self.mark, later.mark) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
}

impl Position {
    /// Record that rows in `(watermark, hi]` were read in `snap`: the watermark moves to `hi`
    /// and a window remembers the snapshot, unless the read settled it. `merge_last` folds it
    /// into the previous window (used for consecutive batches of one run, which are
    /// contiguous).
    pub fn advance(&mut self, hi: Vec<String>, snap: &Snapshot, unseen: &Unseen, merge_last: bool) {
        let window = Window::read(self.watermark.clone(), hi.clone(), snap, unseen);
        match self.windows.last_mut() {
            _ if window.settled => {}
            Some(last) if merge_last && last.hi == window.lo.clone().unwrap_or_default() => {
                last.absorb(window)
            }
            _ => self.windows.push(window),
        }
        while self.windows.len() > MAX_WINDOWS {
            let second = self.windows.remove(1);
            self.windows[0].absorb(second);
        }
        self.watermark = Some(hi);
        self.seq += 1;
    }

    /// A notify job's load of the rows that existed before its triggers is done. Late commits
    /// below the watermark have events of their own: no windows to keep.
    pub fn finish_initial_load(&mut self) {
        self.windows.clear();
        self.initial_done = true;
        self.seq += 1;
    }

    /// A position set on purpose (`reset`) at `watermark`, after every position stored so far
    /// (`after_seq`, the highest `seq` of the DWH's and the state store's copies). A notify job
    /// loads the rows past it again, then follows its events.
    pub fn reset(watermark: Option<Vec<String>>, after_seq: i64) -> Position {
        Position {
            watermark,
            windows: Vec::new(),
            seq: after_seq + 1,
            initial_done: false,
            load: None,
        }
    }

    /// The lowest floor of the open windows: what a recheck must ask the source about.
    pub fn lowest_floor(&self) -> Option<u64> {
        self.windows.iter().map(|w| w.floor).min()
    }

    /// After a recheck read every window's rows in `snap` (with `horizon` read just before
    /// it, and `unseen` computed from [`Position::lowest_floor`]): close the windows it
    /// settles, narrow the others to what that snapshot could not see, and take the marks
    /// whose grace time has passed.
    pub fn settle(&mut self, snap: &Snapshot, horizon: &Horizon, unseen: &Unseen) -> Settled {
        let elsewhere: Vec<u64> = horizon.elsewhere.iter().map(|x| snap.widen(*x)).collect();
        let oldest_running = snap.oldest_running(&elsewhere);
        let grace = grace_us();
        let before = self.windows.clone();
        for w in &mut self.windows {
            if w.mark.is_none() && snap.at_us - w.read_at_us >= grace {
                w.mark = Some(snap.next.max(snap.xmax));
            }
        }
        self.windows
            .retain(|w| !w.settled_in(snap, horizon, oldest_running));
        for w in &mut self.windows {
            w.narrow(unseen, oldest_running);
        }
        let closed = before.len() - self.windows.len();
        let changed = self.windows != before;
        if changed {
            self.seq += 1;
        }
        Settled { closed, changed }
    }
}

#[cfg(test)]
mod tests;
