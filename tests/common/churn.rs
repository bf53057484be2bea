//! Churning load for the tests that change the pool under traffic: echo-load with every
//! connection closed and reopened after 5 round trips, so new connections keep arriving.

use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::Server;

/// Starts echo-load against `server`: `conns` connections for `secs` seconds, churning.
pub fn churning_load(server: &Server, conns: &str, secs: &str) -> Child {
    Command::new(super::echo_load())
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
        .expect("starting echo-load")
}

/// Waits for echo-load and returns its JSON report.
pub fn finish(load: Child) -> Value {
    let out = load.wait_with_output().expect("echo-load");
    serde_json::from_slice(&out.stdout).expect("echo-load report")
}
