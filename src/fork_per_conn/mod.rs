//! Fork-per-connection mode: the textbook forking server, for comparison. The master accepts;
//! each connection gets a child process of its own that echoes with blocking I/O and exits.
//! A datagram service (TFTP) is served as tftpd serves it: the master receives each request
//! and forks a child that answers it and carries the whole transfer.
//!
//! Children report their counters once, as they exit, as one fixed-size record on a pipe
//! shared by all of them: a write of at most PIPE_BUF bytes is atomic, so records from many
//! children never interleave. The master reaps every child and keeps the tally.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::{TcpListener, UdpSocket};
use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use protocol::stats::Counters;
use signal_hook_mio::v1_0::Signals;
use socket2::Socket;

mod child;
mod transfers;

use child::{child, datagram_child};
use transfers::{Admission, Transfers};

use crate::blocking::{SingleProcessConfig, reset};
use crate::control::{ControlServer, Request};
use crate::serve_loop::{Ready, ServeLoop, StatsLog};
use crate::signals::{self, Action};
use crate::spawn::{Lineage, fork_child, reap_exited};
use crate::stats::{Snapshot, WorkerRow};
use worker::exchange::max_exchanges;
use worker::service::Service;

const LISTENER: Token = Token(ServeLoop::FIRST_SOURCE);
const REPORTS: Token = Token(ServeLoop::FIRST_SOURCE + 1);
/// Tokens of the children's bus sockets start here.
const HUB_BASE: usize = usize::MAX / 8;
/// A child's counters, little-endian u64s in wire order (well under PIPE_BUF).
const RECORD: usize = Counters::FIELDS * 8;
/// Request datagrams taken per loop turn.
const DATAGRAMS_PER_TURN: usize = 64;
/// After an immediate stop is asked of the children, how long before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    Draining { until: Instant },
    Stopping { kill_at: Instant },
}

/// Serves until stopped; `Ok` is a requested stop.
pub fn run<S: Service>(
    cfg: SingleProcessConfig,
    service: S,
    listener: Socket,
    addr: SocketAddr,
    (mut control, metrics): (ControlServer, Option<crate::metrics::MetricsServer>),
) -> Result<()> {
    protocol::log::set_role("fork-per-conn");
    let service_needs_bus = service.needs_bus();
    let sigs = Signals::new(signals::numbers()).context("installing signal handlers")?;
    let lp = ServeLoop::new(Some(sigs), &mut control)?;
    let metrics = metrics.map(|m| lp.watch_metrics(m)).transpose()?;
    let listener =
        if listener.r#type().context("reading the socket's type")? == socket2::Type::DGRAM {
            Source::Datagram(UdpSocket::from_std(std::net::UdpSocket::from(listener)))
        } else {
            Source::Stream(TcpListener::from_std(StdListener::from(OwnedFd::from(
                listener,
            ))))
        };
    let fd = listener.raw_fd();
    lp.registry()
        .register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)
        .context("watching the listener")?;
    let (reports, report_tx) = io::pipe().context("creating the report pipe")?;
    // Children write their one record with a blocking write; only the master reads, and it
    // must never block: O_NONBLOCK goes on the read end alone.
    nix::fcntl::fcntl(
        &reports,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .context("making the report pipe non-blocking")?;
    lp.registry()
        .register(
            &mut SourceFd(&reports.as_raw_fd()),
            REPORTS,
            Interest::READABLE,
        )
        .context("watching the report pipe")?;
    protocol::log!("control socket {}", cfg.control.display());
    let transfers = match &listener {
        Source::Datagram(_) => Some(
            Transfers::new(max_exchanges(cfg.limits.max_conns))
                .context("the transfers' shared flags")?,
        ),
        Source::Stream(_) => None,
    };
    let mut server = ForkServer {
        transfers,
        cfg,
        service,
        lp,
        listener: Some(listener),
        receive_again: false,
        reports,
        report_tx,
        partial: Vec::new(),
        children: HashMap::new(),
        counters: Counters::default(),
        control: Some(control),
        phase: Phase::Running,
        started: Instant::now(),
        stats_log: StatsLog::new(None, Instant::now()),
        metrics,
        hub: service_needs_bus.then(|| crate::hub::Hub::new(HUB_BASE)),
    };
    server.stats_log = StatsLog::new(server.cfg.log_stats, Instant::now());
    crate::announce(addr, "fork-per-conn", 1);
    server.serve()
}

