//! Per-job metrics in Prometheus text format: served by the daemon at `GET /metrics` (with
//! `GET /healthz`), and written by `run-once --metrics-file` for node_exporter's textfile
//! collector.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::progress::{Progress, Snapshot};

/// Upper bounds (seconds) of the batch duration histogram's buckets.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default)]
struct JobMetrics {
    rows: u64,
    rechecked: u64,
    runs_ok: u64,
    runs_failed: u64,
    buckets: [u64; BUCKETS.len()],
    batch_sum: f64,
    batch_count: u64,
    waiting: Option<i64>,
    last_success: Option<SystemTime>,
    retry_attempt: u64,
    progress: Arc<Progress>,
}

/// Every job's figures, shared by the tasks of the daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    jobs: Mutex<BTreeMap<String, JobMetrics>>,
}

impl Metrics {
    fn with<R>(&self, job: &str, f: impl FnOnce(&mut JobMetrics) -> R) -> R {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        f(jobs.entry(job.to_string()).or_default())
    }

    /// Make a job appear (with zeros) before its first run.
    pub fn register(&self, job: &str) {
        self.with(job, |_| ());
    }

    pub fn rows(&self, job: &str, n: u64) {
        self.with(job, |m| m.rows += n);
    }

    /// Rows a recheck of open windows re-read (not counted in `rows`).
    pub fn rechecked(&self, job: &str, n: u64) {
        self.with(job, |m| m.rechecked += n);
    }

    pub fn batch(&self, job: &str, secs: f64) {
        self.with(job, |m| {
            for (i, le) in BUCKETS.iter().enumerate() {
                if secs <= *le {
                    m.buckets[i] += 1;
                }
            }
            m.batch_sum += secs;
            m.batch_count += 1;
        });
    }

    /// A run (or a notify job's follow) ended; `ok` also means the job was fresh at `at`.
    pub fn run(&self, job: &str, ok: bool) {
        self.with(job, |m| {
            if ok {
                m.runs_ok += 1;
                m.last_success = Some(SystemTime::now());
            } else {
                m.runs_failed += 1;
            }
        });
    }

    /// A notify job that just drained is fresh.
    pub fn fresh(&self, job: &str) {
        self.with(job, |m| m.last_success = Some(SystemTime::now()));
    }

    pub fn last_success(&self, job: &str, at: SystemTime) {
        self.with(job, |m| {
            if m.last_success.is_none_or(|t| t < at) {
                m.last_success = Some(at);
            }
        });
    }

    pub fn waiting(&self, job: &str, n: Option<i64>) {
        self.with(job, |m| m.waiting = n);
    }

    pub fn retry_attempt(&self, job: &str, attempt: u64) {
        self.with(job, |m| m.retry_attempt = attempt);
    }

    /// The progress of the job's loads, shared by its runs and whatever shows them.
    pub fn progress(&self, job: &str) -> Arc<Progress> {
        self.with(job, |m| m.progress.clone())
    }

