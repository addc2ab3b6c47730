//! A load of many rows read by several workers at once: `(watermark, end]` cut into chunks,
//! each read in its own snapshot and committed on its own, in any order.
//!
//! The position keeps the load's state, stored with every chunk's rows, so a load that is
//! killed resumes without reading a finished chunk again: `end` (the newest row when the load
//! began), the `frontier` up to which chunks have been handed out, the chunks handed out and
//! not done (`open`), and the windows the finished chunks leave (`done`, in the order the
//! chunks were planned, neighbours merged). Chunks planned after the last stored position
//! are simply planned again from the stored frontier. Nothing here compares cursor values:
//! chunks are known by their plan order.
//!
//! When every chunk is done the watermark moves to `end` and the chunks' windows join the
//! position's: rows that commit late into a chunk already read are found by the recheck, as
//! after any batch.
//!
//! A chunk's window spans the whole load, not only the chunk: chunks commit in any order, so
//! a row that an update moved from one chunk's range into another's can be read in its old
//! version by a chunk that commits after the chunk that read its new one. The update's
//! transaction was not visible to the first chunk's snapshot, so a recheck over the whole load
//! with that snapshot's window reads the row again, now, and writes it last.

use serde::{Deserialize, Serialize};

use super::{Position, Snapshot, Unseen, Window, MAX_WINDOWS};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// The watermark when the load began.
    #[serde(default)]
    pub start: Option<Vec<String>>,
    /// The cursor of the newest row when the load began: the load reads `(start, end]`.
    pub end: Vec<String>,
    /// Every chunk up to here has been handed out (`None`: none yet, they start at the
    /// watermark).
    pub frontier: Option<Vec<String>>,
    /// Every chunk up to `end` has been handed out.
    #[serde(default)]
    pub planned: bool,
    /// Chunks handed out and not done yet.
    #[serde(default)]
    pub open: Vec<Chunk>,
    /// The windows of finished chunks, in plan order; neighbours are merged.
    #[serde(default)]
    pub done: Vec<Done>,
    /// The plan order of the next chunk.
    #[serde(default)]
    pub next_seq: u64,
}

/// A part of a load: the rows whose cursor lies in `(lo, hi]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub seq: u64,
    pub lo: Option<Vec<String>>,
    pub hi: Vec<String>,
}

/// Finished chunks `first..=last` (plan order), the range `(lo, hi]` they cover, and the
/// window they leave (over the whole load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub first: u64,
    pub last: u64,
    pub lo: Option<Vec<String>>,
    pub hi: Vec<String>,
    pub window: Window,
}

impl Position {
    /// Begin a load of `(watermark, end]`.
    pub fn begin_load(&mut self, end: Vec<String>) {
        self.load = Some(Load {
            start: self.watermark.clone(),
            end,
            frontier: self.watermark.clone(),
            planned: false,
            open: Vec::new(),
            done: Vec::new(),
            next_seq: 0,
        });
        self.seq += 1;
    }

    /// The chunks a resumed load must read again (handed out, never done). They stay open,
    /// in their plan order, until done: every position stored meanwhile still has them.
    pub fn reopen_chunks(&self) -> Vec<Chunk> {
        self.load
            .as_ref()
            .map(|l| l.open.clone())
            .unwrap_or_default()
    }

    /// Hand out `(frontier, hi]`, or `(lo, hi]` of a chunk read again; the position records it
    /// as open (stored with the next chunk that finishes).
    pub fn open_chunk(&mut self, lo: Option<Vec<String>>, hi: Vec<String>) -> Chunk {
        let load = self.load.as_mut().expect("a load in progress");
        let chunk = Chunk {
            seq: load.next_seq,
            lo,
            hi,
        };
        load.next_seq += 1;
        load.open.push(chunk.clone());
        chunk
    }

    /// Move the frontier to `hi`: the chunks up to it are handed out.
    pub fn advance_frontier(&mut self, hi: Vec<String>) {
        if let Some(l) = self.load.as_mut() {
            l.frontier = Some(hi);
        }
    }

    /// Every chunk up to `end` is handed out. Returns whether the load is complete now (it
    /// had no chunk at all, or the last one finished before planning ended).
    pub fn finish_planning(&mut self) -> bool {
        if let Some(l) = self.load.as_mut() {
            l.planned = true;
        }
        let complete = self.complete_load();
        if complete {
            self.seq += 1;
        }
        complete
    }

