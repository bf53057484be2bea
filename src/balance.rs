//! How new connections are spread over the workers (`--balance`).
//!
//! - `shared`: one listening socket every worker accepts from. Whichever worker the scheduler
//!   runs first wins each `accept`, so the split follows scheduling, not load.
//! - `reuseport`: one SO_REUSEPORT listening socket per pool slot, all in one reuseport group,
//!   owned by the master; the worker in slot N accepts from socket N only. A small classic BPF
//!   program attached to the group picks the socket for each new connection: the client's
//!   port, halved (Linux's `connect` hands out even ports, two apart), modulo the number of
//!   slots steered to, then mapped to those slots. A slot's socket outlives its workers: a
//!   respawned or reloaded worker adopts it with whatever waits in its queue.
//!
//! Shrinking without drops: a socket leaves the rotation (the program is replaced) before its
//! worker is asked to drain, the draining worker accepts what is still queued (and what is
//! mid-handshake, for a moment) before it lets go, and the master closes a retired socket only
//! when no worker holds it any more, highest slot first, so the group's array of sockets stays
//! in slot order (the kernel fills a hole with its last socket).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::listener::ListenError;
use crate::stats::AcceptQueue;

/// `--balance`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Balance {
    /// One listening socket shared by every worker.
    #[default]
    Shared,
    /// One SO_REUSEPORT socket per worker slot, connections steered by the client's port.
    Reuseport,
}

/// The listening sockets of a process-mode server.
#[derive(Debug)]
pub struct Listeners {
    balance: Balance,
    /// Shared: the one socket. Reuseport: socket N serves slot N; never empty.
    sockets: Vec<Socket>,
    /// Where the group listens, to bind more sockets into it.
    addr: SocketAddr,
    backlog: i32,
    /// The slots the attached program steers to (reuseport).
    steered: Vec<u32>,
}

impl Listeners {
    /// One socket for every worker.
    pub fn shared(socket: Socket) -> Listeners {
        let addr =
            crate::listener::local_addr(&socket).unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        Listeners {
            balance: Balance::Shared,
            sockets: vec![socket],
            addr,
            backlog: 0,
            steered: Vec::new(),
        }
    }

    /// A reuseport group from sockets already bound into it (slot order); more are bound to
    /// `addr` as slots are added.
    pub fn reuseport(
        sockets: Vec<Socket>,
        addr: SocketAddr,
        backlog: i32,
    ) -> io::Result<Listeners> {
        if sockets.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no listening socket",
            ));
        }
        for s in &sockets {
            if !s.reuse_port()? {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "--balance reuseport: the listening socket handed over lacks SO_REUSEPORT \
                     (change --balance with a restart, or set ReusePort=yes in the socket unit)",
                ));
            }
        }
        Ok(Listeners {
            balance: Balance::Reuseport,
            sockets,
            addr,
            backlog,
            steered: Vec::new(),
        })
    }

    /// The balance in force.
    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// Every socket, in slot order (for a successor master).
    pub fn fds(&self) -> Vec<RawFd> {
        self.sockets.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// The socket the worker in slot `id` accepts from, binding new ones into the group as
    /// the pool grows.
    pub fn for_slot(&mut self, id: u32) -> Result<RawFd, ListenError> {
        if self.balance == Balance::Shared {
            return Ok(self.sockets[0].as_raw_fd());
        }
        while self.sockets.len() <= id as usize {
            let datagram = self.sockets[0].r#type().ok() == Some(Type::DGRAM);
            self.sockets
                .push(bind_reuseport(self.addr, self.backlog, datagram)?);
        }
        Ok(self.sockets[id as usize].as_raw_fd())
    }

    /// Steers new connections to exactly `slots` (reuseport; a no-op when unchanged). Slots
    /// without a socket yet get one.
    pub fn steer(&mut self, slots: &[u32]) -> io::Result<()> {
        if self.balance == Balance::Shared || slots.is_empty() || slots == self.steered {
            return Ok(());
        }
        if let Some(&top) = slots.iter().max() {
            self.for_slot(top)
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        let v6 = self.addr.is_ipv6();
        let program = steering_program(v6, slots);
        attach(&self.sockets[0], &program)?;
        self.steered = slots.to_vec();
        Ok(())
    }

    /// Closes the sockets of slots `keep` and above, highest first (reuseport).
    pub fn close_from(&mut self, keep: usize) {
        while self.balance == Balance::Reuseport && self.sockets.len() > keep.max(1) {
            self.sockets.pop();
        }
    }

    /// How many sockets exist (reuseport: slots that have one).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// The slots new connections are steered to.
    #[cfg(test)]
    pub fn steered(&self) -> &[u32] {
        &self.steered
    }

    /// The accept queue of the socket slot `id` accepts from.
    pub fn queue(&self, id: u32) -> Option<AcceptQueue> {
        let s = match self.balance {
            Balance::Shared => self.sockets.first(),
            Balance::Reuseport => self.sockets.get(id as usize),
        };
        s.and_then(crate::listener::accept_queue)
    }

    /// Every socket's accept queue added up.
    pub fn total_queue(&self) -> Option<AcceptQueue> {
        self.sockets
            .iter()
            .filter_map(crate::listener::accept_queue)
            .reduce(|a, b| AcceptQueue {
                waiting: a.waiting + b.waiting,
                limit: a.limit + b.limit,
            })
    }
}

/// Binds one socket of a reuseport group on `addr` (port 0: the first of a new group picks
/// the port), listening with `backlog` unless it is a datagram socket.
pub fn bind_reuseport(
    addr: SocketAddr,
    backlog: i32,
    datagram: bool,
) -> Result<Socket, ListenError> {
    let fail = |source| ListenError::Bind { addr, source };
    let (ty, proto) = if datagram {
        (Type::DGRAM, Protocol::UDP)
    } else {
        (Type::STREAM, Protocol::TCP)
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto)).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.set_reuse_port(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    if !datagram {
        socket.listen(backlog).map_err(fail)?;
    }
    socket.set_nonblocking(true).map_err(fail)?;
    Ok(socket)
}

/// A reuseport group of `count` sockets on `addr` (a port of 0 is chosen by the first).
pub fn bind_group(
    addr: SocketAddr,
    backlog: i32,
    count: usize,
    datagram: bool,
) -> Result<(Vec<Socket>, SocketAddr), ListenError> {
    let first = bind_reuseport(addr, backlog, datagram)?;
    let bound =
        crate::listener::local_addr(&first).map_err(|source| ListenError::Bind { addr, source })?;
    let mut sockets = vec![first];
    for _ in 1..count.max(1) {
        sockets.push(bind_reuseport(bound, backlog, datagram)?);
    }
    Ok((sockets, bound))
}

/// Where a packet's source port is, from the network header: past a 20-byte IPv4 header (no
/// options: the kernel's own SYNs carry none) or a 40-byte IPv6 one.
const SKF_NET_OFF: u32 = (-0x100000i32) as u32;

/// The classic BPF program: `slots[(source port / 2) % slots.len()]`.
fn steering_program(v6: bool, slots: &[u32]) -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let ip_header = if v6 { 40 } else { 20 };
    let mut p = vec![
        // A = the source port (first half-word of the transport header)
        op(
            libc::BPF_LD | libc::BPF_H | libc::BPF_ABS,
            0,
            0,
            SKF_NET_OFF + ip_header,
        ),
        // A >>= 1: consecutive connections from one host take ports two apart
        op(libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K, 0, 0, 1),
        op(
            libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K,
            0,
            0,
            slots.len() as u32,
        ),
    ];
    // A is now an index into `slots`: map it to the slot's place in the group (its number).
    for (i, &slot) in slots.iter().enumerate() {
        p.push(op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            1,
            i as u32,
        ));
        p.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, slot));
    }
    // Unreachable; an index past the group makes the kernel fall back to its hash.
    p.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX));
    p
}

