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
//! Times are the source's clock. Positions move forward only: `seq` grows with every
//! committed change.

use serde::{Deserialize, Serialize};

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
    pub at_us: i64,
}

impl Snapshot {
    /// The oldest transaction id that may still be running in this database: below it every
    /// transaction has ended (and its rows, subtransactions included, are visible to this
    /// snapshot if it committed). `elsewhere` are ids running in other databases, which cannot
    /// write here; a standby cannot tell them apart.
    pub fn oldest_running(&self, elsewhere: &[u64]) -> u64 {
        if self.recovery {
            return self.xmin;
        }
        self.xip
            .iter()
            .copied()
            .filter(|x| !elsewhere.contains(x))
            .chain([self.xmax])
            .min()
            .unwrap_or(self.xmax)
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
    /// one this window needs; see the module documentation for the rule.
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

    fn absorb(&mut self, later: Window) {
        // Keep the widest view: re-read from the lower floor, wait for the later next, mark
        // and read time.
        if later.lo.is_none() || self.lo.is_none() {
            self.lo = None;
        }
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
    /// and a window remembers the snapshot. `merge_last` folds it into the previous window
    /// (used for consecutive batches of one run, which are contiguous).
    pub fn advance(&mut self, hi: Vec<String>, snap: &Snapshot, unseen: &Unseen, merge_last: bool) {
        let mut window = Window {
            lo: self.watermark.clone(),
            hi: hi.clone(),
            floor: unseen.floor,
            xids: unseen.xids.clone(),
            next: snap.next.max(snap.xmax),
            read_at_us: snap.at_us,
            mark: None,
        };
        window.tidy();
        match self.windows.last_mut() {
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
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn known(oldest: Oldest) -> Horizon {
        Horizon {
            oldest,
            elsewhere: Vec::new(),
            prepared: Vec::new(),
        }
    }

    /// Advance with the widest description of what `s` could not see: every id from its xmin.
    fn adv(p: &mut Position, hi: Vec<String>, s: &Snapshot, merge: bool) {
        let unseen = Unseen {
            floor: s.xmin,
            xids: Vec::new(),
        };
        p.advance(hi, s, &unseen, merge);
    }

    /// Settle with the widest description of what `s` could not see.
    fn settle(p: &mut Position, s: Snapshot, h: &Horizon) -> Settled {
        let unseen = Unseen {
            floor: s.xmin,
            xids: Vec::new(),
        };
        p.settle(&s, h, &unseen)
    }

    /// A primary's snapshot: `xmin:xmax:xip`, the next id, at a time in seconds.
    fn snap(xmin: u64, xmax: u64, xip: &[u64], next: u64, at_s: i64) -> Snapshot {
        Snapshot {
            xmin,
            xmax,
            xip: xip.to_vec(),
            next,
            recovery: false,
            at_us: at_s * S,
        }
    }

    /// A standby's snapshot: no `xip`, `xmin` held back by the primary's running transactions.
    fn standby(xmin: u64, xmax: u64, next: u64, at_s: i64) -> Snapshot {
        Snapshot {
            recovery: true,
            ..snap(xmin, xmax, &[], next, at_s)
        }
    }

    #[test]
    fn advancing_moves_the_watermark_and_opens_a_window_from_the_snapshot_xmin() {
        let mut p = Position::default();
        adv(
            &mut p,
            vec!["10".into()],
            &snap(5, 9, &[5, 7], 11, 1000),
            false,
        );
        assert_eq!(p.watermark, Some(vec!["10".into()]));
        assert_eq!(p.seq, 1);
        assert_eq!(p.windows.len(), 1);
        let w = &p.windows[0];
        assert_eq!((w.lo.clone(), w.floor, w.next), (None, 5, 11));
        assert_eq!(w.read_at_us, 1000 * S);
        assert_eq!(w.floor_xid(), "5");
    }

    #[test]
    fn consecutive_batches_merge_into_the_widest_window() {
        let mut p = Position::default();
        adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
        adv(
            &mut p,
            vec!["20".into()],
            &snap(6, 12, &[6, 11], 13, 1001),
            true,
        );
        assert_eq!(p.windows.len(), 1);
        let w = &p.windows[0];
        assert_eq!((w.lo.clone(), w.hi.clone()), (None, vec!["20".to_string()]));
        assert_eq!((w.floor, w.next), (5, 13));
        assert_eq!(w.read_at_us, 1001 * S);
        adv(
            &mut p,
            vec!["30".into()],
            &snap(12, 13, &[], 13, 1002),
            false,
        );
        assert_eq!(p.windows.len(), 2);
    }

    #[test]
    fn a_subtransaction_of_a_running_transaction_is_above_the_floor() {
        // Transaction 5 is running; its savepoint wrote with xid 6, which no snapshot lists.
        // Transaction 7 committed before the read. The window re-reads from 5 on.
        let mut p = Position::default();
        adv(&mut p, vec!["10".into()], &snap(5, 8, &[5], 8, 1000), false);
        assert_eq!(p.windows[0].floor, 5);
        assert!(p.windows[0].floor <= 6);
        // While 5 runs, the window stays open and its floor stays at 5.
        let s = settle(
            &mut p,
            snap(5, 20, &[5], 20, 1001),
            &known(Oldest::NoneOpen),
        );
        assert_eq!(s.closed, 0);
        assert_eq!(p.windows[0].floor, 5);
        // 5 ended: this recheck saw its rows; the window closes.
        let s = settle(
            &mut p,
            snap(20, 20, &[], 20, 1002),
            &known(Oldest::NoneOpen),
        );
        assert_eq!(s.closed, 1);
        assert!(s.changed);
    }

    #[test]
    fn a_window_waits_for_transactions_that_had_ids_but_were_not_listed() {
        // Ids 9 and 10 were assigned before the read (next = 11) but are above its xmax.
        let mut p = Position::default();
        adv(&mut p, vec!["10".into()], &snap(9, 9, &[], 11, 1000), false);
        assert_eq!(p.windows[0].floor, 9);
        // 10 is still running: it is in this later snapshot's xip.
        let s = settle(
            &mut p,
            snap(10, 12, &[10], 12, 1001),
            &known(Oldest::NoneOpen),
        );
        assert_eq!(s.closed, 0);
        assert_eq!(p.windows[0].floor, 10, "rows of ids below 10 are final now");
        assert!(s.changed);
        // xmax has not passed next yet: 10 may still run.
        assert_eq!(
            settle(
                &mut p,
                snap(10, 10, &[], 12, 1002),
                &known(Oldest::NoneOpen)
            )
            .closed,
            0
        );
        assert_eq!(
            settle(
                &mut p,
                snap(12, 12, &[], 12, 1003),
                &known(Oldest::NoneOpen)
            )
            .closed,
            1
        );
    }

    #[test]
    fn with_every_session_visible_a_window_settles_once_older_transactions_are_gone() {
        let mut p = Position::default();
        adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
        // A transaction that started before the read is still open (it may hold a cursor value).
        let h = known(Oldest::Since(999 * S));
        assert_eq!(settle(&mut p, snap(9, 20, &[], 20, 1001), &h).closed, 0);
        let h = known(Oldest::Since(1000 * S));
        assert_eq!(
            settle(&mut p, snap(9, 20, &[], 20, 1001), &h).closed,
            0,
            "same instant is not later"
        );
        // Nothing old is open, but xid 5 from the window's snapshot is: still open.
        let h = known(Oldest::NoneOpen);
        assert_eq!(settle(&mut p, snap(5, 20, &[5], 20, 1001), &h).closed, 0);
        // 7 had an id when the range was read (below next = 9): it may have written there.
        let h = known(Oldest::Since(1000 * S + 1));
        assert_eq!(settle(&mut p, snap(7, 20, &[7], 20, 1001), &h).closed, 0);
        assert_eq!(settle(&mut p, snap(9, 20, &[9], 20, 1001), &h).closed, 1);
    }

    #[test]
    fn a_prepared_transaction_that_got_its_id_after_the_read_holds_the_window() {
        // It may have taken its cursor value before the read, and no session shows it.
        let mut p = Position::default();
        adv(&mut p, vec!["10".into()], &snap(9, 9, &[], 9, 1000), false);
        let h = Horizon {
            oldest: Oldest::NoneOpen,
            elsewhere: Vec::new(),
            prepared: vec![12],
        };
        assert_eq!(settle(&mut p, snap(12, 14, &[12], 14, 1001), &h).closed, 0);
        // Prepared before the read: it was running then, rule 1 holds it (it is in xip).
        let mut q = Position::default();
        adv(&mut q, vec!["10".into()], &snap(8, 9, &[8], 9, 1000), false);
        let h = Horizon {
            prepared: vec![8],
            ..h
        };
        assert_eq!(settle(&mut q, snap(8, 14, &[8], 14, 1001), &h).closed, 0);
        let h = known(Oldest::NoneOpen);
        assert_eq!(settle(&mut p, snap(14, 14, &[], 14, 1002), &h).closed, 1);
    }

    #[test]
    fn without_a_view_of_every_session_a_window_waits_for_its_mark() {
        let grace = SETTLE_GRACE_US / S;
        let mut p = Position::default();
        adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
        let h = Horizon::unknown();
        // Before the grace time: no mark, nothing closes, even with nothing running.
        assert_eq!(
            settle(&mut p, snap(9, 9, &[], 9, 1000 + grace - 1), &h).closed,
            0
        );
        assert_eq!(p.windows[0].mark, None);
        // At the grace time, 30 is running (it may have taken its cursor value before the
        // read and its id later): the mark is the next id, 31, and the window waits for it.
        assert_eq!(
            settle(&mut p, snap(30, 31, &[30], 31, 1000 + grace), &h).closed,
            0
        );
        assert_eq!(p.windows[0].mark, Some(31));
        assert_eq!(p.windows[0].floor, 30);
        // Transactions that got ids after the mark do not hold it.
        assert_eq!(
            settle(&mut p, snap(31, 40, &[31, 35], 40, 1000 + grace + 1), &h).closed,
            1
        );
    }

    #[test]
    fn a_quiet_source_past_the_grace_time_closes_a_window_at_once() {
        let grace = SETTLE_GRACE_US / S;
        let mut p = Position::default();
        adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
        let s = settle(
            &mut p,
            snap(9, 9, &[], 9, 1000 + grace),
            &Horizon::unknown(),
        );
        assert_eq!(s.closed, 1);
    }

    #[test]
    fn on_a_standby_the_snapshot_xmin_is_all_there_is() {
        // The primary runs 727 (a long transaction that inserted early); the standby's
        // snapshot lists nothing, but 727 holds its xmin back.
        let grace = SETTLE_GRACE_US / S;
        let mut p = Position::default();
        adv(
            &mut p,
            vec!["10".into()],
            &standby(727, 729, 730, 1000),
            false,
        );
        assert_eq!(p.windows[0].floor, 727);
        // The standby's pg_stat_activity knows nothing of the primary: even "none open"
        // does not settle a window there.
        let h = known(Oldest::NoneOpen);
        assert_eq!(settle(&mut p, standby(730, 730, 730, 1001), &h).closed, 0);
        assert_eq!(p.windows[0].floor, 730);
        assert_eq!(
            settle(&mut p, standby(731, 735, 736, 1000 + grace), &h).closed,
            0
        );
        assert_eq!(p.windows[0].mark, Some(736));
        assert_eq!(
            settle(&mut p, standby(735, 737, 737, 1000 + grace + 1), &h).closed,
            0
        );
        assert_eq!(
            settle(&mut p, standby(736, 737, 737, 1000 + grace + 2), &h).closed,
            1
        );
    }

    #[test]
    fn transactions_of_other_databases_do_not_hold_a_window_open() {
        let mut p = Position::default();
        adv(
            &mut p,
            vec!["10".into()],
            &snap(5, 9, &[5, 7], 9, 1000),
            false,
        );
        let h = Horizon {
            oldest: Oldest::NoneOpen,
            elsewhere: vec![5],
            prepared: Vec::new(),
        };
        assert_eq!(
            settle(&mut p, snap(5, 20, &[5, 7], 20, 1001), &h).closed,
            0,
            "xid 7 may be ours"
        );
        assert_eq!(settle(&mut p, snap(5, 20, &[5], 20, 1001), &h).closed, 1);
    }

    #[test]
    fn a_recheck_that_changes_nothing_leaves_the_position_alone() {
        let mut p = Position::default();
        adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
        let seq = p.seq;
        let s = settle(&mut p, snap(5, 9, &[5], 9, 1001), &known(Oldest::NoneOpen));
        assert_eq!(s, Settled::default());
        assert_eq!(p.seq, seq);
    }

    #[test]
    fn a_window_keeps_only_the_ids_its_snapshot_could_not_see() {
        // 5 runs (with subtransaction 6); 7 and 8 committed before the read.
        let mut p = Position::default();
        let s = snap(5, 9, &[5], 9, 1000);
        let unseen = Unseen {
            floor: 9,
            xids: vec![6, 5],
        };
        p.advance(vec!["10".into()], &s, &unseen, false);
        let w = &p.windows[0];
        assert_eq!((w.floor, w.xids.clone()), (9, vec![5, 6]));
        assert_eq!(w.xids_literal(), "{5,6}");
        // A recheck while 5 still runs and 12 (new) is in progress: 9..11 ended and were read.
        let s = snap(5, 13, &[5, 12], 13, 1001);
        let unseen = Unseen {
            floor: 13,
            xids: vec![5, 6, 12],
        };
        let r = p.settle(&s, &known(Oldest::NoneOpen), &unseen);
        assert_eq!(r.closed, 0);
        let w = &p.windows[0];
        assert_eq!((w.floor, w.xids.clone()), (13, vec![5, 6, 12]));
        // 5 ended: its ids are final; the window closes.
        let s = snap(12, 14, &[12], 14, 1002);
        let unseen = Unseen {
            floor: 14,
            xids: vec![12],
        };
        assert_eq!(p.settle(&s, &known(Oldest::NoneOpen), &unseen).closed, 1);
    }

    #[test]
    fn too_many_windows_are_merged_oldest_first() {
        let mut p = Position::default();
        for i in 0..(MAX_WINDOWS as u64 + 5) {
            adv(
                &mut p,
                vec![(i * 10 + 10).to_string()],
                &snap(i + 50, i + 100, &[i + 50], i + 100, i as i64),
                false,
            );
        }
        assert_eq!(p.windows.len(), MAX_WINDOWS);
        assert_eq!(p.windows[0].lo, None);
        assert_eq!(p.windows[0].floor, 50);
        assert_eq!(p.windows[0].next, 105);
        assert_eq!(p.windows[1].lo, Some(vec![p.windows[0].hi[0].clone()]));
    }

    #[test]
    fn a_reset_and_the_end_of_a_first_load_move_seq_forward() {
        let mut p = Position::default();
        adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
        p.finish_initial_load();
        assert!(p.initial_done && p.windows.is_empty());
        assert_eq!(p.seq, 2);
        let r = Position::reset(Some(vec!["3".into()]), 7);
        assert_eq!((r.seq, r.initial_done, r.windows.len()), (8, false, 0));
        assert_eq!(r.watermark, Some(vec!["3".to_string()]));
    }

    #[test]
    fn windows_stored_by_earlier_versions_are_read_conservatively() {
        let old = r#"{"lo":null,"hi":["10"],"xip":[7,5],"xmax":9,"read_at_us":1}"#;
        let w: Window = serde_json::from_str(old).unwrap();
        assert_eq!((w.floor, w.next, w.mark), (5, 9, None));
        let again: Window = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(again, w);
    }

    #[test]
    fn xids_are_truncated_to_32_bits_and_widened_with_the_snapshot_epoch() {
        let w = Window {
            lo: None,
            hi: vec![],
            xids: vec![(2 << 32) + 3],
            floor: (2 << 32) + 9,
            next: (2 << 32) + 10,
            read_at_us: 0,
            mark: None,
        };
        assert_eq!(w.floor_xid(), "9");
        assert_eq!(w.xids_literal(), "{3}");
        let s = snap((2 << 32) + 5, (2 << 32) + 10, &[], (2 << 32) + 10, 0);
        assert_eq!(s.widen(7), (2 << 32) + 7);
        assert_eq!(s.widen(u32::MAX), (1 << 32) + u64::from(u32::MAX));
    }
}
