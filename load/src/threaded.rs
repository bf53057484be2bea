//! The thread-per-connection client shape (`--shape threads`): one blocking thread per
//! connection, each writing its messages and reading their whole echo before sending more, as
//! most real clients (and generators such as rust_echo_bench) do.
//!
//! Why a second shape: with one event-loop thread driving every connection (the default
//! shape), a connection's next message is written only after the loop has come round to it,
//! so a server that reads again right after echoing always finds nothing. Separate threads
//! answer while the server is still in its loop, and a server that does not read again then
//! leaves that message to the next readiness event. The two shapes reward opposite server
//! policies; a server is measured under both.
//!
//! Verification and reporting are the event-loop shape's ([`crate::engine`]): the same message
//! headers, error kinds and [`Outcome`]. Open loop (`--rate`) is not offered here.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::engine::{OTHER, Outcome, Plan, REFUSED, RESET, SHORT, Shared, TIMEOUT, WRONG, header};

/// Stack of each connection thread: it holds one message buffer on the heap and little else,
/// so thousands of connections fit.
const STACK: usize = 128 * 1024;
/// Round trips a thread counts locally before adding them to the shared progress counter.
const TALLY_EVERY: u64 = 64;

/// Opened once every connection thread is connected and the clock has started.
#[derive(Default)]
struct Gate {
    open: Mutex<Option<Instant>>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) -> Instant {
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(start) = *g {
                return start;
            }
            g = self.opened.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open(&self, start: Instant) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = Some(start);
        self.opened.notify_all();
    }
}

/// What one connection thread sends back: its tally and, to be held open until the server
/// has been sampled, its socket.
struct Finished {
    slot: usize,
    out: Outcome,
    /// Time to first echo of each connection it opened, µs (values, not a histogram each:
    /// a histogram per thread for one value apiece was half a thread's memory).
    first_echoes: Vec<u64>,
    stream: Option<TcpStream>,
}

/// Runs `slots` connections (ids from `first_id`), each on its own thread, with the same
/// contract as [`crate::engine::run`]: connect, meet the other load threads and the main thread
/// at `barrier` (the clock starts there), send the outcome to `done` when the load is over,
/// hold the connections open until `shared.release` is set.
pub fn run(
    plan: &Plan,
    first_id: u64,
    slots: usize,
    requests: Option<u64>,
    barrier: &Barrier,
    shared: &Arc<Shared>,
    done: &mpsc::Sender<Outcome>,
) {
    let mut out = empty_outcome(slots);
    let gate = Arc::new(Gate::default());
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (fin_tx, fin_rx) = mpsc::channel::<Finished>();
    let mut spawned = 0;
    for slot in 0..slots {
        let (plan, gate, shared) = (plan.clone(), gate.clone(), shared.clone());
        let (ready, fin) = (ready_tx.clone(), fin_tx.clone());
        let id = first_id + slot as u64;
        let started = std::thread::Builder::new()
            .name(format!("conn-{id}"))
            .stack_size(STACK)
            .spawn(move || {
                let f = connection(&plan, id, slot, requests, &gate, &ready, &shared);
                let _ = fin.send(f);
            });
        match started {
            Ok(_) => spawned += 1,
            Err(e) => {
                out.errors[OTHER] += 1;
                out.first_error
                    .get_or_insert_with(|| format!("other: starting a connection thread: {e}"));
            }
        }
    }
    drop((ready_tx, fin_tx));
    // Every thread has connected (or failed to) before the clock starts.
    for _ in 0..spawned {
        if ready_rx.recv().is_err() {
            break;
        }
    }
    barrier.wait();
    gate.open(Instant::now());
    let mut streams = Vec::with_capacity(spawned);
    for f in fin_rx.iter().take(spawned) {
        merge(&mut out, f.slot, f.out);
        for t in f.first_echoes {
            out.first_echo.saturating_record(t);
        }
        streams.extend(f.stream);
    }
    let _ = done.send(out);
    // Hold the connections open until the main thread has sampled the server.
    while !shared.release.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(streams);
}

