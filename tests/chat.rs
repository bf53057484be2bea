//! `--service chat` in every mode, with real sockets: clients on different workers see each
//! other's lines whole and in order, commands answer, slow readers are dropped without
//! slowing anyone, and reloads and crashed workers lose nothing but the crashed worker's own
//! clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::chat::{ChatClient, MODES, busy_workers, start};
use common::{Server, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Three clients, each (in process mode) on a worker of its own, named a, b, c.
fn three_clients(server: &Server, mode: &str) -> Vec<ChatClient> {
    let mut clients: Vec<ChatClient> = if mode == "process" {
        (0..3)
            .map(|slot| ChatClient::connect_to_slot(server.addr, slot, 3))
            .collect()
    } else {
        (0..3).map(|_| ChatClient::connect(server.addr)).collect()
    };
    for (c, name) in clients.iter_mut().zip(["a", "b", "c"]) {
        c.nick(name);
    }
    let who = clients[0].wait_for_who("* 3 connected: a, b, c");
    assert!(who.starts_with("* 3 connected: a, b, c"), "{who}");
    if mode == "process" {
        let mut busy = Vec::new();
        assert!(
            wait_until(Duration::from_secs(20), || {
                busy = busy_workers(&server.stats());
                busy.len() == 3
            }),
            "the three clients are not on three workers: {busy:?}"
        );
    }
    clients
}

/// The lines from `sender` among `lines`, in order.
fn from<'a>(lines: &'a [String], sender: &str) -> Vec<&'a str> {
    let prefix = format!("{sender}: ");
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect()
}

#[test]
fn clients_on_different_workers_see_each_others_lines_whole_and_in_order() {
    // Exec'd workers too: they find their bus by the descriptor named on their command line.
    let runs = MODES
        .iter()
        .map(|&m| (m, "fork"))
        .chain([("process", "exec")]);
    for (mode, spawn) in runs {
        let server = start(
            mode,
            &[
                "--workers",
                "3",
                "--balance",
                balance(mode),
                "--spawn",
                spawn,
            ],
        );
        let mut c = three_clients(&server, mode);
        const N: usize = 50;
        for i in 0..N {
            for (k, name) in ["a", "b", "c"].iter().enumerate() {
                c[k].say(&format!("line {i} from {name}"));
            }
        }
        for (k, me) in ["a", "b", "c"].iter().enumerate() {
            let mut got = Vec::new();
            let others: Vec<&str> = ["a", "b", "c"].into_iter().filter(|n| n != me).collect();
            while others.iter().any(|o| from(&got, o).len() < N) {
                match c[k].line() {
                    Some(l) => got.push(l),
                    None => panic!("{mode}: {me} stopped hearing after {got:?}"),
                }
            }
            for o in &others {
                let want: Vec<String> = (0..N).map(|i| format!("line {i} from {o}")).collect();
                assert_eq!(from(&got, o), want, "{mode}: what {me} heard from {o}");
            }
            assert!(from(&got, me).is_empty(), "{mode}: {me} heard itself");
        }
        // /quit: a goodbye, the connection closes, and the others are told.
        c[2].say("/quit");
        c[2].until("the goodbye", |l| l == "* bye");
        assert!(c[2].closed_by_server(), "{mode}: still open after /quit");
        c[0].until("c's leave notice", |l| l == "* c left");
        c[1].until("c's leave notice", |l| l == "* c left");
        let who = c[1].wait_for_who("* 2 connected: a, b");
        assert!(who.starts_with("* 2 connected: a, b"), "{mode}: {who}");
        // The stats add up: every line counted, each delivered to the two others (a
        // fork-per-conn child reports as it exits).
        drop(c);
        let mut totals = serde_json::Value::Null;
        let ok = wait_until(Duration::from_secs(20), || {
            totals = server.stats()["totals"].clone();
            totals["chat_lines"].as_u64() >= Some(3 * N as u64)
                && totals["chat_deliveries"].as_u64() >= Some(3 * N as u64 * 2)
        });
        assert!(ok, "{mode}: the chat counters do not add up: {totals}");
        if mode == "process" {
            assert!(totals["bus_out"].as_u64() >= Some(3 * N as u64), "{totals}");
            assert!(
                totals["bus_in"].as_u64() >= Some(3 * N as u64 * 2),
                "{totals}"
            );
        }
    }
}

