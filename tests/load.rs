//! echo-load against the real server: it must count every round trip when all is well. (How
//! it catches broken servers is tested beside it, in load/tests/.)

mod common;

use std::process::{Command, Output};

use common::Server;
use serde_json::Value;

fn load(args: &[&str]) -> (Output, Value) {
    let out = common::output_within(
        Command::new(common::echo_load()).args(args).arg("--json"),
        std::time::Duration::from_secs(120),
    );
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, report)
}

#[test]
fn counts_verified_round_trips_against_the_server() {
    let server = Server::start(&["--workers", "2"]);
    let target = server.addr.to_string();
    let pid = server.pid.to_string();
    let (out, r) = load(&[
        "--target",
        &target,
        "--connections",
        "20",
        "--size",
        "1000",
        "--requests",
        "2000",
        "--pipeline",
        "4",
        "--threads",
        "2",
        "--server-pid",
        &pid,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["round_trips"], 2000);
    assert_eq!(r["errors"]["total"], 0);
    assert_eq!(r["fairness"]["min"], 100, "every connection did its share");
    assert_eq!(r["first_echo_us"]["answered"], 20);
    assert!(r["latency_us"]["p50"].as_u64().unwrap() > 0);
    assert!(r["server"]["processes"].as_u64().unwrap() >= 3);
    assert!(r["server"]["pss_bytes"].as_u64().unwrap() > 0);
    // What the server counted matches what the generator sent.
    let stats = server.stats();
    assert!(
        common::wait_until(std::time::Duration::from_secs(5), || {
            server.stats()["totals"]["bytes_in"].as_u64() == Some(2000 * 1000)
        }),
        "{stats}"
    );
}

#[test]
fn churn_and_open_loop_and_burst_modes_complete_cleanly() {
    let server = Server::start(&["--workers", "2"]);
    let target = server.addr.to_string();
    for extra in [
        &["--requests", "600", "--reconnect-every", "5"][..],
        &["--rate", "2000", "--duration", "0.5"],
        &["--connect-burst", "--requests", "300"],
    ] {
        let (out, r) = load(&[&["--target", &target, "--connections", "30"][..], extra].concat());
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(r["errors"]["total"], 0, "{extra:?}");
        assert!(r["round_trips"].as_u64().unwrap() > 0);
        if extra.contains(&"--reconnect-every") {
            assert_eq!(
                r["connections_opened"],
                600 / 5,
                "one connection per 5 round trips"
            );
        }
    }
}
