//! `--service tftp` against hostile and unlucky peers: names that try to leave the root,
//! malformed packets, strangers on a transfer's port (never answered), duplicate ACKs, floods of requests,
//! packet loss and duplication, and reloads and stops while transfers run.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::tftp::*;
use common::{BIN, Rng, Server, wait_until};
use nix::sys::signal::Signal;

fn start(mode: &str, root: &Path, extra: &[&str]) -> Server {
    let root = root.to_str().unwrap();
    let mut args = vec!["--service", "tftp", "--root", root, "--mode", mode];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--stats-interval", "0.2"]);
    Server::start(&args)
}

/// Asks for `name` with a 10 s retransmission timeout (so nothing below is a timer's doing)
/// and takes the OACK; returns the transfer's address. The first DATA follows `ack(0)`.
fn begin_slow(
    c: &std::net::UdpSocket,
    server: std::net::SocketAddr,
    name: &[u8],
) -> std::net::SocketAddr {
    c.send_to(&request(false, name, "octet", &[("timeout", "10")]), server)
        .unwrap();
    let (p, tid) = recv(c, "OACK");
    assert_eq!(head(&p).0, 6, "{}", String::from_utf8_lossy(&p));
    tid
}

/// Carries a download on from `block` (acknowledged first) to its end, collecting the data.
fn finish(
    c: &std::net::UdpSocket,
    tid: std::net::SocketAddr,
    mut block: u16,
    got: &mut Vec<u8>,
    awaiting: &str,
) {
    loop {
        c.send_to(&ack(block), tid).unwrap();
        let (p, _) = recv(c, awaiting);
        block = head(&p).1;
        got.extend_from_slice(&p[4..]);
        if p.len() < 516 {
            c.send_to(&ack(block), tid).unwrap();
            return;
        }
    }
}

/// Downloads `name` with the raw client, acknowledging every block; returns the bytes.
fn fetch(server: std::net::SocketAddr, name: &str) -> Vec<u8> {
    let c = udp_client();
    c.send_to(&request(false, name.as_bytes(), "octet", &[]), server)
        .unwrap();
    let mut got = Vec::new();
    loop {
        let (p, from) = recv(&c, "DATA");
        assert_eq!(head(&p).0, 3, "{}", String::from_utf8_lossy(&p));
        got.extend_from_slice(&p[4..]);
        c.send_to(&ack(head(&p).1), from).unwrap();
        if p.len() < 516 {
            return got;
        }
    }
}

#[test]
fn names_that_lead_out_of_the_root_are_refused_in_every_mode() {
    let root = root_with(&[513]);
    let outside = root.parent().unwrap();
    std::fs::write(outside.join("secret"), b"not yours").unwrap();
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::os::unix::fs::symlink("../secret", root.join("out")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("abs")).unwrap();
    std::os::unix::fs::symlink("../..", root.join("sub/up")).unwrap();
    std::os::unix::fs::symlink("..", root.join("sub/home")).unwrap();
    let secret = outside.join("secret").display().to_string();
    let hostile: Vec<Vec<u8>> = vec![
        b"../secret".to_vec(),
        b"sub/../../secret".to_vec(),
        secret.as_bytes().to_vec(),
        b"/etc/passwd".to_vec(),
        b"out".to_vec(),
        b"abs".to_vec(),
        b"sub/up/secret".to_vec(),
        b"sub".to_vec(),
        b".".to_vec(),
    ];
    for mode in ["process", "thread", "fork-per-conn"] {
        let server = start(mode, &root, &[]);
        let c = udp_client();
        for name in &hostile {
            c.send_to(&request(false, name, "octet", &[]), server.addr)
                .unwrap();
            let (p, _) = recv(&c, "the refusal");
            assert_eq!(
                head(&p),
                (5, 2),
                "{mode}: {:?} got {:?}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(&p)
            );
        }
        // Literal odd names are just names: not found, not an escape; a symlink that stays
        // inside the root is followed.
        c.send_to(&request(false, b"..%2fsecret", "octet", &[]), server.addr)
            .unwrap();
        assert_eq!(head(&recv(&c, "not found").0), (5, 1));
        assert_eq!(fetch(server.addr, "sub/home/f513").len(), 513, "{mode}");
        assert_eq!(fetch(server.addr, "f513").len(), 513, "{mode}");
    }
}

