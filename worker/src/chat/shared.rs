//! Thread mode's chat: the tutorial's `ChatServer` done right. One table of clients shared by
//! every connection; each client has a reader thread (the connection's own: reads lines, acts
//! on them) and a writer thread (drains the client's queue to its socket). A sender only
//! queues under short locks and never writes another client's socket, so no lock is ever
//! held across a socket write.
//!
//! Flow control as in the other modes ([`super::flow`]): before acting on each line, a reader
//! waits while a client that reads is behind (or while it is behind itself); its socket is
//! not read meanwhile, so TCP slows its client. A client that stops reading stops holding
//! anyone after [`super::flow::CATCH_UP`] and is dropped by the soft or hard limit.

use std::collections::HashMap;
use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use protocol::stats::Counters;

use super::flow::{Bucket, Overrun, Standing};
use super::roster::Roster;
use super::{
    After, Floor, Limits, LineReader, Outbox, Rules, in_use, joined, left, renamed, said, too_slow,
    welcome,
};
use crate::service::End;

/// Stack of a client's writer thread: it only moves bytes.
const WRITER_STACK: usize = 64 * 1024;
/// Read buffer of a client's reader thread.
const READ_BUF: usize = 16 * 1024;
/// How long a departing client's last lines (its `* bye`) may take to be written.
const LAST_WRITE: Duration = Duration::from_secs(5);
/// Longest a held reader sleeps before it looks again.
const RECHECK: Duration = Duration::from_millis(100);

/// What one client is owed, under its lock.
#[derive(Debug, Default)]
struct Queue {
    outbox: Outbox,
    /// Bytes its writer took and has not written yet.
    inflight: usize,
    standing: Standing,
    /// In the room's gate.
    listed_behind: bool,
    /// Fell too far behind: the writer stops and the reader ends the connection.
    kicked: Option<Overrun>,
    /// The reader is done: the writer writes what is left and ends.
    closed: bool,
    /// A write failed (the client is gone): its reader stops waiting for it to catch up.
    broken: bool,
}

