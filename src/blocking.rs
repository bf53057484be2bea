//! What the two single-process comparison modes (thread-per-connection and
//! fork-per-connection) share: connection limits and their settings. The conversation itself
//! is the service's (`Service::serve_blocking`).

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of thread and fork-per-conn modes alike.
#[derive(Debug)]
pub struct SingleProcessConfig {
    /// Graceful-stop budget for open connections.
    pub drain_timeout: Duration,
    /// Where the control socket is served (for the log line; the socket is bound already).
    pub control: PathBuf,
    /// Log a line of totals this often.
    pub log_stats: Option<Duration>,
    /// Connection limits (`max_conns` counts connection threads or children).
    pub limits: Limits,
    /// `--proxy-protocol`: who may send a PROXY header, and how long it may take.
    pub proxy: Option<worker::proxy::ProxyRule>,
}

/// Limits on connections, shared by thread and fork-per-conn modes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections held at most (0: no limit).
    pub max_conns: u64,
    /// Close a connection that received nothing for this long.
    pub idle: Option<Duration>,
}

impl Limits {
    /// The limits a worker config names.
    pub fn of(cfg: &worker::WorkerConfig) -> Limits {
        Limits {
            max_conns: cfg.max_conns,
            idle: cfg.idle(),
        }
    }

    /// Whether `held` connections leave room for one more.
    pub fn full(&self, held: u64) -> bool {
        self.max_conns > 0 && held >= self.max_conns
    }
}

/// Resets a connection at once (SO_LINGER 0 makes close send RST): the answer to a client
/// beyond `--max-conns`, which it sees promptly instead of waiting in the backlog.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
