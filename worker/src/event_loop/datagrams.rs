//! The shared UDP socket (echo's `--udp`, or a datagram service's only socket) and the
//! exchanges its datagrams begin (TFTP transfers), each on a socket of its own, driven by
//! readiness and by their own deadlines like the connections.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use protocol::stats::Counters;

use super::{DATAGRAMS_PER_TURN, EXCHANGE_BASE, Worker};
use crate::exchange::{
    Admit, EVICTION_LOOKS, Held, admit, answer_waiting, count_end, max_exchanges,
};
use crate::service::{Abort, DatagramAnswer, Exchange, Service, Step};

impl<S: Service> Worker<S> {
    /// Answers each waiting datagram as the service says, within what its source may draw
    /// (`echo::SourceLimit`, for a service that asks for it); an exchange one begins starts at
    /// once, so a flood of requests holds at most one exchange beyond the limit at a time. UDP
    /// promises no delivery: an answer that finds the send buffer full is dropped (and not
    /// counted as sent).
    pub(super) fn serve_datagrams(&mut self) {
        // Out of `self` for the turn, so a begun exchange can be started in the middle of it.
        let Some(udp) = self.udp.take() else { return };
        for _ in 0..DATAGRAMS_PER_TURN {
            match udp.recv_from(&mut self.scratch) {
                Ok((n, peer)) => {
                    self.counters.datagrams_in += 1;
                    let answer =
                        self.service
                            .answer_datagram(&self.scratch[..n], peer, self.udp_local);
                    let reply = match answer {
                        DatagramAnswer::Reply(reply)
                            if !self.service.limits_sources() || self.sources.allow(peer) =>
                        {
                            reply
                        }
                        // Over its source's share: how a loop between two servers ends.
                        DatagramAnswer::Reply(_) => {
                            self.counters.datagrams_refused += 1;
                            continue;
                        }
                        DatagramAnswer::Refuse => {
                            self.counters.datagrams_refused += 1;
                            continue;
                        }
                        DatagramAnswer::Ignore => continue,
                        DatagramAnswer::Begin(x) => {
                            self.start_exchange(x);
                            continue;
                        }
                    };
                    match udp.send_to(&reply, peer) {
                        Ok(_) => self.counters.datagrams_out += 1,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => self.counters.io_errors += 1,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.udp = Some(udp);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // An ICMP error from an earlier send (port unreachable): not fatal.
                Err(_) => self.counters.io_errors += 1,
            }
        }
        self.udp = Some(udp);
        self.udp_again = true;
    }

    /// Watches a new exchange's socket and lets it send its first packet. When the worker
    /// (or the request's source) is at its limit, the oldest exchange whose peer never
    /// answered makes way, silently; with none such the request is told "busy".
    fn start_exchange(&mut self, mut x: S::Exchange) {
        self.counters.transfers += 1;
        let mut looks = 0;
        let decision = loop {
            let held = self.exchanges.iter().map(|(key, x)| Held {
                key,
                source: x.peer().ip(),
                started: x.started(),
                verified: x.verified(),
            });
            let decision = admit(held, x.peer().ip(), max_exchanges(self.cfg.max_conns));
            let Admit::Evict(key) = decision else {
                break decision;
            };
            // A victim whose answer is queued but unread has answered: read it, look again.
            let waiting = self
                .exchanges
                .get(key)
                .is_some_and(|v| answer_waiting(v.socket().as_raw_fd()));
            if !waiting || looks == EVICTION_LOOKS {
                break decision;
            }
            looks += 1;
            self.on_exchange(key);
        };
        match decision {
            Admit::Yes => {}
            Admit::Evict(key) => {
                self.counters.closed_by_limit += 1;
                self.exchange_step(key, |x, c, _| x.abort(Abort::Evicted, c));
            }
            Admit::Busy => {
                self.counters.closed_by_limit += 1;
                let end = x.abort(Abort::Busy, &mut self.counters);
                count_end(end, &mut self.counters);
                return;
            }
        }
        let entry = self.exchanges.vacant_entry();
        let fd = x.socket().as_raw_fd();
        let token = Token(EXCHANGE_BASE + entry.key());
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            protocol::log!("cannot watch a new transfer: {e}");
            self.counters.io_errors += 1;
            // Told, and a partial upload removed, as when the worker is full.
            let end = x.abort(Abort::Busy, &mut self.counters);
            count_end(end, &mut self.counters);
            return;
        }
        let key = entry.key();
        entry.insert(x);
        self.exchange_step(key, |x, c, _| x.on_time(Instant::now(), c));
    }

    /// Runs one call into exchange `key`; ends it if the call did.
    pub(super) fn exchange_step(
        &mut self,
        key: usize,
        call: impl FnOnce(&mut S::Exchange, &mut Counters, &mut [u8]) -> Step,
    ) {
        let Some(x) = self.exchanges.get_mut(key) else {
            return; // a stale event for an exchange already ended this turn
        };
        let step = call(x, &mut self.counters, &mut self.scratch);
        if step != Step::Going {
            self.end_exchange(key, step);
        }
    }

    fn end_exchange(&mut self, key: usize, step: Step) {
        if let Some(x) = self.exchanges.try_remove(key) {
            let fd = x.socket().as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            count_end(step, &mut self.counters);
        }
    }

    pub(super) fn on_exchange(&mut self, key: usize) {
        self.exchange_step(key, |x, c, scratch| x.on_readable(scratch, c));
    }

    /// Retransmissions and ends that fell due.
    pub(super) fn exchanges_on_time(&mut self, now: Instant) {
        let due: Vec<usize> = self
            .exchanges
            .iter()
            .filter(|(_, x)| x.deadline() <= now)
            .map(|(k, _)| k)
            .collect();
        for key in due {
            self.exchange_step(key, |x, c, _| x.on_time(now, c));
        }
    }
}
