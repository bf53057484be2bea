//! The service interface: what a worker speaks on its sockets, kept apart from the engine that
//! binds, supervises, reloads, upgrades and counts (which knows no protocol).
//!
//! Every concurrency model drives the same [`Service`]: process mode's event loop through
//! [`Session`]s (one per connection, driven on readiness), thread and fork-per-conn modes
//! through [`Service::serve_blocking`] (one thread or process per connection), and all of them
//! pass each UDP datagram to [`Service::answer_datagram`]. A datagram may begin an
//! [`Exchange`]: a conversation on a socket of its own with its own timers (a TFTP transfer),
//! which process mode drives in its event loop and the other modes in a thread or process of
//! its own ([`crate::exchange::drive_blocking`]). Connections that must meet (a chat) share a
//! [`Room`] per worker, joined to the other workers' by a bus the engine provides when the
//! service [needs one](Service::needs_bus).
//!
//! Adding a service: a module of its own (see `echo/`) implementing these traits, and a
//! variant of [`ServiceKind`] that `--service NAME` selects. Nothing in the master changes.

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use protocol::stats::Counters;

/// The services a server can speak (`--service`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceKind {
    /// RFC 862 echo over TCP (and UDP with `--udp`): every byte comes back, in order.
    #[default]
    Echo,
    /// TFTP (RFC 1350 with options): files from `--root`, over UDP only.
    Tftp,
    /// A line-based group chat: every line goes to every other client, whichever worker
    /// holds it.
    Chat,
}

/// What the engine binds for a service: a TCP listener, or one UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A listening TCP socket the workers accept from (and a UDP one too with `--udp`).
    Stream,
    /// Only a UDP socket, every worker receiving from it.
    Datagram,
}

impl ServiceKind {
    /// Its `--service` name.
    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Echo => "echo",
            ServiceKind::Tftp => "tftp",
            ServiceKind::Chat => "chat",
        }
    }

    /// The socket the engine binds for it.
    pub fn transport(self) -> Transport {
        match self {
            ServiceKind::Echo | ServiceKind::Chat => Transport::Stream,
            ServiceKind::Tftp => Transport::Datagram,
        }
    }

    /// Whether its processes must reach one another: the engine then links every worker
    /// (and fork-per-conn child) to a hub by a bus ([`protocol::bus`]).
    pub fn needs_bus(self) -> bool {
        self == ServiceKind::Chat
    }

    /// Whether it answers every byte with itself, in order (echo): only such a service can
    /// be served on io_uring's completion path (`--io uring`), a received buffer going back
    /// out as it came.
    pub fn echoes_verbatim(self) -> bool {
        self == ServiceKind::Echo
    }
}

/// How a call to [`Session::drive`] left the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Drive {
    /// Waiting for the socket to become readable or writable again.
    Waiting,
    /// Work remains but the turn's budget is spent: drive again without waiting for an event.
    Yielded,
    /// The conversation is over and the peer got everything it was owed; close it.
    Finished,
}

/// How a blocking conversation ([`Service::serve_blocking`]) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client half-closed and got everything back.
    Eof,
    /// Reset, broken pipe, ...
    Error,
    /// Nothing received for the idle timeout.
    Idle,
}

impl End {
    /// How a failed blocking read ends a connection: the read timeout (`idle`) expiring is
    /// `Idle`, anything but an interruption (`None`: read again) is `Error`.
    pub fn after_read_error(e: &io::Error) -> Option<End> {
        match e.kind() {
            io::ErrorKind::Interrupted => None,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Some(End::Idle),
            _ => Some(End::Error),
        }
    }
}

/// What to do with one datagram that arrived on the shared socket.
#[derive(Debug)]
pub enum DatagramAnswer<'a, X> {
    /// Send these bytes back to the sender.
    Reply(Cow<'a, [u8]>),
    /// Send nothing, and count it as refused (a source that could start a loop).
    Refuse,
    /// Send nothing (a stray packet the protocol says to drop).
    Ignore,
    /// Start this conversation on its own socket (counted in `transfers`).
    Begin(X),
}

