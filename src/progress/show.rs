//! Loads shown while a command runs: on a terminal a bar per job (rows done, rate, time
//! left); elsewhere (systemd, CI, a pipe) a log line per job at least every `LOG_INTERVAL`,
//! and no control characters at all.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Progress, Snapshot};

/// How often a load that runs without a terminal is logged: often enough to tell a slow load
/// from a stuck one, seldom enough not to fill the journal.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often the bars take new figures (indicatif limits the redraws itself).
const BAR_INTERVAL: Duration = Duration::from_millis(200);

/// `LOG_INTERVAL`; debug builds read `PGTIDE_PROGRESS_LOG_SECS` (tests).
fn log_interval() -> Duration {
    if cfg!(debug_assertions) {
        if let Some(s) = std::env::var("PGTIDE_PROGRESS_LOG_SECS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
        {
            return Duration::from_secs_f64(s);
        }
    }
    LOG_INTERVAL
}

/// The bars on the terminal, while they are shown: log lines are written around them.
static TERMINAL: Mutex<Option<MultiProgress>> = Mutex::new(None);

fn terminal() -> MutexGuard<'static, Option<MultiProgress>> {
    TERMINAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Write `bytes` (whole log lines) to stderr, the bars hidden meanwhile so that the lines
/// never land in the middle of one.
pub fn write_stderr(bytes: &[u8]) -> std::io::Result<()> {
    let bars = terminal().clone();
    match bars {
        Some(bars) => bars.suspend(|| std::io::stderr().write_all(bytes)),
        None => std::io::stderr().write_all(bytes),
    }
}

/// How loads are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// A bar per job on stderr.
    Bars,
    /// A log line per job every `LOG_INTERVAL`.
    Log,
}

impl Show {
    /// Bars only for a person at a terminal: stdout and stderr both terminals. Output that
    /// goes to a file, a pipe or the journal gets log lines.
    pub fn detect() -> Show {
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Show::Bars
        } else {
            Show::Log
        }
    }
}

/// The loads of some jobs shown until `stop`.
pub struct Shown {
    bars: Option<Arc<Mutex<Bars>>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Show the loads of `jobs` (each with its `Progress`) as `how` says, on a task of the
/// current runtime.
pub fn show(jobs: Vec<(String, Arc<Progress>)>, how: Show) -> Shown {
    let (stop, stopped) = tokio::sync::oneshot::channel();
    match how {
        Show::Bars => {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            *terminal() = Some(multi.clone());
            let bars = Arc::new(Mutex::new(Bars {
                multi,
                jobs: jobs.into_iter().map(|(j, p)| (j, p, None)).collect(),
            }));
            let task = tokio::spawn(redraw(bars.clone(), stopped));
            Shown {
                bars: Some(bars),
                stop,
                task,
            }
        }
        Show::Log => Shown {
            bars: None,
            stop,
            task: tokio::spawn(log(jobs, stopped)),
        },
    }
}

impl Shown {
    /// Take the figures now: the bars of loads that ended go away. Call it before printing to
    /// stdout, which shares the terminal with the bars.
    pub fn refresh(&self) {
        if let Some(b) = &self.bars {
            lock(b).refresh();
        }
    }

    /// Stop showing, the bars cleared from the terminal.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        if let Some(b) = &self.bars {
            lock(b).clear();
        }
        *terminal() = None;
    }
}

struct Bars {
    multi: MultiProgress,
    jobs: Vec<(String, Arc<Progress>, Option<ProgressBar>)>,
}

fn lock(b: &Mutex<Bars>) -> MutexGuard<'_, Bars> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

impl Bars {
    fn refresh(&mut self) {
        for (job, progress, bar) in &mut self.jobs {
            match (progress.snapshot(), bar.as_ref()) {
                (Some(s), Some(b)) => {
                    set(b, &s);
                    b.force_draw();
                }
                (Some(s), None) => {
                    // Drawn first with its figures, not empty.
                    let b = ProgressBar::hidden()
                        .with_style(style(false))
                        .with_prefix(job.clone());
                    set(&b, &s);
                    let b = self.multi.add(b);
                    b.force_draw();
                    *bar = Some(b);
                }
                (None, _) => {
                    if let Some(b) = bar.take() {
                        b.finish_and_clear();
                        self.multi.remove(&b);
                    }
                }
            }
        }
    }

    fn clear(&mut self) {
        for (_, _, bar) in &mut self.jobs {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
                self.multi.remove(&b);
            }
        }
    }
}

/// `orders [=====>    ] 412,000/1,000,000 (52,000 rows/s, ETA 11 s)`; a spinner in place of
/// the bar without an estimate.
fn style(known: bool) -> ProgressStyle {
    let template = if known {
        "{prefix} [{bar:30}] {human_pos}/{human_len} {msg}"
    } else {
        "{prefix} {spinner} {human_pos} {msg}"
    };
    ProgressStyle::with_template(template)
        .expect("a valid template")
        .progress_chars("=> ")
}

/// Give `b` the figures of `s`. Each change may draw (at most 20 times a second, the rest
/// skipped): the caller draws the whole of them once after.
fn set(b: &ProgressBar, s: &Snapshot) {
    match s.rows_total {
        Some(t) => {
            if b.length().is_none() {
                b.set_style(style(true));
            }
            b.set_length(t);
        }
        None => {
            if b.length().is_some() {
                b.set_style(style(false));
                b.unset_length();
            }
            b.tick();
        }
    }
    b.set_position(s.rows_done);
    b.set_message(format!("({})", s.pace()));
}

async fn redraw(bars: Arc<Mutex<Bars>>, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(BAR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => lock(&bars).refresh(),
        }
    }
}

async fn log(jobs: Vec<(String, Arc<Progress>)>, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    let period = log_interval();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {
                for (job, progress) in &jobs {
                    if let Some(s) = progress.snapshot() {
                        tracing::info!(
                            job = %job,
                            rows_done = s.rows_done,
                            rows_total = s.rows_total,
                            rows_per_sec = s.rows_per_sec,
                            eta_secs = s.eta_secs,
                            "loading"
                        );
                    }
                }
            }
        }
    }
}