impl Queue {
    fn owed(&self) -> usize {
        self.outbox.owed() + self.inflight
    }
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

/// Clients behind the mark, and until when each holds the senders.
#[derive(Debug, Default)]
struct Gate {
    behind: HashMap<u64, Instant>,
    hold_until: Option<Instant>,
}

/// Names held (each by one client) and the roster `/who` answers from.
#[derive(Debug, Default)]
struct Names {
    holder: HashMap<String, u64>,
    roster: Roster,
}

/// Every client of a thread-mode server.
#[derive(Debug)]
pub struct SharedRoom {
    members: RwLock<HashMap<u64, Arc<Member>>>,
    next: AtomicU64,
    limits: Limits,
    gate: Mutex<Gate>,
    /// Signalled when a client catches up (the gate may open).
    caught_up: Condvar,
    names: Mutex<Names>,
}

impl SharedRoom {
    /// An empty room bounded by `limits`.
    pub fn new(limits: Limits) -> SharedRoom {
        SharedRoom {
            members: RwLock::new(HashMap::new()),
            next: AtomicU64::new(0),
            limits,
            gate: Mutex::new(Gate::default()),
            caught_up: Condvar::new(),
            names: Mutex::new(Names::default()),
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
        rules: Rules,
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
        lock(&self.names).roster.add(&name);
        let mut seat = Seat {
            room: self,
            me,
            counted: Counters::default(),
        };
        // Greeted before it is in the table, so no one else's line can come first.
        count(&mut seat.counted, self.push(me, &member, &welcome(&name)));
        self.members
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(me, Arc::clone(&member));
        seat.broadcast(Some(me), joined(&name));
        tally(&std::mem::take(&mut seat.counted));
        let end = std::thread::scope(|s| {
            let writer = std::thread::Builder::new()
                .name("chat-writer".into())
                .stack_size(WRITER_STACK)
                .spawn_scoped(s, || write_loop(writer_socket, self, me, &member, tally));
            let end = match writer {
                Ok(_) => read_loop(stream, &mut seat, &member, rules, tally),
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
            {
                let mut names = lock(&self.names);
                names.roster.remove(&name);
                if names.holder.get(&name) == Some(&me) {
                    names.holder.remove(&name);
                }
            }
            let line = left(&name);
            for (&id, m) in self.table().iter() {
                count(&mut counted, self.push(id, m, &line));
            }
        }
        let mut q = lock(&member.queue);
        q.closed = true;
        self.ungate(me, &mut q);
        if let Some(why) = q.kicked {
            // Its writer stopped; the socket may be full. Best effort, then cut it.
            drop(q);
            let _ = nix::sys::socket::send(
                std::os::fd::AsRawFd::as_raw_fd(&member.socket),
                &too_slow(why, &self.limits),
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

    /// Queues `line` for member `id`.
    fn push(&self, id: u64, m: &Member, line: &Arc<[u8]>) -> Pushed {
        let mut q = lock(&m.queue);
        if q.kicked.is_some() || q.closed {
            return Pushed::Skipped;
        }
        let was_idle = q.outbox.owed() == 0;
        let pushed = q.outbox.push(Arc::clone(line), self.limits.hard);
        let verdict = match pushed {
            Ok(()) => self.restand(id, &mut q, Instant::now()),
            Err(_) => Err(Overrun::Hard),
        };
        if let Err(why) = verdict {
            q.kicked = Some(why);
            q.outbox.clear();
            self.ungate(id, &mut q);
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

    /// Weighs member `id`'s queue against the limits and updates the gate.
    fn restand(&self, id: u64, q: &mut Queue, now: Instant) -> Result<(), Overrun> {
        q.standing.update(q.owed(), now, &self.limits)?;
        match (q.standing.holds_until(&self.limits), q.listed_behind) {
            (Some(until), listed) => {
                let mut gate = lock(&self.gate);
                if !listed || gate.behind.get(&id) != Some(&until) {
                    q.listed_behind = true;
                    gate.behind.insert(id, until);
                    gate.hold_until = gate.behind.values().max().copied();
                }
            }
            (None, true) => self.ungate(id, q),
            _ => {}
        }
        Ok(())
    }

    /// Member `id` no longer holds anyone.
    fn ungate(&self, id: u64, q: &mut Queue) {
        if std::mem::take(&mut q.listed_behind) {
            let mut gate = lock(&self.gate);
            gate.behind.remove(&id);
            gate.hold_until = gate.behind.values().max().copied();
            self.caught_up.notify_all();
        }
    }

    /// Waits until member `id` may have its next line acted on; `false` if it must go.
    fn wait_turn(&self, member: &Member) -> bool {
        loop {
            let self_behind = {
                let q = lock(&member.queue);
                if q.kicked.is_some() || q.broken {
                    return false;
                }
                q.standing.behind()
            };
            let gate = lock(&self.gate);
            let now = Instant::now();
            let hold = gate.hold_until.filter(|&t| now < t);
            if hold.is_none() && !self_behind {
                return true;
            }
            let wait = hold.map_or(RECHECK, |t| (t - now).min(RECHECK));
            drop(self.caught_up.wait_timeout(gate, wait));
        }
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

/// The reader thread's loop: lines in, acted on, until the client is done.
fn read_loop(
    mut stream: TcpStream,
    seat: &mut Seat<'_>,
    member: &Member,
    rules: Rules,
    tally: &(dyn Fn(&Counters) + Sync),
) -> End {
    let mut lines = LineReader::new(rules.max_line);
    let mut bucket = Bucket::default();
    let rate = seat.room.limits.rate;
    loop {
        loop {
            // Held here, its socket unread: TCP slows its client.
            if !seat.room.wait_turn(member) {
                return End::Eof;
            }
            if let Some(rate) = &rate {
                let now = Instant::now();
                if let Err(at) = bucket.ready(now, rate) {
                    // Past its --chat-rate: read more slowly (this thread is its own).
                    std::thread::sleep((at - now).min(RECHECK));
                    continue;
                }
            }
            let Some(line) = lines.next_line() else {
                break;
            };
            if let Some(rate) = &rate {
                bucket.take(Instant::now(), rate);
            }
            seat.counted.chat_lines += 1;
            let me = seat.me;
            let quit = said(seat, me, line, &rules) == After::Quit;
            tally(&std::mem::take(&mut seat.counted));
            if quit {
                return End::Eof;
            }
        }
        match lines.read_from(&mut stream, READ_BUF) {
            Ok(0) => return End::Eof,
            Ok(n) => seat.counted.bytes_in += n as u64,
            Err(e) => {
                if let Some(end) = End::after_read_error(&e) {
                    return end;
                }
            }
        }
    }
}

/// The writer thread's loop: whatever is queued, written without holding any lock.
fn write_loop(
    socket: TcpStream,
    room: &SharedRoom,
    id: u64,
    member: &Member,
    tally: &(dyn Fn(&Counters) + Sync),
) {
    let mut progress = Progress {
        socket,
        room,
        id,
        member,
    };
    loop {
        let mut batch = {
            let mut q = lock(&member.queue);
            while q.outbox.owed() == 0 && q.kicked.is_none() && !q.closed {
                q = member.changed.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.kicked.is_some() || (q.closed && q.outbox.owed() == 0) {
                return;
            }
            // Taken whole and counted as in flight until written, so the bound holds.
            let batch = std::mem::take(&mut q.outbox);
            q.inflight = batch.owed();
            batch
        };
        match batch.write_to(&mut progress) {
            Ok(n) => tally(&Counters {
                bytes_out: n,
                ..Counters::default()
            }),
            Err(_) => {
                lock(&member.queue).broken = true;
                let _ = progress.socket.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// A client's socket that tells the room each time it took bytes (the client may have
/// caught up), taking the queue's lock only between writes.
struct Progress<'a> {
    socket: TcpStream,
    room: &'a SharedRoom,
    id: u64,
    member: &'a Member,
}

impl Write for Progress<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(b)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = self.socket.write_vectored(bufs)?;
        let mut q = lock(&self.member.queue);
        q.inflight = q.inflight.saturating_sub(n);
        let now = Instant::now();
        q.standing.progressed(now);
        // Writing only shrinks the queue: no limit can be newly broken here.
        let _ = self.room.restand(self.id, &mut q, now);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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
        for (&id, m) in table.iter().filter(|(k, _)| Some(**k) != except) {
            count(&mut self.counted, self.room.push(id, m, &line));
        }
    }

    fn tell(&mut self, me: u64, line: Arc<[u8]>) {
        if let Some(m) = self.room.table().get(&me) {
            count(&mut self.counted, self.room.push(me, m, &line));
        }
    }

    fn claim(&mut self, me: u64, name: &str) {
        let Some(member) = self.room.table().get(&me).cloned() else {
            return;
        };
        let old = {
            let mut names = lock(&self.room.names);
            if names.holder.get(name).is_some_and(|&h| h != me) {
                drop(names);
                self.tell(me, in_use(name));
                return;
            }
            let old = std::mem::replace(&mut *lock(&member.name), name.to_string());
            if names.holder.get(&old) == Some(&me) {
                names.holder.remove(&old);
            }
            names.holder.insert(name.to_string(), me);
            names.roster.rename(&old, name);
            old
        };
        self.broadcast(None, renamed(&old, name));
    }

    fn who(&mut self) -> Arc<[u8]> {
        lock(&self.room.names).roster.who()
    }
}
