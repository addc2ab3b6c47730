//! The batch driver over a DWH that only records what it is given: a real source (a throwaway
//! PostgreSQL), a fake warehouse, so the loop's own rules are what is tested: batches in order,
//! the position stored with each batch and only after it, a failed batch moving nothing, and a
//! stop at the next boundary.

use std::sync::Mutex;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::*;
use crate::sink::dwh::Written;
use crate::sink::TargetState;

/// What the fake DWH saw.
#[derive(Default)]
struct Log {
    /// Rows per written batch.
    batches: Vec<u64>,
    /// Every position stored, in order.
    positions: Vec<Position>,
    /// Rows of each batch written split: (above the key ceiling, the others).
    split: Vec<(u64, u64)>,
}

struct FakeDwh {
    log: Arc<Mutex<Log>>,
    /// Fail the write of this batch (0-based), after reading its rows.
    fail_at: Option<usize>,
    /// The greatest key the fake says it holds.
    ceiling: Option<Vec<String>>,
    /// Answer a split write as if a key above the ceiling were in the target.
    refuse_split: bool,
}

/// Rows of a text COPY stream.
async fn lines<S, E>(rows: S) -> Result<u64, WriteError<E>>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    futures_util::pin_mut!(rows);
    let mut n = 0;
    while let Some(chunk) = rows.next().await {
        n += chunk
            .map_err(WriteError::Rows)?
            .iter()
            .filter(|b| **b == b'\n')
            .count() as u64;
    }
    Ok(n)
}

impl Dwh for FakeDwh {
    async fn lock(&mut self, _job: &str) -> Result<bool, SinkError> {
        Ok(true)
    }
    async fn unlock(&mut self, _job: &str) -> Result<(), SinkError> {
        Ok(())
    }
    async fn check_lock(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn prepare_target(&mut self, _view: &View) -> Result<TargetState, SinkError> {
        Ok(TargetState {
            copy_direct: false,
            split: false,
        })
    }
    async fn read_position(&mut self, _job: &str) -> Result<Option<Position>, SinkError> {
        Ok(self.log.lock().unwrap().positions.last().cloned())
    }
    async fn store_position(&mut self, _job: &str, p: &Position) -> Result<(), SinkError> {
        self.log.lock().unwrap().positions.push(p.clone());
        Ok(())
    }
    async fn check_target(&mut self, _view: &View) -> Result<Vec<String>, SinkError> {
        Ok(Vec::new())
    }
    /// Text COPY: one line per row.
    fn copy_sql(&self, view: &View, predicate: &str) -> String {
        let cols: Vec<&str> = view.columns.iter().map(|c| c.expr.as_str()).collect();
        format!(
            "copy (select {} {}) to stdout",
            cols.join(", "),
            crate::view::sql::rows_of(view, predicate)
        )
    }
    async fn write<S, E>(
        &mut self,
        _view: &View,
        rows: S,
        batch: Batch<'_>,
    ) -> Result<Written, WriteError<E>>
    where
        S: Stream<Item = Result<Bytes, E>>,
    {
        let n = lines(rows).await?;
        let mut log = self.log.lock().unwrap();
        if self.fail_at == Some(log.batches.len()) {
            return Err(WriteError::Sink(SinkError::Incompatible {
                table: "fake".into(),
                problems: vec!["the fake refuses this batch".into()],
            }));
        }
        log.batches.push(n);
        let stored = match batch.position {
            Some(crate::sink::dwh::Advance::To(p)) => {
                log.positions.push(p.clone());
                Some(p.clone())
            }
            Some(_) => panic!("the fake takes no chunks"),
            None => None,
        };
        Ok(Written {
            rows: n,
            changed: n,
            stored,
            ..Written::default()
        })
    }
    async fn key_ceiling(&mut self, _view: &View) -> Result<Option<Vec<String>>, SinkError> {
        Ok(self.ceiling.clone())
    }
    async fn write_split<F, S, E>(
        &mut self,
        view: &View,
        fresh: F,
        rest: S,
        batch: Batch<'_>,
    ) -> Result<Written, WriteError<E>>
    where
        F: Stream<Item = Result<Bytes, E>>,
        S: Stream<Item = Result<Bytes, E>>,
    {
        let fresh = lines(fresh).await?;
        if self.refuse_split {
            return Err(WriteError::KeyExists);
        }
        let rest = lines(rest).await?;
        self.log.lock().unwrap().split.push((fresh, rest));
        let stream =
            futures_util::stream::iter([Ok(Bytes::from("\n".repeat((fresh + rest) as usize)))]);
        self.write(view, stream, batch).await
    }
}

struct Fixture {
    cluster: crate::cluster::Cluster,
    _dir: tempfile::TempDir,
    ctx: Context,
    job: Arc<JobSpec>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.cluster.discard();
    }
}

