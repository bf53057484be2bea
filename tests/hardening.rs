//! Hostile clients and exhausted limits: the server keeps serving everyone else, loses nothing
//! it accepted, says what happened in its stats, and stays within its memory and CPU.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, client, echo, echo_to_eof, wait_until};

/// Whether the server reset or closed this connection (a read fails or returns EOF).
fn refused_promptly(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"x");
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

fn total(server: &Server, key: &str) -> u64 {
    server.stats()["totals"][key].as_u64().unwrap()
}

#[test]
fn connections_beyond_max_conns_are_reset_promptly_and_counted() {
    for args in [
        &["--workers", "1"][..],
        &["--workers", "2", "--mode", "thread"],
        &["--mode", "fork-per-conn"],
        &["--workers", "1", "--io", "uring"],
    ] {
        if args.contains(&"uring") && !common::memory::uring_or_skip("--max-conns on --io uring") {
            continue;
        }
        let server =
            Server::start(&[args, &["--max-conns", "10", "--stats-interval", "0.1"]].concat());
        let mut held: Vec<TcpStream> = (0..10).map(|_| server.connect()).collect();
        for s in &mut held {
            echo(s, b"in");
        }
        let t0 = Instant::now();
        let mut over = server.connect();
        assert!(refused_promptly(&mut over), "{args:?}: the 11th was served");
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(wait_until(Duration::from_secs(5), || total(
            &server,
            "closed_by_limit"
        ) >= 1));
        // Everyone held is still served, and a freed slot is taken again.
        for s in &mut held {
            echo(s, b"still");
        }
        drop(held.pop());
        assert!(
            wait_until(Duration::from_secs(5), || {
                let mut s = server.connect();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                s.write_all(b"ok").is_ok() && {
                    let mut b = [0u8; 2];
                    s.read_exact(&mut b).is_ok()
                }
            }),
            "{args:?}: a freed slot was not reused"
        );
    }
}

