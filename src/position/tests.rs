//! Windows opened, narrowed, merged and closed, on a primary and on a standby.

use super::*;

const S: i64 = 1_000_000;

fn known(oldest: Oldest) -> Horizon {
    Horizon {
        oldest,
        elsewhere: Vec::new(),
        prepared: Vec::new(),
    }
}

/// Advance with the widest description of what `s` could not see: every id from its xmin.
fn adv(p: &mut Position, hi: Vec<String>, s: &Snapshot, merge: bool) {
    let unseen = Unseen {
        floor: s.xmin,
        xids: Vec::new(),
    };
    p.advance(hi, s, &unseen, merge);
}

/// Settle with the widest description of what `s` could not see.
fn settle(p: &mut Position, s: Snapshot, h: &Horizon) -> Settled {
    let unseen = Unseen {
        floor: s.xmin,
        xids: Vec::new(),
    };
    p.settle(&s, h, &unseen)
}

/// A primary's snapshot: `xmin:xmax:xip`, the next id, at a time in seconds.
fn snap(xmin: u64, xmax: u64, xip: &[u64], next: u64, at_s: i64) -> Snapshot {
    Snapshot {
        xmin,
        xmax,
        xip: xip.to_vec(),
        next,
        recovery: false,
        at_us: at_s * S,
        after: None,
    }
}

/// A standby's snapshot: no `xip`, `xmin` held back by the primary's running transactions.
fn standby(xmin: u64, xmax: u64, next: u64, at_s: i64) -> Snapshot {
    Snapshot {
        recovery: true,
        ..snap(xmin, xmax, &[], next, at_s)
    }
}

#[test]
fn advancing_moves_the_watermark_and_opens_a_window_from_the_snapshot_xmin() {
    let mut p = Position::default();
    adv(
        &mut p,
        vec!["10".into()],
        &snap(5, 9, &[5, 7], 11, 1000),
        false,
    );
    assert_eq!(p.watermark, Some(vec!["10".into()]));
    assert_eq!(p.seq, 1);
    assert_eq!(p.windows.len(), 1);
    let w = &p.windows[0];
    assert_eq!((w.lo.clone(), w.floor, w.next), (None, 5, 11));
    assert_eq!(w.read_at_us, 1000 * S);
    assert_eq!(w.floor_xid(), "5");
}

#[test]
fn consecutive_batches_merge_into_the_widest_window() {
    let mut p = Position::default();
    adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
    adv(
        &mut p,
        vec!["20".into()],
        &snap(6, 12, &[6, 11], 13, 1001),
        true,
    );
    assert_eq!(p.windows.len(), 1);
    let w = &p.windows[0];
    assert_eq!((w.lo.clone(), w.hi.clone()), (None, vec!["20".to_string()]));
    assert_eq!((w.floor, w.next), (5, 13));
    assert_eq!(w.read_at_us, 1001 * S);
    adv(
        &mut p,
        vec!["30".into()],
        &snap(12, 13, &[], 13, 1002),
        false,
    );
    assert_eq!(p.windows.len(), 2);
}

#[test]
fn a_subtransaction_of_a_running_transaction_is_above_the_floor() {
    // Transaction 5 is running; its savepoint wrote with xid 6, which no snapshot lists.
    // Transaction 7 committed before the read. The window re-reads from 5 on.
    let mut p = Position::default();
    adv(&mut p, vec!["10".into()], &snap(5, 8, &[5], 8, 1000), false);
    assert_eq!(p.windows[0].floor, 5);
    assert!(p.windows[0].floor <= 6);
    // While 5 runs, the window stays open and its floor stays at 5.
    let s = settle(
        &mut p,
        snap(5, 20, &[5], 20, 1001),
        &known(Oldest::NoneOpen),
    );
    assert_eq!(s.closed, 0);
    assert_eq!(p.windows[0].floor, 5);
    // 5 ended: this recheck saw its rows; the window closes.
    let s = settle(
        &mut p,
        snap(20, 20, &[], 20, 1002),
        &known(Oldest::NoneOpen),
    );
    assert_eq!(s.closed, 1);
    assert!(s.changed);
}

