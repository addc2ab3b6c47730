//! Positions that never move backwards, stores opened at once, migration, interrupted runs.

use std::collections::BTreeMap;

use super::*;
use crate::position::Position;

#[tokio::test]
async fn positions_never_move_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("sub/state.db")).unwrap();
    let p2 = Position {
        watermark: Some(vec!["20".into()]),
        windows: vec![],
        seq: 2,
        initial_done: false,
        load: None,
    };
    let p1 = Position {
        watermark: Some(vec!["10".into()]),
        windows: vec![],
        seq: 1,
        initial_done: false,
        load: None,
    };
    assert!(s.advance("j", &p2).await.unwrap());
    assert!(!s.advance("j", &p1).await.unwrap());
    assert_eq!(s.position("j").await.unwrap(), Some(p2));
    s.overwrite("j", &p1).await.unwrap();
    assert_eq!(s.position("j").await.unwrap(), Some(p1));
    assert_eq!(s.jobs().await.unwrap(), vec!["j".to_string()]);
}

/// Regression: stores opened at once on a new file failed with `database is locked`.
#[test]
fn many_stores_open_one_new_file_at_once_and_write_concurrently() {
    const STORES: usize = 8;
    const WRITES: i64 = 25;
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/state.db");
        let start = Arc::new(std::sync::Barrier::new(STORES));
        let threads: Vec<_> = (0..STORES)
            .map(|t| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || -> Result<(), StateError> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    start.wait();
                    let s = Store::open(&path)?;
                    rt.block_on(async {
                        // Every store writes its own job, and all of them the shared one.
                        let run = s.start_run(&format!("j{t}")).await?;
                        for seq in 1..=WRITES {
                            let pos = Position {
                                watermark: Some(vec![seq.to_string()]),
                                seq,
                                ..Position::default()
                            };
                            s.advance_run(&format!("j{t}"), &pos, run, seq).await?;
                            s.advance("shared", &pos).await?;
                        }
                        s.finish_run(run, WRITES, None, &BTreeMap::new()).await
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let s = Store::open(&path).unwrap();
        rt.block_on(async {
            let mut jobs = s.jobs().await.unwrap();
            jobs.retain(|j| j != "shared");
            assert_eq!(jobs.len(), STORES);
            for j in jobs.iter().chain(["shared".to_string()].iter()) {
                assert_eq!(s.position(j).await.unwrap().unwrap().seq, WRITES, "{j}");
            }
            let run = s.last_run("j0").await.unwrap().unwrap();
            assert_eq!((run.outcome.as_str(), run.rows), ("ok", WRITES));
        });
        let mode: String = s
            .conn
            .lock()
            .unwrap()
            .query_row("pragma journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}

#[test]
fn a_file_of_an_earlier_version_is_migrated_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let old = Connection::open(&path).unwrap();
    old.execute_batch(
        "create table runs (id integer primary key, job text not null, started_at text not null,
           finished_at text, outcome text not null, rows integer not null default 0, error text);
         insert into runs (job, started_at, outcome) values ('j', '2024-01-01T00:00:00Z', 'ok');",
    )
    .unwrap();
    drop(old);
    let s = Store::open(&path).unwrap();
    let c = s.conn.lock().unwrap();
    let version: i64 = c
        .query_row("pragma user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let nulled: i64 = c
        .query_row("select nulled from runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(nulled, 0);
    let total: Option<i64> = c
        .query_row("select rows_total from runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(total, None);
}

#[test]
fn a_file_of_version_1_gets_the_progress_of_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let old = Connection::open(&path).unwrap();
    old.execute_batch(
        "create table positions (job text primary key, position text not null,
           seq integer not null, updated_at text not null);
         create table runs (id integer primary key, job text not null, started_at text not null,
           finished_at text, outcome text not null, rows integer not null default 0, error text,
           unmapped integer not null default 0, nulled integer not null default 0,
           columns text not null default '{}');
         insert into runs (job, started_at, outcome) values ('j', '2024-01-01T00:00:00Z', 'running');
         pragma user_version = 1;",
    )
    .unwrap();
    drop(old);
    let s = Store::open(&path).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        assert_eq!(s.progress("j").await.unwrap(), None);
        s.begin_load(1, Some(10)).await.unwrap();
        assert_eq!(s.progress("j").await.unwrap().unwrap().rows_total, Some(10));
    });
    let version: i64 = s
        .conn
        .lock()
        .unwrap()
        .query_row("pragma user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[tokio::test]
async fn runs_left_running_are_marked_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("state.db")).unwrap();
    let first = s.start_run("j").await.unwrap();
    s.progress_run(first, 5).await.unwrap();
    let second = s.start_run("j").await.unwrap();
    let runs = s.runs("j", 10).await.unwrap();
    assert_eq!(runs[1].outcome, "failed");
    assert_eq!(runs[1].rows, 5);
    assert!(runs[1].error.as_deref().unwrap().contains("interrupted"));
    let tallies: BTreeMap<String, Tally> = [(
        "label".to_string(),
        Tally {
            unmapped: 3,
            nulled: 0,
            values: vec!["9".into()],
        },
    )]
    .into();
    s.finish_run(second, 7, None, &tallies).await.unwrap();
    let last = s.last_run("j").await.unwrap().unwrap();
    assert_eq!(
        (last.outcome.as_str(), last.rows, last.unmapped),
        ("ok", 7, 3)
    );
    assert_eq!(last.columns, tallies);
    assert!(last.finished_at.is_some());
}

#[tokio::test]
async fn a_run_shows_progress_while_it_loads_and_not_after() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("state.db")).unwrap();
    let run = s.start_run("j").await.unwrap();
    assert_eq!(s.progress("j").await.unwrap(), None);
    s.begin_load(run, Some(1000)).await.unwrap();
    let p = s.progress("j").await.unwrap().unwrap();
    assert_eq!((p.rows_done, p.rows_total), (0, Some(1000)));
    let pos = Position {
        watermark: Some(vec!["1".into()]),
        seq: 1,
        ..Position::default()
    };
    s.advance_run("j", &pos, run, 300).await.unwrap();
    s.progress_run(run, 400).await.unwrap();
    let p = s.progress("j").await.unwrap().unwrap();
    assert_eq!((p.rows_done, p.rows_total), (400, Some(1000)));
    s.end_load(run).await.unwrap();
    assert_eq!(s.progress("j").await.unwrap(), None);
    // Rows counted after the load (a notify job's events) do not bring it back.
    s.progress_run(run, 450).await.unwrap();
    assert_eq!(s.progress("j").await.unwrap(), None);
    s.begin_load(run, None).await.unwrap();
    assert_eq!(s.progress("j").await.unwrap().unwrap().rows_total, None);
    s.finish_run(run, 450, None, &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(s.progress("j").await.unwrap(), None);
    assert_eq!(s.last_run("j").await.unwrap().unwrap().rows, 450);
}
