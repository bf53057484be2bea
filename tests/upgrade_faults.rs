//! Binary upgrades whose new master never gets as far as serving (a hung build), and the way
//! back that a second upgrade must keep: a stop is not held up by a hung new master, a killed
//! old master takes its pending new one with it, a roll-back never takes a count back.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{Server, echo_to_eof, wait_until};
use nix::sys::signal::Signal;

/// The pid of the new master the server logged it started.
fn successor_pid(server: &Server) -> i32 {
    assert!(
        server.wait_for_log(
            "upgrade: started a new master (pid ",
            Duration::from_secs(20)
        ),
        "{}",
        server.stderr()
    );
    server
        .stderr()
        .split("upgrade: started a new master (pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .expect("the successor's pid in the log")
}

/// A server whose next binary is a new master that hangs before ready (it keeps the
/// inherited sockets, as a hung build would), upgraded; returns it and the hung pid. With
/// `deaf`, the hung build ignores SIGTERM too.
fn upgraded_to_a_hung_build(spawn: &str, deaf: bool) -> (Server, i32, common::BinaryCopy) {
    let bin = common::BinaryCopy::new();
    let server = Server::try_start(&bin.path, &["--workers", "1", "--spawn", spawn]).unwrap();
    echo_to_eof(server.connect(), b"before");
    let trap = if deaf { "trap '' TERM\n" } else { "" };
    bin.replace_with(&format!("#!/bin/sh\n{trap}exec sleep 100\n"));
    server.signal(Signal::SIGUSR2);
    let hung = successor_pid(&server);
    // Exec'd: the shell has become `sleep`.
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{hung}/comm")).is_ok_and(|c| c.trim() == "sleep")
        }),
        "the new master never exec'd"
    );
    (server, hung, bin)
}

#[test]
fn a_new_master_that_hangs_before_ready_starts_unmasked_and_does_not_hold_up_a_stop() {
    // A build that hangs, and one that hangs and ignores SIGTERM (then SIGKILL ends it).
    for (spawn, deaf) in [("fork", false), ("exec", false), ("fork", true)] {
        let (mut server, hung, _bin) = upgraded_to_a_hung_build(spawn, deaf);
        let _guard = common::KillOnDrop::new(hung);
        // It starts as a freshly exec'd process would: nothing blocked, so a forwarded TERM
        // reaches even a build that never opens its own mask.
        let blocked = common::status(hung).sigblk;
        assert_eq!(blocked, 0, "{spawn}: SigBlk {blocked:x}");
        let t = Instant::now();
        server.signal(Signal::SIGTERM);
        server.assert_exits_ok(Duration::from_secs(15));
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "{spawn} {deaf}: the stop took {took:?} (it waited for the readiness deadline)"
        );
        assert!(
            wait_until(Duration::from_secs(5), || !common::alive(hung)),
            "{spawn}: the hung new master outlived the stop"
        );
        assert!(
            std::net::TcpStream::connect(server.addr).is_err(),
            "{spawn}: the port still answers"
        );
    }
}

#[test]
fn a_hung_new_master_dies_with_an_old_master_killed_before_it_was_ready() {
    let (mut server, hung, _bin) = upgraded_to_a_hung_build("fork", false);
    let _guard = common::KillOnDrop::new(hung);
    server.signal(Signal::SIGKILL);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    assert!(
        wait_until(Duration::from_secs(10), || !common::alive(hung)),
        "the orphaned new master holds the port"
    );
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(
            server.addr
        )
        .is_err()),
        "the port still accepts connections nobody serves"
    );
}

