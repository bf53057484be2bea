//! Driving an [`Exchange`] (a TFTP transfer) with blocking waits, for the modes that give each
//! one a thread (thread mode) or a process (fork-per-conn) of its own. Process mode drives
//! the same calls from its event loop.

use std::net::IpAddr;
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

/// Exchanges whose peer has not answered yet that one source address may hold at once (in one
/// worker, or one thread-mode or fork-per-conn server), out of `max`: a quarter, at most 128.
/// A flood from one address (forged or not) then holds at most that share, while a real
/// host may carry on as many answered transfers as there is room for (and start 100 at once:
/// a share of 64 made `tftp-load` at 100 transfers lose some under load).
pub fn unanswered_per_source(max: u64) -> usize {
    usize::try_from((max / 4).clamp(1, 128)).unwrap_or(128)
}

/// One exchange held, as admission sees it.
#[derive(Debug, Clone, Copy)]
pub struct Held<K> {
    /// How the holder names it (a slab key, a thread's id, a child's pid).
    pub key: K,
    /// Its peer's address.
    pub source: IpAddr,
    /// When it began.
    pub started: Instant,
    /// Its peer has answered at least once.
    pub verified: bool,
}

/// What to do with a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit<K> {
    /// There is room: start it.
    Yes,
    /// End this exchange (its peer never answered) silently, then start the new one.
    Evict(K),
    /// No room, and nothing that may be taken back: refuse it ("server busy").
    Busy,
}

/// Whether a request from `source` may start beside the exchanges `held`, at most `max` in
/// all and [`unanswered_per_source`] unanswered ones per source address. When either bound is
/// reached, the oldest exchange whose peer never answered (of that source, when the source is
/// at its bound) makes way: forged requests can only ever displace each other, never a
/// transfer a real client is carrying on, and a new request always gets its chance.
pub fn admit<K: Copy>(
    held: impl IntoIterator<Item = Held<K>>,
    source: IpAddr,
    max: u64,
) -> Admit<K> {
    let mut total = 0u64;
    let mut unanswered_same = 0usize;
    let mut oldest: Option<Held<K>> = None;
    let mut oldest_same: Option<Held<K>> = None;
    let older = |a: &Option<Held<K>>, h: &Held<K>| a.is_none_or(|o| h.started < o.started);
    for h in held {
        total += 1;
        if h.verified {
            continue;
        }
        if older(&oldest, &h) {
            oldest = Some(h);
        }
        if h.source == source {
            unanswered_same += 1;
            if older(&oldest_same, &h) {
                oldest_same = Some(h);
            }
        }
    }
    let victim = if unanswered_same >= unanswered_per_source(max) {
        oldest_same
    } else if total >= max {
        oldest
    } else {
        return Admit::Yes;
    };
    victim.map_or(Admit::Busy, |h| Admit::Evict(h.key))
}

/// Victims looked at (and found to have answered after all) before a request gives up on
/// making room: each look is one system call.
pub const EVICTION_LOOKS: usize = 8;

/// Whether a datagram waits on an exchange's (connected) socket: its peer has answered,
/// though the driver has not read it yet. Judged before an eviction, so a client whose
/// acknowledgement is queued is not taken for a forged source.
pub fn answer_waiting(socket: std::os::fd::RawFd) -> bool {
    let mut byte = [0u8; 1];
    let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
    nix::sys::socket::recv(socket, &mut byte, flags).is_ok()
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

/// Runs `x` to its end (counted in `counters`), or until `stop` names a reason to end it
/// sooner: the server will not wait any longer, or the exchange was evicted (then the peer is
/// told if the reason says so, and it counts as failed). `verified` is called once, when the
/// peer first answers.
pub fn drive_blocking<X: Exchange>(
    x: &mut X,
    counters: &mut Counters,
    stop: &dyn Fn() -> Option<Abort>,
    verified: &dyn Fn(),
) {
    let mut scratch = vec![0u8; SCRATCH];
    let mut told = false;
    let mut step = x.on_time(Instant::now(), counters);
    while step == Step::Going {
        if let Some(why) = stop() {
            step = x.abort(why, counters);
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
        // An eviction wakes the poll (its socket is shut down): looked at before reading.
        if let Some(why) = stop() {
            step = x.abort(why, counters);
            break;
        }
        step = if readable {
            x.on_readable(&mut scratch, counters)
        } else if Instant::now() >= x.deadline() {
            x.on_time(Instant::now(), counters)
        } else {
            Step::Going
        };
        if !told && x.verified() {
            told = true;
            verified();
        }
    }
    count_end(step, counters);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(key: u32, source: u8, age: u64, verified: bool) -> Held<u32> {
        let base = Instant::now();
        Held {
            key,
            source: IpAddr::from([127, 0, 0, source]),
            started: base - Duration::from_secs(age),
            verified,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn room_is_given_while_there_is_some() {
        assert_eq!(admit([held(1, 2, 5, false)], ip(1), 2), Admit::Yes);
        assert_eq!(admit(Vec::<Held<u32>>::new(), ip(1), 1), Admit::Yes);
    }

    #[test]
    fn a_full_table_gives_up_its_oldest_unanswered_exchange_only() {
        let table = [
            held(1, 2, 9, true),
            held(2, 3, 5, false),
            held(3, 4, 7, false),
            held(4, 5, 8, true),
        ];
        assert_eq!(admit(table, ip(1), 4), Admit::Evict(3));
        let answered = [held(1, 2, 9, true), held(2, 3, 5, true)];
        assert_eq!(admit(answered, ip(1), 2), Admit::Busy);
    }

    #[test]
    fn one_source_is_held_to_its_share_of_unanswered_and_displaces_only_itself() {
        let share = unanswered_per_source(1000);
        assert_eq!(
            (share, unanswered_per_source(100), unanswered_per_source(3)),
            (128, 25, 1)
        );
        let mut table: Vec<Held<u32>> = (0..share as u32)
            .map(|k| held(k, 2, 100 + u64::from(k), false))
            .collect();
        // An older unanswered exchange of another source is left alone.
        table.push(held(99, 3, 1000, false));
        assert_eq!(
            admit(table.clone(), ip(2), 1000),
            Admit::Evict(share as u32 - 1)
        );
        assert_eq!(admit(table.clone(), ip(4), 1000), Admit::Yes);
        // Answered transfers of one address are not held to that share.
        for h in &mut table {
            h.verified = true;
        }
        assert_eq!(admit(table, ip(2), 1000), Admit::Yes);
    }
}
