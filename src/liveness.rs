//! Judging whether a worker is hung, by evidence rather than by the master's own stalls.
//!
//! Reports double as heartbeats: a worker silent for `--worker-timeout` is stuck and is
//! killed. But silence must be measured on the master's side too: a master that was stopped
//! (SIGSTOP, a debugger, a slow disk, a full stderr pipe) wakes to find every worker "silent"
//! although their reports sit unread in its channels. So silence is counted on an
//! [`AwakeClock`] that advances only while the master runs its loop, pending reports are read
//! before anyone is judged (the master's job), and [`choose_hung`] never kills more than half
//! of the pool in one turn.

use std::time::{Duration, Instant};

/// Time the master has spent awake: wall time, except that one loop turn never counts for
/// more than `max_step` (the loop's longest sleep plus slack). A turn that took longer means
/// the master itself was held up, and workers are not blamed for it.
#[derive(Debug, Clone)]
pub struct AwakeClock {
    last: Instant,
    awake: Duration,
    max_step: Duration,
}

impl AwakeClock {
    /// A clock starting at zero now; no single step counts for more than `max_step`.
    pub fn new(now: Instant, max_step: Duration) -> AwakeClock {
        AwakeClock {
            last: now,
            awake: Duration::ZERO,
            max_step,
        }
    }

    /// Advances to `now` and returns the awake time.
    pub fn tick(&mut self, now: Instant) -> Duration {
        let step = now.saturating_duration_since(self.last).min(self.max_step);
        self.last = self.last.max(now);
        self.awake += step;
        self.awake
    }

    /// The awake time as of the last tick.
    pub fn now(&self) -> Duration {
        self.awake
    }
}

/// Of the workers that have been silent (`(key, silence)` on the awake clock), those to kill
/// this turn: silent for longer than `limit`, longest silence first, at most half of a pool
/// of `pool` workers (rounded up). Killing the whole pool at once takes evidence that each
/// worker is hung; a later turn, after reading the channels again, gets to the rest.
pub fn choose_hung<K: Copy>(silences: &[(K, Duration)], limit: Duration, pool: usize) -> Vec<K> {
    let mut silent: Vec<(K, Duration)> = silences
        .iter()
        .copied()
        .filter(|&(_, s)| s > limit)
        .collect();
    silent.sort_by_key(|&(_, s)| std::cmp::Reverse(s));
    silent.truncate(pool.div_ceil(2).max(1));
    silent.into_iter().map(|(k, _)| k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_stalled_master_does_not_age_its_workers() {
        let t0 = Instant::now();
        let mut clock = AwakeClock::new(t0, 2 * S);
        assert_eq!(clock.tick(t0 + S), S);
        // The master was SIGSTOPped for a minute: that turn counts as 2 s, not 60.
        assert_eq!(clock.tick(t0 + 61 * S), 3 * S);
        assert_eq!(clock.tick(t0 + 62 * S), 4 * S);
        // A clock read out of order never goes backward.
        assert_eq!(clock.tick(t0 + 10 * S), 4 * S);
        assert_eq!(clock.now(), 4 * S);
    }

    #[test]
    fn at_most_half_the_pool_is_killed_per_turn_longest_silence_first() {
        let silences = [
            (0, 40 * S),
            (1, 35 * S),
            (2, 50 * S),
            (3, 31 * S),
            (4, 5 * S),
        ];
        assert_eq!(choose_hung(&silences, 30 * S, 5), vec![2, 0, 1]);
        assert_eq!(choose_hung(&silences, 30 * S, 4), vec![2, 0]);
        assert_eq!(choose_hung(&silences[..1], 30 * S, 1), vec![0]);
        assert!(choose_hung(&silences, 60 * S, 5).is_empty());
    }
}
