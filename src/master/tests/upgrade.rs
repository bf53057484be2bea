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

#[test]
fn a_second_upgrade_that_fails_keeps_the_first_ones_way_back() {
    use std::io::Read;
    // This master was started by an upgrade; the old one waits out its window.
    let mut r = rig_window(1, Duration::from_secs(30));
    let (mut reader, writer) = std::io::pipe().unwrap();
    nix::fcntl::fcntl(
        &reader,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    r.m.cfg.predecessor = Some(std::os::fd::OwnedFd::from(writer));
    let (_, successor) = pending(&mut r);
    let mut said = Vec::new();
    let mut buf = [0u8; 256];
    let mut drain = |said: &mut Vec<u8>| {
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            said.extend_from_slice(&buf[..n]);
        }
    };
    drain(&mut said);
    assert!(
        !String::from_utf8_lossy(&said).contains("commit"),
        "committed when the next upgrade started: {}",
        String::from_utf8_lossy(&said)
    );
    // The newest build exits at once: this master serves on, and the old one can still
    // come back should this one die.
    r.world.die(successor, "exit code 1");
    r.turn();
    assert_eq!(r.m.lifecycle.upgrades_failed, 1);
    assert!(
        r.m.snapshot().upgrade.is_some(),
        "the first window is still open"
    );
    drain(&mut said);
    assert!(!String::from_utf8_lossy(&said).contains("commit"));
    // An upgrade that works commits it, once its new master serves.
    r.signal(SIGUSR2);
    r.acts();
    tell_ready(&r);
    r.turn();
    drain(&mut said);
    assert!(String::from_utf8_lossy(&said).contains("commit\n"));
}

fn tell_ready(r: &Rig) {
    use std::io::Write;
    let w = r.world.0.borrow();
    let mut pipe = w.successor_ready.as_ref().expect("the successor's pipe");
    pipe.write_all(b"ready\n").unwrap();
}

#[test]
fn a_roll_back_keeps_what_the_dead_new_master_reported_and_no_count_goes_back() {
    for reports in [true, false] {
        let mut r = rig_window(1, Duration::from_secs(30));
        let (pids, successor) = pending(&mut r);
        tell_ready(&r);
        r.turn();
        r.world.die(pids[0], "exit code 0");
        r.turn();
        let handed = r.m.successor.as_ref().unwrap().handed;
        let shown = r.m.snapshot();
        if reports {
            let mut later = handed;
            later.totals.accepted += 10;
            later.totals.bytes_in += 50;
            later.lifecycle.upgrades += 1;
            later.lifecycle.respawns += 2;
            let line = format!("stats {}\n", serde_json::to_string(&later).unwrap());
            let w = r.world.0.borrow();
            let mut pipe = w.successor_ready.as_ref().unwrap();
            std::io::Write::write_all(&mut pipe, line.as_bytes()).unwrap();
        }
        r.turn();
        r.world.die(successor, "signal SIGKILL");
        r.turn();
        assert_eq!(r.m.phase, Phase::Running, "rolled back");
        let after = r.m.snapshot();
        let gained = u64::from(reports);
        assert_eq!(
            after.totals.accepted,
            shown.totals.accepted + 10 * gained,
            "{reports}"
        );
        assert_eq!(after.totals.bytes_in, shown.totals.bytes_in + 50 * gained);
        assert_eq!(after.lifecycle.respawns, 2 * gained);
        let l = after.lifecycle;
        assert_eq!(
            (l.upgrades, l.upgrades_failed, l.rollbacks),
            (1, 1, 1),
            "{l:?}"
        );
    }
}
