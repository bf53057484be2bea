//! Stats as a user reads them through `prefork-echo stats`: totals that add up to the traffic
//! sent, survive a worker's death, and are not disturbed by hostile control-socket clients.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::{Rng, Server, echo_to_eof, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Sends `conns` connections' worth of payloads of known sizes; returns (connections, bytes).
fn send_known_traffic(server: &Server, conns: usize, seed: u64) -> (u64, u64) {
    let mut rng = Rng::new(seed);
    let mut total = 0;
    for _ in 0..conns {
        let size = rng.range(1, 300_000);
        let payload = rng.bytes(size);
        total += payload.len() as u64;
        echo_to_eof(server.connect(), &payload);
    }
    (conns as u64, total)
}

fn totals(v: &Value) -> (u64, u64, u64, u64) {
    let t = &v["totals"];
    let n = |k: &str| t[k].as_u64().unwrap_or(u64::MAX);
    (n("accepted"), n("bytes_in"), n("bytes_out"), n("active"))
}

/// Waits until the totals are exactly `(accepted, bytes, bytes, 0 active)`.
fn wait_for_totals(server: &Server, accepted: u64, bytes: u64) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(15), || {
        last = server.stats();
        totals(&last) == (accepted, bytes, bytes, 0)
    });
    assert!(
        ok,
        "totals {:?} never reached {:?}",
        totals(&last),
        (accepted, bytes, bytes, 0)
    );
    last
}

