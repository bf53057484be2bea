//! tftp-load: concurrent TFTP downloads against any TFTP server on this machine (prefork-echo
//! `--service tftp`, tftpd-hpa, ...), each verified against the local original.
//!
//! Each of `--concurrency` threads downloads `--file` again and again (closed loop) with the
//! options asked (`--blksize`, `--windowsize`; a server that does not take an option is
//! followed, as RFC 2347 says), and checks every transfer's length and FNV-1a hash against
//! `--verify`. Reports throughput (MB/s), transfers/s, transfer time percentiles, the client's
//! retransmissions, errors by kind and, given `--server-pid`, the server's CPU per megabyte and
//! its memory (PSS over its process tree).
//! Exit code: 0 when every transfer was complete and correct, 1 otherwise, 2 on a usage error.

mod cost;

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Serialize;

/// Concurrent, verified TFTP downloads on loopback.
#[derive(Debug, Parser)]
#[command(name = "tftp-load", version)]
struct Args {
    /// Server address; loopback only.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:69")]
    target: String,
    /// The file to download, as the server names it.
    #[arg(long, value_name = "NAME")]
    file: String,
    /// The local original every download must equal.
    #[arg(long, value_name = "PATH")]
    verify: std::path::PathBuf,
    /// Concurrent downloads.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    concurrency: u64,
    /// Block size to ask for (RFC 2348); 512 asks for nothing.
    #[arg(long, value_name = "BYTES", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(8..=65464))]
    blksize: u64,
    /// Window size to ask for (RFC 7440); 1 asks for nothing.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    windowsize: u64,
    /// Run for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    duration: f64,
    /// Seconds without a packet before the client retransmits (five times, then gives up).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    timeout: f64,
    #[command(flatten)]
    out: cost::Reporting,
}

/// What one thread saw.
#[derive(Debug, Default)]
struct Tally {
    transfers: u64,
    bytes: u64,
    retransmits: u64,
    errors: Vec<String>,
    micros: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    target: String,
    file: String,
    concurrency: u64,
    blksize: u64,
    windowsize: u64,
    seconds: f64,
    transfers: u64,
    errors: u64,
    first_error: Option<String>,
    mb_per_sec: f64,
    transfers_per_sec: f64,
    client_retransmits: u64,
    transfer_ms_p50: f64,
    transfer_ms_p99: f64,
    server_cpu_secs_per_mb: Option<f64>,
    /// The server measured (`--server-pid`), its processes, CPU seconds over the run and PSS.
    server: Option<ServerCost>,
}

#[derive(Debug, Serialize)]
struct ServerCost {
    pid: i32,
    processes: usize,
    cpu_secs: f64,
    pss_mib: f64,
}

/// FNV-1a, 64-bit: a cheap, order-sensitive check that two byte streams are the same.
fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn request(name: &str, blksize: u64, window: u64) -> Vec<u8> {
    let mut p = vec![0, 1];
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(b"\0octet\0");
    if blksize != 512 {
        p.extend_from_slice(format!("blksize\0{blksize}\0").as_bytes());
    }
    if window != 1 {
        p.extend_from_slice(format!("windowsize\0{window}\0").as_bytes());
    }
    p
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// The options an OACK names.
fn oack_options(p: &[u8]) -> Vec<(String, u64)> {
    let fields: Vec<&[u8]> = p[2..].split(|b| *b == 0).collect();
    fields
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] => Some((
                String::from_utf8_lossy(k).to_ascii_lowercase(),
                String::from_utf8_lossy(v).parse().ok()?,
            )),
            _ => None,
        })
        .collect()
}

