//! A minimal prefork echo on io_uring: is there room past the epoll ceiling? One listener bound
//! by the parent, N forked workers sharing it, each with its own ring: a multishot accept, then
//! per connection a recv, the send of what came, the recv again. Every turn submits all new
//! entries and reaps all completions in one `io_uring_enter`, so a worker makes one system call
//! per batch of round trips where an epoll loop makes two per round trip. Usage:
//! `uring-echo [ADDR] [WORKERS]`; prints `listening on ADDR` once the workers exist.

use std::io::{self, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

const ACCEPT: u64 = u64::MAX;
const BUF: usize = 16 * 1024;

/// What a connection is waiting for.
#[derive(Clone, Copy, PartialEq)]
enum Wait {
    Recv,
    /// Sending `buf[from..to]`.
    Send {
        from: usize,
        to: usize,
    },
}

struct Conn {
    fd: i32,
    buf: Box<[u8]>,
    wait: Wait,
}

fn main() -> io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let workers: usize = std::env::args()
        .nth(2)
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    let listener = TcpListener::bind(&addr)?;
    let local = listener.local_addr()?;
    for _ in 0..workers {
        // SAFETY: the parent is single-threaded here, so the child starts with no lock held by
        // a thread that does not exist in it; the child never returns from `worker`.
        match unsafe { libc::fork() } {
            -1 => return Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number has no memory effects.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                let code = match worker(&listener) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("uring-echo worker: {e}");
                        1
                    }
                };
                std::process::exit(code);
            }
            _ => {}
        }
    }
    println!("listening on {local}");
    io::stdout().flush()?;
    drop(listener);
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only the status integer it is given.
        if unsafe { libc::waitpid(-1, &mut status, 0) } < 0 {
            return Ok(());
        }
    }
}

fn worker(listener: &TcpListener) -> io::Result<()> {
    let mut ring: IoUring<squeue::Entry, cqueue::Entry> = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(4096)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut pending: Vec<squeue::Entry> = vec![
        opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .build()
            .user_data(ACCEPT),
    ];
    loop {
        {
            let mut sq = ring.submission();
            while let Some(e) = pending.pop() {
                // SAFETY: every entry points into a connection's boxed buffer, which stays
                // where it is until that connection's completion says the kernel is done.
                if unsafe { sq.push(&e) }.is_err() {
                    pending.push(e);
                    break;
                }
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EINTR)
                    || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        for cqe in ring.completion() {
            let key = cqe.user_data();
            let res = cqe.result();
            if key == ACCEPT {
                if res >= 0 {
                    let one: libc::c_int = 1;
                    // SAFETY: setsockopt reads one int from a live local.
                    unsafe {
                        libc::setsockopt(
                            res,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            (&one as *const libc::c_int).cast(),
                            4,
                        );
                    }
                    let conn = Conn {
                        fd: res,
                        buf: vec![0u8; BUF].into_boxed_slice(),
                        wait: Wait::Recv,
                    };
                    let slot = match free.pop() {
                        Some(s) => {
                            conns[s] = Some(conn);
                            s
                        }
                        None => {
                            conns.push(Some(conn));
                            conns.len() - 1
                        }
                    };
                    pending.push(recv(conns[slot].as_mut().expect("just set"), slot));
                }
                if !cqueue::more(cqe.flags()) {
                    pending.push(
                        opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
                            .build()
                            .user_data(ACCEPT),
                    );
                }
                continue;
            }
            let slot = key as usize;
            let Some(conn) = conns.get_mut(slot).and_then(|c| c.as_mut()) else {
                continue;
            };
            let next = match (conn.wait, res) {
                (_, r) if r < 0 && r != -libc::EAGAIN && r != -libc::EINTR => None,
                (Wait::Recv, 0) => None,
                (Wait::Recv, r) if r < 0 => Some(recv(conn, slot)),
                (Wait::Recv, n) => {
                    conn.wait = Wait::Send {
                        from: 0,
                        to: n as usize,
                    };
                    Some(send(conn, slot))
                }
                (Wait::Send { from, to }, n) => {
                    let from = from + n.max(0) as usize;
                    if from < to {
                        conn.wait = Wait::Send { from, to };
                        Some(send(conn, slot))
                    } else {
                        conn.wait = Wait::Recv;
                        Some(recv(conn, slot))
                    }
                }
            };
            match next {
                Some(e) => pending.push(e),
                None => {
                    // SAFETY: the fd is this connection's own; nothing is in flight for it.
                    unsafe { libc::close(conn.fd) };
                    conns[slot] = None;
                    free.push(slot);
                }
            }
        }
    }
}

fn recv(conn: &mut Conn, slot: usize) -> squeue::Entry {
    opcode::Recv::new(types::Fd(conn.fd), conn.buf.as_mut_ptr(), BUF as u32)
        .build()
        .user_data(slot as u64)
}

fn send(conn: &mut Conn, slot: usize) -> squeue::Entry {
    let Wait::Send { from, to } = conn.wait else {
        unreachable!("send while receiving")
    };
    // SAFETY: from < to <= BUF, so the pointer stays inside the buffer.
    let ptr = unsafe { conn.buf.as_ptr().add(from) };
    opcode::Send::new(types::Fd(conn.fd), ptr, (to - from) as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(slot as u64)
}