#[test]
fn idle_connections_are_closed_and_busy_ones_kept() {
    for args in [
        &["--workers", "1"][..],
        &["--mode", "thread"],
        &["--mode", "fork-per-conn"],
        &["--workers", "1", "--io", "uring"],
    ] {
        if args.contains(&"uring") && !common::memory::uring_or_skip("--idle-timeout on --io uring")
        {
            continue;
        }
        let server =
            Server::start(&[args, &["--idle-timeout", "0.5", "--stats-interval", "0.1"]].concat());
        let mut idle = server.connect();
        echo(&mut idle, b"then silence");
        let mut busy = server.connect();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(1500) {
            echo(&mut busy, b"tick");
            std::thread::sleep(Duration::from_millis(100));
        }
        let got = common::read_until_closed(
            &mut idle,
            Duration::from_secs(5),
            &format!("{args:?}: the idle connection"),
        );
        assert!(got.is_empty(), "{args:?}");
        echo(&mut busy, b"busy is kept");
        assert!(
            wait_until(Duration::from_secs(5), || total(&server, "closed_by_limit")
                >= 1),
            "{args:?}"
        );
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: i32) -> f64 {
    let ticks = procfs::ticks_per_second().max(1) as f64;
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .map(|s| (s.utime + s.stime) as f64 / ticks)
        // 0 for an unreadable process would pass any CPU bound.
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"))
}

#[test]
fn descriptor_exhaustion_backs_off_and_recovers() {
    // 64 descriptors for the whole server: the worker runs out after ~50 connections.
    let dir = common::scratch_dir();
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!(
                "ulimit -n 64 && exec {} --listen 127.0.0.1:0 --workers 1 --control {}",
                common::BIN,
                dir.join("c.sock").display()
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = common::KillOnDrop::new(child.id() as i32);
    let line = common::read_announce(&mut child);
    let addr: std::net::SocketAddr = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    let worker = common::children_of(child.id() as i32)[0];

    // 90 clients: the kernel completes every handshake, the worker accepts what it can.
    let mut conns: Vec<TcpStream> = (0..90).map(|_| client(addr)).collect();
    for s in &mut conns {
        s.write_all(b"hi").unwrap();
    }
    // Accepted in order: each is given a generous 5 s until the first that is not served,
    // the rest (waiting behind it in the queue) 300 ms each.
    let mut waiting = false;
    let served: Vec<usize> = (0..conns.len())
        .filter(|&i| {
            let patience = if waiting { 300 } else { 5000 };
            conns[i]
                .set_read_timeout(Some(Duration::from_millis(patience)))
                .unwrap();
            let mut b = [0u8; 2];
            let ok = conns[i].read_exact(&mut b).is_ok();
            waiting |= !ok;
            ok
        })
        .collect();
    assert!(
        served.len() >= 30 && served.len() < 90,
        "served {}",
        served.len()
    );
    // Out of descriptors, the worker must not spin: measure its CPU over 3 s (a spinning
    // worker gets well over 20% of a core even on this shared box).
    let before = cpu_secs(worker);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_secs(worker) - before;
    assert!(
        used < 0.6,
        "the worker burned {used:.2} s of CPU in 3 s while out of descriptors"
    );
    assert!(common::alive(worker));
    // Free descriptors: the waiting clients are served, in full.
    for &i in served.iter().rev() {
        drop(conns.remove(i));
    }
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b)
            .expect("a waiting client was served once descriptors freed up");
        assert_eq!(&b, b"hi");
    }
    common::kill_tree(child.id() as i32);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resets_mid_write_and_vanishing_clients_are_counted_not_fatal() {
    let server = Server::start(&["--workers", "2", "--stats-interval", "0.1"]);
    let workers = server.workers();
    for _ in 0..50 {
        let mut s = server.connect();
        let _ = s.write_all(&vec![7u8; 1 << 20]);
        // RST instead of FIN, with the echo still owed.
        socket_linger_zero(&s);
        drop(s);
    }
    for _ in 0..50 {
        let mut s = server.connect();
        let _ = s.write_all(b"half a conversation");
        let _ = s.shutdown(Shutdown::Both);
    }
    assert!(wait_until(Duration::from_secs(10), || total(
        &server,
        "io_errors"
    ) >= 1));
    assert_eq!(server.workers(), workers, "no worker died");
    echo_to_eof(server.connect(), b"others are served");
}

fn socket_linger_zero(s: &TcpStream) {
    use std::os::fd::AsFd;
    let _ = nix::sys::socket::setsockopt(
        &s.as_fd(),
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

#[test]
fn slow_loris_clients_do_not_starve_the_others() {
    common::raise_nofile();
    let server = Server::start(&["--workers", "2"]);
    let mut slow: Vec<TcpStream> = (0..1000).map(|_| server.connect()).collect();
    let mut fast = server.connect();
    let t0 = Instant::now();
    let mut worst = Duration::ZERO;
    let mut round = 0u8;
    while t0.elapsed() < Duration::from_secs(2) {
        for s in &mut slow {
            let _ = s.write_all(&[round]);
        }
        round = round.wrapping_add(1);
        for _ in 0..20 {
            let t = Instant::now();
            echo(&mut fast, b"quick question");
            worst = worst.max(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Starved, it would wait for its 30 s read timeout; 5 s leaves this loaded box a margin.
    assert!(
        worst < Duration::from_secs(5),
        "a fast client waited {worst:?}"
    );
    // The slow ones were served too, byte by byte.
    let mut b = [0u8; 1];
    slow[0].read_exact(&mut b).unwrap();
    assert_eq!(b[0], 0);
}

#[test]
fn clients_that_never_read_cannot_grow_a_worker_past_its_bound() {
    never_readers_cannot_grow_a_worker_past_its_bound(&[]);
}

#[test]
fn clients_that_never_read_cannot_grow_a_uring_worker_past_its_bound() {
    if common::memory::uring_or_skip("never-readers on --io uring") {
        never_readers_cannot_grow_a_worker_past_its_bound(&["--io", "uring"]);
    }
}

fn never_readers_cannot_grow_a_worker_past_its_bound(extra: &[&str]) {
    const FLOODERS: usize = 1000;
    const BOUND: u64 = 16 * 1024;
    common::raise_nofile();
    let bound = BOUND.to_string();
    let server = Server::start(&[&["--workers", "1", "--max-unsent", &bound][..], extra].concat());
    let worker = server.workers()[0];
    let base = common::memory::pss(worker);
    let mut flooders = Vec::new();
    for _ in 0..FLOODERS {
        let s = server.connect();
        s.set_nonblocking(true).unwrap();
        flooders.push(s);
    }
    // Each writes until its socket is full in both directions, and never reads.
    let chunk = vec![1u8; 64 * 1024];
    for _ in 0..20 {
        for s in &mut flooders {
            let _ = s.write(&chunk);
        }
    }
    let grown = common::memory::pss(worker).saturating_sub(base);
    assert!(
        grown <= BOUND * FLOODERS as u64 * 3 / 2 + (8 << 20),
        "the worker grew {grown} bytes for {FLOODERS} flooders (bound {BOUND} each) {extra:?}"
    );
    // And a client that does read is still answered at once.
    let t = Instant::now();
    echo_to_eof(server.connect(), b"I read my echo");
    // "At once" on a loaded 2-core box: well under the 30 s a stuck worker would take.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn root_drops_to_the_named_user_after_binding() {
    let Some(nobody) = common::nobody() else {
        return;
    };
    let uid_of = |pid: i32| -> Option<u32> {
        procfs::process::Process::new(pid)
            .and_then(|p| p.status())
            .ok()
            .map(|s| s.euid)
    };
    let server = Server::start(&["--workers", "2", "--user", "nobody"]);
    for pid in std::iter::once(server.pid).chain(server.workers()) {
        assert_eq!(
            uid_of(pid),
            Some(nobody.uid.as_raw()),
            "pid {pid} still privileged"
        );
    }
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&server.control).unwrap();
    assert_eq!(
        meta.uid(),
        nobody.uid.as_raw(),
        "the control socket belongs to the serving user"
    );
    assert_eq!(meta.mode() & 0o777, 0o600);
    echo_to_eof(server.connect(), b"served by nobody");
    assert!(
        server.stats()["workers"].is_array(),
        "stats still readable by root"
    );

    // Without --user, root is warned once; with an unknown user, start-up fails cleanly.
    let plain = Server::start(&["--workers", "1"]);
    assert_eq!(plain.stderr().matches("serving as root").count(), 1);
    let bad = Server::try_start(common::BIN, &["--user", "no-such-user-here"])
        .err()
        .unwrap();
    assert_eq!(bad.status.and_then(|s| s.code()), Some(1));
    assert!(bad.stderr.contains("no user named"), "{}", bad.stderr);
}

#[test]
fn udp_datagrams_are_echoed_in_process_and_thread_modes() {
    use std::net::UdpSocket;
    for mode in ["process", "thread"] {
        let server = Server::start(&[
            "--workers",
            "2",
            "--udp",
            "--mode",
            mode,
            "--stats-interval",
            "0.1",
        ]);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rng = common::Rng::new(77);
        let mut sizes = vec![1, 65_507];
        sizes.extend((0..300).map(|_| rng.range(1, 9000)));
        let mut buf = vec![0u8; 70_000];
        for &n in &sizes {
            let d = rng.bytes(n);
            sock.send_to(&d, server.addr).unwrap();
            let (got, from) = sock
                .recv_from(&mut buf)
                .expect("an echo for every datagram");
            assert_eq!(from, server.addr);
            assert!(
                buf[..got] == d[..],
                "{mode}: a {n}-byte datagram came back different"
            );
        }
        let want = sizes.len() as u64;
        assert!(
            wait_until(Duration::from_secs(5), || total(&server, "datagrams_in")
                == want
                && total(&server, "datagrams_out") == want),
            "{mode}: stats count {} in, {} out",
            total(&server, "datagrams_in"),
            total(&server, "datagrams_out")
        );
        // TCP is served on the same port all along.
        echo_to_eof(server.connect(), b"tcp too");
    }
}

#[test]
fn a_duration_in_exponent_form_is_refused_for_its_form_not_its_size() {
    for (value, says) in [
        ("1e9", "not a number of seconds written plainly"),
        ("1e3", "not a number of seconds written plainly"),
        ("99999999", "more than the limit"),
    ] {
        let out = Command::new(common::BIN)
            .args(["--drain-timeout", value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {err}");
        assert!(err.contains(says), "{value}: {err}");
    }
}
