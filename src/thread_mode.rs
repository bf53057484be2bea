//! Thread mode: the classic model this project compares against. One process; `--workers`
//! acceptor threads share the listener; each accepted connection gets its own OS thread doing
//! blocking reads and writes. The main thread only waits for signals and deadlines.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::{Events, Interest, Poll, Token};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use signal_hook_mio::v1_0::Signals;
use socket2::Socket;

use crate::signals::{self, Action};

/// Stack of a connection thread. The echo loop's buffer is on the heap, so 64 KiB is ample
/// and keeps thousands of threads' reserved address space modest (the default is 2 MiB).
const CONN_STACK: usize = 64 * 1024;
/// Read buffer of a connection thread.
const CONN_BUF: usize = 16 * 1024;
/// How often an acceptor looks up from `poll` to see whether it should stop accepting.
const ACCEPT_TICK: u16 = 100;

/// Settings of thread mode.
#[derive(Debug)]
pub struct ThreadConfig {
    /// Acceptor threads sharing the listener.
    pub acceptors: u32,
    /// Graceful-stop budget for open connections.
    pub drain_timeout: Duration,
}

struct Shared {
    accepting: AtomicBool,
    active: AtomicUsize,
}

/// Serves until stopped; `Ok` is a requested stop.
pub fn run(cfg: ThreadConfig, listener: Socket, addr: SocketAddr) -> Result<()> {
    worker::log::set_role("thread-mode");
    let listener = Arc::new(TcpListener::from(std::os::fd::OwnedFd::from(listener)));
    let shared = Arc::new(Shared {
        accepting: AtomicBool::new(true),
        active: AtomicUsize::new(0),
    });
    let mut poll = Poll::new().context("creating the event loop")?;
    let mut sigs = Signals::new(signals::numbers()).context("installing signal handlers")?;
    poll.registry()
        .register(&mut sigs, Token(0), Interest::READABLE)
        .context("watching signals")?;

    let mut acceptors = Vec::new();
    for i in 0..cfg.acceptors {
        let (l, s) = (Arc::clone(&listener), Arc::clone(&shared));
        let handle = thread::Builder::new()
            .name(format!("acceptor-{i}"))
            .spawn(move || accept_loop(&l, &s))
            .context("starting an acceptor thread")?;
        acceptors.push(handle);
    }
    // Only the acceptors hold the listener from here on, so joining them closes it.
    drop(listener);
    crate::announce(addr, "thread", cfg.acceptors);

    let mut events = Events::with_capacity(8);
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if let Some(deadline) = drain_deadline {
            let active = shared.active.load(Ordering::SeqCst);
            if active == 0 {
                worker::log!("drained; exiting");
                return Ok(());
            }
            if Instant::now() >= deadline {
                worker::log!("drain timeout; closing {active} connection(s)");
                return Ok(());
            }
        }
        let wait = drain_deadline.map_or(Duration::from_secs(1), |_| Duration::from_millis(50));
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("waiting for signals"),
        }
        for sig in sigs.pending() {
            match (signals::action(sig), drain_deadline) {
                (Some(Action::GracefulStop), None) => {
                    shared.accepting.store(false, Ordering::SeqCst);
                    // Joining the acceptors drops their listener handles: new connections
                    // are then refused rather than queued for nobody.
                    for a in acceptors.drain(..) {
                        let _ = a.join();
                    }
                    let active = shared.active.load(Ordering::SeqCst);
                    worker::log!(
                        "SIG{}: graceful stop; draining {active} connection(s) for up to {:?}",
                        signals::name(sig),
                        cfg.drain_timeout
                    );
                    drain_deadline = Some(Instant::now() + cfg.drain_timeout);
                }
                (Some(Action::GracefulStop), Some(_)) | (Some(Action::StopNow), _) => {
                    worker::log!("SIG{}: stopping now", signals::name(sig));
                    return Ok(());
                }
                (Some(Action::Reload), _) => {
                    worker::log!("SIGHUP: reload is not supported yet; ignored")
                }
                _ => {}
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
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
            Ok((stream, _)) => start_connection(stream, shared),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                let now = Instant::now();
                if last_error_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                    last_error_log = Some(now);
                    worker::log!("accept failed ({e}); pausing accepts for 100ms");
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn start_connection(stream: TcpStream, shared: &Arc<Shared>) {
    let active = ActiveGuard::new(Arc::clone(shared));
    let spawned = thread::Builder::new()
        .name("conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _active = active;
            echo(stream)
        });
    if let Err(e) = spawned {
        // Out of threads (EAGAIN): this client is closed; the server goes on.
        worker::log!("cannot start a connection thread: {e}");
    }
}

/// Counts a connection as active for as long as it lives, however its thread ends.
struct ActiveGuard(Arc<Shared>);

impl ActiveGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(shared)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Blocking echo: read, write it all back, until the client half-closes or fails.
fn echo(mut stream: TcpStream) {
    // Accepted sockets do not inherit O_NONBLOCK on Linux, but say what this loop needs.
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; CONN_BUF];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