#[test]
fn malformed_packets_get_an_error_or_silence_and_harm_nobody() {
    let root = root_with(&[513]);
    let server = start("process", &root, &["--workers", "1"]);
    let workers = server.workers();
    let c = udp_client();
    let error_code = |packet: &[u8]| {
        c.send_to(packet, server.addr).unwrap();
        let (p, _) = recv(&c, "an ERROR");
        assert_eq!(head(&p).0, 5, "{p:?}");
        head(&p).1
    };
    assert_eq!(error_code(b"\x00"), 4); // short
    assert_eq!(error_code(b"\x00\x09f513\x00octet\x00"), 4); // unknown opcode
    assert_eq!(error_code(b"\x00\x01f513\x00octet"), 4); // no final NUL
    assert_eq!(error_code(b"\x00\x01f513\x00mail\x00"), 4); // mode
    assert_eq!(
        error_code(&request(false, b"f513", "octet", &[("blksize", "7")])),
        8
    );
    assert_eq!(
        error_code(&request(false, b"f513", "octet", &[("blksize", "x")])),
        8
    );
    assert_eq!(
        error_code(&request(false, b"f513", "octet", &[("timeout", "0")])),
        8
    );
    assert_eq!(
        error_code(&request(false, b"f513", "octet", &[("windowsize", "0")])),
        8
    );
    // Seeded garbage, including truncated requests and packets that are not requests, in
    // rounds of 50 each closed by a request that must be answered (so no round can overflow
    // the socket's receive buffer, and every datagram is accounted for).
    let mut rng = Rng::new(99);
    let mut sent = 8;
    for round in 0..40 {
        for i in 0..50 {
            let n = rng.range(0, 700);
            let mut p = rng.bytes(n);
            if i % 3 == 0 && p.len() > 2 {
                p[0] = 0;
                p[1] = rng.range(1, 6) as u8;
            }
            c.send_to(&p, server.addr).unwrap();
        }
        let sync = request(false, format!("missing-{round}").as_bytes(), "octet", &[]);
        c.send_to(&sync, server.addr).unwrap();
        sent += 51;
        // Answers to the garbage (errors, or a transfer a random request began) come first.
        while head(&recv(&c, "the round's closing answer").0) != (5, 1) {}
    }
    // Still the same worker, still serving, and every datagram was received and judged.
    assert_eq!(fetch(server.addr, "f513").len(), 513);
    assert_eq!(server.workers(), workers);
    let ok = wait_until(Duration::from_secs(30), || {
        server.stats()["totals"]["datagrams_in"].as_u64() == Some(sent + 1)
    });
    assert!(ok, "expected {} datagrams: {}", sent + 1, server.stats());
}

#[test]
fn a_stranger_gets_no_answer_and_duplicate_acks_resend_nothing() {
    let root = root_with(&[5000]);
    let server = start("process", &root, &["--workers", "1"]);
    let c = udp_client();
    // A 10 s retransmission timeout: any DATA seen twice below is the Sorcerer's Apprentice
    // bug (an answer to a duplicate ACK), not a timer.
    let tid = begin_slow(&c, server.addr, b"f5000");
    c.send_to(&ack(0), tid).unwrap();
    let stranger = udp_client();
    let mut blocks = Vec::new();
    let mut got = Vec::new();
    loop {
        let (p, from) = recv(&c, "DATA");
        assert_eq!(from, tid, "every packet comes from the transfer's port");
        let (op, block) = head(&p);
        assert_eq!(op, 3);
        blocks.push(block);
        if blocks.len() == 1 {
            // Someone else talks to the transfer's port: not answered at all (an answer
            // could start a loop with another server), transfer undisturbed.
            stranger.send_to(&ack(1), tid).unwrap();
            stranger.send_to(&[0, 5, 0, 0, 0], tid).unwrap();
            stranger
                .set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            let mut buf = [0u8; 600];
            assert!(
                stranger.recv_from(&mut buf).is_err(),
                "a stranger gets no answer"
            );
        }
        got.extend_from_slice(&p[4..]);
        // Every ACK twice: the second must not make the server send anything.
        c.send_to(&ack(block), tid).unwrap();
        c.send_to(&ack(block), tid).unwrap();
        if p.len() < 516 {
            break;
        }
    }
    assert_eq!(got, std::fs::read(root.join("f5000")).unwrap());
    assert_eq!(
        blocks,
        (1..=10).collect::<Vec<u16>>(),
        "each block exactly once"
    );
    // Read once the report that includes this transfer has come in.
    let mut t = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            t = server.stats()["totals"].clone();
            t["transfers_done"].as_u64() >= Some(1)
        }),
        "{t}"
    );
    assert_eq!(t["retransmits"].as_u64(), Some(0), "{t}");
}