#[test]
fn a_window_waits_for_transactions_that_had_ids_but_were_not_listed() {
    // Ids 9 and 10 were assigned before the read (next = 11) but are above its xmax.
    let mut p = Position::default();
    adv(&mut p, vec!["10".into()], &snap(9, 9, &[], 11, 1000), false);
    assert_eq!(p.windows[0].floor, 9);
    // 10 is still running: it is in this later snapshot's xip.
    let s = settle(
        &mut p,
        snap(10, 12, &[10], 12, 1001),
        &known(Oldest::NoneOpen),
    );
    assert_eq!(s.closed, 0);
    assert_eq!(p.windows[0].floor, 10, "rows of ids below 10 are final now");
    assert!(s.changed);
    // xmax has not passed next yet: 10 may still run.
    assert_eq!(
        settle(
            &mut p,
            snap(10, 10, &[], 12, 1002),
            &known(Oldest::NoneOpen)
        )
        .closed,
        0
    );
    assert_eq!(
        settle(
            &mut p,
            snap(12, 12, &[], 12, 1003),
            &known(Oldest::NoneOpen)
        )
        .closed,
        1
    );
}

#[test]
fn with_every_session_visible_a_window_settles_once_older_transactions_are_gone() {
    let mut p = Position::default();
    adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
    // A transaction that started before the read is still open (it may hold a cursor value).
    let h = known(Oldest::Since(999 * S));
    assert_eq!(settle(&mut p, snap(9, 20, &[], 20, 1001), &h).closed, 0);
    let h = known(Oldest::Since(1000 * S));
    assert_eq!(
        settle(&mut p, snap(9, 20, &[], 20, 1001), &h).closed,
        0,
        "same instant is not later"
    );
    // Nothing old is open, but xid 5 from the window's snapshot is: still open.
    let h = known(Oldest::NoneOpen);
    assert_eq!(settle(&mut p, snap(5, 20, &[5], 20, 1001), &h).closed, 0);
    // 7 had an id when the range was read (below next = 9): it may have written there.
    let h = known(Oldest::Since(1000 * S + 1));
    assert_eq!(settle(&mut p, snap(7, 20, &[7], 20, 1001), &h).closed, 0);
    assert_eq!(settle(&mut p, snap(9, 20, &[9], 20, 1001), &h).closed, 1);
}

#[test]
fn a_prepared_transaction_that_got_its_id_after_the_read_holds_the_window() {
    // It may have taken its cursor value before the read, and no session shows it.
    let mut p = Position::default();
    adv(&mut p, vec!["10".into()], &snap(9, 9, &[], 9, 1000), false);
    let h = Horizon {
        oldest: Oldest::NoneOpen,
        elsewhere: Vec::new(),
        prepared: vec![12],
    };
    assert_eq!(settle(&mut p, snap(12, 14, &[12], 14, 1001), &h).closed, 0);
    // Prepared before the read: it was running then, rule 1 holds it (it is in xip).
    let mut q = Position::default();
    adv(&mut q, vec!["10".into()], &snap(8, 9, &[8], 9, 1000), false);
    let h = Horizon {
        prepared: vec![8],
        ..h
    };
    assert_eq!(settle(&mut q, snap(8, 14, &[8], 14, 1001), &h).closed, 0);
    let h = known(Oldest::NoneOpen);
    assert_eq!(settle(&mut p, snap(14, 14, &[], 14, 1002), &h).closed, 1);
}

#[test]
fn without_a_view_of_every_session_a_window_waits_for_its_mark() {
    let grace = SETTLE_GRACE_US / S;
    let mut p = Position::default();
    adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
    let h = Horizon::unknown();
    // Before the grace time: no mark, nothing closes, even with nothing running.
    assert_eq!(
        settle(&mut p, snap(9, 9, &[], 9, 1000 + grace - 1), &h).closed,
        0
    );
    assert_eq!(p.windows[0].mark, None);
    // At the grace time, 30 is running (it may have taken its cursor value before the
    // read and its id later): the mark is the next id, 31, and the window waits for it.
    assert_eq!(
        settle(&mut p, snap(30, 31, &[30], 31, 1000 + grace), &h).closed,
        0
    );
    assert_eq!(p.windows[0].mark, Some(31));
    assert_eq!(p.windows[0].floor, 30);
    // Transactions that got ids after the mark do not hold it.
    assert_eq!(
        settle(&mut p, snap(31, 40, &[31, 35], 40, 1000 + grace + 1), &h).closed,
        1
    );
}

