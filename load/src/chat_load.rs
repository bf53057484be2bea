//! chat-load: verifying load for a line-based group chat on this machine (prefork-echo
//! `--service chat`, and the peers under `scripts/peers/` that speak the same lines).
//!
//! `--clients` clients connect, read the welcome line and take the names `c0`, `c1`, ...
//! (`/nick`); then each sends lines `SEQ MICROS PAD` and every client checks every line it
//! receives from every other: none lost, none twice, each sender's in order, none corrupted.
//! Closed loop (default): a sender has at most `--window` lines that not every other client
//! has received yet. Open loop: `--rate` lines per second per client, whatever is in flight.
//! Lines not delivered everywhere within `--settle` seconds (10) after sending stops count as
//! lost.
//! Reports deliveries/s (over the time until the last line arrived), delivery latency (send to receipt, per recipient) p50/p99/max, the
//! fairness of what each client got to send and, given `--server-pid`, the server's CPU per
//! delivery and memory. Exit code 0 when every line arrived intact everywhere, 1 otherwise,
//! 2 on a usage error.

mod chat_client;
mod chat_flooder;
mod cost;
mod never_reader;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chat_client::{Client, Fleet, Shared, Tally, flush, send_due};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Interest, Poll, Token};
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
    /// Extra clients that send lines as fast as the server reads them, named f0, f1, ... (they
    /// read what they are sent); their lines are checked by every client like the others'.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=16))]
    flooders: u64,
    /// Bytes of padding in each flooder's line.
    #[arg(long, value_name = "BYTES", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=4000))]
    flood_size: u64,
    /// Seconds to wait, after sending stops, for the last lines to arrive everywhere; a line
    /// still missing then counts as lost.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    settle: f64,
    /// Load threads.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    #[command(flatten)]
    out: cost::Reporting,
}

#[derive(Debug, Serialize)]
struct Report {
    target: String,
    clients: u64,
    never_readers: u64,
    /// Never-readers the server had disconnected by the end of the run.
    never_readers_dropped: u64,
    flooders: u64,
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
    /// Lines the flooders wrote, how many deliveries of them arrived, how many did not.
    flood_sent: u64,
    flood_deliveries: u64,
    flood_lost: u64,
    jain_sent: f64,
    server_cpu_us_per_delivery: Option<f64>,
    server_pss_mib: Option<f64>,
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
            if args.out.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print_report(&report);
            }
            let bad = report.lost
                + report.flood_lost
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
    if r.never_readers > 0 {
        println!(
            "never-readers: {} of {} disconnected by the server",
            r.never_readers_dropped, r.never_readers
        );
    }
    if r.flooders > 0 {
        println!(
            "{} flooder(s): {} lines sent, {} deliveries, {} lost",
            r.flooders, r.flood_sent, r.flood_deliveries, r.flood_lost
        );
    }
    if let (Some(cpu), Some(pss)) = (r.server_cpu_us_per_delivery, r.server_pss_mib) {
        println!("server: {cpu:.2} µs CPU per delivery, PSS {pss:.1} MiB");
    }
}

