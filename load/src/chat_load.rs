//! chat-load: verifying load for a line-based group chat on this machine (prefork-echo
//! `--service chat`, and the peers under `scripts/peers/` that speak the same lines).
//!
//! `--clients` clients connect, read the welcome line and take the names `c0`, `c1`, ...
//! (`/nick`); then each sends lines `SEQ MICROS PAD` and every client checks every line it
//! receives from every other: none lost, none twice, each sender's in order, none corrupted.
//! Closed loop (default): a sender has at most `--window` lines that not every other client
//! has received yet. Open loop: `--rate` lines per second per client, whatever is in flight.
//! Reports deliveries/s, delivery latency (send to receipt, per recipient) p50/p99/max, the
//! fairness of what each client got to send and, given `--server-pid`, the server's CPU per
//! delivery and memory. Exit code 0 when every line arrived intact everywhere, 1 otherwise,
//! 2 on a usage error.

mod cost;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

/// Verifying load for a line-based group chat on loopback.
#[derive(Debug, Parser)]
#[command(name = "chat-load", version)]
struct Args {
    /// Server address; loopback only.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7007")]
    target: String,
    /// Clients, each sending and receiving.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(2..=20_000))]
    clients: u64,
    /// Open loop: lines per second each client sends (default: closed loop).
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Closed loop: lines a sender may have in flight (not yet received by everyone).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    window: u64,
    /// Bytes of padding in each line.
    #[arg(long, value_name = "BYTES", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(0..=4000))]
    size: u64,
    /// Seconds of sending.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    duration: f64,
    /// Extra clients that connect and never read (the slow consumers a server must shed).
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=100))]
    never_readers: u64,
    /// Load threads.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// The server's pid: report its CPU per delivery and memory (whole process tree).
    #[arg(long, value_name = "PID")]
    server_pid: Option<i32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    target: String,
    clients: u64,
    never_readers: u64,
    mode: String,
    seconds: f64,
    sent: u64,
    deliveries: u64,
    deliveries_per_sec: f64,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_max: f64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    corrupt: u64,
    disconnected: u64,
    jain_sent: f64,
    server_cpu_us_per_delivery: Option<f64>,
    server_pss_mib: Option<f64>,
}

/// What every thread shares: per sender, lines sent and lines everyone has; per in-flight
/// line, how many have it.
struct Shared {
    n: usize,
    window: usize,
    sent: Vec<AtomicU64>,
    complete: Vec<AtomicU64>,
    /// `[sender * window + seq % window]`: recipients that have that line.
    receipts: Vec<AtomicU32>,
    sending: AtomicBool,
    base: Instant,
}

