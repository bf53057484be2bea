//! README promises that no other test held the server to: a worker that cannot boot exits 3
//! and stops the master at once; workers ignore SIGINT; a new master that never gets ready is
//! given up after the upgrade timeout; datagrams "from" a port below 1024 are dropped by the
//! UDP echo and the TFTP service alike; fork-per-conn TFTP forks at most `--max-conns`
//! children and drops (and counts) a request beyond them.

mod common;

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, echo, echo_to_eof, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The exit code the README gives a worker that cannot boot.
const EXIT_BOOT_FAILURE: i32 = 3;

#[test]
fn a_worker_given_descriptors_it_cannot_use_exits_3() {
    // The hidden `worker` entry --spawn exec runs, with descriptors nothing passed it.
    let out = common::output_within(
        Command::new(common::BIN).args([
            "worker",
            "--listen-fd",
            "900",
            "--ipc-fd",
            "901",
            "--id",
            "0",
            "--max-unsent",
            "65536",
            "--drain-timeout",
            "1",
            "--stats-interval",
            "0",
        ]),
        common::COMMAND,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_BOOT_FAILURE), "{err}");
    assert!(err.contains("cannot start"), "{err}");
}

#[test]
fn a_worker_that_cannot_be_executed_stops_the_master_at_once() {
    // Root starts the master from a directory only root may enter; the master drops to
    // nobody before it spawns, so every exec of a worker fails: exit 3 from each.
    let Some(_) = common::nobody() else { return };
    let bin = common::BinaryCopy::new();
    std::fs::set_permissions(&bin.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let t0 = Instant::now();
    let f = match Server::try_start(
        &bin.path,
        &["--workers", "2", "--spawn", "exec", "--user", "nobody"],
    ) {
        Ok(s) => panic!("the master served without a worker: {}", s.stderr()),
        Err(f) => f,
    };
    let took = t0.elapsed();
    assert_eq!(f.status.and_then(|s| s.code()), Some(1), "{}", f.stderr);
    assert!(f.stderr.contains("could not boot"), "{}", f.stderr);
    // At once: not after the respawn backoff (100 ms doubling six times, 6.3 s) that a
    // worker dying for another reason gets.
    assert!(
        !f.stderr.contains("DEGRADED") && took < Duration::from_secs(20),
        "{took:?}: {}",
        f.stderr
    );
}

#[test]
fn workers_ignore_sigint_in_every_mode() {
    for args in [
        &["--workers", "2", "--spawn", "fork"][..],
        &["--workers", "2", "--spawn", "exec"],
        &["--mode", "fork-per-conn"],
    ] {
        let server = Server::start(args);
        let mut held = server.connect();
        echo(&mut held, b"before");
        // In fork-per-conn, the worker is the child serving `held`.
        let targets = if args.contains(&"fork-per-conn") {
            let port = held.local_addr().unwrap().port();
            let child = *server
                .workers()
                .iter()
                .find(|&&c| common::client_ports_held_by(c, server.addr.port()).contains(&port))
                .expect("the child serving the connection");
            vec![child]
        } else {
            server.workers()
        };
        for &w in &targets {
            let sigint = 1u64 << (Signal::SIGINT as u64 - 1);
            assert_ne!(
                common::status(w).sigign & sigint,
                0,
                "{args:?}: worker {w} does not ignore SIGINT"
            );
            kill(Pid::from_raw(w), Signal::SIGINT).unwrap();
        }
        // Several master turns later every one is still there, still serving.
        server.let_turns_pass(1.5);
        for &w in &targets {
            assert!(common::alive(w), "{args:?}: worker {w} ended on SIGINT");
        }
        echo(&mut held, b"after SIGINT, same connection");
        echo_to_eof(server.connect(), b"and new ones");
        assert!(common::alive(server.pid));
    }
}

#[test]
fn a_new_master_that_never_gets_ready_is_given_up_after_the_upgrade_timeout() {
    let bin = common::BinaryCopy::new();
    let pid_file = bin.dir.join("echo.pid");
    let server = Server::try_start(
        &bin.path,
        &["--workers", "1", "--pid-file", pid_file.to_str().unwrap()],
    )
    .unwrap();
    // The "new binary" starts and then never says it is ready.
    let next = bin.dir.join("next");
    std::fs::write(&next, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&next, &bin.path).unwrap();
    let t0 = Instant::now();
    server.signal(Signal::SIGUSR2);
    assert!(
        server.wait_for_log("upgrade: started a new master", Duration::from_secs(10)),
        "{}",
        server.stderr()
    );
    let successor = server.successors()[0];
    let _guard = common::KillOnDrop::new(successor);
    // Meanwhile the old master serves on.
    echo_to_eof(server.connect(), b"served while the upgrade waits");
    assert!(
        server.wait_for_log("upgrade failed", Duration::from_secs(60)),
        "{}",
        server.stderr()
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(29) && took < Duration::from_secs(50),
        "given up after {took:?}, not the README's 30 s"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !common::alive(successor)),
        "the unready new master was left running"
    );
    assert_eq!(common::read_pid(&pid_file), server.pid);
    assert_eq!(
        server.stats()["lifecycle"]["upgrades_failed"].as_u64(),
        Some(1)
    );
    echo_to_eof(server.connect(), b"the old master keeps serving");
}

