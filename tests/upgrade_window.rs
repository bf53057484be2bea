//! The binary upgrade's window (`--upgrade-grace`): a bad build whose new master dies within
//! it is rolled back by the old master; a good one shows its window in stats, carries the
//! stats across, and `upgrade --commit` retires the old master. (More of the window's faults,
//! found by a hostile tester, are in `upgrade_faults.rs`.)

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::{Server, echo_to_eof, wait_until};
use nix::sys::signal::Signal;

/// `prefork-echo ARGS --control PATH`, as a plain command (the control socket may be served by
/// whichever master holds it now).
fn ctl_at(control: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(common::BIN);
    cmd.args(args).arg("--control").arg(control);
    common::output_within(&mut cmd, common::COMMAND)
}

/// The `master_pid` the control socket at `control` answers with, if it answers.
fn answering_master(control: &std::path::Path) -> Option<i64> {
    let out = ctl_at(control, &["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["master_pid"].as_i64()
}

#[test]
fn a_new_master_that_dies_within_the_upgrade_window_is_rolled_back() {
    let bin = common::BinaryCopy::new();
    let real = common::BinaryCopy::new();
    let dir = common::scratch_dir();
    let pid_file = dir.join("echo.pid");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let server = Server::launch(
        &bin.path,
        &[
            "--workers",
            "2",
            "--upgrade-grace",
            "60",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
        true,
    )
    .unwrap();
    let old = server.pid;
    echo_to_eof(server.connect(), b"before the upgrade");
    // A bad build: its new master serves (the real binary, exec'd in place of this script),
    // then dies by SIGKILL 2 s after it answers on the control socket. (The watcher holds
    // copies of the inherited sockets until then, as the old master does anyway.)
    bin.replace_with(&format!(
        r#"#!/bin/sh
(
  i=0
  until {real} stats --control {ctl} --json 2>/dev/null | grep -q "\"master_pid\":$$,"; do
    i=$((i + 1)); [ $i -gt 600 ] && exit 1; sleep 0.1
  done
  sleep 2
  kill -9 $$
) &
exec {real} "$@"
"#,
        real = real.path.display(),
        ctl = server.control.display()
    ));
    server.signal(Signal::SIGUSR2);
    assert!(
        server.wait_for_log("keeps the sockets", Duration::from_secs(60)),
        "{}",
        server.stderr()
    );
    let successor = common::read_pid(&pid_file);
    assert_ne!(successor, old);
    let _guard = common::KillOnDrop::new(successor);
    assert!(
        server.wait_for_log("upgrade rolled back", Duration::from_secs(60)),
        "{}",
        server.stderr()
    );
    assert!(!common::alive(successor));
    // The old master serves again: the port, its pid file, its control socket, its workers.
    assert!(
        wait_until(Duration::from_secs(30), || server.workers().len() == 2),
        "{}",
        server.stderr()
    );
    echo_to_eof(server.connect(), b"served by the old master again");
    assert!(wait_until(Duration::from_secs(10), || common::read_pid(
        &pid_file
    ) == old));
    assert!(
        wait_until(Duration::from_secs(10), || answering_master(
            &server.control
        ) == Some(i64::from(old))),
        "{}",
        server.stderr()
    );
    let v = server.stats();
    assert_eq!(v["lifecycle"]["upgrades_failed"], 1, "{v}");
    assert_eq!(v["generation"], 3, "after the dead new master's 2: {v}");
    assert!(v["upgrade"].is_null(), "{v}");
    assert_eq!(
        server.log_count("upgrade rolled back"),
        1,
        "{}",
        server.stderr()
    );
    // systemd hears that the old master is the main process again.
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !seen.iter().any(|m: &String| {
        m.contains(&format!("MAINPID={old}")) && !m.starts_with("READY=1\nMAINPID")
    }) {
        let n = notify.recv(&mut buf).expect("a notification");
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(common::alive(old));
    let out = server.ctl(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_good_upgrade_shows_its_window_carries_the_stats_and_commit_retires_the_old_master() {
    let dir = common::scratch_dir();
    let pid_file = dir.join("echo.pid");
    let mut server = Server::start(&[
        "--workers",
        "2",
        "--upgrade-grace",
        "120",
        "--stats-interval",
        "0.2",
        "--pid-file",
        pid_file.to_str().unwrap(),
    ]);
    echo_to_eof(server.connect(), &[7u8; 5000]);
    assert!(wait_until(Duration::from_secs(10), || {
        server.stats()["totals"]["bytes_in"].as_u64() == Some(5000)
    }));
    let before = server.stats();
    let old_generation = before["generation"].as_u64().unwrap();
    let old_uptime = before["uptime_secs"].as_f64().unwrap();
    server.signal(Signal::SIGUSR2);
    let (successor, _guard) = server.successor_in(&pid_file);
    // In the window: the new master answers and names both; the old one has no workers left.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let v = server.stats();
            v["master_pid"] == successor && v["upgrade"]["old_master_pid"] == server.pid
        }),
        "{}",
        server.stderr()
    );
    let v = server.stats();
    assert_eq!(v["upgrade"]["new_master_pid"], successor, "{v}");
    let text = server.ctl(&["stats"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("UPGRADE WINDOW"), "{text}");
    assert!(text.contains(&server.pid.to_string()), "{text}");
    assert!(
        wait_until(Duration::from_secs(30), || common::children_of(server.pid)
            == [successor]),
        "{:?}",
        common::children_of(server.pid)
    );
    assert!(common::alive(server.pid), "the old master waits");
    echo_to_eof(server.connect(), b"served by the new master");
    // Stats carry on across the upgrade (issue: rates over the new uptime, generation 1).
    assert!(
        v["generation"].as_u64().unwrap() > old_generation,
        "generation went back: {v}"
    );
    assert!(
        v["uptime_secs"].as_f64().unwrap() >= old_uptime,
        "uptime started again: {v}"
    );
    assert!(v["totals"]["bytes_in"].as_u64() >= Some(5000), "{v}");
    assert_eq!(v["totals"]["accepted"].as_u64(), Some(1), "{v}");
    assert_eq!(v["lifecycle"]["upgrades"], 1, "{v}");
    // `upgrade --commit`: the old master retires now, not in 120 s.
    let out = server.ctl(&["upgrade", "--commit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("retires now"));
    server.assert_exits_ok(Duration::from_secs(20));
    let v = server.stats();
    assert!(v["upgrade"].is_null(), "{v}");
    let out = server.ctl(&["upgrade", "--commit"]);
    assert!(!out.status.success(), "nothing left to commit");
    echo_to_eof(server.connect(), b"still served");
    let out = server.ctl(&["stop"]);
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
