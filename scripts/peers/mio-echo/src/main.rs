//! A minimal prefork echo server: the practical ceiling prefork-echo's process mode is measured
//! against. One listener bound by the parent, N forked workers sharing it, each an
//! edge-triggered mio loop: accept until "would block", read until "would block", write back
//! at once, watch for writability only while bytes are owed. Nothing else: no stats, IPC,
//! signals, limits, timers or supervision. Usage: `mio-echo [ADDR] [WORKERS] [reread]`; prints
//! `listening on ADDR` once the workers exist; the workers die with the parent.
//!
//! By default a short read ends the turn (the queue is empty; edge-triggered epoll announces
//! the next bytes), as prefork-echo's process mode did. With `reread`, it reads again after
//! each echo until "would block": what a client with a thread per connection rewards, since
//! its next message is often there already (the ceiling's "mio-echo-reread" peer).

use std::io::{self, Read, Write};
use std::net::TcpListener as StdListener;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

const LISTENER: Token = Token(usize::MAX);

struct Conn {
    stream: TcpStream,
    owed: Vec<u8>,
    /// Watched for writability (only while something is owed).
    writing: bool,
}

fn main() -> io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8080".into());
    let workers: usize = std::env::args().nth(2).and_then(|w| w.parse().ok()).unwrap_or(2);
    let reread = std::env::args().nth(3).as_deref() == Some("reread");
    let listener = StdListener::bind(&addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    for _ in 0..workers {
        // SAFETY: the parent is single-threaded here, so the child starts with no lock held by
        // a thread that does not exist in it; the child never returns from `worker`.
        match unsafe { libc::fork() } {
            -1 => return Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number has no memory effects.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                let code = match worker(listener, reread) {
                    Ok(()) => 0,
                    Err(_) => 1,
                };
                std::process::exit(code);
            }
            _ => {}
        }
    }
    println!("listening on {local}");
    io::stdout().flush()?;
    drop(listener);
    // The parent waits; SIGTERM ends it and PR_SET_PDEATHSIG ends the workers.
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only the status integer it is given.
        if unsafe { libc::waitpid(-1, &mut status, 0) } < 0 {
            return Ok(());
        }
    }
}

fn worker(listener: StdListener, reread: bool) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::from_std(listener);
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Slab<Conn> = Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        poll.poll(&mut events, None)?;
        for event in events.iter() {
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            let entry = conns.vacant_entry();
                            poll.registry().register(&mut stream, Token(entry.key()), Interest::READABLE)?;
                            entry.insert(Conn { stream, owed: Vec::new(), writing: false });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                }
                continue;
            }
            let key = event.token().0;
            let Some(conn) = conns.get_mut(key) else { continue };
            match serve(conn, &mut buf, reread) {
                Ok(true) if conn.writing == conn.owed.is_empty() => {
                    conn.writing = !conn.owed.is_empty();
                    let interest = if conn.writing {
                        Interest::READABLE | Interest::WRITABLE
                    } else {
                        Interest::READABLE
                    };
                    poll.registry().reregister(&mut conn.stream, Token(key), interest)?;
                }
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    let mut c = conns.remove(key);
                    let _ = poll.registry().deregister(&mut c.stream);
                }
            }
        }
    }
}

/// Echoes what is readable; `Ok(false)` when the peer is gone. `reread`: a short read does
/// not end the turn, only "would block" does.
fn serve(conn: &mut Conn, buf: &mut [u8], reread: bool) -> io::Result<bool> {
    if !flush(conn)? {
        return Ok(true); // still owing: reading more would only grow the debt
    }
    loop {
        match conn.stream.read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                conn.owed.extend_from_slice(&buf[..n]);
                if !flush(conn)? {
                    return Ok(true);
                }
                if n < buf.len() && !reread {
                    return Ok(true); // a short read: the socket is drained
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes what is owed; `Ok(true)` when nothing is left.
fn flush(conn: &mut Conn) -> io::Result<bool> {
    while !conn.owed.is_empty() {
        match conn.stream.write(&conn.owed) {
            Ok(n) => {
                conn.owed.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
