//! One chat client in an event loop (process mode, and a fork-per-conn child): read lines and
//! act on them in the room, write what the room queued for this client.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::time::Instant;

use mio::net::TcpStream;
use protocol::stats::Counters;

use super::room::{ChatRoom, LocalRoom};
use super::{After, LineReader, said, too_slow};
use crate::service::{Drive, Session};

/// Reads per drive before the other clients get their turn.
const READS_PER_TURN: usize = 16;

/// A connected chat client.
#[derive(Debug)]
pub struct ChatSession {
    stream: TcpStream,
    room: Rc<RefCell<LocalRoom>>,
    /// Its key in the loop, and its member key in the room.
    key: usize,
    lines: LineReader,
    max_line: usize,
    last_active: Instant,
    /// `/quit`, or the client closed its side: end once what it is owed is written.
    leaving: bool,
}

impl ChatSession {
    /// Joins a freshly accepted client to `room` as member `key`.
    pub fn new(stream: TcpStream, room: &mut ChatRoom, key: usize, max_line: usize) -> Self {
        room.0.borrow_mut().join(key as u64);
        ChatSession {
            stream,
            room: Rc::clone(&room.0),
            key,
            lines: LineReader::new(max_line),
            max_line,
            last_active: Instant::now(),
            leaving: false,
        }
    }

    /// Writes what the room queued for this client, as far as the socket takes it.
    fn write_owed(&mut self, room: &mut LocalRoom, counters: &mut Counters) -> io::Result<()> {
        if let Some(outbox) = room.outbox(self.key as u64) {
            let n = outbox.write_to(&mut self.stream)?;
            if n > 0 {
                counters.bytes_out += n;
                self.last_active = Instant::now();
            }
        }
        Ok(())
    }

    /// Reads and acts on lines until the socket is empty, the budget is spent (`true`), or
    /// the bus is too full to take more.
    fn read_lines(
        &mut self,
        room: &mut LocalRoom,
        scratch: &mut [u8],
        counters: &mut Counters,
    ) -> io::Result<bool> {
        let (me, max_line) = (self.key as u64, self.max_line);
        for _ in 0..READS_PER_TURN {
            if self.leaving {
                return Ok(false);
            }
            if room.bus_full() {
                room.pause(self.key);
                return Ok(false);
            }
            match self.stream.read(scratch) {
                Ok(0) => self.leaving = true,
                Ok(n) => {
                    counters.bytes_in += n as u64;
                    self.last_active = Instant::now();
                    let mut quit = false;
                    self.lines.feed(&scratch[..n], |line| {
                        if !quit {
                            room.count_line();
                            quit = said(room, me, line, max_line) == After::Quit;
                        }
                    });
                    self.leaving |= quit;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
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

    fn drive(&mut self, scratch: &mut [u8], counters: &mut Counters) -> io::Result<Drive> {
        let room = Rc::clone(&self.room);
        let mut room = room.borrow_mut();
        let me = self.key as u64;
        if !room.is_kicked(me) {
            self.write_owed(&mut room, counters)?;
        }
        let budget_spent = if room.is_kicked(me) {
            false
        } else {
            self.read_lines(&mut room, scratch, counters)?
        };
        if room.is_kicked(me) {
            // Best effort: a client this far behind may not take even this.
            let _ = self.stream.write(&too_slow(room.max_unsent()));
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
