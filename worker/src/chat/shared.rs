//! Thread mode's chat: the tutorial's `ChatServer` done right. One table of clients shared by
//! every connection; each client has a reader thread (the connection's own: reads lines, acts
//! on them) and a writer thread (drains the client's queue to its socket). A sender only
//! queues under short locks and never writes another client's socket, so no lock is ever
//! held across a socket write, and a client that stops reading stalls nobody: once it falls
//! `--max-unsent` behind it is disconnected.

use std::collections::HashMap;
use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use protocol::stats::Counters;

use super::{After, Floor, Line, LineReader, Outbox, joined, left, said, too_slow, welcome};
use crate::service::End;

/// Stack of a client's writer thread: it only moves bytes.
const WRITER_STACK: usize = 64 * 1024;
/// Read buffer of a client's reader thread.
const READ_BUF: usize = 16 * 1024;
/// How long a departing client's last lines (its `* bye`) may take to be written.
const LAST_WRITE: Duration = Duration::from_secs(5);

/// What one client is owed, under its lock.
#[derive(Debug, Default)]
struct Queue {
    outbox: Outbox,
    /// Fell too far behind: the writer stops and the reader ends the connection.
    kicked: bool,
    /// The reader is done: the writer writes what is left and ends.
    closed: bool,
}

/// One client in the table.
#[derive(Debug)]
struct Member {
    name: Mutex<String>,
    queue: Mutex<Queue>,
    /// Signalled when the queue gains lines, or the client is kicked or closed.
    changed: Condvar,
    /// Its socket, to wake its reader when it is kicked.
    socket: TcpStream,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked mid-update left plain data; carry on with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every client of a thread-mode server.
#[derive(Debug)]
pub struct SharedRoom {
    members: RwLock<HashMap<u64, Arc<Member>>>,
    next: AtomicU64,
    max_unsent: usize,
}

impl SharedRoom {
    /// An empty room whose clients may fall `max_unsent` bytes behind.
    pub fn new(max_unsent: usize) -> SharedRoom {
        SharedRoom {
            members: RwLock::new(HashMap::new()),
            next: AtomicU64::new(0),
            max_unsent,
        }
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<Member>>> {
        self.members.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves one client until it leaves, fails, idles out or falls too far behind.
    pub fn serve(
        &self,
        stream: TcpStream,
        idle: Option<Duration>,
        max_line: usize,
        tally: &(dyn Fn(&Counters) + Sync),
    ) -> End {
        if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(idle).is_err() {
            return End::Error;
        }
        let _ = stream.set_nodelay(true);
        let (Ok(socket), Ok(writer_socket)) = (stream.try_clone(), stream.try_clone()) else {
            return End::Error;
        };
        let me = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("guest{me}");
        let member = Arc::new(Member {
            name: Mutex::new(name.clone()),
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            socket,
        });
        self.members
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(me, Arc::clone(&member));
        let mut seat = Seat {
            room: self,
            me,
            counted: Counters::default(),
        };
        seat.tell(me, welcome(&name));
        seat.broadcast(Some(me), joined(&name));
        tally(&std::mem::take(&mut seat.counted));
        let end = std::thread::scope(|s| {
            let writer = std::thread::Builder::new()
                .name("chat-writer".into())
                .stack_size(WRITER_STACK)
                .spawn_scoped(s, || write_loop(writer_socket, &member, tally));
            let end = match writer {
                Ok(_) => read_loop(stream, &mut seat, max_line, tally),
                Err(_) => End::Error,
            };
            seat.counted.add(&self.leave(me, &member));
            tally(&std::mem::take(&mut seat.counted));
            end
        });
        let _ = member.socket.shutdown(Shutdown::Write);
        end
    }

    /// Takes `me` out of the table, tells everyone, and lets its writer finish; returns what
    /// that counted.
    fn leave(&self, me: u64, member: &Member) -> Counters {
        let mut counted = Counters::default();
        let removed = self
            .members
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&me);
        if removed.is_some() {
            let name = lock(&member.name).clone();
            let line = left(&name);
            for m in self.table().values() {
                count(&mut counted, push(m, &line, self.max_unsent));
            }
        }
        let mut q = lock(&member.queue);
        q.closed = true;
        if q.kicked {
            // Its writer stopped; the socket may be full. Best effort, then cut it.
            drop(q);
            let _ = nix::sys::socket::send(
                std::os::fd::AsRawFd::as_raw_fd(&member.socket),
                &too_slow(self.max_unsent),
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            );
            let _ = member.socket.shutdown(Shutdown::Both);
        } else {
            drop(q);
            // A client that never reads cannot hold its writer (and this thread) forever.
            let _ = member.socket.set_write_timeout(Some(LAST_WRITE));
        }
        member.changed.notify_one();
        counted
    }
}

/// What became of a line queued for a client.
#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    Queued,
    /// It would not fit: the client is cut.
    Kicked,
    /// The client is already going.
    Skipped,
}

/// Queues `line` for `m`.
fn push(m: &Member, line: &Arc<[u8]>, max: usize) -> Pushed {
    let mut q = lock(&m.queue);
    if q.kicked || q.closed {
        return Pushed::Skipped;
    }
    let was_idle = q.outbox.owed() == 0;
    if q.outbox.push(Arc::clone(line), max).is_err() {
        q.kicked = true;
        q.outbox.clear();
        drop(q);
        m.changed.notify_one();
        // Wake its reader, which ends the connection.
        let _ = m.socket.shutdown(Shutdown::Read);
        return Pushed::Kicked;
    }
    drop(q);
    if was_idle {
        m.changed.notify_one();
    }
    Pushed::Queued
}

/// The reader thread's loop: lines in, acted on, until the client is done.
fn read_loop(
    mut stream: TcpStream,
    seat: &mut Seat<'_>,
    max_line: usize,
    tally: &(dyn Fn(&Counters) + Sync),
) -> End {
    let mut lines = LineReader::new(max_line);
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return End::Eof,
            Ok(n) => {
                seat.counted.bytes_in += n as u64;
                let mut quit = false;
                lines.feed(&buf[..n], |line: Line<'_>| {
                    if !quit {
                        seat.counted.chat_lines += 1;
                        let me = seat.me;
                        quit = said(seat, me, line, max_line) == After::Quit;
                    }
                });
                tally(&std::mem::take(&mut seat.counted));
                if quit {
                    return End::Eof;
                }
            }
            Err(e) => {
                if let Some(end) = End::after_read_error(&e) {
                    return end;
                }
            }
        }
    }
}

