//! The ring against real sockets, with a pool small enough to run dry: connections that find
//! no buffer wait for one to come back, and every byte still comes back, in order.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use protocol::stats::Counters;

use super::Ring;

// The suite's one skip helper (std only), shared rather than copied: see its header.
#[path = "../../../../tests/common/skip.rs"]
#[allow(dead_code)]
mod skip;

const CLIENTS: usize = 100;
const EACH: usize = 256 * 1024;
/// The pool: fewer buffers than clients.
const BUFFERS: u16 = 64;

fn payload(i: usize) -> Vec<u8> {
    (0..EACH)
        .map(|j| (i * 7 + j * 13 + j / 251) as u8)
        .collect()
}

#[test]
fn more_stalled_connections_than_buffers_wait_for_one_and_lose_nothing() {
    if let Err(e) = super::probe() {
        skip::skip(&format!("this kernel or sandbox refuses io_uring ({e})"));
        return;
    }
    let poll = mio::Poll::new().unwrap();
    let mut ring = Ring::with_buffers(poll.as_raw_fd(), 64 * 1024, false, BUFFERS).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut counters = Counters::default();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (s, _) = listener.accept().unwrap();
        // Small kernel buffers: an echo the client does not read blocks the ring's send soon,
        // and that send holds its buffer.
        socket2::SockRef::from(&s)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&c)
            .set_recv_buffer_size(4096)
            .unwrap();
        ring.adopt(mio::net::TcpStream::from_std(s), &mut counters);
        c.set_nonblocking(true).unwrap();
        clients.push(c);
    }
    let payloads: Vec<Vec<u8>> = (0..CLIENTS).map(payload).collect();
    let mut written = vec![0usize; CLIENTS];
    let mut back: Vec<Vec<u8>> = vec![Vec::new(); CLIENTS];
    let push = |clients: &mut Vec<TcpStream>, written: &mut Vec<usize>| {
        for (i, c) in clients.iter_mut().enumerate() {
            while written[i] < EACH {
                match c.write(&payloads[i][written[i]..]) {
                    Ok(n) => written[i] += n,
                    Err(_) => break,
                }
            }
        }
    };
    // Everyone writes and nobody reads, until more connections want a buffer than exist.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ring.starved.is_empty() && Instant::now() < deadline {
        push(&mut clients, &mut written);
        ring.turn(Duration::from_millis(1), &mut counters).unwrap();
    }
    assert!(
        !ring.starved.is_empty(),
        "nobody starved; {} buffers held",
        ring.buffers.held
    );
    // Now everyone reads too: the held buffers come back, the starved are re-armed.
    let mut buf = vec![0u8; 64 * 1024];
    while back.iter().any(|b| b.len() < EACH) && Instant::now() < deadline {
        push(&mut clients, &mut written);
        for (i, c) in clients.iter_mut().enumerate() {
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                back[i].extend_from_slice(&buf[..n]);
            }
        }
        ring.turn(Duration::from_millis(1), &mut counters).unwrap();
    }
    for (i, b) in back.iter().enumerate() {
        assert_eq!(b.len(), EACH, "client {i}: length");
        assert!(*b == payloads[i], "client {i}: bytes differ");
    }
    let total = (CLIENTS * EACH) as u64;
    assert_eq!((counters.bytes_in, counters.bytes_out), (total, total));
    assert_eq!(counters.io_errors, 0);
    assert_eq!(ring.len(), CLIENTS);
}
