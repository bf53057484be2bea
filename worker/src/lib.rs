//! The process-mode worker of prefork-echo. What it shares with the master (IPC frames,
//! counters, log lines) is in the `protocol` crate.
//!
//! - [`event_loop`]: the worker itself, one epoll loop over many connections, generic over
//!   the service it speaks (echo connections on io_uring with `--io uring`).
//! - [`service`]: the service interface every concurrency model drives.
//! - [`echo`]: the echo service (TCP and UDP).
//! - [`tftp`]: the TFTP service (UDP, a transfer per request).
//! - [`chat`]: the group chat service (lines fanned out to every client, across workers).
//! - [`exchange`]: driving a service's per-request conversations with blocking waits.
//! - [`proxy`]: the PROXY protocol header a load balancer sends first.
//! - [`config`]: a worker's settings, shared by fork (in memory) and exec (as flags).

pub mod chat;
pub mod config;
pub mod echo;
pub mod event_loop;
pub mod exchange;
pub mod exchange_registry;
pub mod proxy;
pub mod service;
pub mod tftp;

pub use config::WorkerConfig;
pub use event_loop::{EXIT_BOOT_FAILURE, HANDLED_SIGNALS, run};