/// The writer thread's loop: whatever is queued, written without holding any lock.
fn write_loop(mut socket: TcpStream, member: &Member, tally: &(dyn Fn(&Counters) + Sync)) {
    loop {
        let mut batch = {
            let mut q = lock(&member.queue);
            while q.outbox.owed() == 0 && !q.kicked && !q.closed {
                q = member.changed.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.kicked || (q.closed && q.outbox.owed() == 0) {
                return;
            }
            // Taken whole: what arrives meanwhile counts against the bound afresh, so a
            // client may be up to twice `max_unsent` behind before it is cut.
            std::mem::take(&mut q.outbox)
        };
        match batch.write_to(&mut socket) {
            Ok(n) => tally(&Counters {
                bytes_out: n,
                ..Counters::default()
            }),
            Err(_) => {
                let _ = socket.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

fn count(c: &mut Counters, pushed: Pushed) {
    match pushed {
        Pushed::Queued => c.chat_deliveries += 1,
        Pushed::Kicked => c.slow_consumers += 1,
        Pushed::Skipped => {}
    }
}

/// The room as one thread-mode client sees it.
struct Seat<'a> {
    room: &'a SharedRoom,
    me: u64,
    counted: Counters,
}

impl Floor for Seat<'_> {
    fn name(&self, me: u64) -> String {
        self.room
            .table()
            .get(&me)
            .map(|m| lock(&m.name).clone())
            .unwrap_or_default()
    }

    fn broadcast(&mut self, except: Option<u64>, line: Arc<[u8]>) {
        let table = self.room.table();
        for (_, m) in table.iter().filter(|(k, _)| Some(**k) != except) {
            count(&mut self.counted, push(m, &line, self.room.max_unsent));
        }
    }

    fn tell(&mut self, me: u64, line: Arc<[u8]>) {
        if let Some(m) = self.room.table().get(&me) {
            count(&mut self.counted, push(m, &line, self.room.max_unsent));
        }
    }

    fn rename(&mut self, me: u64, name: &str) {
        if let Some(m) = self.room.table().get(&me) {
            *lock(&m.name) = name.to_string();
        }
    }

    fn roster(&self, listed: usize) -> (usize, Vec<String>) {
        let table = self.room.table();
        let mut names: Vec<String> = table.values().map(|m| lock(&m.name).clone()).collect();
        names.sort();
        let n = names.len();
        names.truncate(listed);
        (n, names)
    }
}
