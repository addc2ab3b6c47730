//! A job's position: the watermark, and the recheck windows that make it exact.
//!
//! Reading `cursor > watermark` alone loses rows whose transaction commits after a later row
//! was read. So every batch is read in one snapshot, and each move of the watermark from `lo`
//! to `hi` leaves a window that remembers that snapshot: the transactions then in progress
//! (`xip`) and the first transaction id not yet assigned (`xmax`). A row in `(lo, hi]` that
//! the snapshot could not see was written by one of those. Later runs re-read exactly those
//! rows (`xmin` in `xip`, or `xmin` at or after `xmax`), and close the window once a newer
//! snapshot shows every such transaction finished and a grace time has passed (for
//! transactions that took their cursor value, a sequence number or `now()`, before they got
//! a transaction id).
//!
//! Positions move forward only: `seq` grows with every committed batch.

use serde::{Deserialize, Serialize};

/// How long a window stays open after every transaction it knew of has finished: covers a
/// writer that took its cursor value (`nextval()`, `now()`) this long before its first write.
pub const SETTLE_GRACE_SECS: i64 = 300;
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub lo: Option<Vec<String>>,
    pub hi: Vec<String>,
    /// Transactions (xid8) in progress when the range was read.
    pub xip: Vec<u64>,
    /// The snapshot's xmax (xid8): transactions from here on had not started writing.
    pub xmax: u64,
    /// When the range was read (unix seconds).
    pub read_at: i64,
}

/// What `pg_current_snapshot()` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Window {
    /// Whether a recheck taken in `snap` at time `now` is the last one this window needs.
    pub fn settled_in(&self, snap: &Snapshot, now: i64) -> bool {
        snap.xmin >= self.xmax && now - self.read_at >= SETTLE_GRACE_SECS
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
        self.read_at = self.read_at.max(later.read_at);
    }
}

impl Position {
    /// Record that rows in `(watermark, hi]` were read in `snap`: the watermark moves to `hi`
    /// and a window remembers the snapshot. `merge_last` folds it into the previous window
    /// (used for consecutive batches of one run, which are contiguous).
    pub fn advance(&mut self, hi: Vec<String>, snap: &Snapshot, now: i64, merge_last: bool) {
        let window = Window {
            lo: self.watermark.clone(),
            hi: hi.clone(),
            xip: snap.xip.clone(),
            xmax: snap.xmax,
            read_at: now,
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
    pub fn settle(&mut self, snap: &Snapshot, now: i64) -> usize {
        let before = self.windows.len();
        self.windows.retain(|w| !w.settled_in(snap, now));
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

    fn snap(xmin: u64, xmax: u64, xip: &[u64]) -> Snapshot {
        Snapshot {
            xmin,
            xmax,
            xip: xip.to_vec(),
        }
    }

    #[test]
    fn advancing_moves_the_watermark_and_opens_a_window() {
        let mut p = Position::default();
        p.advance(vec!["10".into()], &snap(5, 9, &[5, 7]), 1000, false);
        assert_eq!(p.watermark, Some(vec!["10".into()]));
        assert_eq!(p.seq, 1);
        assert_eq!(p.windows.len(), 1);
        assert_eq!(p.windows[0].lo, None);
        assert_eq!(p.windows[0].xip_literal(), "{5,7}");
    }

    #[test]
    fn consecutive_batches_merge_into_the_widest_window() {
        let mut p = Position::default();
        p.advance(vec!["10".into()], &snap(5, 9, &[5]), 1000, false);
        p.advance(vec!["20".into()], &snap(6, 12, &[6, 11]), 1001, true);
        assert_eq!(p.windows.len(), 1);
        let w = &p.windows[0];
        assert_eq!((w.lo.clone(), w.hi.clone()), (None, vec!["20".to_string()]));
        assert_eq!(w.xmax, 9);
        assert_eq!(w.xip, vec![5, 6, 11]);
        assert_eq!(w.read_at, 1001);
        p.advance(vec!["30".into()], &snap(12, 13, &[]), 1002, false);
        assert_eq!(p.windows.len(), 2);
    }

    #[test]
    fn a_window_settles_only_after_its_transactions_and_the_grace_time() {
        let mut p = Position::default();
        p.advance(vec!["10".into()], &snap(5, 9, &[5]), 1000, false);
        assert_eq!(
            p.settle(&snap(8, 20, &[8]), 1000 + SETTLE_GRACE_SECS),
            0,
            "xid 8 < xmax 9 still running"
        );
        assert_eq!(
            p.settle(&snap(9, 20, &[]), 1000 + SETTLE_GRACE_SECS - 1),
            0,
            "grace time not over"
        );
        let seq = p.seq;
        assert_eq!(p.settle(&snap(9, 20, &[]), 1000 + SETTLE_GRACE_SECS), 1);
        assert!(p.windows.is_empty());
        assert_eq!(p.seq, seq + 1);
    }

    #[test]
    fn too_many_windows_are_merged_oldest_first() {
        let mut p = Position::default();
        for i in 0..(MAX_WINDOWS as u64 + 5) {
            p.advance(
                vec![(i * 10 + 10).to_string()],
                &snap(i, i + 100, &[i + 50]),
                i as i64,
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
            read_at: 0,
        };
        assert_eq!(w.xip_literal(), "{7}");
        assert_eq!(w.xmax_xid(), "9");
    }
}
