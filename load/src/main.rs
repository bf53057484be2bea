//! echo-load: a load generator for any TCP echo server (RFC 862) on this machine.
//!
//! It verifies every echoed byte, counts errors by kind, and reports throughput, latency
//! percentiles (HDR histogram), time to first echo, fairness across connections and, given the
//! server's pid, the server's CPU time per round trip, context switches and memory (PSS over
//! its process tree). Exit code: 0 when the run completed without any error, 1 when any
//! connection failed (refused, reset, timeout, short or wrong echo), 2 on a usage error.

mod cost;
mod engine;
mod threaded;

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Serialize;

use engine::{ERROR_KINDS, Outcome, Plan, Shared};

/// Load generator for TCP echo servers on loopback: verifies every byte, reports throughput,
/// latency percentiles, time to first echo, fairness across connections and server cost.
#[derive(Debug, Parser)]
#[command(name = "echo-load", version)]
struct Args {
    /// Server address; loopback only (127.0.0.0/8 or ::1).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7007")]
    target: String,
    /// Concurrent connections.
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    connections: u64,
    /// Message size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=(64 << 20)))]
    size: u64,
    /// Run for this long (default 10 s unless --requests is given).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Total messages to send, spread evenly over the connections.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Messages in flight per connection (closed loop).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pipeline: u64,
    /// Open loop: total messages per second at fixed intervals, whatever is in flight; latency
    /// is measured from the scheduled send time.
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Open every connection at the same instant and measure time to first echo from connect.
    #[arg(long)]
    connect_burst: bool,
    /// Close and reopen each connection after this many round trips (connection churn).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    reconnect_every: Option<u64>,
    /// Seconds without progress after which a waiting connection counts as timed out.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    timeout: f64,
    /// Load threads (each runs an event loop over its share of the connections).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Client shape: one event-loop thread over many connections (`events`), or one
    /// blocking thread per connection writing a message, then reading its echo (`threads`,
    /// what most real clients look like; closed loop only).
    #[arg(long, value_enum, default_value_t = Shape::Events)]
    shape: Shape,
    #[command(flatten)]
    out: cost::Reporting,
}

/// How the generator's connections are driven (see [`threaded`] for why both exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Shape {
    Events,
    Threads,
}

