//! The upgrade window, event by event: once the new master serves, the old one drains its
//! workers but keeps its sockets; the new master's death within the window brings the old
//! one back with a fresh generation; the window's end, a commit or a stop retires it.

use std::io::Read;

use crate::master::Carryover;

use super::*;

/// Starts an upgrade on a serving rig and has the new master report ready; returns the
/// workers' pids and the new master's.
fn upgraded(r: &mut Rig) -> (Vec<i32>, i32) {
    let pids = r.serving();
    r.signal(SIGUSR2);
    let acts = r.acts();
    let Some(&Act::Successor { pid: successor }) = acts.last() else {
        panic!("no successor started: {acts:?}");
    };
    let pipe = r.world.0.borrow_mut().successor_ready.take().unwrap();
    (&pipe).write_all(b"ready\n").unwrap();
    r.world.0.borrow_mut().successor_ready = Some(pipe);
    r.turn();
    (pids, successor)
}

fn tell(r: &Rig, word: &[u8]) {
    let w = r.world.0.borrow();
    let mut pipe = w.successor_ready.as_ref().expect("the successor's pipe");
    pipe.write_all(word).unwrap();
}

fn in_window(r: &Rig) -> bool {
    matches!(r.m.phase, Phase::UpgradeWindow { .. })
}

#[test]
fn once_the_new_master_serves_the_old_one_drains_its_workers_but_keeps_its_sockets() {
    let mut r = rig_window(2, Duration::from_secs(60));
    let (pids, successor) = upgraded(&mut r);
    let mut termed = Rig::killed(&r.acts(), Signal::SIGTERM);
    termed.sort_unstable();
    assert_eq!(
        termed, pids,
        "its workers drain, the new master is left alone"
    );
    assert!(in_window(&r));
    assert!(r.m.listener.is_some(), "the listening socket is kept");
    for p in pids {
        r.world.die(p, "exit code 0");
    }
    // No workers, no respawns, and the new master is not timed out while it serves.
    r.pass(Duration::from_secs(45));
    let acts = r.acts();
    assert!(Rig::spawned(&acts, 1).is_empty() && Rig::spawned(&acts, 2).is_empty());
    assert!(!acts.contains(&Act::Kill {
        pid: successor,
        sig: Signal::SIGKILL
    }));
    assert!(in_window(&r) && !r.turn(), "waiting out the window");
    // The window closes: it retires as an upgrade always did, and is done.
    r.pass(Duration::from_secs(16));
    assert!(matches!(r.m.phase, Phase::Draining { .. }));
    assert!(r.m.listener.is_none());
    assert!(r.acts().is_empty(), "the new master is not signalled");
    assert!(r.turn(), "done");
    assert!(r.m.failure.is_none());
}

#[test]
fn a_new_master_that_dies_within_the_window_is_rolled_back() {
    let mut r = rig_window(2, Duration::from_secs(30));
    let (pids, successor) = upgraded(&mut r);
    for p in pids {
        r.world.die(p, "exit code 0");
    }
    r.pass(Duration::from_secs(3));
    r.acts();
    r.world.die(successor, "signal SIGKILL");
    r.turn();
    r.turn();
    assert_eq!(r.m.phase, Phase::Running, "serving again");
    assert_eq!(
        r.m.generation, 3,
        "with a fresh generation (the dead master's was 2)"
    );
    let fresh = Rig::spawned(&r.acts(), 3);
    assert_eq!(fresh.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1]);
    assert!(r.m.listener.is_some());
    assert_eq!(r.m.lifecycle.upgrades_failed, 1);
    assert!(r.m.successor.is_none());
    // And it stays: the old window's end means nothing now.
    for (_, p) in &fresh {
        r.send(*p, &Message::Ready);
    }
    for _ in 0..35 {
        for (_, p) in &fresh {
            r.send(*p, &Message::Report(Counters::default()));
        }
        r.pass(Duration::from_secs(1));
    }
    assert_eq!(r.m.phase, Phase::Running);
    assert!(Rig::killed(&r.acts(), Signal::SIGTERM).is_empty());
}

#[test]
fn a_death_after_the_window_is_not_rolled_back() {
    let mut r = rig_window(1, Duration::from_secs(5));
    let (pids, successor) = upgraded(&mut r);
    r.world.die(pids[0], "exit code 0");
    r.pass(Duration::from_secs(6));
    assert!(r.turn(), "retired and done");
    r.world.die(successor, "signal SIGKILL");
    r.turn();
    assert!(Rig::spawned(&r.acts(), 2).is_empty());
}

