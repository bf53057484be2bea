//! One echo connection in an event loop (the echo service's session): bytes read are written
//! straight back; what the kernel will not take yet is kept, up to a bound, and reading stops
//! until the client drains it.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::Instant;

use mio::net::TcpStream;

use protocol::stats::Counters;

use super::reread::Reread;
use crate::service::{Drive, Session};

/// An accepted client connection.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    /// Echo bytes the socket would not take yet; empty (and unallocated) when idle, so ten
    /// thousand idle connections cost only their sockets.
    owed: Vec<u8>,
    /// The client shut down its sending side (read returned 0).
    read_closed: bool,
    /// When bytes last moved either way (for the idle timeout).
    last_active: Instant,
    /// epoll reported the peer's FIN (EPOLLRDHUP): read to end-of-file from now on, since no
    /// further edge will announce it.
    peer_closed: bool,
    /// Bytes it may owe before reading stops (`--max-unsent`).
    max_owed: usize,
    /// Keep `last_active` current (only with `--idle-timeout`: a clock read per read is a
    /// measurable share of a 64-byte round trip's user time).
    watch_idle: bool,
    /// Whether to read again right after echoing a short read (see [`Reread`]).
    reread: Reread,
    /// The next read is a re-read: its outcome teaches `reread`.
    rereading: bool,
}

/// Reads per [`Connection::drive_bounded`] call before yielding, so one fast client cannot starve the
/// others served by the same loop.
const READS_PER_TURN: usize = 16;

impl Session for Connection {
    fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    fn note_peer_closed(&mut self) {
        self.peer_closed = true;
    }

    fn last_active(&self) -> Instant {
        self.last_active
    }

    fn owed(&self) -> usize {
        self.owed.len()
    }

    fn drive(&mut self, scratch: &mut [u8], counters: &mut Counters) -> io::Result<Drive> {
        self.drive_bounded(scratch, self.max_owed, counters)
    }
}

impl Connection {
    /// Wraps a freshly accepted socket that may owe at most `max_owed` bytes; `watch_idle`
    /// keeps its last activity current for an idle timeout.
    pub fn new(stream: TcpStream, max_owed: usize, watch_idle: bool) -> Self {
        Connection {
            stream,
            owed: Vec::new(),
            read_closed: false,
            last_active: Instant::now(),
            peer_closed: false,
            max_owed,
            watch_idle,
            reread: Reread::default(),
            rereading: false,
        }
    }

    /// Bytes allocated for what is owed (never more than the bound on unsent data).
    pub fn owed_capacity(&self) -> usize {
        self.owed.capacity()
    }

    /// Moves bytes from the client back to it until the socket would block, the bound on
    /// unsent data is reached, or the turn's budget is spent. `scratch` is the worker's shared
    /// read buffer; `Err` is an I/O error that ends the connection.
    pub fn drive_bounded(
        &mut self,
        scratch: &mut [u8],
        max_owed: usize,
        counters: &mut Counters,
    ) -> io::Result<Drive> {
        for _ in 0..READS_PER_TURN {
            if !self.owed.is_empty() {
                let n = write_some(&mut self.stream, &self.owed)?;
                counters.bytes_out += n as u64;
                self.owed.drain(..n);
                if self.owed.is_empty() {
                    // Give the memory back: most connections are idle most of the time.
                    self.owed = Vec::new();
                }
            }
            // Invariant from here: either nothing is owed, or the socket is full and a
            // writable edge will wake us.
            if self.read_closed {
                if self.owed.is_empty() {
                    // Send FIN after the last echoed byte; the peer may already be gone.
                    let _ = self.stream.shutdown(Shutdown::Write);
                    return Ok(Drive::Finished);
                }
                return Ok(Drive::Waiting);
            }
            let room = max_owed.saturating_sub(self.owed.len()).min(scratch.len());
            if room == 0 {
                // Back-pressure: leave the bytes in the kernel (and the client's window
                // closes) until the client reads its echo.
                return Ok(Drive::Waiting);
            }
            let n = match self.stream.read(&mut scratch[..room]) {
                Ok(0) => {
                    self.read_closed = true;
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::mem::take(&mut self.rereading) {
                        self.reread.found(false);
                    }
                    return Ok(Drive::Waiting);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if std::mem::take(&mut self.rereading) {
                self.reread.found(true);
            }
            counters.bytes_in += n as u64;
            if self.watch_idle {
                self.last_active = Instant::now();
            }
            // A short read emptied the socket's queue; with edge-triggered epoll, new bytes
            // bring a new edge, so the read that would only confirm EAGAIN may be skipped (one
            // syscall per round trip), unless this client's next message tends to be there
            // already ([`Reread`] decides). Not once the peer's FIN is known: no edge follows.
            let drained = n < room && !self.peer_closed;
            let data = &scratch[..n];
            // Echo straight from the scratch buffer; copy only what the socket refuses.
            let sent = if self.owed.is_empty() {
                write_some(&mut self.stream, data)?
            } else {
                0
            };
            counters.bytes_out += sent as u64;
            let rest = &data[sent..];
            let need = self.owed.len() + rest.len();
            if need > self.owed.capacity() {
                // Grow as a Vec would (doubling), but never past the bound: left to itself,
                // doubling takes the capacity to almost twice --max-unsent (a never-reading
                // client then cost ~80 KiB, not the 64 KiB promised).
                let target = (self.owed.capacity() * 2).clamp(need, max_owed.max(need));
                self.owed.reserve_exact(target - self.owed.len());
            }
            self.owed.extend_from_slice(rest);
            if drained {
                // Anything still owed is flushed on the writable edge; reading more would
                // only add to it.
                if !self.owed.is_empty() || !self.reread.after_short_read() {
                    return Ok(Drive::Waiting);
                }
                self.rereading = true;
            }
        }
        Ok(Drive::Yielded)
    }
}

/// Writes as much of `buf` as the socket takes now; 0 when it is full.
fn write_some(stream: &mut TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match stream.write(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that sends and never reads: what the server holds for it is bounded by
    /// `max_owed`, in bytes allocated (capacity), not only in bytes counted.
    #[test]
    fn what_a_never_reading_client_is_owed_never_outgrows_the_bound() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // Small kernel buffers so the echo backs up into `owed` quickly.
        let sock = socket2::SockRef::from(&server);
        sock.set_send_buffer_size(4096).unwrap();
        server.set_nonblocking(true).unwrap();
        let mut conn = Connection::new(TcpStream::from_std(server), 64 * 1024, false);
        client.set_nonblocking(true).unwrap();
        let max_owed = 64 * 1024;
        let mut scratch = vec![0u8; 16 * 1024];
        let mut counters = Counters::default();
        let chunk = vec![b'x'; 7_777]; // odd sizes defeat exact doubling
        for _ in 0..2_000 {
            let _ = client.write(&chunk);
            let _ = conn.drive_bounded(&mut scratch, max_owed, &mut counters);
            assert!(conn.owed() <= max_owed);
            assert!(
                conn.owed_capacity() <= max_owed,
                "capacity {} over the bound {max_owed}",
                conn.owed_capacity()
            );
        }
        assert!(
            conn.owed() > max_owed / 2,
            "the test did back up: {}",
            conn.owed()
        );
    }
}
