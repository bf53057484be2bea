//! Connections that owe a PROXY protocol header (`--proxy-protocol`) before they become
//! sessions. The header is peeked, then consumed to its exact length, so the service gets
//! precisely the client's bytes; one still incomplete waits here, watched under its own
//! tokens, until it completes or its deadline passes.

use std::io::{self, Read};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Token};

use super::Worker;
use crate::proxy::{self, MAX_HEADER, Refusal};
use crate::service::Service;

/// Tokens from here up are connections still owing their PROXY header.
pub(super) const PENDING_BASE: usize = usize::MAX / 2;

/// A connection whose PROXY header is not complete yet.
#[derive(Debug)]
pub(super) struct Pending {
    stream: TcpStream,
    deadline: Instant,
}

/// What reading a header gave.
enum Outcome {
    /// Complete and consumed.
    Done,
    /// More bytes are needed.
    Wait,
    /// Refused (missing, malformed, too long, the peer closed), and why.
    Refused(Refusal),
}

impl<S: Service> Worker<S> {
    /// A new connection in `--proxy-protocol` mode: from an allowed peer, its header read (now
    /// or later) before it becomes a session.
    pub(super) fn await_header(&mut self, mut stream: TcpStream) {
        let Some(rule) = &self.proxy else { return };
        let allowed = stream.peer_addr().is_ok_and(|p| rule.from.contains(p.ip()));
        if !allowed {
            refused(&stream, &Refusal::NotAllowed);
            self.counters.proxy_errors += 1;
            return;
        }
        match take_header(&stream) {
            Outcome::Done => self.start_session(stream),
            Outcome::Refused(why) => {
                refused(&stream, &why);
                self.counters.proxy_errors += 1;
            }
            Outcome::Wait => {
                let deadline = Instant::now() + rule.timeout;
                let entry = self.pending.vacant_entry();
                let token = Token(PENDING_BASE + entry.key());
                if self
                    .poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE)
                    .is_err()
                {
                    self.counters.io_errors += 1;
                    return;
                }
                entry.insert(Pending { stream, deadline });
            }
        }
    }

    /// More bytes arrived on a connection owing its header.
    pub(super) fn on_pending(&mut self, key: usize) {
        let Some(p) = self.pending.get(key) else {
            return;
        };
        let outcome = take_header(&p.stream);
        if matches!(outcome, Outcome::Wait) {
            return;
        }
        let mut p = self.pending.remove(key);
        let _ = self.poll.registry().deregister(&mut p.stream);
        match outcome {
            Outcome::Done => self.start_session(p.stream),
            Outcome::Refused(why) => {
                refused(&p.stream, &why);
                self.counters.proxy_errors += 1;
            }
            Outcome::Wait => {}
        }
    }

    /// Closes connections whose header did not arrive in time.
    pub(super) fn expire_pending(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            let mut p = self.pending.remove(key);
            let _ = self.poll.registry().deregister(&mut p.stream);
            refused(&p.stream, &Refusal::Late);
            self.counters.proxy_errors += 1;
        }
    }

    /// The earliest header deadline.
    pub(super) fn next_pending_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|(_, p)| p.deadline).min()
    }
}

/// Peeks at the start of `stream` and, if a whole header is there, consumes exactly it.
fn take_header(stream: &TcpStream) -> Outcome {
    let mut buf = [0u8; MAX_HEADER];
    let n = match stream.peek(&mut buf) {
        Ok(0) => return Outcome::Refused(Refusal::Closed),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Wait,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Outcome::Wait,
        Err(_) => return Outcome::Refused(Refusal::Closed),
    };
    match proxy::parse(&buf[..n]) {
        Ok(Some(h)) => {
            // The peek saw these bytes: reading them cannot block.
            let mut sink = [0u8; MAX_HEADER];
            let mut reader = stream;
            if reader.read_exact(&mut sink[..h.len]).is_err() {
                return Outcome::Refused(Refusal::Closed);
            }
            if let (Some(client), Ok(peer)) = (h.source, stream.peer_addr()) {
                protocol::facade::debug!("connection from {client} (via {peer})");
            }
            Outcome::Done
        }
        Ok(None) if n < MAX_HEADER => Outcome::Wait,
        Ok(None) => Outcome::Refused(Refusal::Bad(proxy::ProxyError::TooLong)),
        Err(e) => Outcome::Refused(Refusal::Bad(e)),
    }
}

/// Logs (rate-limited) why a connection is closed before its service saw it.
fn refused(stream: &TcpStream, why: &Refusal) {
    if let Ok(peer) = stream.peer_addr() {
        proxy::log_refused(peer, why);
    }
}