#[test]
fn a_commit_or_a_stop_ends_the_window_at_once_and_leaves_the_new_master_alone() {
    // The new master commits (`upgrade --commit`).
    let mut r = rig_window(1, Duration::from_secs(30));
    let (pids, _) = upgraded(&mut r);
    r.acts();
    tell(&r, b"commit\n");
    r.turn();
    assert!(matches!(r.m.phase, Phase::Draining { .. }));
    r.world.die(pids[0], "exit code 0");
    r.turn();
    assert!(r.turn(), "done");
    assert!(r.acts().is_empty(), "nobody signalled");

    // TERM (or QUIT) to the old master in its window: it retires; the new master serves on.
    for sig in [SIGTERM, SIGQUIT] {
        let mut r = rig_window(1, Duration::from_secs(30));
        let (pids, _) = upgraded(&mut r);
        r.acts();
        r.signal(SIGHUP);
        r.signal(SIGTTIN);
        r.signal(SIGUSR2);
        assert!(r.acts().is_empty(), "nothing to reload, scale or upgrade");
        assert!(in_window(&r));
        r.signal(sig);
        assert!(matches!(r.m.phase, Phase::Draining { .. }));
        r.world.die(pids[0], "exit code 0");
        r.turn();
        assert!(r.turn(), "done");
        assert!(r.acts().is_empty(), "the new master is not signalled");
    }
}

/// The old master's end of the pipe, as a rig's predecessor; non-blocking.
fn predecessor_pipe(r: &mut Rig) -> std::io::PipeReader {
    let (reader, writer) = std::io::pipe().unwrap();
    nix::fcntl::fcntl(
        &reader,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    r.m.cfg.predecessor = Some(std::os::fd::OwnedFd::from(writer));
    reader
}

/// What the new master wrote so far: its words, its stats reports, and whether it closed.
fn heard(reader: &mut std::io::PipeReader) -> (Vec<String>, Vec<Carryover>, bool) {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match reader.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    let text = String::from_utf8(text).unwrap();
    let (stats, words): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|l| l.starts_with("stats "));
    let stats = stats.iter().map(|l| Carryover::parse(&l[6..])).collect();
    (words.into_iter().map(String::from).collect(), stats, closed)
}

#[test]
fn a_new_master_keeps_the_old_ones_pipe_and_commits_on_request_or_on_a_stop() {
    for how in ["request", "stop", "upgrade"] {
        let mut r = rig_window(1, Duration::from_secs(30));
        let mut reader = predecessor_pipe(&mut r);
        r.serving();
        assert_eq!(heard(&mut reader).0, ["ready"]);
        let shown = r.m.snapshot().upgrade.expect("stats show the window");
        assert_eq!(shown.old_master_pid, std::os::unix::process::parent_id());
        assert!(shown.closes_in_secs > 29.0);
        match how {
            "request" => assert!(r.m.commit_predecessor("test").is_some()),
            "stop" => r.signal(SIGTERM),
            _ => {
                // Not when the next upgrade starts (it may fail), but once its master serves.
                r.signal(SIGUSR2);
                r.turn();
                assert!(
                    r.m.snapshot().upgrade.is_some(),
                    "still open while it starts"
                );
                tell(&r, b"ready\n");
                r.turn();
            }
        }
        let (words, _, closed) = heard(&mut reader);
        assert_eq!(words, ["commit"], "{how}");
        assert!(closed, "and lets go of the pipe");
        assert!(r.m.snapshot().upgrade.is_none());
        assert!(r.m.commit_predecessor("again").is_none(), "once");
    }
}

#[test]
fn a_new_master_reports_its_stats_in_the_window_and_lets_go_when_it_closes() {
    let mut r = rig_window(1, Duration::from_secs(5));
    let mut reader = predecessor_pipe(&mut r);
    let pids = r.serving();
    assert_eq!(heard(&mut reader).0, ["ready"]);
    let mut reports = Vec::new();
    for i in 0..6 {
        let counted = Counters {
            accepted: i,
            ..Counters::default()
        };
        r.send(pids[0], &Message::Report(counted));
        r.pass(Duration::from_secs(1));
        reports.extend(heard(&mut reader).1);
    }
    assert!(reports.len() >= 4, "about one a second: {}", reports.len());
    let last = reports.last().unwrap();
    assert!(last.totals.accepted >= 3, "{last:?}");
    assert!(r.m.snapshot().upgrade.is_none());
    let (words, _, closed) = heard(&mut reader);
    assert!(
        words.is_empty() && closed,
        "pipe closed, no commit: {words:?}"
    );
    assert!(r.m.commit_predecessor("late").is_none());
}

#[test]
fn the_config_file_sets_the_window_and_a_reload_changes_it() {
    let file = crate::config::FileConfig::parse("upgrade_grace = 7.5\n").unwrap();
    let s = settings(1).with_file(&file);
    assert_eq!(s.upgrade_grace, Duration::from_millis(7500));
    assert!(crate::config::FileConfig::parse("upgrade_grace = soon\n").is_err());
    // The window a master opens is the one its settings say at that moment.
    let mut r = rig_window(1, Duration::from_secs(3));
    upgraded(&mut r);
    let Phase::UpgradeWindow { until } = r.m.phase else {
        panic!("no window: {:?}", r.m.phase);
    };
    assert_eq!(until - r.m.sys.now(), Duration::from_secs(3));
}