#[test]
fn a_flood_of_requests_is_bounded_by_max_conns() {
    let root = root_with(&[1 << 20]);
    let server = start("process", &root, &["--workers", "1", "--max-conns", "3"]);
    let worker = server.workers()[0];
    let fds = || {
        std::fs::read_dir(format!("/proc/{worker}/fd"))
            .unwrap_or_else(|e| panic!("the worker's descriptors: {e}"))
            .count()
    };
    let before = fds();
    // Three transfers held open (acknowledged once, then never again), then a fourth:
    // "server busy" (a transfer whose client never answered would have made way instead).
    let held: Vec<_> = (0..3)
        .map(|_| {
            let c = udp_client();
            c.send_to(&request(false, b"f1048576", "octet", &[]), server.addr)
                .unwrap();
            let (p, tid) = recv(&c, "DATA 1");
            assert_eq!(head(&p), (3, 1));
            c.send_to(&ack(1), tid).unwrap();
            assert_eq!(head(&recv(&c, "DATA 2").0), (3, 2));
            c
        })
        .collect();
    let c = udp_client();
    c.send_to(&request(false, b"f1048576", "octet", &[]), server.addr)
        .unwrap();
    let (p, _) = recv(&c, "busy");
    assert_eq!(head(&p), (5, 0), "{}", String::from_utf8_lossy(&p));
    assert!(String::from_utf8_lossy(&p).contains("busy"));
    // A flood from many ports: the worker's descriptors stay bounded by the limit.
    let flood = udp_client();
    for _ in 0..3000 {
        let _ = flood.send_to(&request(false, b"f1048576", "octet", &[]), server.addr);
    }
    // Sampled all the while the worker works through the flood, not for a fixed moment.
    let mut peak = 0;
    let ok = wait_until(Duration::from_secs(30), || {
        peak = peak.max(fds());
        server.stats()["totals"]["closed_by_limit"].as_u64() >= Some(100)
    });
    assert!(ok, "{}", server.stats());
    assert!(
        peak <= before + 3 * 2 + 2,
        "descriptors grew from {before} to {peak}"
    );
    assert_eq!(server.workers(), vec![worker]);
    drop(held);
}

/// Downloads through a relay that drops 5% and duplicates 5% of the packets each way: with
/// tftp-hpa (lock-step, 512-byte blocks) and atftp (1468-byte blocks, windows of 8).
fn through_loss(mode: &str) {
    let root = root_with(&[30_000, 200_000]);
    let server = start(mode, &root, &["--workers", "2"]);
    let relay = LossyRelay::start(server.addr, 5, 5, 7);
    let out = root.parent().unwrap();
    let mut ran = 0;
    if have("tftp") {
        ran += 1;
        let local = out.join("lossy-hpa");
        let o = tftp_hpa_get(relay.addr, "f30000", &local);
        assert_same(
            &format!("{mode}: tftp-hpa through loss"),
            &o,
            &local,
            &root.join("f30000"),
        );
    }
    if have("atftp") {
        ran += 1;
        let local = out.join("lossy-atftp");
        let opts = ["blksize 1468", "windowsize 8", "timeout 1"];
        let o = atftp_get(relay.addr, "f200000", &local, &opts);
        let what = format!("{mode}: atftp windowed through loss");
        assert_same(&what, &o, &local, &root.join("f200000"));
    }
    if ran == 0 {
        return; // each missing client was a counted skip
    }
    // The relay really lost and repeated packets on the way to the clients, and the server
    // made up for the losses by sending again; its report of that comes a moment later.
    let (dropped, duplicated) = relay.tally.down();
    assert!(
        dropped > 0 && duplicated > 0,
        "{mode}: the relay did nothing: {:?}",
        relay.tally
    );
    let mut t = serde_json::Value::Null;
    let reported = wait_until(Duration::from_secs(30), || {
        t = server.stats()["totals"].clone();
        t["transfers_done"].as_u64() >= Some(ran) && t["retransmits"].as_u64() > Some(0)
    });
    assert!(reported, "{mode}: {ran} transfers, no retransmission: {t}");
    assert_eq!(t["io_errors"].as_u64(), Some(0), "{t}");
}