#[test]
fn a_quiet_source_past_the_grace_time_closes_a_window_at_once() {
    let grace = SETTLE_GRACE_US / S;
    let mut p = Position::default();
    adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
    let s = settle(
        &mut p,
        snap(9, 9, &[], 9, 1000 + grace),
        &Horizon::unknown(),
    );
    assert_eq!(s.closed, 1);
}

#[test]
fn on_a_standby_the_snapshot_xmin_is_all_there_is() {
    // The primary runs 727 (a long transaction that inserted early); the standby's
    // snapshot lists nothing, but 727 holds its xmin back.
    let grace = SETTLE_GRACE_US / S;
    let mut p = Position::default();
    adv(
        &mut p,
        vec!["10".into()],
        &standby(727, 729, 730, 1000),
        false,
    );
    assert_eq!(p.windows[0].floor, 727);
    // The standby's pg_stat_activity knows nothing of the primary: even "none open"
    // does not settle a window there.
    let h = known(Oldest::NoneOpen);
    assert_eq!(settle(&mut p, standby(730, 730, 730, 1001), &h).closed, 0);
    assert_eq!(p.windows[0].floor, 730);
    assert_eq!(
        settle(&mut p, standby(731, 735, 736, 1000 + grace), &h).closed,
        0
    );
    assert_eq!(p.windows[0].mark, Some(736));
    assert_eq!(
        settle(&mut p, standby(735, 737, 737, 1000 + grace + 1), &h).closed,
        0
    );
    assert_eq!(
        settle(&mut p, standby(736, 737, 737, 1000 + grace + 2), &h).closed,
        1
    );
}

#[test]
fn transactions_of_other_databases_do_not_hold_a_window_open() {
    let mut p = Position::default();
    adv(
        &mut p,
        vec!["10".into()],
        &snap(5, 9, &[5, 7], 9, 1000),
        false,
    );
    let h = Horizon {
        oldest: Oldest::NoneOpen,
        elsewhere: vec![5],
        prepared: Vec::new(),
    };
    assert_eq!(
        settle(&mut p, snap(5, 20, &[5, 7], 20, 1001), &h).closed,
        0,
        "xid 7 may be ours"
    );
    assert_eq!(settle(&mut p, snap(5, 20, &[5], 20, 1001), &h).closed, 1);
}

#[test]
fn a_recheck_that_changes_nothing_leaves_the_position_alone() {
    let mut p = Position::default();
    adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
    let seq = p.seq;
    let s = settle(&mut p, snap(5, 9, &[5], 9, 1001), &known(Oldest::NoneOpen));
    assert_eq!(s, Settled::default());
    assert_eq!(p.seq, seq);
}

#[test]
fn a_window_keeps_only_the_ids_its_snapshot_could_not_see() {
    // 5 runs (with subtransaction 6); 7 and 8 committed before the read.
    let mut p = Position::default();
    let s = snap(5, 9, &[5], 9, 1000);
    let unseen = Unseen {
        floor: 9,
        xids: vec![6, 5],
    };
    p.advance(vec!["10".into()], &s, &unseen, false);
    let w = &p.windows[0];
    assert_eq!((w.floor, w.xids.clone()), (9, vec![5, 6]));
    assert_eq!(w.xids_literal(), "{5,6}");
    // A recheck while 5 still runs and 12 (new) is in progress: 9..11 ended and were read.
    let s = snap(5, 13, &[5, 12], 13, 1001);
    let unseen = Unseen {
        floor: 13,
        xids: vec![5, 6, 12],
    };
    let r = p.settle(&s, &known(Oldest::NoneOpen), &unseen);
    assert_eq!(r.closed, 0);
    let w = &p.windows[0];
    assert_eq!((w.floor, w.xids.clone()), (13, vec![5, 6, 12]));
    // 5 ended: its ids are final; the window closes.
    let s = snap(12, 14, &[12], 14, 1002);
    let unseen = Unseen {
        floor: 14,
        xids: vec![12],
    };
    assert_eq!(p.settle(&s, &known(Oldest::NoneOpen), &unseen).closed, 1);
}

