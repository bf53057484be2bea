//! `--metrics ADDR`: `GET /metrics` in the Prometheus text exposition format (version 0.0.4),
//! rendered from the same snapshot `prefork-echo stats` shows. Served by the master's own loop
//! (never by a worker), so it must never stall it: a request is at most [`MAX_REQUEST`] bytes,
//! the answer is written without blocking, a scraper that has not finished within
//! [`DEADLINE`] is dropped, and at most [`MAX_SCRAPERS`] are held at once (a newcomer beyond
//! that pushes out the oldest), so idle connections can never take the master's descriptors
//! from its control socket and its workers.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use protocol::stats::Counters;

use crate::clients::{ClientId, Clients};
use crate::stats::Snapshot;

/// Longest request (line and headers) accepted.
pub const MAX_REQUEST: usize = 4096;
/// How long a scraper may take to send its request and read the answer.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Scrapers held at once. Prometheus scrapes with one connection per target; a few more
/// leave room for people with curl, and no more can pile up than the master can spare.
pub const MAX_SCRAPERS: usize = 32;

/// The exposition of `snap`.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    let mut lines = Vec::new();
    for (i, (name, doc)) in Counters::NAMES.iter().zip(Counters::DOCS).enumerate() {
        let doc = doc.trim();
        // `active` is a gauge (open connections now); every other counter only grows.
        let (total, per_worker, kind) = if *name == "active" {
            (
                "active_connections".to_string(),
                "worker_active_connections".to_string(),
                "gauge",
            )
        } else {
            (
                format!("{name}_total"),
                format!("worker_{name}_total"),
                "counter",
            )
        };
        lines.push(format!(
            "prefork_echo_{total} {}",
            snap.totals.to_array()[i]
        ));
        let help = if kind == "gauge" {
            format!("{doc} Summed over the live workers.")
        } else {
            format!("{doc} All workers, including those that have exited.")
        };
        section(&mut out, &total, kind, &help, &mut lines);
        for w in &snap.workers {
            lines.push(format!(
                "prefork_echo_{per_worker}{} {}",
                labels(w.id, w.generation, w.pid),
                w.counters.to_array()[i]
            ));
        }
        let help = format!("{doc} Per live worker.");
        section(&mut out, &per_worker, kind, &help, &mut lines);
    }
    for state in ["starting", "running", "draining"] {
        let n = snap.workers.iter().filter(|w| w.state == state).count();
        lines.push(format!("prefork_echo_workers{{state=\"{state}\"}} {n}"));
    }
    section(
        &mut out,
        "workers",
        "gauge",
        "Live worker processes (process mode) or acceptor threads, by state.",
        &mut lines,
    );
    per_worker_gauge(
        &mut out,
        snap,
        (
            "worker_accept_queue_length",
            "Connections waiting in the worker's own socket (--balance reuseport).",
        ),
        |w| w.accept_queue.map(f64::from),
    );
    per_worker_gauge(
        &mut out,
        snap,
        (
            "worker_last_report_age_seconds",
            "Seconds since the worker's last report (its heartbeat).",
        ),
        |w| w.last_report_age_secs,
    );
    let single = [
        (
            "generation",
            "gauge",
            "The serving generation.",
            snap.generation as f64,
        ),
        (
            "uptime_seconds",
            "gauge",
            "Seconds since the master started.",
            snap.uptime_secs,
        ),
        (
            "abandoned_slots",
            "gauge",
            "Pool slots no longer respawned because their workers kept failing.",
            snap.abandoned_slots.len() as f64,
        ),
        (
            "respawns_total",
            "counter",
            "Workers replaced after an unexpected death, since the server started.",
            snap.lifecycle.respawns as f64,
        ),
        (
            "upgrades_total",
            "counter",
            "Binary upgrades whose new master took over, since the server started.",
            snap.lifecycle.upgrades as f64,
        ),
        (
            "upgrades_failed_total",
            "counter",
            "Binary upgrades that failed, since the server started.",
            snap.lifecycle.upgrades_failed as f64,
        ),
        (
            "upgrade_rollbacks_total",
            "counter",
            "Binary upgrades rolled back (the new master died within the window).",
            snap.lifecycle.rollbacks as f64,
        ),
    ];
    let mut single = single.to_vec();
    if let Some(q) = snap.accept_queue {
        single.push((
            "accept_queue_length",
            "gauge",
            "Connections the kernel holds that no worker has accepted yet.",
            f64::from(q.waiting),
        ));
        single.push((
            "accept_queue_limit",
            "gauge",
            "The most the accept queue holds (the backlog as the kernel applies it).",
            f64::from(q.limit),
        ));
    }
    for (name, kind, help, v) in single {
        lines.push(format!("prefork_echo_{name} {v}"));
        section(&mut out, name, kind, help, &mut lines);
    }
    lines.push(format!(
        "prefork_echo_reloads_total{{outcome=\"done\"}} {}",
        snap.lifecycle.reloads
    ));
    lines.push(format!(
        "prefork_echo_reloads_total{{outcome=\"failed\"}} {}",
        snap.lifecycle.reloads_failed
    ));
    section(
        &mut out,
        "reloads_total",
        "counter",
        "Reloads by outcome, since this master started.",
        &mut lines,
    );
    if let Some(j) = snap.fairness.jain_index {
        lines.push(format!("prefork_echo_accept_fairness_jain {j}"));
        section(
            &mut out,
            "accept_fairness_jain",
            "gauge",
            "Jain's index of accepted connections over live workers: 1 even, 1/n one took all.",
            &mut lines,
        );
    }
    out
}

