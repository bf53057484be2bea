//! A transfer's own socket and its retransmission clock: what sending and receiving share.
//! The socket's port is the server's transfer ID (RFC 1350); it is not `connect`ed, so a
//! datagram from anyone else still arrives and is told "unknown transfer ID" (ERROR 5)
//! instead of disturbing the transfer.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use protocol::stats::Counters;

use super::packet::{self, Code};

/// Retransmissions of one packet before the transfer is given up.
pub const MAX_RETRIES: u32 = 5;
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
}

impl Link {
    /// A link to `peer` over `socket`.
    pub fn new(socket: UdpSocket, peer: SocketAddr, timeout: Duration) -> Link {
        Link {
            socket,
            peer,
            timeout,
            deadline: Instant::now(),
            tries: 0,
        }
    }

    /// Sends one packet to the peer. A full send buffer drops it, as the network might: the
    /// retransmission timer recovers it.
    pub fn send(&self, p: &[u8], counters: &mut Counters) {
        match self.socket.send_to(p, self.peer) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => counters.io_errors += 1,
        }
    }

    /// The peer made progress: the retransmission clock starts again.
    pub fn progressed(&mut self, now: Instant) {
        self.tries = 0;
        self.deadline = now + self.timeout;
    }

    /// The deadline passed: whether one more retransmission is allowed. Each waits twice as
    /// long as the one before (up to 8 timeouts): a congested path gets room, and a client
    /// whose own timer every retransmission would otherwise reset (atftp ignores a window
    /// it already has and re-acknowledges only on its own timeout) gets to send its ACK.
    pub fn retry(&mut self, now: Instant) -> bool {
        self.tries += 1;
        self.deadline = now + self.timeout * (1 << self.tries.min(MAX_BACKOFF.ilog2()));
        self.tries <= MAX_RETRIES
    }

    /// Receives the next datagram from the peer into `scratch`, returning its length; a
    /// datagram from anyone else is answered with ERROR 5 and skipped. `None`: nothing more.
    pub fn recv(&self, scratch: &mut [u8], counters: &mut Counters) -> Option<usize> {
        loop {
            match self.socket.recv_from(scratch) {
                Ok((n, from)) if from == self.peer => return Some(n),
                Ok((_, from)) => {
                    let e = packet::error(Code::UnknownTid, "unknown transfer ID");
                    let _ = self.socket.send_to(&e, from);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(_) => {
                    counters.io_errors += 1;
                    return None;
                }
            }
        }
    }
}