fn balance(mode: &str) -> &'static str {
    if mode == "process" {
        "reuseport"
    } else {
        "shared"
    }
}

#[test]
fn a_client_that_never_reads_is_dropped_and_the_others_keep_flowing() {
    for mode in MODES {
        let server = start(
            mode,
            &[
                "--workers",
                "2",
                "--max-unsent",
                "65536",
                "--chat-hard-limit",
                "262144",
            ],
        );
        let mut a = ChatClient::connect(server.addr);
        let mut b = ChatClient::connect(server.addr);
        a.nick("a");
        b.nick("b");
        let mut sleeper = TcpStream::connect(server.addr).unwrap();
        b.wait_for_who("* 3 connected");
        let pad = "x".repeat(200);
        let mut sent = 0;
        // Lock-step batches, so b keeps up while the sleeper falls behind.
        let dropped = wait_until(Duration::from_secs(60), || {
            for _ in 0..200 {
                a.say(&format!("{sent} {pad}"));
                sent += 1;
            }
            let want = format!("a: {} {pad}", sent - 1);
            b.until("a's latest line", |l| l == want);
            server.stats()["totals"]["slow_consumers"].as_u64() >= Some(1)
        });
        assert!(
            dropped,
            "{mode}: the sleeper was never dropped after {sent} lines"
        );
        let got = from(&b.seen, "a");
        assert_eq!(got.len(), sent, "{mode}: b missed lines");
        for (i, l) in got.iter().enumerate() {
            assert!(
                l.starts_with(&format!("{i} ")),
                "{mode}: out of order at {i}: {l}"
            );
        }
        // The sleeper's connection ends (after what its buffers held); memory stayed bounded.
        // (The `* disconnected` notice is sent only if the sleeper's full socket takes it, so
        // it is not required here.)
        let total = common::read_until_closed(
            &mut sleeper,
            Duration::from_secs(20),
            &format!("{mode}: the dropped sleeper"),
        )
        .len();
        assert!(total < sent * 220, "{mode}: the sleeper got everything");
        // And the others still chat.
        b.say("still here");
        a.until("b's line", |l| l == "b: still here");
    }
}

#[test]
fn long_lines_garbage_and_cut_lines_are_harmless() {
    for mode in MODES {
        let server = start(mode, &["--workers", "2", "--max-line", "100"]);
        let workers = server.workers();
        let mut a = ChatClient::connect(server.addr);
        let mut b = ChatClient::connect(server.addr);
        a.nick("a");
        b.nick("b");
        a.say(&"y".repeat(150));
        a.until("the refusal", |l| {
            l == "* line too long (over 100 bytes); not sent"
        });
        a.say("short");
        b.until("a's short line", |l| l == "a: short");
        assert!(
            !b.seen.iter().any(|l| l.contains("yyy")),
            "{mode}: the long line went out: {:?}",
            b.seen
        );
        // Binary garbage with and without line ends, and clients cut mid-line.
        let mut rng = common::Rng::new(7);
        for _ in 0..20 {
            let mut g = TcpStream::connect(server.addr).unwrap();
            let len = rng.range(1, 3000);
            let _ = g.write_all(&rng.bytes(len));
            drop(g);
        }
        a.say("after the garbage");
        b.until("a's line after the garbage", |l| {
            l == "a: after the garbage"
        });
        if mode == "process" {
            assert_eq!(server.workers(), workers, "{mode}: a worker died");
        }
        assert!(common::alive(server.pid));
    }
}

#[test]
fn a_reload_under_chat_traffic_loses_nothing_across_generations() {
    let server = start("process", &["--workers", "2"]);
    let mut a = ChatClient::connect(server.addr);
    let mut b = ChatClient::connect(server.addr);
    a.nick("a");
    b.nick("b");
    b.wait_for_who("* 2 connected: a, b");
    const N: usize = 400;
    let mut a_stream = a.stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for i in 0..N {
            a_stream.write_all(format!("seq {i}\n").as_bytes()).unwrap();
            thread::sleep(Duration::from_millis(5));
        }
    });
    server.signal(Signal::SIGHUP);
    assert!(server.wait_for_log("generation 2", Duration::from_secs(30)));
    // A client of the new generation hears the old one's clients, and they hear it.
    let mut c = ChatClient::connect(server.addr);
    c.nick("c");
    sender.join().unwrap();
    let last = format!("a: seq {}", N - 1);
    b.until("a's last line", |l| l == last);
    let got = from(&b.seen, "a");
    let want: Vec<String> = (0..N).map(|i| format!("seq {i}")).collect();
    assert_eq!(
        got, want,
        "b missed or reordered a's lines across the reload"
    );
    c.until("a's last line, on the new generation", |l| l == last);
    c.say("hello old generation");
    a.until("c's line", |l| l == "c: hello old generation");
    b.until("c's line", |l| l == "c: hello old generation");
    let who = c.wait_for_who("* 3 connected: a, b, c");
    assert!(who.starts_with("* 3 connected: a, b, c"), "{who}");
}

