//! The exchanges a thread-mode server runs, one thread each, as admission sees them: who
//! their peers are, whether those peers have answered, and a way to end one from another
//! thread. A new request that finds no room evicts the oldest exchange whose peer never
//! answered ([`crate::exchange::admit`]): its thread is woken at once (its socket is shut
//! down for reading) and the newcomer waits until that thread has let go of its slot, so the
//! number of transfer threads never passes the limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::exchange::{Admit, EVICTION_LOOKS, Held, admit, answer_waiting};
use crate::service::{Abort, Exchange};

/// How long a newcomer waits for an evicted exchange's thread to let go.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// What an exchange's thread and the registry share.
#[derive(Debug, Default)]
pub struct Flags {
    verified: AtomicBool,
    evicted: AtomicBool,
}

impl Flags {
    /// Called by the exchange's thread once its peer has answered.
    pub fn set_verified(&self) {
        self.verified.store(true, Ordering::Relaxed);
    }

    /// Why the exchange must end now, if it must: evicted.
    pub fn evicted(&self) -> Option<Abort> {
        self.evicted
            .load(Ordering::Relaxed)
            .then_some(Abort::Evicted)
    }
}

#[derive(Debug)]
struct Entry {
    source: IpAddr,
    started: Instant,
    flags: Arc<Flags>,
    /// The exchange's socket: open for as long as the entry is registered (a [`Ticket`] is
    /// dropped before its exchange).
    fd: RawFd,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    entries: HashMap<u64, Entry>,
}

/// The exchanges running, shared by the threads that start them and the threads that run them.
#[derive(Debug, Default)]
pub struct Registry {
    table: Mutex<Table>,
    freed: Condvar,
}

/// An exchange's place in the registry, given up when dropped. Drop it before the exchange.
#[derive(Debug)]
pub struct Ticket {
    registry: Arc<Registry>,
    id: u64,
    /// What the exchange's thread reads and sets.
    pub flags: Arc<Flags>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.registry.lock().entries.remove(&self.id);
        self.registry.freed.notify_all();
    }
}

/// Why an exchange was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is held by an exchange whose peer has answered.
    Busy,
}

/// What [`Registry::enter`] did to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entered {
    /// There was room.
    Free,
    /// An exchange whose peer never answered was ended to make room.
    Evicted,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number of exchanges registered.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits `x` beside the others (at most `max`), evicting one whose peer never answered
    /// if need be.
    pub fn enter<X: Exchange>(
        self: &Arc<Self>,
        x: &X,
        max: u64,
    ) -> Result<(Ticket, Entered), Refused> {
        let source = x.peer().ip();
        let mut table = self.lock();
        let mut entered = Entered::Free;
        let held = |t: &Table| -> Vec<Held<u64>> {
            t.entries
                .iter()
                .map(|(&key, e)| Held {
                    key,
                    source: e.source,
                    started: e.started,
                    verified: e.flags.verified.load(Ordering::Relaxed),
                })
                .collect()
        };
        let until = Instant::now() + EVICTION_WAIT;
        let mut looks = 0;
        // Looked at again after each eviction: another thread may have taken the room meanwhile.
        loop {
            let victim = match admit(held(&table), source, max) {
                Admit::Yes => break,
                Admit::Busy => return Err(Refused::Busy),
                Admit::Evict(victim) => victim,
            };
            // A victim whose answer is queued, unread by its thread yet, has answered.
            if let Some(e) = table.entries.get(&victim) {
                if looks < EVICTION_LOOKS && answer_waiting(e.fd) {
                    looks += 1;
                    e.flags.set_verified();
                    continue;
                }
            }
            entered = Entered::Evicted;
            if let Some(e) = table.entries.get(&victim) {
                e.flags.evicted.store(true, Ordering::Relaxed);
                // Wakes its thread from poll at once. The descriptor is still open: its entry
                // is here, and a ticket is dropped before its exchange.
                let _ = nix::sys::socket::shutdown(e.fd, nix::sys::socket::Shutdown::Read);
            }
            while table.entries.contains_key(&victim) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Refused::Busy);
                }
                table = self
                    .freed
                    .wait_timeout(table, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        table.next += 1;
        let id = table.next;
        let flags = Arc::new(Flags::default());
        table.entries.insert(
            id,
            Entry {
                source,
                started: x.started(),
                flags: Arc::clone(&flags),
                fd: x.socket().as_raw_fd(),
            },
        );
        Ok((
            Ticket {
                registry: Arc::clone(self),
                id,
                flags,
            },
            entered,
        ))
    }
}