    /// `chunk` was read in `snap` and its rows committed: it leaves a window; the load is
    /// complete when it was the last one. The caller stores the result with the chunk's rows.
    pub fn chunk_done(&mut self, chunk: &Chunk, snap: &Snapshot, unseen: &Unseen) {
        let load = self.load.as_mut().expect("a load in progress");
        load.open.retain(|c| c.seq != chunk.seq);
        let window = Window::read(load.start.clone(), load.end.clone(), snap, unseen);
        let at = load.done.partition_point(|d| d.last < chunk.seq);
        load.done.insert(
            at,
            Done {
                first: chunk.seq,
                last: chunk.seq,
                lo: chunk.lo.clone(),
                hi: chunk.hi.clone(),
                window,
            },
        );
        // Merge with the finished neighbours: plan order is cursor order.
        self.merge_next(at);
        if at > 0 {
            self.merge_next(at - 1);
        }
        self.take_prefix();
        self.complete_load();
        self.seq += 1;
    }

    /// Finished chunks that continue the watermark move it on: the position says how far the
    /// load has come, as a load of one batch after another would.
    fn take_prefix(&mut self) {
        let Some(load) = self.load.as_mut() else {
            return;
        };
        if load.done.first().is_some_and(|d| d.lo == self.watermark) {
            let first = load.done.remove(0);
            self.watermark = Some(first.hi);
            self.push_window(first.window);
        }
    }

    /// Keep `window` (the next range in cursor order) unless it was settled when read: merged
    /// into the last window when it continues it (chunks finished in order arrive one by one;
    /// like consecutive batches of one run, neighbours share a window, so a recheck has fewer
    /// ranges to test), and the oldest merged beyond the limit.
    fn push_window(&mut self, window: Window) {
        if window.settled {
            return;
        }
        match self.windows.last_mut() {
            // It continues the last one, or spans the same range (a load's chunks' windows
            // span the whole load).
            Some(last)
                if window.lo.as_ref() == Some(&last.hi)
                    || (window.lo == last.lo && window.hi == last.hi) =>
            {
                last.absorb(window)
            }
            _ => self.windows.push(window),
        }
        while self.windows.len() > MAX_WINDOWS {
            let second = self.windows.remove(1);
            self.windows[0].absorb(second);
        }
    }

    /// Merge `done[i]` with `done[i + 1]` when their chunks are neighbours.
    fn merge_next(&mut self, i: usize) {
        let load = self.load.as_mut().expect("a load in progress");
        if i + 1 < load.done.len() && load.done[i].last + 1 == load.done[i + 1].first {
            let next = load.done.remove(i + 1);
            load.done[i].last = next.last;
            load.done[i].hi = next.hi;
            load.done[i].window.absorb(next.window);
        }
    }

    /// When every chunk is handed out and done: the watermark moves to the load's end and
    /// its windows join the position's.
    fn complete_load(&mut self) -> bool {
        let complete = self
            .load
            .as_ref()
            .is_some_and(|l| l.planned && l.open.is_empty());
        if !complete {
            return false;
        }
        let load = self.load.take().expect("checked");
        for d in load.done {
            self.push_window(d.window);
        }
        self.watermark = Some(load.end);
        true
    }
}

impl Window {
    /// The window a read of `(lo, hi]` in `snap` leaves: settled at once when the horizon read
    /// just after the snapshot shows that nothing can still add rows to the range (see the
    /// module documentation of `position`).
    pub fn read(
        lo: Option<Vec<String>>,
        hi: Vec<String>,
        snap: &Snapshot,
        unseen: &Unseen,
    ) -> Window {
        let mut window = Window {
            lo,
            hi,
            floor: unseen.floor,
            xids: unseen.xids.clone(),
            next: snap.next.max(snap.xmax),
            read_at_us: snap.at_us,
            mark: None,
            settled: false,
        };
        window.tidy();
        if let Some(after) = &snap.after {
            let elsewhere: Vec<u64> = after.elsewhere.iter().map(|x| snap.widen(*x)).collect();
            window.settled = window.settled_in(snap, after, snap.oldest_running(&elsewhere));
        }
        window
    }
}
