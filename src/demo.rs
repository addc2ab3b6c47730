//! `pgtide demo`: a throwaway PostgreSQL with a small shop, the example jobs of `jobs/` run
//! against it, and what landed in the DWH.

use std::sync::Arc;

use crate::cluster::{Cluster, ClusterError};
use crate::config::{self, ConfigError};
use crate::job::{Context, JobError};
use crate::pg::{self, PgError};
use crate::state::{StateError, Store};

/// The example jobs shipped in `jobs/`, run by the demo exactly as users read them.
pub const EXAMPLE_JOBS: &[(&str, &str)] = &[
    ("customers.toml", include_str!("../jobs/customers.toml")),
    ("orders.toml", include_str!("../jobs/orders.toml")),
];

/// The sample shop: customers, and orders with a jsonb payload.
pub const SHOP_SQL: &str = include_str!("../sql/demo_shop.sql");

/// What stopped the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The task starting the cluster panicked.
    #[error(transparent)]
    Start(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Connect(#[from] PgError),
    /// A statement of the demo itself.
    #[error("{}", pg::message(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error("fill the shop: {}", pg::message(.0))]
    Fill(#[source] tokio_postgres::Error),
    /// Writing the demo's config and job files.
    #[error(transparent)]
    Files(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("job {job}: {source}")]
    Job {
        job: String,
        #[source]
        source: JobError,
    },
}

/// Run the demo, printing as it goes; the throwaway cluster is removed at the end, or when
/// the demo stops early.
pub async fn run() -> Result<(), DemoError> {
    println!("starting a throwaway PostgreSQL...");
    let cluster = tokio::task::spawn_blocking(Cluster::start).await??;
    let admin = pg::connect(&cluster.url("postgres"), "pgtide:demo", "demo server").await?;
    for db in ["shop", "dwh"] {
        admin
            .batch_execute(&format!("create database {db}"))
            .await?;
    }
    let shop = pg::connect(&cluster.url("shop"), "pgtide:demo", "demo shop").await?;
    shop.batch_execute(SHOP_SQL)
        .await
        .map_err(DemoError::Fill)?;
    println!(
        "shop filled on 127.0.0.1:{} (database shop); the DWH is database dwh",
        cluster.port
    );

    let dir = cluster.dir().join("pgtide");
    std::fs::create_dir_all(dir.join("jobs"))?;
    for (name, text) in EXAMPLE_JOBS {
        std::fs::write(dir.join("jobs").join(name), text)?;
    }
    let toml = format!(
        "state_path = \"state/pgtide.db\"\n[sources.shop]\nurl = \"{}\"\n[dwh]\nurl = \"{}\"\nschema = \"analytics\"\n",
        cluster.url("shop"),
        cluster.url("dwh")
    );
    std::fs::write(dir.join("pgtide.toml"), toml)?;
    let config = Arc::new(config::load(&dir.join("pgtide.toml"))?);
    let store = Store::open(&config.state_path)?;
    let ctx = Context::new(config.clone(), store);

    for job in &config.jobs {
        let s = ctx.run_once(job).await.map_err(|source| DemoError::Job {
            job: job.name.clone(),
            source,
        })?;
        println!(
            "job {:<10} first run: {} rows in {} batches",
            job.name, s.rows, s.batches
        );
    }
    shop.batch_execute(
        "update orders set status = 3, updated_at = now() where id in (1, 2, 3);
         insert into orders (customer_id, status, amount, payload)
           values (1, 1, 42.50, '{\"meta\": {\"channel\": \"demo\"}, \"items\": [{\"sku\": \"DEMO-1\"}]}')",
    )
    .await?;
    for job in &config.jobs {
        let s = ctx.run_once(job).await.map_err(|source| DemoError::Job {
            job: job.name.clone(),
            source,
        })?;
        println!(
            "job {:<10} after 3 updates and 1 insert: {} rows read, {} changed",
            job.name, s.rows, s.changed
        );
    }

    let dwh = pg::connect(&cluster.url("dwh"), "pgtide:demo", "demo dwh").await?;
    println!("\nanalytics.orders_wide, newest first:");
    let rows = dwh
        .query(
            "select order_id::text, customer_name, status_label, amount_cents::text, channel, coalesce(first_sku, ''), _pgtide_loaded_at::text
             from analytics.orders_wide w order by w.order_id desc limit 5",
            &[],
        )
        .await?;
    println!(
        "{:>8}  {:<14} {:<11} {:>12}  {:<8} {:<8}  loaded at",
        "order_id", "customer", "status", "amount_cents", "channel", "sku"
    );
    for r in rows {
        println!(
            "{:>8}  {:<14} {:<11} {:>12}  {:<8} {:<8}  {}",
            r.get::<_, String>(0),
            r.get::<_, Option<String>>(1).unwrap_or_default(),
            r.get::<_, Option<String>>(2).unwrap_or_default(),
            r.get::<_, String>(3),
            r.get::<_, Option<String>>(4).unwrap_or_default(),
            r.get::<_, String>(5),
            r.get::<_, String>(6)
        );
    }
    let counts = dwh
        .query_one("select (select count(*) from analytics.orders_wide), (select count(*) from analytics.customers)", &[])
        .await?;
    println!(
        "\nDWH holds {} orders and {} customers.\n\njob status:",
        counts.get::<_, i64>(0),
        counts.get::<_, i64>(1)
    );
    for job in &config.jobs {
        let pos = ctx.store.position(&job.name).await?;
        let last = ctx.store.last_run(&job.name).await?;
        println!(
            "  {:<10} watermark {:<40} last run {} ({} rows)",
            job.name,
            pos.and_then(|p| p.watermark)
                .map(|w| w.join(", "))
                .unwrap_or_default(),
            last.as_ref().map_or("never", |r| r.outcome.as_str()),
            last.as_ref().map_or(0, |r| r.rows)
        );
    }
    drop(cluster);
    println!("\nthe throwaway PostgreSQL is stopped and removed.");
    Ok(())
}
