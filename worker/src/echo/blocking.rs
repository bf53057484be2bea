//! Echo with blocking I/O, one connection per thread or process: the textbook loop.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use crate::service::End;

/// Read buffer of a blocking echo loop.
const CONN_BUF: usize = 16 * 1024;

/// Blocking echo: read, write it all back, until the client half-closes, fails, or sends
/// nothing for `idle`. `moved` hears of every chunk (bytes read, bytes written back). Shared
/// by thread mode and fork-per-connection.
pub fn echo_blocking(
    mut stream: TcpStream,
    idle: Option<Duration>,
    moved: &mut dyn FnMut(u64, u64),
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
            Err(e) => {
                if let Some(end) = End::after_read_error(&e) {
                    return end;
                }
            }
        }
    }
}