/// One download; returns (bytes, hash, client retransmissions).
fn download(server: SocketAddr, args: &Args) -> Result<(u64, u64, u64), String> {
    let sock =
        UdpSocket::bind(SocketAddr::new(server.ip(), 0)).map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs_f64(args.timeout)))
        .map_err(|e| format!("timeout: {e}"))?;
    let rrq = request(&args.file, args.blksize, args.windowsize);
    sock.send_to(&rrq, server)
        .map_err(|e| format!("send: {e}"))?;
    let (mut blksize, mut window) = (512u64, 1u64);
    let mut tid: Option<SocketAddr> = None;
    let (mut received, mut in_window) = (0u64, 0u64);
    let (mut bytes, mut hash, mut retransmits, mut tries) = (0u64, FNV_START, 0u64, 0u32);
    let mut last_ack: Option<[u8; 4]> = None;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                tries += 1;
                if tries > 5 {
                    return Err("timeout".into());
                }
                retransmits += 1;
                match (tid, last_ack) {
                    (Some(t), Some(a)) => sock.send_to(&a, t),
                    _ => sock.send_to(&rrq, server),
                }
                .map_err(|e| format!("send: {e}"))?;
                continue;
            }
            Err(e) => return Err(format!("recv: {e}")),
        };
        let p = &buf[..n];
        if p.len() < 4 || tid.is_some_and(|t| t != from) {
            continue;
        }
        tid = Some(from);
        tries = 0;
        let (op, block) = (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        );
        match op {
            6 if received == 0 => {
                for (k, v) in oack_options(p) {
                    match k.as_str() {
                        "blksize" => blksize = v,
                        "windowsize" => window = v,
                        _ => {}
                    }
                }
                let a = ack(0);
                sock.send_to(&a, from).map_err(|e| format!("send: {e}"))?;
                last_ack = Some(a);
            }
            3 if block == (received + 1) as u16 => {
                let payload = &p[4..];
                received += 1;
                in_window += 1;
                bytes += payload.len() as u64;
                hash = fnv(hash, payload);
                let last = (payload.len() as u64) < blksize;
                if last || in_window == window {
                    let a = ack(block);
                    sock.send_to(&a, from).map_err(|e| format!("send: {e}"))?;
                    last_ack = Some(a);
                    in_window = 0;
                }
                if last {
                    return Ok((bytes, hash, retransmits));
                }
            }
            3 => {
                // Out of order or a duplicate: say where we are (RFC 7440).
                let a = ack(received as u16);
                sock.send_to(&a, from).map_err(|e| format!("send: {e}"))?;
                in_window = 0;
            }
            5 => {
                let msg = String::from_utf8_lossy(&p[4..])
                    .trim_end_matches('\0')
                    .to_string();
                return Err(format!("server error {block}: {msg}"));
            }
            _ => {}
        }
    }
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn run(args: Args) -> Result<bool> {
    let server = args
        .target
        .to_socket_addrs()
        .context("--target")?
        .next()
        .context("--target resolves to nothing")?;
    if !server.ip().is_loopback() {
        bail!("--target must be a loopback address (this is a load generator)");
    }
    let original = std::fs::read(&args.verify)
        .with_context(|| format!("--verify {}", args.verify.display()))?;
    let want = (original.len() as u64, fnv(FNV_START, &original));
    let server_pid = args.out.server(server, cost::Transport::Udp)?;
    let args = Arc::new(args);
    let stop = Arc::new(AtomicBool::new(false));
    let before = server_pid.map(cost::sample);
    let started = Instant::now();
    let threads: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (args, stop) = (Arc::clone(&args), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut t = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    match download(server, &args) {
                        Ok((bytes, hash, re)) => {
                            t.retransmits += re;
                            if (bytes, hash) == want {
                                t.transfers += 1;
                                t.bytes += bytes;
                                t.micros.push(began.elapsed().as_micros() as u64);
                            } else {
                                t.errors
                                    .push(format!("wrong content: {bytes} bytes, hash {hash:x}"));
                            }
                        }
                        Err(e) => t.errors.push(e),
                    }
                }
                t
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally::default();
    for h in threads {
        let t = h
            .join()
            .map_err(|_| anyhow::anyhow!("a download thread panicked"))?;
        all.transfers += t.transfers;
        all.bytes += t.bytes;
        all.retransmits += t.retransmits;
        all.errors.extend(t.errors);
        all.micros.extend(t.micros);
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = server_pid.map(cost::sample);
    all.micros.sort_unstable();
    let mb = all.bytes as f64 / 1e6;
    let report = Report {
        target: args.target.clone(),
        file: args.file.clone(),
        concurrency: args.concurrency,
        blksize: args.blksize,
        windowsize: args.windowsize,
        seconds,
        transfers: all.transfers,
        errors: all.errors.len() as u64,
        first_error: all.errors.first().cloned(),
        mb_per_sec: mb / seconds,
        transfers_per_sec: all.transfers as f64 / seconds,
        client_retransmits: all.retransmits,
        transfer_ms_p50: percentile(&all.micros, 0.5),
        transfer_ms_p99: percentile(&all.micros, 0.99),
        server_cpu_secs_per_mb: match (before, after) {
            (Some(b), Some(a)) if mb > 0.0 => Some((a.cpu_secs - b.cpu_secs) / mb),
            _ => None,
        },
        server: server_pid
            .zip(before)
            .zip(after)
            .map(|((pid, b), a)| ServerCost {
                pid,
                processes: a.processes,
                cpu_secs: a.cpu_secs - b.cpu_secs,
                pss_mib: a.pss_bytes as f64 / (1 << 20) as f64,
            }),
    };
    if args.out.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} x {} (blksize {}, windowsize {}): {} transfers in {:.1} s, {:.1} MB/s, {:.1} transfers/s, p50 {:.1} ms, p99 {:.1} ms, {} client retransmits, {} errors{}",
            report.concurrency,
            report.file,
            report.blksize,
            report.windowsize,
            report.transfers,
            report.seconds,
            report.mb_per_sec,
            report.transfers_per_sec,
            report.transfer_ms_p50,
            report.transfer_ms_p99,
            report.client_retransmits,
            report.errors,
            report
                .first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        if let Some(sv) = &report.server {
            println!(
                "server pid {} ({} processes): CPU {:.2} s = {:.3} s/MB · PSS {:.1} MiB",
                sv.pid,
                sv.processes,
                sv.cpu_secs,
                report.server_cpu_secs_per_mb.unwrap_or(0.0),
                sv.pss_mib
            );
        }
    }
    Ok(report.errors == 0 && report.transfers > 0)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tftp-load: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
