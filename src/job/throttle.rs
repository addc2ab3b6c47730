//! `max_rows_per_sec`: a job's reads from its source held to a rate, smoothly.
//!
//! One limiter per run is shared by everything that reads for the job (its batches, the
//! workers of a load). Rows are counted as they stream out of the source's COPY; a reader
//! that runs ahead of the rate waits, in steps of a few milliseconds, so the source sees an
//! even flow rather than bursts and pauses.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};

/// How far ahead of the rate a reader may get before it waits.
const SLACK: Duration = Duration::from_millis(5);

pub struct Limiter {
    per_sec: f64,
    /// Rows that may still pass without waiting (negative: owed), as of `at`.
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    pub fn new(per_sec: u64) -> Limiter {
        Limiter {
            per_sec: per_sec.max(1) as f64,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Account for `rows` rows; how long the reader must wait before going on.
    fn take(&self, rows: u64) -> Option<Duration> {
        let mut state = self.state.lock().expect("limiter");
        let now = Instant::now();
        let (credit, at) = *state;
        // Unused time earns at most one slack's worth of rows: no burst after an idle spell.
        let earned = now.duration_since(at).as_secs_f64() * self.per_sec;
        let credit = (credit + earned).min(self.per_sec * SLACK.as_secs_f64()) - rows as f64;
        *state = (credit, now);
        let owed = -credit / self.per_sec;
        (owed > SLACK.as_secs_f64()).then(|| Duration::from_secs_f64(owed))
    }

    /// Wait as long as `rows` more rows require.
    pub async fn pass(&self, rows: u64) {
        if let Some(wait) = self.take(rows) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// `rows` (one item per row, as the source's COPY sends them) held to `limiter`'s rate.
pub fn throttled<'a, S, T>(rows: S, limiter: Option<&'a Limiter>) -> impl Stream<Item = T> + 'a
where
    S: Stream<Item = T> + 'a,
    T: 'a,
{
    rows.then(move |row| async move {
        if let Some(l) = limiter {
            l.pass(1).await;
        }
        row
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_rate_holds_over_time_without_bursts() {
        let limiter = Limiter::new(2000);
        let started = Instant::now();
        let mut longest_pause = Duration::ZERO;
        let mut last = Instant::now();
        for _ in 0..1000 {
            limiter.pass(1).await;
            longest_pause = longest_pause.max(last.elapsed());
            last = Instant::now();
        }
        let took = started.elapsed().as_secs_f64();
        // 1000 rows at 2000 rows/s: half a second, give or take the slack.
        assert!((0.48..0.7).contains(&took), "took {took} s");
        assert!(
            longest_pause < Duration::from_millis(30),
            "waits are short and frequent: {longest_pause:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_spell_earns_no_burst() {
        let limiter = Limiter::new(1000);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        for _ in 0..200 {
            limiter.pass(1).await;
        }
        let took = started.elapsed().as_secs_f64();
        assert!(
            took >= 0.18,
            "200 rows at 1000 rows/s after a pause took {took} s"
        );
    }
}
