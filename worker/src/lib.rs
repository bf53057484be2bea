//! The process-mode worker of prefork-echo, and what the master and worker share.
//!
//! - [`event_loop`]: the worker itself, one epoll loop over many connections.
//! - [`connection`]: one echo connection and its back-pressure.
//! - [`ipc`]: the typed, framed channel on which a worker reports to its master.
//! - [`stats`]: the counters carried on that channel.
//! - [`config`]: a worker's settings, shared by fork (in memory) and exec (as flags).
//! - [`log`]: timestamped, role-tagged lines on stderr.
//! - [`udp`]: which datagrams UDP echo refuses (echo loops).

pub mod config;
pub mod connection;
pub mod event_loop;
pub mod ipc;
pub mod log;
pub mod stats;
pub mod udp;

pub use config::WorkerConfig;
pub use event_loop::{EXIT_BOOT_FAILURE, HANDLED_SIGNALS, run};