#[test]
fn too_many_windows_are_merged_oldest_first() {
    let mut p = Position::default();
    for i in 0..(MAX_WINDOWS as u64 + 5) {
        adv(
            &mut p,
            vec![(i * 10 + 10).to_string()],
            &snap(i + 50, i + 100, &[i + 50], i + 100, i as i64),
            false,
        );
    }
    assert_eq!(p.windows.len(), MAX_WINDOWS);
    assert_eq!(p.windows[0].lo, None);
    assert_eq!(p.windows[0].floor, 50);
    assert_eq!(p.windows[0].next, 105);
    assert_eq!(p.windows[1].lo, Some(vec![p.windows[0].hi[0].clone()]));
}

#[test]
fn a_reset_and_the_end_of_a_first_load_move_seq_forward() {
    let mut p = Position::default();
    adv(&mut p, vec!["10".into()], &snap(5, 9, &[5], 9, 1000), false);
    p.finish_initial_load();
    assert!(p.initial_done && p.windows.is_empty());
    assert_eq!(p.seq, 2);
    let r = Position::reset(Some(vec!["3".into()]), 7);
    assert_eq!((r.seq, r.initial_done, r.windows.len()), (8, false, 0));
    assert_eq!(r.watermark, Some(vec!["3".to_string()]));
}

#[test]
fn windows_stored_by_earlier_versions_are_read_conservatively() {
    let old = r#"{"lo":null,"hi":["10"],"xip":[7,5],"xmax":9,"read_at_us":1}"#;
    let w: Window = serde_json::from_str(old).unwrap();
    assert_eq!((w.floor, w.next, w.mark, w.settled), (5, 9, None, false));
    let again: Window = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
    assert_eq!(again, w);
}

#[test]
fn xids_are_truncated_to_32_bits_and_widened_with_the_snapshot_epoch() {
    let w = Window {
        lo: None,
        hi: vec![],
        xids: vec![(2 << 32) + 3],
        floor: (2 << 32) + 9,
        next: (2 << 32) + 10,
        read_at_us: 0,
        mark: None,
        settled: false,
    };
    assert_eq!(w.floor_xid(), "9");
    assert_eq!(w.xids_literal(), "{3}");
    let s = snap((2 << 32) + 5, (2 << 32) + 10, &[], (2 << 32) + 10, 0);
    assert_eq!(s.widen(7), (2 << 32) + 7);
    assert_eq!(s.widen(u32::MAX), (1 << 32) + u64::from(u32::MAX));
}

fn v(s: &str) -> Vec<String> {
    vec![s.to_string()]
}

fn unseen_of(s: &Snapshot) -> Unseen {
    Unseen {
        floor: s.xmax,
        xids: s.xip.clone(),
    }
}

