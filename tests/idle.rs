//! Quiet when idle: after every life-cycle event (start, a worker crash, a hung worker killed,
//! a reload, scaling up and down, failed spawns and an abandoned slot, a binary upgrade) the
//! server, left alone, uses (almost) no CPU: the master and every worker, in every mode.
//!
//! What this catches: a timer left in the past makes the master's poll wait zero on every
//! turn, for ever (once: after any worker crash, one whole CPU until the next reload). CPU is
//! read as utime+stime from /proc/PID/stat over a window of a few seconds; a spinning process
//! uses hundreds of ticks there, an idle one a handful (stats reports, the acceptors' tick).

mod common;

use std::time::Duration;

use common::{Server, echo, echo_to_eof, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long each measurement lasts.
const WINDOW: Duration = Duration::from_secs(2);
/// Most CPU ticks (of 100 a second) one process may use in a window: 2.5% of a CPU. An idle
/// process was measured at 0-1; a busy loop at 28 on a machine loaded eight times over its
/// two cores (about 200 on an idle one).
const MOST_TICKS: u64 = 5;
/// Windows tried before giving up: what an event leaves to do (exec'd workers starting, old
/// ones draining) may take one; a spin shows in every one.
const TRIES: usize = 4;

fn sig(pid: i32, s: Signal) {
    kill(Pid::from_raw(pid), s).unwrap();
}

/// utime + stime of `pid` in clock ticks, `None` once it is gone.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    (stat.state != 'Z').then_some(stat.utime + stat.stime)
}

/// Asserts that each of `roots` and all their descendants stay (almost) idle over one window
/// (of up to [`TRIES`]); `what` names the event in the failure message, with `log`.
fn assert_quiet(roots: &[i32], what: &str, log: impl Fn() -> String) {
    let ticks_per_sec = procfs::ticks_per_second();
    let most = MOST_TICKS * ticks_per_sec / 100;
    let mut busy = Vec::new();
    for _ in 0..TRIES {
        let mut pids: Vec<i32> = roots.to_vec();
        for &r in roots {
            pids.extend(common::descendants(r));
        }
        let before: Vec<(i32, u64)> = pids
            .iter()
            .filter_map(|&p| Some((p, cpu_ticks(p)?)))
            .collect();
        // The measurement itself: not a wait for anything to happen.
        std::thread::sleep(WINDOW);
        busy = before
            .iter()
            .filter_map(|&(p, t0)| Some((p, cpu_ticks(p)?.saturating_sub(t0))))
            .filter(|&(_, used)| used > most)
            .collect();
        if busy.is_empty() {
            return;
        }
    }
    panic!(
        "after {what}: busy while idle (pid, ticks in {WINDOW:?}; at most {most}): {busy:?} (master(s) {roots:?})\n{}",
        log()
    );
}

/// Waits until the master has exactly `n` live workers, none of them in `not`.
fn wait_pool(server: &Server, n: usize, not: &[i32]) {
    assert!(
        wait_until(Duration::from_secs(30), || {
            let w = server.workers();
            w.len() == n && w.iter().all(|p| !not.contains(p))
        }),
        "pool never became {n} worker(s) (excluding {not:?}): {:?}\n{}",
        server.workers(),
        server.stderr()
    );
}

