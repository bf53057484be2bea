//! What every process of prefork-echo shares, and nothing else: the master/worker IPC
//! frames, the traffic counters they carry, log lines, and how durations are read. No command
//! line parsing here (clap stays with the binaries), so any process or tool can speak it.
//!
//! - [`ipc`]: the typed, framed channel on which a worker reports to its master.
//! - [`stats`]: the counters carried on that channel.
//! - [`bus`]: the frames a service's processes exchange through a hub (chat's fan-out).
//! - [`log`]: timestamped, role-tagged lines on stderr.
//! - [`duration`]: seconds from flags and config keys, bounded.

/// The `log` facade the [`log!`] and [`warn!`] macros expand to.
pub use ::log as facade;

pub mod bus;
pub mod duration;
pub mod ipc;
pub mod log;
pub mod stats;
