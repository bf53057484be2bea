//! TFTP test helpers: a served directory of files of telling sizes, the real clients
//! (tftp-hpa's `tftp`, `atftp`, `curl`, the seed tutorial's downloader), a raw client for
//! what no real client does, and a lossy UDP relay.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use super::{Rng, scratch_dir};

/// The sizes every real client downloads: empty, one byte, around one block, 1 MiB.
pub const SIZES: [usize; 6] = [0, 1, 511, 512, 513, 1 << 20];
/// 40 MiB: 81,920 blocks of 512 bytes, past block number 65,535 (rollover).
pub const BIG: usize = 40 << 20;

/// A root directory holding `f<SIZE>` for each size asked, with seeded random contents.
pub fn root_with(sizes: &[usize]) -> PathBuf {
    let dir = scratch_dir().join("root");
    std::fs::create_dir_all(&dir).unwrap();
    for &n in sizes {
        let mut rng = Rng::new(n as u64 + 7);
        std::fs::write(dir.join(format!("f{n}")), rng.bytes(n)).unwrap();
    }
    dir
}

/// Whether `tool` runs here; if not, a counted skip of that part (CI's `.ci/run` installs
/// it, so on CI its absence fails the test).
pub fn have(tool: &str) -> bool {
    super::have_tool(tool)
}

/// Runs a client command with a time limit, so a broken server fails the test, never hangs it.
fn run(cmd: &mut Command) -> Output {
    Command::new("timeout")
        .arg("120")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .current_dir(cmd.get_current_dir().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .output()
        .expect("running a TFTP client")
}

/// tftp-hpa: `tftp HOST PORT` fed `commands` (one per line) on stdin, in `cwd`.
pub fn tftp_hpa(addr: SocketAddr, commands: &str, cwd: &Path) -> Output {
    let mut child = Command::new("timeout")
        .args([
            "120",
            "tftp",
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running tftp");
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(commands.as_bytes()).unwrap();
    stdin.write_all(b"\nquit\n").unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// tftp-hpa downloads `remote` to `local` in binary mode (1 s retransmission).
pub fn tftp_hpa_get(addr: SocketAddr, remote: &str, local: &Path) -> Output {
    let cwd = local.parent().unwrap();
    let name = local.file_name().unwrap().to_str().unwrap();
    tftp_hpa(addr, &format!("binary\nrexmt 1\nget {remote} {name}"), cwd)
}

/// atftp downloads `remote` to `local` with extra `--option "NAME VALUE"`s.
pub fn atftp_get(addr: SocketAddr, remote: &str, local: &Path, options: &[&str]) -> Output {
    let mut cmd = Command::new("atftp");
    for o in options {
        cmd.args(["--option", o]);
    }
    cmd.args(["-g", "-r", remote, "-l"])
        .arg(local)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string());
    run(&mut cmd)
}

/// curl downloads `tftp://ADDR/remote` to `local`, with `--tftp-blksize` if given.
pub fn curl_get(addr: SocketAddr, remote: &str, local: &Path, blksize: Option<u32>) -> Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "100", "-o"]).arg(local);
    if let Some(b) = blksize {
        cmd.args(["--tftp-blksize", &b.to_string()]);
    }
    cmd.arg(format!("tftp://{addr}/{remote}"));
    run(&mut cmd)
}