#[test]
fn a_killed_worker_loses_only_its_own_clients() {
    let server = start("process", &["--workers", "3", "--balance", "reuseport"]);
    let mut c = three_clients(&server, "process");
    let stats = server.stats();
    // c is on slot 2's worker.
    let victim = stats["workers"][2]["pid"].as_i64().unwrap() as i32;
    assert_eq!(stats["workers"][2]["counters"]["active"].as_u64(), Some(1));
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    c[0].until("c's leave notice", |l| l == "* c left");
    c[1].until("c's leave notice", |l| l == "* c left");
    assert!(
        c[2].closed_by_server(),
        "c's connection outlived its worker"
    );
    c[0].say("still chatting");
    c[1].until("a's line", |l| l == "a: still chatting");
    c[1].say("me too");
    c[0].until("b's line", |l| l == "b: me too");
    // The slot is refilled, and its new clients join the same room.
    assert!(wait_until(Duration::from_secs(30), || {
        server.workers().len() == 3 && !server.workers().contains(&victim)
    }));
    let mut d = ChatClient::connect_to_slot(server.addr, 2, 3);
    d.nick("d");
    let who = d.wait_for_who("* 3 connected: a, b, d");
    assert!(who.starts_with("* 3 connected: a, b, d"), "{who}");
    c[0].say("welcome d");
    d.until("a's line", |l| l == "a: welcome d");
}

/// A tool run as a chat client: lines in on stdin, what it prints collected.
struct Tool {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Tool {
    /// `None` (a counted skip) when `program` is not installed; a tool that is installed
    /// but cannot be started fails the test.
    fn start(program: &str, args: &[String]) -> Option<Tool> {
        if !common::have_tool(program) {
            return None;
        }
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (mut pipe, sink) = (child.stdout.take().unwrap(), out.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Some(Tool { child, out })
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn heard(&self, needle: &str) -> bool {
        wait_until(Duration::from_secs(20), || {
            self.out.lock().unwrap().contains(needle)
        })
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nc_socat_telnet_and_the_tutorials_client_chat_together() {
    for mode in MODES {
        let server = start(mode, &["--workers", "2"]);
        let (host, port) = (server.addr.ip().to_string(), server.addr.port().to_string());
        let tutorial = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/tutorial_chat.py"
        );
        let tools: Vec<(&str, Vec<String>)> = vec![
            ("nc", vec![host.clone(), port.clone()]),
            ("socat", vec!["-".into(), format!("TCP:{host}:{port}")]),
            ("telnet", vec![host.clone(), port.clone()]),
            (
                "python3",
                vec!["-u".into(), tutorial.into(), host.clone(), port.clone()],
            ),
        ];
        let mut me = ChatClient::connect(server.addr);
        me.nick("rust");
        let mut running = Vec::new();
        for (program, args) in &tools {
            if let Some(t) = Tool::start(program, args) {
                running.push((*program, t));
            }
        }
        if running.is_empty() {
            return; // each missing tool was a counted skip
        }
        me.wait_for_who(&format!("* {} connected", 1 + running.len()));
        for (name, t) in running.iter_mut() {
            t.say(&format!("/nick {}", name.replace("python3", "tutorial")));
            t.say(&format!("hello from {name}"));
        }
        for (name, _) in &running {
            let nick = name.replace("python3", "tutorial");
            me.until(&format!("{name}'s line"), |l| {
                l == format!("{nick}: hello from {name}")
            });
        }
        me.say("hello tools");
        for (name, t) in &running {
            assert!(
                t.heard("rust: hello tools"),
                "{mode}: {name} did not hear it"
            );
        }
    }
}
