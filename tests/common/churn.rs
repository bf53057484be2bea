//! Churning load for the tests that change the pool under traffic: echo-load with every
//! connection closed and reopened after 5 round trips, so new connections keep arriving.

use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::Server;

/// Starts echo-load against `server`: `conns` connections for `secs` seconds, churning;
/// killed if the test ends before [`finish`].
pub fn churning_load(server: &Server, conns: &str, secs: &str) -> Guarded {
    let load = Command::new(super::echo_load())
        .args(["--target", &server.addr.to_string(), "--connections", conns])
        .args([
            "--duration",
            secs,
            "--reconnect-every",
            "5",
            "--size",
            "256",
        ])
        .args(["--threads", "2", "--timeout", "5", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting echo-load");
    Guarded(Some(load))
}

/// An echo-load child killed (and reaped) if the test fails before [`finish`] takes it.
pub struct Guarded(Option<Child>);

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut load) = self.0.take() {
            let _ = load.kill();
            let _ = load.wait();
        }
    }
}

/// Waits until the server has accepted `more` connections past `from` (the churning load
/// being its only client: the load is running now) and returns the count. Read before, during
/// and after what a test does "under load", it shows the load overlapped all of it.
pub fn load_flows(server: &Server, from: u64, more: u64, when: &str) -> u64 {
    let mut now = from;
    assert!(
        super::wait_until(std::time::Duration::from_secs(30), || {
            now = server.stats()["totals"]["accepted"].as_u64().unwrap_or(0);
            now >= from + more
        }),
        "{when}: the load is not running ({now} accepted, {from} before)"
    );
    now
}

/// Waits for echo-load and returns its JSON report.
pub fn finish(mut load: Guarded) -> Value {
    let out = load
        .0
        .take()
        .unwrap()
        .wait_with_output()
        .expect("echo-load");
    serde_json::from_slice(&out.stdout).expect("echo-load report")
}
