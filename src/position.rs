//! A job's position: the watermark, and the recheck windows that make it exact.
//!
//! Reading `cursor > watermark` alone loses rows whose transaction commits after a later row
//! was read. So every batch is read in one snapshot, and each move of the watermark from `lo`
//! to `hi` leaves a window that remembers that snapshot: the transactions then in progress
//! (`xip`) and the first transaction id not yet assigned (`xmax`). A row in `(lo, hi]` that
//! the snapshot could not see was written by one of those. Later runs re-read exactly those
//! rows (`xmin` in `xip`, or `xmin` at or after `xmax`), and close the window once a newer
//! snapshot shows the transactions of `xip` finished, and no transaction that was already open
//! when the window was read can still write: either every session of the database is visible
//! and started later, or a grace time has passed. (A transaction can take its cursor value,
//! a sequence number or `now()`, before it has a transaction id.) Times are the source's clock.
//!
//! Positions move forward only: `seq` grows with every committed batch.

use serde::{Deserialize, Serialize};

/// How long a window stays open after every transaction it knew of has finished, when the
/// source does not show pgtide every session: covers a writer that took its cursor value
/// (`nextval()`, `now()`) up to this long before its first write.
pub const SETTLE_GRACE_US: i64 = 300 * 1_000_000;
/// More open windows than this are merged (oldest first) so the recheck query stays small;
/// merging only widens what is re-read.
pub const MAX_WINDOWS: usize = 32;

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub lo: Option<Vec<String>>,
    pub hi: Vec<String>,
    /// Transactions (xid8) in progress when the range was read.
    pub xip: Vec<u64>,
    /// The snapshot's xmax (xid8): transactions from here on had not started writing.
    pub xmax: u64,
    /// When the range was read (the source's clock, microseconds since the epoch).
    pub read_at_us: i64,
}

/// What `pg_current_snapshot()` said, and when (the source's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
    pub at_us: i64,
}

impl Snapshot {
    /// Whether transaction `xid` had ended when this snapshot was taken.
    pub fn finished(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// What `pg_stat_activity` showed just before a snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Horizon {
    pub oldest: Oldest,
    /// Transactions (32-bit xids) running in other databases: they cannot write this one's rows.
    pub elsewhere: Vec<u32>,
}

/// The oldest open transaction among this database's other sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oldest {
    /// Every session was visible and none was in a transaction.
    NoneOpen,
    /// Every session was visible; the oldest open transaction started then (microseconds).
    Since(i64),
    /// Some sessions were hidden (pgtide's role lacks `pg_read_all_stats`).
    Hidden,
}

impl Horizon {
    /// Nothing known: windows close only by the grace time.
    pub fn unknown() -> Horizon {
        Horizon {
            oldest: Oldest::Hidden,
            elsewhere: Vec::new(),
        }
    }
}

impl Window {
    /// Whether a recheck taken in `snap` (with `horizon` read just before it) is the last
    /// one this window needs: the transactions in progress when it was read have ended, and
    /// no transaction that was open then (perhaps without an id, holding a cursor value) can
    /// still write. Transactions that start later take ids and `now()` values above `hi`.
    pub fn settled_in(&self, snap: &Snapshot, horizon: &Horizon) -> bool {
        let in_progress_ended = self
            .xip
            .iter()
            .all(|x| snap.finished(*x) || horizon.elsewhere.contains(&((x & 0xffff_ffff) as u32)));
        let no_old_transaction = match horizon.oldest {
            Oldest::NoneOpen => true,
            Oldest::Since(oldest) => oldest > self.read_at_us,
            Oldest::Hidden => false,
        };
        in_progress_ended && (no_old_transaction || snap.at_us - self.read_at_us >= SETTLE_GRACE_US)
    }

    /// `xip` as 32-bit xids in an array literal, for `xmin = any(...)`.
    pub fn xip_literal(&self) -> String {
        let ids: Vec<String> = self
            .xip
            .iter()
            .map(|x| (x & 0xffff_ffff).to_string())
            .collect();
        format!("{{{}}}", ids.join(","))
    }

    /// `xmax` as a 32-bit xid.
    pub fn xmax_xid(&self) -> String {
        (self.xmax & 0xffff_ffff).to_string()
    }

    fn absorb(&mut self, later: Window) {
        // Keep the widest view: the earliest xmax catches every transaction either knew of.
        if later.lo.is_none() || self.lo.is_none() {
            self.lo = None;
        }
        self.hi = later.hi;
        self.xmax = self.xmax.min(later.xmax);
        for x in later.xip {
            if !self.xip.contains(&x) {
                self.xip.push(x);
            }
        }
        self.read_at_us = self.read_at_us.max(later.read_at_us);
    }
}

impl Position {
    /// Record that rows in `(watermark, hi]` were read in `snap`: the watermark moves to `hi`
    /// and a window remembers the snapshot. `merge_last` folds it into the previous window
    /// (used for consecutive batches of one run, which are contiguous).
    pub fn advance(&mut self, hi: Vec<String>, snap: &Snapshot, merge_last: bool) {
        let window = Window {
            lo: self.watermark.clone(),
            hi: hi.clone(),
            xip: snap.xip.clone(),
            xmax: snap.xmax,
            read_at_us: snap.at_us,
        };
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

    /// Drop the windows a recheck in `snap` has settled; returns how many were dropped.
    pub fn settle(&mut self, snap: &Snapshot, horizon: &Horizon) -> usize {
        let before = self.windows.len();
        self.windows.retain(|w| !w.settled_in(snap, horizon));
        let dropped = before - self.windows.len();
        if dropped > 0 {
            self.seq += 1;
        }
        dropped
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
        }
    }

