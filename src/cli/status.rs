//! `pgtide status`: per job its mode, watermark, rows waiting, last run and the progress of
//! a load in hand, as a table or JSON.

use std::sync::Arc;

use serde_json::json;

use crate::config::{JobSpec, Mode};
use crate::job::Context;
use crate::progress::Snapshot;

use super::run::nulls;
use super::Failure;

pub(super) async fn status(
    ctx: &Context,
    jobs: &[Arc<JobSpec>],
    as_json: bool,
) -> Result<(), Failure> {
    let mut out = Vec::new();
    for job in jobs {
        let err = |e: crate::state::StateError| Failure::failed(e.to_string());
        let pos = ctx.store.position(&job.name).await.map_err(err)?;
        let last = ctx.store.last_run(&job.name).await.map_err(err)?;
        let progress = ctx.store.progress(&job.name).await.map_err(err)?;
        let since_success = ctx
            .store
            .last_success(&job.name)
            .await
            .map_err(err)?
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
        let mut oldest = None;
        let waiting = match job.mode {
            Mode::Poll => match ctx.waiting(job, pos.as_ref()).await {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(job = %job.name, error = %e, "cannot count waiting rows");
                    None
                }
            },
            Mode::Notify => match ctx.events_waiting(job).await {
                Ok((n, age)) => {
                    oldest = age;
                    Some(n)
                }
                Err(e) => {
                    tracing::warn!(job = %job.name, error = %e, "cannot count waiting events");
                    None
                }
            },
        };
        out.push(json!({
            "job": job.name,
            "mode": job.mode.as_str(),
            "watermark": pos.as_ref().and_then(|p| p.watermark.clone()),
            "open_windows": pos.as_ref().map_or(0, |p| p.windows.len()),
            "waiting": waiting,
            "oldest_event_secs": oldest,
            "seconds_since_last_success": since_success,
            "last_run": last,
            "progress": progress,
        }));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    println!(
        "{:<20} {:<6} {:<32} {:>9}  LAST RUN",
        "JOB", "MODE", "WATERMARK", "WAITING"
    );
    for (job, v) in jobs.iter().zip(&out) {
        let wm = v["watermark"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|| "-".into());
        let waiting = v["waiting"]
            .as_i64()
            .map_or("?".to_string(), |n| n.to_string());
        let last = last_run(v);
        println!(
            "{:<20} {:<6} {:<32} {:>9}  {last}",
            job.name,
            job.mode.as_str(),
            wm,
            waiting
        );
    }
    Ok(())
}

/// The LAST RUN column: `ok 1200 rows, started ...; last success 5 s ago`, and while a run
/// loads `running, loading 412,000/1,000,000 (52,000 rows/s, ETA 11 s), started ...`.
fn last_run(v: &serde_json::Value) -> String {
    let r = match &v["last_run"] {
        serde_json::Value::Null => return "never".to_string(),
        r => r,
    };
    let done = match serde_json::from_value::<Snapshot>(v["progress"].clone()) {
        Ok(p) => format!(", loading {p}"),
        Err(_) => format!(" {} rows", r["rows"]),
    };
    format!(
        "{}{done}, started {}{}{}{}",
        r["outcome"].as_str().unwrap_or(""),
        r["started_at"].as_str().unwrap_or(""),
        v["seconds_since_last_success"]
            .as_f64()
            .map(|s| format!("; last success {s:.0} s ago"))
            .unwrap_or_else(|| "; never succeeded".into()),
        serde_json::from_value(r["columns"].clone())
            .map(|t| nulls(&t))
            .unwrap_or_default(),
        r["error"]
            .as_str()
            .map(|e| format!("\n{:>71}error: {e}", ""))
            .unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_run_column_shows_a_load_in_hand() {
        let run = json!({
            "started_at": "2025-01-31T12:00:00.000Z", "finished_at": null, "outcome": "running",
            "rows": 412000, "error": null, "unmapped": 0, "nulled": 0, "columns": {},
        });
        let progress = Snapshot::at(
            412_000,
            Some(1_000_000),
            std::time::Duration::from_secs_f64(412.0 / 52.0),
        );
        let v =
            json!({"last_run": run, "progress": progress, "seconds_since_last_success": 3600.0});
        assert_eq!(
            last_run(&v),
            "running, loading 412,000/1,000,000 (52,000 rows/s, ETA 12 s), started \
             2025-01-31T12:00:00.000Z; last success 3600 s ago"
        );
        let v = json!({"last_run": run, "progress": null, "seconds_since_last_success": null});
        assert_eq!(
            last_run(&v),
            "running 412000 rows, started 2025-01-31T12:00:00.000Z; never succeeded"
        );
        assert_eq!(last_run(&json!({"last_run": null})), "never");
    }
}