impl Shared {
    fn received(&self, sender: usize, seq: u64) {
        let slot = &self.receipts[sender * self.window + (seq % self.window as u64) as usize];
        if slot.fetch_add(1, Ordering::AcqRel) + 1 == self.n as u32 - 1 {
            slot.store(0, Ordering::Release);
            self.complete[sender].fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// One client.
struct Client {
    id: usize,
    stream: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// Per sender: the next sequence number expected.
    next: Vec<u64>,
    named: bool,
    closed: bool,
    next_send: Instant,
}

/// What one thread counted.
#[derive(Default)]
struct Tally {
    deliveries: u64,
    duplicated: u64,
    out_of_order: u64,
    corrupt: u64,
    disconnected: u64,
    lost: u64,
    expected: u64,
}

fn loopback(target: &str) -> Result<SocketAddr> {
    let addr = target
        .to_socket_addrs()
        .with_context(|| format!("--target {target}"))?
        .next()
        .context("--target resolves to nothing")?;
    if !addr.ip().is_loopback() {
        bail!("--target {addr}: loopback only (127.0.0.0/8 or ::1)");
    }
    Ok(addr)
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match run(&args) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print_report(&report);
            }
            let bad = report.lost
                + report.duplicated
                + report.out_of_order
                + report.corrupt
                + report.disconnected;
            std::process::exit(i32::from(bad > 0));
        }
        Err(e) => {
            eprintln!("chat-load: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn print_report(r: &Report) {
    println!(
        "{} clients ({}), {:.1} s: {} lines sent, {} deliveries = {:.0} deliveries/s",
        r.clients, r.mode, r.seconds, r.sent, r.deliveries, r.deliveries_per_sec
    );
    println!(
        "delivery latency: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; Jain over lines sent {:.3}",
        r.latency_ms_p50, r.latency_ms_p99, r.latency_ms_max, r.jain_sent
    );
    println!(
        "errors: lost={} duplicated={} out_of_order={} corrupt={} disconnected={}",
        r.lost, r.duplicated, r.out_of_order, r.corrupt, r.disconnected
    );
    if let (Some(cpu), Some(pss)) = (r.server_cpu_us_per_delivery, r.server_pss_mib) {
        println!("server: {cpu:.2} µs CPU per delivery, PSS {pss:.1} MiB");
    }
}

fn run(args: &Args) -> Result<Report> {
    let addr = loopback(&args.target)?;
    let n = args.clients as usize;
    let window = if args.rate.is_some() {
        64
    } else {
        args.window as usize
    };
    let shared = Arc::new(Shared {
        n,
        window,
        sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
        complete: (0..n).map(|_| AtomicU64::new(0)).collect(),
        receipts: (0..n * window).map(|_| AtomicU32::new(0)).collect(),
        sending: AtomicBool::new(false),
        base: Instant::now(),
    });
    let threads = (args.threads as usize).min(n);
    let ready = Arc::new(std::sync::Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let ids: Vec<usize> = (t..n).step_by(threads).collect();
        let (shared, ready) = (Arc::clone(&shared), Arc::clone(&ready));
        let (pad, rate) = ("x".repeat(args.size as usize), args.rate);
        handles.push(std::thread::spawn(move || {
            thread_main(addr, ids, &shared, &ready, (&pad, rate))
        }));
    }
    ready.wait();
    // Held open, never read, until the report is made.
    let _sleepers = (0..args.never_readers)
        .map(|_| std::net::TcpStream::connect(addr))
        .collect::<io::Result<Vec<_>>>()
        .context("connecting the never-readers")?;
    let before = args.server_pid.map(cost::sample);
    let started = Instant::now();
    shared.sending.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    shared.sending.store(false, Ordering::Release);
    let seconds = started.elapsed().as_secs_f64();
    let after = args.server_pid.map(cost::sample);
    let mut hist = Histogram::<u64>::new(3).context("histogram")?;
    let mut total = Tally::default();
    for h in handles {
        let (tally, h) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        hist.add(&h).context("merging histograms")?;
        for (a, b) in [
            (&mut total.deliveries, tally.deliveries),
            (&mut total.duplicated, tally.duplicated),
            (&mut total.out_of_order, tally.out_of_order),
            (&mut total.corrupt, tally.corrupt),
            (&mut total.disconnected, tally.disconnected),
            (&mut total.lost, tally.lost),
        ] {
            *a += b;
        }
    }
    let sent: Vec<f64> = shared
        .sent
        .iter()
        .map(|s| s.load(Ordering::Acquire) as f64)
        .collect();
    let (sum, sq) = sent.iter().fold((0.0, 0.0), |(s, q), x| (s + x, q + x * x));
    let ms = |v: u64| v as f64 / 1000.0;
    let deliveries_in_window = total.deliveries;
    let cost = match (before, after) {
        (Some(b), Some(a)) => Some((
            (a.cpu_secs - b.cpu_secs) * 1e6 / deliveries_in_window.max(1) as f64,
            a.pss_bytes as f64 / (1024.0 * 1024.0),
        )),
        _ => None,
    };
    Ok(Report {
        target: addr.to_string(),
        clients: args.clients,
        never_readers: args.never_readers,
        mode: match args.rate {
            Some(r) => format!("open loop, {r} lines/s per client"),
            None => format!("closed loop, window {window}"),
        },
        seconds,
        sent: sum as u64,
        deliveries: total.deliveries,
        deliveries_per_sec: total.deliveries as f64 / seconds,
        latency_ms_p50: ms(hist.value_at_quantile(0.5)),
        latency_ms_p99: ms(hist.value_at_quantile(0.99)),
        latency_ms_max: ms(hist.max()),
        lost: total.lost,
        duplicated: total.duplicated,
        out_of_order: total.out_of_order,
        corrupt: total.corrupt,
        disconnected: total.disconnected,
        jain_sent: if sq > 0.0 {
            sum * sum / (n as f64 * sq)
        } else {
            1.0
        },
        server_cpu_us_per_delivery: cost.map(|c| c.0),
        server_pss_mib: cost.map(|c| c.1),
    })
}

/// How long the run waits, after sending stops, for the last lines to arrive everywhere.
const SETTLE: Duration = Duration::from_secs(10);

fn thread_main(
    addr: SocketAddr,
    ids: Vec<usize>,
    shared: &Shared,
    ready: &std::sync::Barrier,
    (pad, rate): (&str, Option<f64>),
) -> Result<(Tally, Histogram<u64>)> {
    let mut poll = Poll::new()?;
    let mut clients = Vec::new();
    for (k, &id) in ids.iter().enumerate() {
        let std =
            std::net::TcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
        std.set_nonblocking(true)?;
        let _ = std.set_nodelay(true);
        let mut stream = TcpStream::from_std(std);
        poll.registry().register(
            &mut stream,
            Token(k),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        clients.push(Client {
            id,
            stream,
            inbuf: Vec::new(),
            out: format!("/nick c{id}\n").into_bytes(),
            next: vec![0; shared.n],
            named: false,
            closed: false,
            next_send: Instant::now(),
        });
    }
    let mut tally = Tally::default();
    let mut hist = Histogram::<u64>::new(3)?;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 * 1024];
    // Until every client of this thread has its name, then wait for the others.
    let gate = Instant::now() + Duration::from_secs(60);
    while clients.iter().any(|c| !c.named && !c.closed) {
        if Instant::now() > gate {
            bail!("clients did not get their names within 60 s");
        }
        turn(
            &mut poll,
            &mut events,
            &mut clients,
            &mut buf,
            shared,
            &mut tally,
            &mut hist,
        )?;
    }
    ready.wait();
    while !shared.sending.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let period = rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let start = Instant::now();
    for (k, c) in clients.iter_mut().enumerate() {
        // Spread open-loop senders over one period.
        c.next_send = start + period.map_or(Duration::ZERO, |p| p * k as u32 / ids.len() as u32);
    }
    let mut settle_until = None;
    loop {
        let now = Instant::now();
        let sending = shared.sending.load(Ordering::Acquire);
        if sending {
            for c in clients.iter_mut().filter(|c| !c.closed) {
                send_due(c, shared, now, period, pad);
            }
        } else {
            let until = *settle_until.get_or_insert(now + SETTLE);
            let everyone_has_everything = (0..shared.n).all(|s| {
                shared.complete[s].load(Ordering::Acquire) >= shared.sent[s].load(Ordering::Acquire)
            });
            if everyone_has_everything || now > until {
                break;
            }
        }
        for c in clients
            .iter_mut()
            .filter(|c| !c.out.is_empty() && !c.closed)
        {
            flush(c);
        }
        turn(
            &mut poll,
            &mut events,
            &mut clients,
            &mut buf,
            shared,
            &mut tally,
            &mut hist,
        )?;
    }
    for c in &clients {
        for (s, &next) in c.next.iter().enumerate() {
            if s != c.id {
                let sent = shared.sent[s].load(Ordering::Acquire);
                tally.expected += sent;
                tally.lost += sent.saturating_sub(next);
            }
        }
    }
    Ok((tally, hist))
}

/// Sends what this client may send now: the next line, if the window (or the rate) allows.
fn send_due(c: &mut Client, shared: &Shared, now: Instant, period: Option<Duration>, pad: &str) {
    loop {
        let sent = shared.sent[c.id].load(Ordering::Acquire);
        match period {
            Some(p) => {
                if now < c.next_send {
                    return;
                }
                c.next_send += p;
            }
            None => {
                let done = shared.complete[c.id].load(Ordering::Acquire);
                if sent - done >= shared.window as u64 || c.out.len() > 64 * 1024 {
                    return;
                }
            }
        }
        let micros = shared.base.elapsed().as_micros() as u64;
        let _ = writeln!(&mut c.out, "{sent} {micros} {pad}");
        shared.sent[c.id].store(sent + 1, Ordering::Release);
        if period.is_none() {
            continue;
        }
    }
}

fn flush(c: &mut Client) {
    while !c.out.is_empty() {
        match c.stream.write(&c.out) {
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => {
                c.closed = true;
                return;
            }
        }
    }
}

/// One wait and everything it made ready.
fn turn(
    poll: &mut Poll,
    events: &mut Events,
    clients: &mut [Client],
    buf: &mut [u8],
    shared: &Shared,
    tally: &mut Tally,
    hist: &mut Histogram<u64>,
) -> Result<()> {
    match poll.poll(events, Some(Duration::from_millis(1))) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    for event in events.iter() {
        let c = &mut clients[event.token().0];
        if c.closed {
            continue;
        }
        if event.is_writable() {
            flush(c);
        }
        loop {
            match c.stream.read(buf) {
                Ok(0) => {
                    c.closed = true;
                    tally.disconnected += 1;
                    break;
                }
                Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    c.closed = true;
                    tally.disconnected += 1;
                    break;
                }
            }
        }
        take_lines(c, shared, tally, hist);
    }
    Ok(())
}

/// Checks every whole line a client received.
fn take_lines(c: &mut Client, shared: &Shared, tally: &mut Tally, hist: &mut Histogram<u64>) {
    let mut start = 0;
    let now = shared.base.elapsed().as_micros() as u64;
    while let Some(len) = c.inbuf[start..].iter().position(|&b| b == b'\n') {
        let line = &c.inbuf[start..start + len];
        start += len + 1;
        if line.starts_with(b"* ") {
            if line.ends_with(format!(" is now c{}", c.id).as_bytes()) {
                c.named = true;
            }
            continue;
        }
        match parse(line, shared.n) {
            Some((sender, seq, micros)) if sender != c.id => {
                let expected = &mut c.next[sender];
                if seq < *expected {
                    tally.duplicated += 1;
                } else {
                    if seq > *expected {
                        tally.out_of_order += 1;
                    }
                    *expected = seq + 1;
                    tally.deliveries += 1;
                    let _ = hist.record(now.saturating_sub(micros).max(1));
                    shared.received(sender, seq);
                }
            }
            _ => tally.corrupt += 1,
        }
    }
    c.inbuf.drain(..start);
}

/// `cSENDER: SEQ MICROS PAD` → (sender, seq, micros).
fn parse(line: &[u8], n: usize) -> Option<(usize, u64, u64)> {
    let text = std::str::from_utf8(line).ok()?;
    let (name, rest) = text.split_once(": ")?;
    let sender: usize = name.strip_prefix('c')?.parse().ok()?;
    let mut fields = rest.split(' ');
    let seq = fields.next()?.parse().ok()?;
    let micros = fields.next()?.parse().ok()?;
    let pad = fields.next().unwrap_or("");
    (sender < n && pad.bytes().all(|b| b == b'x')).then_some((sender, seq, micros))
}
