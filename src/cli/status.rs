//! `pgtide status`: per job its mode, watermark, rows waiting and last run, as a table or JSON.

use std::sync::Arc;

use serde_json::json;

use crate::config::{JobSpec, Mode};
use crate::job::Context;

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
        let last = match &v["last_run"] {
            serde_json::Value::Null => "never".to_string(),
            r => format!(
                "{} {} rows, started {}{}{}{}",
                r["outcome"].as_str().unwrap_or(""),
                r["rows"],
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
            ),
        };
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
