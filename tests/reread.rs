//! The echo worker's adaptive re-read (worker/src/echo/reread.rs) as clients see it: a worker
//! that reads again right after an echo, or trusts epoll and waits, must echo every byte in
//! order whatever the client's rhythm: a client that pipelines (many messages in flight), one
//! that alternates (write, wait for the echo, write: the rhythm that turns re-reading on),
//! one that pauses now and then (turning it off, then on again), and one that stalls
//! mid-stream (sends more than every buffer holds while not reading, then resumes). Every
//! mode and io driver is driven the same way.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use common::{Rng, Server, client, echo};

/// The servers every client rhythm is tried against.
const SERVERS: &[&[&str]] = &[
    &["--workers", "1"],
    &["--workers", "1", "--mode", "thread"],
    &["--mode", "fork-per-conn"],
    &["--workers", "1", "--io", "uring"],
];

/// Starts each server in turn (skipping io_uring where the kernel refuses it) and runs `f`.
fn on_every_server(what: &str, f: impl Fn(&Server, &str)) {
    for args in SERVERS {
        if args.contains(&"uring") {
            if let Err(e) = worker::event_loop::probe_uring() {
                common::skip(&format!("{what}: this kernel refuses io_uring ({e})"));
                continue;
            }
        }
        let server = Server::start(args);
        f(&server, &args.join(" "));
    }
}

#[test]
fn a_pipelining_client_gets_every_byte_back_in_order() {
    on_every_server("a pipelining client on --io uring", |server, name| {
        let mut rng = Rng::new(28);
        // Two thousand messages of 1 to 300 bytes, each its own write, read concurrently:
        // many are in flight at once, and reads find several together or parts of one.
        let messages: Vec<Vec<u8>> = (0..2_000)
            .map(|_| {
                let n = rng.range(1, 300);
                rng.bytes(n)
            })
            .collect();
        let expected: Vec<u8> = messages.concat();
        let mut writer = client(server.addr);
        let mut reader = writer.try_clone().unwrap();
        let read = thread::spawn(move || {
            let mut back = Vec::with_capacity(expected.len());
            reader.read_to_end(&mut back).expect("reading the echo");
            (back, expected)
        });
        for m in &messages {
            writer.write_all(m).expect("writing");
        }
        writer.shutdown(Shutdown::Write).unwrap();
        let (back, expected) = read.join().expect("reader");
        assert_eq!(back.len(), expected.len(), "{name}: length");
        assert!(back == expected, "{name}: bytes differ");
    });
}

#[test]
fn alternating_clients_get_every_echo_whatever_their_rhythm() {
    on_every_server("alternating clients on --io uring", |server, name| {
        // Eight clients at once, each write → wait for the echo → write at once (the
        // worker's re-read finds the next message), pausing every 250 round trips (its
        // re-reads then find nothing and it falls back to epoll, until a probe finds data).
        let addr = server.addr;
        thread::scope(|scope| {
            for c in 0..8u64 {
                scope.spawn(move || {
                    let mut s = client(addr);
                    let mut rng = Rng::new(100 + c);
                    for i in 0..2_000u32 {
                        let n = rng.range(1, 128);
                        let mut msg = rng.bytes(n);
                        msg[..1].copy_from_slice(&[i as u8]);
                        echo(&mut s, &msg);
                        if i % 250 == 249 {
                            thread::sleep(Duration::from_millis(20));
                        }
                    }
                    s.shutdown(Shutdown::Write).unwrap();
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).expect("reading to EOF");
                    assert!(rest.is_empty(), "{name}: client {c} got bytes nobody sent");
                });
            }
        });
    });
}

#[test]
fn a_client_that_stalls_mid_stream_then_resumes_gets_every_byte_in_order() {
    const BIG: usize = 32 << 20;
    on_every_server("a stalling client on --io uring", |server, name| {
        let payload = Arc::new(Rng::new(7).bytes(BIG));
        let mut s = client(server.addr);
        // A few round trips first, so the worker has settled on re-reading.
        for i in 0..50u8 {
            echo(&mut s, &[i; 64]);
        }
        let mut writer = s.try_clone().unwrap();
        writer
            .set_write_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let written = Arc::new(AtomicUsize::new(0));
        let (w_payload, w_written) = (payload.clone(), written.clone());
        let write = thread::spawn(move || {
            for chunk in w_payload.chunks(64 * 1024) {
                writer.write_all(chunk).expect("writing");
                w_written.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        });
        // Not reading: the client's receive buffer fills, the worker stops reading at its
        // bound, and the writer blocks. Wait (bounded) until its progress stops.
        let mut last = usize::MAX;
        let mut still = 0;
        let stalled = common::wait_until(Duration::from_secs(60), || {
            thread::sleep(Duration::from_millis(100));
            let now = written.load(Ordering::SeqCst);
            still = if now == last { still + 1 } else { 0 };
            last = now;
            still >= 3
        });
        let at = written.load(Ordering::SeqCst);
        assert!(
            stalled && at < BIG,
            "{name}: the writer never stalled (wrote {at} of {BIG} bytes)"
        );
        // Resume reading: everything comes back, in order.
        let mut back = vec![0u8; BIG];
        s.read_exact(&mut back)
            .expect("reading the echo after the stall");
        write.join().expect("writer");
        assert!(back == *payload, "{name}: bytes differ after the stall");
        // And the connection still alternates normally afterwards.
        for i in 0..50u8 {
            echo(&mut s, &[i; 32]);
        }
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("reading to EOF");
        assert!(rest.is_empty(), "{name}: bytes nobody sent");
    });
}
