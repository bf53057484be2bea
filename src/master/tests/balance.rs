//! `--balance reuseport`: which slots new connections are steered to, and when a slot's
//! socket closes.

use super::*;

#[test]
fn a_slot_leaves_the_rotation_before_its_worker_drains_and_its_socket_outlives_the_worker() {
    let mut r = rig_with(3, crate::balance::Balance::Reuseport);
    let pids = r.serving();
    let listeners = |r: &Rig| {
        let l = r.m.listener.as_ref().unwrap();
        (l.steered().to_vec(), l.len())
    };
    assert_eq!(listeners(&r), (vec![0, 1, 2], 3));
    r.m.scale(1).unwrap();
    // By the time slots 1 and 2 are told to drain, no new connection goes to them ...
    assert_eq!(
        Rig::killed(&r.acts(), Signal::SIGTERM),
        vec![pids[1], pids[2]]
    );
    assert_eq!(listeners(&r), (vec![0], 3));
    // ... and each socket closes only once no worker holds it, from the top.
    // (The death is reaped at the end of a turn; the next one closes.)
    r.world.die(pids[2], "exited 0");
    r.turn();
    r.turn();
    assert_eq!(listeners(&r), (vec![0], 2));
    r.world.die(pids[1], "exited 0");
    r.turn();
    r.turn();
    assert_eq!(listeners(&r), (vec![0], 1));
    // Growing again binds new sockets into the group and steers to them.
    r.m.scale(2).unwrap();
    r.turn();
    assert_eq!(listeners(&r), (vec![0, 1], 2));
}

#[test]
fn a_silent_worker_leaves_the_rotation_until_it_is_heard_again() {
    let mut r = rig_with(2, crate::balance::Balance::Reuseport);
    let pids = r.serving();
    let steered = |r: &Rig| r.m.listener.as_ref().unwrap().steered().to_vec();
    assert_eq!(steered(&r), vec![0, 1]);
    // Worker 0 reports every second; worker 1 falls silent.
    for _ in 0..4 {
        r.send(pids[0], &Message::Report(Counters::default()));
        r.pass(Duration::from_secs(1));
    }
    assert_eq!(
        steered(&r),
        vec![0],
        "three silent intervals: out of the rotation"
    );
    assert!(
        Rig::killed(&r.acts(), Signal::SIGKILL).is_empty(),
        "not yet judged hung"
    );
    r.send(pids[1], &Message::Report(Counters::default()));
    r.turn();
    r.turn();
    assert_eq!(steered(&r), vec![0, 1], "heard again: back in");
}
