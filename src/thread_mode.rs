//! Thread mode: the classic model this project compares against. One process; `--workers`
//! acceptor threads share the listener; each accepted connection gets its own OS thread doing
//! blocking reads and writes. The main thread only waits for signals and deadlines.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use protocol::stats::Counters;
use signal_hook_mio::v1_0::Signals;
use socket2::Socket;

use crate::blocking::{Limits, SingleProcessConfig, reset};
use crate::control::{ControlServer, Request};
use crate::serve_loop::{Ready, ServeLoop, StatsLog};
use crate::signals::{self, Action};
use crate::stats::{Snapshot, WorkerRow};
use worker::exchange::{count_end, drive_blocking, max_exchanges};
use worker::exchange_registry::{Entered, Registry};
use worker::service::{Abort, DatagramAnswer, End, Exchange, Service};

/// Stack of a connection thread. The echo loop's buffer is on the heap, so 64 KiB is ample
/// and keeps thousands of threads' reserved address space modest (the default is 2 MiB).
const CONN_STACK: usize = 64 * 1024;
/// How often an acceptor looks up from `poll` to see whether it should stop accepting.
const ACCEPT_TICK: u16 = 100;

/// Settings of thread mode.
#[derive(Debug)]
pub struct ThreadConfig {
    /// Acceptor threads sharing the listener.
    pub acceptors: u32,
    /// The UDP socket, with `--udp`: as many echo threads as acceptors share it.
    pub udp: Option<std::net::UdpSocket>,
    /// What thread mode shares with fork-per-conn mode.
    pub base: SingleProcessConfig,
}

struct Shared {
    accepting: AtomicBool,
    /// The server will not wait for transfers any longer: they tell their peers and end.
    cut: AtomicBool,
    active: AtomicUsize,
    /// The transfers running (a thread each), for admission.
    transfers: Arc<Registry>,
}

/// One acceptor thread's counters, updated by the connection threads it started. Relaxed
/// atomics: each is a tally read now and then, never a synchronisation point.
/// An acceptor's counters, shared with its connection threads.
type Tally = protocol::stats::AtomicCounters;

/// The stats snapshot: one row per acceptor thread, all in this process.
fn snapshot(tallies: &[Arc<Tally>], started: Instant, draining: bool) -> Snapshot {
    let uptime = started.elapsed().as_secs_f64();
    let rows = tallies
        .iter()
        .enumerate()
        .map(|(i, t)| WorkerRow {
            id: i as u32,
            pid: std::process::id(),
            generation: 1,
            state: if draining { "draining" } else { "running" }.to_string(),
            uptime_secs: uptime,
            last_report_age_secs: Some(0.0),
            counters: t.load(),
            accept_queue: None,
        })
        .collect();
    Snapshot::new("thread", uptime, 1, rows, &Counters::default())
}