/// What the master receives from: connections, or request datagrams.
enum Source {
    Stream(TcpListener),
    Datagram(UdpSocket),
}

impl Source {
    fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Source::Stream(l) => l.as_raw_fd(),
            Source::Datagram(u) => u.as_raw_fd(),
        }
    }
}

struct ForkServer<S: Service> {
    /// A datagram service's transfer children, for admission.
    transfers: Option<Transfers>,
    cfg: SingleProcessConfig,
    service: S,
    /// The poll, signals and control socket (a connection's child drops the signals).
    lp: ServeLoop,
    listener: Option<Source>,
    /// A full turn of request datagrams was taken: more may be waiting.
    receive_again: bool,
    reports: io::PipeReader,
    report_tx: io::PipeWriter,
    partial: Vec<u8>,
    children: HashMap<Pid, Instant>,
    counters: Counters,
    control: Option<ControlServer>,
    phase: Phase,
    started: Instant,
    stats_log: StatsLog,
    metrics: Option<crate::metrics::MetricsServer>,
    /// The bus between connections' children, for a service whose clients meet (chat).
    hub: Option<crate::hub::Hub>,
}

impl<S: Service> ForkServer<S> {
    fn serve(&mut self) -> Result<()> {
        loop {
            self.reap();
            if self.phase != Phase::Running && self.children.is_empty() {
                self.read_reports();
                self.stats_log.finish(|| self.snapshot());
                protocol::log!("all connections closed; exiting");
                return Ok(());
            }
            let deadline = match self.phase {
                Phase::Running => None,
                Phase::Draining { until } => Some(until),
                Phase::Stopping { kill_at } => Some(kill_at),
            };
            let control = self.control.as_ref().and_then(ControlServer::next_deadline);
            let ready = self
                .lp
                .wait(
                    Instant::now(),
                    [
                        deadline,
                        self.stats_log.next(),
                        control,
                        self.receive_again.then(Instant::now),
                    ],
                    None,
                )
                .context("waiting for events")?;
            let mut pending = Vec::new();
            for r in ready {
                match r {
                    Ready::Signal(sig) => pending.push(sig),
                    Ready::Source(LISTENER) => match &self.listener {
                        Some(Source::Stream(_)) => self.accept_all(),
                        Some(Source::Datagram(_)) => self.receive_all(),
                        None => {}
                    },
                    Ready::Source(REPORTS) => self.read_reports(),
                    Ready::Source(t) if self.hub.as_ref().is_some_and(|h| h.owns(t)) => {
                        if let Some(hub) = self.hub.as_mut() {
                            hub.ready(self.lp.registry(), t);
                        }
                    }
                    Ready::Source(_) => {}
                    Ready::Metrics(t) => {
                        if let Some(mut m) = self.metrics.take() {
                            m.serve_now(self.lp.registry(), t, || self.snapshot());
                            self.metrics = Some(m);
                        }
                    }
                    Ready::Control(t) => {
                        if let Some(mut c) = self.control.take() {
                            let drain = self.cfg.drain_timeout;
                            c.handle(self.lp.registry(), t, &mut |req, _| {
                                Some(match req {
                                    Request::Stats => {
                                        crate::control::Response::Stats(Box::new(self.snapshot()))
                                    }
                                    other => crate::control::single_process_answer(other, drain),
                                })
                            });
                            self.control = Some(c);
                        }
                    }
                }
            }
            if std::mem::take(&mut self.receive_again) {
                self.receive_all();
            }
            for sig in pending {
                self.on_signal(sig);
            }
            self.on_timers();
        }
    }

