//! echo-load against broken echo servers made here: it must catch every kind of failure
//! (a wrong byte, a short echo, silence, a refused connection) and refuse remote targets.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::thread;

use serde_json::Value;

const LOAD: &str = env!("CARGO_BIN_EXE_echo-load");

fn load(args: &[&str]) -> (Output, Value) {
    // Under `timeout`: a load generator that hangs fails the test (exit 124), not the suite.
    let out = Command::new("timeout")
        .args(["-k", "5", "120", LOAD])
        .args(args)
        .arg("--json")
        .output()
        .expect("running echo-load");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, report)
}

/// An "echo" server that mangles what it returns, in a way chosen by `bug`.
fn broken_server(bug: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for s in listener
            .incoming()
            .take(if bug == "faithful" { 64 } else { 4 })
        {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = 0usize;
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    seen += n;
                    match bug {
                        "flip" => {
                            if seen > 300 {
                                buf[0] ^= 1;
                            }
                            let _ = s.write_all(&buf[..n]);
                        }
                        "close" if seen > 300 => return,
                        "close" | "faithful" => {
                            let _ = s.write_all(&buf[..n]);
                        }
                        _ => {} // "silent": never answers
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn catches_wrong_and_short_echoes_and_silence() {
    for shape in ["events", "threads"] {
        for (bug, kind) in [("flip", "wrong"), ("close", "short"), ("silent", "timeout")] {
            let addr = broken_server(bug).to_string();
            let (out, r) = load(&[
                "--target",
                &addr,
                "--connections",
                "2",
                "--size",
                "100",
                "--duration",
                "3",
                "--timeout",
                "0.5",
                "--shape",
                shape,
            ]);
            assert_eq!(out.status.code(), Some(1), "{shape} {bug}");
            assert!(
                r["errors"][kind].as_u64().unwrap() >= 1,
                "{shape} {bug}: {r}"
            );
        }
    }
}

/// The thread-per-connection shape counts exactly what it was asked for, pipelined or not,
/// and says which shape it ran.
#[test]
fn the_threads_shape_counts_every_verified_round_trip() {
    for pipeline in ["1", "4"] {
        let addr = broken_server("faithful").to_string();
        let (out, r) = load(&[
            "--target",
            &addr,
            "--connections",
            "8",
            "--size",
            "300",
            "--requests",
            "1600",
            "--pipeline",
            pipeline,
            "--shape",
            "threads",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(r["shape"], "threads");
        assert_eq!(r["round_trips"], 1600, "pipeline {pipeline}: {r}");
        assert_eq!(r["fairness"]["min"], 200, "every connection did its share");
        assert_eq!(r["first_echo_us"]["answered"], 8);
        assert_eq!(r["errors"]["total"], 0);
    }
    // Open loop is the event loop's alone.
    let out = Command::new(LOAD)
        .args([
            "--shape",
            "threads",
            "--rate",
            "100",
            "--target",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("closed loop only"));
}

#[test]
fn refused_connections_are_counted_and_remote_targets_refused() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (out, r) = load(&[
        "--target",
        &format!("127.0.0.1:{port}"),
        "--connections",
        "3",
        "--requests",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(r["errors"]["refused"], 3);
    // Under `timeout`: a load generator that hangs fails the test (exit 124), not the suite.
    let out = Command::new("timeout")
        .args(["-k", "5", "120", LOAD])
        .args(["--target", "192.0.2.1:7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}
