//! The process-mode worker: one non-blocking event loop (mio, edge-triggered epoll) that
//! accepts from the listening socket it shares with its siblings and echoes on every
//! connection it holds.
//!
//! The loop in one screen: wait for events (bounded by the next timer) → accept until the
//! kernel says "would block" → drive each ready connection → act on recorded signals →
//! report counters to the master. Signals only wake the loop; the loop decides. With
//! `--io uring` the wait is in the ring (`ring/`), which serves echo connections as their
//! operations complete and reports epoll's events as one more completion.

mod boot;
mod connections;
mod datagrams;
mod proxied;
mod ring;

use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Poll, Token};
use nix::sys::socket::sockopt;
use signal_hook::consts::{SIGHUP, SIGQUIT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::chat::Chat;
use crate::config::WorkerConfig;
use crate::echo::Echo;
use crate::service::{Abort, Exchange, Room, Service, ServiceKind};
use crate::tftp::Tftp;
use protocol::ipc::{Message, Reporter};
use protocol::log;
use protocol::stats::Counters;

/// Exit code of a worker that could not start serving. The master stops instead of
/// respawning it: a worker that cannot boot will not boot the next time either.
pub const EXIT_BOOT_FAILURE: i32 = 3;

/// The signals a worker handles itself (through signal-hook). A forked worker keeps the
/// handler it inherited for these (signal-hook re-uses it when the worker registers), and
/// every other signal of the master's table is reset to its default before the worker runs,
/// so fork and exec workers answer every signal alike.
pub const HANDLED_SIGNALS: [i32; 3] = [SIGTERM, SIGQUIT, SIGHUP];

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const MASTER: Token = Token(2);
const UDP: Token = Token(3);
const BUS: Token = Token(4);
const FIRST_CONN: usize = 5;
/// Tokens of exchanges (TFTP transfers) start here; connections stay below.
const EXCHANGE_BASE: usize = usize::MAX / 4;
/// Rounds of driving sessions the room woke, per loop turn.
const WOKEN_ROUNDS: usize = 3;
/// Datagrams echoed per loop turn before the connections get their turn again.
const DATAGRAMS_PER_TURN: usize = 64;

/// Events taken from epoll per wait.
const EVENTS: usize = 1024;
/// Size of the one read buffer all connections share.
const SCRATCH: usize = 64 * 1024;
/// Connections accepted per loop turn. All workers wait on the one listener and the first
/// to wake would otherwise accept a whole burst, leaving its siblings idle (seen: a 72/28
/// split of 500 connections over 2 workers). Accepting a few, then serving, then coming back
/// lets the less busy worker, whose turns are shorter, take more.
const ACCEPT_BATCH: usize = 4;
/// How long to stop accepting after the process or system ran out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How long a draining worker with a socket of its own goes on accepting from it.
const OWN_SOCKET_LINGER: Duration = Duration::from_millis(300);
/// Turns of datagrams a draining worker answers from its own UDP socket before letting go
/// (a socket's receive queue holds far fewer than this many turns' worth).
const OWN_UDP_DRAIN_TURNS: usize = 64;
/// Longest the loop sleeps with nothing to do, so timers stay honest.
const MAX_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Not accepting; open connections finish until the deadline.
    Draining {
        deadline: Instant,
    },
}