#[derive(Debug, Serialize)]
struct Report {
    target: String,
    connections: u64,
    size: u64,
    pipeline: u64,
    rate: Option<f64>,
    connect_burst: bool,
    shape: Shape,
    elapsed_secs: f64,
    round_trips: u64,
    round_trips_per_sec: f64,
    mb_per_sec_out: f64,
    mb_per_sec_in: f64,
    latency_us: Percentiles,
    first_echo_us: FirstEcho,
    fairness: PerConnection,
    errors: Errors,
    connections_opened: u64,
    client_cpu_secs: f64,
    server: Option<ServerCost>,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

#[derive(Debug, Serialize)]
struct FirstEcho {
    answered: u64,
    p99: u64,
    max: u64,
}

#[derive(Debug, Serialize)]
struct PerConnection {
    min: u64,
    median: u64,
    max: u64,
    starved: u64,
}

#[derive(Debug, Serialize)]
struct Errors {
    refused: u64,
    reset: u64,
    timeout: u64,
    short: u64,
    wrong: u64,
    other: u64,
    total: u64,
    first: Option<String>,
}

#[derive(Debug, Serialize)]
struct ServerCost {
    pid: i32,
    processes: usize,
    cpu_secs: f64,
    cpu_us_per_round_trip: f64,
    context_switches: u64,
    pss_bytes: u64,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            if args.out.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print!("{}", render(&report));
            }
            std::process::exit(if report.errors.total == 0 { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("echo-load: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn resolve(target: &str) -> Result<SocketAddr> {
    let addr = target
        .to_socket_addrs()
        .with_context(|| format!("cannot use target {target:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("target {target:?} resolves to no address"))?;
    if !addr.ip().is_loopback() {
        bail!("target {addr} is not a loopback address; echo-load only loads this machine");
    }
    Ok(addr)
}

fn run(args: &Args) -> Result<Report> {
    let target = resolve(&args.target)?;
    // Named before any load: a wrong server is refused at once, not after the run.
    let server_pid = args.out.server(target, cost::Transport::Tcp)?;
    let duration = match (args.duration, args.requests) {
        (Some(d), _) if !(d.is_finite() && d > 0.0) => bail!("--duration must be more than 0"),
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be more than 0");
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        bail!("--timeout must be more than 0");
    }
    let conns = args.connections;
    if args.shape == Shape::Threads {
        if args.rate.is_some() {
            bail!("--shape threads is closed loop only (no --rate)");
        }
        // A blocking client writes a whole message before reading: more than the socket
        // buffers hold would deadlock it against a server that stops reading (back-pressure).
        if args.size * args.pipeline > 64 * 1024 {
            bail!("--shape threads needs --size × --pipeline ≤ 65536 (use --shape events)");
        }
    }
    raise_nofile(conns + 64)?;
    let plan = Plan {
        target,
        size: args.size as usize,
        pipeline: args.pipeline as usize,
        rate_per_conn: args.rate.map(|r| r / conns as f64),
        duration,
        deadline: Instant::now(),
        timeout: Duration::from_secs_f64(args.timeout),
        reconnect_every: args.reconnect_every,
        burst: args.connect_burst,
    };
    // The threads shape starts its own thread per connection under one coordinator.
    let threads = match args.shape {
        Shape::Events => args.threads.min(conns),
        Shape::Threads => 1,
    };
    let shape = args.shape;
    let shared = Arc::new(Shared {
        round_trips: AtomicU64::new(0),
        release: AtomicBool::new(false),
    });
    let barrier = Arc::new(Barrier::new(threads as usize + 1));
    let (tx, rx) = mpsc::channel::<Outcome>();
    let mut handles = Vec::new();
    let mut first_id = 0u64;
    for t in 0..threads {
        let slots = conns / threads + u64::from(t < conns % threads);
        // Spread the request budget over connections, the remainder to the first ones.
        let requests = args.requests.map(|r| r.div_ceil(conns).max(1));
        let (plan, barrier, shared, tx) =
            (plan.clone(), barrier.clone(), shared.clone(), tx.clone());
        let id = first_id;
        handles.push(
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || {
                    let run = match shape {
                        Shape::Events => engine::run,
                        Shape::Threads => threaded::run,
                    };
                    run(&plan, id, slots as usize, requests, &barrier, &shared, &tx)
                })
                .context("starting a load thread")?,
        );
        first_id += slots;
    }
    drop(tx);
    barrier.wait();
    let start = Instant::now();
    let server_before = server_pid.map(cost::sample);
    let cpu_before = self_cpu();
    let progress = std::io::stderr().is_terminal() && !args.out.json;
    let mut outcomes = Vec::new();
    while outcomes.len() < threads as usize {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(o) => outcomes.push(o),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if progress {
                    let rt = shared.round_trips.load(Ordering::Relaxed);
                    let secs = start.elapsed().as_secs_f64();
                    eprint!(
                        "\r[{secs:6.1}s] {rt} round trips, {:.0}/s   ",
                        rt as f64 / secs
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if progress {
        eprintln!();
    }
    let client_cpu = self_cpu() - cpu_before;
    // Sample the server while it still holds every connection.
    let server_after = server_pid.map(cost::sample);
    shared.release.store(true, Ordering::SeqCst);
    for h in handles {
        let _ = h.join();
    }
    Ok(summarise(
        args,
        elapsed,
        client_cpu,
        outcomes,
        server_pid.zip(server_before).zip(server_after),
    ))
}

fn summarise(
    args: &Args,
    elapsed: f64,
    client_cpu: f64,
    outcomes: Vec<Outcome>,
    server: Option<((i32, cost::TreeSample), cost::TreeSample)>,
) -> Report {
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)
        .expect("histogram bounds");
    let mut first_echo = latency.clone();
    let mut per_conn = Vec::new();
    let (mut bytes_in, mut bytes_out, mut opened) = (0, 0, 0);
    let mut errors = [0u64; 6];
    let mut first_error = None;
    for o in outcomes {
        let _ = latency.add(&o.latency);
        let _ = first_echo.add(&o.first_echo);
        per_conn.extend(o.per_conn);
        bytes_in += o.bytes_in;
        bytes_out += o.bytes_out;
        opened += o.connections_opened;
        for (e, n) in errors.iter_mut().zip(o.errors) {
            *e += n;
        }
        first_error = first_error.or(o.first_error);
    }
    per_conn.sort_unstable();
    let round_trips: u64 = per_conn.iter().sum();
    let mb = |b: u64| b as f64 / elapsed.max(1e-9) / 1e6;
    let server = server.map(|((pid, b), a)| ServerCost {
        pid,
        processes: a.processes,
        cpu_secs: a.cpu_secs - b.cpu_secs,
        cpu_us_per_round_trip: (a.cpu_secs - b.cpu_secs) * 1e6 / round_trips.max(1) as f64,
        context_switches: a.context_switches.saturating_sub(b.context_switches),
        pss_bytes: a.pss_bytes,
    });
    Report {
        target: args.target.clone(),
        connections: args.connections,
        size: args.size,
        pipeline: args.pipeline,
        rate: args.rate,
        connect_burst: args.connect_burst,
        shape: args.shape,
        elapsed_secs: elapsed,
        round_trips,
        round_trips_per_sec: round_trips as f64 / elapsed.max(1e-9),
        mb_per_sec_out: mb(bytes_out),
        mb_per_sec_in: mb(bytes_in),
        latency_us: Percentiles {
            p50: latency.value_at_quantile(0.50),
            p90: latency.value_at_quantile(0.90),
            p99: latency.value_at_quantile(0.99),
            p999: latency.value_at_quantile(0.999),
            max: latency.max(),
            mean: latency.mean(),
        },
        first_echo_us: FirstEcho {
            answered: first_echo.len(),
            p99: first_echo.value_at_quantile(0.99),
            max: first_echo.max(),
        },
        fairness: PerConnection {
            min: per_conn.first().copied().unwrap_or(0),
            median: per_conn.get(per_conn.len() / 2).copied().unwrap_or(0),
            max: per_conn.last().copied().unwrap_or(0),
            starved: per_conn.iter().filter(|&&n| n == 0).count() as u64,
        },
        errors: Errors {
            refused: errors[0],
            reset: errors[1],
            timeout: errors[2],
            short: errors[3],
            wrong: errors[4],
            other: errors[5],
            total: errors.iter().sum(),
            first: first_error,
        },
        connections_opened: opened,
        client_cpu_secs: client_cpu,
        server,
    }
}

fn render(r: &Report) -> String {
    let l = &r.latency_us;
    let mut s = format!(
        "target {} · {} connections · {} B messages · pipeline {}{}{}{}\n\
         {:.2} s: {} round trips, {:.0} round trips/s, {:.2} MB/s out, {:.2} MB/s in\n\
         latency µs: p50 {} · p90 {} · p99 {} · p99.9 {} · max {} · mean {:.1}\n\
         first echo µs: p99 {} · max {} ({} of {} connections opened answered)\n\
         per connection round trips: min {} · median {} · max {} · starved {}\n\
         errors: {} ({})\n\
         connections opened {} · client CPU {:.2} s\n",
        r.target,
        r.connections,
        r.size,
        r.pipeline,
        r.rate
            .map_or(String::new(), |x| format!(" · open loop {x}/s")),
        if r.connect_burst {
            " · connect burst"
        } else {
            ""
        },
        if r.shape == Shape::Threads {
            " · a thread per connection"
        } else {
            ""
        },
        r.elapsed_secs,
        r.round_trips,
        r.round_trips_per_sec,
        r.mb_per_sec_out,
        r.mb_per_sec_in,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max,
        l.mean,
        r.first_echo_us.p99,
        r.first_echo_us.max,
        r.first_echo_us.answered,
        r.connections_opened,
        r.fairness.min,
        r.fairness.median,
        r.fairness.max,
        r.fairness.starved,
        r.errors.total,
        ERROR_KINDS
            .iter()
            .zip([
                r.errors.refused,
                r.errors.reset,
                r.errors.timeout,
                r.errors.short,
                r.errors.wrong,
                r.errors.other
            ])
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.connections_opened,
        r.client_cpu_secs,
    );
    if let Some(first) = &r.errors.first {
        s.push_str(&format!("first error: {first}\n"));
    }
    if let Some(sv) = &r.server {
        s.push_str(&format!(
            "server pid {} ({} processes): CPU {:.2} s = {:.2} µs/round trip · {} context switches · PSS {:.1} MiB\n",
            sv.pid,
            sv.processes,
            sv.cpu_secs,
            sv.cpu_us_per_round_trip,
            sv.context_switches,
            sv.pss_bytes as f64 / (1 << 20) as f64
        ));
    }
    s
}

fn self_cpu() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        secs(u.user_time()) + secs(u.system_time())
    })
}

fn raise_nofile(need: u64) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((mut soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        soft = hard;
    }
    if soft < need {
        bail!("{need} descriptors needed but RLIMIT_NOFILE is {soft} (raise it with ulimit -n)");
    }
    Ok(())
}
