//! One load thread: a mio event loop over its share of the connections.
//!
//! Each connection sends messages of `size` bytes and checks every echoed byte against what it
//! sent: message `seq` of connection `id` is a per-connection template whose first 16 bytes are
//! replaced by a hash of `(id, seq)`, so a byte out of place, from another message or another
//! connection is caught. Closed loop keeps `pipeline` messages in flight per connection; open
//! loop (`rate`) sends on a fixed schedule and measures latency from the *scheduled* time, so a
//! stalled server cannot hide its delay (no coordinated omission).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// Error kinds, in report order.
pub const ERROR_KINDS: [&str; 6] = ["refused", "reset", "timeout", "short", "wrong", "other"];
pub(crate) const REFUSED: usize = 0;
pub(crate) const RESET: usize = 1;
pub(crate) const TIMEOUT: usize = 2;
pub(crate) const SHORT: usize = 3;
pub(crate) const WRONG: usize = 4;
pub(crate) const OTHER: usize = 5;

/// What every connection does.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Server address.
    pub target: SocketAddr,
    /// Message size in bytes.
    pub size: usize,
    /// Messages in flight per connection (closed loop).
    pub pipeline: usize,
    /// Messages per second per connection (open loop), or `None` for closed loop.
    pub rate_per_conn: Option<f64>,
    /// Stop sending new messages this long after the start (`None`: when the budget is spent).
    pub duration: Option<Duration>,
    /// When sending stops; set by [`run`] when the clock starts (ignored on input).
    pub deadline: Instant,
    /// A connection with an unanswered message and no progress for this long has timed out.
    pub timeout: Duration,
    /// Reconnect after this many round trips (connection churn).
    pub reconnect_every: Option<u64>,
    /// Open all connections at the same instant (non-blocking) instead of one after another.
    pub burst: bool,
}

/// What one thread measured.
pub struct Outcome {
    /// Round-trip latency, microseconds.
    pub latency: Histogram<u64>,
    /// Time from connect to first complete echo, microseconds, one value per connection.
    pub first_echo: Histogram<u64>,
    /// Completed round trips per connection slot.
    pub per_conn: Vec<u64>,
    /// Bytes written.
    pub bytes_out: u64,
    /// Bytes read (and verified).
    pub bytes_in: u64,
    /// Errors by kind ([`ERROR_KINDS`]).
    pub errors: [u64; 6],
    /// Connections opened (more than the slots with `reconnect_every`).
    pub connections_opened: u64,
    /// First error message seen, for the report.
    pub first_error: Option<String>,
}

/// Shared between the load threads and the main thread.
pub struct Shared {
    /// Round trips completed so far (for the progress line).
    pub round_trips: AtomicU64,
    /// Set by the main thread when it has sampled the server; threads then close up.
    pub release: AtomicBool,
}

/// What a load thread's connections share while it runs: where sockets are registered, the
/// plan, the tally, and the counters the progress line reads.
struct LoadThread<'a> {
    registry: mio::Registry,
    plan: Plan,
    out: Outcome,
    shared: &'a Shared,
}

/// The first 16 bytes of message `seq` on connection `id` (shared with the threaded shape).
pub(crate) fn header(id: u64, seq: u64) -> [u8; 16] {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = mix(id.rotate_left(32) ^ seq);
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&a.to_le_bytes());
    h[8..].copy_from_slice(&mix(a).to_le_bytes());
    h
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Open,
    /// Finished its work, kept open until the main thread has sampled the server.
    Idle,
    Dead,
}

struct Conn {
    id: u64,
    slot: usize,
    stream: Option<TcpStream>,
    state: State,
    template: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    next_seq: u64,
    recv_seq: u64,
    recv_off: usize,
    recv_header: [u8; 16],
    /// Send (or scheduled) time of each message in flight, oldest first.
    inflight: VecDeque<Instant>,
    connect_started: Instant,
    got_first_echo: bool,
    since_connect: u64,
    last_progress: Instant,
}

impl Conn {
    fn queue_message(&mut self, at: Instant) {
        let h = header(self.id, self.next_seq);
        let n = self.template.len();
        let head = n.min(16);
        if self.out_pos > 0 && self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        self.out.extend_from_slice(&h[..head]);
        self.out.extend_from_slice(&self.template[head..]);
        self.next_seq += 1;
        self.inflight.push_back(at);
    }
}

