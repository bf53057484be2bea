//! `--io uring` where it differs from epoll: what idle connections cost (a receive waits with
//! no buffer of its own), more completions at once than the ring's queue holds, and
//! connections the worker must close itself while the kernel still holds an operation of
//! theirs (the drain deadline). The rest of its behaviour is tested beside
//! epoll's, in the same tests: echo and counters (echo.rs), half-close, limits and never-readers
//! (hardening.rs), graceful and immediate stops (lifecycle.rs), reloads under churn (reload.rs),
//! the PROXY header (proxy.rs). A kernel that refuses io_uring is said so in the output.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::{Rng, Server, echo, echo_to_eof, wait_until};

/// What the stalled client of the drain test sends: far more than socket buffers hold.
const BIG: usize = 32 << 20;
/// The budget for ten thousand idle connections.
const IDLE_BUDGET: u64 = 40 << 20;

#[test]
fn ten_thousand_connections_on_the_ring_cost_no_buffers_idle_and_are_all_answered_at_once() {
    const IDLE: usize = 10_000;
    if !common::memory::uring_or_skip("idle connections on --io uring") {
        return;
    }
    if common::raise_nofile() < IDLE as u64 + 500 {
        common::skip(&format!(
            "descriptor limit too low for {IDLE} client sockets"
        ));
        return;
    }
    let server = Server::start(&["--workers", "1", "--io", "uring", "--stats-interval", "0.2"]);
    let worker = server.workers()[0];
    assert!(common::memory::holds_io_uring(worker));
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut s = server.connect();
        // Each one really served: its receive took a buffer and gave it back.
        echo(&mut s, &(i as u32).to_le_bytes());
        idle.push(s);
    }
    assert!(
        wait_until(
            Duration::from_secs(10),
            || server.stats()["totals"]["active"].as_u64() == Some(IDLE as u64)
        ),
        "{}",
        server.stats()
    );
    let pss = common::memory::pss(worker);
    eprintln!(
        "worker PSS with {IDLE} idle connections on the ring: {} KiB",
        pss >> 10
    );
    assert!(
        pss <= IDLE_BUDGET,
        "{pss} bytes for {IDLE} idle connections"
    );
    // A busy newcomer is served while they all wait, and any of them still answers.
    echo_to_eof(server.connect(), &Rng::new(11).bytes(1 << 20));
    echo(&mut idle[IDLE / 2], b"still here");
    // Then all of them speak at once: more completions at a time than the ring's completion
    // queue holds (8,192), and every one is answered.
    for (i, s) in idle.iter_mut().enumerate() {
        s.write_all(&(i as u32).to_be_bytes()).unwrap();
    }
    for (i, s) in idle.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, (i as u32).to_be_bytes(), "connection {i}");
    }
    assert_eq!(
        server.workers(),
        vec![worker],
        "the worker lived through it"
    );
}

#[test]
fn the_drain_deadline_closes_connections_the_kernel_is_waiting_on() {
    if !common::memory::uring_or_skip("drain deadline on --io uring") {
        return;
    }
    let mut server = Server::start(&[
        "--workers",
        "1",
        "--io",
        "uring",
        "--drain-timeout",
        "1",
        "--stats-interval",
        "0.1",
    ]);
    let mut held = server.connect();
    echo(&mut held, b"then silence");
    // A second one in mid-conversation that does not read its echo, with a small receive
    // buffer: more than the kernel's buffers on both sides hold, so the worker has a send
    // blocked in flight for it at the deadline, not only a receive.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.connect(&server.addr.into()).unwrap();
    let mut stalled: std::net::TcpStream = sock.into();
    let big = Rng::new(5).bytes(BIG);
    let mut writer = stalled.try_clone().unwrap();
    let pusher = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut writer, &big);
    });
    assert!(
        wait_until(Duration::from_secs(20), || {
            server.stats()["totals"]["bytes_in"]
                .as_u64()
                .is_some_and(|n| n >= 1 << 20)
        }),
        "the worker never received the stalled client's bytes"
    );
    let workers = server.workers();
    assert_eq!(workers.len(), 1, "{workers:?}");
    let t0 = Instant::now();
    server.signal(Signal::SIGTERM);
    server.assert_exits_ok(Duration::from_secs(30));
    eprintln!("exited {:?} after SIGTERM with a 1 s drain", t0.elapsed());
    // Both were closed by the worker at its deadline: end of stream (or a reset) for each.
    let held_got = common::read_until_closed(
        &mut held,
        Duration::from_secs(10),
        "the held connection after its worker's deadline",
    )
    .len();
    assert_eq!(held_got, 0, "the held connection got bytes it never sent");
    let rest = common::read_until_closed(
        &mut stalled,
        Duration::from_secs(10),
        "the stalled connection after its worker's deadline",
    )
    .len();
    let _ = stalled.shutdown(Shutdown::Both);
    pusher.join().unwrap();
    assert!(
        rest < BIG,
        "the stalled client got its whole echo from a worker that was told to stop"
    );
    // The master is gone: its worker, had it survived, would be this process's (subreaper)
    // child now, so it is checked by pid, not as the master's child.
    assert!(
        wait_until(Duration::from_secs(10), || !workers
            .iter()
            .any(|&w| common::alive(w))),
        "a worker outlived its master: {workers:?}"
    );
}
