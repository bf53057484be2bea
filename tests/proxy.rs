//! `--proxy-protocol`: the header a load balancer sends first is read and stripped before the
//! service sees a byte, only from allowed peers, and anything else closes the connection with
//! a counted error — in every mode, and end to end through the real HAProxy.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, wait_until};

const MODES: [&[&str]; 5] = [
    &["--mode", "process", "--spawn", "fork"],
    &["--mode", "process", "--spawn", "exec"],
    &["--mode", "process", "--io", "uring"],
    &["--mode", "thread"],
    &["--mode", "fork-per-conn"],
];

fn start(mode: &[&str], extra: &[&str]) -> Server {
    let mut args = vec!["--workers", "1", "--proxy-protocol"];
    args.extend_from_slice(mode);
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn proxy_errors(server: &Server) -> u64 {
    // A missing counter would read as "no errors": fail instead.
    server.stats()["totals"]["proxy_errors"]
        .as_u64()
        .expect("totals.proxy_errors")
}

/// Writes `parts` (with a pause between them, so they arrive apart), half-closes, and returns
/// everything the server sent back before closing.
fn exchange(addr: SocketAddr, parts: &[&[u8]]) -> Vec<u8> {
    let mut s = common::client(addr);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        if s.write_all(p).is_err() {
            break;
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    common::read_until_closed(&mut s, Duration::from_secs(30), "an exchange")
}

fn v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(s)) = (client, server) else {
        unreachable!("v4 only here")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&c.ip().octets());
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&c.port().to_be_bytes());
    h.extend_from_slice(&s.port().to_be_bytes());
    h
}

#[test]
fn headers_are_stripped_and_bad_ones_close_the_connection_in_every_mode() {
    for mode in MODES {
        if mode.contains(&"uring") && !common::memory::uring_or_skip("PROXY headers on --io uring")
        {
            continue;
        }
        // Generous: a legitimate header split across writes must beat it on a loaded box.
        let server = start(mode, &["--proxy-timeout", "3"]);
        let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 7007\r\n";
        assert_eq!(
            exchange(server.addr, &[v1, b"hello"]),
            b"hello",
            "{mode:?} v1"
        );
        // v1 and data in one segment: the data after the header is not lost.
        let mut joined = v1.to_vec();
        joined.extend_from_slice(b"same segment");
        assert_eq!(
            exchange(server.addr, &[&joined]),
            b"same segment",
            "{mode:?}"
        );
        // v2, split across segments.
        let h = v2_header("192.0.2.9:4000".parse().unwrap(), server.addr);
        assert_eq!(
            exchange(server.addr, &[&h[..7], &h[7..], b"binary"]),
            b"binary",
            "{mode:?} v2"
        );
        assert_eq!(proxy_errors(&server), 0, "{mode:?}");
        // No header, a malformed one, and one that never completes: closed, nothing echoed.
        assert_eq!(
            exchange(server.addr, &[b"hello without header"]),
            b"",
            "{mode:?}"
        );
        assert_eq!(
            exchange(server.addr, &[b"PROXY TCP9 x y 1 2\r\nhi"]),
            b"",
            "{mode:?}"
        );
        let t = Instant::now();
        let mut slow = common::client(server.addr);
        slow.write_all(b"PROXY TCP4 192.0.2.7").unwrap();
        let back = common::read_until_closed(
            &mut slow,
            Duration::from_secs(15),
            &format!("{mode:?}: a header that never completes"),
        );
        assert!(back.is_empty(), "{mode:?}");
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{mode:?}: {:?}",
            t.elapsed()
        );
        assert!(
            wait_until(Duration::from_secs(10), || proxy_errors(&server) == 3),
            "{mode:?}: {}",
            server.stats()["totals"]
        );
    }
}

#[test]
fn headers_from_peers_not_allowed_to_send_them_are_refused() {
    for mode in MODES {
        if mode.contains(&"uring") && !common::memory::uring_or_skip("PROXY headers on --io uring")
        {
            continue;
        }
        let server = start(mode, &["--proxy-from", "10.0.0.0/8"]);
        let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 7007\r\n";
        assert_eq!(exchange(server.addr, &[v1, b"lie"]), b"", "{mode:?}");
        assert!(
            wait_until(Duration::from_secs(10), || proxy_errors(&server) == 1),
            "{mode:?}"
        );
    }
    let out = common::output_within(
        Command::new(common::BIN).args(["--proxy-protocol", "--proxy-from", "10.0.0.0/33"]),
        common::COMMAND,
    );
    assert_eq!(out.status.code(), Some(2));
}