/// Writes one metric family: its HELP and TYPE lines, then `lines` (emptied).
fn section(out: &mut String, name: &str, kind: &str, help: &str, lines: &mut Vec<String>) {
    let _ = writeln!(out, "# HELP prefork_echo_{name} {help}");
    let _ = writeln!(out, "# TYPE prefork_echo_{name} {kind}");
    for l in lines.drain(..) {
        let _ = writeln!(out, "{l}");
    }
}

/// One gauge per live worker that has a value for it.
fn per_worker_gauge(
    out: &mut String,
    snap: &Snapshot,
    (name, help): (&str, &str),
    value: impl Fn(&crate::stats::WorkerRow) -> Option<f64>,
) {
    let mut lines: Vec<String> = snap
        .workers
        .iter()
        .filter_map(|w| {
            let v = value(w)?;
            Some(format!(
                "prefork_echo_{name}{} {v}",
                labels(w.id, w.generation, w.pid)
            ))
        })
        .collect();
    section(out, name, "gauge", help, &mut lines);
}

fn labels(id: u32, generation: u32, pid: u32) -> String {
    format!("{{worker=\"{id}\",generation=\"{generation}\",pid=\"{pid}\"}}")
}

/// Names one scraper across calls.
pub type ScrapeId = ClientId;

struct Scraper {
    stream: TcpStream,
    request: Vec<u8>,
    answer: Vec<u8>,
    written: usize,
    waiting: bool,
}

impl AsFd for Scraper {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// The metrics listener and its scrapers, driven by the owner's loop under tokens from `base`.
pub struct MetricsServer {
    listener: TcpListener,
    clients: Clients<Scraper>,
    /// Scrapers pushed out by newer ones since the last log line about it.
    pushed_out: u64,
    /// When that line was last logged.
    last_push_log: Option<Instant>,
}

impl MetricsServer {
    /// Binds `addr` (before privileges are dropped, like the service's socket).
    pub fn bind(addr: SocketAddr) -> Result<MetricsServer, crate::listener::ListenError> {
        let socket = crate::listener::bind(addr, 64)?;
        Ok(MetricsServer::adopt(socket.into()))
    }