async fn fixture(rows: i64, batch_size: i64) -> Fixture {
    let cluster = tokio::task::spawn_blocking(crate::cluster::Cluster::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the batch driver tests need PostgreSQL: {e}"));
    let url = cluster.url("postgres");
    let client = crate::pg::connect(&url, "test", "source").await.unwrap();
    client
        .batch_execute(&format!(
            "create table orders (id bigint primary key, amount int);
             insert into orders select g, g * 10 from generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("jobs")).unwrap();
    std::fs::write(
        dir.path().join("pgtide.toml"),
        format!("[sources.shop]\nurl = \"{url}\"\n[dwh]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("jobs/orders.toml"),
        format!(
            "interval_secs = 60\nbatch_size = {batch_size}\nkey = [\"id\"]\n[from]\ntable = \"public.orders\"\n\
             [[column]]\nname = \"id\"\nfrom = \"orders.id\"\n[[column]]\nname = \"amount\"\nfrom = \"orders.amount\"\n"
        ),
    )
    .unwrap();
    let config = Arc::new(crate::config::load(&dir.path().join("pgtide.toml")).unwrap());
    let store = Store::open(&config.state_path).unwrap();
    let job = config.jobs[0].clone();
    Fixture {
        cluster,
        _dir: dir,
        ctx: Context::new(config, store),
        job,
    }
}

/// A session whose DWH has the job at watermark 0 (a run from the beginning would be a load,
/// whose workers write through connections of their own).
async fn session(f: &Fixture, fail_at: Option<usize>) -> (Session<FakeDwh>, Arc<Mutex<Log>>) {
    let start = Position {
        watermark: Some(vec!["0".into()]),
        seq: 1,
        ..Position::default()
    };
    let log = Arc::new(Mutex::new(Log {
        positions: vec![start],
        ..Log::default()
    }));
    let source = f.ctx.connect_source(&f.job).await.unwrap();
    let view = view::resolve(&source, &f.job).await.unwrap();
    let s = Session {
        source,
        dwh: FakeDwh {
            log: log.clone(),
            fail_at,
            ceiling: None,
            refuse_split: false,
        },
        view,
        paths: write::Paths::staged(),
        limiter: None,
        progress: Default::default(),
        table_rows: None,
    };
    (s, log)
}

#[tokio::test]
async fn a_catch_up_writes_growing_batches_in_order_each_with_the_position_after_it() {
    // batch_size rows first, then as many as take about two seconds at the speed of the
    // first (a batch of a few rows takes far less): what is left.
    let f = fixture(75, 10).await;
    let (mut s, log) = session(&f, None).await;
    let run = f.ctx.store.start_run(&f.job.name).await.unwrap();
    let mut summary = RunSummary::default();
    f.ctx.catch_up(&mut s, run, &mut summary).await.unwrap();
    let local = f.ctx.store.position(&f.job.name).await.unwrap().unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.batches, vec![10, 65]);
    assert_eq!(summary.rows, 75);
    assert_eq!(summary.batches, 2);
    let marks: Vec<Option<Vec<String>>> =
        log.positions.iter().map(|p| p.watermark.clone()).collect();
    let at = |v: &str| Some(vec![v.to_string()]);
    assert_eq!(marks, vec![at("0"), at("10"), at("75")]);
    assert!(
        log.positions.windows(2).all(|w| w[0].seq < w[1].seq),
        "every stored position is newer than the last"
    );
    // The local copy follows the DWH's, batch by batch.
    assert_eq!(&local, log.positions.last().unwrap());
}

#[tokio::test]
async fn a_failed_batch_moves_no_position() {
    let f = fixture(25, 10).await;
    let (mut s, log) = session(&f, Some(1)).await;
    let run = f.ctx.store.start_run(&f.job.name).await.unwrap();
    let mut summary = RunSummary::default();
    let err = f.ctx.catch_up(&mut s, run, &mut summary).await.unwrap_err();
    assert!(err.to_string().contains("refuses"), "{err}");
    let local = f.ctx.store.position(&f.job.name).await.unwrap().unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.batches, vec![10]);
    assert_eq!(log.positions.len(), 2, "the start and the first batch's");
    assert_eq!(local.watermark, Some(vec!["10".to_string()]));
    assert_eq!(summary.rows, 10);
}

#[tokio::test]
async fn a_stopping_run_ends_at_a_batch_boundary_without_writing() {
    let f = fixture(25, 10).await;
    let (trigger, shutdown) = crate::shutdown::channel();
    let ctx = f.ctx.clone().with_shutdown(shutdown);
    trigger.fire();
    let (mut s, log) = session(&f, None).await;
    let run = ctx.store.start_run(&f.job.name).await.unwrap();
    let mut summary = RunSummary::default();
    let mut pos = Position {
        watermark: Some(vec!["0".into()]),
        ..Position::default()
    };
    let before = pos.clone();
    let mut feed = Feed::Watermark(&mut pos);
    let done = ctx
        .drive(&mut s, run, &mut feed, &mut summary, &mut Instant::now())
        .await
        .unwrap();
    assert!(!done, "a stopping run reports that it did not finish");
    assert!(log.lock().unwrap().batches.is_empty());
    assert_eq!(pos, before);
}

#[tokio::test]
async fn a_split_batch_copies_the_keys_above_the_ceiling_apart_from_the_others() {
    let f = fixture(25, 10).await;
    let (mut s, log) = session(&f, None).await;
    s.paths.split = true;
    s.dwh.ceiling = Some(vec!["12".into()]);
    let run = f.ctx.store.start_run(&f.job.name).await.unwrap();
    let mut summary = RunSummary::default();
    f.ctx.catch_up(&mut s, run, &mut summary).await.unwrap();
    let log = log.lock().unwrap();
    // Ids 1..=10, then 11..=25: every row in exactly one part.
    assert_eq!(log.split, vec![(0, 10), (13, 2)]);
    assert_eq!(log.batches, vec![10, 15]);
    assert_eq!(summary.rows, 25);
    assert!(s.paths.split);
}

#[tokio::test]
async fn a_split_that_meets_a_fresh_key_in_the_target_stages_that_batch_and_the_rest() {
    let f = fixture(25, 10).await;
    let (mut s, log) = session(&f, None).await;
    s.paths.split = true;
    s.dwh.ceiling = Some(vec!["0".into()]);
    s.dwh.refuse_split = true;
    let run = f.ctx.store.start_run(&f.job.name).await.unwrap();
    let mut summary = RunSummary::default();
    f.ctx.catch_up(&mut s, run, &mut summary).await.unwrap();
    let log = log.lock().unwrap();
    assert!(log.split.is_empty());
    assert_eq!(
        log.batches,
        vec![10, 15],
        "read again in its snapshot, staged"
    );
    assert_eq!(summary.rows, 25);
    assert!(!s.paths.split, "given up for the rest of the run");
    let marks: Vec<_> = log.positions.iter().map(|p| p.watermark.clone()).collect();
    assert_eq!(marks.last().unwrap(), &Some(vec!["25".to_string()]));
}

/// The chunks a load's planner hands out for a load of `(watermark, end]` begun when the
/// newest row was `end`, as `(lo, hi)` of the first cursor column.
async fn planned(f: &Fixture, watermark: Option<&str>, end: &str) -> Vec<(Option<String>, String)> {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let source = f.ctx.connect_source(&f.job).await.unwrap();
    let view = view::resolve(&source, &f.job).await.unwrap();
    let mut pos = Position {
        watermark: watermark.map(|w| vec![w.to_string()]),
        ..Position::default()
    };
    pos.begin_load(vec![end.to_string()]);
    let shared = Arc::new(tokio::sync::Mutex::new(pos));
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let (stop, speed) = (AtomicBool::new(false), AtomicU64::new(0));
    let plan = f.ctx.plan(
        &view,
        load::Reach::Position(shared.clone()),
        None,
        tx,
        &stop,
        &speed,
    );
    let take = async {
        let mut got = Vec::new();
        while let Some(p) = rx.recv().await {
            let p: load::Planned = p;
            got.push((p.chunk.lo.map(|v| v[0].clone()), p.chunk.hi[0].clone()));
        }
        got
    };
    let (planned, got) = tokio::join!(plan, take);
    planned.unwrap();
    got
}

#[tokio::test]
async fn a_loads_chunks_reach_its_end_when_its_newest_rows_are_gone() {
    // Rows 1 to 25; the load began when the newest row was 30. A row that commits into
    // (25, 30] later must be in a chunk's range, so the chunks tile the whole load.
    let f = fixture(25, 10).await;
    let s = |v: &str| v.to_string();
    assert_eq!(
        planned(&f, None, "30").await,
        vec![
            (None, s("10")),
            (Some(s("10")), s("20")),
            (Some(s("20")), s("30"))
        ]
    );
    // Nothing is left past the watermark: one chunk up to the end all the same.
    assert_eq!(
        planned(&f, Some("25"), "30").await,
        vec![(Some(s("25")), s("30"))]
    );
    // The last whole chunk ends at the end: nothing more.
    assert_eq!(
        planned(&f, Some("10"), "20").await,
        vec![(Some(s("10")), s("20"))]
    );
}

#[tokio::test]
async fn a_transaction_that_ends_after_a_recheck_snapshot_keeps_its_subtransactions_unseen() {
    // T (xid t) was in progress at an earlier read, so a window holds t and a floor above it;
    // in a savepoint T writes with subtransaction id s >= that floor. A recheck's snapshot
    // cannot see s; T commits before the recheck asks which ids are in progress, so s looks
    // committed then. The floor must stay at or below s, or s's row is never read again.
    let f = fixture(5, 10).await;
    let url = f.cluster.url("postgres");
    let writer = crate::pg::connect(&url, "test", "writer").await.unwrap();
    writer
        .batch_execute(
            "begin; insert into orders values (100, 1);
             savepoint a; insert into orders values (101, 2); release a;",
        )
        .await
        .unwrap();
    let (t, s): (i64, i64) = {
        let row = writer
            .query_one(
                "select pg_current_xact_id()::text::int8,
                        (select xmin::text::int8 from orders where id = 101)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        s > t,
        "the savepoint has an id of its own above its parent's"
    );
    // A later transaction ends first: T and s lie below the snapshot's xmax.
    let other = crate::pg::connect(&url, "test", "other").await.unwrap();
    other
        .batch_execute("insert into orders values (102, 3)")
        .await
        .unwrap();
    let mut source = f.ctx.connect_source(&f.job).await.unwrap();
    let (tx, snap) = source::begin(&mut source).await.unwrap();
    assert!(
        snap.xip.contains(&(t as u64)),
        "T ({t}) is running at the snapshot: {snap:?}"
    );
    writer.batch_execute("commit").await.unwrap();
    let unseen = source::unseen(&tx, &snap, s as u64).await.unwrap();
    assert!(
        unseen.floor <= s as u64 || unseen.xids.contains(&(s as u64)),
        "s = {s} unseen by the snapshot, but not covered: {unseen:?}"
    );
}
