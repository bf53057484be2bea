//! One chat client in an event loop (process mode, and a fork-per-conn child): read lines and
//! act on them in the room, write what the room queued for this client.
//!
//! Fair turns: a drive acts on at most [`LINES_PER_TURN`] lines from at most
//! [`READS_PER_TURN`] reads, then yields to the other clients; before each line it asks the
//! room whether it may go on (senders held, the bus full, its own `/nick` unanswered, itself
//! behind or dropped). What it has not read stays in its socket, so TCP slows the client.

use std::cell::RefCell;
use std::io::{self, Write};
use std::rc::Rc;
use std::time::Instant;

use mio::net::TcpStream;
use protocol::stats::Counters;

use super::room::{ChatRoom, LocalRoom};
use super::{After, LineReader, Rules, said, too_slow};
use crate::service::{Drive, Session};

/// Lines a client may have acted on per turn.
const LINES_PER_TURN: usize = 256;
/// Reads per turn, each of at most [`READ_CHUNK`] bytes.
const READS_PER_TURN: usize = 4;
const READ_CHUNK: usize = 16 * 1024;

/// A connected chat client.
#[derive(Debug)]
pub struct ChatSession {
    stream: TcpStream,
    room: Rc<RefCell<LocalRoom>>,
    /// Its key in the loop, and its member key in the room.
    key: usize,
    lines: LineReader,
    rules: Rules,
    last_active: Instant,
    /// `/quit`, or the client closed its side: end once what it is owed is written.
    leaving: bool,
    /// The socket may hold bytes: not read dry since the last readable event. A drive for
    /// output alone (another client's line) then costs no read.
    readable: bool,
}

impl ChatSession {
    /// Joins a freshly accepted client to `room` as member `key`.
    pub fn new(stream: TcpStream, room: &mut ChatRoom, key: usize, rules: Rules) -> Self {
        room.0.borrow_mut().join(key as u64);
        ChatSession {
            stream,
            room: Rc::clone(&room.0),
            key,
            lines: LineReader::new(rules.max_line),
            rules,
            last_active: Instant::now(),
            leaving: false,
            readable: true,
        }
    }

    /// Writes what the room queued for this client, as far as the socket takes it.
    fn write_owed(&mut self, room: &mut LocalRoom, counters: &mut Counters) -> io::Result<()> {
        let me = self.key as u64;
        if let Some(outbox) = room.outbox(me) {
            let n = outbox.write_to(&mut self.stream)?;
            if n > 0 {
                counters.bytes_out += n;
                self.last_active = Instant::now();
                room.wrote(me);
            }
        }
        Ok(())
    }

    /// Acts on lines, reading more as needed, until the socket is empty (`false`), the room
    /// says wait (`false`), or the turn's budget is spent (`true`).
    fn read_lines(&mut self, room: &mut LocalRoom, counters: &mut Counters) -> io::Result<bool> {
        let me = self.key as u64;
        let mut reads = 0;
        for _ in 0..LINES_PER_TURN {
            if self.leaving || !room.admit(me) {
                return Ok(false);
            }
            if let Some(line) = self.lines.next_line() {
                room.count_line(me);
                self.leaving = said(room, me, line, &self.rules) == After::Quit;
                continue;
            }
            if !self.readable {
                return Ok(false);
            }
            if reads == READS_PER_TURN {
                return Ok(true);
            }
            reads += 1;
            match self.lines.read_from(&mut self.stream, READ_CHUNK) {
                Ok(0) => self.leaving = true,
                Ok(n) => {
                    counters.bytes_in += n as u64;
                    self.last_active = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(!self.leaving)
    }
}

impl Session for ChatSession {
    fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    fn note_peer_closed(&mut self) {
        // Read on to end-of-file, which ends the client's turn in the room.
        self.readable = true;
    }

    fn note_readable(&mut self) {
        self.readable = true;
    }

    fn last_active(&self) -> Instant {
        self.last_active
    }

    fn owed(&self) -> usize {
        self.room
            .try_borrow_mut()
            .ok()
            .and_then(|mut r| r.outbox(self.key as u64).map(|o| o.owed()))
            .unwrap_or(0)
    }

    fn drive(&mut self, _scratch: &mut [u8], counters: &mut Counters) -> io::Result<Drive> {
        let room = Rc::clone(&self.room);
        let mut room = room.borrow_mut();
        let me = self.key as u64;
        if room.kicked(me).is_none() {
            self.write_owed(&mut room, counters)?;
        }
        let budget_spent = if room.kicked(me).is_none() {
            self.read_lines(&mut room, counters)?
        } else {
            false
        };
        if let Some(why) = room.kicked(me) {
            // Best effort: a client this far behind may not take even this. What it sent and
            // was not yet acted on is dropped with it.
            let _ = self.stream.write(&too_slow(why, room.limits()));
            return Ok(Drive::Finished);
        }
        self.write_owed(&mut room, counters)?;
        let owed = room.outbox(me).map_or(0, |o| o.owed());
        Ok(match (self.leaving, owed, budget_spent) {
            (true, 0, _) => Drive::Finished,
            (_, _, true) => Drive::Yielded,
            _ => Drive::Waiting,
        })
    }
}

impl Drop for ChatSession {
    fn drop(&mut self) {
        // The loop never holds the room while it drops a session.
        if let Ok(mut room) = self.room.try_borrow_mut() {
            room.leave(self.key as u64);
        }
    }
}