/// Runs `slots` connection slots (ids from `first_id`) until the plan's duration, the request
/// budget (`requests` per slot) or failure; keeps idle connections open until released.
/// Every load thread and the main thread meet at `barrier`: the clock starts there. The
/// outcome goes to `done` as soon as the load is over; the connections stay open until
/// `shared.release` is set, so the server can be sampled while it still holds them.
pub fn run(
    plan: &Plan,
    first_id: u64,
    slots: usize,
    requests: Option<u64>,
    barrier: &Barrier,
    shared: &Arc<Shared>,
    done: &std::sync::mpsc::Sender<Outcome>,
) {
    let mut out = Outcome {
        latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"),
        first_echo: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"),
        per_conn: vec![0; slots],
        bytes_out: 0,
        bytes_in: 0,
        errors: [0; 6],
        connections_opened: 0,
        first_error: None,
    };
    let Some((mut poll, registry)) = Poll::new()
        .ok()
        .and_then(|p| p.registry().try_clone().ok().map(|r| (p, r)))
    else {
        out.errors[OTHER] += slots as u64;
        barrier.wait();
        let _ = done.send(out);
        return;
    };
    let mut t = LoadThread {
        registry,
        plan: plan.clone(),
        out,
        shared,
    };
    let mut conns: Vec<Conn> = Vec::with_capacity(slots);
    let mut rng_template = first_id.wrapping_mul(6364136223846793005) | 1;
    for slot in 0..slots {
        let mut template = vec![0u8; plan.size];
        for b in template.iter_mut() {
            rng_template ^= rng_template << 13;
            rng_template ^= rng_template >> 7;
            rng_template ^= rng_template << 17;
            *b = rng_template as u8;
        }
        conns.push(Conn {
            id: first_id + slot as u64,
            slot,
            stream: None,
            state: State::Dead,
            template,
            out: Vec::new(),
            out_pos: 0,
            next_seq: 0,
            recv_seq: 0,
            recv_off: 0,
            recv_header: [0; 16],
            inflight: VecDeque::new(),
            connect_started: Instant::now(),
            got_first_echo: false,
            since_connect: 0,
            last_progress: Instant::now(),
        });
    }
    let mut budget: Vec<Option<u64>> = vec![requests; slots];
    // Open-loop schedule: (due time, slot), earliest first.
    let mut schedule: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    let interval = plan.rate_per_conn.map(|r| Duration::from_secs_f64(1.0 / r));

    // Sequential mode connects before the clock starts; burst mode connects all at once when
    // it starts, and time to first echo then includes the connect.
    if !plan.burst {
        for c in conns.iter_mut() {
            t.connect(c);
        }
    }
    barrier.wait();
    let start = Instant::now();
    let plan = &Plan {
        deadline: start + plan.duration.unwrap_or(Duration::from_secs(86_400 * 365)),
        ..plan.clone()
    };
    t.plan = plan.clone();
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 256 * 1024];
    for slot in 0..conns.len() {
        if !plan.burst {
            conns[slot].connect_started = start;
            conns[slot].last_progress = start;
            continue;
        }
        t.connect(&mut conns[slot]);
        // On loopback the handshake runs inside connect(): after every few, look at what is
        // ready, so an early echo is stamped when it arrives, not after the last connect.
        if slot % 4 == 3 && poll.poll(&mut events, Some(Duration::ZERO)).is_ok() {
            for ev in events.iter() {
                let k = ev.token().0;
                t.on_ready(
                    &mut conns[k],
                    &mut budget[k],
                    &mut scratch,
                    interval.is_none(),
                );
            }
        }
    }
    if let Some(every) = interval {
        for slot in 0..slots {
            let offset = every.mul_f64(slot as f64 / slots.max(1) as f64);
            schedule.push(Reverse((start + offset, slot)));
        }
    }

    let mut last_timeout_scan = Instant::now();
    loop {
        let now = Instant::now();
        let live = conns
            .iter()
            .filter(|c| matches!(c.state, State::Connecting | State::Open))
            .count();
        if live == 0 {
            break;
        }
        let mut wait = Duration::from_millis(50);
        if let Some(Reverse((due, _))) = schedule.peek() {
            wait = wait.min(due.saturating_duration_since(now));
        }
        if now < start {
            wait = wait.min(start - now);
        }
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
        let now = Instant::now();
        for ev in events.iter() {
            let slot = ev.token().0;
            t.on_ready(
                &mut conns[slot],
                &mut budget[slot],
                &mut scratch,
                interval.is_none(),
            );
        }
        // Closed loop starts when the clock does.
        if interval.is_none() && now >= start {
            for (slot, c) in conns.iter_mut().enumerate() {
                if c.state == State::Open && c.inflight.is_empty() && c.out_pos == c.out.len() {
                    fill_pipeline(c, plan, &mut budget[slot], now);
                    t.drive(c, &mut budget[slot], &mut scratch, now);
                }
            }
        }
        // Open loop: send what is due, whatever is still in flight.
        while let Some(&Reverse((due, slot))) = schedule.peek() {
            if due > now {
                break;
            }
            schedule.pop();
            let c = &mut conns[slot];
            if due >= plan.deadline || budget[slot] == Some(0) {
                continue;
            }
            if c.state == State::Open {
                c.queue_message(due);
                if let Some(b) = budget[slot].as_mut() {
                    *b -= 1;
                }
                t.drive(c, &mut budget[slot], &mut scratch, now);
            }
            if let Some(every) = interval {
                schedule.push(Reverse((due + every, slot)));
            }
        }
        // Done, timed out, or due for a reconnect.
        if now.duration_since(last_timeout_scan) >= Duration::from_millis(20) {
            last_timeout_scan = now;
            for (slot, c) in conns.iter_mut().enumerate() {
                let waiting = !c.inflight.is_empty() || c.state == State::Connecting;
                if matches!(c.state, State::Connecting | State::Open)
                    && waiting
                    && now.duration_since(c.last_progress.max(c.connect_started)) > plan.timeout
                {
                    t.fail(c, TIMEOUT, "no progress within the timeout");
                    continue;
                }
                let finished = c.state == State::Open
                    && c.inflight.is_empty()
                    && (now >= plan.deadline || budget[slot] == Some(0));
                if finished {
                    c.state = State::Idle;
                }
            }
        }
    }
    let _ = done.send(t.out);
    // Hold the connections open until the main thread has sampled the server.
    while !shared.release.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(conns);
}

