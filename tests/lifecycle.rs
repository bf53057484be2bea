//! Supervision and signals, observed from outside: processes that appear and disappear, exit
//! codes, and what connected clients experience.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::{Server, alive, echo, wait_until};
use nix::sys::signal::Signal;

/// Whether the connection is dead: the next echo fails or reads EOF.
fn is_dead(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").is_err() {
        return true;
    }
    let mut buf = [0u8; 4];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn a_killed_worker_is_replaced_and_other_connections_are_untouched() {
    for spawn in ["fork", "exec"] {
        let server = Server::start(&["--workers", "2", "--spawn", spawn]);
        let mut conns: Vec<TcpStream> = (0..40).map(|_| server.connect()).collect();
        for s in &mut conns {
            echo(s, b"hello");
        }
        let before = server.workers();
        assert_eq!(before.len(), 2);
        // Kill the worker holding the most connections, so the test sees real losses.
        let port = server.addr.port();
        let victim = *before
            .iter()
            .max_by_key(|&&w| common::client_ports_held_by(w, port).len())
            .unwrap();
        let victims_clients = common::client_ports_held_by(victim, port);
        assert!(!victims_clients.is_empty());

        let t0 = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || {
                let now = server.workers();
                now.len() == 2 && !now.contains(&victim)
            }),
            "no replacement worker appeared: {:?}\n{}",
            server.workers(),
            server.stderr()
        );
        eprintln!("{spawn}: replacement worker after {:?}", t0.elapsed());
        let survivor = before.iter().find(|&&w| w != victim).unwrap();
        assert!(
            server.workers().contains(survivor),
            "the other worker lives"
        );

        for s in &mut conns {
            let port = s.local_addr().unwrap().port();
            if victims_clients.contains(&port) {
                assert!(
                    is_dead(s),
                    "a connection of the killed worker still answers"
                );
            } else {
                echo(s, b"still served");
            }
        }
        // New clients are served (by either worker).
        for _ in 0..20 {
            common::echo_to_eof(server.connect(), b"new client");
        }
    }
}

/// SIGTERM (or SIGINT) while 50 clients are mid-conversation: each finishes, new clients are
/// refused, and the master exits 0 leaving no process behind.
fn graceful_stop_lets_conversations_finish(args: &[&str], sig: Signal) {
    let mut server = Server::start(args);
    let mut conns: Vec<TcpStream> = (0..50).map(|_| server.connect()).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        echo(s, format!("first half {i}").as_bytes());
    }
    let tree = common::descendants(server.pid);
    server.signal(sig);
    assert!(
        server.wait_for_log("graceful stop", Duration::from_secs(10)),
        "{}",
        server.stderr()
    );
    // Once every copy of the listener is closed, new connections are refused outright.
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect(server.addr)
            .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)),
        "new connections were not refused during the drain"
    );
    for (i, mut s) in conns.into_iter().enumerate() {
        let msg = format!("second half {i}");
        echo(&mut s, msg.as_bytes());
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    server.assert_exits_ok(Duration::from_secs(20));
    for p in tree {
        assert!(
            wait_until(Duration::from_secs(5), || !alive(p)),
            "{p} outlived the master"
        );
    }
}

#[test]
fn sigterm_drains_open_connections_in_process_mode() {
    graceful_stop_lets_conversations_finish(&["--workers", "3"], Signal::SIGTERM);
}

#[test]
fn sigint_drains_open_connections_in_exec_spawned_process_mode() {
    graceful_stop_lets_conversations_finish(&["--workers", "2", "--spawn", "exec"], Signal::SIGINT);
}

#[test]
fn sigterm_drains_open_connections_on_io_uring() {
    if common::memory::uring_or_skip("graceful stop on --io uring") {
        graceful_stop_lets_conversations_finish(
            &["--workers", "2", "--io", "uring"],
            Signal::SIGTERM,
        );
    }
}

