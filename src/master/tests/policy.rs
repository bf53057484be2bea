//! The pool, reloads, stops, liveness and upgrades, turn by turn.

use super::*;

#[test]
fn fills_the_pool_and_announces_once_all_are_ready() {
    let mut r = rig(3);
    r.turn();
    let acts = r.acts();
    assert_eq!(
        Rig::spawned(&acts, 1)
            .iter()
            .map(|s| s.0)
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let pids: Vec<i32> = Rig::spawned(&acts, 1).iter().map(|s| s.1).collect();
    r.send(pids[0], &Message::Ready);
    r.send(pids[1], &Message::Ready);
    r.turn();
    r.turn();
    assert!(
        !r.acts().contains(&Act::Announce),
        "not before the last one"
    );
    r.send(pids[2], &Message::Ready);
    r.turn();
    r.turn();
    assert_eq!(r.acts(), [Act::Announce]);
}

#[test]
fn a_dead_worker_is_replaced_at_once_and_fast_failures_back_off() {
    let mut r = rig(2);
    let pids = r.serving();
    r.pass(Duration::from_secs(5));
    r.acts();
    r.world.die(pids[0], "signal SIGKILL");
    r.turn();
    r.turn();
    let respawned = Rig::spawned(&r.acts(), 1);
    assert_eq!(respawned.len(), 1, "replaced at once after a healthy run");
    assert_eq!(respawned[0].0, 0, "in the same slot");
    // The replacement dies before it reports ready: respawned after 100 ms, not at once.
    r.world.die(respawned[0].1, "exit code 1");
    r.turn();
    r.turn();
    assert!(Rig::spawned(&r.acts(), 1).is_empty(), "backing off");
    r.pass(Duration::from_secs(1));
    assert_eq!(
        Rig::spawned(&r.acts(), 1).len(),
        1,
        "respawned after the delay"
    );
}

#[test]
fn a_slot_that_keeps_failing_is_abandoned_while_the_rest_serves() {
    let mut r = rig(2);
    let pids = r.serving();
    r.pass(Duration::from_secs(5));
    r.acts();
    r.world.die(pids[0], "signal SIGKILL");
    // Every replacement of slot 0 dies at once, six times in a row; slot 1 stays healthy.
    for _ in 0..40 {
        r.send(pids[1], &Message::Report(Counters::default()));
        r.pass(Duration::from_secs(1));
        for (id, pid) in Rig::spawned(&r.acts(), 1) {
            assert_eq!(id, 0);
            r.world.die(pid, "exit code 1");
        }
    }
    assert!(r.m.slots[0].abandoned);
    assert_eq!(
        r.m.phase,
        Phase::Running,
        "the healthy worker keeps serving"
    );
    assert!(r.m.failure.is_none());
    assert_eq!(r.m.snapshot().abandoned_slots, [0]);
    // Scaling (even to the same size) retries it.
    r.m.scale(2).unwrap();
    r.turn();
    assert_eq!(Rig::spawned(&r.acts(), 1).len(), 1);
}

#[test]
fn when_no_slot_can_be_kept_the_master_gives_up() {
    let mut r = rig(1);
    let pids = r.serving();
    r.pass(Duration::from_secs(5));
    r.world.0.borrow_mut().spawn_fails = true;
    r.world.die(pids[0], "signal SIGKILL");
    for _ in 0..40 {
        r.pass(Duration::from_secs(1));
    }
    assert!(
        r.m.failure
            .as_deref()
            .is_some_and(|f| f.contains("giving up"))
    );
    assert_ne!(r.m.phase, Phase::Running);
}

#[test]
fn a_reload_promotes_the_new_generation_only_once_it_is_ready() {
    let mut r = rig(2);
    let old = r.serving();
    r.signal(SIGHUP);
    r.turn();
    let new: Vec<i32> = Rig::spawned(&r.acts(), 2).iter().map(|s| s.1).collect();
    assert_eq!(new.len(), 2);
    r.send(new[0], &Message::Ready);
    r.turn();
    r.turn();
    assert!(
        Rig::killed(&r.acts(), Signal::SIGTERM).is_empty(),
        "not yet"
    );
    r.send(new[1], &Message::Ready);
    r.turn();
    r.turn();
    let mut termed = Rig::killed(&r.acts(), Signal::SIGTERM);
    termed.sort_unstable();
    assert_eq!(termed, old, "the old generation, and only it, drains");
    assert_eq!(r.m.generation, 2);
}

#[test]
fn a_reload_whose_worker_dies_while_starting_is_abandoned() {
    let mut r = rig(2);
    let old = r.serving();
    r.signal(SIGHUP);
    r.turn();
    let new = Rig::spawned(&r.acts(), 2);
    r.world.die(new[0].1, "exit code 1");
    r.turn();
    r.turn();
    let acts = r.acts();
    assert_eq!(
        Rig::killed(&acts, Signal::SIGTERM),
        [new[1].1],
        "the rest of it drains"
    );
    assert_eq!(r.m.generation, 1, "generation 1 keeps serving");
    assert!(r.m.reload.is_none());
    assert!(
        old.iter()
            .all(|p| !Rig::killed(&acts, Signal::SIGTERM).contains(p))
    );
}

#[test]
fn a_reload_not_ready_in_time_is_abandoned() {
    let mut r = rig(1);
    r.serving();
    r.signal(SIGHUP);
    r.turn();
    let new = Rig::spawned(&r.acts(), 2);
    r.pass(RELOAD_TIMEOUT + Duration::from_secs(2));
    assert!(Rig::killed(&r.acts(), Signal::SIGTERM).contains(&new[0].1));
    assert_eq!(r.m.generation, 1);
}

#[test]
fn scaling_adds_slots_and_drains_the_surplus_never_below_one() {
    let mut r = rig(2);
    let pids = r.serving();
    r.signal(SIGTTIN);
    r.turn();
    assert_eq!(Rig::spawned(&r.acts(), 1), [(2, 1003)]);
    r.m.scale(1).unwrap();
    let mut termed = Rig::killed(&r.acts(), Signal::SIGTERM);
    termed.sort_unstable();
    assert_eq!(termed, [pids[1], 1003], "slots 1 and 2 drain");
    r.signal(SIGTTOU);
    assert_eq!(r.m.settings.workers, 1, "never below one");
    assert!(r.acts().is_empty());
    // A reload keeps the scaled size.
    r.signal(SIGHUP);
    r.turn();
    assert_eq!(Rig::spawned(&r.acts(), 2).len(), 1);
}

#[test]
fn a_graceful_stop_drains_then_kills_at_the_deadline_and_a_second_signal_stops_now() {
    let mut r = rig(2);
    let pids = r.serving();
    r.signal(SIGTERM);
    let mut termed = Rig::killed(&r.acts(), Signal::SIGTERM);
    termed.sort_unstable();
    assert_eq!(termed, pids);
    assert!(r.m.listener.is_none(), "our copy of the listener is closed");
    // Drain timeout (10 s) plus grace (2 s): then SIGKILL.
    r.pass(Duration::from_secs(11));
    assert!(Rig::killed(&r.acts(), Signal::SIGKILL).is_empty());
    r.pass(Duration::from_secs(2));
    let mut killed = Rig::killed(&r.acts(), Signal::SIGKILL);
    killed.sort_unstable();
    assert_eq!(killed, pids);
    assert!(r.turn(), "done once every worker is gone");

    let mut r = rig(2);
    let pids = r.serving();
    r.signal(SIGINT);
    r.acts();
    r.signal(SIGTERM);
    let mut quit = Rig::killed(&r.acts(), Signal::SIGQUIT);
    quit.sort_unstable();
    assert_eq!(quit, pids, "a second signal during the drain stops now");
    r.turn(); // reaps them
    assert!(r.turn());
}

#[test]
fn sigquit_stops_now() {
    let mut r = rig(1);
    let pids = r.serving();
    r.signal(SIGQUIT);
    assert_eq!(Rig::killed(&r.acts(), Signal::SIGQUIT), pids);
    r.turn(); // reaps it
    assert!(r.turn());
    assert!(r.m.failure.is_none(), "a requested stop is not a failure");
}

#[test]
fn a_silent_worker_is_killed_but_a_stalled_master_blames_nobody() {
    let mut r = rig(2);
    let pids = r.serving();
    // The master itself is stalled for a minute: one turn, a 60 s jump on the clock.
    let later = r.world.0.borrow().now.map(|t| t + Duration::from_secs(60));
    r.world.0.borrow_mut().now = later;
    r.turn();
    assert!(
        Rig::killed(&r.acts(), Signal::SIGKILL).is_empty(),
        "nobody blamed"
    );
    // Worker 0 keeps reporting; worker 1 falls silent for 31 s of the master's time awake.
    for _ in 0..31 {
        r.send(pids[0], &Message::Report(Counters::default()));
        r.pass(Duration::from_secs(1));
    }
    assert_eq!(Rig::killed(&r.acts(), Signal::SIGKILL), [pids[1]]);
    r.pass(Duration::from_secs(5));
    assert!(
        Rig::killed(&r.acts(), Signal::SIGKILL).is_empty(),
        "killed once, and the healthy one never"
    );
}

#[test]
fn a_draining_worker_is_killed_at_its_own_drain_deadline_whatever_started_it() {
    let mut r = rig(2);
    let pids = r.serving();
    // It was sent TERM by hand: it tells the master it drains, and is replaced at once.
    r.send(pids[0], &Message::Draining);
    r.turn();
    r.turn();
    assert_eq!(
        Rig::spawned(&r.acts(), 1).len(),
        1,
        "replaced while it drains"
    );
    r.pass(Duration::from_secs(13));
    assert_eq!(Rig::killed(&r.acts(), Signal::SIGKILL), [pids[0]]);
}

#[test]
fn a_stop_during_an_upgrade_stops_the_new_master_too_and_waits_for_it() {
    let mut r = rig(1);
    let pids = r.serving();
    r.signal(SIGUSR2);
    let acts = r.acts();
    let Some(&Act::Successor { pid: successor }) = acts.last() else {
        panic!("no successor started: {acts:?}");
    };
    r.signal(SIGTERM);
    r.world.die(pids[0], "exit code 0");
    assert!(Rig::killed(&r.acts(), Signal::SIGTERM).contains(&successor));
    // Within its short grace (a pending new master that outlives it is killed: tests/upgrade.rs).
    r.pass(Duration::from_secs(1));
    assert!(!r.turn(), "not done while the new master lives");
    r.world.die(successor, "exit code 0");
    r.turn();
    assert!(r.turn(), "done once it is gone");
}

#[test]
fn a_ready_successor_retires_this_master_without_a_stop() {
    let mut r = rig(1);
    let pids = r.serving();
    r.signal(SIGUSR2);
    r.acts();
    let pipe = r.world.0.borrow_mut().successor_ready.take().unwrap();
    (&pipe).write_all(b"ready\n").unwrap();
    r.turn();
    assert_eq!(
        Rig::killed(&r.acts(), Signal::SIGTERM),
        pids,
        "this master drains"
    );
    assert!(r.m.successor.is_none());
}