#[test]
fn a_load_finished_out_of_order_ends_at_its_end_with_every_chunk_s_window() {
    let mut p = Position::default();
    p.begin_load(v("400"));
    let stored = p.seq;
    let c1 = p.open_chunk(None, v("100"));
    p.advance_frontier(v("100"));
    let c2 = p.open_chunk(Some(v("100")), v("200"));
    p.advance_frontier(v("200"));
    let c3 = p.open_chunk(Some(v("200")), v("400"));
    p.advance_frontier(v("400"));
    // The second chunk finishes first: it cannot move the watermark.
    p.chunk_done(
        &c2,
        &snap(10, 12, &[11], 12, 1),
        &unseen_of(&snap(10, 12, &[11], 12, 1)),
    );
    assert!(p.seq > stored);
    assert_eq!(p.watermark, None);
    assert!(p.load.is_some());
    // The first one continues the watermark, and takes the second along.
    p.chunk_done(
        &c1,
        &snap(10, 11, &[], 11, 1),
        &unseen_of(&snap(10, 11, &[], 11, 1)),
    );
    assert_eq!(p.watermark, Some(v("200")));
    assert_eq!(p.windows.len(), 1, "neighbouring chunks leave one window");
    // Windows of a load span all of it: chunks commit in any order.
    assert_eq!(p.windows[0].lo, None);
    assert_eq!(p.windows[0].hi, v("400"));
    let w = &p.windows[0];
    assert!(
        w.floor <= 11 || w.xids.contains(&11),
        "the window still re-reads what was in progress: {w:?}"
    );
    // Not complete until planning has ended and the last chunk is done.
    assert!(!p.finish_planning());
    p.chunk_done(
        &c3,
        &snap(13, 14, &[], 14, 2),
        &unseen_of(&snap(13, 14, &[], 14, 2)),
    );
    assert_eq!(p.watermark, Some(v("400")));
    assert!(p.load.is_none());
    assert_eq!(p.windows.last().unwrap().hi, v("400"));
}

#[test]
fn a_resumed_load_reads_its_open_chunks_again_and_plans_on_from_its_frontier() {
    let mut p = Position::default();
    p.begin_load(v("900"));
    let c1 = p.open_chunk(None, v("300"));
    p.advance_frontier(v("300"));
    let c2 = p.open_chunk(Some(v("300")), v("600"));
    p.advance_frontier(v("600"));
    p.chunk_done(
        &c2,
        &snap(5, 6, &[], 6, 1),
        &unseen_of(&snap(5, 6, &[], 6, 1)),
    );
    // What was stored with the second chunk: the first still open.
    let mut resumed: Position = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(resumed, p);
    let again = resumed.reopen_chunks();
    assert_eq!(again, vec![c1.clone()]);
    let load = resumed.load.as_ref().unwrap();
    assert_eq!(
        load.frontier,
        Some(v("600")),
        "planning goes on after the last chunk handed out"
    );
    assert_eq!(
        load.open,
        vec![c1.clone()],
        "open until done: a position stored before it is read again still has it"
    );
    let c3 = resumed.open_chunk(Some(v("600")), v("900"));
    resumed.advance_frontier(v("900"));
    assert!(!resumed.finish_planning());
    resumed.chunk_done(
        &c3,
        &snap(7, 8, &[], 8, 2),
        &unseen_of(&snap(7, 8, &[], 8, 2)),
    );
    resumed.chunk_done(
        &c1,
        &snap(7, 8, &[], 8, 2),
        &unseen_of(&snap(7, 8, &[], 8, 2)),
    );
    assert_eq!(resumed.watermark, Some(v("900")));
    assert!(resumed.load.is_none());
    let hi: Vec<Vec<String>> = resumed.windows.iter().map(|w| w.hi.clone()).collect();
    assert_eq!(
        hi,
        vec![v("900")],
        "all three chunks are neighbours: one window"
    );
}

#[test]
fn a_load_with_no_chunk_left_completes_when_planning_ends() {
    let mut p = Position::default();
    p.begin_load(v("10"));
    let c = p.open_chunk(None, v("10"));
    p.advance_frontier(v("10"));
    p.chunk_done(
        &c,
        &snap(3, 4, &[], 4, 1),
        &unseen_of(&snap(3, 4, &[], 4, 1)),
    );
    // The chunk continued the watermark up to the end before planning was over.
    assert_eq!(p.watermark, Some(v("10")));
    let seq = p.seq;
    assert!(p.finish_planning());
    assert!(p.load.is_none());
    assert!(p.seq > seq, "the completion is a change to store");
}

/// A primary's snapshot as `source::begin` records it: `after` is the horizon read just after
/// it, and `next` was read after that.
fn read(xmin: u64, xmax: u64, xip: &[u64], next: u64, at_s: i64, after: Horizon) -> Snapshot {
    Snapshot {
        after: Some(after),
        ..snap(xmin, xmax, xip, next, at_s)
    }
}

