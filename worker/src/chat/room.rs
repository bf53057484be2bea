//! The clients one worker holds (process mode), or the one client of a fork-per-conn child,
//! and their end of the bus to everyone else.
//!
//! A line said here is queued at once for every local client and appended once to the bus;
//! the hub passes it to every other process, whose room queues it for its own clients. Who is
//! where travels as bus `State` (client serial → name), so `/who` counts everyone; a name is
//! `Claim`ed from the hub, which grants it to one client server-wide.
//!
//! Nothing in here blocks. Flow control ([`super::flow`]): while a local client that reads is
//! behind, the room holds its senders (sessions stop reading their clients, and the room
//! stops reading the bus, so the hub and then the other workers hold theirs); when more than
//! [`BUS_HIGH`] bytes wait for the bus, sessions stop reading until it drains below
//! [`BUS_LOW`]. Only a client that stops reading is dropped, by the soft or hard limit.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use protocol::bus::{Decoder, Frame, Outgoing};
use protocol::stats::Counters;

use super::flow::{Bucket, Overrun, Standing};
use super::roster::Roster;
use super::{Floor, Limits, Outbox, in_use, joined, left, renamed, welcome};
use crate::service::Room;

mod bus;

/// Bus bytes waiting to be sent above which sessions stop reading their clients.
pub const BUS_HIGH: usize = 1 << 20;
/// ... and below which they start again.
pub const BUS_LOW: usize = 256 << 10;

/// A local client.
#[derive(Debug)]
struct Member {
    /// Its key on the bus: never reused, unlike the loop's keys.
    serial: u64,
    name: String,
    /// It holds a name it claimed (released when it leaves).
    claimed: bool,
    outbox: Outbox,
    standing: Standing,
    /// Fell too far behind: its session tells it why and ends it.
    kicked: Option<Overrun>,
    /// A `/nick` waiting for the hub's answer: its input waits too.
    claim: Option<String>,
    /// In the room's `paused` list.
    paused: bool,
    /// In the room's `behind` map.
    listed_behind: bool,
    /// Its allowance of lines (`--chat-rate`).
    bucket: Bucket,
}

/// The process-mode room, shared by a worker's sessions (one thread, so `Rc<RefCell>`).
#[derive(Debug, Clone)]
pub struct ChatRoom(pub(crate) Rc<RefCell<LocalRoom>>);

impl ChatRoom {
    /// A room bounded by `limits`, on `bus` if given.
    pub fn new(limits: Limits, bus: Option<std::os::unix::net::UnixStream>) -> ChatRoom {
        let bus = bus.and_then(|b| {
            b.set_nonblocking(true).ok()?;
            Some(BusLink {
                stream: mio::net::UnixStream::from_std(b),
                decoder: Decoder::default(),
                out: Outgoing::default(),
            })
        });
        ChatRoom(Rc::new(RefCell::new(LocalRoom {
            members: HashMap::new(),
            by_serial: HashMap::new(),
            remote: HashMap::new(),
            roster: Roster::default(),
            bus,
            woken: Vec::new(),
            paused: Vec::new(),
            rate_paused: BinaryHeap::new(),
            behind: HashMap::new(),
            hold_until: None,
            bus_gate: false,
            bus_unread: false,
            bus_error: None,
            tally: Counters::default(),
            limits,
            guest_prefix: format!("guest{}-", std::process::id()),
            next_serial: 0,
            buf: vec![0; 64 * 1024],
        })))
    }
}

impl Room for ChatRoom {
    fn watch(&mut self, registry: &mio::Registry, token: mio::Token) -> io::Result<()> {
        match self.0.borrow_mut().bus.as_mut() {
            Some(bus) => registry.register(
                &mut bus.stream,
                token,
                mio::Interest::READABLE | mio::Interest::WRITABLE,
            ),
            None => Ok(()),
        }
    }

    fn on_bus(&mut self) -> io::Result<()> {
        let mut room = self.0.borrow_mut();
        room.flush_bus()?;
        room.read_bus()
    }

    fn woken(&mut self, into: &mut Vec<usize>) {
        let mut room = self.0.borrow_mut();
        let now = Instant::now();
        room.release(now);
        room.release_rated(now);
        if room.bus_unread && !room.holding(now) {
            room.bus_unread = false;
            if let Err(e) = room.read_bus() {
                room.bus_error = Some(e);
            }
        }
        into.append(&mut room.woken);
    }

    fn settle(&mut self, counters: &mut Counters) -> io::Result<()> {
        let mut room = self.0.borrow_mut();
        counters.add(&std::mem::take(&mut room.tally));
        if let Some(e) = room.bus_error.take() {
            return Err(e);
        }
        room.flush_bus()
    }

    fn deadline(&self) -> Option<Instant> {
        let room = self.0.borrow();
        let waiting = !room.paused.is_empty() || room.bus_unread;
        let rated = room.rate_paused.peek().map(|Reverse((at, _))| *at);
        [room.hold_until.filter(|_| waiting), rated]
            .into_iter()
            .flatten()
            .min()
    }
}