#[test]
fn totals_equal_the_traffic_sent_in_every_mode() {
    for args in [
        &["--spawn", "fork"][..],
        &["--spawn", "exec"],
        &["--mode", "thread"],
        &["--mode", "fork-per-conn"],
    ] {
        let server =
            Server::start(&[&["--workers", "3", "--stats-interval", "0.1"][..], args].concat());
        let (conns, bytes) = send_known_traffic(&server, 40, 11);
        let snap = wait_for_totals(&server, conns, bytes);
        // Per-worker rows add up to the totals, and shares to 1.
        // fork-per-conn reports the master and its transient children as one row.
        let rows_expected = if args.contains(&"fork-per-conn") {
            1
        } else {
            3
        };
        let rows = snap["workers"].as_array().unwrap();
        assert_eq!(rows.len(), rows_expected);
        let sum: u64 = rows
            .iter()
            .map(|w| w["counters"]["bytes_in"].as_u64().unwrap())
            .sum();
        assert_eq!(sum, bytes, "{args:?}");
        let shares: f64 = snap["fairness"]["shares"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .sum();
        assert!((shares - 1.0).abs() < 1e-9, "{shares}");
        let jain = snap["fairness"]["jain_index"].as_f64().unwrap();
        assert!((1.0 / 3.0 - 1e-9..=1.0 + 1e-9).contains(&jain), "{jain}");
    }
}

#[test]
fn a_dead_workers_traffic_stays_in_the_totals() {
    let server = Server::start(&["--workers", "2", "--stats-interval", "0.1"]);
    let (conns, bytes) = send_known_traffic(&server, 30, 21);
    let snap = wait_for_totals(&server, conns, bytes);
    // Kill a worker that served something, once its report is in.
    let victim = snap["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["counters"]["accepted"].as_u64() > Some(0))
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let mut after = Value::Null;
    assert!(wait_until(Duration::from_secs(10), || {
        after = server.stats();
        let pids: Vec<i64> = after["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["pid"].as_i64())
            .collect();
        pids.len() == 2 && !pids.contains(&i64::from(victim))
    }));
    assert_eq!(
        totals(&after),
        (conns, bytes, bytes, 0),
        "totals went backward"
    );
    let new_pids: Vec<i32> = server.workers();
    assert!(
        after["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| new_pids.contains(&(w["pid"].as_i64().unwrap() as i32)))
    );
    // More traffic adds on top.
    let (c2, b2) = send_known_traffic(&server, 10, 22);
    wait_for_totals(&server, conns + c2, bytes + b2);
}

#[test]
fn hostile_control_clients_do_not_disturb_stats_or_service() {
    let server = Server::start(&["--workers", "2", "--stats-interval", "0.1"]);
    let (conns, bytes) = send_known_traffic(&server, 5, 31);
    // A flood of garbage without a newline, a stalled peer, an unknown command, binary junk,
    // and a peer that asks and never reads.
    let mut flood = UnixStream::connect(&server.control).unwrap();
    let _ = flood.write_all(&vec![b'x'; 64 * 1024]);
    let _stalled = UnixStream::connect(&server.control).unwrap();
    let mut unknown = UnixStream::connect(&server.control).unwrap();
    unknown.write_all(b"make me a sandwich\n").unwrap();
    let mut reply = String::new();
    unknown.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("\"error\""), "{reply}");
    let mut junk = UnixStream::connect(&server.control).unwrap();
    junk.write_all(&[0xff, 0x00, 0xfe, b'\n']).unwrap();
    let mut never_reads = UnixStream::connect(&server.control).unwrap();
    never_reads.write_all(b"stats\n").unwrap();

    // Stats and echo go on, with the numbers intact.
    wait_for_totals(&server, conns, bytes);
    echo_to_eof(server.connect(), b"still serving");
    assert!(server.wait_for_log("control client", Duration::from_secs(10)));
    assert_eq!(server.workers().len(), 2);
}

#[test]
fn stats_json_matches_the_documented_schema() {
    for mode in ["process", "thread", "fork-per-conn"] {
        let server = Server::start(&["--workers", "2", "--mode", mode, "--stats-interval", "0.1"]);
        let (conns, bytes) = send_known_traffic(&server, 3, 41);
        let v = wait_for_totals(&server, conns, bytes);
        // Key for key and type for type, both ways, what the README's schema block says.
        let schema = common::readme_schema::read();
        if let Err(e) = schema.check(&v) {
            panic!("{mode}: stats --json differs from the README's schema: {e}\n{v:#}");
        }
        assert_eq!(v["version"], 1);
        assert_eq!(v["mode"], mode);
        assert_eq!(v["master_pid"].as_i64(), Some(i64::from(server.pid)));
        assert!(v["uptime_secs"].as_f64().unwrap() > 0.0);
        assert!(v["generation"].as_u64().unwrap() >= 1);
        let workers = v["workers"].as_array().unwrap();
        assert_eq!(workers.len(), if mode == "fork-per-conn" { 1 } else { 2 });
        assert_eq!(
            v["fairness"]["shares"].as_array().unwrap().len(),
            workers.len()
        );
        assert!(v["fairness"]["jain_index"].is_f64());
    }
}

#[test]
fn stats_prints_a_table_and_the_control_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start(&["--workers", "2", "--log-stats", "--stats-interval", "0.2"]);
    send_known_traffic(&server, 4, 51);
    let mode = std::fs::metadata(&server.control)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "control socket mode {:o}",
        mode & 0o777
    );
    let out = common::output_within(
        Command::new(common::BIN)
            .args(["stats", "--control"])
            .arg(&server.control),
        common::COMMAND,
    );
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "mode=process",
        "accepted",
        "all",
        "rates",
        "fairness (Jain)",
    ] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }
    assert!(server.wait_for_log("stats: workers=2", Duration::from_secs(10)));
    // A stats request to a server that is not there fails with one line, exit 1.
    let out = common::output_within(
        Command::new(common::BIN).args(["stats", "--control", "/nonexistent/prefork-echo.sock"]),
        common::COMMAND,
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

#[test]
fn a_live_control_socket_is_not_stolen_by_a_second_server() {
    let first = Server::start(&["--workers", "1"]);
    let control = first.control.to_str().unwrap().to_string();
    let second = Server::try_start(common::BIN, &["--workers", "1", "--control", &control]);
    let failure = second.err().expect("the second server must refuse");
    assert_eq!(failure.status.and_then(|s| s.code()), Some(1));
    assert!(failure.stderr.contains("in use"), "{}", failure.stderr);
    assert!(
        first.stats()["workers"].is_array(),
        "the first server still answers"
    );
}

#[test]
fn the_accept_queue_shows_connections_no_worker_has_taken() {
    let server = Server::start(&["--workers", "1", "--backlog", "16"]);
    let worker = server.workers()[0];
    let queue = |s: &Server| s.stats()["accept_queue"].clone();
    assert_eq!(queue(&server)["limit"], 16, "{}", queue(&server));
    // A stopped worker accepts nothing: the kernel queues the connections, and stats say so.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), Signal::SIGSTOP).unwrap();
    let mut held: Vec<_> = (0..5).map(|_| server.connect()).collect();
    let seen = common::wait_until(Duration::from_secs(30), || queue(&server)["waiting"] == 5);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), Signal::SIGCONT).unwrap();
    assert!(seen, "{}", queue(&server));
    for c in &mut held {
        common::echo(c, b"queued, then served\n");
    }
    assert_eq!(queue(&server)["waiting"], 0);
    let text = server.ctl(&["stats"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("accept queue: 0 waiting (limit 16)"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}