/// A free loopback port (closed again at once; the race with another process is harmless
/// here: HAProxy would fail to bind and the test would say so).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn end_to_end_through_haproxy_with_send_proxy_v2() {
    if !common::have_tool("haproxy") {
        return;
    }
    let server = Server::launch(
        common::BIN,
        &["--workers", "2", "--proxy-protocol"],
        &[("PREFORK_ECHO_LOG", "debug")],
        true,
    )
    .unwrap();
    let dir = common::scratch_dir();
    let front = free_port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend echo\n  bind 127.0.0.1:{front}\n  default_backend prefork\n\
             backend prefork\n  server s1 {} send-proxy-v2\n",
            server.addr
        ),
    )
    .unwrap();
    let mut haproxy = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = common::KillOnDrop::new(haproxy.id() as i32);
    let front: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || TcpStream::connect(front)
            .is_ok()),
        "haproxy did not start"
    );
    let mut total = 0;
    for i in 0..20 {
        let msg = format!("through haproxy {i}\n").repeat(50);
        let back = exchange(front, &[msg.as_bytes()]);
        assert_eq!(back, msg.as_bytes(), "echo {i} through HAProxy");
        total += msg.len() as u64;
    }
    assert!(wait_until(Duration::from_secs(10), || {
        server.stats()["totals"]["bytes_in"].as_u64() == Some(total)
    }));
    assert_eq!(
        proxy_errors(&server),
        0,
        "the headers were read, never echoed"
    );
    // The real client (HAProxy's client side, here this test) is in the debug log, not
    // HAProxy's own address alone.
    assert!(
        server.wait_for_log("connection from 127.0.0.1:", Duration::from_secs(10)),
        "{}",
        server.stderr()
    );
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// CPU seconds used so far by `pid` and every process below it (threads included).
fn tree_cpu_secs(pid: i32) -> f64 {
    let ticks = procfs::ticks_per_second().max(1) as f64;
    std::iter::once(pid)
        .chain(common::descendants(pid))
        .filter_map(|p| procfs::process::Process::new(p).ok()?.stat().ok())
        .map(|s| (s.utime + s.stime) as f64 / ticks)
        .sum()
}

#[test]
fn a_header_trickled_slowly_is_waited_for_without_spinning_in_every_mode() {
    const CONNECTIONS: usize = 300;
    const WINDOW: Duration = Duration::from_secs(3);
    let header = b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 7007\r\n";
    for mode in [
        &["--mode", "thread"][..],
        &["--mode", "fork-per-conn"],
        &["--mode", "process", "--spawn", "fork"],
    ] {
        common::raise_nofile();
        let server = start(mode, &["--proxy-timeout", "120"]);
        let mut conns: Vec<TcpStream> = (0..CONNECTIONS)
            .map(|_| {
                let mut s = common::client(server.addr);
                s.write_all(&header[..6]).unwrap();
                s
            })
            .collect();
        // Every connection has its thread or child waiting before the measurement starts.
        let mut sent = 6;
        assert!(wait_until(Duration::from_secs(60), || {
            mode[1] != "fork-per-conn" || common::descendants(server.pid).len() >= CONNECTIONS
        }));
        std::thread::sleep(Duration::from_millis(500));
        let before = tree_cpu_secs(server.pid);
        let start = Instant::now();
        // A byte per connection every half second: the header moves, slowly.
        while start.elapsed() < WINDOW {
            std::thread::sleep(Duration::from_millis(500));
            for s in &mut conns {
                s.write_all(&header[sent..sent + 1]).unwrap();
            }
            sent += 1;
        }
        let used = tree_cpu_secs(server.pid) - before;
        let share = used / start.elapsed().as_secs_f64();
        eprintln!("{mode:?}: {:.1}% of a CPU", share * 100.0);
        // Busy-polling (a peek every 5 ms per connection) cost about 25% of a CPU here;
        // waiting for readability costs next to nothing. Generous for a loaded box.
        assert!(
            share < 0.08,
            "{mode:?}: {CONNECTIONS} connections trickling a header used {:.0}% of a CPU",
            share * 100.0
        );
        // And the trickled headers are good: finished, they lead to an echo.
        for s in conns.iter_mut().take(5) {
            s.write_all(&header[sent..]).unwrap();
            s.write_all(b"hello").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut back = [0u8; 5];
            s.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"hello", "{mode:?}");
        }
    }
}

#[test]
fn a_refused_connection_is_logged_once_and_a_flood_only_up_to_a_cap() {
    const FLOOD: u64 = 40;
    for mode in [
        &["--mode", "process", "--spawn", "fork"][..],
        &["--mode", "process", "--spawn", "exec"],
        &["--mode", "thread"],
        &["--mode", "fork-per-conn"],
    ] {
        let server = start(mode, &["--proxy-timeout", "3", "--stats-interval", "0.1"]);
        assert!(
            exchange(server.addr, &[b"hello\r\n"]).is_empty(),
            "{mode:?}"
        );
        assert!(
            server.wait_for_log("closed: no PROXY protocol header", Duration::from_secs(20)),
            "{mode:?}: a refused connection left no log line: {}",
            server.stderr()
        );
        // A flood: every one counted, only the first few logged.
        let flood: Vec<_> = (0..FLOOD)
            .map(|_| {
                std::thread::spawn({
                    let addr = server.addr;
                    move || exchange(addr, &[b"GET / HTTP/1.0\r\n\r\n"])
                })
            })
            .collect();
        for t in flood {
            assert!(t.join().unwrap().is_empty());
        }
        assert!(
            wait_until(Duration::from_secs(20), || proxy_errors(&server)
                == FLOOD + 1),
            "{mode:?}: {} proxy errors",
            proxy_errors(&server)
        );
        let logged = server.log_count("closed:");
        assert_eq!(logged, 10, "{mode:?}: {}", server.stderr());
        assert_eq!(server.log_count("more are counted in proxy_errors"), 1);
        // The text table shows them too.
        let table = String::from_utf8_lossy(&server.ctl(&["stats"]).stdout).to_string();
        assert!(
            table.contains(&format!("proxy header={}", FLOOD + 1)),
            "{mode:?}: {table}"
        );
    }
}
