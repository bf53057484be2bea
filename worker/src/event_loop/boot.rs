//! A worker's start: adopting the descriptors the master handed over, registering them with
//! the event loop, and telling the master it is ready.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use mio::net::{TcpListener, UdpSocket};
use mio::unix::SourceFd;
use mio::{Interest, Poll};
use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use nix::sys::socket::{getsockopt, sockopt};
use protocol::ipc::{Message, Reporter};
use protocol::stats::Counters;
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use thiserror::Error;

use super::ring::Ring;
use super::{BUS, HANDLED_SIGNALS, LISTENER, MASTER, Phase, SCRATCH, SIGNALS, UDP, Worker};
use crate::config::{IoDriver, WorkerConfig};
use crate::service::{Room, Service, Transport};

/// Why a worker could not start.
#[derive(Debug, Error)]
pub enum BootError {
    /// A descriptor the command line names is not open in this process.
    #[error("descriptor {0} is not open")]
    NotOpen(i32),
    /// The inherited listening descriptor is not a listening socket.
    #[error("descriptor {0} is not a listening socket")]
    NotListening(i32),
    /// The inherited datagram descriptor is not a UDP socket.
    #[error("descriptor {0} is not a datagram socket")]
    NotDatagram(i32),
    /// A system call failed while setting up.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// The failure.
        source: io::Error,
    },
}

/// Takes ownership of inherited descriptor `raw`, refusing one that is not open: wrapping a
/// closed number would end the process on its drop (an I/O-safety abort) instead of exiting
/// with the boot-failure code the master understands.
fn inherited(raw: i32) -> Result<OwnedFd, BootError> {
    // SAFETY: F_GETFD only reads the descriptor's flags; it is harmless on any number.
    if raw < 0 || unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        return Err(BootError::NotOpen(raw));
    }
    // SAFETY: open, handed to this process by the master (not close-on-exec), and nothing
    // else in it owns it; each descriptor is taken exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Wraps the inherited listening socket, refusing a descriptor that is not one.
fn adopt_listener(fd: OwnedFd, raw: i32) -> Result<TcpListener, BootError> {
    if !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
        // Don't close what is not ours to interpret.
        std::mem::forget(fd);
        return Err(BootError::NotListening(raw));
    }
    let std_listener = std::net::TcpListener::from(fd);
    // O_NONBLOCK lives on the shared open file, so every worker sees the master's setting;
    // set it anyway rather than depend on it.
    std_listener
        .set_nonblocking(true)
        .map_err(io_ctx("making the listener non-blocking"))?;
    Ok(TcpListener::from_std(std_listener))
}

/// Wraps an inherited UDP socket, refusing a descriptor that is not one.
fn adopt_udp(fd: OwnedFd, raw: i32) -> Result<UdpSocket, BootError> {
    if getsockopt(&fd, sockopt::SockType).ok() != Some(nix::sys::socket::SockType::Datagram) {
        std::mem::forget(fd);
        return Err(BootError::NotDatagram(raw));
    }
    let std_udp = std::net::UdpSocket::from(fd);
    std_udp
        .set_nonblocking(true)
        .map_err(io_ctx("making the UDP socket non-blocking"))?;
    Ok(UdpSocket::from_std(std_udp))
}

fn io_ctx(what: &'static str) -> impl FnOnce(io::Error) -> BootError {
    move |source| BootError::Io { what, source }
}

impl<S: Service> Worker<S> {
    pub(super) fn boot(cfg: WorkerConfig, service: S) -> Result<Worker<S>, BootError> {
        let (listen_fd, ipc_fd) = (inherited(cfg.listen_fd)?, inherited(cfg.ipc_fd)?);
        let reporter = Reporter::new(ipc_fd).map_err(io_ctx("opening the IPC channel"))?;
        // A datagram service's one socket comes as the "listening" descriptor: the master
        // binds what the service's transport needs and hands it over alike.
        let (mut listener, shared_udp) = match cfg.service.transport() {
            Transport::Stream => (Some(adopt_listener(listen_fd, cfg.listen_fd)?), None),
            Transport::Datagram => (None, Some(adopt_udp(listen_fd, cfg.listen_fd)?)),
        };
        let mut udp = match shared_udp {
            Some(u) => Some(u),
            None if cfg.udp_fd >= 0 => Some(adopt_udp(inherited(cfg.udp_fd)?, cfg.udp_fd)?),
            None => None,
        };
        let udp_local = udp
            .as_ref()
            .and_then(|u| u.local_addr().ok())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));

        let poll = Poll::new().map_err(io_ctx("creating the event loop"))?;
        let mut signals = Signals::new(HANDLED_SIGNALS).map_err(io_ctx("installing signals"))?;
        let registry = poll.registry();
        if let Some(l) = listener.as_mut() {
            registry
                .register(l, LISTENER, Interest::READABLE)
                .map_err(io_ctx("watching the listener"))?;
        }
        registry
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(io_ctx("watching signals"))?;
        registry
            .register(
                &mut SourceFd(&reporter.stream().as_fd().as_raw_fd()),
                MASTER,
                Interest::READABLE,
            )
            .map_err(io_ctx("watching the master"))?;
        if let Some(u) = udp.as_mut() {
            registry
                .register(u, UDP, Interest::READABLE)
                .map_err(io_ctx("watching the UDP socket"))?;
        }
        let bus = match cfg.bus_fd {
            fd if fd >= 0 => Some(std::os::unix::net::UnixStream::from(inherited(fd)?)),
            _ => None,
        };
        let mut room = service.room(bus);
        room.watch(registry, BUS)
            .map_err(io_ctx("watching the bus"))?;
        // The master blocked every signal across fork/exec so none could arrive before the
        // handlers above existed; from here on they are recorded and acted on by the loop.
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
            .map_err(|e| io_ctx("unblocking signals")(e.into()))?;

        let ring = (cfg.io == IoDriver::Uring && cfg.service.echoes_verbatim())
            .then(|| Ring::new(poll.as_raw_fd(), cfg.max_unsent, cfg.idle().is_some()))
            .transpose()
            .map_err(io_ctx("setting up io_uring (--io uring)"))?;
        let next_report = cfg.stats_every().map(|d| Instant::now() + d);
        let proxy = cfg.proxy();
        let mut worker = Worker {
            cfg,
            service,
            poll,
            listener,
            signals,
            reporter,
            conns: Slab::new(),
            counters: Counters::default(),
            scratch: vec![0; SCRATCH],
            phase: Phase::Serving,
            accept_paused_until: None,
            accept_until: None,
            last_accept_error_log: None,
            next_report,
            again: Vec::new(),
            accept_again: false,
            next_idle_sweep: None,
            udp,
            udp_again: false,
            sources: crate::echo::SourceLimit::new(),
            proxy,
            pending: Slab::new(),
            udp_local,
            exchanges: Slab::new(),
            room,
            woken: Vec::new(),
            ring,
            epoll_again: false,
        };
        worker.next_idle_sweep = worker.idle_sweep_every().map(|d| Instant::now() + d);
        worker
            .reporter
            .send(&Message::Ready)
            .map_err(io_ctx("telling the master we are ready"))?;
        Ok(worker)
    }
}
