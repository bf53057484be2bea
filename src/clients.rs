//! The clients of a small server that runs inside an event loop — the control socket, the
//! metrics endpoint: each gets a token, a serial (so an answer given late never reaches a newer
//! client in the same slot) and a deadline after which it is dropped, so no client can hold
//! the loop or a slot forever.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use slab::Slab;

/// Names one client across calls: its slot and its serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientId {
    key: usize,
    serial: u64,
}

/// A client as [`Clients`] keeps it.
#[derive(Debug)]
pub struct Entry<C> {
    /// The serial it was given.
    serial: u64,
    /// When it is dropped if not done.
    pub deadline: Instant,
    /// The server's own state for it.
    pub state: C,
}

/// A server's clients, under tokens `base + 1 + slot` (the listener itself is `base`).
#[derive(Debug)]
pub struct Clients<C> {
    slab: Slab<Entry<C>>,
    base: usize,
    serial: u64,
}

impl<C: AsFd> Clients<C> {
    /// None yet; tokens from `base` once [`set_base`](Self::set_base) is called.
    pub fn new() -> Clients<C> {
        Clients {
            slab: Slab::new(),
            base: usize::MAX,
            serial: 0,
        }
    }

    /// The listener's token; clients' tokens follow it.
    pub fn set_base(&mut self, base: usize) {
        self.base = base;
    }

    /// Whether `token` is the listener's.
    pub fn is_listener(&self, token: Token) -> bool {
        token.0 == self.base
    }

    /// The slot `token` names.
    pub fn key(&self, token: Token) -> usize {
        token.0.wrapping_sub(self.base + 1)
    }

    /// Watches a new client (readable and writable) and keeps it until `deadline`.
    pub fn add(&mut self, registry: &Registry, state: C, deadline: Instant) -> std::io::Result<()> {
        let entry = self.slab.vacant_entry();
        let token = Token(self.base + 1 + entry.key());
        let fd = state.as_fd().as_raw_fd();
        registry.register(
            &mut SourceFd(&fd),
            token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.serial += 1;
        entry.insert(Entry {
            serial: self.serial,
            deadline,
            state,
        });
        Ok(())
    }

    /// The client in slot `key`, with its id.
    pub fn get_mut(&mut self, key: usize) -> Option<(ClientId, &mut Entry<C>)> {
        let e = self.slab.get_mut(key)?;
        Some((
            ClientId {
                key,
                serial: e.serial,
            },
            e,
        ))
    }

    /// The client `id` names, if it is still there (not a newer one in its slot).
    pub fn get(&mut self, id: ClientId) -> Option<&mut Entry<C>> {
        self.slab.get_mut(id.key).filter(|e| e.serial == id.serial)
    }

    /// The slot of a client named by `id`.
    pub fn key_of(id: ClientId) -> usize {
        id.key
    }

    /// Stops watching a client and forgets it.
    pub fn remove(&mut self, registry: &Registry, key: usize) {
        if let Some(e) = self.slab.try_remove(key) {
            let _ = registry.deregister(&mut SourceFd(&e.state.as_fd().as_raw_fd()));
        }
    }

    /// Drops every client past its deadline; returns how many.
    pub fn expire(&mut self, registry: &Registry, now: Instant) -> usize {
        let late: Vec<usize> = self
            .slab
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for &key in &late {
            self.remove(registry, key);
        }
        late.len()
    }

    /// How many clients it holds.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// The slot of the client that came first among those held (the lowest serial).
    pub fn oldest(&self) -> Option<usize> {
        self.slab
            .iter()
            .min_by_key(|(_, e)| e.serial)
            .map(|(k, _)| k)
    }

    /// The earliest deadline, for the owner's wait.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slab.iter().map(|(_, e)| e.deadline).min()
    }
}

impl<C: AsFd> Default for Clients<C> {
    fn default() -> Self {
        Clients::new()
    }
}