/// How a call into an [`Exchange`] left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Still going: wait for its socket or its deadline.
    Going,
    /// Over, successfully (counted in `transfers_done`).
    Done,
    /// Over, unsuccessfully (counted in `transfers_failed`).
    Failed,
}

/// A conversation begun by one datagram and carried on over a UDP socket of its own (its
/// port is TFTP's transfer ID), with its own retransmission timer. Its socket is
/// non-blocking; the driver calls [`Exchange::on_time`] first (to send the opening packet),
/// then `on_readable` when the socket is readable and `on_time` when the deadline passes.
pub trait Exchange: Send + 'static {
    /// Its own socket, to watch.
    fn socket(&self) -> &std::net::UdpSocket;
    /// When it next needs [`Exchange::on_time`] (a retransmission or giving up).
    fn deadline(&self) -> Instant;
    /// Reads every waiting datagram and answers it. `scratch` is a shared receive buffer.
    fn on_readable(&mut self, scratch: &mut [u8], counters: &mut Counters) -> Step;
    /// Sends what is due at `now`: the first packet, a retransmission, or the end.
    fn on_time(&mut self, now: Instant, counters: &mut Counters) -> Step;
    /// Ends it before its time: tell the peer why, if the protocol can. Returns how it
    /// ended (`Done` if nothing was left to do but linger).
    fn abort(&mut self, why: Abort, counters: &mut Counters) -> Step;
    /// The peer it talks to.
    fn peer(&self) -> std::net::SocketAddr;
    /// Whether the peer has answered at least once. Until then its source address may be
    /// forged: such an exchange is the first to go when room runs out.
    fn verified(&self) -> bool;
    /// When it began.
    fn started(&self) -> Instant;
}

/// Why the engine ends an exchange before its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// The worker already holds as many as `--max-conns` allows.
    Busy,
    /// The server is stopping and will not wait any longer.
    Stopping,
    /// Its peer never answered and its room is wanted for a newer request: it ends
    /// silently (a forged source is sent nothing more).
    Evicted,
}

/// The exchange of a service that has none (echo): a type with no values.
#[derive(Debug)]
pub enum NoExchange {}

impl Exchange for NoExchange {
    fn socket(&self) -> &std::net::UdpSocket {
        match *self {}
    }
    fn deadline(&self) -> Instant {
        match *self {}
    }
    fn on_readable(&mut self, _: &mut [u8], _: &mut Counters) -> Step {
        match *self {}
    }
    fn on_time(&mut self, _: Instant, _: &mut Counters) -> Step {
        match *self {}
    }
    fn abort(&mut self, _: Abort, _: &mut Counters) -> Step {
        match *self {}
    }
    fn peer(&self) -> std::net::SocketAddr {
        match *self {}
    }
    fn verified(&self) -> bool {
        match *self {}
    }
    fn started(&self) -> Instant {
        match *self {}
    }
}

/// What the connections one worker holds share, and its end of the bus to the other workers
/// (a chat room). Services whose connections are independent use `()`.
pub trait Room {
    /// Registers its end of the bus, if it has one, with the loop's poll under `token`
    /// (readable and writable).
    fn watch(&mut self, registry: &mio::Registry, token: mio::Token) -> io::Result<()>;
    /// The bus is ready: act on what arrived, send what is owed. `Err`: the bus (and the hub
    /// with it) is gone.
    fn on_bus(&mut self) -> io::Result<()>;
    /// Appends the keys of sessions given work since the last call (output from another
    /// connection, a pause lifted), which no socket event would announce.
    fn woken(&mut self, into: &mut Vec<usize>);
    /// The end of a loop turn: sends what is owed to the bus, and adds what the room counted
    /// to `counters`. `Err`: the bus is gone.
    fn settle(&mut self, counters: &mut Counters) -> io::Result<()>;
    /// When the room next has something to do by itself (paused sessions to wake when a
    /// hold lapses); the loop wakes by then and calls [`Room::woken`].
    fn deadline(&self) -> Option<Instant> {
        None
    }
}

