//! `--service tftp` with the real clients people use (tftp-hpa's `tftp`, `atftp`, `curl`) and
//! the seed tutorial's downloader, in every mode: every file byte for byte, block numbers past
//! 65,535, options, netascii, uploads, and the stats that count them.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::tftp::*;
use common::{Server, wait_until};

fn start(mode: &str, root: &Path, extra: &[&str]) -> Server {
    let root = root.to_str().unwrap();
    let mut args = vec![
        "--service",
        "tftp",
        "--root",
        root,
        "--mode",
        mode,
        "--workers",
        "2",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--stats-interval", "0.2"]);
    Server::start(&args)
}

/// Waits until the totals show `done` finished transfers and returns them.
fn totals_after(server: &Server, done: u64) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        last = server.stats()["totals"].clone();
        last["transfers_done"].as_u64() >= Some(done)
    });
    assert!(ok, "expected {done} finished transfers, stats say {last}");
    last
}

/// A real client: its name, the tool it needs, and how it downloads REMOTE to LOCAL.
type Client = (
    &'static str,
    &'static str,
    fn(SocketAddr, &str, &Path) -> Output,
);

/// Every real client, in the ways people run them.
const CLIENTS: [Client; 7] = [
    ("tftp-hpa", "tftp", tftp_hpa_get),
    ("atftp", "atftp", |a, r, l| atftp_get(a, r, l, &[])),
    ("atftp windowed", "atftp", |a, r, l| {
        atftp_get(a, r, l, &["blksize 1468", "windowsize 16", "tsize 0"])
    }),
    // A window of 128 KiB, wider than one 64 KiB send: the server splits it.
    ("atftp wide", "atftp", |a, r, l| {
        atftp_get(a, r, l, &["blksize 8192", "windowsize 16"])
    }),
    ("curl", "curl", |a, r, l| curl_get(a, r, l, None)),
    ("curl blksize 1468", "curl", |a, r, l| {
        curl_get(a, r, l, Some(1468))
    }),
    ("tutorial", "python3", tutorial_get),
];

/// Every size with every real client, the 40 MiB file (81,920 blocks of 512 bytes: block
/// numbers wrap past 65,535) included, in one mode; then the stats add up.
fn downloads(mode: &str) {
    let mut sizes = SIZES.to_vec();
    sizes.push(BIG);
    let root = root_with(&sizes);
    let server = start(mode, &root, &[]);
    let out = root.parent().unwrap().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (mut done, mut bytes) = (0u64, 0u64);
    for (client, tool, get) in CLIENTS {
        if !have(tool) {
            continue; // a counted skip (a failure on CI, which installs it)
        }
        for &n in &sizes {
            let name = format!("f{n}");
            let local = out.join(format!("{client}-{n}"));
            let o = get(server.addr, &name, &local);
            assert_same(
                &format!("{mode}: {client} {name}"),
                &o,
                &local,
                &root.join(&name),
            );
            // The tutorial never acknowledges the last block: the server keeps offering it
            // until it gives up, so its transfers end as failed, the file complete.
            if client != "tutorial" {
                done += 1;
                bytes += n as u64;
            }
        }
    }
    if done == 0 {
        return; // no client that finishes its transfers ran: each was a counted skip
    }
    let t = totals_after(&server, done);
    assert_eq!(t["transfers_done"].as_u64(), Some(done), "{t}");
    assert!(t["transfer_bytes"].as_u64() >= Some(bytes), "{t}");
    assert_eq!(t["io_errors"].as_u64(), Some(0), "{t}");
}

#[test]
fn real_clients_download_every_size_in_process_mode() {
    downloads("process");
}

#[test]
fn real_clients_download_every_size_in_thread_mode() {
    downloads("thread");
}

#[test]
fn real_clients_download_every_size_in_fork_per_conn_mode() {
    downloads("fork-per-conn");
}

#[test]
fn exec_workers_serve_tftp_too() {
    let root = root_with(&[513, 1 << 20]);
    let server = start("process", &root, &["--spawn", "exec"]);
    if have("curl") {
        let local = root.parent().unwrap().join("got");
        let o = curl_get(server.addr, "f1048576", &local, Some(1468));
        assert_same("exec worker: curl", &o, &local, &root.join("f1048576"));
    }
    // The raw way, with no client needed: a request, every block acknowledged.
    let c = udp_client();
    c.send_to(&request(false, b"f513", "octet", &[]), server.addr)
        .unwrap();
    let mut got = Vec::new();
    loop {
        let (p, from) = recv(&c, "DATA");
        assert_eq!(head(&p).0, 3, "{p:?}");
        got.extend_from_slice(&p[4..]);
        c.send_to(&ack(head(&p).1), from).unwrap();
        if p.len() < 516 {
            break;
        }
    }
    assert_eq!(got, std::fs::read(root.join("f513")).unwrap());
}

