//! Whether an echo connection reads again right after echoing what a short read returned.
//!
//! A short read empties the socket's queue, so with edge-triggered epoll the next message
//! brings a new edge and the read that would only confirm "would block" can be skipped: one
//! system call per round trip saved, when the client answers only after the worker has gone
//! back to `epoll_wait` (one event-loop thread driving many connections). A client with a
//! thread of its own per connection answers while the worker is still in its loop: reading
//! again then finds the next message already there (about nine times in ten measured), and
//! skipping that read leaves it to the next `epoll_wait`, half the round trips.
//!
//! So each connection learns which client it has: it keeps reading again while those reads
//! find data, and stops after [`PATIENCE`] fruitless ones in a row; from then on it trusts
//! epoll and only probes, once every [`PROBE_FIRST`] short reads, backing off to once every
//! [`PROBE_MOST`] while probes keep finding nothing. A probe that finds data turns re-reading
//! back on. A chain of re-reads always ends with one that would block; that one is the price
//! of the chain, which is why it takes [`PATIENCE`] of them without a hit in between to stop.

/// Fruitless re-reads in a row (no data found in between) after which re-reading stops.
const PATIENCE: u8 = 2;
/// Short reads between probes, just after re-reading stopped.
const PROBE_FIRST: u8 = 8;
/// The longest wait between probes: a probe that finds nothing doubles the wait up to this.
const PROBE_MOST: u8 = 64;

/// One connection's re-read policy: three bytes of state, no clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reread {
    /// Fruitless re-reads still tolerated; 0: trusting epoll, probing.
    credit: u8,
    /// While probing: short reads until the next probe.
    until_probe: u8,
    /// While probing: the current wait between probes.
    interval: u8,
}

impl Default for Reread {
    /// A new connection starts willing to re-read once: a thread-per-connection client shows
    /// itself at once, and an event-loop client costs one extra read.
    fn default() -> Self {
        Reread {
            credit: 1,
            until_probe: PROBE_FIRST,
            interval: PROBE_FIRST,
        }
    }
}

impl Reread {
    /// A short read's bytes were echoed: read again now (`true`), or wait for epoll's edge.
    pub fn after_short_read(&mut self) -> bool {
        if self.credit > 0 {
            return true;
        }
        self.until_probe = self.until_probe.saturating_sub(1);
        if self.until_probe == 0 {
            self.until_probe = self.interval;
            return true;
        }
        false
    }

    /// What the read that [`after_short_read`](Self::after_short_read) asked for found:
    /// data (`true`) or "would block".
    pub fn found(&mut self, data: bool) {
        if data {
            self.credit = PATIENCE;
            self.interval = PROBE_FIRST;
            self.until_probe = PROBE_FIRST;
        } else if self.credit > 0 {
            self.credit -= 1;
        } else {
            // A probe found nothing: probe half as often, down to the floor.
            self.interval = self.interval.saturating_mul(2).min(PROBE_MOST);
            self.until_probe = self.interval;
        }
    }

    /// Whether re-reading is on (not merely probing).
    #[cfg(test)]
    fn rereading(&self) -> bool {
        self.credit > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `n` short reads whose re-reads find data with `hit(i)`; returns how many
    /// re-reads were made.
    fn run(p: &mut Reread, n: usize, hit: impl Fn(usize) -> bool) -> usize {
        let mut rereads = 0;
        for i in 0..n {
            if p.after_short_read() {
                rereads += 1;
                p.found(hit(i));
            }
        }
        rereads
    }

    #[test]
    fn an_event_loop_client_costs_at_most_a_few_reads_in_a_hundred() {
        let mut p = Reread::default();
        let rereads = run(&mut p, 10_000, |_| false);
        assert!(!p.rereading());
        // One at the start, then probes backing off to one in PROBE_MOST.
        assert!(
            rereads <= 10_000 / PROBE_MOST as usize + 10,
            "{rereads} re-reads"
        );
        assert!(
            rereads >= 10_000 / PROBE_MOST as usize / 2,
            "still probes: {rereads}"
        );
    }

    #[test]
    fn a_thread_per_connection_client_keeps_it_rereading() {
        let mut p = Reread::default();
        // Nine in ten re-reads find the next message (the measured share), the tenth ends
        // the chain: re-reading never turns off.
        for i in 0..1_000 {
            assert!(
                p.after_short_read(),
                "short read {i} was not followed by a re-read"
            );
            p.found(i % 10 != 9);
        }
        assert!(p.rereading());
    }

    #[test]
    fn it_stops_after_patience_fruitless_rereads_in_a_row_not_before() {
        let mut p = Reread::default();
        assert!(p.after_short_read());
        p.found(true);
        for _ in 1..PATIENCE {
            assert!(p.after_short_read());
            p.found(false);
            assert!(
                p.rereading(),
                "one miss ends a chain, it must not end re-reading"
            );
        }
        assert!(p.after_short_read());
        p.found(false);
        assert!(!p.rereading());
        assert!(
            !p.after_short_read(),
            "trusting epoll: the next short read is not re-read"
        );
    }

    #[test]
    fn a_probe_that_finds_data_turns_rereading_back_on() {
        let mut p = Reread::default();
        run(&mut p, 1_000, |_| false);
        assert!(!p.rereading());
        // The client turns into a thread-per-connection one: within one probe interval
        // the connection re-reads again.
        let mut waited = 0;
        while !p.after_short_read() {
            waited += 1;
            assert!(
                waited <= PROBE_MOST as usize,
                "no probe within {PROBE_MOST} short reads"
            );
        }
        p.found(true);
        assert!(p.rereading());
        assert!(p.after_short_read());
    }
}
