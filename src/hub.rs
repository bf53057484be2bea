//! The hub of the bus between a service's processes ([`protocol::bus`]): the master's end of
//! every worker's bus socket (fork-per-conn: of every child's). Whatever a member sends, the
//! hub stamps with the member's pid and queues for every other member, in arrival order; it
//! keeps the members' `State` frames so a member that joins later first hears who is there,
//! and when a member leaves (its socket ends, or it is reaped) it tells the others `Gone`.
//!
//! Why a hub in the master rather than a mesh between workers: the master alone knows who
//! exists (it spawns, reaps and reloads), so joining, leaving and generations need no protocol
//! of their own; a line crosses processes once per receiving worker either way. Its cost is
//! one hop and the master's CPU, measured in the README's "Chat" section.
//!
//! Claims: a member may claim an opaque token (a chat name) for one of its keys; the hub, which
//! alone sees every member, grants it unless another (member, key) holds it, and answers the
//! claimant alone. A member's tokens are released when it leaves (end of file, reaped, killed).
//!
//! Nothing here blocks, and memory is bounded: when a member falls more than [`HIGH`] bytes
//! behind, or all together more than [`TOTAL_HIGH`], the hub stops reading every member until
//! all are under [`LOW`] (and [`TOTAL_LOW`] together). A member may itself stop reading the
//! bus while its own clients catch up (chat's flow control); that only spreads back-pressure to
//! the senders' sockets and never deadlocks, since its clients drain without the hub.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};

use mio::{Interest, Registry, Token};
use protocol::bus::{Decoder, Frame, Outgoing};
use slab::Slab;

/// Bytes queued for one member above which the hub stops reading.
pub const HIGH: usize = 4 << 20;
/// ... and below which (for every member) it reads again.
pub const LOW: usize = 1 << 20;
/// Bytes queued for all members together above which the hub stops reading (a thousand
/// fork-per-conn children each [`HIGH`] behind would be gigabytes).
pub const TOTAL_HIGH: usize = 32 << 20;
/// ... and below which it reads again.
pub const TOTAL_LOW: usize = 8 << 20;
/// Tokens the hub may use, from its base up.
pub const SPAN: usize = 1 << 20;

/// One member process.
#[derive(Debug)]
struct Link {
    pid: u32,
    stream: mio::net::UnixStream,
    decoder: Decoder,
    /// Frames queued for it.
    out: Outgoing,
    /// Its `State` frames by key: what a later member is told first.
    state: BTreeMap<u64, Vec<u8>>,
}

impl Link {
    fn backlog(&self) -> usize {
        self.out.backlog()
    }

    /// Writes what it takes; `Err` when the member is gone.
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush(&mut self.stream)
    }
}

/// The hub: every member's link.
#[derive(Debug)]
pub struct Hub {
    links: Slab<Link>,
    base: usize,
    /// A member is more than [`HIGH`] behind: nobody is read until all are under [`LOW`].
    paused: bool,
    /// Claimed tokens and who holds each: (link, key).
    claims: HashMap<Vec<u8>, (usize, u64)>,
    /// The token each (link, key) holds.
    held: HashMap<(usize, u64), Vec<u8>>,
    buf: Vec<u8>,
}

impl Hub {
    /// A hub whose sockets use tokens from `base` up (to `base + SPAN`).
    pub fn new(base: usize) -> Hub {
        Hub {
            links: Slab::new(),
            base,
            paused: false,
            claims: HashMap::new(),
            held: HashMap::new(),
            buf: vec![0; 64 * 1024],
        }
    }

    /// Whether `token` is one of the hub's.
    pub fn owns(&self, token: Token) -> bool {
        (self.base..self.base + SPAN).contains(&token.0)
    }

    /// Members linked now.
    #[cfg(test)]
    pub fn members(&self) -> usize {
        self.links.len()
    }

