//! The process-mode worker of prefork-echo. What it shares with the master (IPC frames,
//! counters, log lines) is in the `protocol` crate.
//!
//! - [`event_loop`]: the worker itself, one epoll loop over many connections.
//! - [`connection`]: one echo connection and its back-pressure.
//! - [`config`]: a worker's settings, shared by fork (in memory) and exec (as flags).
//! - [`udp`]: which datagrams UDP echo refuses (echo loops).

pub mod config;
pub mod connection;
pub mod event_loop;
pub mod udp;

pub use config::WorkerConfig;
pub use event_loop::{EXIT_BOOT_FAILURE, HANDLED_SIGNALS, run};