/// Why the loop ended.
#[derive(Debug)]
enum Stop {
    Drained,
    DrainTimeout,
    Now(&'static str),
}

/// Whether this kernel lets `--io uring` run; the error says why not.
pub fn probe_uring() -> io::Result<()> {
    ring::probe()
}

/// Runs a worker until it is told to stop; returns the process exit code.
pub fn run(cfg: WorkerConfig) -> i32 {
    match cfg.service {
        ServiceKind::Echo => {
            let echo = Echo {
                max_unsent: cfg.max_unsent,
                watch_idle: cfg.idle().is_some(),
            };
            serve_with(cfg, echo)
        }
        ServiceKind::Chat => {
            let chat = Chat::from_config(&cfg);
            serve_with(cfg, chat)
        }
        ServiceKind::Tftp => match crate::tftp::inherited_root(cfg.root_fd) {
            Ok(root) => {
                let sizes = (cfg.tftp_max_file, cfg.tftp_min_free);
                let tftp = Tftp::new(std::sync::Arc::new(root), cfg.tftp_write, sizes);
                serve_with(cfg, tftp)
            }
            Err(e) => {
                protocol::log!("cannot start: the --root directory: {e}");
                EXIT_BOOT_FAILURE
            }
        },
    }
}

/// Runs a worker speaking `service`.
fn serve_with<S: Service>(cfg: WorkerConfig, service: S) -> i32 {
    log::set_role(format!("worker {}/g{}", cfg.id, cfg.generation));
    let mut worker = match Worker::boot(cfg, service) {
        Ok(w) => w,
        Err(e) => {
            protocol::log!("cannot start: {e}");
            return EXIT_BOOT_FAILURE;
        }
    };
    let stop = worker.serve();
    worker.finish(stop)
}

struct Worker<S: Service> {
    cfg: WorkerConfig,
    service: S,
    poll: Poll,
    listener: Option<TcpListener>,
    signals: Signals,
    reporter: Reporter,
    conns: Slab<S::Session>,
    counters: Counters,
    scratch: Vec<u8>,
    phase: Phase,
    accept_paused_until: Option<Instant>,
    /// Draining with a socket of its own: accept until then (see `start_drain`).
    accept_until: Option<Instant>,
    last_accept_error_log: Option<Instant>,
    next_report: Option<Instant>,
    /// Connections that yielded with work left; driven again before the next wait.
    again: Vec<usize>,
    /// A full accept batch was taken: the queue may hold more, accept again next turn.
    accept_again: bool,
    /// Next sweep for idle connections.
    next_idle_sweep: Option<Instant>,
    /// The shared UDP socket: with `--udp`, or a datagram service's only socket.
    udp: Option<UdpSocket>,
    /// The UDP socket's address (a service may refuse datagrams from its port: loops).
    udp_local: SocketAddr,
    /// Conversations datagrams began (TFTP transfers), each on a socket of its own.
    exchanges: Slab<S::Exchange>,
    /// The UDP turn's budget ran out: more datagrams may be waiting.
    udp_again: bool,
    /// What each source may still draw in answers (ends echo loops between servers).
    sources: crate::echo::SourceLimit,

    /// What the connections share (a chat room and its bus); `()` for echo and TFTP.
    room: S::Room,
    /// Sessions the room gave work this turn (reused buffer).
    woken: Vec<usize>,

    /// `--proxy-protocol`: who may send a header, and how long it may take.
    proxy: Option<crate::proxy::ProxyRule>,
    /// Connections still owing their PROXY header.
    pending: Slab<proxied::Pending>,

    /// `--io uring`: the ring the loop waits in, and the connections on it.
    ring: Option<ring::Ring>,
    /// The last epoll wait filled the events buffer: more may be ready.
    epoll_again: bool,
}

impl<S: Service> Worker<S> {
    fn serve(&mut self) -> Stop {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = if self.again.is_empty()
                && !self.accept_again
                && !self.udp_again
                && !self.epoll_again
            {
                self.next_timer()
                    .map(|t| t.saturating_duration_since(Instant::now()))
                    .map_or(MAX_WAIT, |d| d.min(MAX_WAIT))
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.wait(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    protocol::log!("event loop failed: {e}");
                    return Stop::Now("event loop failure");
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    SIGNALS => {
                        if let Some(stop) = self.on_signals() {
                            return stop;
                        }
                    }
                    UDP => self.serve_datagrams(),
                    BUS => {
                        if self.room.on_bus().is_err() {
                            return Stop::Now("the bus is gone");
                        }
                    }
                    MASTER => {
                        if self.master_gone() {
                            return Stop::Now("the master is gone");
                        }
                    }
                    Token(t) if t >= proxied::PENDING_BASE => {
                        self.on_pending(t - proxied::PENDING_BASE)
                    }
                    Token(t) if t >= EXCHANGE_BASE => self.on_exchange(t - EXCHANGE_BASE),
                    Token(t) => self.on_connection_event(t - FIRST_CONN, event),
                }
            }
            // Drive those that yielded last turn; those that yield now are pushed behind them
            // and wait for the next turn. Indexing, not `mem::take`, keeps the vector's
            // capacity: a client that keeps its connection busy yields every turn, and a fresh
            // vector each turn was a heap allocation per yield.
            let yielded = self.again.len();
            for i in 0..yielded {
                let Some(&key) = self.again.get(i) else { break };
                self.drive(key);
            }
            let driven = yielded.min(self.again.len());
            self.again.drain(..driven);
            if let Some(stop) = self.serve_woken() {
                return stop;
            }
            if std::mem::take(&mut self.accept_again) {
                self.accept_all();
            }
            if std::mem::take(&mut self.udp_again) {
                self.serve_datagrams();
            }
            if let Some(stop) = self.on_timers() {
                return stop;
            }
        }
    }

