//! `--service tftp` against what an attacker would try (issue 22): a root swapped by a less
//! privileged owner after start-up, spoofed requests from sources that never answer (lock-out
//! and amplification), ERROR ping-pong, FIFOs, uploads killed half-way, hostile names and
//! options, a file system filled by uploads. Every mode where it applies.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use common::tftp::*;
use common::{Server, wait_until};

/// Every serving mode, and exec'd workers.
const MODES: [&[&str]; 4] = [
    &["--mode", "process", "--workers", "1"],
    &["--mode", "process", "--workers", "1", "--spawn", "exec"],
    &["--mode", "thread", "--workers", "1"],
    &["--mode", "fork-per-conn"],
];

fn start(mode: &[&str], root: &Path, extra: &[&str]) -> Server {
    let root = root.to_str().unwrap();
    let mut args = vec!["--service", "tftp", "--root", root];
    args.extend_from_slice(mode);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--stats-interval", "0.2"]);
    Server::start(&args)
}

/// Downloads `name` with a raw client acknowledging every block; `Err(code)` if refused.
fn try_fetch(server: SocketAddr, name: &[u8]) -> Result<Vec<u8>, u16> {
    let c = udp_client();
    // The request is sent again each second until answered (as real clients do): under a
    // flood the server's socket may drop it.
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut first = None;
    for _ in 0..30 {
        c.send_to(&request(false, name, "octet", &[]), server)
            .unwrap();
        let mut buf = vec![0u8; 65536];
        if let Ok((n, from)) = c.recv_from(&mut buf) {
            buf.truncate(n);
            first = Some((buf, from));
            break;
        }
    }
    let mut first = Some(first.expect("no answer to 30 requests"));
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    loop {
        let (p, from) = first.take().unwrap_or_else(|| recv(&c, "DATA"));
        let (op, block) = head(&p);
        if op == 5 {
            return Err(block);
        }
        assert_eq!(op, 3, "{}", String::from_utf8_lossy(&p));
        got.extend_from_slice(&p[4..]);
        c.send_to(&ack(block), from).unwrap();
        if p.len() < 516 {
            return Ok(got);
        }
    }
}