/// Process mode, `--spawn fork` or `exec`: start, crash, hung worker, reload, scale up and
/// down, failed spawns and an abandoned slot (exec: the binary goes missing), upgrade.
fn process_mode_is_quiet_after_each_event(spawn: &str) {
    let bin = common::BinaryCopy::new();
    let dir = common::scratch_dir();
    let pid_file = dir.join("echo.pid");
    let mut server = Server::try_start(
        &bin.path,
        &[
            "--workers",
            "2",
            "--spawn",
            spawn,
            "--stats-interval",
            "0.2",
            "--worker-timeout",
            "2",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--upgrade-grace",
            "60",
        ],
    )
    .unwrap();
    let log = || server.stderr();
    assert_quiet(&[server.pid], "start", log);
    echo_to_eof(server.connect(), b"serving");

    // A worker crashes (SIGKILL): replaced at once.
    let before = server.workers();
    sig(before[0], Signal::SIGKILL);
    wait_pool(&server, 2, &before[..1]);
    assert_quiet(&[server.pid], "a worker crash (SIGKILL)", || {
        server.stderr()
    });
    echo_to_eof(server.connect(), b"after the crash");

    // A worker hangs (SIGSTOP): the master kills it after --worker-timeout and replaces it.
    let before = server.workers();
    sig(before[0], Signal::SIGSTOP);
    assert!(
        server.wait_for_log("sent no report", Duration::from_secs(30)),
        "{}",
        server.stderr()
    );
    wait_pool(&server, 2, &before[..1]);
    assert_quiet(&[server.pid], "a hung worker killed", || server.stderr());

    // A reload: a new generation, the old one drained away.
    let before = server.workers();
    server.signal(Signal::SIGHUP);
    wait_pool(&server, 2, &before);
    assert_quiet(&[server.pid], "a reload", || server.stderr());

    // Scaling up, then down.
    server.signal(Signal::SIGTTIN);
    wait_pool(&server, 3, &[]);
    assert_quiet(&[server.pid], "scaling up", || server.stderr());
    server.signal(Signal::SIGTTOU);
    wait_pool(&server, 2, &[]);
    assert_quiet(&[server.pid], "scaling down", || server.stderr());

    if spawn == "exec" {
        // The binary goes missing: a dead worker's replacements fail to start, back off, and
        // the slot is abandoned (the other worker serves on).
        let saved = bin.dir.join("saved");
        std::fs::rename(&bin.path, &saved).unwrap();
        let before = server.workers();
        sig(before[0], Signal::SIGKILL);
        assert!(
            server.wait_for_log("DEGRADED", Duration::from_secs(60)),
            "{}",
            server.stderr()
        );
        assert_quiet(&[server.pid], "failed spawns and an abandoned slot", || {
            server.stderr()
        });
        std::fs::rename(&saved, &bin.path).unwrap();
        let out = server.ctl(&["scale", "2"]);
        assert!(out.status.success());
        wait_pool(&server, 2, &[]);
        assert_quiet(&[server.pid], "a slot retried by scale", || server.stderr());
    }

    // A binary upgrade: the new master serves; the old one waits out its upgrade window with
    // its sockets and no workers, quietly.
    let mut held = server.connect();
    echo(&mut held, b"before the upgrade");
    server.signal(Signal::SIGUSR2);
    let (successor, _guard) = server.successor_in(&pid_file);
    assert!(
        wait_until(Duration::from_secs(30), || common::children_of(successor)
            .len()
            == 2),
        "{}",
        server.stderr()
    );
    drop(held);
    assert!(
        wait_until(Duration::from_secs(30), || common::children_of(server.pid)
            == [successor]),
        "the old master's workers did not drain: {}",
        server.stderr()
    );
    assert_quiet(
        &[server.pid],
        "a binary upgrade (old master, in its window)",
        || server.stderr(),
    );
    echo_to_eof(server.connect(), b"after the upgrade");
    let out = server.ctl(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = server.wait_exit(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn process_mode_with_fork_is_quiet_after_each_event() {
    process_mode_is_quiet_after_each_event("fork");
}

#[test]
fn process_mode_with_exec_is_quiet_after_each_event() {
    process_mode_is_quiet_after_each_event("exec");
}

/// Thread mode: start, connections come and go, the signals it ignores or refuses.
#[test]
fn thread_mode_is_quiet_after_each_event() {
    let server = Server::start(&["--mode", "thread", "--workers", "2"]);
    assert_quiet(&[server.pid], "start", || server.stderr());
    for i in 0..20u8 {
        echo_to_eof(server.connect(), &[i; 100]);
    }
    assert_quiet(&[server.pid], "connections", || server.stderr());
    server.signal(Signal::SIGHUP);
    assert!(server.wait_for_log("SIGHUP", Duration::from_secs(10)));
    assert_quiet(&[server.pid], "a reload (refused)", || server.stderr());
    let out = server.ctl(&["scale", "3"]);
    let _ = out.status; // refused or not, the server must stay idle
    assert_quiet(&[server.pid], "a scale request", || server.stderr());
}

/// Fork-per-conn: start, a connection's child crashes, connections come and go, a reload.
#[test]
fn fork_per_conn_is_quiet_after_each_event() {
    let server = Server::start(&["--mode", "fork-per-conn"]);
    assert_quiet(&[server.pid], "start", || server.stderr());
    let mut held = server.connect();
    echo(&mut held, b"a child for this one");
    let child = *server.workers().first().expect("a child per connection");
    sig(child, Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || server
        .workers()
        .is_empty()));
    assert_quiet(&[server.pid], "a connection's child crash", || {
        server.stderr()
    });
    for i in 0..20u8 {
        echo_to_eof(server.connect(), &[i; 100]);
    }
    assert_quiet(&[server.pid], "connections", || server.stderr());
    server.signal(Signal::SIGHUP);
    assert!(server.wait_for_log("SIGHUP", Duration::from_secs(10)));
    assert_quiet(&[server.pid], "a reload (refused)", || server.stderr());
}
