//! The TFTP retransmission schedule the README promises, measured on the wire in every mode:
//! a client that has acknowledged a block and then goes silent is sent the next block again
//! after 1, 2, 4, 8 and 8 timeouts (at 1, 3, 7, 15 and 23 s with a 1 s timeout), and eight
//! timeouts after the last (31 s) the transfer is given up and counted in `transfers_failed`.
//! (The first packets to a peer that has never answered are another engineer's budget; this
//! peer has answered.)

mod common;

use std::time::{Duration, Instant};

use common::tftp::*;
use common::{Server, wait_until};

/// Seconds after the first send at which each retransmission is due, with a 1 s timeout.
const DUE: [f64; 5] = [1.0, 3.0, 7.0, 15.0, 23.0];
/// When the transfer is given up.
const GIVE_UP: f64 = 31.0;

fn schedule(mode: &str) {
    let root = root_with(&[5000]);
    let server = Server::start(&[
        "--service",
        "tftp",
        "--root",
        root.to_str().unwrap(),
        "--mode",
        mode,
        "--workers",
        "1",
        "--stats-interval",
        "0.2",
    ]);
    let c = udp_client();
    c.send_to(
        &request(false, b"f5000", "octet", &[("timeout", "1")]),
        server.addr,
    )
    .unwrap();
    let (oack, tid) = recv(&c, "OACK");
    assert_eq!(head(&oack).0, 6, "{mode}: {oack:?}");
    c.send_to(&ack(0), tid).unwrap();
    let (p, _) = recv(&c, "DATA 1");
    assert_eq!(head(&p), (3, 1), "{mode}");
    // Block 1 acknowledged: the peer is proven. Then silence.
    c.send_to(&ack(1), tid).unwrap();
    let (p, _) = recv(&c, "DATA 2");
    let first = Instant::now();
    assert_eq!(head(&p), (3, 2), "{mode}");
    let mut seen = Vec::new();
    // Short waits, so the "still alive" check below runs close to its moment (a 2 s wait
    // could put it past the give-up itself).
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 1024];
    // Everything that arrives until well past the give-up time; shortly before it, the
    // transfer must still be alive (not given up early).
    let mut checked_alive = false;
    while first.elapsed() < Duration::from_secs_f64(GIVE_UP + 4.0) {
        if !checked_alive && first.elapsed() > Duration::from_secs_f64(GIVE_UP - 2.0) {
            let t = server.stats()["totals"].clone();
            assert_eq!(
                t["transfers_failed"].as_u64(),
                Some(0),
                "{mode}: given up early: {t}"
            );
            checked_alive = true;
        }
        if let Ok((n, from)) = c.recv_from(&mut buf) {
            assert_eq!(from, tid, "{mode}");
            assert_eq!(head(&buf[..n]), (3, 2), "{mode}: only DATA 2 again");
            seen.push(first.elapsed().as_secs_f64());
        }
    }
    assert_eq!(
        seen.len(),
        DUE.len(),
        "{mode}: retransmissions at {seen:?}, the README says at {DUE:?}"
    );
    for (at, due) in seen.iter().zip(DUE) {
        // Never early; late by at most 2 s on this loaded machine.
        assert!(
            *at >= due - 0.05 && *at <= due + 2.0,
            "{mode}: a retransmission due at {due} s came at {at:.2} s ({seen:?})"
        );
    }
    let mut t = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(20), || {
            t = server.stats()["totals"].clone();
            t["transfers_failed"].as_u64() == Some(1)
        }),
        "{mode}: the silent transfer was never given up: {t}"
    );
    assert_eq!(t["retransmits"].as_u64(), Some(DUE.len() as u64), "{t}");
    assert_eq!(t["transfers_done"].as_u64(), Some(0), "{t}");
}

#[test]
fn a_silent_peer_is_resent_to_on_schedule_then_given_up_in_process_mode() {
    schedule("process");
}

#[test]
fn a_silent_peer_is_resent_to_on_schedule_then_given_up_in_thread_mode() {
    schedule("thread");
}

#[test]
fn a_silent_peer_is_resent_to_on_schedule_then_given_up_in_fork_per_conn_mode() {
    schedule("fork-per-conn");
}