#[test]
fn sigterm_drains_open_connections_in_thread_mode() {
    graceful_stop_lets_conversations_finish(
        &["--workers", "2", "--mode", "thread"],
        Signal::SIGTERM,
    );
}

/// A second SIGTERM during the drain, or SIGQUIT, stops at once: far sooner than the drain
/// timeout, and the held connection is closed.
fn stops_at_once(args: &[&str], first: Option<Signal>, then: Signal) {
    let mut server = Server::start(&[args, &["--drain-timeout", "120"]].concat());
    let mut held = server.connect();
    echo(&mut held, b"busy");
    if let Some(sig) = first {
        server.signal(sig);
        assert!(server.wait_for_log("graceful stop", Duration::from_secs(10)));
    }
    let t0 = Instant::now();
    server.signal(then);
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.is_some(), "still running\n{}", server.stderr());
    assert!(status.unwrap().success(), "{status:?}");
    eprintln!("stopped {:?} after {then}", t0.elapsed());
    assert!(
        wait_until(Duration::from_secs(10), || is_dead(&mut held)),
        "the held connection survived"
    );
}

#[test]
fn sigterm_drains_open_connections_in_fork_per_connection_mode() {
    graceful_stop_lets_conversations_finish(&["--mode", "fork-per-conn"], Signal::SIGTERM);
}

#[test]
fn a_second_sigterm_stops_at_once() {
    stops_at_once(&["--workers", "2"], Some(Signal::SIGTERM), Signal::SIGTERM);
    if common::memory::uring_or_skip("a second SIGTERM on --io uring") {
        stops_at_once(
            &["--workers", "2", "--io", "uring"],
            Some(Signal::SIGTERM),
            Signal::SIGTERM,
        );
    }
    stops_at_once(
        &["--workers", "2", "--mode", "thread"],
        Some(Signal::SIGTERM),
        Signal::SIGTERM,
    );
}

#[test]
fn sigquit_stops_at_once() {
    stops_at_once(&["--workers", "2"], None, Signal::SIGQUIT);
    if common::memory::uring_or_skip("SIGQUIT on --io uring") {
        stops_at_once(&["--workers", "2", "--io", "uring"], None, Signal::SIGQUIT);
    }
    stops_at_once(
        &["--workers", "2", "--mode", "thread"],
        None,
        Signal::SIGQUIT,
    );
}

#[test]
fn workers_die_with_a_sigkilled_master() {
    for spawn in ["fork", "exec"] {
        let mut server = Server::start(&["--workers", "3", "--spawn", spawn]);
        let workers = server.workers();
        assert_eq!(workers.len(), 3);
        server.signal(Signal::SIGKILL);
        server.wait_exit(Duration::from_secs(5));
        assert!(
            // Kernel-delivered (PR_SET_PDEATHSIG): at once, but this box is loaded.
            wait_until(Duration::from_secs(10), || workers
                .iter()
                .all(|&w| !alive(w))),
            "{spawn}: workers outlived their master: {:?}",
            workers.iter().filter(|&&w| alive(w)).collect::<Vec<_>>()
        );
        // Nothing keeps the port: a new server can take it at once.
        let again = Server::start(&["--listen", &server.addr.to_string(), "--workers", "1"]);
        echo(&mut again.connect(), b"port is free");
    }
}

#[test]
fn a_worker_that_keeps_dying_makes_the_master_give_up() {
    // A bad deploy: exec-mode workers run the binary on disk, and it has been replaced by one
    // that exits at once. The master must back off, then stop with a reason, not loop forever.
    let bin = common::BinaryCopy::new();
    let mut server = Server::try_start(&bin.path, &["--workers", "1", "--spawn", "exec"]).unwrap();
    bin.break_it();

    let worker = server.workers()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), Signal::SIGKILL).unwrap();
    let status = server.wait_exit(Duration::from_secs(60));
    let log = server.stderr();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(log.contains("giving up"), "{log}");
    assert!(log.contains("respawning in"), "no backoff seen:\n{log}");
    assert!(common::children_of(server.pid).is_empty());
}
