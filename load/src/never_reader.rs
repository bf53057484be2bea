//! The never-readers' side of a chat run: whether the server disconnected them.
//!
//! A never-reader's socket holds whatever the server sent it, unread; the server's
//! disconnection shows only after that backlog, as end of file (or a reset). Read once the
//! run is measured, so reading it disturbs nothing.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;

/// Reading stops here: a server still sending this much is not dropping the client.
const MOST: usize = 256 << 20;

/// How many of `clients` the server has disconnected.
pub fn dropped(clients: &[TcpStream]) -> u64 {
    clients.iter().filter(|c| disconnected(c)).count() as u64
}

fn disconnected(mut c: &TcpStream) -> bool {
    if c.set_nonblocking(true).is_err() {
        return false;
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut read = 0;
    while read < MOST {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => read += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
    false
}
