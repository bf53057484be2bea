//! A worker's connections: taking an accepted one on (limits, PROXY header, session), driving
//! sessions on readiness or when their room wakes them, closing idle and finished ones.

use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};
use nix::sys::socket::sockopt;

use super::{FIRST_CONN, Stop, WOKEN_ROUNDS, Worker};
use crate::service::{Drive, Room, Service, Session};

impl<S: Service> Worker<S> {
    /// Drives the sessions the room gave work (lines from other clients), a few rounds, as
    /// those may give others work in turn; the rest wait for the next turn. Then settles the
    /// room: its bus gets what is owed, the counters what it counted.
    pub(super) fn serve_woken(&mut self) -> Option<Stop> {
        let mut woken = std::mem::take(&mut self.woken);
        for _ in 0..WOKEN_ROUNDS {
            self.room.woken(&mut woken);
            if woken.is_empty() {
                break;
            }
            for key in woken.drain(..) {
                self.drive(key);
            }
        }
        self.room.woken(&mut self.again);
        self.woken = woken;
        self.room
            .settle(&mut self.counters)
            .err()
            .map(|_| Stop::Now("the bus is gone"))
    }

    /// How often to look for idle connections: a quarter of the timeout, at least every
    /// 100 ms and at most every second, so one is closed within 25% of its timeout.
    pub(super) fn idle_sweep_every(&self) -> Option<Duration> {
        self.cfg
            .idle()
            .map(|t| (t / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)))
    }

    pub(super) fn close_idle(&mut self, now: Instant) {
        let Some(limit) = self.cfg.idle() else { return };
        if let Some(ring) = self.ring.as_mut() {
            ring.close_idle(now, limit, &mut self.counters);
        }
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_active()) >= limit && c.owed() == 0)
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.counters.closed_by_limit += 1;
            self.close(key);
        }
    }

    pub(super) fn add_connection(&mut self, stream: TcpStream) {
        self.counters.accepted += 1;
        if self.cfg.max_conns > 0 && self.open_connections() as u64 >= self.cfg.max_conns {
            // At the limit: reset at once (SO_LINGER 0 makes close send RST), so the client
            // learns promptly instead of waiting in the backlog for a slot.
            let _ = nix::sys::socket::setsockopt(
                &stream,
                sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
            self.counters.closed_by_limit += 1;
            return;
        }
        // Echo is request/response shaped: don't let Nagle hold back a small reply.
        let _ = stream.set_nodelay(true);
        if self.proxy.is_some() {
            self.await_header(stream);
        } else {
            self.start_session(stream);
        }
    }

    /// Makes an accepted connection (its PROXY header, if any, consumed) a service session.
    pub(super) fn start_session(&mut self, mut stream: TcpStream) {
        if let Some(ring) = self.ring.as_mut() {
            ring.adopt(stream, &mut self.counters);
            return;
        }
        let entry = self.conns.vacant_entry();
        let token = Token(entry.key() + FIRST_CONN);
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            protocol::log!("cannot watch a new connection: {e}");
            self.counters.io_errors += 1;
            return;
        }
        let key = entry.key();
        entry.insert(self.service.session(stream, &mut self.room, key));
        self.counters.active += 1;
    }

    pub(super) fn on_connection_event(&mut self, key: usize, event: &mio::event::Event) {
        let Some(conn) = self.conns.get_mut(key) else {
            return; // a stale event for a connection already closed this turn
        };
        if event.is_read_closed() {
            conn.note_peer_closed();
        }
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        if readable {
            conn.note_readable();
        }
        // On loopback every echo's ACK makes a writable edge; with nothing owed there is
        // nothing to do, and reading would only hear EAGAIN.
        if !readable && conn.owed() == 0 {
            return;
        }
        self.drive(key);
    }

    pub(super) fn drive(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return; // a stale event for a connection already closed this turn
        };
        match conn.drive(&mut self.scratch, &mut self.counters) {
            Ok(Drive::Waiting) => {}
            Ok(Drive::Yielded) => self.again.push(key),
            Ok(Drive::Finished) => self.close(key),
            Err(_) => {
                // Reset, broken pipe, ...: the client is gone. Counted, never fatal.
                self.counters.io_errors += 1;
                self.close(key);
            }
        }
    }

    pub(super) fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            let _ = self.poll.registry().deregister(conn.stream_mut());
            self.counters.active -= 1;
        }
    }
}
