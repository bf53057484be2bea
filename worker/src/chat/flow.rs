//! Flow control: when one client sends faster than others read, the sender waits (its socket
//! is left unread, so TCP slows it), never the readers. Pure rules, shared by every mode.
//!
//! - A client that owes more than the mark (`--max-unsent`) is **behind**; while it is behind
//!   and reading, it **holds** every sender of its room (they are not read, and a worker
//!   stops reading the bus). It stops being behind at half the mark.
//! - Reading means its socket took bytes within the last [`CATCH_UP`], and it has been behind
//!   for less than `soft_for`. A client that took nothing for [`CATCH_UP`] (a never-reader, a
//!   stopped terminal), or that trickles so slowly it cannot get back to half the mark in
//!   `soft_for`, no longer holds anyone: its queue grows, bounded by the limits.
//! - Redis' output-buffer limits then decide: more than `hard` owed drops it at once; more
//!   than `soft` for `soft_for` without a break drops it.
//!
//! So a reader that reads at least once a second and drains half the mark within `soft_for`
//! (3.2 KiB a second with the defaults, far below any terminal) is never dropped, whatever
//! anyone sends; senders go at the pace of the slowest such reader.

use std::time::{Duration, Instant};

use super::Limits;
use super::options::Rate;

/// How long a client behind the mark holds the senders before it is deemed not reading.
pub const CATCH_UP: Duration = Duration::from_secs(1);

/// Why a client is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrun {
    /// Over the hard limit.
    Hard,
    /// Over the soft limit for too long.
    Soft,
}

/// One recipient's standing against the limits.
#[derive(Debug, Default, Clone)]
pub struct Standing {
    /// When it went over the mark (cleared at half the mark).
    behind_since: Option<Instant>,
    /// When its socket last took bytes (or it went behind, whichever is later).
    last_progress: Option<Instant>,
    /// When it went over the soft limit (cleared under it).
    over_soft_since: Option<Instant>,
}

impl Standing {
    /// Its queue now holds `owed` bytes: `Err` if that breaks a limit.
    pub fn update(&mut self, owed: usize, now: Instant, limits: &Limits) -> Result<(), Overrun> {
        if owed > limits.hard {
            return Err(Overrun::Hard);
        }
        if owed > limits.soft {
            let since = *self.over_soft_since.get_or_insert(now);
            if now.duration_since(since) >= limits.soft_for {
                return Err(Overrun::Soft);
            }
        } else {
            self.over_soft_since = None;
        }
        if owed > limits.mark {
            if self.behind_since.is_none() {
                // Going behind counts as news from the reader: it gets its full window.
                self.behind_since = Some(now);
                self.last_progress = Some(now);
            }
        } else if owed <= limits.mark / 2 {
            self.behind_since = None;
        }
        Ok(())
    }

    /// Its socket took bytes at `now`.
    pub fn progressed(&mut self, now: Instant) {
        self.last_progress = Some(now);
    }

    /// Over the mark (its own input is not read until it catches up).
    pub fn behind(&self) -> bool {
        self.behind_since.is_some()
    }

    /// Until when it holds the senders, if it is behind (that time may be past).
    pub fn holds_until(&self, limits: &Limits) -> Option<Instant> {
        let since = self.behind_since?;
        let progress = self.last_progress.unwrap_or(since).max(since);
        Some((progress + CATCH_UP).min(since + limits.soft_for))
    }
}

/// One client's allowance of lines (`--chat-rate`): a token bucket, full at first.
#[derive(Debug, Default, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: &Rate) {
        self.tokens = match self.last {
            None => rate.burst,
            Some(last) => (self.tokens + now.duration_since(last).as_secs_f64() * rate.per_sec)
                .min(rate.burst),
        };
        self.last = Some(now);
    }

    /// `Ok` if a line may be acted on now, else when one may.
    pub fn ready(&mut self, now: Instant, rate: &Rate) -> Result<(), Instant> {
        self.refill(now, rate);
        if self.tokens >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / rate.per_sec;
        Err(now + Duration::try_from_secs_f64(wait).unwrap_or(Duration::from_secs(1)))
    }

    /// A line was acted on.
    pub fn take(&mut self, now: Instant, rate: &Rate) {
        self.refill(now, rate);
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        mark: 100,
        soft: 1000,
        soft_for: Duration::from_secs(10),
        hard: 5000,
        rate: None,
    };

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate {
            per_sec: 10.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::default();
        for _ in 0..3 {
            assert_eq!(b.ready(t0, &rate), Ok(()));
            b.take(t0, &rate);
        }
        assert_eq!(b.ready(t0, &rate), Err(t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_millis(250);
        assert_eq!(b.ready(later, &rate), Ok(()));
        b.take(later, &rate);
        b.take(later, &rate);
        assert!(b.ready(later, &rate).is_err());
        // Idle time refills up to the burst only.
        let much_later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.ready(much_later, &rate), Ok(()));
            b.take(much_later, &rate);
        }
        assert!(b.ready(much_later, &rate).is_err());
    }

    #[test]
    fn behind_over_the_mark_until_half_of_it_holding_while_it_reads() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Standing::default();
        s.progressed(t0);
        s.update(100, t0 + ms(10), &L).unwrap();
        assert!(!s.behind() && s.holds_until(&L).is_none());
        s.update(101, t0 + ms(20), &L).unwrap();
        assert_eq!(s.holds_until(&L), Some(t0 + ms(20) + CATCH_UP));
        // More arriving renews nothing; the reader's progress does.
        s.update(300, t0 + ms(500), &L).unwrap();
        assert_eq!(s.holds_until(&L), Some(t0 + ms(20) + CATCH_UP));
        s.progressed(t0 + ms(900));
        s.update(51, t0 + ms(900), &L).unwrap();
        assert_eq!(s.holds_until(&L), Some(t0 + ms(900) + CATCH_UP));
        // A trickle holds no longer than soft_for after it went behind.
        s.progressed(t0 + ms(9900));
        assert_eq!(s.holds_until(&L), Some(t0 + ms(20) + L.soft_for));
        s.update(50, t0 + ms(9950), &L).unwrap();
        assert!(!s.behind() && s.holds_until(&L).is_none());
    }

    #[test]
    fn the_hard_limit_drops_at_once_the_soft_one_after_its_time_without_a_break() {
        let t0 = Instant::now();
        let mut s = Standing::default();
        assert_eq!(s.update(5001, t0, &L), Err(Overrun::Hard));
        let mut s = Standing::default();
        s.update(2000, t0, &L).unwrap();
        s.update(2000, t0 + Duration::from_secs(9), &L).unwrap();
        // A break under the soft limit starts the clock again.
        s.update(900, t0 + Duration::from_secs(9), &L).unwrap();
        s.update(2000, t0 + Duration::from_secs(12), &L).unwrap();
        s.update(2000, t0 + Duration::from_secs(21), &L).unwrap();
        assert_eq!(
            s.update(1001, t0 + Duration::from_secs(22), &L),
            Err(Overrun::Soft)
        );
    }
}
