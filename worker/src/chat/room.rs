//! The clients one worker holds (process mode), or the one client of a fork-per-conn child,
//! and their end of the bus to everyone else.
//!
//! A line said here is queued at once for every local client and appended once to the bus;
//! the hub passes it to every other process, whose room queues it for its own clients. Who is
//! where travels as bus `State` (client key → name), so `/who` counts everyone. Nothing in
//! here blocks: a client that falls `--max-unsent` behind is marked and its session ends it;
//! when more than [`BUS_HIGH`] bytes wait for the bus, sessions stop reading their clients
//! (TCP back-pressure reaches the senders) until it drains below [`BUS_LOW`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read};
use std::rc::Rc;
use std::sync::Arc;

use protocol::bus::{Decoder, Frame, Outgoing};
use protocol::stats::Counters;

use super::{Floor, Outbox, joined, left, welcome};
use crate::service::Room;

/// Bus bytes waiting to be sent above which sessions stop reading their clients.
pub const BUS_HIGH: usize = 1 << 20;
/// ... and below which they start again.
pub const BUS_LOW: usize = 256 << 10;

/// A local client.
#[derive(Debug)]
struct Member {
    name: String,
    outbox: Outbox,
    /// Fell too far behind: its session tells it and ends it.
    kicked: bool,
}

/// The process-mode room, shared by a worker's sessions (one thread, so `Rc<RefCell>`).
#[derive(Debug, Clone)]
pub struct ChatRoom(pub(crate) Rc<RefCell<LocalRoom>>);

impl ChatRoom {
    /// A room whose clients may fall `max_unsent` bytes behind, on `bus` if given.
    pub fn new(max_unsent: usize, bus: Option<std::os::unix::net::UnixStream>) -> ChatRoom {
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
            remote: HashMap::new(),
            bus,
            woken: Vec::new(),
            paused: Vec::new(),
            tally: Counters::default(),
            max_unsent,
            guest_prefix: format!("guest{}-", std::process::id()),
            next_guest: 0,
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
        self.0.borrow_mut().on_bus()
    }

    fn woken(&mut self, into: &mut Vec<usize>) {
        into.append(&mut self.0.borrow_mut().woken);
    }

    fn settle(&mut self, counters: &mut Counters) -> io::Result<()> {
        let mut room = self.0.borrow_mut();
        counters.add(&std::mem::take(&mut room.tally));
        room.flush_bus()
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
    /// Clients of the other processes: (pid, key) → name.
    remote: HashMap<(u32, u64), String>,
    bus: Option<BusLink>,
    /// Sessions with new output or a lifted pause, for the loop to drive.
    woken: Vec<usize>,
    /// Sessions that stopped reading while the bus was full.
    paused: Vec<usize>,
    /// Counted since the loop last settled.
    tally: Counters,
    max_unsent: usize,
    guest_prefix: String,
    next_guest: u64,
    buf: Vec<u8>,
}

impl LocalRoom {
    /// Adds the client `me` under a guest name; greets it and tells everyone.
    pub fn join(&mut self, me: u64) {
        self.next_guest += 1;
        let name = format!("{}{}", self.guest_prefix, self.next_guest);
        self.members.insert(
            me,
            Member {
                name: name.clone(),
                outbox: Outbox::default(),
                kicked: false,
            },
        );
        self.tell(me, welcome(&name));
        self.broadcast(Some(me), joined(&name));
        self.publish_state(me, name.as_bytes());
    }

    /// Removes the client `me` (gone, for whatever reason) and tells everyone.
    pub fn leave(&mut self, me: u64) {
        if let Some(m) = self.members.remove(&me) {
            self.paused.retain(|&k| k as u64 != me);
            self.broadcast(None, left(&m.name));
            self.publish_state(me, b"");
        }
    }

    /// `me` fell too far behind and must go.
    pub fn is_kicked(&self, me: u64) -> bool {
        self.members.get(&me).is_some_and(|m| m.kicked)
    }

    /// The bound on what a client may owe (for the notice a kicked one gets).
    pub fn max_unsent(&self) -> usize {
        self.max_unsent
    }

    /// What `me` is owed.
    pub fn outbox(&mut self, me: u64) -> Option<&mut Outbox> {
        self.members.get_mut(&me).map(|m| &mut m.outbox)
    }

    /// Too much waits for the bus: sessions should stop reading their clients.
    pub fn bus_full(&self) -> bool {
        self.bus
            .as_ref()
            .is_some_and(|b| b.out.backlog() > BUS_HIGH)
    }

    /// `key` stopped reading because the bus is full: wake it when it drains.
    pub fn pause(&mut self, key: usize) {
        self.paused.push(key);
    }

