//! `--metrics`: GET /metrics in the Prometheus text format, checked with a real parser
//! (the `prometheus_client` Python package, which `.ci/run` installs) when it is available.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{Server, echo_to_eof};
use nix::sys::signal::Signal;

/// The metrics address the server logged.
fn metrics_addr(server: &Server) -> SocketAddr {
    assert!(server.wait_for_log("metrics on http://", Duration::from_secs(10)));
    let log = server.stderr();
    log.split("metrics on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("the metrics address in the log")
}

/// A raw HTTP exchange: (status line, body).
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of a sample line, `name{labels} value`.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Parses the exposition with prometheus_client and returns the family names it found.
fn parse_with_prometheus_client(body: &str) -> Option<Vec<String>> {
    let script = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\nfor f in p(sys.stdin.read()): print(f.name)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(body.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No module named") {
            return None;
        }
        panic!("prometheus_client rejected the exposition: {err}\n{body}");
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn metrics_add_up_with_stats_and_parse_as_prometheus_text() {
    let server = Server::start(&["--workers", "2", "--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&server);
    echo_to_eof(server.connect(), &[1u8; 3000]);
    assert!(common::wait_until(Duration::from_secs(10), || {
        server.stats()["totals"]["bytes_in"].as_u64() == Some(3000)
    }));
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        sample(&body, "prefork_echo_bytes_in_total"),
        Some(3000.0),
        "{body}"
    );
    let per_worker: f64 = body
        .lines()
        .filter(|l| l.starts_with("prefork_echo_worker_bytes_in_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        per_worker, 3000.0,
        "per-worker counters add up to the total"
    );
    assert_eq!(
        sample(&body, "prefork_echo_workers{state=\"running\"}"),
        Some(2.0)
    );
    match parse_with_prometheus_client(&body) {
        Some(families) => {
            for f in [
                "prefork_echo_bytes_in",
                "prefork_echo_workers",
                "prefork_echo_reloads",
            ] {
                assert!(
                    families.iter().any(|n| n == f),
                    "{f} not parsed: {families:?}"
                );
            }
        }
        None => common::skip_missing_tool("python3's prometheus_client"),
    }
    // Other paths and methods are refused; the server is unharmed.
    assert_eq!(get(addr, "/").0, "HTTP/1.1 404 Not Found");
    let out = server.ctl(&["reload"]);
    assert!(out.status.success());
    let (_, body) = get(addr, "/metrics");
    assert_eq!(
        sample(&body, "prefork_echo_reloads_total{outcome=\"done\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&body, "prefork_echo_generation"), Some(2.0));
}

#[test]
fn a_stalled_scraper_cannot_stall_the_master_and_upgrades_keep_the_endpoint() {
    let dir = common::scratch_dir();
    let pid_file = dir.join("echo.pid");
    let mut server = Server::start(&[
        "--workers",
        "1",
        "--metrics",
        "127.0.0.1:0",
        "--pid-file",
        pid_file.to_str().unwrap(),
    ]);
    let addr = metrics_addr(&server);
    // Three scrapers stall the master's side of the exchange three ways: half a request
    // line, headers that never end, and a whole request whose answer it never reads (through
    // a receive buffer far smaller than the exposition, so the master's write cannot finish).
    let mut half_line = TcpStream::connect(addr).unwrap();
    half_line.write_all(b"GET /metr").unwrap();
    let mut endless = TcpStream::connect(addr).unwrap();
    endless
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(1024).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut unread: TcpStream = sock.into();
    for _ in 0..3 {
        // Pipelined: more answers than the small buffer holds, if the master keeps going.
        unread
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
    }
    // The master answers everyone else meanwhile, promptly.
    let t = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(get(addr, "/metrics").0, "HTTP/1.1 200 OK");
        assert!(server.ctl(&["stats"]).status.success());
    }
    echo_to_eof(server.connect(), b"still serving");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the master answered slowly beside stalled scrapers: {:?}",
        t.elapsed()
    );
    // And it drops the stalled scrapers at its deadline (5 s) instead of keeping them.
    for (what, s) in [
        ("half a line", &mut half_line),
        ("endless headers", &mut endless),
    ] {
        let got = common::read_until_closed(s, Duration::from_secs(30), what);
        assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "{what}");
    }
    // A binary upgrade hands the metrics socket over: the port keeps answering.
    server.signal(Signal::SIGUSR2);
    assert!(common::wait_until(Duration::from_secs(30), || {
        common::read_pid(&pid_file) != server.pid
    }));
    let successor = common::read_pid(&pid_file);
    let _guard = common::KillOnDrop::new(successor);
    assert!(
        server
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(sample(&body, "prefork_echo_uptime_seconds").is_some());
    server.ctl(&["stop"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn thread_and_fork_per_conn_modes_serve_metrics_too() {
    for mode in ["thread", "fork-per-conn"] {
        let server = Server::start(&["--workers", "1", "--mode", mode, "--metrics", "127.0.0.1:0"]);
        let addr = metrics_addr(&server);
        echo_to_eof(server.connect(), b"counted");
        assert!(
            common::wait_until(Duration::from_secs(10), || {
                sample(&get(addr, "/metrics").1, "prefork_echo_bytes_in_total") == Some(7.0)
            }),
            "{mode}"
        );
    }
}

/// Lowers `pid`'s descriptor limit (root may; the test's own limit is untouched).
fn limit_descriptors(pid: i32, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit on another process, reading a live local rlimit; no old value asked.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn open_descriptors(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn idle_metrics_connections_cannot_take_the_descriptors_the_control_socket_needs() {
    if !nix::unistd::Uid::effective().is_root() {
        return common::skip("lowering a server's descriptor limit with prlimit takes root");
    }
    common::raise_nofile();
    for mode in ["process", "thread", "fork-per-conn"] {
        let server = Server::start(&["--mode", mode, "--workers", "1", "--metrics", "127.0.0.1:0"]);
        let addr = metrics_addr(&server);
        let base = open_descriptors(server.pid);
        // A limit a few hundred idle connections would fill (the report saw 2,048 filled by
        // 2,500).
        limit_descriptors(server.pid, 200);
        // Connect until 400 are open, or until connecting stalls (the listener's backlog full
        // behind a master that cannot accept); the most descriptors the master held meanwhile
        // is what counts.
        let (mut idle, mut held, mut failures) = (Vec::new(), 0, 0);
        while idle.len() < 400 && failures < 3 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => idle.push(s),
                Err(_) => failures += 1,
            }
            held = held.max(open_descriptors(server.pid));
        }
        assert!(idle.len() > 100, "{mode}: only {} connected", idle.len());
        eprintln!(
            "{mode}: {} connected, {held} descriptors at most ({base} before)",
            idle.len()
        );
        assert!(
            held <= base + 32 + 8,
            "{mode}: the master holds {held} descriptors ({base} before the flood)"
        );
        let t = std::time::Instant::now();
        let out = server.ctl(&["stats"]);
        assert!(
            out.status.success(),
            "{mode}: stats with {} idle metrics connections: {}",
            idle.len(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "{mode}: {:?}",
            t.elapsed()
        );
        // Metrics still answer, and so does the service.
        assert_eq!(get(addr, "/metrics").0, "HTTP/1.1 200 OK", "{mode}");
        echo_to_eof(server.connect(), b"still serving");
        drop(idle);
    }
}

#[test]
fn a_request_with_bare_line_feeds_is_answered_at_once() {
    let server = Server::start(&["--workers", "1", "--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&server);
    for (request, half_close) in [
        (&b"GET /metrics HTTP/1.0\n\n"[..], false),
        (b"GET /metrics HTTP/1.1\nHost: x\n\n", false),
        (b"GET /metrics\n", false),
        (b"GET /metrics HTTP/1.0\n", true),
    ] {
        let t = std::time::Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        if half_close {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let shown = String::from_utf8_lossy(request);
        assert!(
            answer.starts_with("HTTP/1.1 200 OK"),
            "{shown:?}: {answer:?}"
        );
        // Not after the 5 s deadline that drops a client still owing its request.
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{shown:?}: {:?}",
            t.elapsed()
        );
    }
}