    /// Links the member `pid` by `stream`; it is first told every other member's state.
    pub fn join(
        &mut self,
        registry: &Registry,
        pid: u32,
        stream: std::os::unix::net::UnixStream,
    ) -> io::Result<()> {
        if self.links.len() >= SPAN {
            return Err(io::Error::other("too many bus members"));
        }
        stream.set_nonblocking(true)?;
        let mut stream = mio::net::UnixStream::from_std(stream);
        let mut out = Outgoing::default();
        for (_, other) in &self.links {
            for (&key, body) in &other.state {
                out.push(Frame::State {
                    origin: other.pid,
                    key,
                    body,
                });
            }
        }
        let entry = self.links.vacant_entry();
        registry.register(
            &mut stream,
            Token(self.base + entry.key()),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        entry.insert(Link {
            pid,
            stream,
            decoder: Decoder::default(),
            out,
            state: BTreeMap::new(),
        });
        Ok(())
    }

    /// The member `pid` exited: what it sent last is passed on, then it is dropped.
    pub fn leave(&mut self, registry: &Registry, pid: u32) {
        if let Some(key) = self
            .links
            .iter()
            .find(|(_, l)| l.pid == pid)
            .map(|(k, _)| k)
        {
            let _ = self.read(key);
            self.drop_link(registry, key);
            self.flush_all(registry);
        }
    }

    /// A member's socket is ready: write what it is owed, read what it sent, pass it on.
    pub fn ready(&mut self, registry: &Registry, token: Token) {
        let key = token.0 - self.base;
        if !self.links.contains(key) {
            return;
        }
        let gone = self.links[key].flush().is_err() || (!self.paused && self.read(key).is_err());
        if gone {
            self.drop_link(registry, key);
        }
        self.flush_all(registry);
    }

    /// Reads member `key` until it has nothing more or the hub pauses; `Err`: it is gone.
    fn read(&mut self, key: usize) -> io::Result<()> {
        loop {
            if self.paused {
                return Ok(());
            }
            let link = &mut self.links[key];
            match link.stream.read(&mut self.buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => link.decoder.push(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
            self.route(key)?;
        }
    }

    /// Passes on every whole frame member `key` sent.
    fn route(&mut self, key: usize) -> io::Result<()> {
        let mut decoder = std::mem::take(&mut self.links[key].decoder);
        let pid = self.links[key].pid;
        let routed = (|| {
            while let Some(frame) = decoder.next_frame().map_err(io::Error::other)? {
                match frame {
                    // Only the hub says who left.
                    Frame::Gone { .. } => continue,
                    Frame::State { key: k, body, .. } => {
                        let state = &mut self.links[key].state;
                        if body.is_empty() {
                            state.remove(&k);
                        } else {
                            state.insert(k, body.to_vec());
                        }
                    }
                    Frame::Cast { .. } => {}
                    Frame::Claim { key: k, body, .. } => {
                        self.claim(key, k, body);
                        continue;
                    }
                    // Only the hub answers claims.
                    Frame::Granted { .. } | Frame::Refused { .. } => continue,
                }
                self.cast(Some(key), frame.from(pid));
            }
            Ok(())
        })();
        self.links[key].decoder = decoder;
        routed
    }

    /// Member `link`'s key `key` claims `token` (empty: releases its own); the claimant
    /// alone is answered.
    fn claim(&mut self, link: usize, key: u64, token: &[u8]) {
        if token.is_empty() {
            if let Some(old) = self.held.remove(&(link, key)) {
                self.claims.remove(&old);
            }
            return;
        }
        let granted = match self.claims.get(token) {
            Some(&holder) => holder == (link, key),
            None => {
                if let Some(old) = self.held.insert((link, key), token.to_vec()) {
                    self.claims.remove(&old);
                }
                self.claims.insert(token.to_vec(), (link, key));
                true
            }
        };
        let answer = if granted {
            Frame::Granted {
                origin: 0,
                key,
                body: token,
            }
        } else {
            Frame::Refused {
                origin: 0,
                key,
                body: token,
            }
        };
        let out = &mut self.links[link].out;
        out.push(answer);
        self.paused |= out.backlog() > HIGH;
    }

    /// Queues `frame` for every member but `except`.
    fn cast(&mut self, except: Option<usize>, frame: Frame<'_>) {
        let mut total = 0;
        for (k, link) in self.links.iter_mut() {
            if Some(k) != except {
                link.out.push(frame);
                self.paused |= link.backlog() > HIGH;
            }
            total += link.backlog();
        }
        self.paused |= total > TOTAL_HIGH;
    }

    fn drop_link(&mut self, registry: &Registry, key: usize) {
        if let Some(mut link) = self.links.try_remove(key) {
            let _ = registry.deregister(&mut link.stream);
            // Its tokens are free again (a crashed worker's names included).
            self.held.retain(|&(l, _), _| l != key);
            self.claims.retain(|_, &mut (l, _)| l != key);
            self.cast(None, Frame::Gone { origin: link.pid });
        }
    }

    /// Writes to every member what it takes; lifts a pause once everyone has caught up, and
    /// then reads everyone (their sockets will not announce what waited meanwhile).
    fn flush_all(&mut self, registry: &Registry) {
        loop {
            let broken: Vec<usize> = self
                .links
                .iter_mut()
                .filter_map(|(k, l)| l.flush().is_err().then_some(k))
                .collect();
            for key in broken {
                self.drop_link(registry, key);
            }
            if !self.paused
                || self.links.iter().any(|(_, l)| l.backlog() >= LOW)
                || self.links.iter().map(|(_, l)| l.backlog()).sum::<usize>() >= TOTAL_LOW
            {
                return;
            }
            self.paused = false;
            let keys: Vec<usize> = self.links.iter().map(|(k, _)| k).collect();
            for key in keys {
                if self.links.contains(key) && self.read(key).is_err() {
                    self.drop_link(registry, key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// Reads frames from a member's end until `n` have come (bounded wait).
    fn frames(end: &mut UnixStream, hub: &mut Hub, poll: &mut mio::Poll, n: usize) -> Vec<String> {
        end.set_nonblocking(true).unwrap();
        let mut d = Decoder::default();
        let mut got = Vec::new();
        let mut events = mio::Events::with_capacity(16);
        let until = Instant::now() + Duration::from_secs(10);
        while got.len() < n && Instant::now() < until {
            poll.poll(&mut events, Some(Duration::from_millis(10)))
                .unwrap();
            for e in events.iter() {
                hub.ready(poll.registry(), e.token());
            }
            let mut buf = [0u8; 4096];
            while let Ok(k @ 1..) = end.read(&mut buf) {
                d.push(&buf[..k]);
            }
            while let Some(f) = d.next_frame().unwrap() {
                got.push(format!("{f:?}"));
            }
        }
        got
    }

    fn send(end: &mut UnixStream, f: Frame<'_>) {
        let mut v = Vec::new();
        f.encode(&mut v);
        end.write_all(&v).unwrap();
    }

    #[test]
    fn frames_reach_every_other_member_stamped_and_late_members_hear_the_state() {
        let mut poll = mio::Poll::new().unwrap();
        let mut hub = Hub::new(100);
        let (a_hub, mut a) = UnixStream::pair().unwrap();
        let (b_hub, mut b) = UnixStream::pair().unwrap();
        hub.join(poll.registry(), 11, a_hub).unwrap();
        hub.join(poll.registry(), 22, b_hub).unwrap();
        send(
            &mut a,
            Frame::State {
                origin: 999,
                key: 1,
                body: b"ann",
            },
        );
        send(
            &mut a,
            Frame::Cast {
                origin: 999,
                body: b"ann: hi\n",
            },
        );
        send(&mut a, Frame::Gone { origin: 22 });
        let got = frames(&mut b, &mut hub, &mut poll, 2);
        assert_eq!(
            got,
            [
                format!(
                    "{:?}",
                    Frame::State {
                        origin: 11,
                        key: 1,
                        body: b"ann"
                    }
                ),
                format!(
                    "{:?}",
                    Frame::Cast {
                        origin: 11,
                        body: b"ann: hi\n"
                    }
                ),
            ]
        );
        // A later member hears who is there; the sender never hears itself.
        let (c_hub, mut c) = UnixStream::pair().unwrap();
        hub.join(poll.registry(), 33, c_hub).unwrap();
        let got = frames(&mut c, &mut hub, &mut poll, 1);
        assert_eq!(
            got,
            [format!(
                "{:?}",
                Frame::State {
                    origin: 11,
                    key: 1,
                    body: b"ann"
                }
            )]
        );
        a.set_nonblocking(true).unwrap();
        assert!(
            a.read(&mut [0u8; 64]).is_err(),
            "the sender got its own frames back"
        );
        // A member that goes: the others are told, and its state is forgotten.
        drop(a);
        let got = frames(&mut b, &mut hub, &mut poll, 1);
        assert_eq!(got, [format!("{:?}", Frame::Gone { origin: 11 })]);
        let (d_hub, mut d) = UnixStream::pair().unwrap();
        hub.join(poll.registry(), 44, d_hub).unwrap();
        d.set_nonblocking(true).unwrap();
        assert!(
            d.read(&mut [0u8; 64]).is_err(),
            "a gone member's state was kept"
        );
        assert_eq!(hub.members(), 3);
    }

    #[test]
    fn a_member_that_does_not_read_pauses_the_hub_instead_of_growing_it() {
        let mut poll = mio::Poll::new().unwrap();
        let mut hub = Hub::new(0);
        let (a_hub, mut a) = UnixStream::pair().unwrap();
        let (b_hub, b) = UnixStream::pair().unwrap();
        hub.join(poll.registry(), 1, a_hub).unwrap();
        hub.join(poll.registry(), 2, b_hub).unwrap();
        a.set_nonblocking(true).unwrap();
        let body = vec![b'x'; 60_000];
        let mut wire = Vec::new();
        Frame::Cast {
            origin: 0,
            body: &body,
        }
        .encode(&mut wire);
        let mut events = mio::Events::with_capacity(16);
        // Offer far more than HIGH while b never reads.
        let (mut stream, mut written, mut offered) = (Vec::new(), 0usize, 0usize);
        for _ in 0..2000 {
            if stream.len() - written < wire.len() {
                stream.extend_from_slice(&wire);
                offered += wire.len();
            }
            while let Ok(n @ 1..) = a.write(&stream[written..]) {
                written += n;
            }
            poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
            for e in events.iter() {
                hub.ready(poll.registry(), e.token());
            }
        }
        let queued: usize = hub.links.iter().map(|(_, l)| l.backlog()).sum();
        assert!(hub.paused, "the hub never paused");
        assert!(
            queued <= HIGH + 2 * 64 * 1024 + wire.len(),
            "queued {queued}"
        );
        assert!(written < offered, "a's sends were never held back");
        drop(b);
    }

    fn claim(end: &mut UnixStream, key: u64, name: &'static [u8]) {
        send(
            end,
            Frame::Claim {
                origin: 0,
                key,
                body: name,
            },
        );
    }

    #[test]
    fn a_token_is_granted_to_one_key_until_released_or_its_member_is_gone() {
        let mut poll = mio::Poll::new().unwrap();
        let mut hub = Hub::new(0);
        let (a_hub, mut a) = UnixStream::pair().unwrap();
        let (b_hub, mut b) = UnixStream::pair().unwrap();
        hub.join(poll.registry(), 1, a_hub).unwrap();
        hub.join(poll.registry(), 2, b_hub).unwrap();
        let granted = |key, body| {
            format!(
                "{:?}",
                Frame::Granted {
                    origin: 0,
                    key,
                    body
                }
            )
        };
        let refused = |key, body| {
            format!(
                "{:?}",
                Frame::Refused {
                    origin: 0,
                    key,
                    body
                }
            )
        };
        claim(&mut a, 1, b"ann");
        assert_eq!(
            frames(&mut a, &mut hub, &mut poll, 1),
            [granted(1, &b"ann"[..])]
        );
        claim(&mut b, 1, b"ann");
        claim(&mut b, 2, b"bob");
        assert_eq!(
            frames(&mut b, &mut hub, &mut poll, 2),
            [refused(1, &b"ann"[..]), granted(2, &b"bob"[..])]
        );
        // A new claim by the same key frees its old token; an empty one frees it too.
        claim(&mut a, 1, b"ann2");
        assert_eq!(
            frames(&mut a, &mut hub, &mut poll, 1),
            [granted(1, &b"ann2"[..])]
        );
        claim(&mut b, 1, b"ann");
        claim(&mut b, 2, b"");
        assert_eq!(
            frames(&mut b, &mut hub, &mut poll, 1),
            [granted(1, &b"ann"[..])]
        );
        claim(&mut a, 1, b"bob");
        assert_eq!(
            frames(&mut a, &mut hub, &mut poll, 1),
            [granted(1, &b"bob"[..])]
        );
        // A member that goes releases what it held.
        drop(b);
        assert_eq!(
            frames(&mut a, &mut hub, &mut poll, 1),
            [format!("{:?}", Frame::Gone { origin: 2 })]
        );
        claim(&mut a, 9, b"ann");
        assert_eq!(
            frames(&mut a, &mut hub, &mut poll, 1),
            [granted(9, &b"ann"[..])]
        );
    }
}
