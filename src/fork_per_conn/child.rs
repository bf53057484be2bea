//! What a fork-per-conn child runs: one connection's conversation, or one request datagram's
//! answer and the transfer it begins; then its counters, as one record on the report pipe.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::UdpSocket;
use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use protocol::stats::Counters;
use worker::exchange::drive_blocking;
use worker::service::{Abort, DatagramAnswer, End, Service};

use super::RECORD;

/// Writes a child's counters as its one record.
fn report(c: &Counters, to: &io::PipeWriter) {
    let mut rec = [0u8; RECORD];
    for (chunk, v) in rec.chunks_exact_mut(8).zip(c.to_array()) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    let _ = (&*to).write_all(&rec);
}

/// A connection's child: default signal dispositions (it has no graceful state to keep), the
/// service's conversation, report, exit.
pub(super) fn child<S: Service>(
    service: &S,
    stream: io::Result<std::net::TcpStream>,
    (idle, proxy): (Option<Duration>, &Option<worker::proxy::ProxyRule>),
    bus: Option<std::os::unix::net::UnixStream>,
    to: &io::PipeWriter,
) -> i32 {
    // `fork_child` reset TERM and QUIT to their defaults: either ends this child at once.
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let Ok(stream) = stream else { return 1 };
    let mut c = Counters::default();
    if let Some(rule) = proxy {
        if rule.accept_blocking(&stream).is_err() {
            c.proxy_errors = 1;
            report(&c, to);
            return 0;
        }
    }
    let moved = std::sync::Mutex::new(Counters::default());
    let end = service.serve_blocking(stream, idle, bus, &|m| {
        moved.lock().unwrap_or_else(|p| p.into_inner()).add(m);
    });
    c.add(&moved.into_inner().unwrap_or_else(|p| p.into_inner()));
    c.io_errors = u64::from(end == End::Error);
    c.closed_by_limit = u64::from(end == End::Idle);
    report(&c, to);
    0
}

/// A request datagram's child: the service answers it from here, and an exchange it begins
/// (a TFTP transfer) runs to its end in this process; `verified` is set once its peer answers.
pub(super) fn datagram_child<S: Service>(
    service: &S,
    (datagram, peer, shared): (&[u8], SocketAddr, &UdpSocket),
    verified: &std::sync::atomic::AtomicU8,
    to: &io::PipeWriter,
) -> i32 {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Should this fail, TERM does nothing here and the master's SIGKILL after its grace
    // period ends the child.
    let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone());
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let mut c = Counters::default();
    let local = shared
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    match service.answer_datagram(datagram, peer, local) {
        DatagramAnswer::Refuse => c.datagrams_refused += 1,
        DatagramAnswer::Ignore => {}
        DatagramAnswer::Reply(reply) => match shared.send_to(&reply, peer) {
            Ok(_) => c.datagrams_out += 1,
            Err(_) => c.io_errors += 1,
        },
        DatagramAnswer::Begin(mut x) => {
            c.transfers += 1;
            let stopping = || {
                stop.load(std::sync::atomic::Ordering::Relaxed)
                    .then_some(Abort::Stopping)
            };
            // The master reads it to choose whom to evict when it runs out of room.
            let answered = || verified.store(1, std::sync::atomic::Ordering::Relaxed);
            drive_blocking(&mut x, &mut c, &stopping, &answered);
        }
    }
    report(&c, to);
    0
}