/// A UDP socket bound to a free port below 1024, or `None` (a counted skip) when not root.
fn low_port_socket() -> Option<UdpSocket> {
    if !nix::unistd::Uid::effective().is_root() {
        common::skip("not root: cannot send from a port below 1024");
        return None;
    }
    let s = (900..1000)
        .find_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
        .expect("a free port below 1024");
    Some(s)
}

/// Sends `request` from a port below 1024, then the same from an ordinary port: the second
/// is answered (so the first was read before it), the first never, and it is counted.
fn low_port_dropped(server: &Server, request: &[u8], what: &str) {
    let Some(low) = low_port_socket() else { return };
    let refused = |s: &Server| s.stats()["totals"]["datagrams_refused"].as_u64();
    let before = refused(server).unwrap_or(0);
    low.send_to(request, server.addr).unwrap();
    let ordinary = UdpSocket::bind("127.0.0.1:0").unwrap();
    ordinary
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    ordinary.send_to(request, server.addr).unwrap();
    let mut buf = [0u8; 1024];
    ordinary
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: an ordinary client got no answer: {e}"));
    assert!(
        wait_until(Duration::from_secs(20), || refused(server)
            == Some(before + 1)),
        "{what}: the low port's datagram was not counted as refused: {}",
        server.stats()["totals"]
    );
    low.set_nonblocking(true).unwrap();
    assert!(
        low.recv_from(&mut buf).is_err(),
        "{what}: a source below 1024 was answered"
    );
}

#[test]
fn datagrams_from_ports_below_1024_are_dropped_by_udp_echo_and_tftp() {
    for mode in ["process", "thread"] {
        let server = Server::start(&[
            "--workers",
            "1",
            "--udp",
            "--mode",
            mode,
            "--stats-interval",
            "0.1",
        ]);
        low_port_dropped(&server, b"loop?", &format!("UDP echo, {mode}"));
    }
    let root = common::tftp::root_with(&[100]);
    for mode in ["process", "thread", "fork-per-conn"] {
        let server = Server::start(&[
            "--service",
            "tftp",
            "--root",
            root.to_str().unwrap(),
            "--mode",
            mode,
            "--workers",
            "1",
            "--stats-interval",
            "0.1",
        ]);
        let rrq = common::tftp::request(false, b"f100", "octet", &[]);
        low_port_dropped(&server, &rrq, &format!("TFTP, {mode}"));
    }
}

#[test]
fn fork_per_conn_tftp_forks_at_most_max_conns_children_and_drops_the_rest() {
    use common::tftp::{ack, head, recv, request, root_with, udp_client};
    let root = root_with(&[5000]);
    let server = Server::start(&[
        "--service",
        "tftp",
        "--root",
        root.to_str().unwrap(),
        "--mode",
        "fork-per-conn",
        "--max-conns",
        "2",
        "--stats-interval",
        "0.1",
    ]);
    let rrq = request(false, b"f5000", "octet", &[]);
    // Two transfers held at their second block: their clients have answered once, so neither
    // is an unverified transfer a newcomer may evict (tests/tftp_hostile.rs covers those),
    // and neither is given up for a while (the retransmission schedule runs 31 s).
    let held: Vec<_> = (0..2)
        .map(|_| {
            let c = udp_client();
            c.send_to(&rrq, server.addr).unwrap();
            let (p, tid) = recv(&c, "DATA 1");
            assert_eq!(head(&p), (3, 1));
            c.send_to(&ack(1), tid).unwrap();
            let (p, _) = recv(&c, "DATA 2");
            assert_eq!(head(&p), (3, 2));
            (c, tid)
        })
        .collect();
    assert_eq!(common::children_of(server.pid).len(), 2);
    // A third request is taken and dropped (counted), with no child and no answer.
    let third = udp_client();
    third.send_to(&rrq, server.addr).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            server.stats()["totals"]["closed_by_limit"].as_u64() >= Some(1)
        }),
        "{}",
        server.stats()["totals"]
    );
    assert_eq!(common::children_of(server.pid).len(), 2);
    third.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1024];
    assert!(
        third.recv_from(&mut buf).is_err(),
        "a request over the limit was answered"
    );
    third.set_nonblocking(false).unwrap();
    // One held transfer completes: its child ends, and the retrying client is served.
    let (c, tid) = &held[0];
    let mut block = 2u16;
    loop {
        c.send_to(&ack(block), *tid).unwrap();
        let (p, _) = recv(c, "the next DATA");
        assert_eq!(head(&p), (3, block + 1));
        block += 1;
        if p.len() < 516 {
            c.send_to(&ack(block), *tid).unwrap();
            break;
        }
    }
    third
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let served = wait_until(Duration::from_secs(30), || {
        third.send_to(&rrq, server.addr).unwrap();
        matches!(third.recv_from(&mut buf), Ok((n, _)) if n >= 4 && head(&buf[..n]) == (3, 1))
    });
    assert!(
        served,
        "the retrying client was never served once a child ended"
    );
}