    /// Counts a line read from a client.
    pub fn count_line(&mut self) {
        self.tally.chat_lines += 1;
    }

    /// Queues `line` for `to`; a client that cannot take it is marked to go.
    fn deliver(&mut self, to: u64, line: &Arc<[u8]>) {
        let Some(m) = self.members.get_mut(&to) else {
            return;
        };
        if m.kicked {
            return;
        }
        let was_idle = m.outbox.owed() == 0;
        if m.outbox.push(line.clone(), self.max_unsent).is_err() {
            m.kicked = true;
            m.outbox.clear();
            self.tally.slow_consumers += 1;
            self.woken.push(to as usize);
            return;
        }
        self.tally.chat_deliveries += 1;
        if was_idle {
            self.woken.push(to as usize);
        }
    }

    fn deliver_all(&mut self, except: Option<u64>, line: &Arc<[u8]>) {
        let to: Vec<u64> = self
            .members
            .keys()
            .copied()
            .filter(|&k| Some(k) != except)
            .collect();
        for k in to {
            self.deliver(k, line);
        }
    }

    fn publish(&mut self, frame: Frame<'_>) {
        if let Some(bus) = self.bus.as_mut() {
            bus.out.push(frame);
            self.tally.bus_out += 1;
        }
    }

    fn publish_state(&mut self, me: u64, body: &[u8]) {
        self.publish(Frame::State {
            origin: 0,
            key: me,
            body,
        });
    }

    /// Sends what waits for the bus, as far as it takes it; wakes paused sessions once it
    /// has drained. `Err`: the bus is gone.
    fn flush_bus(&mut self) -> io::Result<()> {
        let Some(bus) = self.bus.as_mut() else {
            return Ok(());
        };
        bus.out.flush(&mut bus.stream)?;
        if bus.out.backlog() < BUS_LOW && !self.paused.is_empty() {
            self.woken.append(&mut self.paused);
        }
        Ok(())
    }

    /// Reads what the bus brought and acts on it. `Err`: the bus is gone.
    fn on_bus(&mut self) -> io::Result<()> {
        self.flush_bus()?;
        // Until the socket is empty: it is edge-triggered, and the hub may send nothing more
        // to announce what is left. Each read's frames are applied before the next read, so
        // what is held stays one read's worth (the clients' queues have their own bound).
        loop {
            let Some(bus) = self.bus.as_mut() else {
                return Ok(());
            };
            match bus.stream.read(&mut self.buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => bus.decoder.push(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
            self.apply_received()?;
        }
    }

    /// Acts on every whole frame the bus has brought.
    fn apply_received(&mut self) -> io::Result<()> {
        let Some(bus) = self.bus.as_mut() else {
            return Ok(());
        };
        // Frames are applied from a copy of the decoder, as applying one needs the room.
        let mut decoder = std::mem::take(&mut bus.decoder);
        let applied = (|| {
            while let Some(frame) = decoder.next_frame().map_err(io::Error::other)? {
                self.tally.bus_in += 1;
                self.apply(frame);
            }
            Ok(())
        })();
        if let Some(bus) = self.bus.as_mut() {
            bus.decoder = decoder;
        }
        applied
    }

    fn apply(&mut self, frame: Frame<'_>) {
        match frame {
            Frame::Cast { body, .. } => self.deliver_all(None, &Arc::from(body)),
            Frame::State {
                origin,
                key,
                body: [],
            } => {
                self.remote.remove(&(origin, key));
            }
            Frame::State { origin, key, body } => {
                let name = String::from_utf8_lossy(body).into_owned();
                self.remote.insert((origin, key), name);
            }
            Frame::Gone { origin } => {
                let gone: Vec<(u32, u64)> = self
                    .remote
                    .keys()
                    .filter(|(pid, _)| *pid == origin)
                    .copied()
                    .collect();
                for k in gone {
                    if let Some(name) = self.remote.remove(&k) {
                        self.deliver_all(None, &left(&name));
                    }
                }
            }
        }
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
        self.deliver(me, &line);
    }

    fn rename(&mut self, me: u64, name: &str) {
        if let Some(m) = self.members.get_mut(&me) {
            m.name = name.to_string();
            self.publish_state(me, name.as_bytes());
        }
    }

    fn roster(&self, listed: usize) -> (usize, Vec<String>) {
        let mut names: Vec<String> = self
            .members
            .values()
            .map(|m| m.name.clone())
            .chain(self.remote.values().cloned())
            .collect();
        names.sort();
        let n = names.len();
        names.truncate(listed);
        (n, names)
    }
}
