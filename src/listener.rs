//! The listening socket: resolved, bound with SO_REUSEADDR and the configured backlog, before
//! any worker exists, so every worker inherits the one socket.

use std::net::{SocketAddr, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

/// Why the server could not listen.
#[derive(Debug, Error)]
pub enum ListenError {
    /// The address does not parse or resolve.
    #[error("cannot use listen address {addr:?}: {reason}")]
    Address {
        /// What was given.
        addr: String,
        /// Why it is unusable.
        reason: String,
    },
    /// A socket call failed (port in use, permission denied, ...).
    #[error("cannot listen on {addr}")]
    Bind {
        /// The resolved address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// Resolves `HOST:PORT` (an IP literal or a name such as `localhost`) to its first address.
pub fn resolve(addr: &str) -> Result<SocketAddr, ListenError> {
    let fail = |reason: String| ListenError::Address {
        addr: addr.to_string(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| {
            fail(format!(
                "{e} (expected HOST:PORT, e.g. 127.0.0.1:7007 or [::1]:0)"
            ))
        })?
        .next()
        .ok_or_else(|| fail("it resolves to no address".into()))
}

/// Binds and listens on `addr`. The socket is non-blocking and close-on-exec: workers that
/// need it across exec get it explicitly.
pub fn bind(addr: SocketAddr, backlog: i32) -> Result<Socket, ListenError> {
    let fail = |source| ListenError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
    // SO_REUSEADDR lets a restarted server bind while old connections sit in TIME_WAIT; it
    // does not let two live listeners share the port (that would be SO_REUSEPORT).
    socket.set_reuse_address(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(backlog).map_err(fail)?;
    // O_NONBLOCK is shared by every process holding the socket: workers poll it, none blocks.
    socket.set_nonblocking(true).map_err(fail)?;
    Ok(socket)
}

/// Binds the UDP echo socket on the TCP listener's address (same port), non-blocking and
/// close-on-exec: one socket every worker shares.
pub fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, ListenError> {
    let fail = |source| ListenError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    Ok(socket.into())
}

/// Adopts an inherited UDP socket (binary upgrade).
pub fn adopt_udp(fd: std::os::fd::OwnedFd) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::from(fd);
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    Ok(socket.into())
}

/// Takes over the service's socket someone else bound (systemd socket activation, or the old
/// master in an upgrade): a listening TCP socket, or the UDP socket of a datagram service.
pub fn adopt(fd: std::os::fd::OwnedFd) -> std::io::Result<Socket> {
    let socket = Socket::from(fd);
    if socket.r#type()? != Type::DGRAM && !socket.is_listener()? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the inherited descriptor is not a listening socket",
        ));
    }
    socket.set_nonblocking(true)?;
    // It arrives without close-on-exec; workers that need it get it explicitly.
    socket.set_cloexec(true)?;
    Ok(socket)
}

/// How many connections wait in a listening socket's accept queue, and its limit (the
/// backlog as the kernel applies it), from `TCP_INFO`: for a listener, Linux reports the
/// queue's length in `tcpi_unacked` and its limit in `tcpi_sacked`. `None` for anything that
/// is not a listening TCP socket.
pub fn accept_queue(socket: &impl std::os::fd::AsRawFd) -> Option<crate::stats::AcceptQueue> {
    // SAFETY: `tcp_info` is plain integers, so all-zero is a valid value; getsockopt writes
    // at most `len` bytes into it and the length back into `len`, both ours for the call.
    let (info, rc) = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (info, rc)
    };
    // 10 is TCP_LISTEN in the kernel's state numbering.
    (rc == 0 && info.tcpi_state == 10).then_some(crate::stats::AcceptQueue {
        waiting: info.tcpi_unacked,
        limit: info.tcpi_sacked,
    })
}

/// The address actually bound (the real port when 0 was asked for).
pub fn local_addr(socket: &Socket) -> std::io::Result<SocketAddr> {
    socket.local_addr()?.as_socket().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "not an IP socket address")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_literals_and_refuses_garbage() {
        assert_eq!(
            resolve("127.0.0.1:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert_eq!(resolve("[::1]:7").unwrap(), "[::1]:7".parse().unwrap());
        let e = resolve("not an address").unwrap_err().to_string();
        assert!(
            e.starts_with("cannot use listen address \"not an address\""),
            "{e}"
        );
    }

    #[test]
    fn the_accept_queue_counts_connections_nobody_accepted_yet() {
        let l = bind("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let addr = local_addr(&l).unwrap();
        let q = accept_queue(&l).unwrap();
        assert_eq!((q.waiting, q.limit), (0, 8));
        let held: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        assert_eq!(accept_queue(&l).unwrap().waiting, 3);
        let udp = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(accept_queue(&udp).is_none());
        drop(held);
    }

    #[test]
    fn a_bound_port_cannot_be_bound_twice() {
        let a = bind("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let addr = local_addr(&a).unwrap();
        let e = bind(addr, 8).unwrap_err().to_string();
        assert!(e.contains("cannot listen on"), "{e}");
        let cause = std::error::Error::source(&bind(addr, 8).unwrap_err()).map(ToString::to_string);
        assert!(cause.is_some_and(|c| c.contains("in use")));
    }
}
