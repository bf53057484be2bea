//! tftp-load against TFTP servers made here: a faithful one passes (exit 0), and one that
//! flips a byte, ends a file early, answers with an error or never answers is caught (exit 1,
//! counted as errors, no transfer counted as good); remote targets are refused.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::thread;
use std::time::Duration;

use serde_json::Value;

const LOAD: &str = env!("CARGO_BIN_EXE_tftp-load");
/// The served file: five full 512-byte blocks and a short last one.
const SIZE: usize = 5 * 512 + 440;

fn original() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 31 + i / 509) as u8).collect()
}

/// tftp-load with `args`, killed by `timeout` if it outlives a minute (a hang fails the test
/// with exit code 124, instead of hanging the suite).
fn load(args: &[&str]) -> (Output, Value) {
    let out = Command::new("timeout")
        .args(["-k", "5", "60", LOAD])
        .args(args)
        .arg("--json")
        .output()
        .expect("running tftp-load under timeout");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, report)
}

/// A lock-step TFTP server (no options) serving [`original`] under any name, with a fault
/// chosen by `bug`: "none", "flip" (one byte of block 3 changed), "short" (the file ends
/// after block 2), "error" (ERROR 1 to every request), "silent" (never answers).
fn tftp_server(bug: &'static str) -> SocketAddr {
    let requests = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = requests.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok((_, client)) = requests.recv_from(&mut buf) {
            match bug {
                "silent" => continue,
                "error" => {
                    let _ = requests.send_to(b"\0\x05\0\x01File not found\0", client);
                    continue;
                }
                _ => {}
            }
            thread::spawn(move || serve(client, bug));
        }
    });
    addr
}

/// One transfer from a socket of its own: every block until acknowledged (1 s timer, five
/// tries), as RFC 1350 has it.
fn serve(client: SocketAddr, bug: &str) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut file = original();
    if bug == "flip" {
        file[2 * 512 + 7] ^= 0x20;
    }
    let blocks: Vec<&[u8]> = if bug == "short" {
        file[..2 * 512 + 100].chunks(512).collect()
    } else {
        file.chunks(512).collect()
    };
    let mut buf = [0u8; 64];
    for (i, data) in blocks.iter().enumerate() {
        let block = (i + 1) as u16;
        let mut p = vec![0, 3];
        p.extend_from_slice(&block.to_be_bytes());
        p.extend_from_slice(data);
        let acked = (0..5).any(|_| {
            let _ = sock.send_to(&p, client);
            matches!(sock.recv_from(&mut buf), Ok((4, _)) if buf[..4] == [0, 4, p[2], p[3]])
        });
        if !acked {
            return;
        }
    }
}

/// A local copy of the original for `--verify`, one per call (tests run in parallel).
fn verify_file() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("tftp-load-verify-{}-{n}", std::process::id()));
    std::fs::write(&path, original()).unwrap();
    path
}

fn run_against(bug: &'static str) -> (Output, Value) {
    let addr = tftp_server(bug).to_string();
    let verify = verify_file();
    let got = load(&[
        "--target",
        &addr,
        "--file",
        "f",
        "--verify",
        verify.to_str().unwrap(),
        "--duration",
        "1",
        "--timeout",
        "0.2",
    ]);
    let _ = std::fs::remove_file(&verify);
    got
}

#[test]
fn a_faithful_server_passes() {
    let (out, r) = run_against("none");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{r}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(r["transfers"].as_u64() > Some(0), "{r}");
    assert_eq!(r["errors"], 0, "{r}");
}

#[test]
fn wrong_short_refused_and_silent_transfers_are_caught() {
    for (bug, says) in [
        ("flip", "wrong content"),
        ("short", "wrong content"),
        ("error", "server error 1"),
        ("silent", "timeout"),
    ] {
        let (out, r) = run_against(bug);
        assert_eq!(out.status.code(), Some(1), "{bug}: {r}");
        assert!(r["errors"].as_u64() > Some(0), "{bug}: {r}");
        assert_eq!(r["transfers"], 0, "{bug}: counted as good: {r}");
        let first = r["first_error"].as_str().unwrap_or_default();
        assert!(first.contains(says), "{bug}: {first:?}");
    }
}

#[test]
fn remote_targets_are_refused() {
    let verify = verify_file();
    let out = Command::new("timeout")
        .args(["-k", "5", "60", LOAD])
        .args(["--target", "192.0.2.1:69", "--file", "f", "--verify"])
        .arg(&verify)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&verify);
    // Its documented code for a usage error.
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