/// The room of services whose connections never meet.
impl Room for () {
    fn watch(&mut self, _: &mio::Registry, _: mio::Token) -> io::Result<()> {
        Ok(())
    }
    fn on_bus(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn woken(&mut self, _: &mut Vec<usize>) {}
    fn settle(&mut self, _: &mut Counters) -> io::Result<()> {
        Ok(())
    }
}

/// One TCP connection of a service inside an event loop (process mode).
pub trait Session {
    /// The socket, to (de)register it with the loop.
    fn stream_mut(&mut self) -> &mut mio::net::TcpStream;
    /// An event reported the peer's FIN: no further edge will announce it.
    fn note_peer_closed(&mut self);
    /// An event said the socket is readable (or closed, or failed). A session that reads only
    /// after such news saves a read per drive it gets for other reasons (chat's output).
    fn note_readable(&mut self) {}
    /// When bytes last moved (for `--idle-timeout`).
    fn last_active(&self) -> Instant;
    /// Bytes owed to the peer: with none, a writable edge alone gives the session nothing to do.
    fn owed(&self) -> usize;
    /// Moves bytes until the socket would block or the turn's budget is spent; `Err` is an
    /// I/O error that ends the connection. `scratch` is the loop's shared read buffer.
    fn drive(&mut self, scratch: &mut [u8], counters: &mut Counters) -> io::Result<Drive>;
}

/// What a worker speaks on its sockets.
pub trait Service: Clone + Send + Sync + 'static {
    /// A connection's state in an event loop.
    type Session: Session;
    /// A conversation a datagram begins ([`NoExchange`] for services without one).
    type Exchange: Exchange;
    /// What one worker's connections share (`()` for services whose connections never meet).
    type Room: Room;

    /// Its `--service` name, for log lines.
    fn name(&self) -> &'static str;

    /// Descriptors it holds that a forked child (fork-per-conn) must keep: the child closes
    /// every other one (TFTP's root directory).
    fn descriptors(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }

    /// Whether its processes must reach one another (see [`ServiceKind::needs_bus`]).
    fn needs_bus(&self) -> bool {
        false
    }

    /// One worker's room (process mode), given its end of the bus when the service
    /// [needs one](ServiceKind::needs_bus).
    fn room(&self, bus: Option<std::os::unix::net::UnixStream>) -> Self::Room;

    /// Starts a session on a freshly accepted connection (process mode), known to the loop
    /// (and to the room's [`Room::woken`]) as `key`.
    fn session(
        &self,
        stream: mio::net::TcpStream,
        room: &mut Self::Room,
        key: usize,
    ) -> Self::Session;

    /// Serves one connection with blocking I/O until it ends (thread and fork-per-conn
    /// modes); `idle` closes a connection that receives nothing for that long, `bus` is the
    /// process's end of the bus (a fork-per-conn child of a service that needs one), and
    /// `tally` hears of what moved, as counter increments (from any thread the service runs).
    fn serve_blocking(
        &self,
        stream: std::net::TcpStream,
        idle: Option<Duration>,
        bus: Option<std::os::unix::net::UnixStream>,
        tally: &(dyn Fn(&Counters) + Sync),
    ) -> End;

    /// The answer to one datagram that arrived from `peer` on the shared socket bound to
    /// `local`.
    fn answer_datagram<'a>(
        &self,
        datagram: &'a [u8],
        peer: SocketAddr,
        local: SocketAddr,
    ) -> DatagramAnswer<'a, Self::Exchange>;

    /// Whether its answers on the shared UDP socket are bounded per source (at most
    /// `echo::SOURCE_RATE` a second after a burst of `echo::SOURCE_BURST`): a service that
    /// answers every datagram in kind (echo) can be set ping-ponging with another such server
    /// by one forged datagram, and the bound is what ends that loop.
    fn limits_sources(&self) -> bool {
        false
    }
}