#[test]
fn a_read_with_nothing_in_progress_and_no_old_session_settles_its_window_at_once() {
    let mut p = Position::default();
    let s = read(9, 9, &[], 9, 1000, known(Oldest::NoneOpen));
    p.advance(v("10"), &s, &unseen_of(&s), false);
    assert_eq!(p.watermark, Some(v("10")));
    assert_eq!(p.seq, 1);
    assert!(p.windows.is_empty(), "no recheck needed: {:?}", p.windows);
    // Sessions whose transactions started after the read hold nothing back.
    let s = read(9, 9, &[], 9, 1001, known(Oldest::Since(1001 * S + 1)));
    p.advance(v("20"), &s, &unseen_of(&s), true);
    assert!(p.windows.is_empty());
    // A window kept before is not touched by a settled read after it.
    let s = read(9, 12, &[9], 12, 1002, known(Oldest::NoneOpen));
    p.advance(v("30"), &s, &unseen_of(&s), true);
    let s = read(12, 12, &[], 12, 1003, known(Oldest::NoneOpen));
    p.advance(v("40"), &s, &unseen_of(&s), true);
    assert_eq!(p.windows.len(), 1);
    assert_eq!(
        (p.windows[0].lo.clone(), p.windows[0].hi.clone()),
        (Some(v("20")), v("30"))
    );
    assert_eq!(p.watermark, Some(v("40")));
}

#[test]
fn a_read_keeps_its_window_while_anything_could_still_write_below_it() {
    let kept = |s: Snapshot| {
        let mut p = Position::default();
        p.advance(v("10"), &s, &unseen_of(&s), false);
        p.windows.len() == 1
    };
    let none = || known(Oldest::NoneOpen);
    // A transaction of this database is in progress (it may have written in the range).
    assert!(kept(read(7, 9, &[7], 9, 1000, none())));
    // A session's transaction started before the read, or at the same instant: it may hold a
    // cursor value (its now(), an early nextval()) and write with it later.
    assert!(kept(read(
        9,
        9,
        &[],
        9,
        1000,
        known(Oldest::Since(999 * S))
    )));
    assert!(kept(read(
        9,
        9,
        &[],
        9,
        1000,
        known(Oldest::Since(1000 * S))
    )));
    // Some sessions are hidden from pgtide's role.
    assert!(kept(read(9, 9, &[], 9, 1000, Horizon::unknown())));
    // An id was taken between the snapshot and the read of the next id: by a transaction that
    // was open at the snapshot and has committed since, perhaps (the horizon no longer shows
    // it), or one still running above xmax.
    assert!(kept(read(9, 9, &[], 10, 1000, none())));
    // A prepared transaction of this database (no session shows it) holds an id that is
    // running, in xip or above xmax.
    let prepared = |x: u32| Horizon {
        prepared: vec![x],
        ..none()
    };
    assert!(kept(read(8, 9, &[8], 9, 1000, prepared(8))));
    assert!(kept(read(9, 9, &[], 10, 1000, prepared(9))));
    // A standby sees none of the primary's sessions.
    assert!(kept(Snapshot {
        recovery: true,
        ..read(9, 9, &[], 9, 1000, none())
    }));
    // Without a horizon read after the snapshot (the recheck's horizon comes before it).
    assert!(kept(snap(9, 9, &[], 9, 1000)));
    // Transactions of other databases, in xip or holding ids from xmax on, cannot write here.
    let elsewhere = Horizon {
        elsewhere: vec![7, 9, 10],
        ..none()
    };
    assert!(!kept(read(7, 9, &[7], 11, 1000, elsewhere.clone())));
    assert!(
        kept(read(7, 9, &[7], 12, 1000, elsewhere)),
        "11 may be this database's"
    );
}

