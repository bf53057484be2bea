//! The buffers a receive on the ring lands in, picked by the kernel only when data arrives (a
//! provided-buffer ring, Linux 5.19): a connection waiting for bytes holds no memory, so ten
//! thousand idle connections cost their sockets, as in the epoll loop. Buffers are added a
//! chunk at a time as connections hold more of them at once, up to [`MOST`].

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// The buffer group every receive names.
pub(super) const GROUP: u16 = 0;
/// One buffer's size: a receive takes at most this much (and at most `--max-unsent`).
pub(super) const LEN: usize = 16 * 1024;
/// Most buffers ever provided (the ring's size): 128 MiB of address space, touched only as
/// connections hold buffers at once (a send the client does not read holds one).
pub(super) const MOST: u16 = 8192;
/// Buffers added at a time.
const CHUNK: usize = 64;

/// The provided-buffer ring and the memory behind it.
pub(super) struct Buffers {
    /// `most` entries, page-aligned, shared with the kernel.
    ring: *mut BufRingEntry,
    /// The ring's size, a power of two: the most buffers there will be.
    most: u16,
    /// Chunks of `CHUNK` buffers each; buffer `bid` is in chunk `bid / CHUNK`.
    chunks: Vec<*mut u8>,
    /// Our copy of the ring's tail (the kernel keeps the head).
    tail: u16,
    /// Buffers connections hold (taken by a receive, not yet given back).
    pub(super) held: usize,
}

fn ring_layout(most: u16) -> Layout {
    // 16 bytes an entry; the kernel wants the ring page-aligned.
    Layout::from_size_align(
        usize::from(most) * std::mem::size_of::<BufRingEntry>(),
        4096,
    )
    .expect("a valid layout: at most 32768 entries of 16 bytes")
}

fn chunk_layout() -> Layout {
    Layout::from_size_align(CHUNK * LEN, 4096).expect("a constant, valid layout")
}

impl Buffers {
    /// Registers an empty ring of `most` entries (rounded up to a power of two, at least
    /// one chunk) with `uring`, then provides the first chunk.
    pub(super) fn register(uring: &io_uring::IoUring, most: u16) -> io::Result<Buffers> {
        let most = most.max(CHUNK as u16).next_power_of_two();
        // SAFETY: a non-zero size; zeroed memory is a valid (empty) ring.
        let ring = unsafe { alloc_zeroed(ring_layout(most)) }.cast::<BufRingEntry>();
        if ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut buffers = Buffers {
            ring,
            most,
            chunks: Vec::new(),
            tail: 0,
            held: 0,
        };
        // SAFETY: `ring` is `most` entries, page-aligned, and lives until `Buffers` drops,
        // which is after the ring that uses it (the owner declares the ring first).
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, most, GROUP, 0)?
        };
        buffers.grow()?;
        Ok(buffers)
    }

    /// Adds a chunk of buffers; `false` when the ring is full.
    pub(super) fn grow(&mut self) -> io::Result<bool> {
        let first = self.chunks.len() * CHUNK;
        if first + CHUNK > usize::from(self.most) {
            return Ok(false);
        }
        // SAFETY: a non-zero size. Zeroed, so pages stay untouched until a receive uses them.
        let chunk = unsafe { alloc_zeroed(chunk_layout()) };
        if chunk.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        self.chunks.push(chunk);
        for bid in first..first + CHUNK {
            self.put(bid as u16);
        }
        Ok(true)
    }

    /// Where buffer `bid` starts, if it is one of ours.
    pub(super) fn at(&self, bid: u16) -> Option<*mut u8> {
        let bid = usize::from(bid);
        let chunk = self.chunks.get(bid / CHUNK)?;
        // SAFETY: `bid % CHUNK * LEN` is inside the chunk's `CHUNK * LEN` bytes.
        Some(unsafe { chunk.add(bid % CHUNK * LEN) })
    }

    /// A receive took buffer `bid`.
    pub(super) fn taken(&mut self) {
        self.held += 1;
    }

    /// Buffer `bid` is done with: the kernel may fill it again.
    pub(super) fn give_back(&mut self, bid: u16) {
        self.held = self.held.saturating_sub(1);
        self.put(bid);
    }

    /// Whether any buffer waits in the ring for a receive.
    pub(super) fn any_free(&self) -> bool {
        self.held < self.chunks.len() * CHUNK
    }

    fn put(&mut self, bid: u16) {
        let Some(addr) = self.at(bid) else { return };
        let slot = usize::from(self.tail & (self.most - 1));
        // SAFETY: `slot` < most, inside the ring. The kernel reads entries only between its
        // head and the tail we publish below, and this one is past that tail.
        let entry = unsafe { &mut *self.ring.add(slot) };
        entry.set_addr(addr as u64);
        entry.set_len(LEN as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is a u16 inside entry 0, aligned, shared with the kernel: published
        // with release ordering so the entry written above is seen first.
        unsafe {
            let tail = BufRingEntry::tail(self.ring).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        for &chunk in &self.chunks {
            // SAFETY: allocated in `grow` with this layout, freed once.
            unsafe { dealloc(chunk, chunk_layout()) };
        }
        // SAFETY: allocated in `register` with this layout, freed once.
        unsafe { dealloc(self.ring.cast(), ring_layout(self.most)) };
    }
}