#[test]
fn netascii_downloads_arrive_as_local_text() {
    let root = root_with(&[]);
    let text = "line one\nline two\r\nbare\rcarriage\n".repeat(200);
    std::fs::write(root.join("notes.txt"), &text).unwrap();
    let server = start("process", &root, &[]);
    // On the wire: lines end in CR LF, a lone CR travels as CR NUL.
    let c = udp_client();
    c.send_to(&request(false, b"notes.txt", "netascii", &[]), server.addr)
        .unwrap();
    let mut wire = Vec::new();
    loop {
        let (p, from) = recv(&c, "netascii DATA");
        wire.extend_from_slice(&p[4..]);
        c.send_to(&ack(head(&p).1), from).unwrap();
        if p.len() < 516 {
            break;
        }
    }
    let expected = text.replace('\r', "\r\0").replace('\n', "\r\n");
    assert_eq!(String::from_utf8_lossy(&wire), expected);
    if have("tftp") {
        let out = root.parent().unwrap();
        let o = tftp_hpa(
            server.addr,
            "ascii\nrexmt 1\nget notes.txt notes.local",
            out,
        );
        assert_same(
            "tftp-hpa ascii",
            &o,
            &out.join("notes.local"),
            &root.join("notes.txt"),
        );
    }
}

#[test]
fn uploads_create_new_files_only_and_only_when_allowed() {
    let root = root_with(&[513]);
    let out = root.parent().unwrap().to_path_buf();
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(out.join("up.bin"), &payload).unwrap();

    // Off by default: a write request is an access violation and nothing is created.
    let server = start("process", &root, &[]);
    let c = udp_client();
    c.send_to(&request(true, b"new.bin", "octet", &[]), server.addr)
        .unwrap();
    let (p, _) = recv(&c, "the refusal of a write");
    assert_eq!(head(&p), (5, 2), "{}", String::from_utf8_lossy(&p));
    assert!(!root.join("new.bin").exists());
    drop(server);

    let server = start(
        "thread",
        &root,
        &["--tftp-write", "--tftp-max-file", "100000"],
    );
    if have("tftp") {
        let o = tftp_hpa(server.addr, "binary\nrexmt 1\nput up.bin new.bin", &out);
        assert_same(
            "tftp-hpa put",
            &o,
            &root.join("new.bin"),
            &out.join("up.bin"),
        );
        // Never overwritten: the second upload is refused with "file already exists".
        let o = tftp_hpa(server.addr, "binary\nrexmt 1\nput f513 new.bin", &root);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Error code 6")
                || String::from_utf8_lossy(&o.stderr).contains("Error code 6"),
            "{o:?}"
        );
        assert_eq!(std::fs::read(root.join("new.bin")).unwrap(), payload);
    }
    let refused = |name: &[u8], options: &[(&str, &str)]| {
        c.send_to(&request(true, name, "octet", options), server.addr)
            .unwrap();
        let (p, _) = recv(&c, "a refused write");
        head(&p)
    };
    assert_eq!(refused(b"f513", &[]), (5, 6));
    assert_eq!(refused(b"../escape", &[]), (5, 2));
    assert_eq!(refused(b"/tmp/escape", &[]), (5, 2));
    assert_eq!(refused(b"big", &[("tsize", "100001")]), (5, 3));
    assert!(!root.parent().unwrap().join("escape").exists());
    // Beyond --tftp-max-file mid-way: refused with "disk full" and the partial file removed.
    c.send_to(&request(true, b"grows", "octet", &[]), server.addr)
        .unwrap();
    let (p, tid) = recv(&c, "ACK 0");
    assert_eq!(head(&p), (4, 0));
    let block = vec![b'x'; 512];
    let mut answer = (0, 0);
    for n in 1..=250u16 {
        let mut d = vec![0, 3];
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&block);
        c.send_to(&d, tid).unwrap();
        let (p, _) = recv(&c, "ACK or ERROR");
        answer = head(&p);
        if answer.0 == 5 {
            break;
        }
        assert_eq!(answer, (4, n));
    }
    assert_eq!(
        answer,
        (5, 3),
        "the upload past 100000 bytes must be refused"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !root.join("grows").exists()),
        "the partial upload was left behind"
    );
}
