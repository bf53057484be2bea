//! Driving an [`Exchange`] (a TFTP transfer) with blocking waits, for the modes that give each
//! one a thread (thread mode) or a process (fork-per-conn) of its own. Process mode drives
//! the same calls from its event loop.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use protocol::stats::Counters;

use crate::service::{Abort, Exchange, Step};

/// Longest wait between looks at `stop`.
const TICK: Duration = Duration::from_millis(100);
/// Exchanges a worker (or a whole thread or fork-per-conn server) holds at most when
/// `--max-conns` sets no limit: each is a socket, an open file and a window of buffers (or a
/// thread, or a process), and a flood of requests must not exhaust any of them.
pub const DEFAULT_MAX_EXCHANGES: u64 = 512;

/// The most exchanges `max_conns` (the `--max-conns` value; 0: no limit set) allows.
pub fn max_exchanges(max_conns: u64) -> u64 {
    match max_conns {
        0 => DEFAULT_MAX_EXCHANGES,
        n => n,
    }
}

/// A receive buffer for the largest UDP datagram.
pub const SCRATCH: usize = 65536;

/// Counts how an exchange ended.
pub fn count_end(step: Step, counters: &mut Counters) {
    match step {
        Step::Done => counters.transfers_done += 1,
        Step::Failed => counters.transfers_failed += 1,
        Step::Going => {}
    }
}

/// Runs `x` to its end (counted in `counters`), or until `stop` says the server will not
/// wait any longer (then the peer is told, and it counts as failed).
pub fn drive_blocking<X: Exchange>(x: &mut X, counters: &mut Counters, stop: &dyn Fn() -> bool) {
    let mut scratch = vec![0u8; SCRATCH];
    let mut step = x.on_time(Instant::now(), counters);
    while step == Step::Going {
        if stop() {
            step = x.abort(Abort::Stopping, counters);
            break;
        }
        let wait = x
            .deadline()
            .saturating_duration_since(Instant::now())
            .min(TICK);
        // Round up, so a deadline 0.4 ms away is not polled with a zero timeout in a spin.
        let ms = u16::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(x.socket().as_fd(), PollFlags::POLLIN)];
        let readable = match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => n > 0,
            Err(nix::errno::Errno::EINTR) => false,
            Err(_) => {
                counters.io_errors += 1;
                step = Step::Failed;
                break;
            }
        };
        step = if readable {
            x.on_readable(&mut scratch, counters)
        } else if Instant::now() >= x.deadline() {
            x.on_time(Instant::now(), counters)
        } else {
            Step::Going
        };
    }
    count_end(step, counters);
}
