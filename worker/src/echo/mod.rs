//! The echo service (RFC 862): every byte a client sends comes back, in order, unchanged;
//! over UDP, every datagram goes back to its sender, unless its source could start a loop.

mod blocking;
mod datagram;
mod reread;
mod session;

use std::net::SocketAddr;
use std::time::Duration;

pub use datagram::{SOURCE_BURST, SOURCE_RATE, SourceLimit, loops_back};
pub use session::Connection;

use protocol::stats::Counters;

use crate::service::{DatagramAnswer, End, NoExchange, Service};

/// The echo service; `max_unsent` bounds what one connection may owe (back-pressure).
#[derive(Debug, Clone, Copy)]
pub struct Echo {
    /// Bytes a connection may have read but not yet echoed before reading from it stops.
    pub max_unsent: usize,
    /// Whether idle connections are closed (`--idle-timeout`): only then does a session
    /// read the clock as bytes move.
    pub watch_idle: bool,
}

impl Service for Echo {
    type Session = Connection;
    type Exchange = NoExchange;
    type Room = ();

    fn name(&self) -> &'static str {
        "echo"
    }

    fn room(&self, _bus: Option<std::os::unix::net::UnixStream>) {}

    fn session(&self, stream: mio::net::TcpStream, _: &mut (), _: usize) -> Connection {
        Connection::new(stream, self.max_unsent, self.watch_idle)
    }

    fn serve_blocking(
        &self,
        stream: std::net::TcpStream,
        idle: Option<Duration>,
        _bus: Option<std::os::unix::net::UnixStream>,
        tally: &(dyn Fn(&Counters) + Sync),
    ) -> End {
        blocking::echo_blocking(stream, idle, &mut |read, written| {
            tally(&Counters {
                bytes_in: read,
                bytes_out: written,
                ..Counters::default()
            })
        })
    }

    fn answer_datagram<'a>(
        &self,
        datagram: &'a [u8],
        peer: SocketAddr,
        local: SocketAddr,
    ) -> DatagramAnswer<'a, NoExchange> {
        if loops_back(peer, local.port()) {
            DatagramAnswer::Refuse
        } else {
            DatagramAnswer::Reply(datagram.into())
        }
    }

    fn limits_sources(&self) -> bool {
        true
    }
}