impl LoadThread<'_> {
    /// A connection's socket is ready: finish connecting, then move bytes.
    fn on_ready(
        &mut self,
        c: &mut Conn,
        budget: &mut Option<u64>,
        scratch: &mut [u8],
        closed_loop: bool,
    ) {
        let now = Instant::now();
        if c.state == State::Connecting {
            match c.stream.as_ref().map(|s| s.peer_addr()) {
                Some(Ok(_)) => {
                    c.state = State::Open;
                    c.last_progress = now;
                    if closed_loop {
                        fill_pipeline(c, &self.plan, budget, now);
                    }
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::NotConnected => {
                    // Still connecting, or failed: the socket error tells which.
                    let err = c
                        .stream
                        .as_ref()
                        .and_then(|s| s.take_error().ok().flatten());
                    if let Some(err) = err {
                        self.fail(c, REFUSED, &err.to_string());
                    }
                    return;
                }
                Some(Err(e)) => return self.fail(c, REFUSED, &e.to_string()),
                None => return,
            }
        }
        if c.state == State::Open {
            self.drive(c, budget, scratch, now);
        }
    }

    fn connect(&mut self, c: &mut Conn) {
        c.connect_started = Instant::now();
        c.last_progress = c.connect_started;
        c.got_first_echo = false;
        c.since_connect = 0;
        self.out.connections_opened += 1;
        let stream = if self.plan.burst {
            TcpStream::connect(self.plan.target)
        } else {
            std::net::TcpStream::connect_timeout(&self.plan.target, self.plan.timeout).and_then(
                |s| {
                    s.set_nonblocking(true)?;
                    Ok(TcpStream::from_std(s))
                },
            )
        };
        match stream {
            Ok(mut s) => {
                let _ = s.set_nodelay(true);
                if self
                    .registry
                    .register(
                        &mut s,
                        Token(c.slot),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .is_err()
                {
                    self.out.errors[OTHER] += 1;
                    c.state = State::Dead;
                    return;
                }
                c.stream = Some(s);
                c.state = if self.plan.burst {
                    State::Connecting
                } else {
                    State::Open
                };
            }
            Err(e) => {
                let kind = if e.kind() == io::ErrorKind::TimedOut {
                    TIMEOUT
                } else {
                    REFUSED
                };
                self.note(kind, &format!("connect: {e}"));
                c.state = State::Dead;
            }
        }
    }

    fn note(&mut self, kind: usize, msg: &str) {
        self.out.errors[kind] += 1;
        self.out
            .first_error
            .get_or_insert_with(|| format!("{}: {msg}", ERROR_KINDS[kind]));
    }

    fn fail(&mut self, c: &mut Conn, kind: usize, msg: &str) {
        self.note(kind, msg);
        if let Some(mut s) = c.stream.take() {
            let _ = self.registry.deregister(&mut s);
        }
        c.state = State::Dead;
        c.inflight.clear();
    }

    fn drive(&mut self, c: &mut Conn, budget: &mut Option<u64>, scratch: &mut [u8], now: Instant) {
        loop {
            let mut progressed = false;
            // Write what is queued.
            while c.out_pos < c.out.len() {
                let Some(s) = c.stream.as_mut() else { return };
                match s.write(&c.out[c.out_pos..]) {
                    Ok(n) => {
                        c.out_pos += n;
                        self.out.bytes_out += n as u64;
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return self.fail(c, RESET, &e.to_string()),
                }
            }
            // Read and verify.
            let Some(s) = c.stream.as_mut() else { return };
            match s.read(scratch) {
                Ok(0) => {
                    if c.inflight.is_empty() {
                        return self.fail(c, SHORT, "server closed an idle connection");
                    }
                    return self.fail(c, SHORT, "server closed before the whole echo");
                }
                Ok(n) => {
                    self.out.bytes_in += n as u64;
                    c.last_progress = now;
                    progressed = true;
                    let mut data = &scratch[..n];
                    while !data.is_empty() {
                        if c.inflight.is_empty() {
                            return self.fail(c, WRONG, "bytes nobody sent");
                        }
                        if c.recv_off == 0 {
                            c.recv_header = header(c.id, c.recv_seq);
                        }
                        let want = self.plan.size - c.recv_off;
                        let take = want.min(data.len());
                        let ok = data[..take].iter().enumerate().all(|(i, &b)| {
                            let off = c.recv_off + i;
                            b == if off < 16 {
                                c.recv_header[off]
                            } else {
                                c.template[off]
                            }
                        });
                        if !ok {
                            return self.fail(c, WRONG, "echo differs from what was sent");
                        }
                        c.recv_off += take;
                        data = &data[take..];
                        if c.recv_off == self.plan.size {
                            c.recv_off = 0;
                            c.recv_seq += 1;
                            // Fresh clock: the echo may complete within the call that sent it.
                            let now = Instant::now();
                            let sent = c.inflight.pop_front().unwrap_or(now);
                            let us = now.saturating_duration_since(sent).as_micros() as u64;
                            self.out.latency.saturating_record(us.max(1));
                            if !c.got_first_echo {
                                c.got_first_echo = true;
                                let t = now.saturating_duration_since(c.connect_started);
                                self.out
                                    .first_echo
                                    .saturating_record((t.as_micros() as u64).max(1));
                            }
                            self.out.per_conn[c.slot] += 1;
                            c.since_connect += 1;
                            self.shared.round_trips.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                Err(e) => {
                    let kind = match e.kind() {
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => RESET,
                        io::ErrorKind::ConnectionRefused => REFUSED,
                        _ => OTHER,
                    };
                    return self.fail(c, kind, &e.to_string());
                }
            }
            // Churn: a connection that did its share closes and a new one takes its place.
            if self
                .plan
                .reconnect_every
                .is_some_and(|k| c.since_connect >= k)
                && c.inflight.is_empty()
                && now < self.plan.deadline
                && *budget != Some(0)
            {
                if let Some(mut s) = c.stream.take() {
                    let _ = self.registry.deregister(&mut s);
                }
                c.out.clear();
                c.out_pos = 0;
                self.connect(c);
                if c.state != State::Open {
                    return;
                }
                if self.plan.rate_per_conn.is_none() {
                    fill_pipeline(c, &self.plan, budget, now);
                }
                continue;
            }
            if self.plan.rate_per_conn.is_none() {
                let before = c.inflight.len();
                fill_pipeline(c, &self.plan, budget, now);
                progressed |= c.inflight.len() != before;
            }
            if !progressed {
                return;
            }
        }
    }
}

fn fill_pipeline(c: &mut Conn, plan: &Plan, budget: &mut Option<u64>, now: Instant) {
    // Closed loop: a message's clock starts when it is queued, read fresh (see above).
    while c.inflight.len() < plan.pipeline && now < plan.deadline && *budget != Some(0) {
        c.queue_message(Instant::now());
        if let Some(b) = budget.as_mut() {
            *b -= 1;
        }
    }
}