fn run(args: &Args) -> Result<Report> {
    let addr = loopback(&args.target)?;
    let server_pid = args.out.server(addr, cost::Transport::Tcp)?;
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
        flood_sent: (0..args.flooders).map(|_| AtomicU64::new(0)).collect(),
    });
    let threads = (args.threads as usize).min(n);
    let ready = Arc::new(std::sync::Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let ids: Vec<usize> = (t..n).step_by(threads).collect();
        let (shared, ready) = (Arc::clone(&shared), Arc::clone(&ready));
        let (pad, rate) = ("x".repeat(args.size as usize), args.rate);
        let settle = Duration::from_secs_f64(args.settle.clamp(0.0, 3600.0));
        handles.push(std::thread::spawn(move || {
            thread_main(addr, ids, &shared, &ready, (&pad, rate, settle))
        }));
    }
    ready.wait();
    let flooders = (0..args.flooders as usize)
        .map(|k| {
            chat_flooder::Flooder::start(addr, k, args.flood_size as usize, Arc::clone(&shared))
        })
        .collect::<Result<Vec<_>>>()?;
    // Held open, never read, until the report is made.
    let sleepers = (0..args.never_readers)
        .map(|_| std::net::TcpStream::connect(addr))
        .collect::<io::Result<Vec<_>>>()
        .context("connecting the never-readers")?;
    let before = server_pid.map(cost::sample);
    let started = Instant::now();
    shared.sending.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    shared.sending.store(false, Ordering::Release);
    let mut results = Vec::new();
    for h in handles {
        results.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??,
        );
    }
    // Until the last line arrived everywhere (or the settle time ran out): a server that
    // falls behind is not credited with deliveries it made after the clock stopped.
    let seconds = started.elapsed().as_secs_f64();
    let after = server_pid.map(cost::sample);
    for f in flooders {
        f.stop();
    }
    let mut hist = Histogram::<u64>::new(3).context("histogram")?;
    let mut total = Tally::default();
    for (tally, h) in results {
        hist.add(&h).context("merging histograms")?;
        for (a, b) in [
            (&mut total.deliveries, tally.deliveries),
            (&mut total.duplicated, tally.duplicated),
            (&mut total.out_of_order, tally.out_of_order),
            (&mut total.corrupt, tally.corrupt),
            (&mut total.disconnected, tally.disconnected),
            (&mut total.lost, tally.lost),
            (&mut total.flood_deliveries, tally.flood_deliveries),
            (&mut total.flood_lost, tally.flood_lost),
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
        never_readers_dropped: never_reader::dropped(&sleepers),
        flooders: args.flooders,
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
        flood_sent: shared
            .flood_sent
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .sum(),
        flood_deliveries: total.flood_deliveries,
        flood_lost: total.flood_lost,
        jain_sent: if sq > 0.0 {
            sum * sum / (n as f64 * sq)
        } else {
            1.0
        },
        server_cpu_us_per_delivery: cost.map(|c| c.0),
        server_pss_mib: cost.map(|c| c.1),
    })
}

fn thread_main(
    addr: SocketAddr,
    ids: Vec<usize>,
    shared: &Shared,
    ready: &std::sync::Barrier,
    (pad, rate, settle): (&str, Option<f64>, Duration),
) -> Result<(Tally, Histogram<u64>)> {
    let poll = Poll::new()?;
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
            gaps: vec![0; shared.n],
            named: false,
            closed: false,
            next_send: Instant::now(),
            flood_next: vec![0; shared.flood_sent.len()],
        });
    }
    let mut fleet = Fleet::new(poll, clients)?;
    // Until every client of this thread has its name, then wait for the others.
    let gate = Instant::now() + Duration::from_secs(60);
    while fleet.clients.iter().any(|c| !c.named && !c.closed) {
        if Instant::now() > gate {
            bail!("clients did not get their names within 60 s");
        }
        fleet.turn(shared)?;
    }
    ready.wait();
    while !shared.sending.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let period = rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let start = Instant::now();
    for (k, c) in fleet.clients.iter_mut().enumerate() {
        // Spread open-loop senders over one period.
        c.next_send = start + period.map_or(Duration::ZERO, |p| p * k as u32 / ids.len() as u32);
    }
    let mut settle_until = None;
    loop {
        let now = Instant::now();
        let sending = shared.sending.load(Ordering::Acquire);
        if sending {
            for c in fleet.clients.iter_mut().filter(|c| !c.closed) {
                send_due(c, shared, now, period, pad);
            }
        } else {
            let until = *settle_until.get_or_insert(now + settle);
            let everyone_has_everything = (0..shared.n).all(|s| {
                shared.complete[s].load(Ordering::Acquire) >= shared.sent[s].load(Ordering::Acquire)
            }) && fleet.clients.iter().all(|c| {
                c.closed
                    || shared
                        .flood_sent
                        .iter()
                        .zip(&c.flood_next)
                        .all(|(sent, &next)| next >= sent.load(Ordering::Acquire))
            });
            if everyone_has_everything || now > until {
                break;
            }
        }
        for c in fleet
            .clients
            .iter_mut()
            .filter(|c| !c.out.is_empty() && !c.closed)
        {
            flush(c);
        }
        fleet.turn(shared)?;
    }
    let mut tally = std::mem::take(&mut fleet.tally);
    for c in &fleet.clients {
        for (sent, &next) in shared.flood_sent.iter().zip(&c.flood_next) {
            tally.flood_lost += sent.load(Ordering::Acquire).saturating_sub(next);
        }
        for (s, &next) in c.next.iter().enumerate() {
            if s != c.id {
                let sent = shared.sent[s].load(Ordering::Acquire);
                tally.expected += sent;
                tally.lost += sent.saturating_sub(next) + c.gaps[s];
            }
        }
    }
    Ok((tally, fleet.hist))
}
