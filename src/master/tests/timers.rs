//! The loop's timers: after every life-cycle event the next deadline is in the future, so an
//! idle master sleeps. (A respawn timer set to "now" and never cleared once made the master
//! wait zero on every turn, for ever, after any worker crash.) `Rig::turn` checks this after
//! every turn of every policy test; these tests walk the events that set timers.

use super::*;

/// Turns for `secs` seconds of fake time, with every worker of `pids` reporting, checking
/// after each turn (in `Rig::turn`) that no timer is left in the past.
fn idle(r: &mut Rig, secs: u64) {
    for _ in 0..secs {
        let pids: Vec<i32> = r.world.0.borrow().channels.keys().copied().collect();
        for p in pids {
            r.send(p, &Message::Report(Counters::default()));
        }
        r.pass(Duration::from_secs(1));
    }
}

/// Has every newly spawned worker report ready.
fn ready_all(r: &mut Rig) {
    for (_, pid) in Rig::spawned(&r.acts(), r.m.generation) {
        r.send(pid, &Message::Ready);
    }
    r.turn();
}

#[test]
fn after_a_respawn_the_next_timer_is_never_in_the_past() {
    let mut r = rig(2);
    let pids = r.serving();
    idle(&mut r, 5);
    // A crash after a healthy run: replaced at once, and no respawn timer is left behind.
    r.world.die(pids[0], "signal SIGKILL");
    r.turn();
    r.turn();
    let respawned = Rig::spawned(&r.acts(), 1);
    assert_eq!(respawned.len(), 1);
    assert!(
        r.m.slots.iter().all(|s| s.not_before.is_none()),
        "a spent respawn timer is cleared: {:?}",
        r.m.slots
    );
    r.send(respawned[0].1, &Message::Ready);
    idle(&mut r, 3);
    assert!(r.m.next_timer().is_none(), "an idle pool has no timer");
}

#[test]
fn a_failed_start_backs_off_then_its_timer_is_spent() {
    let mut r = rig(1);
    let pids = r.serving();
    idle(&mut r, 5);
    r.world.die(pids[0], "signal SIGKILL");
    r.turn();
    r.turn();
    let first = Rig::spawned(&r.acts(), 1);
    // The replacement dies before it is ready: a 100 ms backoff, a timer in the future.
    r.world.die(first[0].1, "exit code 1");
    r.turn();
    let at = r.m.next_timer().expect("a respawn timer");
    assert!(at > r.m.sys.now());
    r.pass(Duration::from_secs(1));
    assert_eq!(Rig::spawned(&r.acts(), 1).len(), 1, "respawned after it");
    assert!(r.m.slots[0].not_before.is_none(), "and the timer is spent");
}

#[test]
fn a_hung_worker_killed_and_replaced_leaves_no_timer() {
    let mut r = rig(2);
    let pids = r.serving();
    // Worker 1 falls silent for longer than the worker timeout (30 s).
    for _ in 0..32 {
        r.send(pids[0], &Message::Report(Counters::default()));
        r.pass(Duration::from_secs(1));
    }
    assert_eq!(Rig::killed(&r.acts(), Signal::SIGKILL), [pids[1]]);
    r.turn();
    ready_all(&mut r);
    idle(&mut r, 3);
    assert!(r.m.next_timer().is_none());
}

#[test]
fn an_abandoned_slot_and_a_failed_spawn_leave_no_timer() {
    let mut r = rig(2);
    let pids = r.serving();
    idle(&mut r, 5);
    r.world.0.borrow_mut().spawn_fails = true;
    r.world.die(pids[0], "signal SIGKILL");
    for _ in 0..40 {
        r.send(pids[1], &Message::Report(Counters::default()));
        r.pass(Duration::from_secs(1));
    }
    assert!(r.m.slots[0].abandoned);
    assert_eq!(r.m.phase, Phase::Running);
    assert!(r.m.next_timer().is_none(), "{:?}", r.m.slots);
}

#[test]
fn a_stop_while_a_slot_backs_off_leaves_no_respawn_timer() {
    let mut r = rig(2);
    let pids = r.serving();
    r.world.die(pids[0], "exit code 1");
    r.turn();
    assert!(r.m.slots[0].not_before.is_some(), "backing off");
    r.signal(SIGTERM);
    // The backoff passes during the drain: nobody will fill the slot, so no timer for it.
    r.pass(Duration::from_secs(2));
    assert!(r.m.next_timer().is_some_and(|t| t > r.m.sys.now()));
}

#[test]
fn a_new_master_outliving_a_stop_is_killed_once_and_waited_for_without_spinning() {
    let mut r = rig(1);
    r.serving();
    r.signal(SIGUSR2);
    let acts = r.acts();
    let Some(&Act::Successor { pid: successor }) = acts.last() else {
        panic!("no successor started: {acts:?}");
    };
    r.signal(SIGTERM);
    // The workers are gone; the new master ignores its TERM past every deadline.
    r.pass(UPGRADE_TIMEOUT + Duration::from_secs(5));
    let killed = Rig::killed(&r.acts(), Signal::SIGKILL);
    assert_eq!(
        killed.iter().filter(|&&p| p == successor).count(),
        1,
        "killed once: {killed:?}"
    );
}
