//! Binary upgrades whose new master never gets as far as serving (a hung build), and the way
//! back that a second upgrade must keep: a stop is not held up by a hung new master, a killed
//! old master takes its pending new one with it, a roll-back never takes a count back.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{Server, echo_to_eof, wait_until};
use nix::sys::signal::Signal;

/// Replaces the binary at `bin` (atomically, as a deploy would) with a shell script.
fn replace_with_script(bin: &common::BinaryCopy, script: &str) {
    let tmp = bin.dir.join("next");
    std::fs::write(&tmp, script).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &bin.path).unwrap();
}

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
    replace_with_script(&bin, &format!("#!/bin/sh\n{trap}exec sleep 100\n"));
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