/// The seed tutorial's downloader (tests/clients/tutorial_tftp.py).
pub fn tutorial_get(addr: SocketAddr, remote: &str, local: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/tutorial_tftp.py");
    run(Command::new("python3")
        .arg(script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(remote)
        .arg(local))
}

/// Asserts a client succeeded and `local` equals `original` byte for byte.
pub fn assert_same(what: &str, out: &Output, local: &Path, original: &Path) {
    let got = std::fs::read(local).unwrap_or_else(|e| {
        panic!(
            "{what}: no file at {} ({e}); status {:?}, stdout {:?}, stderr {:?}",
            local.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let want = std::fs::read(original).unwrap();
    assert!(
        got == want,
        "{what}: {} bytes downloaded, {} expected (first difference at {:?}); stderr {:?}",
        got.len(),
        want.len(),
        got.iter().zip(&want).position(|(a, b)| a != b),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw read or write request.
pub fn request(write: bool, name: &[u8], mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, if write { 2 } else { 1 }];
    p.extend_from_slice(name);
    p.push(0);
    p.extend_from_slice(mode.as_bytes());
    p.push(0);
    for (n, v) in options {
        p.extend_from_slice(n.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

/// A UDP socket on loopback with a generous read timeout.
pub fn udp_client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// The next packet, or a panic naming what was awaited.
pub fn recv(s: &UdpSocket, awaiting: &str) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (n, from) = s
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no packet while awaiting {awaiting}: {e}"));
    buf.truncate(n);
    (buf, from)
}

/// The opcode and the next 16-bit field (block number or error code).
pub fn head(p: &[u8]) -> (u16, u16) {
    assert!(p.len() >= 4, "short packet {p:?}");
    (
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    )
}

/// An ACK packet.
pub fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// A relay between TFTP clients and a server that drops and duplicates a share of the
/// packets each way (seeded, so a failure replays). Clients talk to `addr`; the relay keeps
/// one upstream socket per client, so the server sees each client as a distinct peer and its
/// transfer IDs stay consistent for the client (all replies come from `addr`).
pub struct LossyRelay {
    /// Where clients send.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
    /// What it did to the packets going each way: a test through loss that saw none lost
    /// tested nothing.
    pub tally: Arc<Tally>,
}

/// Packets the relay dropped and duplicated, toward the server and toward the clients.
#[derive(Default, Debug)]
pub struct Tally {
    pub dropped_up: AtomicU64,
    pub duplicated_up: AtomicU64,
    pub dropped_down: AtomicU64,
    pub duplicated_down: AtomicU64,
}

impl Tally {
    fn count(&self, fate: u32, up: bool) {
        let counter = match (fate, up) {
            (0, true) => &self.dropped_up,
            (2, true) => &self.duplicated_up,
            (0, false) => &self.dropped_down,
            (2, false) => &self.duplicated_down,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (dropped, duplicated) toward the clients: what makes the server retransmit.
    pub fn down(&self) -> (u64, u64) {
        (
            self.dropped_down.load(Ordering::Relaxed),
            self.duplicated_down.load(Ordering::Relaxed),
        )
    }
}

impl LossyRelay {
    /// Relays to `server`, dropping `drop_pct`% and duplicating `dup_pct`% of packets (never
    /// the client's ACK of the last block: see `relay`).
    pub fn start(server: SocketAddr, drop_pct: u64, dup_pct: u64, seed: u64) -> LossyRelay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        front.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let tally = Arc::new(Tally::default());
        let counts = Arc::clone(&tally);
        let handle = thread::spawn(move || {
            relay(
                front,
                server,
                (drop_pct, dup_pct),
                Rng::new(seed),
                &flag,
                &counts,
            )
        });
        LossyRelay {
            addr,
            stop,
            handle: Some(handle),
            tally,
        }
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One client's path through the relay: its upstream socket and the server's transfer port.
struct Leg {
    client: SocketAddr,
    up: UdpSocket,
    tid: Option<SocketAddr>,
    /// The longest DATA seen toward the client, and the block of a shorter one (the last).
    longest: usize,
    last_block: Option<u16>,
}

fn relay(
    front: UdpSocket,
    server: SocketAddr,
    (drop_pct, dup_pct): (u64, u64),
    mut rng: Rng,
    stop: &AtomicBool,
    tally: &Tally,
) {
    let mut legs: Vec<Leg> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut fate = move || {
        let r = rng.next_u64() % 100;
        if r < drop_pct {
            0
        } else if r < drop_pct + dup_pct {
            2
        } else {
            1
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let mut idle = true;
        while let Ok((n, from)) = front.recv_from(&mut buf) {
            idle = false;
            let i = match legs.iter().position(|l| l.client == from) {
                Some(i) => i,
                None => {
                    let up = UdpSocket::bind("127.0.0.1:0").unwrap();
                    up.set_nonblocking(true).unwrap();
                    legs.push(Leg {
                        client: from,
                        up,
                        tid: None,
                        longest: 0,
                        last_block: None,
                    });
                    legs.len() - 1
                }
            };
            let to = legs[i].tid.unwrap_or(server);
            let mut f = fate();
            // The client's ACK of the last block is never lost: a client that has the whole
            // file exits without waiting for a repeat of that block (tftp-hpa does), so the
            // server could never learn the transfer completed, whatever it does.
            if f == 0 && n >= 4 && buf[1] == 4 {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                if legs[i].last_block == Some(block) {
                    f = 1;
                }
            }
            tally.count(f, true);
            for _ in 0..f {
                let _ = legs[i].up.send_to(&buf[..n], to);
            }
        }
        for leg in &mut legs {
            while let Ok((n, from)) = leg.up.recv_from(&mut buf) {
                idle = false;
                if leg.tid.is_none() && from != server {
                    leg.tid = Some(from);
                }
                // A second transfer a duplicated request started: the client would answer
                // it with ERROR 5; the relay just keeps it away.
                if leg.tid.is_some_and(|t| t != from) && from != server {
                    continue;
                }
                if n >= 4 && buf[1] == 3 {
                    if n < leg.longest {
                        leg.last_block = Some(u16::from_be_bytes([buf[2], buf[3]]));
                    }
                    leg.longest = leg.longest.max(n);
                }
                let f = fate();
                tally.count(f, false);
                for _ in 0..f {
                    let _ = front.send_to(&buf[..n], leg.client);
                }
            }
        }
        if idle {
            thread::sleep(Duration::from_micros(200));
        }
    }
}
