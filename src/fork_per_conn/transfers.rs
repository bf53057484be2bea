//! The transfer children a fork-per-conn TFTP server runs, as admission sees them: each
//! child's peer address, when it began, and whether its peer has answered. The last is
//! learnt from the child through a page of flags shared across fork (`MAP_SHARED`): a child
//! sets its slot's flag once its peer answers, and the master reads it when a request finds no
//! room, to evict the oldest child whose peer never did ([`worker::exchange::admit`]).
//!
//! An evicted child is sent SIGKILL and reaped before the newcomer is forked, so the number
//! of children never passes the limit. Killing it is safe: an upload in progress is an
//! unnamed file until complete, so nothing is left behind.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use worker::exchange::{Admit, Held, admit};

/// How long the master waits for an evicted child to die before giving up on the request.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// One flag per slot, in memory the children share with the master.
struct SharedFlags {
    base: NonNull<AtomicU8>,
    len: usize,
}

impl SharedFlags {
    fn new(len: usize) -> io::Result<SharedFlags> {
        let len = len.max(1);
        // SAFETY: asks the kernel for a fresh anonymous shared mapping of `len` bytes, placed
        // where it chooses, aliasing nothing; the result is checked before use. It is
        // unmapped only on drop (children forked meanwhile keep their own mapping of it).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<AtomicU8>()).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(SharedFlags { base, len })
    }

    fn get(&self, slot: usize) -> &AtomicU8 {
        assert!(slot < self.len, "slot {slot} of {}", self.len);
        // SAFETY: in bounds (checked above) of a mapping that lives as long as `self`; a
        // zero-filled page is a valid `AtomicU8` array, and all access is atomic.
        unsafe { &*self.base.as_ptr().add(slot) }
    }
}

impl Drop for SharedFlags {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; `get`'s borrows of `self` ended.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

struct Child {
    source: IpAddr,
    started: Instant,
    slot: usize,
}

/// The transfer children and their flags.
pub(super) struct Transfers {
    flags: SharedFlags,
    free: Vec<usize>,
    children: HashMap<Pid, Child>,
    max: u64,
}

/// What became of a request's admission.
pub(super) enum Admission {
    /// Fork for it, in this slot (another child may have been evicted first).
    Fork { slot: usize, evicted: bool },
    /// No room: drop the request (the client retries).
    Busy,
}

impl Transfers {
    /// Room for `max` transfer children.
    pub(super) fn new(max: u64) -> io::Result<Transfers> {
        let n = usize::try_from(max).unwrap_or(usize::MAX).min(1 << 20);
        Ok(Transfers {
            flags: SharedFlags::new(n)?,
            free: (0..n).rev().collect(),
            children: HashMap::new(),
            max,
        })
    }

    /// Finds a slot for a request from `source`, evicting (killing and reaping) the oldest
    /// child whose peer never answered if need be; `on_evicted` is told its pid.
    pub(super) fn admit(&mut self, source: IpAddr, on_evicted: impl FnOnce(Pid)) -> Admission {
        let held = self.children.iter().map(|(&key, c)| Held {
            key,
            source: c.source,
            started: c.started,
            verified: self.flags.get(c.slot).load(Ordering::Relaxed) != 0,
        });
        let mut evicted = false;
        match admit(held, source, self.max) {
            Admit::Yes => {}
            Admit::Busy => return Admission::Busy,
            Admit::Evict(pid) => {
                if !kill_and_reap(pid) {
                    return Admission::Busy;
                }
                self.gone(pid);
                on_evicted(pid);
                evicted = true;
            }
        }
        match self.free.pop() {
            Some(slot) => {
                self.flags.get(slot).store(0, Ordering::Relaxed);
                Admission::Fork { slot, evicted }
            }
            None => Admission::Busy,
        }
    }

    /// The flag the child in `slot` sets once its peer answers.
    pub(super) fn flag(&self, slot: usize) -> &AtomicU8 {
        self.flags.get(slot)
    }

    /// A child forked for a request from `source`, in `slot`.
    pub(super) fn forked(&mut self, pid: Pid, source: IpAddr, slot: usize) {
        self.children.insert(
            pid,
            Child {
                source,
                started: Instant::now(),
                slot,
            },
        );
    }

    /// The fork for `slot` failed: the slot is free again.
    pub(super) fn unused(&mut self, slot: usize) {
        self.free.push(slot);
    }

    /// A child exited (reaped): its slot is free.
    pub(super) fn gone(&mut self, pid: Pid) {
        if let Some(c) = self.children.remove(&pid) {
            self.free.push(c.slot);
        }
    }
}

/// SIGKILLs `pid` and reaps it; false if it could not be reaped within [`EVICTION_WAIT`].
fn kill_and_reap(pid: Pid) -> bool {
    if kill(pid, Signal::SIGKILL).is_err() {
        return false;
    }
    let until = Instant::now() + EVICTION_WAIT;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < until => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(WaitStatus::StillAlive) => return false,
            // Reaped now, or already (by nobody else: the master alone reaps).
            Ok(_) | Err(_) => return true,
        }
    }
}