/// Attaches `program` to the reuseport group `socket` belongs to (replacing the one before).
fn attach(socket: &Socket, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| io::Error::other("too many slots to steer"))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: SO_ATTACH_REUSEPORT_CBPF reads a sock_fprog of the given size, whose `filter`
    // points at `len` instructions; both live across the call, and the kernel copies them.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::TcpStream;

    /// Which socket of the group took each of `n` connections opened one after another.
    fn spread(l: &Listeners, n: usize) -> HashMap<usize, usize> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(TcpStream::connect(l.addr).unwrap());
        }
        let mut counts = HashMap::new();
        for (i, _) in l.sockets.iter().enumerate() {
            let q = l.queue(i as u32).unwrap().waiting as usize;
            if q > 0 {
                counts.insert(i, q);
            }
        }
        counts
    }

    #[test]
    fn connections_opened_one_at_a_time_alternate_between_the_steered_slots() {
        let (sockets, addr) = bind_group("127.0.0.1:0".parse().unwrap(), 64, 3, false).unwrap();
        let mut l = Listeners::reuseport(sockets, addr, 64).unwrap();
        l.steer(&[0, 1]).unwrap();
        let counts = spread(&l, 40);
        assert_eq!(
            counts.get(&2),
            None,
            "slot 2 is out of the rotation: {counts:?}"
        );
        let (a, b) = (counts[&0], counts[&1]);
        assert_eq!(a + b, 40);
        // Near even: a port the kernel skips (one in use elsewhere) breaks the alternation
        // now and then, as other tests in this process open connections too.
        assert!(a >= 10 && b >= 10, "{counts:?}");
    }

    #[test]
    fn slots_are_added_in_order_and_closed_from_the_top() {
        let (sockets, addr) = bind_group("127.0.0.1:0".parse().unwrap(), 8, 1, false).unwrap();
        let mut l = Listeners::reuseport(sockets, addr, 8).unwrap();
        l.for_slot(3).unwrap();
        assert_eq!(l.len(), 4);
        l.steer(&[3]).unwrap();
        assert_eq!(spread(&l, 5).get(&3), Some(&5));
        l.close_from(1);
        assert_eq!(l.len(), 1);
        l.steer(&[0]).unwrap();
        assert!(TcpStream::connect(addr).is_ok());
    }

    #[test]
    fn a_socket_without_reuseport_cannot_join() {
        let plain = crate::listener::bind("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let addr = crate::listener::local_addr(&plain).unwrap();
        let e = Listeners::reuseport(vec![plain], addr, 8).unwrap_err();
        assert!(e.to_string().contains("SO_REUSEPORT"), "{e}");
    }
}
