//! `--service chat` rules in every mode: control bytes reach others escaped (raw only with
//! `--chat-raw`), `--max-line` counts a line without its CR LF, and a name is held by one
//! client server-wide (across workers, reloads and a killed worker).

mod common;

use std::io::Write;
use std::time::Duration;

use common::chat::{ChatClient, MODES, start};
use common::wait_until;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn control_bytes_reach_the_others_escaped_unless_chat_raw() {
    let forged =
        b"hi\r* admin is now root \x1b]52;c;cm0gLXJmIH4=\x07\x1b[6n\x7f\ttab caf\xc3\xa9\n";
    for mode in MODES {
        for raw in [false, true] {
            let extra: &[&str] = if raw { &["--chat-raw"] } else { &[] };
            let server = start(mode, extra);
            let mut a = ChatClient::connect(server.addr);
            let mut b = ChatClient::connect(server.addr);
            a.nick("a");
            b.nick("b");
            a.stream.write_all(forged).unwrap();
            let got = b.until("a's line", |l| l.starts_with("a: hi"));
            let want = if raw {
                String::from_utf8_lossy(&forged[..forged.len() - 1]).into_owned()
            } else {
                "hi^M* admin is now root ^[]52;c;cm0gLXJmIH4=^G^[[6n^?\ttab caf\u{e9}".into()
            };
            assert_eq!(got, format!("a: {want}"), "{mode}, raw {raw}");
        }
    }
}

#[test]
fn max_line_counts_the_line_without_its_line_end() {
    for mode in MODES {
        let server = start(mode, &["--max-line", "100"]);
        let mut a = ChatClient::connect(server.addr);
        let mut b = ChatClient::connect(server.addr);
        a.nick("a");
        b.nick("b");
        let hundred = "y".repeat(100);
        a.stream
            .write_all(format!("{hundred}\r\n{hundred}\n{hundred}z\r\n").as_bytes())
            .unwrap();
        a.until("the refusal of 101 bytes", |l| {
            l == "* line too long (over 100 bytes); not sent"
        });
        a.say("end");
        b.until("a's last line", |l| l == "a: end");
        let got: Vec<&String> = b.seen.iter().filter(|l| l.starts_with("a: y")).collect();
        assert_eq!(got.len(), 2, "{mode}: {got:?}");
        assert!(got.iter().all(|l| **l == format!("a: {hundred}")), "{mode}");
    }
}

/// Both ask for `name` at once: exactly one gets it; returns (winner, loser).
fn race(mut x: ChatClient, mut y: ChatClient, name: &str, mode: &str) -> (ChatClient, ChatClient) {
    x.say(&format!("/nick {name}"));
    y.say(&format!("/nick {name}"));
    let verdict = |c: &mut ChatClient| {
        let granted = format!("* {} is now {name}", c.guest);
        let refused = format!("* {name} is in use");
        c.until("the answer to /nick", |l| l == granted || l == refused) == granted
    };
    match (verdict(&mut x), verdict(&mut y)) {
        (true, false) => (x, y),
        (false, true) => (y, x),
        both => panic!("{mode}: granted to {both:?}"),
    }
}

/// Asks for `name` until granted (the room hears of a departure a moment later).
fn claim_eventually(c: &mut ChatClient, name: &str) {
    let granted = format!("* {} is now {name}", c.guest);
    let ok = wait_until(Duration::from_secs(20), || {
        c.say(&format!("/nick {name}"));
        let answer = c.until("the answer to /nick", |l| {
            l == granted || l == format!("* {name} is in use")
        });
        answer == granted
    });
    assert!(ok, "{name} was never free again: {:?}", c.seen);
}

#[test]
fn a_name_is_held_by_one_client_server_wide() {
    for mode in MODES {
        let extra: &[&str] = if mode == "process" {
            &["--workers", "2", "--balance", "reuseport"]
        } else {
            &["--workers", "2"]
        };
        let server = start(mode, extra);
        let connect = |slot| {
            if mode == "process" {
                ChatClient::connect_to_slot(server.addr, slot, 2)
            } else {
                ChatClient::connect(server.addr)
            }
        };
        let (x, y) = (connect(0), connect(1));
        let (mut winner, mut loser) = race(x, y, "sam", mode);
        // The loser's name is unchanged, and asking again is refused again.
        loser.say("/nick sam");
        loser.until("a second refusal", |l| l == "* sam is in use");
        // The holder leaves: the name is free.
        winner.say("/quit");
        assert!(winner.closed_by_server());
        claim_eventually(&mut loser, "sam");
        if mode != "process" {
            continue;
        }
        // A client of the next generation cannot take it from the old one.
        server.signal(Signal::SIGHUP);
        assert!(server.wait_for_log("generation 2", Duration::from_secs(30)));
        let port = server.addr.port();
        let held_by = |c: &ChatClient, pid: i32| {
            common::client_ports_held_by(pid, port).contains(&c.stream.local_addr().unwrap().port())
        };
        let generation = |g: u64| -> Vec<i32> {
            let stats = server.stats();
            stats["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["generation"].as_u64() == Some(g))
                .map(|w| w["pid"].as_i64().unwrap() as i32)
                .collect()
        };
        let mut holder = None;
        assert!(wait_until(Duration::from_secs(20), || {
            holder = generation(1).into_iter().find(|&pid| held_by(&loser, pid));
            holder.is_some()
        }));
        let holder = holder.unwrap();
        let mut late = None;
        assert!(
            wait_until(Duration::from_secs(30), || {
                let c = ChatClient::connect(server.addr);
                if generation(2).into_iter().any(|pid| held_by(&c, pid)) {
                    late = Some(c);
                }
                late.is_some()
            }),
            "no connection reached the new generation"
        );
        let mut late = late.unwrap();
        late.say("/nick sam");
        late.until("the refusal across generations", |l| l == "* sam is in use");
        // The holder's worker is killed: the name is free again.
        kill(Pid::from_raw(holder), Signal::SIGKILL).unwrap();
        assert!(loser.closed_by_server(), "the holder outlived its worker");
        claim_eventually(&mut late, "sam");
    }
}

#[test]
fn chat_rate_reads_a_fast_sender_more_slowly_and_loses_nothing() {
    // 60 lines in one write at --chat-rate 20 with a burst of 5: at least 2.75 s to pass
    // them all on, every one of them in order; another client is not held back meanwhile.
    for mode in MODES {
        let server = start(mode, &["--chat-rate", "20", "--chat-burst", "5"]);
        let mut a = ChatClient::connect(server.addr);
        let mut b = ChatClient::connect(server.addr);
        let mut c = ChatClient::connect(server.addr);
        a.nick("a");
        b.nick("b");
        c.nick("c");
        let lines: String = (0..60).map(|i| format!("n{i}\n")).collect();
        let started = std::time::Instant::now();
        a.stream.write_all(lines.as_bytes()).unwrap();
        c.say("meanwhile");
        b.until("c's line", |l| l == "c: meanwhile");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{mode}: c was held back by a's rate"
        );
        b.until("a's last line", |l| l == "a: n59");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2500),
            "{mode}: 60 lines in {took:?}"
        );
        let got: Vec<&String> = b.seen.iter().filter(|l| l.starts_with("a: n")).collect();
        let want: Vec<String> = (0..60).map(|i| format!("a: n{i}")).collect();
        assert_eq!(got, want.iter().collect::<Vec<_>>(), "{mode}");
    }
}
