//! chat-load against chat servers made here: a faithful one passes; one that drops, repeats
//! or reorders lines, or mangles them, is caught, each under its own name.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;

use serde_json::Value;

const LOAD: &str = env!("CARGO_BIN_EXE_chat-load");

/// A thread-per-client group chat with a fault chosen by `bug`, applied to the lines of the
/// client that connected first.
fn chat_server(bug: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peers: Arc<Mutex<HashMap<usize, TcpStream>>> = Arc::default();
    thread::spawn(move || {
        for (id, s) in listener.incoming().enumerate() {
            let Ok(s) = s else { continue };
            let peers = Arc::clone(&peers);
            peers.lock().unwrap().insert(id, s.try_clone().unwrap());
            thread::spawn(move || {
                let mut out = s.try_clone().unwrap();
                let _ = out.write_all(b"* welcome, x. /nick NAME\n");
                let mut name = format!("guest{id}");
                let mut held: Option<String> = None;
                for (n, line) in BufReader::new(s).lines().map_while(Result::ok).enumerate() {
                    if let Some(new) = line.strip_prefix("/nick ") {
                        let _ = out.write_all(format!("* {name} is now {new}\n").as_bytes());
                        name = new.to_string();
                        continue;
                    }
                    let mut lines = vec![format!("{name}: {line}\n")];
                    if id == 0 && n > 3 {
                        match bug {
                            "drop" if n % 5 == 0 => lines.clear(),
                            "repeat" if n % 5 == 0 => lines.push(lines[0].clone()),
                            "swap" if n % 5 == 0 => {
                                held = lines.pop();
                            }
                            "swap" => lines.extend(held.take()),
                            "mangle" if n % 5 == 0 => lines[0] = lines[0].replace('x', "y"),
                            _ => {}
                        }
                    }
                    for l in lines {
                        for (k, p) in peers.lock().unwrap().iter_mut() {
                            if *k != id {
                                let _ = p.write_all(l.as_bytes());
                            }
                        }
                    }
                }
                peers.lock().unwrap().remove(&id);
            });
        }
    });
    addr
}

fn run(addr: std::net::SocketAddr, extra: &[&str]) -> (Option<i32>, Value) {
    // Under `timeout`: a load generator that hangs fails the test (exit 124), not the suite.
    let out = Command::new("timeout")
        .args(["-k", "5", "120", LOAD])
        .args([
            "--target",
            &addr.to_string(),
            "--clients",
            "3",
            "--duration",
            "1",
        ])
        .args(["--settle", "2", "--json"])
        .args(extra)
        .output()
        .expect("running chat-load");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), report)
}

#[test]
fn a_faithful_chat_passes_and_every_delivery_is_counted() {
    for extra in [&[][..], &["--rate", "50"]] {
        let (code, r) = run(chat_server("none"), extra);
        assert_eq!(code, Some(0), "{r}");
        let (sent, got) = (
            r["sent"].as_u64().unwrap(),
            r["deliveries"].as_u64().unwrap(),
        );
        assert!(sent > 10, "{r}");
        assert_eq!(got, 2 * sent, "each line reaches the two others: {r}");
    }
}

#[test]
fn dropped_repeated_reordered_and_mangled_lines_are_caught() {
    for (bug, field) in [
        ("drop", "lost"),
        ("repeat", "duplicated"),
        ("swap", "out_of_order"),
        ("mangle", "corrupt"),
    ] {
        // Open loop: a sender whose line went missing goes on sending.
        let (code, r) = run(chat_server(bug), &["--rate", "50"]);
        assert_eq!(code, Some(1), "{bug} went unnoticed: {r}");
        assert!(
            r[field].as_u64() > Some(0),
            "{bug} not counted as {field}: {r}"
        );
    }
}

#[test]
fn remote_targets_are_refused() {
    // Under `timeout`: a load generator that hangs fails the test (exit 124), not the suite.
    let out = Command::new("timeout")
        .args(["-k", "5", "120", LOAD])
        .args(["--target", "192.0.2.1:7007"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback only"));
}