/// Serves until stopped; `Ok` is a requested stop.
pub fn run<S: Service>(
    cfg: ThreadConfig,
    service: S,
    listener: Socket,
    addr: SocketAddr,
    (mut control, metrics): (ControlServer, Option<crate::metrics::MetricsServer>),
) -> Result<()> {
    protocol::log::set_role("thread-mode");
    // A datagram service (TFTP) comes with its UDP socket where the listener would be: no
    // acceptor threads then, only the datagram threads.
    let (listener, udp) =
        if listener.r#type().context("reading the socket's type")? == socket2::Type::DGRAM {
            (None, Some(std::net::UdpSocket::from(listener)))
        } else {
            let l = TcpListener::from(std::os::fd::OwnedFd::from(listener));
            (Some(Arc::new(l)), cfg.udp)
        };
    let shared = Arc::new(Shared {
        accepting: AtomicBool::new(true),
        cut: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        transfers: Arc::new(Registry::default()),
    });
    let started = Instant::now();
    let sigs = Signals::new(signals::numbers()).context("installing signal handlers")?;
    let mut lp = ServeLoop::new(Some(sigs), &mut control)?;
    let mut metrics = metrics.map(|m| lp.watch_metrics(m)).transpose()?;
    protocol::log!("control socket {}", cfg.base.control.display());

    let tallies: Vec<Arc<Tally>> = (0..cfg.acceptors).map(|_| Arc::default()).collect();
    let mut acceptors = Vec::new();
    for (i, tally) in tallies.iter().enumerate() {
        let Some(listener) = listener.as_ref() else {
            break;
        };
        let (l, s, t, svc, proxy) = (
            Arc::clone(listener),
            Arc::clone(&shared),
            Arc::clone(tally),
            service.clone(),
            cfg.base.proxy.clone(),
        );
        let limits = cfg.base.limits;
        let handle = thread::Builder::new()
            .name(format!("acceptor-{i}"))
            .spawn(move || accept_loop(&l, &s, &t, (limits, proxy), &svc))
            .context("starting an acceptor thread")?;
        acceptors.push(handle);
    }
    // Only the acceptors hold the listener from here on, so joining them closes it.
    drop(listener);
    if let Some(udp) = udp.as_ref() {
        udp.set_nonblocking(false)
            .context("making the UDP socket blocking")?;
        udp.set_read_timeout(Some(Duration::from_millis(u64::from(ACCEPT_TICK))))
            .context("setting the UDP socket's timeout")?;
        for (i, tally) in tallies.iter().enumerate() {
            let (u, s, t, svc) = (
                udp.try_clone().context("sharing the UDP socket")?,
                Arc::clone(&shared),
                Arc::clone(tally),
                service.clone(),
            );
            let limits = cfg.base.limits;
            acceptors.push(
                thread::Builder::new()
                    .name(format!("udp-{i}"))
                    .spawn(move || udp_loop(&u, &s, &t, limits, &svc))
                    .context("starting a UDP thread")?,
            );
        }
    }
    crate::announce(addr, "thread", cfg.acceptors);

    let mut udp_main = udp;
    let mut drain_deadline: Option<Instant> = None;
    let mut stats_log = StatsLog::new(cfg.base.log_stats, Instant::now());
    loop {
        stats_log.tick(Instant::now(), || {
            snapshot(&tallies, started, drain_deadline.is_some())
        });
        control.expire(lp.registry());
        if let Some(m) = metrics.as_mut() {
            m.expire(lp.registry(), Instant::now());
        }
        if let Some(deadline) = drain_deadline {
            let active = shared.active.load(Ordering::SeqCst);
            if active == 0 {
                protocol::log!("drained; exiting");
                stats_log.finish(|| snapshot(&tallies, started, true));
                return Ok(());
            }
            if Instant::now() >= deadline {
                protocol::log!("drain timeout; closing {active} connection(s)");
                cut_transfers(&shared);
                stats_log.finish(|| snapshot(&tallies, started, true));
                return Ok(());
            }
        }
        // While draining, look at the active count often: nothing signals its reaching zero.
        let now = Instant::now();
        let poll_drain = drain_deadline.map(|_| now + Duration::from_millis(50));
        let ready = lp
            .wait(
                now,
                [poll_drain, stats_log.next(), control.next_deadline()],
                None,
            )
            .context("waiting for signals")?;
        let mut pending = Vec::new();
        for r in ready {
            if let Ready::Signal(sig) = r {
                pending.push(sig);
            }
            if let (Ready::Metrics(token), Some(m)) = (r, metrics.as_mut()) {
                let draining = drain_deadline.is_some();
                m.serve_now(lp.registry(), token, || {
                    snapshot(&tallies, started, draining)
                });
            }
            if let Ready::Control(token) = r {
                let draining = drain_deadline.is_some();
                let drain = cfg.base.drain_timeout;
                control.handle(lp.registry(), token, &mut |req, _| {
                    Some(match req {
                        Request::Stats => crate::control::Response::Stats(Box::new(snapshot(
                            &tallies, started, draining,
                        ))),
                        other => crate::control::single_process_answer(other, drain),
                    })
                });
            }
        }
        for sig in pending {
            match (signals::action(sig), drain_deadline) {
                (Some(Action::GracefulStop), None) => {
                    shared.accepting.store(false, Ordering::SeqCst);
                    drop(udp_main.take());
                    // Joining the acceptors drops their listener handles: new connections
                    // are then refused rather than queued for nobody.
                    for a in acceptors.drain(..) {
                        let _ = a.join();
                    }
                    let active = shared.active.load(Ordering::SeqCst);
                    protocol::log!(
                        "SIG{}: graceful stop; draining {active} connection(s) for up to {:?}",
                        signals::name(sig),
                        cfg.base.drain_timeout
                    );
                    drain_deadline = Some(Instant::now() + cfg.base.drain_timeout);
                }
                (Some(Action::GracefulStop), Some(_)) | (Some(Action::StopNow), _) => {
                    protocol::log!("SIG{}: stopping now", signals::name(sig));
                    cut_transfers(&shared);
                    return Ok(());
                }
                (Some(Action::Reload), _) => {
                    protocol::log!("SIGHUP: reloading is for --mode process; ignored")
                }
                (Some(Action::Ignore), _) => protocol::log!(
                    "SIG{}: not a signal this server acts on; ignored",
                    signals::name(sig)
                ),
                _ => {}
            }
        }
    }
}

