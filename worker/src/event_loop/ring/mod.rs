//! `--io uring`: the worker's echo connections on io_uring's completion path. The epoll loop
//! makes two system calls per round trip (a read, a write); here every receive and send is an
//! entry in a ring shared with the kernel, and one `io_uring_enter` per loop turn submits all
//! of them and collects what completed, however many round trips that is.
//!
//! The ring is also what the loop waits in: the epoll instance (listener, signals, master,
//! UDP, bus) is one multishot poll entry among the rest, so nothing else about the worker
//! changes: accepting, supervision, drains, stats. Only a service that answers every byte
//! with itself ([`crate::service::ServiceKind::echoes_verbatim`]) is served this way: a
//! received buffer goes back out as it came, without a copy.

mod buffers;
#[cfg(test)]
mod tests;

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use slab::Slab;

use buffers::Buffers;
use protocol::stats::Counters;

/// The epoll instance's poll entry.
const EPOLL: u64 = u64::MAX;
/// Submission queue entries (completions get twice as many).
const ENTRIES: u32 = 4096;
/// Most completions a turn waits for, and the longest it waits for them beyond the first
/// (see [`Ring::turn`]).
const BATCH: usize = 8;
const BATCH_WAIT: Duration = Duration::from_micros(50);
/// Longest `close_all` waits for the kernel to let go of what is in flight.
const LETTING_GO: Duration = Duration::from_millis(200);

/// What a connection has in flight: always exactly one operation, so each completion is
/// that connection's only one and its slot is never reused under a late completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Recv,
    /// Sending buffer `bid`'s bytes `from..to`.
    Send {
        bid: u16,
        from: usize,
        to: usize,
    },
    /// Nothing: no buffer was free when data came; re-armed when one is.
    Starved,
}

struct Conn {
    stream: TcpStream,
    op: Op,
    last_active: Instant,
    /// We closed it (idle, stop): its pending operation ends, then the socket goes.
    closing: bool,
}

/// A worker's io_uring and the connections on it. The ring is declared before the buffers
/// so that it is torn down first.
pub(super) struct Ring {
    uring: IoUring,
    buffers: Buffers,
    conns: Slab<Conn>,
    /// Entries the submission queue had no room for yet.
    backlog: Vec<squeue::Entry>,
    /// Connections waiting for a buffer.
    starved: Vec<usize>,
    epoll_fd: RawFd,
    /// Longest receive: what a connection may owe (`--max-unsent`), at most a buffer.
    recv_len: u32,
    watch_idle: bool,
    completions: Vec<(u64, i32, u32)>,
    /// Completions the last turn handled.
    last_batch: usize,
}

/// Whether this kernel lets the process use io_uring as `--io uring` does (ring flags,
/// provided buffers, multishot poll); the error says why not.
pub fn probe() -> io::Result<()> {
    let poll = mio::Poll::new()?;
    Ring::new(poll.as_raw_fd(), 4096, false).map(drop)
}

impl Ring {
    /// A ring that waits on `epoll_fd` too; receives take at most `max_unsent` bytes.
    pub(super) fn new(epoll_fd: RawFd, max_unsent: usize, watch_idle: bool) -> io::Result<Ring> {
        Ring::with_buffers(epoll_fd, max_unsent, watch_idle, buffers::MOST)
    }

    /// As [`Ring::new`], with at most `most_buffers` buffers.
    fn with_buffers(
        epoll_fd: RawFd,
        max_unsent: usize,
        watch_idle: bool,
        most_buffers: u16,
    ) -> io::Result<Ring> {
        let uring = IoUring::builder()
            // One thread submits, and completions wait for its next enter: the kernel runs
            // their work in one batch then instead of interrupting the loop for each.
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .build(ENTRIES)?;
        let buffers = Buffers::register(&uring, most_buffers)?;
        let mut ring = Ring {
            uring,
            buffers,
            conns: Slab::new(),
            backlog: Vec::new(),
            starved: Vec::new(),
            epoll_fd,
            recv_len: max_unsent.clamp(1, buffers::LEN) as u32,
            watch_idle,
            completions: Vec::with_capacity(ENTRIES as usize),
            last_batch: 0,
        };
        ring.watch_epoll();
        ring.turn(Duration::ZERO, &mut Counters::default())?;
        Ok(ring)
    }

