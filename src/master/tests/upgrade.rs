//! A binary upgrade whose new master is not ready yet, event by event: a stop must not wait
//! out the readiness deadline for a new master that hangs; a second upgrade keeps the first
//! one's way back until its own new master serves; a roll-back never takes a count back.

use super::*;

/// Starts an upgrade on a serving rig; the new master has not said it serves. Returns the
/// workers' pids and the new master's.
fn pending(r: &mut Rig) -> (Vec<i32>, i32) {
    let pids = r.serving();
    r.signal(SIGUSR2);
    let acts = r.acts();
    let Some(&Act::Successor { pid }) = acts.last() else {
        panic!("no successor started: {acts:?}");
    };
    (pids, pid)
}

#[test]
fn a_stop_kills_a_new_master_that_hangs_before_ready_within_seconds() {
    let mut r = rig_window(1, Duration::from_secs(30));
    let (pids, successor) = pending(&mut r);
    r.pass(Duration::from_secs(1));
    r.signal(SIGTERM);
    let acts = r.acts();
    assert!(acts.contains(&Act::Kill {
        pid: successor,
        sig: Signal::SIGTERM
    }));
    r.world.die(pids[0], "exit code 0");
    // It ignores the TERM (hung): SIGKILL well before the 30 s readiness deadline.
    let mut waited = Duration::ZERO;
    while !Rig::killed(&r.acts(), Signal::SIGKILL).contains(&successor) {
        assert!(
            waited < Duration::from_secs(5),
            "no SIGKILL after {waited:?}"
        );
        r.pass(Duration::from_secs(1));
        waited += Duration::from_secs(1);
    }
    assert!(
        waited >= Duration::from_secs(1),
        "TERM first, with time to exit"
    );
    r.turn();
    assert!(r.turn(), "done once it is reaped");
}

#[test]
fn an_immediate_stop_kills_a_pending_new_master_at_once() {
    let mut r = rig_window(1, Duration::from_secs(30));
    let (_, successor) = pending(&mut r);
    r.signal(SIGQUIT);
    assert!(
        Rig::killed(&r.acts(), Signal::SIGKILL).contains(&successor),
        "SIGQUIT: the pending new master is killed at once"
    );
}
