//! A transfer's own socket and its retransmission clock: what sending and receiving share.
//! The socket's port is the server's transfer ID (RFC 1350). It is `connect`ed to the peer
//! (as tftpd-hpa's are), so the kernel drops anyone else's datagrams: a stranger is never
//! answered, not even with ERROR 5, so two transfer ports (or a transfer and an echo service)
//! cannot be set answering each other for ever.
//!
//! A peer that has not answered yet may be a forged source address, and every packet sent to
//! it lands on someone who never asked: until it answers, the first packet goes out at most
//! [`UNVERIFIED_SENDS`] times, [`UNVERIFIED_INTERVAL`] apart, whatever `timeout` the request
//! named. After that, no transfer outlives [`MAX_STALL`] without progress, whatever the
//! client asked for.

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};

use protocol::stats::Counters;

/// Retransmissions of one packet before the transfer is given up.
pub const MAX_RETRIES: u32 = 5;
/// Times the first packet goes to a peer that has not answered yet (the first send included).
pub const UNVERIFIED_SENDS: u32 = 3;
/// Between those sends: the default timeout, not the one the (unproven) request asked for.
pub const UNVERIFIED_INTERVAL: Duration = super::options::DEFAULT_TIMEOUT;
/// The longest a transfer waits for progress, whatever `timeout` it negotiated.
pub const MAX_STALL: Duration = Duration::from_secs(60);
/// Segments one GSO call may carry (the kernel's UDP_MAX_SEGMENTS) ...
const GSO_MAX_SEGMENTS: usize = 64;
/// ... and bytes (a UDP datagram's length field, less the headers).
const GSO_MAX_BYTES: usize = 65_000;
/// The retransmission interval doubles with each try, up to this many timeouts.
const MAX_BACKOFF: u32 = 8;

/// The socket, the peer, and the clock.
#[derive(Debug)]
pub struct Link {
    /// The transfer's own socket (non-blocking).
    pub socket: UdpSocket,
    /// The client's address and port (its transfer ID).
    pub peer: SocketAddr,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// When the next retransmission (or the end) is due.
    pub deadline: Instant,
    /// Retransmissions since the peer last made progress.
    pub tries: u32,
    /// The peer has sent something to this socket: its address is not forged.
    pub verified: bool,
    /// The peer's port is closed (ICMP port unreachable): nobody is listening there.
    pub gone: Cell<bool>,
    /// When the transfer began.
    pub started: Instant,
    /// When the peer last made progress (or the transfer began).
    progress_at: Instant,
}

impl Link {
    /// A link to `peer` over `socket` (connected to it).
    pub fn new(socket: UdpSocket, peer: SocketAddr, timeout: Duration) -> Link {
        let now = Instant::now();
        Link {
            socket,
            peer,
            timeout,
            deadline: now,
            tries: 0,
            verified: false,
            gone: Cell::new(false),
            started: now,
            progress_at: now,
        }
    }

    /// Sends one packet to the peer. A full send buffer drops it, as the network might: the
    /// retransmission timer recovers it.
    pub fn send(&self, p: &[u8], counters: &mut Counters) {
        match self.socket.send_to(p, self.peer) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // An ICMP "port unreachable" for an earlier packet: nobody listens there.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => self.gone.set(true),
            Err(_) => counters.io_errors += 1,
        }
    }

    /// Sends several packets of `segment` bytes each (the last may be shorter) to the peer in
    /// as few calls as UDP generic segmentation offload (`UDP_SEGMENT`) allows: the kernel cuts
    /// them apart, so a window costs one trip through the stack's upper layers instead of one
    /// per packet (1.8× the throughput at 10 transfers, windowsize 16, on loopback). One call
    /// carries at most 64 segments and 64 KiB. Where GSO is refused (an old kernel), packets
    /// go one by one from then on.
    pub fn send_segments(&self, packets: &[&[u8]], segment: usize, counters: &mut Counters) {
        static NO_GSO: AtomicBool = AtomicBool::new(false);
        let per_call = (GSO_MAX_BYTES / segment.max(1)).clamp(1, GSO_MAX_SEGMENTS);
        let to = SockaddrStorage::from(self.peer);
        let size = u16::try_from(segment).unwrap_or(u16::MAX);
        for batch in packets.chunks(per_call) {
            if batch.len() > 1 && !NO_GSO.load(Ordering::Relaxed) {
                let iov: Vec<IoSlice<'_>> = batch.iter().map(|p| IoSlice::new(p)).collect();
                let cmsg = [ControlMessage::UdpGsoSegments(&size)];
                let fd = self.socket.as_raw_fd();
                match sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&to)) {
                    // A full buffer drops the batch, as the network might; the timer recovers.
                    Ok(_) | Err(Errno::EAGAIN) => continue,
                    Err(Errno::ECONNREFUSED) => {
                        self.gone.set(true);
                        return;
                    }
                    Err(Errno::EINVAL | Errno::EIO | Errno::ENOPROTOOPT) => {
                        NO_GSO.store(true, Ordering::Relaxed);
                    }
                    Err(_) => {} // one by one below
                }
            }
            for p in batch {
                self.send(p, counters);
            }
        }
    }

    /// The peer made progress: the retransmission clock starts again.
    pub fn progressed(&mut self, now: Instant) {
        self.tries = 0;
        self.progress_at = now;
        self.deadline = now + self.interval();
    }

    /// The wait before a retransmission: the default timeout until the peer has answered,
    /// then the negotiated one, never past the stall limit.
    fn interval(&self) -> Duration {
        if self.verified {
            self.timeout.min(MAX_STALL)
        } else {
            UNVERIFIED_INTERVAL
        }
    }

    /// Whether the peer's port was found closed: the transfer is over.
    pub fn is_gone(&self) -> bool {
        self.gone.get()
    }

    /// Sets a deadline `after` from now, but never past the stall limit.
    pub fn wait(&mut self, now: Instant, after: Duration) {
        self.deadline = (now + after).min(self.progress_at + MAX_STALL);
    }

    /// The deadline passed: whether one more retransmission is allowed. To a peer that never
    /// answered, none past the [`UNVERIFIED_SENDS`]th send. Otherwise each waits twice as
    /// long as the one before (up to 8 timeouts): a congested path gets room, and a client
    /// whose own timer every retransmission would otherwise reset (atftp ignores a window
    /// it already has and re-acknowledges only on its own timeout) gets to send its ACK.
    /// Nothing goes on past [`MAX_STALL`] without progress.
    pub fn retry(&mut self, now: Instant) -> bool {
        self.tries += 1;
        if !self.verified {
            self.wait(now, UNVERIFIED_INTERVAL);
            return self.tries < UNVERIFIED_SENDS;
        }
        let backoff = self.interval() * (1 << self.tries.min(MAX_BACKOFF.ilog2()));
        self.wait(now, backoff);
        self.tries <= MAX_RETRIES && now < self.progress_at + MAX_STALL
    }

    /// Receives the next datagram from the peer into `scratch`, returning its length.
    /// `None`: nothing more (or the peer is [`gone`](Link::gone)). The socket is connected:
    /// nobody else's datagrams arrive, and none is ever answered.
    pub fn recv(&mut self, scratch: &mut [u8], counters: &mut Counters) -> Option<usize> {
        loop {
            match self.socket.recv_from(scratch) {
                Ok((n, from)) if from == self.peer => {
                    self.verified = true;
                    return Some(n);
                }
                Ok(_) => {} // queued before the connect: dropped, unanswered
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.gone.set(true);
                    return None;
                }
                Err(_) => {
                    counters.io_errors += 1;
                    return None;
                }
            }
        }
    }
}
