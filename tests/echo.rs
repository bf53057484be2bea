//! The echo protocol as a client sees it, in every serving mode: every byte back, in order,
//! however it is split, over many connections at once; half-close; and the connection counts
//! each mode must hold.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::thread;

use common::{Rng, Server, client, echo, echo_to_eof};

const CONNECTIONS: usize = 200;
const MAX_PAYLOAD: usize = 4 << 20;

/// 200 concurrent connections, payloads from 1 byte to 4 MiB (log-uniform), each written in
/// random chunks while the echo is read concurrently. Returns the bytes sent in all.
fn random_payloads_over_concurrent_connections(addr: SocketAddr, seed: u64) -> u64 {
    let total = std::sync::atomic::AtomicU64::new(0);
    let total = &total;
    thread::scope(|scope| {
        for conn in 0..CONNECTIONS {
            scope.spawn(move || {
                let mut rng = Rng::new(seed + conn as u64);
                let size = match conn {
                    0 => 1,
                    1 => MAX_PAYLOAD,
                    _ => {
                        // log-uniform, so both tiny and multi-megabyte payloads are common
                        let bits = rng.range(0, 22);
                        rng.range(1 << bits, (2usize << bits).min(MAX_PAYLOAD))
                    }
                };
                let payload = rng.bytes(size);
                total.fetch_add(size as u64, std::sync::atomic::Ordering::Relaxed);
                let stream = client(addr);
                let mut reader = stream.try_clone().unwrap();
                let expected = payload.clone();
                let read = thread::spawn(move || {
                    let mut back = Vec::with_capacity(expected.len());
                    reader.read_to_end(&mut back).expect("reading the echo");
                    assert_eq!(back.len(), expected.len(), "connection {conn}: length");
                    assert!(back == expected, "connection {conn}: bytes differ");
                });
                let mut w = stream;
                let mut at = 0;
                while at < payload.len() {
                    let n = rng.range(1, 64 * 1024).min(payload.len() - at);
                    w.write_all(&payload[at..at + n]).expect("writing");
                    at += n;
                }
                w.shutdown(Shutdown::Write).unwrap();
                read.join().expect("reader");
            });
        }
    });
    total.load(std::sync::atomic::Ordering::Relaxed)
}

/// The pids of the server's four workers once all four run: a worker that dies and is
/// replaced on the way changes this list, where a count would not.
fn four_workers(server: &Server) -> Vec<i32> {
    assert!(
        common::wait_until(std::time::Duration::from_secs(30), || server
            .workers()
            .len()
            == 4),
        "{:?}",
        server.workers()
    );
    server.workers()
}

#[test]
fn process_mode_fork_echoes_random_payloads() {
    let server = Server::start(&["--workers", "4", "--spawn", "fork"]);
    let pool = four_workers(&server);
    random_payloads_over_concurrent_connections(server.addr, 1);
    assert_eq!(server.workers(), pool, "no worker died on the way");
}

#[test]
fn process_mode_on_io_uring_echoes_random_payloads_and_counts_every_byte() {
    if !common::memory::uring_or_skip("random payloads on --io uring") {
        return;
    }
    let server = Server::start(&["--workers", "4", "--io", "uring", "--stats-interval", "0.2"]);
    // Each worker really waits in a ring (and the master, which serves no connection, not).
    for w in server.workers() {
        assert!(
            common::memory::holds_io_uring(w),
            "worker {w} has no io_uring"
        );
    }
    assert!(!common::memory::holds_io_uring(server.pid));
    let pool = four_workers(&server);
    let sent = random_payloads_over_concurrent_connections(server.addr, 500);
    assert_eq!(server.workers(), pool, "no worker died on the way");
    // Every byte in came back out, every connection was accepted and is closed again.
    let mut last = serde_json::Value::Null;
    let settled = common::wait_until(std::time::Duration::from_secs(10), || {
        last = server.stats();
        let t = &last["totals"];
        t["bytes_in"].as_u64() == Some(sent)
            && t["bytes_out"].as_u64() == Some(sent)
            && t["accepted"].as_u64() == Some(CONNECTIONS as u64)
            && t["active"].as_u64() == Some(0)
            && t["io_errors"].as_u64() == Some(0)
    });
    assert!(
        settled,
        "sent {sent} bytes over {CONNECTIONS} connections; stats say {last}"
    );
}