    /// Serves a listener handed over by the master this one replaced (binary upgrade).
    pub fn adopt(listener: std::net::TcpListener) -> MetricsServer {
        // Inherited across exec: say what the loop needs rather than trust the old settings.
        let _ = listener.set_nonblocking(true);
        let _ = socket2::SockRef::from(&listener).set_cloexec(true);
        MetricsServer {
            listener: TcpListener::from_std(listener),
            clients: Clients::new(),
            pushed_out: 0,
            last_push_log: None,
        }
    }

    /// The address it serves on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The listening descriptor, to hand to a successor.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }

    /// Watches the listener from `registry`, under tokens from `base` upwards.
    pub fn register(&mut self, registry: &Registry, base: usize) -> io::Result<()> {
        self.clients.set_base(base);
        registry.register(&mut self.listener, Token(base), Interest::READABLE)
    }

    /// Handles readiness of one of its tokens; `wants` hears of each scraper whose request is
    /// complete and valid (answer it with [`respond`](Self::respond)).
    pub fn handle(&mut self, registry: &Registry, token: Token, wants: &mut dyn FnMut(ScrapeId)) {
        if self.clients.is_listener(token) {
            self.accept(registry);
            return;
        }
        let key = self.clients.key(token);
        if self.progress(key, wants) {
            self.clients.remove(registry, key);
        }
    }

    /// Handles readiness and answers at once with `snapshot` (the single-process modes).
    pub fn serve_now(
        &mut self,
        registry: &Registry,
        token: Token,
        snapshot: impl Fn() -> Snapshot,
    ) {
        let mut asked = Vec::new();
        self.handle(registry, token, &mut |id| asked.push(id));
        for id in asked {
            let body = render(&snapshot());
            self.respond(registry, id, &body);
        }
    }

    /// Sends the exposition to a scraper that asked for it.
    pub fn respond(&mut self, registry: &Registry, id: ScrapeId, body: &str) {
        match self.clients.get(id) {
            Some(e) if e.state.waiting => {
                e.state.waiting = false;
                e.state.answer = http("200 OK", "text/plain; version=0.0.4; charset=utf-8", body);
            }
            _ => return,
        }
        let key = Clients::<Scraper>::key_of(id);
        if self.progress(key, &mut |_| {}) {
            self.clients.remove(registry, key);
        }
    }

    /// Drops scrapers past their deadline.
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        self.clients.expire(registry, now);
    }

    /// The earliest scraper deadline, for the owner's wait.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.next_deadline()
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= MAX_SCRAPERS {
                        self.push_out_oldest(registry);
                    }
                    let scraper = Scraper {
                        stream,
                        request: Vec::new(),
                        answer: Vec::new(),
                        written: 0,
                        waiting: false,
                    };
                    let _ = self
                        .clients
                        .add(registry, scraper, Instant::now() + DEADLINE);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Makes room for a newcomer: the oldest scraper goes (likely idle, or a flood's first),
    /// logged at most once a minute with how many went.
    fn push_out_oldest(&mut self, registry: &Registry) {
        if let Some(key) = self.clients.oldest() {
            self.clients.remove(registry, key);
            self.pushed_out += 1;
        }
        let now = Instant::now();
        if self
            .last_push_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            protocol::warn!(
                "metrics: {} connection(s) dropped to stay within {MAX_SCRAPERS} at once",
                std::mem::take(&mut self.pushed_out)
            );
            self.last_push_log = Some(now);
        }
    }