#[test]
fn transfers_complete_through_loss_and_duplication_in_process_mode() {
    through_loss("process");
}

#[test]
fn transfers_complete_through_loss_and_duplication_in_thread_mode() {
    through_loss("thread");
}

#[test]
fn transfers_complete_through_loss_and_duplication_in_fork_per_conn_mode() {
    through_loss("fork-per-conn");
}

#[test]
fn transfers_in_progress_finish_across_a_reload_and_a_graceful_stop() {
    let root = root_with(&[20_000]);
    let original = std::fs::read(root.join("f20000")).unwrap();
    let mut server = start(
        "process",
        &root,
        &["--workers", "1", "--drain-timeout", "60"],
    );
    let old = server.workers();
    // Start a download and take its first block only.
    let c = udp_client();
    let tid = begin_slow(&c, server.addr, b"f20000");
    c.send_to(&ack(0), tid).unwrap();
    let (first, _) = recv(&c, "DATA 1");
    // Reload: a new generation serves new requests while the old worker finishes this one.
    let out = server.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(wait_until(Duration::from_secs(30), || {
        let w = server.workers();
        w.len() == 2 && w.contains(&old[0])
    }));
    assert_eq!(
        fetch(server.addr, "f20000"),
        original,
        "the new generation serves"
    );
    let mut got = first[4..].to_vec();
    finish(
        &c,
        tid,
        head(&first).1,
        &mut got,
        "DATA from the draining worker",
    );
    assert_eq!(got, original);
    assert!(
        wait_until(Duration::from_secs(30), || !server
            .workers()
            .contains(&old[0])),
        "the old worker exits once its transfer is done"
    );
    // A graceful stop waits for a transfer in progress too.
    let tid = begin_slow(&c, server.addr, b"f20000");
    server.signal(Signal::SIGTERM);
    assert!(server.wait_for_log("draining", Duration::from_secs(30)));
    let mut got = Vec::new();
    finish(&c, tid, 0, &mut got, "DATA while stopping");
    assert_eq!(got, original);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server exits");
    assert!(status.success(), "{status:?}");
}