/// Uploads `data` as `name` with a raw client; `Err(code)` if refused.
fn try_upload(server: SocketAddr, name: &[u8], data: &[u8]) -> Result<(), u16> {
    let c = udp_client();
    c.send_to(&request(true, name, "octet", &[]), server)
        .unwrap();
    let (p, tid) = recv(&c, "ACK 0");
    match head(&p) {
        (4, 0) => {}
        (5, code) => return Err(code),
        other => panic!("unexpected answer {other:?}"),
    }
    for (i, chunk) in data
        .chunks(512)
        .chain(
            // An exact multiple of 512 ends with an empty block.
            data.len().is_multiple_of(512).then_some(&[][..]),
        )
        .enumerate()
    {
        let block = (i + 1) as u16;
        let mut d = vec![0, 3];
        d.extend_from_slice(&block.to_be_bytes());
        d.extend_from_slice(chunk);
        c.send_to(&d, tid).unwrap();
        let (p, _) = recv(&c, "ACK");
        match head(&p) {
            (4, b) if b == block => {}
            (5, code) => return Err(code),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn a_root_swapped_after_start_changes_nothing_in_every_mode() {
    let Some(user) = common::nobody() else {
        common::skip("not root: cannot give the root to another user");
        return;
    };
    for mode in MODES {
        let root = root_with(&[513]);
        let scratch = root.parent().unwrap().to_path_buf();
        // The served directory belongs to a less privileged user, who may rename it.
        nix::unistd::chown(&root, Some(user.uid), Some(user.gid)).unwrap();
        let outside = scratch.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("planted"), b"outside the root").unwrap();
        let server = start(mode, &root, &["--tftp-write"]);
        assert_eq!(try_fetch(server.addr, b"f513").map(|d| d.len()), Ok(513));
        // That user swaps the directory for a symlink to somewhere else.
        std::fs::rename(&root, scratch.join("root.old")).unwrap();
        std::os::unix::fs::symlink(&outside, &root).unwrap();
        assert_eq!(
            try_fetch(server.addr, b"planted"),
            Err(1),
            "{mode:?}: a file outside the original root is not found"
        );
        assert_eq!(
            try_fetch(server.addr, b"f513").map(|d| d.len()),
            Ok(513),
            "{mode:?}: the original files are still served"
        );
        assert_eq!(
            try_upload(server.addr, b"new", b"written"),
            Ok(()),
            "{mode:?}"
        );
        assert!(
            wait_until(Duration::from_secs(10), || scratch
                .join("root.old/new")
                .exists()),
            "{mode:?}: the upload lands in the original root"
        );
        assert!(
            !outside.join("new").exists(),
            "{mode:?}: no file is created outside the original root"
        );
        drop(server);
    }
}

/// A socket on `ip` (any 127.x address is this host) that never reads: a forged source.
fn silent(ip: [u8; 4]) -> UdpSocket {
    UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap()
}

/// The threads of `pid`.
fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// Requests from sources that never answer, asking for the longest timeout, hold nothing a
/// real client needs: with room for 100 transfers, 650 such requests from three addresses
/// (and more while it downloads, 600 a second) leave a legitimate client its download,
/// byte for byte, and no mode grows past its 100 threads or children.
fn lockout(mode: &[&str]) {
    let root = root_with(&[20_000]);
    let original = std::fs::read(root.join("f20000")).unwrap();
    let server = start(mode, &root, &["--max-conns", "100"]);
    let flooders: Vec<UdpSocket> = (2..5).map(|i| silent([127, 0, 0, i])).collect();
    let rrq = request(false, b"f20000", "octet", &[("timeout", "255")]);
    for _ in 0..217 {
        for f in &flooders {
            let _ = f.send_to(&rrq, server.addr);
        }
    }
    let base_threads = threads(server.pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = std::sync::Arc::clone(&stop);
        let (flooders, addr) = (flooders, server.addr);
        std::thread::spawn(move || {
            // Still coming while the real client downloads (bounded: at most 20 s).
            let until = Instant::now() + Duration::from_secs(20);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                for f in &flooders {
                    let _ = f.send_to(&rrq, addr);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let got = try_fetch(server.addr, b"f20000");
    let (mut peak_threads, mut peak_children) = (0, 0);
    for _ in 0..20 {
        peak_threads = peak_threads.max(threads(server.pid));
        peak_children = peak_children.max(common::children_of(server.pid).len());
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    flood.join().unwrap();
    assert_eq!(got.as_ref().map(Vec::len), Ok(original.len()), "{mode:?}");
    assert!(got.unwrap() == original, "{mode:?}: the download differs");
    match mode[1] {
        "thread" => assert!(
            peak_threads <= base_threads.max(1) + 100,
            "{mode:?}: {peak_threads} threads (from {base_threads})"
        ),
        "fork-per-conn" => assert!(peak_children <= 100, "{mode:?}: {peak_children} children"),
        _ => {}
    }
    // Forged requests were evicted (or turned away), and counted: three sources hold at most
    // 25 unanswered transfers each (a quarter of 100), so most requests made way for later ones.
    assert!(
        wait_until(
            Duration::from_secs(10),
            || server.stats()["totals"]["closed_by_limit"].as_u64() >= Some(300)
        ),
        "{mode:?}: {}",
        server.stats()["totals"]
    );
}

#[test]
fn forged_requests_do_not_lock_a_client_out_in_process_mode() {
    lockout(MODES[0]);
}

#[test]
fn forged_requests_do_not_lock_a_client_out_in_thread_mode() {
    lockout(MODES[2]);
}

#[test]
fn forged_requests_do_not_lock_a_client_out_in_fork_per_conn_mode() {
    lockout(MODES[3]);
}

/// Packets that reach `s` within `window`.
fn count_packets(s: &UdpSocket, window: Duration) -> usize {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let until = Instant::now() + window;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while Instant::now() < until {
        if s.recv_from(&mut buf).is_ok() {
            n += 1;
        }
    }
    n
}

/// One request from a source that never answers draws its first packet three times, then
/// nothing: the transfer is over within seconds, whatever `timeout` it asked for.
#[test]
fn a_source_that_never_answers_gets_three_packets_in_every_mode() {
    let runs: Vec<_> = [MODES[0], MODES[2], MODES[3]]
        .into_iter()
        .map(|mode| {
            let root = root_with(&[20_000]);
            std::thread::spawn(move || {
                let server = start(mode, &root, &["--tftp-write"]);
                let read = silent([127, 0, 0, 1]);
                let patient = silent([127, 0, 0, 1]);
                let write = silent([127, 0, 0, 1]);
                read.send_to(&request(false, b"f20000", "octet", &[]), server.addr)
                    .unwrap();
                let asked = [("timeout", "255")];
                patient
                    .send_to(&request(false, b"f20000", "octet", &asked), server.addr)
                    .unwrap();
                write
                    .send_to(&request(true, b"up", "octet", &[]), server.addr)
                    .unwrap();
                // 0, 1, 2 s, then given up at 3 s (the old schedule: 0, 1, 3, 7 s, ...).
                let read = count_packets(&read, Duration::from_secs(8));
                // Counted as they queued on the sockets meanwhile.
                let patient = count_packets(&patient, Duration::from_millis(100));
                let write = count_packets(&write, Duration::from_millis(100));
                let failed = server.stats()["totals"]["transfers_failed"].as_u64();
                (mode, [read, patient, write], failed)
            })
        })
        .collect();
    for run in runs {
        let (mode, sent, failed) = run.join().unwrap();
        // DATA 1 to each reader (one of which asked for a 255 s timeout), ACK 0 to the
        // writer: three times each, never more.
        assert_eq!(
            sent,
            [3, 3, 3],
            "{mode:?}: packets to sources that never answered"
        );
        assert!(failed >= Some(3), "{mode:?}: all given up ({failed:?})");
    }
}

/// Starts a download that waits (10 s timeout) after its first DATA; returns the client and
/// the transfer's address.
fn waiting_transfer(server: SocketAddr) -> (UdpSocket, SocketAddr) {
    let c = udp_client();
    c.send_to(
        &request(false, b"f20000", "octet", &[("timeout", "10")]),
        server,
    )
    .unwrap();
    let (p, tid) = recv(&c, "OACK");
    assert_eq!(head(&p).0, 6);
    c.send_to(&ack(0), tid).unwrap();
    assert_eq!(head(&recv(&c, "DATA 1").0), (3, 1));
    (c, tid)
}

/// A UDP datagram from 127.0.0.1:`from` to 127.0.0.1:`to`, sent through a raw socket (as a
/// forger would): `from` may be a port some other socket holds.
fn forge(from: u16, to: u16, payload: &[u8]) {
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::UDP),
    )
    .expect("a raw socket (root)");
    let mut p = Vec::new();
    p.extend_from_slice(&from.to_be_bytes());
    p.extend_from_slice(&to.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no checksum (IPv4 allows it)
    p.extend_from_slice(payload);
    let dest = SocketAddr::from(([127, 0, 0, 1], 0));
    raw.send_to(&p, &dest.into()).unwrap();
}

/// CPU seconds used so far by `pid` and its children.
fn cpu_secs(pid: i32) -> f64 {
    let ticks = procfs::ticks_per_second() as f64;
    std::iter::once(pid)
        .chain(common::children_of(pid))
        .filter_map(|p| procfs::process::Process::new(p).ok()?.stat().ok())
        .map(|s| (s.utime + s.stime) as f64 / ticks)
        .sum()
}

/// An ERROR sent to a transfer's port by a stranger gets nothing back, and one forged
/// between two transfers' ports (each "from" the other) cannot set them answering each
/// other: the server stays idle.
#[test]
fn errors_are_never_answered_and_transfer_ports_cannot_ping_pong_in_every_mode() {
    if !nix::unistd::Uid::effective().is_root() {
        common::skip("not root: no raw socket to forge a source port with");
        return;
    }
    for mode in [MODES[0], MODES[2], MODES[3]] {
        let root = root_with(&[20_000]);
        let server = start(mode, &root, &[]);
        let (_c1, t1) = waiting_transfer(server.addr);
        let (_c2, t2) = waiting_transfer(server.addr);
        let stranger = udp_client();
        stranger
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let error = [0, 5, 0, 0, b'x', 0];
        stranger.send_to(&error, t1).unwrap();
        let mut buf = [0u8; 600];
        assert!(
            stranger.recv_from(&mut buf).is_err(),
            "{mode:?}: an ERROR from a stranger is answered"
        );
        let before = cpu_secs(server.pid);
        forge(t1.port(), t2.port(), &error);
        forge(t2.port(), t1.port(), &[0, 4, 0, 1]);
        std::thread::sleep(Duration::from_secs(2));
        let used = cpu_secs(server.pid) - before;
        assert!(
            used < 0.5,
            "{mode:?}: {used:.2} CPU seconds in 2 s after one forged packet: a loop"
        );
    }
}

/// A FIFO in the root is refused without ever being opened: a writer blocked in `open` on
/// it stays blocked (opening it for reading would have let that writer through).
#[test]
fn a_fifo_in_the_root_is_never_opened_in_every_mode() {
    for mode in [MODES[0], MODES[2], MODES[3]] {
        let root = root_with(&[]);
        let fifo = root.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let server = start(mode, &root, &[]);
        let (opened, through) = std::sync::mpsc::channel();
        let writer = {
            let fifo = fifo.clone();
            // Blocks until someone opens the FIFO for reading; never writes.
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&fifo);
                let _ = opened.send(f.is_ok());
            })
        };
        assert_eq!(try_fetch(server.addr, b"fifo"), Err(2), "{mode:?}");
        let let_through = through.recv_timeout(Duration::from_secs(1)).is_ok();
        // Lets the writer go (a reader of our own), whatever happened.
        let _reader = nix::fcntl::open(
            &fifo,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        writer.join().unwrap();
        assert!(!let_through, "{mode:?}: the server opened the FIFO");
    }
}

/// The entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// An upload whose process is SIGKILLed half-way leaves nothing behind: the file appears
/// only when complete. Process mode loses a worker, fork-per-conn a child, thread mode the
/// whole server.
#[test]
fn an_upload_killed_half_way_leaves_nothing_in_every_mode() {
    for mode in [MODES[0], MODES[2], MODES[3]] {
        let root = root_with(&[513]);
        let before = entries(&root);
        let mut server = start(mode, &root, &["--tftp-write"]);
        let c = udp_client();
        c.send_to(&request(true, b"partial", "octet", &[]), server.addr)
            .unwrap();
        let (p, tid) = recv(&c, "ACK 0");
        assert_eq!(head(&p), (4, 0), "{mode:?}");
        for block in 1..=5u16 {
            let mut d = vec![0, 3];
            d.extend_from_slice(&block.to_be_bytes());
            d.extend_from_slice(&[b'x'; 512]);
            c.send_to(&d, tid).unwrap();
            assert_eq!(head(&recv(&c, "ACK").0), (4, block), "{mode:?}");
        }
        let victim = match mode[1] {
            "thread" => server.pid,
            "fork-per-conn" => {
                let children = common::children_of(server.pid);
                assert_eq!(children.len(), 1, "{mode:?}: the upload's child");
                children[0]
            }
            _ => server.workers()[0],
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        if victim == server.pid {
            server.wait_exit(Duration::from_secs(10));
        } else {
            assert!(wait_until(Duration::from_secs(10), || {
                !std::path::Path::new(&format!("/proc/{victim}")).exists()
            }));
        }
        assert_eq!(
            entries(&root),
            before,
            "{mode:?}: what the killed upload left"
        );
    }
}

/// Upload names with a newline, ESC, DEL or another control byte are refused (access
/// violation) and create nothing.
#[test]
fn upload_names_with_control_bytes_are_refused_in_every_mode() {
    for mode in [MODES[0], MODES[2], MODES[3]] {
        let root = root_with(&[]);
        let server = start(mode, &root, &["--tftp-write"]);
        for name in [&b"new\nline"[..], b"\x1b[31mred", b"del\x7f", b"bell\x07"] {
            assert_eq!(
                try_upload(server.addr, name, b"x"),
                Err(2),
                "{mode:?}: {name:?}"
            );
        }
        assert_eq!(try_upload(server.addr, b"plain name", b"x"), Ok(()));
        assert!(wait_until(Duration::from_secs(10), || entries(&root) == ["plain name"]));
    }
}

/// An option named twice counts once, as first named, and the OACK names it once.
#[test]
fn an_option_named_twice_is_taken_once_as_first_named_in_every_mode() {
    for mode in [MODES[0], MODES[2], MODES[3]] {
        let root = root_with(&[2000]);
        let server = start(mode, &root, &[]);
        let c = udp_client();
        let asked = [("blksize", "600"), ("blksize", "1024"), ("BLKSIZE", "700")];
        c.send_to(&request(false, b"f2000", "octet", &asked), server.addr)
            .unwrap();
        let (p, tid) = recv(&c, "OACK");
        assert_eq!(p, b"\x00\x06blksize\x00600\x00", "{mode:?}");
        c.send_to(&ack(0), tid).unwrap();
        let (d, _) = recv(&c, "DATA 1");
        assert_eq!(d.len(), 4 + 600, "{mode:?}: blocks of the first value");
        c.send_to(&[0, 5, 0, 0, 0], tid).unwrap(); // done with it
    }
}

/// A tmpfs of `size` mounted in a scratch directory, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = common::scratch_dir().join("tmpfs");
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: whatever still holds it open, the mount goes.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Uploads stop at the floor of free space (`--tftp-min-free`): on a 2 MiB file system with
/// a 1 MiB floor, a first 600 KB upload goes through, a second is refused (disk full) part
/// way, and leaves nothing; with the default floor nothing is written there at all.
#[test]
fn uploads_stop_at_the_floor_of_free_space_in_every_mode() {
    if !nix::unistd::Uid::effective().is_root() {
        common::skip("not root: cannot mount a small tmpfs");
        return;
    }
    let data = common::Rng::new(9).bytes(600_000);
    for mode in [MODES[0], MODES[2], MODES[3]] {
        let Some(fs) = Tmpfs::mount("2m") else {
            common::skip("mount -t tmpfs refused here");
            return;
        };
        let server = start(mode, &fs.0, &["--tftp-write", "--tftp-min-free", "1048576"]);
        assert_eq!(try_upload(server.addr, b"first", &data), Ok(()), "{mode:?}");
        assert_eq!(
            try_upload(server.addr, b"second", &data),
            Err(3),
            "{mode:?}"
        );
        assert!(wait_until(Duration::from_secs(10), || entries(&fs.0) == ["first"]));
        let st = nix::sys::statvfs::statvfs(&fs.0).unwrap();
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        assert!(free >= 1 << 20, "{mode:?}: {free} bytes left free");
        drop(server);
        // The default floor (64 MiB) is more than this whole file system holds.
        let server = start(mode, &fs.0, &["--tftp-write"]);
        assert_eq!(try_upload(server.addr, b"third", b"x"), Err(3), "{mode:?}");
        drop(server);
    }
}

/// A binary upgrade after the root was swapped: the new master serves the directory the
/// old one opened (handed over by descriptor), not what the path names now.
#[test]
fn a_binary_upgrade_after_a_root_swap_serves_the_original_root() {
    let root = root_with(&[513]);
    let scratch = root.parent().unwrap().to_path_buf();
    let outside = scratch.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("planted"), b"outside the root").unwrap();
    let pid_file = scratch.join("tftp.pid");
    let mut server = start(MODES[0], &root, &["--pid-file", pid_file.to_str().unwrap()]);
    std::fs::rename(&root, scratch.join("root.old")).unwrap();
    std::os::unix::fs::symlink(&outside, &root).unwrap();
    server.signal(nix::sys::signal::Signal::SIGUSR2);
    assert!(wait_until(Duration::from_secs(30), || {
        common::read_pid(&pid_file) != server.pid
    }));
    let _new = common::KillOnDrop::new(common::read_pid(&pid_file));
    // Once the old master is gone, only the new one answers.
    server
        .wait_exit(Duration::from_secs(30))
        .expect("the old master exits");
    assert_eq!(try_fetch(server.addr, b"planted"), Err(1));
    assert_eq!(try_fetch(server.addr, b"f513").map(|d| d.len()), Ok(513));
}