/// The `master_pid` the control socket at `control` answers with, if it answers.
fn answering_master(server: &Server) -> Option<i64> {
    let out = server.ctl(&["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["master_pid"].as_i64()
}

#[test]
fn a_second_upgrade_that_fails_keeps_the_first_ones_way_back_and_no_count_goes_back() {
    let bin = common::BinaryCopy::new();
    let server = Server::try_start(
        &bin.path,
        &[
            "--workers",
            "2",
            "--upgrade-grace",
            "120",
            "--stats-interval",
            "0.2",
        ],
    )
    .unwrap();
    let old = server.pid;
    echo_to_eof(server.connect(), b"served by the first master");
    assert!(wait_until(
        Duration::from_secs(10),
        || server.stats()["totals"]["accepted"].as_u64() == Some(1)
    ));
    server.signal(Signal::SIGUSR2);
    assert!(
        server.wait_for_log("keeps the sockets", Duration::from_secs(60)),
        "{}",
        server.stderr()
    );
    let first = server.successors()[0];
    let _guard = common::KillOnDrop::new(first);
    assert!(wait_until(Duration::from_secs(30), || answering_master(
        &server
    ) == Some(
        i64::from(first)
    )));
    for _ in 0..10 {
        echo_to_eof(server.connect(), b"served by the new master");
    }
    // Counted by the new master (and reported to the old one, for a roll-back).
    assert!(
        wait_until(
            Duration::from_secs(10),
            || server.stats()["totals"]["accepted"].as_u64() >= Some(11)
        ),
        "{}",
        server.stats()
    );
    let before = server.stats();
    // The newest build fails at once; then the first new master dies.
    bin.break_it();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGUSR2).unwrap();
    assert!(
        server.wait_for_log("upgrade failed", Duration::from_secs(30)),
        "{}",
        server.stderr()
    );
    // Let a stats report (one a second) reach the old master before the new one dies.
    std::thread::sleep(Duration::from_millis(2500));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).unwrap();
    assert!(
        server.wait_for_log("upgrade rolled back", Duration::from_secs(30)),
        "nothing serves after a failed second upgrade: {}",
        server.stderr()
    );
    assert!(wait_until(Duration::from_secs(30), || answering_master(
        &server
    ) == Some(
        i64::from(old)
    )));
    echo_to_eof(server.connect(), b"served by the first master again");
    // No count the server shows goes back with the roll-back.
    let after = server.stats();
    for (group, name) in [
        ("totals", "accepted"),
        ("totals", "bytes_in"),
        ("lifecycle", "upgrades"),
    ] {
        assert!(
            after[group][name].as_u64() >= before[group][name].as_u64(),
            "{group}.{name} went back: {} -> {}",
            before[group][name],
            after[group][name]
        );
    }
    assert!(
        after["lifecycle"]["upgrades_failed"].as_u64() >= Some(1),
        "{after}"
    );
    let out = server.ctl(&["stop"]);
    assert!(out.status.success());
}

#[test]
fn uptime_after_an_upgrade_counts_the_new_masters_own_start() {
    let bin = common::BinaryCopy::new();
    let real = common::BinaryCopy::new();
    let server = Server::try_start(&bin.path, &["--workers", "1", "--upgrade-grace", "0"]).unwrap();
    // The new build takes 3 s from exec to serving.
    bin.replace_with(&format!(
        "#!/bin/sh\nsleep 3\nexec {} \"$@\"\n",
        real.path.display()
    ));
    let u0 = server.stats()["uptime_secs"].as_f64().unwrap();
    let t0 = Instant::now();
    server.signal(Signal::SIGUSR2);
    let first = successor_pid(&server);
    let _guard = common::KillOnDrop::new(first);
    assert!(
        wait_until(Duration::from_secs(30), || answering_master(&server)
            == Some(i64::from(first))),
        "{}",
        server.stderr()
    );
    let elapsed = t0.elapsed().as_secs_f64();
    let u1 = server.stats()["uptime_secs"].as_f64().unwrap();
    assert!(
        u1 >= u0 + elapsed - 1.0,
        "uptime {u1:.2} s, but {u0:.2} s before the upgrade and {elapsed:.2} s since"
    );
    let out = server.ctl(&["stop"]);
    assert!(out.status.success());
}

#[test]
fn under_user_a_stop_after_a_roll_back_leaves_no_runtime_file_behind() {
    let Some(_) = common::nobody() else { return };
    let bin = common::BinaryCopy::new();
    let dir = common::scratch_dir();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pid_file = dir.join("echo.pid");
    let mut server = Server::try_start(
        &bin.path,
        &[
            "--workers",
            "1",
            "--user",
            "nobody",
            "--upgrade-grace",
            "60",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
    )
    .unwrap();
    let old = server.pid;
    let out = server.ctl(&["upgrade"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        server.wait_for_log("keeps the sockets", Duration::from_secs(60)),
        "{}",
        server.stderr()
    );
    let successor = server.successors()[0];
    let _guard = common::KillOnDrop::new(successor);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(successor), Signal::SIGKILL).unwrap();
    assert!(
        server.wait_for_log("upgrade rolled back", Duration::from_secs(30)),
        "{}",
        server.stderr()
    );
    assert!(wait_until(Duration::from_secs(30), || answering_master(
        &server
    ) == Some(
        i64::from(old)
    )));
    assert!(wait_until(Duration::from_secs(10), || common::read_pid(
        &pid_file
    ) == old));
    let out = server.ctl(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.assert_exits_ok(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || !pid_file.exists()
            && !server.control.exists()),
        "left behind: pid file {}, control socket {}",
        pid_file.exists(),
        server.control.exists()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