    fn snap(xmin: u64, xmax: u64, xip: &[u64], at_s: i64) -> Snapshot {
        Snapshot {
            xmin,
            xmax,
            xip: xip.to_vec(),
            at_us: at_s * S,
        }
    }

    #[test]
    fn advancing_moves_the_watermark_and_opens_a_window() {
        let mut p = Position::default();
        p.advance(vec!["10".into()], &snap(5, 9, &[5, 7], 1000), false);
        assert_eq!(p.watermark, Some(vec!["10".into()]));
        assert_eq!(p.seq, 1);
        assert_eq!(p.windows.len(), 1);
        assert_eq!(p.windows[0].lo, None);
        assert_eq!(p.windows[0].read_at_us, 1000 * S);
        assert_eq!(p.windows[0].xip_literal(), "{5,7}");
    }

    #[test]
    fn consecutive_batches_merge_into_the_widest_window() {
        let mut p = Position::default();
        p.advance(vec!["10".into()], &snap(5, 9, &[5], 1000), false);
        p.advance(vec!["20".into()], &snap(6, 12, &[6, 11], 1001), true);
        assert_eq!(p.windows.len(), 1);
        let w = &p.windows[0];
        assert_eq!((w.lo.clone(), w.hi.clone()), (None, vec!["20".to_string()]));
        assert_eq!(w.xmax, 9);
        assert_eq!(w.xip, vec![5, 6, 11]);
        assert_eq!(w.read_at_us, 1001 * S);
        p.advance(vec!["30".into()], &snap(12, 13, &[], 1002), false);
        assert_eq!(p.windows.len(), 2);
    }

    #[test]
    fn without_a_view_of_every_session_a_window_waits_for_the_grace_time() {
        let mut p = Position::default();
        p.advance(vec!["10".into()], &snap(5, 9, &[5], 1000), false);
        let grace = SETTLE_GRACE_US / S;
        assert_eq!(
            p.settle(&snap(5, 20, &[5, 8], 1000 + grace), &Horizon::unknown()),
            0,
            "xid 5 still running"
        );
        assert_eq!(
            p.settle(&snap(3, 20, &[3], 1000 + grace - 1), &Horizon::unknown()),
            0,
            "grace time not over"
        );
        let seq = p.seq;
        // xid 3 (another database, say) holds xmin back; it does not matter to this window.
        assert_eq!(
            p.settle(&snap(3, 20, &[3], 1000 + grace), &Horizon::unknown()),
            1
        );
        assert!(p.windows.is_empty());
        assert_eq!(p.seq, seq + 1);
    }

    #[test]
    fn with_every_session_visible_a_window_settles_once_older_transactions_are_gone() {
        let mut p = Position::default();
        p.advance(vec!["10".into()], &snap(5, 9, &[5], 1000), false);
        // A transaction that started before the read is still open (it may hold a cursor value).
        assert_eq!(
            p.settle(&snap(9, 20, &[], 1001), &known(Oldest::Since(999 * S))),
            0
        );
        assert_eq!(
            p.settle(&snap(9, 20, &[], 1001), &known(Oldest::Since(1000 * S))),
            0,
            "same instant is not later"
        );
        // Nothing old is open, but xid 5 from the window's snapshot is: still open.
        assert_eq!(
            p.settle(&snap(5, 20, &[5], 1001), &known(Oldest::NoneOpen)),
            0
        );
        assert_eq!(
            p.settle(
                &snap(6, 20, &[7], 1001),
                &known(Oldest::Since(1000 * S + 1))
            ),
            1
        );
        p.advance(vec!["20".into()], &snap(9, 21, &[], 1002), false);
        assert_eq!(
            p.settle(&snap(2, 22, &[2], 1003), &known(Oldest::NoneOpen)),
            1
        );
    }

    #[test]
    fn transactions_of_other_databases_do_not_hold_a_window_open() {
        let mut p = Position::default();
        p.advance(vec!["10".into()], &snap(5, 9, &[5, 7], 1000), false);
        let h = Horizon {
            oldest: Oldest::NoneOpen,
            elsewhere: vec![5],
        };
        assert_eq!(
            p.settle(&snap(5, 20, &[5, 7], 1001), &h),
            0,
            "xid 7 may be ours"
        );
        assert_eq!(p.settle(&snap(5, 20, &[5], 1001), &h), 1);
    }

    #[test]
    fn a_snapshot_knows_which_transactions_ended() {
        let s = snap(10, 20, &[10, 15], 0);
        assert!(s.finished(9));
        assert!(!s.finished(10));
        assert!(s.finished(12));
        assert!(!s.finished(15));
        assert!(!s.finished(20), "not yet started counts as not ended");
    }

    #[test]
    fn too_many_windows_are_merged_oldest_first() {
        let mut p = Position::default();
        for i in 0..(MAX_WINDOWS as u64 + 5) {
            p.advance(
                vec![(i * 10 + 10).to_string()],
                &snap(i, i + 100, &[i + 50], i as i64),
                false,
            );
        }
        assert_eq!(p.windows.len(), MAX_WINDOWS);
        assert_eq!(p.windows[0].lo, None);
        assert_eq!(p.windows[0].xmax, 100);
        assert!(p.windows[0].xip.contains(&55));
        assert_eq!(p.windows[1].lo, Some(vec![p.windows[0].hi[0].clone()]));
    }

    #[test]
    fn xids_are_truncated_to_32_bits() {
        let w = Window {
            lo: None,
            hi: vec![],
            xip: vec![(1 << 32) + 7],
            xmax: (2 << 32) + 9,
            read_at_us: 0,
        };
        assert_eq!(w.xip_literal(), "{7}");
        assert_eq!(w.xmax_xid(), "9");
    }
}