#[test]
fn tftp_options_that_do_not_fit_are_usage_errors() {
    let dir = common::scratch_dir();
    let d = dir.to_str().unwrap();
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    let f = file.to_str().unwrap();
    for (args, needle) in [
        (vec!["--service", "tftp"], "needs --root"),
        (
            vec!["--service", "tftp", "--root", "/nonexistent/dir"],
            "not a directory",
        ),
        (vec!["--service", "tftp", "--root", f], "not a directory"),
        (vec!["--root", d], "--root is for --service tftp"),
        (vec!["--tftp-write"], "--tftp-write is for --service tftp"),
        (vec!["--service", "tftp", "--root", d, "--udp"], "UDP only"),
    ] {
        let out = common::output_within(Command::new(BIN).args(&args), common::COMMAND);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn an_upload_cut_by_a_stop_is_told_and_leaves_no_partial_file() {
    let root = root_with(&[]);
    for mode in ["process", "thread", "fork-per-conn"] {
        let name = format!("partial-{mode}");
        let mut server = start(mode, &root, &["--tftp-write", "--drain-timeout", "1"]);
        let c = udp_client();
        c.send_to(&request(true, name.as_bytes(), "octet", &[]), server.addr)
            .unwrap();
        let (p, tid) = recv(&c, "ACK 0");
        assert_eq!(head(&p), (4, 0), "{mode}");
        for n in 1..=3u16 {
            let mut d = vec![0, 3];
            d.extend_from_slice(&n.to_be_bytes());
            d.extend_from_slice(&[b'y'; 512]);
            c.send_to(&d, tid).unwrap();
            assert_eq!(head(&recv(&c, "ACK").0), (4, n), "{mode}");
        }
        // Under way, but unseen until complete.
        assert!(
            !root.join(&name).exists(),
            "{mode}: a partial upload is visible"
        );
        // The client goes quiet; the stop's drain deadline passes; the upload is cut.
        server.signal(Signal::SIGTERM);
        let p = loop {
            // The server may first repeat its last ACK (its own timer): skip those.
            let (p, _) = recv(&c, "the server's goodbye");
            if head(&p) != (4, 3) {
                break p;
            }
        };
        assert_eq!(head(&p), (5, 0), "{mode}: {}", String::from_utf8_lossy(&p));
        assert!(
            String::from_utf8_lossy(&p).contains("shutting down"),
            "{mode}"
        );
        let status = server
            .wait_exit(Duration::from_secs(30))
            .expect("the server exits");
        assert!(status.success(), "{mode}: {status:?}");
        assert!(
            !root.join(&name).exists(),
            "{mode}: the partial upload was left behind"
        );
    }
}

#[test]
fn a_server_run_as_a_user_reads_and_writes_only_what_that_user_may() {
    let Some(user) = common::nobody() else { return };
    let root = root_with(&[513]);
    std::fs::write(root.join("root-only"), b"secret").unwrap();
    std::fs::set_permissions(
        root.join("root-only"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let server = start(
        "process",
        &root,
        &["--user", "nobody", "--tftp-write", "--workers", "1"],
    );
    let worker = server.workers()[0];
    assert_eq!(
        common::status(worker).ruid,
        user.uid.as_raw(),
        "the worker serves as nobody"
    );
    assert_eq!(fetch(server.addr, "f513").len(), 513);
    let c = udp_client();
    c.send_to(&request(false, b"root-only", "octet", &[]), server.addr)
        .unwrap();
    assert_eq!(
        head(&recv(&c, "refusal").0),
        (5, 2),
        "a file nobody may not read"
    );
    c.send_to(&request(true, b"upload", "octet", &[]), server.addr)
        .unwrap();
    assert_eq!(
        head(&recv(&c, "refusal").0),
        (5, 2),
        "a directory nobody may not write"
    );
    assert!(!root.join("upload").exists());
}

#[test]
fn a_binary_upgrade_hands_over_the_udp_socket_and_finishes_transfers() {
    let root = root_with(&[20_000]);
    let original = std::fs::read(root.join("f20000")).unwrap();
    let pid_file = root.parent().unwrap().join("tftp.pid");
    let mut server = start(
        "process",
        &root,
        &["--workers", "1", "--pid-file", pid_file.to_str().unwrap()],
    );
    let c = udp_client();
    let tid = begin_slow(&c, server.addr, b"f20000");
    server.signal(Signal::SIGUSR2);
    // The new master serves new requests on the same port while the old worker goes on.
    assert!(wait_until(Duration::from_secs(30), || {
        common::read_pid(&pid_file) != server.pid
    }));
    let new_pid = common::read_pid(&pid_file);
    let _new = common::KillOnDrop::new(new_pid);
    assert_eq!(
        fetch(server.addr, "f20000"),
        original,
        "the new master serves"
    );
    let mut got = Vec::new();
    finish(&c, tid, 0, &mut got, "DATA from the old generation");
    assert_eq!(got, original);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the old master exits");
    assert!(status.success(), "{status:?}\n{}", server.stderr());
    assert_eq!(fetch(server.addr, "f20000"), original);
}