fn empty_outcome(slots: usize) -> Outcome {
    Outcome {
        latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"),
        first_echo: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"),
        per_conn: vec![0; slots],
        bytes_out: 0,
        bytes_in: 0,
        errors: [0; 6],
        connections_opened: 0,
        first_error: None,
    }
}

fn merge(into: &mut Outcome, slot: usize, one: Outcome) {
    let _ = into.latency.add(&one.latency);
    let _ = into.first_echo.add(&one.first_echo);
    if let Some(n) = into.per_conn.get_mut(slot) {
        *n += one.per_conn.iter().sum::<u64>();
    }
    into.bytes_out += one.bytes_out;
    into.bytes_in += one.bytes_in;
    for (a, b) in into.errors.iter_mut().zip(one.errors) {
        *a += b;
    }
    into.connections_opened += one.connections_opened;
    if into.first_error.is_none() {
        into.first_error = one.first_error;
    }
}

/// One connection's whole life on its own thread.
struct Client<'a> {
    plan: &'a Plan,
    id: u64,
    template: Vec<u8>,
    next_seq: u64,
    recv_seq: u64,
    out: Outcome,
    first_echoes: Vec<u64>,
    shared: &'a Shared,
    untallied: u64,
}

/// Why a connection stopped early: the error kind and what happened.
type Failure = (usize, String);

fn connection(
    plan: &Plan,
    id: u64,
    slot: usize,
    requests: Option<u64>,
    gate: &Gate,
    ready: &mpsc::Sender<()>,
    shared: &Shared,
) -> Finished {
    let mut c = Client {
        plan,
        id,
        template: template(id, plan.size),
        next_seq: 0,
        recv_seq: 0,
        // Two significant digits: a histogram per thread, thousands of threads. First echoes
        // go in `first_echoes`; this outcome's own histogram for them stays empty and small.
        out: Outcome {
            latency: Histogram::new_with_bounds(1, 120_000_000, 2).expect("histogram bounds"),
            first_echo: Histogram::new_with_bounds(1, 2, 0).expect("histogram bounds"),
            per_conn: vec![0],
            bytes_out: 0,
            bytes_in: 0,
            errors: [0; 6],
            connections_opened: 0,
            first_error: None,
        },
        first_echoes: Vec::new(),
        shared,
        untallied: 0,
    };
    let mut stream = None;
    let mut connected_at = Instant::now();
    if !plan.burst {
        stream = c.connect().map_err(|f| c.note(f)).ok();
    }
    let _ = ready.send(());
    let start = gate.wait();
    if plan.burst {
        connected_at = Instant::now();
        stream = c.connect().map_err(|f| c.note(f)).ok();
    } else {
        connected_at = connected_at.max(start);
    }
    let deadline = start + plan.duration.unwrap_or(Duration::from_secs(86_400 * 365));
    let mut budget = requests;
    if let Some(s) = stream.as_mut() {
        match c.exchange(s, connected_at, deadline, &mut budget) {
            Ok(()) => {}
            Err(f) => {
                c.note(f);
                stream = None;
            }
        }
    }
    c.shared
        .round_trips
        .fetch_add(c.untallied, Ordering::Relaxed);
    Finished {
        slot,
        out: c.out,
        first_echoes: c.first_echoes,
        stream,
    }
}