    /// Connections on the ring (closing ones included, until the kernel lets go of them).
    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    /// Takes an accepted connection on.
    pub(super) fn adopt(&mut self, stream: mio::net::TcpStream, counters: &mut Counters) {
        // SAFETY: the descriptor comes out of the mio stream, which gives up owning it.
        let stream = unsafe { TcpStream::from_raw_fd(stream.into_raw_fd()) };
        // A non-blocking socket makes io_uring hand EAGAIN back instead of waiting for data.
        if stream.set_nonblocking(false).is_err() {
            counters.io_errors += 1;
            return;
        }
        let key = self.conns.insert(Conn {
            stream,
            op: Op::Recv,
            last_active: Instant::now(),
            closing: false,
        });
        counters.active += 1;
        self.recv(key);
    }

    /// Submits what is queued and waits up to `timeout` for at least one completion, then
    /// handles every completion there is; `true` when the epoll instance has events.
    ///
    /// Under load a turn waits for as many completions as the last one had (up to [`BATCH`]),
    /// but never more than [`BATCH_WAIT`]: each wake-up of the worker costs a context switch
    /// and a system call, and a turn that takes eight round trips at once pays them once
    /// (measured: fewer wake-ups were worth more than the io_uring entries themselves). A
    /// lone connection's turns have one completion each, so it is never kept waiting.
    pub(super) fn turn(&mut self, timeout: Duration, counters: &mut Counters) -> io::Result<bool> {
        self.submit_backlog()?;
        // Entries the kernel could not take yet: collect what completed and come back.
        let timeout = if self.backlog.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        let want = self.last_batch.clamp(1, BATCH);
        let ts = types::Timespec::from(if want > 1 {
            timeout.min(BATCH_WAIT)
        } else {
            timeout
        });
        let args = types::SubmitArgs::new().timespec(&ts);
        // Waiting for a completion (with a zero timeout when there is work) is also what makes
        // the kernel run the deferred completions' work.
        if let Err(e) = self.uring.submitter().submit_with_args(want, &args) {
            match e.raw_os_error() {
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                _ => return Err(e),
            }
        }
        self.completions.clear();
        self.completions.extend(
            self.uring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        self.last_batch = self.completions.len();
        let mut epoll = false;
        for i in 0..self.completions.len() {
            let (key, res, flags) = self.completions[i];
            if key == EPOLL {
                epoll = true;
                if !cqueue::more(flags) {
                    self.watch_epoll();
                }
            } else {
                self.complete(key as usize, res, flags, counters);
            }
        }
        self.feed_starved()?;
        Ok(epoll)
    }

    /// Closes connections idle for `limit` (nothing owed, nothing received since); each is
    /// counted as closed by a limit.
    pub(super) fn close_idle(&mut self, now: Instant, limit: Duration, counters: &mut Counters) {
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.closing
                    && matches!(c.op, Op::Recv | Op::Starved)
                    && now.duration_since(c.last_active) >= limit
            })
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            counters.closed_by_limit += 1;
            self.begin_close(key, counters);
        }
    }

    /// Closes every connection and waits (briefly) until the kernel has let go of them.
    pub(super) fn close_all(&mut self, counters: &mut Counters) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.begin_close(key, counters);
        }
        let deadline = Instant::now() + LETTING_GO;
        while !self.conns.is_empty() && Instant::now() < deadline {
            if self.turn(Duration::from_millis(10), counters).is_err() {
                break;
            }
        }
    }

    fn watch_epoll(&mut self) {
        let entry = opcode::PollAdd::new(types::Fd(self.epoll_fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(EPOLL);
        self.backlog.push(entry);
    }

    fn recv(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.op = Op::Recv;
        let entry = opcode::Recv::new(
            types::Fd(conn.stream.as_raw_fd()),
            std::ptr::null_mut(),
            self.recv_len,
        )
        .buf_group(buffers::GROUP)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
        .user_data(key as u64);
        self.backlog.push(entry);
    }

    fn send(&mut self, key: usize) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let Op::Send { bid, from, to } = conn.op else {
            return;
        };
        let Some(start) = self.buffers.at(bid) else {
            return;
        };
        // SAFETY: from < to <= the buffer's length, so the pointer stays inside it; the
        // buffer is this connection's until the send completes and it is given back.
        let ptr = unsafe { start.add(from) };
        // MSG_NOSIGNAL: a client gone mid-echo is an error to count, not a SIGPIPE.
        let entry = opcode::Send::new(types::Fd(conn.stream.as_raw_fd()), ptr, (to - from) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(key as u64);
        self.backlog.push(entry);
    }

    fn complete(&mut self, key: usize, res: i32, flags: u32, counters: &mut Counters) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.op {
            Op::Recv => {
                let bid = cqueue::buffer_select(flags);
                if bid.is_some() {
                    self.buffers.taken();
                }
                match (res, bid) {
                    (n, Some(bid)) if n > 0 && !conn.closing => {
                        counters.bytes_in += n as u64;
                        if self.watch_idle {
                            conn.last_active = Instant::now();
                        }
                        conn.op = Op::Send {
                            bid,
                            from: 0,
                            to: n as usize,
                        };
                        self.send(key);
                    }
                    (n, bid) => {
                        if let Some(bid) = bid {
                            self.buffers.give_back(bid);
                        }
                        match -n {
                            libc::ENOBUFS if !conn.closing => {
                                conn.op = Op::Starved;
                                self.starved.push(key);
                            }
                            libc::EINTR | libc::EAGAIN if !conn.closing => self.recv(key),
                            0 => {
                                // The client's FIN, with nothing owed: ours follows.
                                let _ = conn.stream.shutdown(Shutdown::Write);
                                self.close(key, counters);
                            }
                            _ => {
                                if !conn.closing {
                                    counters.io_errors += 1;
                                }
                                self.close(key, counters);
                            }
                        }
                    }
                }
            }
            Op::Send { bid, from, to } => {
                if res >= 0 {
                    counters.bytes_out += res as u64;
                }
                let from = from + res.max(0) as usize;
                let retry = res == -libc::EINTR || res == -libc::EAGAIN;
                if conn.closing || (res < 0 && !retry) {
                    if res < 0 && !conn.closing {
                        counters.io_errors += 1;
                    }
                    self.buffers.give_back(bid);
                    self.close(key, counters);
                } else if from < to {
                    conn.op = Op::Send { bid, from, to };
                    self.send(key);
                } else {
                    self.buffers.give_back(bid);
                    self.recv(key);
                }
            }
            Op::Starved => {}
        }
    }

    /// Re-arms receives that found no buffer, growing the pool when none is free.
    fn feed_starved(&mut self) -> io::Result<()> {
        while let Some(&key) = self.starved.last() {
            if !self.buffers.any_free() && !self.buffers.grow()? {
                return Ok(()); // the pool is at its most: they wait for a send to finish
            }
            self.starved.pop();
            if self.conns.get(key).is_some_and(|c| c.op == Op::Starved) {
                self.recv(key);
            }
        }
        Ok(())
    }

    /// Ends a connection from our side: its pending operation completes (a receive with 0),
    /// and the completion closes it.
    fn begin_close(&mut self, key: usize, counters: &mut Counters) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.closing = true;
        if conn.op == Op::Starved {
            self.close(key, counters);
        } else {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
    }

    fn close(&mut self, key: usize, counters: &mut Counters) {
        if self.conns.try_remove(key).is_some() {
            counters.active -= 1;
        }
    }

    fn submit_backlog(&mut self) -> io::Result<()> {
        let mut at = 0;
        while at < self.backlog.len() {
            {
                let mut sq = self.uring.submission();
                while at < self.backlog.len() {
                    // SAFETY: every entry's buffer is the ring's own memory (receives) or a
                    // buffer a connection holds until its send completes; descriptors stay
                    // open until their connection's last completion.
                    if unsafe { sq.push(&self.backlog[at]) }.is_err() {
                        break;
                    }
                    at += 1;
                }
            }
            if at < self.backlog.len() {
                match self.uring.submit() {
                    Ok(_) => {}
                    // The completion queue is full (its overflow not yet flushed) or the
                    // kernel is short of memory: reap first; the rest waits for the next turn.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.backlog.drain(..at);
        Ok(())
    }
}