/// The bus, seen from a member.
#[derive(Debug)]
struct BusLink {
    stream: mio::net::UnixStream,
    decoder: Decoder,
    /// Frames not yet sent.
    out: Outgoing,
}

/// What a worker's (or fork-per-conn child's) clients share.
#[derive(Debug)]
pub struct LocalRoom {
    members: HashMap<u64, Member>,
    /// Bus serial → local key, for the hub's answers.
    by_serial: HashMap<u64, u64>,
    /// Clients of the other processes: (pid, serial) → name.
    remote: HashMap<(u32, u64), String>,
    /// Everyone's names, for `/who`.
    roster: Roster,
    bus: Option<BusLink>,
    /// Sessions with new output or a lifted pause, for the loop to drive.
    woken: Vec<usize>,
    /// Sessions that stopped reading while senders were held or the bus was full.
    paused: Vec<usize>,
    /// Sessions past their `--chat-rate`, and when each may go on.
    rate_paused: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Members over the mark, and until when each holds the senders.
    behind: HashMap<u64, Instant>,
    /// The latest of those: senders wait until then, or until nobody is behind.
    hold_until: Option<Instant>,
    /// More than [`BUS_HIGH`] waited for the bus; lifted under [`BUS_LOW`].
    bus_gate: bool,
    /// The bus was left unread while senders were held.
    bus_unread: bool,
    /// The bus failed where no error could be returned; `settle` returns it.
    bus_error: Option<io::Error>,
    /// Counted since the loop last settled.
    tally: Counters,
    limits: Limits,
    guest_prefix: String,
    next_serial: u64,
    buf: Vec<u8>,
}

impl LocalRoom {
    /// Adds the client `me` under a guest name; greets it and tells everyone.
    pub fn join(&mut self, me: u64) {
        self.next_serial += 1;
        let serial = self.next_serial;
        let name = format!("{}{}", self.guest_prefix, serial);
        self.members.insert(
            me,
            Member {
                serial,
                name: name.clone(),
                claimed: false,
                outbox: Outbox::default(),
                standing: Standing::default(),
                kicked: None,
                claim: None,
                paused: false,
                listed_behind: false,
                bucket: Bucket::default(),
            },
        );
        self.by_serial.insert(serial, me);
        self.roster.add(&name);
        self.tell(me, welcome(&name));
        self.broadcast(Some(me), joined(&name));
        self.publish_state(serial, name.as_bytes());
    }

    /// Removes the client `me` (gone, for whatever reason) and tells everyone.
    pub fn leave(&mut self, me: u64) {
        let Some(m) = self.members.remove(&me) else {
            return;
        };
        self.by_serial.remove(&m.serial);
        self.paused.retain(|&k| k as u64 != me);
        self.roster.remove(&m.name);
        if self.behind.remove(&me).is_some() {
            self.hold_until = self.behind.values().max().copied();
        }
        self.broadcast(None, left(&m.name));
        self.publish_state(m.serial, b"");
        if m.claimed || m.claim.is_some() {
            self.publish_claim(m.serial, b"");
        }
        self.release(Instant::now());
    }

    /// Why `me` must go, if it fell too far behind.
    pub fn kicked(&self, me: u64) -> Option<Overrun> {
        self.members.get(&me).and_then(|m| m.kicked)
    }

    /// The limits (for the notice a kicked client gets).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What `me` is owed.
    pub fn outbox(&mut self, me: u64) -> Option<&mut Outbox> {
        self.members.get_mut(&me).map(|m| &mut m.outbox)
    }

    /// `me`'s socket took bytes: it may have caught up.
    pub fn wrote(&mut self, me: u64) {
        let now = Instant::now();
        if let Some(m) = self.members.get_mut(&me) {
            m.standing.progressed(now);
        }
        self.restand(me, now);
        self.release(now);
    }

    /// Whether `me` may have its next line read now. When not, it is woken once it may (a
    /// client behind on its own is driven again by its socket's writable edges).
    pub fn admit(&mut self, me: u64) -> bool {
        let now = Instant::now();
        let bus_full = self.bus_full();
        let holding = self.holding(now);
        let Some(m) = self.members.get_mut(&me) else {
            return false;
        };
        if m.kicked.is_some() || m.claim.is_some() || m.standing.behind() {
            return false;
        }
        if bus_full || holding {
            if !m.paused {
                m.paused = true;
                self.paused.push(me as usize);
            }
            return false;
        }
        if let Some(rate) = &self.limits.rate {
            if let Err(at) = m.bucket.ready(now, rate) {
                if !m.paused {
                    m.paused = true;
                    self.rate_paused.push(Reverse((at, me as usize)));
                }
                return false;
            }
        }
        true
    }

    /// Wakes the sessions whose `--chat-rate` allows a line again.
    fn release_rated(&mut self, now: Instant) {
        while let Some(&Reverse((at, key))) = self.rate_paused.peek() {
            if at > now {
                return;
            }
            self.rate_paused.pop();
            if let Some(m) = self.members.get_mut(&(key as u64)) {
                m.paused = false;
                self.woken.push(key);
            }
        }
    }

