//! A load's progress: the rows it has applied, an estimate of the rows it reads in all, and
//! the rate and time left worked out from them.
//!
//! Each job has one [`Progress`] (`Metrics::progress`), shared by whatever commits the
//! batches of its loads (`add`, from any number of tasks at once) and whatever shows them: the
//! progress bar or log line of `run-once` and `replay` (`show`), and the daemon's metrics.
//! `status` runs in another process: it works out the same [`Snapshot`] (`Snapshot::at`) from
//! the run's row in the state store, which `Context::drive` keeps current.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod show;

/// `total` when no estimate was made.
const UNKNOWN: u64 = u64::MAX;

/// The progress of a job's load in hand, if any. `Send + Sync`, and `add` is one atomic
/// addition: cheap enough for every committed batch of every worker.
#[derive(Debug)]
pub struct Progress {
    /// Fixed at creation: `started_ns` counts from here.
    base: Instant,
    /// When the load in hand began, in nanoseconds since `base`.
    started_ns: AtomicU64,
    rows: AtomicU64,
    /// The estimate of the load's rows in all, or `UNKNOWN`.
    total: AtomicU64,
    loading: AtomicBool,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress {
            base: Instant::now(),
            started_ns: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            total: AtomicU64::new(UNKNOWN),
            loading: AtomicBool::new(false),
        }
    }
}

impl Progress {
    /// A load begins, of about `total` rows: counting starts again from zero, now.
    pub fn begin(&self, total: Option<u64>) {
        let now = self.base.elapsed().as_nanos() as u64;
        self.rows.store(0, Ordering::Relaxed);
        self.started_ns.store(now, Ordering::Relaxed);
        self.total
            .store(total.unwrap_or(UNKNOWN).min(UNKNOWN - 1), Ordering::Relaxed);
        // Whoever sees `loading` also sees the figures stored before it.
        self.loading.store(true, Ordering::Release);
    }

    /// `rows` more rows were committed to the DWH.
    pub fn add(&self, rows: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
    }

    /// The load ended (done, stopped or failed).
    pub fn end(&self) {
        self.loading.store(false, Ordering::Release);
    }

    /// The figures of the load in hand now; `None` when no load runs.
    pub fn snapshot(&self) -> Option<Snapshot> {
        if !self.loading.load(Ordering::Acquire) {
            return None;
        }
        let started = Duration::from_nanos(self.started_ns.load(Ordering::Relaxed));
        let elapsed = self.base.elapsed().saturating_sub(started);
        let total = self.total.load(Ordering::Relaxed);
        Some(Snapshot::at(
            self.rows.load(Ordering::Relaxed),
            (total != UNKNOWN).then_some(total),
            elapsed,
        ))
    }
}

/// A load's figures at one moment: what `status --json` shows as `progress`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub rows_done: u64,
    /// The estimate of the rows in all; `None` when none was made, or when more rows than
    /// estimated are done already (the estimate was wrong, and nothing better is known).
    pub rows_total: Option<u64>,
    /// The mean rate since the load began, to a tenth.
    pub rows_per_sec: f64,
    /// The rows left at the mean rate; `None` without an estimate or before the first rows.
    pub eta_secs: Option<u64>,
}

impl Snapshot {
    /// The figures of a load that has done `rows_done` of about `estimate` rows in `elapsed`.
    pub fn at(rows_done: u64, estimate: Option<u64>, elapsed: Duration) -> Snapshot {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            rows_done as f64 / secs
        } else {
            0.0
        };
        let rows_total = estimate.filter(|t| *t >= rows_done);
        let eta_secs = match rows_total {
            Some(t) if t == rows_done => Some(0),
            Some(t) if rate > 0.0 => Some(((t - rows_done) as f64 / rate).ceil() as u64),
            _ => None,
        };
        Snapshot {
            rows_done,
            rows_total,
            rows_per_sec: (rate * 10.0).round() / 10.0,
            eta_secs,
        }
    }
}

impl Snapshot {
    /// `52,000 rows/s, ETA 11 s`; `52,000 rows/s` without an estimate.
    pub fn pace(&self) -> String {
        let rate = thousands(self.rows_per_sec.round() as u64);
        match self.eta_secs {
            Some(eta) => format!("{rate} rows/s, ETA {}", duration(eta)),
            None => format!("{rate} rows/s"),
        }
    }
}

/// `412,000/1,000,000 (52,000 rows/s, ETA 11 s)`; `412,000 (52,000 rows/s)` without an
/// estimate.
impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", thousands(self.rows_done))?;
        if let Some(t) = self.rows_total {
            write!(f, "/{}", thousands(t))?;
        }
        write!(f, " ({})", self.pace())
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `42 s`, `3 min 20 s`, `2 h 5 min`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        _ => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_time_left() {
        let s = Snapshot::at(412_000, Some(1_000_000), Duration::from_secs(8));
        assert_eq!(s.rows_per_sec, 51_500.0);
        // 588,000 rows left at 51,500 rows/s: 11.4 s, rounded up.
        assert_eq!(s.eta_secs, Some(12));
        assert_eq!(s.to_string(), "412,000/1,000,000 (51,500 rows/s, ETA 12 s)");

        let s = Snapshot::at(10, None, Duration::from_millis(3000));
        assert_eq!(
            (s.rows_per_sec, s.eta_secs, s.rows_total),
            (3.3, None, None)
        );
        assert_eq!(s.to_string(), "10 (3 rows/s)");
    }

    #[test]
    fn no_rate_before_the_first_rows_and_no_estimate_once_it_is_passed() {
        let s = Snapshot::at(0, Some(500), Duration::ZERO);
        assert_eq!(
            (s.rows_per_sec, s.eta_secs, s.rows_total),
            (0.0, None, Some(500))
        );
        let s = Snapshot::at(0, Some(500), Duration::from_secs(5));
        assert_eq!((s.rows_per_sec, s.eta_secs), (0.0, None));
        let s = Snapshot::at(500, Some(500), Duration::from_secs(5));
        assert_eq!((s.rows_total, s.eta_secs), (Some(500), Some(0)));
        let s = Snapshot::at(501, Some(500), Duration::from_secs(5));
        assert_eq!((s.rows_total, s.eta_secs), (None, None));
        assert_eq!(s.to_string(), "501 (100 rows/s)");
    }

    #[test]
    fn numbers_and_durations_as_people_read_them() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(duration(59), "59 s");
        assert_eq!(duration(200), "3 min 20 s");
        assert_eq!(duration(7500), "2 h 5 min");
    }

    #[test]
    fn a_progress_counts_one_load_at_a_time_from_many_threads() {
        let p = std::sync::Arc::new(Progress::default());
        assert_eq!(p.snapshot(), None);
        p.add(7);
        p.begin(Some(4000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| p.add(1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let s = p.snapshot().unwrap();
        assert_eq!(
            (s.rows_done, s.rows_total, s.eta_secs),
            (4000, Some(4000), Some(0))
        );
        p.end();
        assert_eq!(p.snapshot(), None);
        p.begin(None);
        assert_eq!(p.snapshot().unwrap().rows_done, 0);
    }
}