#[test]
fn ids_of_other_databases_from_xmax_on_do_not_hold_a_window() {
    let s = snap(9, 9, &[], 12, 1000);
    assert_eq!(s.oldest_running(&[]), 9);
    assert_eq!(s.oldest_running(&[9, 10]), 11);
    assert_eq!(s.oldest_running(&[10]), 9);
    // A recheck whose snapshot sees only other databases' ids above xmax closes the window.
    let mut p = Position::default();
    adv(&mut p, v("10"), &snap(5, 9, &[5], 9, 1000), false);
    let h = Horizon {
        elsewhere: vec![20, 21],
        ..known(Oldest::NoneOpen)
    };
    assert_eq!(settle(&mut p, snap(20, 20, &[], 22, 1001), &h).closed, 1);
}

#[test]
fn a_load_keeps_windows_only_for_chunks_read_while_something_could_write() {
    let quiet = read(10, 10, &[], 10, 1, known(Oldest::NoneOpen));
    let busy = read(10, 12, &[11], 12, 1, known(Oldest::NoneOpen));
    let mut p = Position::default();
    p.begin_load(v("300"));
    let c1 = p.open_chunk(None, v("100"));
    let c2 = p.open_chunk(Some(v("100")), v("200"));
    let c3 = p.open_chunk(Some(v("200")), v("300"));
    p.advance_frontier(v("300"));
    assert!(!p.finish_planning());
    // The busy middle chunk first; then the settled first one takes it along: the window
    // keeps the middle chunk's snapshot and spans the load (chunks commit in any order).
    p.chunk_done(&c2, &busy, &unseen_of(&busy));
    p.chunk_done(&c1, &quiet, &unseen_of(&quiet));
    assert_eq!(p.watermark, Some(v("200")));
    assert_eq!(p.windows.len(), 1);
    let w = &p.windows[0];
    assert_eq!((w.lo.clone(), w.hi.clone()), (None, v("300")));
    assert!(!w.settled);
    assert_eq!((w.floor, w.xids.clone(), w.next), (12, vec![11], 12));
    // The settled last chunk adds no window.
    p.chunk_done(&c3, &quiet, &unseen_of(&quiet));
    assert_eq!(p.watermark, Some(v("300")));
    assert!(p.load.is_none());
    assert_eq!(p.windows.len(), 1);
    // A load whose every chunk settled leaves none, even resumed from a stored position.
    let mut p = Position::default();
    p.begin_load(v("200"));
    let c1 = p.open_chunk(None, v("100"));
    let c2 = p.open_chunk(Some(v("100")), v("200"));
    p.advance_frontier(v("200"));
    p.chunk_done(&c2, &quiet, &unseen_of(&quiet));
    let mut p: Position = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    let done = &p.load.as_ref().unwrap().done;
    assert!(done[0].window.settled, "stored as settled: {done:?}");
    assert!(!p.finish_planning());
    p.chunk_done(&c1, &quiet, &unseen_of(&quiet));
    assert_eq!(p.watermark, Some(v("200")));
    assert!(p.windows.is_empty(), "{:?}", p.windows);
}

#[test]
fn chunks_finished_in_order_share_one_window() {
    let mut p = Position::default();
    p.begin_load(v("300"));
    let c1 = p.open_chunk(None, v("100"));
    let c2 = p.open_chunk(Some(v("100")), v("200"));
    let c3 = p.open_chunk(Some(v("200")), v("300"));
    p.advance_frontier(v("300"));
    for (c, s) in [
        (&c1, read(10, 12, &[11], 12, 1, known(Oldest::NoneOpen))),
        (&c2, read(11, 14, &[11, 13], 14, 2, known(Oldest::NoneOpen))),
        (&c3, read(11, 15, &[11], 15, 3, known(Oldest::NoneOpen))),
    ] {
        p.chunk_done(c, &s, &unseen_of(&s));
    }
    assert!(p.finish_planning() || p.load.is_none());
    assert_eq!(p.watermark, Some(v("300")));
    assert_eq!(p.windows.len(), 1, "{:?}", p.windows);
    let w = &p.windows[0];
    assert_eq!((w.lo.clone(), w.hi.clone()), (None, v("300")));
    // The widest view: the lowest floor, every id, the latest next and read time.
    assert_eq!((w.floor, w.xids.clone(), w.next), (12, vec![11], 15));
    assert_eq!(w.read_at_us, 3 * S);
}