    /// Advances one scraper; `true` when it is done (answered, gone or misbehaving).
    fn progress(&mut self, key: usize, wants: &mut dyn FnMut(ScrapeId)) -> bool {
        let Some((id, entry)) = self.clients.get_mut(key) else {
            return false;
        };
        let c = &mut entry.state;
        if c.waiting {
            return false;
        }
        if c.answer.is_empty() {
            let mut buf = [0u8; 1024];
            while !request_complete(&c.request) {
                match c.stream.read(&mut buf) {
                    // A client that half-closes after its request line is answered too.
                    Ok(0) if c.request.contains(&b'\n') => break,
                    Ok(0) => return true,
                    Ok(n) => c.request.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(_) => return true,
                }
                if c.request.len() > MAX_REQUEST {
                    c.answer = http("431 Request Header Fields Too Large", "text/plain", "");
                    break;
                }
            }
            if c.answer.is_empty() {
                match route(&c.request) {
                    Ok(()) => {
                        c.waiting = true;
                        wants(id);
                        return false;
                    }
                    Err(status) => c.answer = http(status, "text/plain", ""),
                }
            }
        }
        while c.written < c.answer.len() {
            match c.stream.write(&c.answer[c.written..]) {
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
        true
    }
}

/// Whether `request` is complete: its headers end with an empty line, the line ends allowed
/// bare (`\n`) as well as `\r\n` (RFC 9112 §2.2 asks servers to accept a bare LF), or its
/// first line has no HTTP version (a one-line request, `GET /metrics`).
fn request_complete(request: &[u8]) -> bool {
    let Some(first) = request.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let line = String::from_utf8_lossy(&request[..first]);
    if line.split_whitespace().count() < 3 {
        return true;
    }
    request[first..].windows(2).any(|w| w == b"\n\n")
        || request[first..].windows(3).any(|w| w == b"\n\r\n")
}

/// Whether a request asks for the metrics; otherwise the HTTP status to answer.
fn route(request: &[u8]) -> Result<(), &'static str> {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics")) => Ok(()),
        (Some("GET"), Some(_)) => Err("404 Not Found"),
        (Some(_), Some(_)) => Err("405 Method Not Allowed"),
        _ => Err("400 Bad Request"),
    }
}

fn http(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_ends_at_an_empty_line_whatever_its_line_ends() {
        for done in [
            &b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /metrics HTTP/1.0\n\n",
            b"GET /metrics HTTP/1.1\nHost: x\n\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\n\r\n",
            b"GET /metrics\n",
            b"GET /metrics\r\n",
        ] {
            assert!(
                request_complete(done),
                "{:?}",
                String::from_utf8_lossy(done)
            );
        }
        for not_yet in [
            &b"GET /metrics HTTP/1.1\r\nHost: x\r\n"[..],
            b"GET /metrics HTTP/1.1\n",
            b"GET /metr",
            b"",
        ] {
            assert!(
                !request_complete(not_yet),
                "{:?}",
                String::from_utf8_lossy(not_yet)
            );
        }
    }

    #[test]
    fn routes_only_get_metrics() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(()));
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Err("404 Not Found"));
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Err("405 Method Not Allowed")
        );
        assert_eq!(route(b"\xff\r\n\r\n"), Err("400 Bad Request"));
    }

    #[test]
    fn every_counter_appears_in_total_and_per_worker() {
        let c = Counters {
            bytes_in: 42,
            ..Counters::default()
        };
        let rows = vec![crate::stats::WorkerRow {
            id: 0,
            pid: 77,
            generation: 3,
            state: "running".into(),
            uptime_secs: 1.0,
            last_report_age_secs: Some(0.5),
            counters: c,
            accept_queue: None,
        }];
        let snap = Snapshot::new("process", 2.0, 3, rows, &Counters::default());
        let text = render(&snap);
        assert!(text.contains("prefork_echo_bytes_in_total 42\n"), "{text}");
        assert!(text.contains(
            "prefork_echo_worker_bytes_in_total{worker=\"0\",generation=\"3\",pid=\"77\"} 42\n"
        ));
        assert!(text.contains("# TYPE prefork_echo_active_connections gauge"));
        assert!(
            text.contains("cumulative). Summed over the live workers.\n"),
            "{text}"
        );
        assert!(text.contains("prefork_echo_workers{state=\"running\"} 1"));
        for name in Counters::NAMES {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