    /// Too much waits for the bus: sessions should stop reading their clients.
    fn bus_full(&mut self) -> bool {
        if let Some(bus) = &self.bus {
            self.bus_gate |= bus.out.backlog() > BUS_HIGH;
        }
        self.bus_gate
    }

    /// A client that reads is behind: senders wait.
    fn holding(&self, now: Instant) -> bool {
        self.hold_until.is_some_and(|t| now < t)
    }

    /// Wakes the paused sessions if nothing holds them any longer.
    fn release(&mut self, now: Instant) {
        if self.paused.is_empty() || self.holding(now) || self.bus_full() {
            return;
        }
        for key in self.paused.drain(..) {
            if let Some(m) = self.members.get_mut(&(key as u64)) {
                m.paused = false;
                self.woken.push(key);
            }
        }
    }

    /// Counts a line read from `me` (against its `--chat-rate` too).
    pub fn count_line(&mut self, me: u64) {
        self.tally.chat_lines += 1;
        if let (Some(rate), Some(m)) = (&self.limits.rate, self.members.get_mut(&me)) {
            m.bucket.take(Instant::now(), rate);
        }
    }

    /// Weighs `me`'s queue against the limits: it may now be behind, caught up, or dropped.
    fn restand(&mut self, me: u64, now: Instant) {
        let Some(m) = self.members.get_mut(&me) else {
            return;
        };
        if m.kicked.is_some() {
            return;
        }
        let verdict = m.standing.update(m.outbox.owed(), now, &self.limits);
        let holds = m.standing.holds_until(&self.limits);
        match verdict {
            Err(why) => self.kick(me, why),
            Ok(()) => match (holds, m.listed_behind) {
                // Newly behind, or its window moved on as it read.
                (Some(until), listed) if !listed || self.behind.get(&me) != Some(&until) => {
                    m.listed_behind = true;
                    self.behind.insert(me, until);
                    self.hold_until = self.behind.values().max().copied();
                }
                (None, true) => {
                    m.listed_behind = false;
                    self.behind.remove(&me);
                    self.hold_until = self.behind.values().max().copied();
                }
                _ => {}
            },
        }
    }

    fn kick(&mut self, me: u64, why: Overrun) {
        if let Some(m) = self.members.get_mut(&me) {
            m.kicked = Some(why);
            m.listed_behind = false;
            m.outbox.clear();
            self.tally.slow_consumers += 1;
            self.woken.push(me as usize);
        }
        if self.behind.remove(&me).is_some() {
            self.hold_until = self.behind.values().max().copied();
        }
    }

    /// Queues `line` for `to`.
    fn deliver(&mut self, to: u64, line: &Arc<[u8]>, now: Instant) {
        let Some(m) = self.members.get_mut(&to) else {
            return;
        };
        if m.kicked.is_some() {
            return;
        }
        let was_idle = m.outbox.owed() == 0;
        if m.outbox.push(line.clone(), self.limits.hard).is_err() {
            self.kick(to, Overrun::Hard);
            return;
        }
        self.tally.chat_deliveries += 1;
        if was_idle {
            self.woken.push(to as usize);
        }
        self.restand(to, now);
    }

    fn deliver_all(&mut self, except: Option<u64>, line: &Arc<[u8]>) {
        let now = Instant::now();
        let to: Vec<u64> = self
            .members
            .keys()
            .copied()
            .filter(|&k| Some(k) != except)
            .collect();
        for k in to {
            self.deliver(k, line, now);
        }
    }

    /// Names `me` `new` (granted) and tells everyone.
    fn rename(&mut self, me: u64, new: &str) {
        let Some(m) = self.members.get_mut(&me) else {
            return;
        };
        let old = std::mem::replace(&mut m.name, new.to_string());
        m.claimed = true;
        let serial = m.serial;
        self.roster.rename(&old, new);
        self.publish_state(serial, new.as_bytes());
        self.broadcast(None, renamed(&old, new));
    }
}

impl Floor for LocalRoom {
    fn name(&self, me: u64) -> String {
        self.members
            .get(&me)
            .map(|m| m.name.clone())
            .unwrap_or_default()
    }

    fn broadcast(&mut self, except: Option<u64>, line: Arc<[u8]>) {
        self.deliver_all(except, &line);
        self.publish(Frame::Cast {
            origin: 0,
            body: &line,
        });
    }

    fn tell(&mut self, me: u64, line: Arc<[u8]>) {
        self.deliver(me, &line, Instant::now());
    }

    fn claim(&mut self, me: u64, name: &str) {
        if self.bus.is_none() {
            // A room of its own (no hub): the names are all here.
            let taken = self.members.values().any(|m| m.name == name);
            if taken {
                self.tell(me, in_use(name));
            } else {
                self.rename(me, name);
            }
            return;
        }
        let Some(m) = self.members.get_mut(&me) else {
            return;
        };
        m.claim = Some(name.to_string());
        let serial = m.serial;
        self.publish_claim(serial, name.as_bytes());
    }

    fn who(&mut self) -> Arc<[u8]> {
        self.roster.who()
    }
}