    /// The Prometheus text exposition of every job.
    pub fn render(&self) -> String {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let mut out = String::new();
        let mut family =
            |name: &str,
             kind: &str,
             help: &str,
             lines: &mut dyn FnMut(&mut String, &str, &JobMetrics)| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (job, m) in jobs.iter() {
                    lines(&mut out, job, m);
                }
            };
        family(
            "pgtide_rows_written_total",
            "counter",
            "View rows read from the source and applied to the DWH.",
            &mut |o, j, m| {
                let _ = writeln!(o, "pgtide_rows_written_total{{job=\"{j}\"}} {}", m.rows);
            },
        );
        family(
            "pgtide_rows_rechecked_total",
            "counter",
            "Rows re-read by rechecks of open windows (not in pgtide_rows_written_total).",
            &mut |o, j, m| {
                let _ = writeln!(
                    o,
                    "pgtide_rows_rechecked_total{{job=\"{j}\"}} {}",
                    m.rechecked
                );
            },
        );
        family(
            "pgtide_runs_total",
            "counter",
            "Runs by outcome (a notify job's follow counts as one run).",
            &mut |o, j, m| {
                let _ = writeln!(
                    o,
                    "pgtide_runs_total{{job=\"{j}\",outcome=\"ok\"}} {}",
                    m.runs_ok
                );
                let _ = writeln!(
                    o,
                    "pgtide_runs_total{{job=\"{j}\",outcome=\"failed\"}} {}",
                    m.runs_failed
                );
            },
        );
        family(
            "pgtide_batch_duration_seconds",
            "histogram",
            "Time to read, write and commit one batch.",
            &mut |o, j, m| {
                for (i, le) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        o,
                        "pgtide_batch_duration_seconds_bucket{{job=\"{j}\",le=\"{le}\"}} {}",
                        m.buckets[i]
                    );
                }
                let _ = writeln!(
                    o,
                    "pgtide_batch_duration_seconds_bucket{{job=\"{j}\",le=\"+Inf\"}} {}",
                    m.batch_count
                );
                let _ = writeln!(
                    o,
                    "pgtide_batch_duration_seconds_sum{{job=\"{j}\"}} {}",
                    m.batch_sum
                );
                let _ = writeln!(
                    o,
                    "pgtide_batch_duration_seconds_count{{job=\"{j}\"}} {}",
                    m.batch_count
                );
            },
        );
        family(
            "pgtide_waiting",
            "gauge",
            "Source rows past the watermark (poll) or events waiting (notify).",
            &mut |o, j, m| {
                if let Some(w) = m.waiting {
                    let _ = writeln!(o, "pgtide_waiting{{job=\"{j}\"}} {w}");
                }
            },
        );
        family(
            "pgtide_seconds_since_last_success",
            "gauge",
            "Seconds since the job last finished a run (or a drain) without error.",
            &mut |o, j, m| {
                if let Some(t) = m.last_success {
                    let secs = now
                        .duration_since(t)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0);
                    let _ = writeln!(
                        o,
                        "pgtide_seconds_since_last_success{{job=\"{j}\"}} {secs:.3}"
                    );
                }
            },
        );
        family(
            "pgtide_retry_attempt",
            "gauge",
            "The current retry attempt of a failing job (0 when it is not retrying).",
            &mut |o, j, m| {
                let _ = writeln!(o, "pgtide_retry_attempt{{job=\"{j}\"}} {}", m.retry_attempt);
            },
        );
        let loads: BTreeMap<&str, _> = jobs
            .iter()
            .filter_map(|(j, m)| Some((j.as_str(), m.progress.snapshot()?)))
            .collect();
        let mut load = |name: &str, help: &str, value: &dyn Fn(&Snapshot) -> Option<f64>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (j, s) in &loads {
                if let Some(v) = value(s) {
                    let _ = writeln!(out, "{name}{{job=\"{j}\"}} {v}");
                }
            }
        };
        load(
            "pgtide_load_rows_done",
            "Rows the job's load in hand has applied (while a load runs).",
            &|s| Some(s.rows_done as f64),
        );
        load(
            "pgtide_load_rows_total",
            "The estimate of the rows the job's load in hand reads in all (when one was made).",
            &|s| s.rows_total.map(|t| t as f64),
        );
        load(
            "pgtide_load_rows_per_second",
            "The mean rate of the job's load in hand since it began.",
            &|s| Some(s.rows_per_sec),
        );
        load(
            "pgtide_load_eta_seconds",
            "The time the job's load in hand still needs at its mean rate (when estimated).",
            &|s| s.eta_secs.map(|e| e as f64),
        );
        out
    }
}

/// Serve `GET /metrics` and `GET /healthz` on `addr` until `shutdown` fires (or the task is
/// dropped).
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: std::sync::Arc<Metrics>,
    mut shutdown: crate::shutdown::Shutdown,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    loop {
        let (mut sock, _) = tokio::select! {
            () = shutdown.recv() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // The request head; nothing after it matters.
            while len < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf[len..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, kind, body) = match (head.starts_with("GET "), path) {
                (true, "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                (true, "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let m = Metrics::default();
        m.register("idle");
        m.rows("orders", 10);
        m.batch("orders", 0.02);
        m.batch("orders", 3.0);
        m.run("orders", true);
        m.waiting("orders", Some(4));
        let text = m.render();
        assert!(text.contains("# TYPE pgtide_rows_written_total counter\npgtide_rows_written_total{job=\"idle\"} 0\npgtide_rows_written_total{job=\"orders\"} 10\n"), "{text}");
        assert!(
            text.contains("pgtide_batch_duration_seconds_bucket{job=\"orders\",le=\"0.025\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pgtide_batch_duration_seconds_bucket{job=\"orders\",le=\"5\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("pgtide_batch_duration_seconds_count{job=\"orders\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("pgtide_runs_total{job=\"orders\",outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pgtide_waiting{job=\"orders\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("pgtide_seconds_since_last_success{job=\"orders\"} 0."),
            "{text}"
        );
        assert!(
            !text.contains("pgtide_seconds_since_last_success{job=\"idle\"}"),
            "{text}"
        );
        assert!(!text.contains("pgtide_load_rows_done{"), "{text}");
    }

    #[test]
    fn a_load_in_hand_is_rendered_while_it_runs() {
        let m = Metrics::default();
        m.register("idle");
        let p = m.progress("orders");
        p.begin(Some(1000));
        p.add(250);
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE pgtide_load_rows_done gauge\npgtide_load_rows_done{job=\"orders\"} 250\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("pgtide_load_rows_total{job=\"orders\"} 1000\n"),
            "{text}"
        );
        assert!(
            text.contains("pgtide_load_rows_per_second{job=\"orders\"} "),
            "{text}"
        );
        assert!(
            !text.contains("pgtide_load_rows_done{job=\"idle\"}"),
            "{text}"
        );
        p.end();
        assert!(!m.render().contains("pgtide_load_rows_done{"));
    }
}