impl Client<'_> {
    fn note(&mut self, (kind, msg): Failure) {
        self.out.errors[kind] += 1;
        self.out
            .first_error
            .get_or_insert_with(|| format!("{}: {msg}", crate::engine::ERROR_KINDS[kind]));
    }

    fn connect(&mut self) -> Result<TcpStream, Failure> {
        self.out.connections_opened += 1;
        let s = TcpStream::connect_timeout(&self.plan.target, self.plan.timeout).map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::TimedOut {
                TIMEOUT
            } else {
                REFUSED
            };
            (kind, format!("connect: {e}"))
        })?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(self.plan.timeout))
            .and_then(|()| s.set_write_timeout(Some(self.plan.timeout)))
            .map_err(|e| (OTHER, format!("socket timeouts: {e}")))?;
        Ok(s)
    }

    /// Closed loop until the deadline or the budget: keep `pipeline` messages in flight, each
    /// written whole, then read one whole echo and verify it before writing the next.
    fn exchange(
        &mut self,
        stream: &mut TcpStream,
        mut connected_at: Instant,
        deadline: Instant,
        budget: &mut Option<u64>,
    ) -> Result<(), Failure> {
        let size = self.plan.size;
        let mut msg = vec![0u8; size];
        let mut echo = vec![0u8; size];
        let mut inflight: VecDeque<Instant> = VecDeque::with_capacity(self.plan.pipeline);
        let mut first = true;
        let mut since_connect = 0u64;
        loop {
            let now = Instant::now();
            while inflight.len() < self.plan.pipeline && now < deadline && *budget != Some(0) {
                self.fill(&mut msg);
                stream.write_all(&msg).map_err(|e| io_failure(&e))?;
                self.out.bytes_out += size as u64;
                inflight.push_back(Instant::now());
                if let Some(b) = budget.as_mut() {
                    *b -= 1;
                }
            }
            let Some(sent) = inflight.pop_front() else {
                return Ok(());
            };
            self.read_echo(stream, &mut echo)?;
            let now = Instant::now();
            let us = now.saturating_duration_since(sent).as_micros() as u64;
            self.out.latency.saturating_record(us.max(1));
            if first {
                first = false;
                let t = now.saturating_duration_since(connected_at).as_micros() as u64;
                self.first_echoes.push(t.max(1));
            }
            self.out.per_conn[0] += 1;
            self.untallied += 1;
            if self.untallied == TALLY_EVERY {
                self.shared
                    .round_trips
                    .fetch_add(TALLY_EVERY, Ordering::Relaxed);
                self.untallied = 0;
            }
            since_connect += 1;
            let churn = self
                .plan
                .reconnect_every
                .is_some_and(|k| since_connect >= k);
            if churn && inflight.is_empty() && now < deadline && *budget != Some(0) {
                *stream = self.connect()?;
                connected_at = Instant::now();
                first = true;
                since_connect = 0;
            }
        }
    }

    /// Message `next_seq`: its header, then the connection's template.
    fn fill(&mut self, msg: &mut [u8]) {
        let h = header(self.id, self.next_seq);
        let head = msg.len().min(16);
        msg[..head].copy_from_slice(&h[..head]);
        msg[head..].copy_from_slice(&self.template[head..]);
        self.next_seq += 1;
    }

    /// Reads the echo of message `recv_seq` whole and checks every byte.
    fn read_echo(&mut self, stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), Failure> {
        let mut got = 0;
        while got < buf.len() {
            match stream.read(&mut buf[got..]) {
                Ok(0) => return Err((SHORT, "server closed before the whole echo".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_failure(&e)),
            }
        }
        self.out.bytes_in += buf.len() as u64;
        let h = header(self.id, self.recv_seq);
        let head = buf.len().min(16);
        if buf[..head] != h[..head] || buf[head..] != self.template[head..] {
            return Err((WRONG, "echo differs from what was sent".into()));
        }
        self.recv_seq += 1;
        Ok(())
    }
}

fn io_failure(e: &io::Error) -> Failure {
    let kind = match e.kind() {
        // A blocking socket's timeout shows as WouldBlock (or TimedOut).
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TIMEOUT,
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => RESET,
        io::ErrorKind::ConnectionRefused => REFUSED,
        _ => OTHER,
    };
    (kind, e.to_string())
}

/// A connection's message body: pseudo-random bytes seeded by its id.
fn template(id: u64, size: usize) -> Vec<u8> {
    let mut x = id.wrapping_mul(6364136223846793005) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