    /// Waits up to `timeout` for events: in epoll, or with `--io uring` in the ring (which
    /// serves the connections on it as it goes, and says when epoll has events).
    fn wait(&mut self, events: &mut Events, timeout: Duration) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut() else {
            return self.poll.poll(events, Some(timeout));
        };
        if ring.turn(timeout, &mut self.counters)? || self.epoll_again {
            self.poll.poll(events, Some(Duration::ZERO))?;
            self.epoll_again = events.iter().count() >= EVENTS;
        } else {
            events.clear();
        }
        Ok(())
    }

    /// Connections this worker holds, on epoll or on the ring.
    fn open_connections(&self) -> usize {
        self.conns.len() + self.ring.as_ref().map_or(0, |r| r.len())
    }

    fn next_timer(&self) -> Option<Instant> {
        let deadline = match self.phase {
            Phase::Draining { deadline } => Some(deadline),
            Phase::Serving => None,
        };
        [
            self.accept_paused_until,
            self.next_report,
            deadline,
            self.accept_until,
            self.next_idle_sweep,
            self.next_pending_deadline(),
            self.exchanges.iter().map(|(_, x)| x.deadline()).min(),
            self.room.deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timers(&mut self) -> Option<Stop> {
        let now = Instant::now();
        self.expire_pending(now);
        self.exchanges_on_time(now);
        if self.accept_until.is_some_and(|t| now >= t) {
            self.accept_until = None;
            self.accept_paused_until = None;
            // Everything still queued, batch after batch, before the socket goes.
            loop {
                self.accept_again = false;
                self.accept_all();
                if !self.accept_again {
                    break;
                }
            }
            if let Some(mut listener) = self.listener.take() {
                let _ = self.poll.registry().deregister(&mut listener);
            }
        }
        if self.next_idle_sweep.is_some_and(|t| now >= t) {
            self.next_idle_sweep = self.idle_sweep_every().map(|d| now + d);
            self.close_idle(now);
        }
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            self.accept_all();
        }
        if let Some(every) = self.cfg.stats_every() {
            if self.next_report.is_some_and(|t| now >= t) {
                self.next_report = Some(now + every);
                if self.reporter.send(&Message::Report(self.counters)).is_err() {
                    return Some(Stop::Now("the master is gone"));
                }
            }
        }
        match self.phase {
            Phase::Draining { .. }
                if self.open_connections() == 0
                    && self.exchanges.is_empty()
                    && self.listener.is_none() =>
            {
                Some(Stop::Drained)
            }
            Phase::Draining { deadline } if now >= deadline => Some(Stop::DrainTimeout),
            _ => None,
        }
    }

    fn accept_all(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        let mut taken = 0;
        while let Some(listener) = &self.listener {
            if taken == ACCEPT_BATCH {
                self.accept_again = true;
                return;
            }
            match listener.accept() {
                Ok((stream, _peer)) => {
                    taken += 1;
                    self.add_connection(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The client gave up while it sat in the queue: nothing to serve.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
                    self.counters.accept_errors += 1;
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS and the like: the connection stays queued in
                    // the kernel. Retrying at once would spin at 100% CPU, so pause.
                    self.counters.accept_errors += 1;
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    let now = Instant::now();
                    if self
                        .last_accept_error_log
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                    {
                        self.last_accept_error_log = Some(now);
                        protocol::log!("accept failed ({e}); pausing accepts for {ACCEPT_PAUSE:?}");
                    }
                    return;
                }
            }
        }
    }

    /// Acts on recorded signals; `Some` ends the loop.
    fn on_signals(&mut self) -> Option<Stop> {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGQUIT => return Some(Stop::Now("SIGQUIT")),
                SIGTERM => match self.phase {
                    Phase::Serving => self.start_drain(),
                    Phase::Draining { .. } => return Some(Stop::Now("second SIGTERM")),
                },
                // Reloads are the master's business; a stray HUP must not kill a worker.
                _ => {}
            }
        }
        None
    }

    fn start_drain(&mut self) {
        let own = self
            .listener
            .as_ref()
            .is_some_and(|l| nix::sys::socket::getsockopt(l, sockopt::ReusePort).unwrap_or(false));
        if own {
            // A socket of this slot's own (--balance reuseport): nobody else may accept what
            // waits in it. (A shared socket that systemd made SO_REUSEPORT lands here too;
            // accepting from it 300 ms longer while draining costs nothing.) The master has already steered new connections elsewhere; take
            // what is queued, and what finishes its handshake for a moment more, then let go.
            self.accept_until = Some(Instant::now() + OWN_SOCKET_LINGER);
            self.accept_all();
        } else if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
            // Dropping closes only this process's copy; the others keep accepting.
        }
        let own_udp = self
            .udp
            .as_ref()
            .is_some_and(|u| nix::sys::socket::getsockopt(u, sockopt::ReusePort).unwrap_or(false));
        if own_udp {
            // A UDP socket of this slot's own (--balance reuseport): the master has steered new
            // datagrams elsewhere; answer what already waits in it, which nobody else could.
            for _ in 0..OWN_UDP_DRAIN_TURNS {
                self.udp_again = false;
                self.serve_datagrams();
                if !self.udp_again {
                    break;
                }
            }
        }
        if let Some(mut udp) = self.udp.take() {
            let _ = self.poll.registry().deregister(&mut udp);
        }
        let deadline = Instant::now() + self.cfg.drain();
        self.phase = Phase::Draining { deadline };
        // Tell the master at once, so it can start a replacement while we drain (a rolling
        // restart of one worker leaves no gap). A full channel only delays that until exit.
        let _ = self.reporter.send(&Message::Draining);
        protocol::log!(
            "draining {} connection(s), at most {:?}",
            self.open_connections(),
            self.cfg.drain()
        );
    }

    /// The IPC socket became readable: the master sends nothing, so this is its end-of-file.
    fn master_gone(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match (&mut self.reporter.stream()).read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }

    fn finish(mut self, stop: Stop) -> i32 {
        if matches!(stop, Stop::DrainTimeout | Stop::Now(_)) {
            self.counters.closed_by_limit += self.open_connections() as u64;
        }
        let keys: Vec<usize> = self.exchanges.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.exchange_step(key, |x, c, _| x.abort(Abort::Stopping, c));
        }
        let open = self.open_connections();
        self.conns.clear();
        if let Some(ring) = self.ring.as_mut() {
            ring.close_all(&mut self.counters);
        }
        // Their leave notices, if the bus takes them now.
        let _ = self.room.settle(&mut self.counters);
        self.counters.active = 0;
        match stop {
            Stop::Drained => protocol::log!("drained; exiting"),
            Stop::DrainTimeout => protocol::log!("drain timeout; closing {open} connection(s)"),
            Stop::Now(why) => protocol::log!("stopping now ({why}); closing {open} connection(s)"),
        }
        let _ = self
            .reporter
            .send_last(&Message::Final(self.counters), Duration::from_secs(1));
        0
    }
}
