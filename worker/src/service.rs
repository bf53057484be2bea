//! The service interface: what a worker speaks on its sockets, kept apart from the engine that
//! binds, supervises, reloads, upgrades and counts (which knows no protocol).
//!
//! Every concurrency model drives the same [`Service`]: process mode's event loop through
//! [`Session`]s (one per connection, driven on readiness), thread and fork-per-conn modes
//! through [`Service::serve_blocking`] (one thread or process per connection), and all of them
//! pass each UDP datagram to [`Service::answer_datagram`].
//!
//! Adding a service: a module of its own (see `echo/`) implementing these traits, and a
//! variant of [`ServiceKind`] that `--service NAME` selects. Nothing in the master changes.

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
}

impl ServiceKind {
    /// Its `--service` name.
    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Echo => "echo",
        }
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

/// What to do with one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum DatagramAnswer<'a> {
    /// Send these bytes back to the sender.
    Reply(&'a [u8]),
    /// Send nothing, and count it as refused (a source that could start a loop).
    Refuse,
}

/// One TCP connection of a service inside an event loop (process mode).
pub trait Session {
    /// The socket, to (de)register it with the loop.
    fn stream_mut(&mut self) -> &mut mio::net::TcpStream;
    /// An event reported the peer's FIN: no further edge will announce it.
    fn note_peer_closed(&mut self);
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

    /// Its `--service` name, for log lines.
    fn name(&self) -> &'static str;

    /// Starts a session on a freshly accepted connection (process mode).
    fn session(&self, stream: mio::net::TcpStream) -> Self::Session;

    /// Serves one connection with blocking I/O until it ends (thread and fork-per-conn
    /// modes); `idle` closes a connection that receives nothing for that long, and `moved`
    /// hears of every chunk (bytes read, bytes written).
    fn serve_blocking(
        &self,
        stream: std::net::TcpStream,
        idle: Option<Duration>,
        moved: &mut dyn FnMut(u64, u64),
    ) -> End;

    /// The answer to one datagram that arrived from `peer` on a socket bound to `own_port`.
    fn answer_datagram<'a>(
        &self,
        datagram: &'a [u8],
        peer: SocketAddr,
        own_port: u16,
    ) -> DatagramAnswer<'a>;
}