fn accept_loop<S: Service>(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    tally: &Arc<Tally>,
    (limits, proxy): (Limits, Option<worker::proxy::ProxyRule>),
    service: &S,
) {
    let mut last_error_log: Option<Instant> = None;
    while shared.accepting.load(Ordering::SeqCst) {
        // The listener is non-blocking (shared with the other acceptors): wait for it with a
        // timeout so a stop request is noticed within a tick.
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ACCEPT_TICK)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(_) => continue, // EINTR
        }
        match listener.accept() {
            Ok((stream, _)) => {
                Tally::bump(&tally.accepted, 1);
                if limits.full(shared.active.load(Ordering::SeqCst) as u64) {
                    Tally::bump(&tally.closed_by_limit, 1);
                    reset(stream);
                } else {
                    start_connection(stream, shared, tally, (limits.idle, &proxy), service);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                Tally::bump(&tally.accept_errors, 1);
                // Out of descriptors or memory: back off instead of spinning.
                let now = Instant::now();
                if last_error_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                    last_error_log = Some(now);
                    protocol::log!("accept failed ({e}); pausing accepts for 100ms");
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Asks transfer threads to tell their peers the server is going, and gives them a moment to.
fn cut_transfers(shared: &Shared) {
    shared.cut.store(true, Ordering::SeqCst);
    let until = Instant::now() + Duration::from_millis(500);
    while shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < until {
        thread::sleep(Duration::from_millis(10));
    }
}

/// Answers datagrams as the service says, within what each source may draw
/// (`echo::SourceLimit`, for a service that asks for it), with blocking I/O, until the server stops; an
/// exchange a datagram begins (a TFTP transfer) gets a thread of its own.
fn udp_loop<S: Service>(
    udp: &std::net::UdpSocket,
    shared: &Arc<Shared>,
    tally: &Arc<Tally>,
    limits: Limits,
    service: &S,
) {
    let mut buf = vec![0u8; 65_536];
    // Each UDP thread keeps its own table, like each worker in process mode.
    let mut sources = worker::echo::SourceLimit::new();
    let local = udp
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    while shared.accepting.load(Ordering::SeqCst) {
        match udp.recv_from(&mut buf) {
            Ok((n, peer)) => {
                Tally::bump(&tally.datagrams_in, 1);
                match service.answer_datagram(&buf[..n], peer, local) {
                    DatagramAnswer::Refuse => Tally::bump(&tally.datagrams_refused, 1),
                    DatagramAnswer::Ignore => {}
                    // Over its source's share: how a loop between two servers ends.
                    DatagramAnswer::Reply(_)
                        if service.limits_sources() && !sources.allow(peer) =>
                    {
                        Tally::bump(&tally.datagrams_refused, 1)
                    }
                    DatagramAnswer::Reply(reply) => match udp.send_to(&reply, peer) {
                        Ok(_) => Tally::bump(&tally.datagrams_out, 1),
                        Err(_) => Tally::bump(&tally.io_errors, 1),
                    },
                    DatagramAnswer::Begin(x) => start_exchange(x, shared, tally, limits),
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => Tally::bump(&tally.io_errors, 1),
        }
    }
}

/// Runs an exchange in a thread of its own, counted as active while it lives. When the
/// transfers are at their limit, the oldest whose peer never answered is ended first (its
/// thread gone before this one starts); with none such the request is told "busy".
fn start_exchange<X: Exchange>(mut x: X, shared: &Arc<Shared>, tally: &Arc<Tally>, limits: Limits) {
    Tally::bump(&tally.transfers, 1);
    let ticket = match shared.transfers.enter(&x, max_exchanges(limits.max_conns)) {
        Ok((ticket, entered)) => {
            if entered == Entered::Evicted {
                Tally::bump(&tally.closed_by_limit, 1);
            }
            ticket
        }
        Err(_) => {
            let mut c = Counters::default();
            c.closed_by_limit += 1;
            let end = x.abort(Abort::Busy, &mut c);
            count_end(end, &mut c);
            tally.add(&c);
            return;
        }
    };
    let active = ActiveGuard::new(Arc::clone(shared), Arc::clone(tally));
    let (shared, tally2) = (Arc::clone(shared), Arc::clone(tally));
    // The exchange follows the thread over a channel, so that if no thread can be started it
    // is still here to tell its client (and remove a partial upload).
    let (handoff, arrival) = std::sync::mpsc::channel::<X>();
    let spawned = thread::Builder::new()
        .name("transfer".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _active = active;
            let Ok(mut x) = arrival.recv() else { return };
            // Declared after the exchange, so dropped before it: the registry never names
            // a closed socket.
            let ticket = ticket;
            let flags = &ticket.flags;
            let mut c = Counters::default();
            let stop = || {
                if shared.cut.load(Ordering::Relaxed) {
                    Some(Abort::Stopping)
                } else {
                    flags.evicted()
                }
            };
            drive_blocking(&mut x, &mut c, &stop, &|| flags.set_verified());
            tally2.add(&c);
        });
    let refused = match spawned {
        Ok(_) => handoff.send(x).err().map(|e| e.0),
        Err(_) => Some(x),
    };
    if let Some(mut x) = refused {
        // Out of threads: counted as an accept error, as for connections.
        let mut c = Counters::default();
        c.accept_errors += 1;
        let end = x.abort(Abort::Busy, &mut c);
        count_end(end, &mut c);
        tally.add(&c);
    }
}

fn start_connection<S: Service>(
    stream: TcpStream,
    shared: &Arc<Shared>,
    tally: &Arc<Tally>,
    (idle, proxy): (Option<Duration>, &Option<worker::proxy::ProxyRule>),
    service: &S,
) {
    let active = ActiveGuard::new(Arc::clone(shared), Arc::clone(tally));
    let tally_for_errors = Arc::clone(tally);
    let tally = Arc::clone(tally);
    let service = service.clone();
    let proxy = proxy.clone();
    let spawned = thread::Builder::new()
        .name("conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _active = active;
            // The header is read in the connection's own thread: a slow one stalls nobody.
            if let Some(rule) = &proxy {
                if rule.accept_blocking(&stream).is_err() {
                    Tally::bump(&tally.proxy_errors, 1);
                    return;
                }
            }
            let end = service.serve_blocking(stream, idle, None, &|moved| tally.add(moved));
            match end {
                End::Error => Tally::bump(&tally.io_errors, 1),
                End::Idle => Tally::bump(&tally.closed_by_limit, 1),
                End::Eof => {}
            }
        });
    if let Err(e) = spawned {
        // Out of threads (EAGAIN): this client is closed; the server goes on. Counted as an
        // accept error; logged at most once a second, so a flood cannot flood the log too.
        Tally::bump(&tally_for_errors.accept_errors, 1);
        static LAST_LOG: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
        let now = Instant::now();
        let mut last = LAST_LOG.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *last = Some(now);
            protocol::log!(
                "cannot start a connection thread: {e} (connection closed; counted in accept_errors)"
            );
        }
    }
}

/// Counts a connection as active for as long as it lives, however its thread ends.
struct ActiveGuard(Arc<Shared>, Arc<Tally>);

impl ActiveGuard {
    fn new(shared: Arc<Shared>, tally: Arc<Tally>) -> Self {
        shared.active.fetch_add(1, Ordering::SeqCst);
        tally.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(shared, tally)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.1.active.fetch_sub(1, Ordering::Relaxed);
    }
}
