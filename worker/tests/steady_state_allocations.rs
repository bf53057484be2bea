//! Heap allocations per round trip of an echo connection in steady state: zero. A counting
//! allocator wraps the system one in this test binary only, and counts the allocations made
//! by this test's thread while a real loopback connection alternates and pipelines messages
//! through `Connection::drive` (the adaptive re-read included). Only back-pressure (bytes the
//! socket refuses) may allocate, and this test never fills a socket.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::stats::Counters;
use worker::echo::Connection;
use worker::service::{Drive, Session};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Only this thread's allocations count (the harness's own threads allocate freely).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every call is passed unchanged to the system allocator; the counter and the
// thread-local flag neither allocate nor touch the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as for `dealloc`; the new size is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Drives the server side until `want` bytes have been echoed (bounded).
fn serve(conn: &mut Connection, scratch: &mut [u8], counters: &mut Counters, want: u64) {
    for _ in 0..10_000 {
        if counters.bytes_out >= want {
            return;
        }
        match conn.drive(scratch, counters) {
            Ok(Drive::Waiting | Drive::Yielded) => {}
            other => panic!("the connection ended: {other:?}"),
        }
    }
    panic!("{want} bytes not echoed (only {})", counters.bytes_out);
}

#[test]
fn an_echo_round_trip_allocates_nothing_in_steady_state() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.set_nodelay(true).unwrap();
    let (server, _) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    let mut conn = Connection::new(mio::net::TcpStream::from_std(server), 64 * 1024, false);
    let mut scratch = vec![0u8; 16 * 1024];
    let mut counters = Counters::default();
    let msg = [0x5au8; 64];
    let mut back = [0u8; 4 * 64];
    let mut round = |pipelined: usize, counters: &mut Counters| {
        for _ in 0..pipelined {
            client.write_all(&msg).unwrap();
        }
        let want = counters.bytes_out + (pipelined * msg.len()) as u64;
        serve(&mut conn, &mut scratch, counters, want);
        client
            .read_exact(&mut back[..pipelined * msg.len()])
            .unwrap();
    };
    // Warm up: first use of the socket and anything lazily set up.
    for i in 0..100 {
        round(1 + i % 4, &mut counters);
    }
    COUNTING.with(|c| c.set(true));
    let rounds = 10_000;
    for i in 0..rounds {
        // Alternating most of the time, a few messages in flight now and then.
        round(if i % 10 == 0 { 4 } else { 1 }, &mut counters);
    }
    COUNTING.with(|c| c.set(false));
    let n = ALLOCATIONS.load(Ordering::Relaxed);
    eprintln!("heap allocations over {rounds} steady-state rounds: {n}");
    assert_eq!(n, 0, "{n} allocations in {rounds} rounds");
}