#[test]
fn process_mode_exec_echoes_random_payloads() {
    let server = Server::start(&["--workers", "4", "--spawn", "exec"]);
    let pool = four_workers(&server);
    random_payloads_over_concurrent_connections(server.addr, 1000);
    assert_eq!(server.workers(), pool, "no worker died on the way");
}

#[test]
fn thread_mode_echoes_random_payloads() {
    let server = Server::start(&["--workers", "4", "--mode", "thread"]);
    random_payloads_over_concurrent_connections(server.addr, 2000);
}

#[test]
fn fork_per_connection_mode_echoes_random_payloads() {
    let server = Server::start(&["--mode", "fork-per-conn"]);
    random_payloads_over_concurrent_connections(server.addr, 3000);
    // Every connection's child was reaped: none is left once the clients are done.
    assert!(common::wait_until(
        std::time::Duration::from_secs(10),
        || server.workers().is_empty()
    ));
}

#[test]
fn half_close_gets_the_whole_echo_then_eof_in_every_mode() {
    for args in [
        &["--spawn", "fork"][..],
        &["--spawn", "exec"],
        &["--mode", "thread"],
        &["--mode", "fork-per-conn"],
        &["--io", "uring"],
        &["--io", "uring", "--spawn", "exec"],
    ] {
        if args.contains(&"uring") && !common::memory::uring_or_skip("half-close on --io uring") {
            continue;
        }
        let server = Server::start(&[&["--workers", "2"][..], args].concat());
        // Larger than the per-connection bound and the socket buffers, so the server must
        // keep what it owes across the half-close.
        let payload = Rng::new(7).bytes(3 << 20);
        echo_to_eof(server.connect(), &payload);
        echo_to_eof(server.connect(), b"x");
        // A client that half-closes without sending anything gets EOF at once.
        echo_to_eof(server.connect(), b"");
    }
}

#[test]
fn ipv6_loopback_works_when_available() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        common::skip("no IPv6 loopback on this machine");
        return;
    }
    let server = Server::start(&["--listen", "[::1]:0", "--workers", "2"]);
    assert!(server.addr.is_ipv6(), "{}", server.line);
    echo(&mut server.connect(), b"over IPv6");
}

#[test]
fn one_worker_holds_ten_thousand_idle_connections_and_still_echoes() {
    const IDLE: usize = 10_000;
    if common::raise_nofile() < IDLE as u64 + 500 {
        common::skip(&format!(
            "descriptor limit too low for {IDLE} client sockets"
        ));
        return;
    }
    let server = Server::start(&["--workers", "1"]);
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(server.connect());
    }
    // Every one of them is really served (accepted and echoing) by the one worker...
    for (i, s) in idle.iter_mut().enumerate() {
        echo(s, &(i as u32).to_le_bytes());
    }
    let worker = server.workers()[0];
    let held = common::client_ports_held_by(worker, server.addr.port());
    assert!(
        held.len() >= IDLE,
        "the worker holds {} connections",
        held.len()
    );
    // ...and a fresh connection is still echoed while they all stay open.
    echo_to_eof(server.connect(), &Rng::new(3).bytes(1 << 20));
    echo(&mut idle[IDLE / 2], b"still here");
}

#[test]
fn thread_mode_holds_a_thousand_concurrent_connections() {
    const N: usize = 1000;
    common::raise_nofile();
    let server = Server::start(&["--workers", "2", "--mode", "thread"]);
    let mut conns: Vec<_> = (0..N).map(|_| server.connect()).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        echo(s, format!("hello {i}").as_bytes());
    }
    // All still open, all still served: one thread each.
    let threads = procfs::process::Process::new(server.pid)
        .and_then(|p| p.tasks())
        .unwrap()
        .count();
    assert!(threads > N, "{threads} threads for {N} connections");
    for (i, s) in conns.iter_mut().enumerate().rev() {
        echo(s, format!("again {i}").as_bytes());
    }
}
