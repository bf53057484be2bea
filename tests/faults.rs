//! Faults the master must survive without hurting healthy workers or leaking processes: its
//! own stalls, hostile config files, upgrades that fail or are interrupted, slots that keep
//! failing, workers that hang while draining, and signals it has no use for.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::{Server, echo, echo_to_eof, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn sig(pid: i32, s: Signal) {
    kill(Pid::from_raw(pid), s).unwrap();
}

#[test]
fn a_stalled_master_does_not_kill_its_healthy_workers() {
    let server = Server::start(&[
        "--workers",
        "3",
        "--stats-interval",
        "0.1",
        "--worker-timeout",
        "1",
    ]);
    let before = server.workers();
    let mut held = server.connect();
    echo(&mut held, b"before the stall");
    // The master stops (SIGSTOP: a debugger, a slow disk, a full stderr pipe) for three
    // times the worker timeout while its workers keep reporting into their channels.
    sig(server.pid, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    sig(server.pid, Signal::SIGCONT);
    // Its answers prove it has run loop turns since waking; let a few more pass.
    server.let_turns_pass(1.5);
    assert_eq!(server.workers(), before, "{}", server.stderr());
    assert!(
        !server.stderr().contains("killing it"),
        "{}",
        server.stderr()
    );
    echo(&mut held, b"after the stall, same connection");
}

#[test]
fn a_config_file_that_is_not_a_small_regular_file_is_refused_without_hanging() {
    let dir = common::scratch_dir();
    let fifo = dir.join("conf.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let f = Server::try_start(common::BIN, &["--config", fifo.to_str().unwrap()])
        .err()
        .expect("a FIFO config was accepted");
    assert_eq!(f.status.and_then(|s| s.code()), Some(1), "{}", f.stderr);
    assert!(f.stderr.contains("not a regular file"), "{}", f.stderr);

    let conf = dir.join("echo.conf");
    std::fs::write(&conf, "workers = 1\n").unwrap();
    let mut server = Server::start(&["--config", conf.to_str().unwrap()]);
    // Swapped for a FIFO, then for something huge: each reload is refused, at once.
    for swap in ["fifo", "huge"] {
        let _ = std::fs::remove_file(&conf);
        if swap == "fifo" {
            nix::unistd::mkfifo(&conf, nix::sys::stat::Mode::S_IRWXU).unwrap();
        } else {
            std::fs::write(&conf, vec![b'#'; 300_000]).unwrap();
        }
        let out = server.ctl(&["reload"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{swap}: {err}");
        assert!(err.contains("reload refused"), "{swap}: {err}");
    }
    echo_to_eof(server.connect(), b"still serving");
    server.signal(Signal::SIGTERM);
    assert!(
        server
            .wait_exit(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stop_during_an_upgrade_stops_the_new_master_too() {
    let bin = common::BinaryCopy::new();
    let real = common::BinaryCopy::new();
    let mut server = Server::try_start(&bin.path, &["--workers", "1"]).unwrap();
    // The new binary takes a while to start: the stop arrives while it is on its way. (Its
    // `sleep` must not hold the inherited sockets, or it would keep the port open itself.)
    bin.replace_with(&format!(
            "#!/bin/sh\neval \"sleep 3 $PREFORK_ECHO_LISTEN_FD<&- $PREFORK_ECHO_CONTROL_FD<&- $PREFORK_ECHO_UPGRADE_FD<&-\"\nexec {} \"$@\"\n",
            real.path.display()
        ),
    );
    server.signal(Signal::SIGUSR2);
    assert!(server.wait_for_log(
        "upgrade: started a new master (pid ",
        Duration::from_secs(10)
    ));
    let log = server.stderr();
    let successor: i32 = log
        .split("upgrade: started a new master (pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .expect("the successor's pid in the log");
    let _guard = common::KillOnDrop::new(successor);
    server.signal(Signal::SIGTERM);
    server.assert_exits_ok(Duration::from_secs(30));
    assert!(
        !common::alive(successor),
        "the new master outlived the stop"
    );
    assert!(server.stderr().contains("stopping the new master"));
    assert!(
        std::net::TcpStream::connect(server.addr).is_err(),
        "the port still answers"
    );
    assert!(
        !server.control.exists(),
        "the control socket was left behind"
    );
}

#[test]
fn a_failed_upgrade_leaves_the_old_master_its_control_socket() {
    let bin = common::BinaryCopy::new();
    let real = common::BinaryCopy::new();
    let dir = common::scratch_dir();
    let pid_file = dir.join("echo.pid");
    let server = Server::try_start(
        &bin.path,
        &["--workers", "1", "--pid-file", pid_file.to_str().unwrap()],
    )
    .unwrap();
    // The new binary gets as far as binding and opening the control path, then fails.
    bin.replace_with(&format!(
        "#!/bin/sh\nexec {} \"$@\" --user no-such-user-here\n",
        real.path.display()
    ));
    server.signal(Signal::SIGUSR2);
    assert!(
        server.wait_for_log("upgrade failed", Duration::from_secs(40)),
        "{}",
        server.stderr()
    );
    for cmd in [&["stats"][..], &["reload"], &["scale", "2"]] {
        let out = server.ctl(cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(common::read_pid(&pid_file), server.pid);
    echo_to_eof(server.connect(), b"the old master serves on");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_upgrade_under_user_keeps_serving_as_that_user() {
    let Some(nobody) = common::nobody() else {
        return;
    };
    let dir = common::scratch_dir();
    let pid_file = dir.join("echo.pid");
    // The new master is exec'd as nobody: run a copy it can reach, wherever the checkout is.
    let bin = common::BinaryCopy::new();
    let mut server = Server::try_start(
        &bin.path,
        &[
            "--workers",
            "2",
            "--user",
            "nobody",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
    )
    .unwrap();
    let mut held = server.connect();
    echo(&mut held, b"before");
    server.signal(Signal::SIGUSR2);
    let (successor, _guard) = server.successor_in(&pid_file);
    drop(held);
    assert!(
        server
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
    let log = server.stderr();
    assert!(!log.contains("upgrade failed"), "{log}");
    let v = server.stats();
    assert_eq!(v["master_pid"].as_i64(), Some(i64::from(successor)));
    assert_eq!(common::status(successor).euid, nobody.uid.as_raw());
    echo_to_eof(server.connect(), b"served after the upgrade");
    let out = server.ctl(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_slot_that_keeps_failing_degrades_the_pool_instead_of_stopping_it() {
    let bin = common::BinaryCopy::new();
    let server = Server::try_start(&bin.path, &["--workers", "2", "--spawn", "exec"]).unwrap();
    let mut held = server.connect();
    echo(&mut held, b"held");
    let held_port = held.local_addr().unwrap().port();
    let victim = *server
        .workers()
        .iter()
        .find(|&&w| !common::client_ports_held_by(w, server.addr.port()).contains(&held_port))
        .expect("a worker that does not hold the connection");
    // The binary goes missing for a while; one worker dies and cannot be replaced.
    let saved = bin.dir.join("saved");
    std::fs::rename(&bin.path, &saved).unwrap();
    sig(victim, Signal::SIGKILL);
    assert!(
        server.wait_for_log("DEGRADED", Duration::from_secs(60)),
        "{}",
        server.stderr()
    );
    assert!(common::alive(server.pid), "the master gave up");
    assert_eq!(server.workers().len(), 1);
    echo(&mut held, b"the healthy worker's connection is untouched");
    echo_to_eof(server.connect(), b"and new ones are served");
    let v = server.stats();
    assert_eq!(
        v["abandoned_slots"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    // The binary is back: scale retries the slot.
    std::fs::rename(&saved, &bin.path).unwrap();
    let out = server.ctl(&["scale", "2"]);
    assert!(out.status.success());
    assert!(wait_until(Duration::from_secs(20), || server
        .workers()
        .len()
        == 2));
}

#[test]
fn a_scale_the_descriptor_limit_cannot_hold_is_refused() {
    let dir = common::scratch_dir();
    let control = dir.join("ctl.sock");
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!(
                "ulimit -n 64 && exec {} --listen 127.0.0.1:0 --workers 2 --control {}",
                common::BIN,
                control.display()
            ),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = common::KillOnDrop::new(child.id() as i32);
    common::read_announce(&mut child);
    let out = common::output_within(
        Command::new(common::BIN)
            .args(["scale", "60", "--control"])
            .arg(&control),
        common::COMMAND,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("RLIMIT_NOFILE"), "{err}");
    assert_eq!(common::children_of(child.id() as i32).len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_draining_worker_that_hangs_is_killed_at_its_drain_deadline() {
    let server = Server::start(&["--workers", "1", "--drain-timeout", "1"]);
    let old = server.workers()[0];
    let mut held = server.connect();
    echo(&mut held, b"held by the old generation");
    sig(old, Signal::SIGSTOP);
    let out = server.ctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(30), || !common::alive(old)),
        "a stopped old-generation worker lingers\n{}",
        server.stderr()
    );
    assert!(server.wait_for_log("still draining", Duration::from_secs(10)));
    server.let_turns_pass(1.5);
    assert_eq!(server.log_count("still draining"), 1, "{}", server.stderr());
    echo_to_eof(server.connect(), b"the new generation serves");
}

#[test]
fn unknown_fatal_signals_are_logged_and_ignored_in_every_mode() {
    for mode in ["process", "thread", "fork-per-conn"] {
        let server = Server::start(&["--workers", "1", "--mode", mode]);
        for s in [Signal::SIGUSR1, Signal::SIGALRM] {
            server.signal(s);
            let name = format!("{s}: not a signal");
            assert!(
                server.wait_for_log(&name, Duration::from_secs(10)),
                "{mode}: {name}"
            );
        }
        assert!(common::alive(server.pid), "{mode}");
        echo_to_eof(server.connect(), b"unharmed");
    }
}

/// The signal dispositions a process shows in /proc: caught, ignored, blocked.
fn dispositions(pid: i32) -> (u64, u64, u64) {
    let s = common::status(pid);
    (s.sigcgt, s.sigign, s.sigblk)
}

#[test]
fn fork_and_exec_workers_answer_every_signal_alike() {
    let fork = Server::start(&["--workers", "1", "--spawn", "fork"]);
    let exec = Server::start(&["--workers", "1", "--spawn", "exec"]);
    let (f, e) = (fork.workers()[0], exec.workers()[0]);
    assert_eq!(dispositions(f), dispositions(e));
    // USR2 means nothing to a worker: its default action ends it, and it is replaced.
    for (server, w) in [(&fork, f), (&exec, e)] {
        sig(w, Signal::SIGUSR2);
        assert!(wait_until(Duration::from_secs(10), || !common::alive(w)));
        assert!(wait_until(Duration::from_secs(10), || server
            .workers()
            .len()
            == 1));
    }
}

#[test]
fn an_upgrade_under_systemd_names_the_new_main_pid_and_keeps_totals() {
    let dir = common::scratch_dir();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let env = [("NOTIFY_SOCKET", notify_path.to_str().unwrap())];
    let pid_file = dir.join("echo.pid");
    let mut server = Server::launch(
        common::BIN,
        &[
            "--workers",
            "1",
            "--spawn",
            "exec",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
        &env,
        true,
    )
    .unwrap();
    let next = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(next(), format!("READY=1\nMAINPID={}", server.pid));
    // sd_listen_fds(3): the service manager's variables are not a worker's business.
    let worker = server.workers()[0];
    let environ = procfs::process::Process::new(worker)
        .unwrap()
        .environ()
        .unwrap();
    assert!(!environ.contains_key(std::ffi::OsStr::new("NOTIFY_SOCKET")));
    echo_to_eof(server.connect(), &[7u8; 5000]);
    assert!(wait_until(Duration::from_secs(10), || {
        server.stats()["totals"]["bytes_in"].as_u64() == Some(5000)
    }));

    server.signal(Signal::SIGUSR2);
    let announced = next();
    let successor = common::read_pid(&pid_file);
    let _guard = common::KillOnDrop::new(successor);
    assert_ne!(successor, server.pid);
    assert_eq!(announced, format!("READY=1\nMAINPID={successor}"));
    assert!(
        server
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
    // The old master retired without telling systemd the service was stopping.
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    while let Ok(n) = notify.recv(&mut buf) {
        assert!(!String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    }
    let totals = &server.stats()["totals"];
    assert!(
        totals["bytes_in"].as_u64() >= Some(5000),
        "totals went back: {totals}"
    );
    assert_eq!(totals["accepted"].as_u64(), Some(1), "{totals}");
    let out = server.ctl(&["stop"]);
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
