//! Blocking connection handling, shared by the two single-process comparison modes
//! (thread-per-connection and fork-per-connection): the echo loop, connection limits, and
//! the settings both modes take.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

/// Read buffer of a blocking echo loop.
const CONN_BUF: usize = 16 * 1024;

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

/// How a blocking echo ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client half-closed and got everything back.
    Eof,
    /// Reset, broken pipe, ...
    Error,
    /// Nothing received for the idle timeout.
    Idle,
}

/// Blocking echo: read, write it all back, until the client half-closes, fails, or sends
/// nothing for `idle`. `moved` hears of every chunk (bytes read, bytes written back). Shared
/// by thread mode and fork-per-connection.
pub fn echo_blocking(
    mut stream: TcpStream,
    idle: Option<Duration>,
    mut moved: impl FnMut(u64, u64),
) -> End {
    // Accepted sockets do not inherit O_NONBLOCK on Linux, but say what this loop needs.
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(idle).is_err() {
        return End::Error;
    }
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; CONN_BUF];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return End::Eof;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    moved(n as u64, 0);
                    return End::Error;
                }
                moved(n as u64, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return End::Idle;
            }
            Err(_) => return End::Error,
        }
    }
}