    fn on_signal(&mut self, sig: i32) {
        match (signals::action(sig), self.phase) {
            (Some(Action::Reap), _) => self.reap(),
            (Some(Action::GracefulStop), Phase::Running) => {
                self.listener = None;
                let until = Instant::now() + self.cfg.drain_timeout;
                self.phase = Phase::Draining { until };
                protocol::log!(
                    "SIG{}: graceful stop; draining {} connection(s) for up to {:?}",
                    signals::name(sig),
                    self.children.len(),
                    self.cfg.drain_timeout
                );
            }
            (Some(Action::GracefulStop | Action::StopNow), _) => {
                protocol::log!("SIG{}: stopping now", signals::name(sig));
                self.stop_now();
            }
            (Some(Action::Reload), _) => {
                protocol::log!("SIGHUP: reloading is for --mode process; ignored")
            }
            (Some(Action::Ignore), _) => {
                protocol::log!(
                    "SIG{}: not a signal this server acts on; ignored",
                    signals::name(sig)
                )
            }
            _ => {}
        }
    }

    fn stop_now(&mut self) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        self.listener = None;
        self.phase = Phase::Stopping {
            kill_at: Instant::now() + STOP_GRACE,
        };
        self.signal_children(Signal::SIGTERM);
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if let Some(c) = self.control.as_mut() {
            c.expire(self.lp.registry());
        }
        if let Some(m) = self.metrics.as_mut() {
            m.expire(self.lp.registry(), now);
        }
        if self.stats_log.next().is_some_and(|t| now >= t) {
            let snap = self.snapshot();
            self.stats_log.tick(now, || snap);
        }
        match self.phase {
            Phase::Draining { until } if now >= until => {
                protocol::log!(
                    "drain timeout; closing {} connection(s)",
                    self.children.len()
                );
                self.counters.closed_by_limit += self.children.len() as u64;
                self.stop_now();
            }
            Phase::Stopping { kill_at } if now >= kill_at => {
                self.signal_children(Signal::SIGKILL);
                self.phase = Phase::Stopping {
                    kill_at: now + Duration::from_secs(1),
                };
            }
            _ => {}
        }
    }

    fn accept_all(&mut self) {
        while let Some(Source::Stream(listener)) = &self.listener {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.counters.accept_errors += 1;
                    protocol::log!("accept failed: {e}");
                    return;
                }
            };
            self.counters.accepted += 1;
            let std_stream = std::net::TcpStream::from(OwnedFd::from(stream));
            if self.cfg.limits.full(self.children.len() as u64) {
                self.counters.closed_by_limit += 1;
                reset(std_stream);
                continue;
            }
            let idle = self.cfg.limits.idle;
            let proxy = &self.cfg.proxy;
            // A service whose clients meet (chat) gets a bus to this process, the hub.
            let bus = match self
                .hub
                .is_some()
                .then(std::os::unix::net::UnixStream::pair)
            {
                Some(Ok(pair)) => Some(pair),
                Some(Err(e)) => {
                    self.counters.accept_errors += 1;
                    protocol::log!("cannot make a bus for a connection: {e}");
                    continue;
                }
                None => None,
            };
            let child_bus = bus.as_ref().map_or(-1, |(_, c)| c.as_raw_fd());
            let mut keep = [
                std_stream.as_raw_fd(),
                self.report_tx.as_fd().as_raw_fd(),
                child_bus,
            ];
            let lp = &mut self.lp;
            let report_tx = &self.report_tx;
            let service = &self.service;
            // The child handles no signal itself: TERM and QUIT end it (default actions).
            let forked = fork_child(
                Lineage::Worker,
                &mut keep,
                &[],
                || lp.drop_signals(),
                || {
                    let bus = bus.as_ref().and_then(|(_, c)| c.try_clone().ok());
                    child(
                        service,
                        std_stream.try_clone(),
                        (idle, proxy),
                        bus,
                        report_tx,
                    )
                },
            );
            if let (Ok(pid), Some((hub_end, _)), Some(hub)) = (&forked, bus, self.hub.as_mut()) {
                if let Err(e) = hub.join(self.lp.registry(), pid.as_raw() as u32, hub_end) {
                    protocol::log!("cannot link a connection to the bus: {e}");
                }
            }
            self.adopt(forked, "a connection");
            // The parent's copy of the connection closes here; the child holds its own.
        }
    }

    /// Records a child forked for `what`; out of processes, that client is dropped and the
    /// server goes on.
    fn adopt(&mut self, forked: io::Result<Pid>, what: &str) {
        match forked {
            Ok(pid) => {
                self.children.insert(pid, Instant::now());
            }
            Err(e) => {
                self.counters.accept_errors += 1;
                protocol::log!("cannot fork for {what}: {e}");
            }
        }
    }

    /// Takes request datagrams; each forks a child that answers it.
    fn receive_all(&mut self) {
        let mut buf = vec![0u8; worker::exchange::SCRATCH];
        for _ in 0..DATAGRAMS_PER_TURN {
            let Some(Source::Datagram(udp)) = &self.listener else {
                return;
            };
            let (n, peer) = match udp.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.counters.io_errors += 1;
                    continue;
                }
            };
            self.counters.datagrams_in += 1;
            // Every request datagram forks: a flood must not fork without end. At the limit,
            // the oldest child whose peer never answered is killed to make room.
            let Some(transfers) = self.transfers.as_mut() else {
                return;
            };
            let children = &mut self.children;
            let slot = match transfers.admit(peer.ip(), |pid| {
                children.remove(&pid);
            }) {
                Admission::Fork { slot, evicted } => {
                    if evicted {
                        let c = &mut self.counters;
                        c.transfers += 1;
                        c.transfers_failed += 1;
                        c.closed_by_limit += 1;
                    }
                    slot
                }
                Admission::Busy => {
                    // No process to spare: the request is dropped and the client retries.
                    self.counters.closed_by_limit += 1;
                    continue;
                }
            };
            let Some(transfers) = self.transfers.as_ref() else {
                return;
            };
            let verified = transfers.flag(slot);
            let mut keep = vec![udp.as_raw_fd(), self.report_tx.as_fd().as_raw_fd()];
            keep.extend(self.service.descriptors());
            let lp = &mut self.lp;
            let (service, report_tx) = (&self.service, &self.report_tx);
            let datagram = &buf[..n];
            // The child handles TERM itself: a transfer cut short tells its client and
            // removes a partial upload.
            let forked = fork_child(
                Lineage::Worker,
                &mut keep,
                &[signal_hook::consts::SIGTERM],
                || lp.drop_signals(),
                || datagram_child(service, (datagram, peer, udp), verified, report_tx),
            );
            if let Some(t) = self.transfers.as_mut() {
                match &forked {
                    Ok(pid) => t.forked(*pid, peer.ip(), slot),
                    Err(_) => t.unused(slot),
                }
            }
            self.adopt(forked, "a request");
        }
        // More may be waiting: the listener is edge-triggered, so look again next turn.
        self.receive_again = true;
    }

    fn read_reports(&mut self) {
        let mut buf = [0u8; RECORD * 64];
        loop {
            match self.reports.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let whole = self.partial.len() / RECORD * RECORD;
        for rec in self.partial[..whole].chunks_exact(RECORD) {
            let field = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rec[i * 8..i * 8 + 8]);
                u64::from_le_bytes(b)
            };
            let mut c = Counters::from_array(std::array::from_fn(field));
            c.active = 0; // the gauge is the number of children, counted here
            self.counters.add(&c);
        }
        self.partial.drain(..whole);
    }

    fn reap(&mut self) {
        for gone in reap_exited() {
            self.children.remove(&gone.pid);
            if let Some(t) = self.transfers.as_mut() {
                t.gone(gone.pid);
            }
            if let Some(hub) = self.hub.as_mut() {
                hub.leave(self.lp.registry(), gone.pid.as_raw() as u32);
            }
        }
    }

    fn signal_children(&self, sig: Signal) {
        for pid in self.children.keys() {
            let _ = kill(*pid, sig);
        }
    }

    /// One row: this process and its children as a whole. Bytes are counted when a
    /// connection closes (a child reports once, as it exits).
    fn snapshot(&self) -> Snapshot {
        let mut c = self.counters;
        c.active = self.children.len() as u64;
        let uptime = self.started.elapsed().as_secs_f64();
        let row = WorkerRow {
            id: 0,
            pid: std::process::id(),
            generation: 1,
            state: match self.phase {
                Phase::Running => "running",
                _ => "draining",
            }
            .to_string(),
            uptime_secs: uptime,
            last_report_age_secs: Some(0.0),
            counters: c,
            accept_queue: None,
        };
        let mut snap = Snapshot::new("fork-per-conn", uptime, 1, vec![row], &Counters::default());
        snap.accept_queue = match &self.listener {
            Some(Source::Stream(l)) => crate::listener::accept_queue(l),
            _ => None,
        };
        snap
    }
}
