//! UDP echo's rules beyond echoing: never answer a datagram that could be the start of an echo
//! loop, and never let one source draw more than its share of answers.
//!
//! UDP sources are not authenticated. A datagram forged with the source address of this very
//! server (or of another echo, chargen or daytime service) makes the server answer itself, or
//! play ping-pong with the other service, forever: the classic echo/chargen loop
//! (CVE-1999-0103). inetd's internal services refuse such sources; so does this server
//! ([`loops_back`]). That is not enough: two echo servers on ordinary high ports loop just as
//! well. So every answer also spends a token from its source's bucket ([`SourceLimit`]): a
//! loop runs as fast as the two servers can answer, drains the bucket, and ends at its first
//! dropped datagram, while a client sending up to [`SOURCE_RATE`] datagrams a second from one
//! socket is never limited. (A client faster than that from one address and port looks
//! exactly like a loop, and loses the excess.)

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::time::Instant;

/// Whether a datagram from `peer` must not be echoed by a server on `own_port`: its source
/// port is this server's own (itself, or another instance of it elsewhere), 0 (no real
/// sender), or a well-known service port below 1024 (echo 7, daytime 13, chargen 19, ...),
/// where clients never send from.
pub fn loops_back(peer: SocketAddr, own_port: u16) -> bool {
    peer.port() == own_port || peer.port() < 1024
}

/// Answers one source (address and port) may draw per second, sustained, from one worker
/// (or one UDP thread in thread mode).
pub const SOURCE_RATE: f64 = 1000.0;
/// Answers one source may draw at once before the rate applies.
pub const SOURCE_BURST: f64 = 1000.0;
/// Sources tracked at once: sets of [`WAYS`] slots each, so a flood from many (spoofed)
/// sources costs a fixed 96 KiB per worker and evicts only the least recently seen.
const SETS: usize = 1024;
const WAYS: usize = 4;

/// One tracked source: a keyed hash of its address (0: empty slot), its tokens, and when it
/// was last seen (seconds since the table's epoch).
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: u64,
    tokens: f32,
    seen: f64,
}

/// A token bucket per source in a fixed-size table: [`SOURCE_RATE`] answers per second with
/// bursts of [`SOURCE_BURST`]. The hash is keyed at random per process, so nobody can aim a
/// flood of sources at one slot; a source evicted by a flood returns with a full bucket, which
/// a loop (one source, seen every few microseconds) is the last to suffer.
#[derive(Debug)]
pub struct SourceLimit {
    /// Empty until the first datagram: a server without UDP pays nothing.
    slots: Vec<Slot>,
    keys: RandomState,
    epoch: Instant,
}

impl Default for SourceLimit {
    fn default() -> Self {
        SourceLimit::new()
    }
}

impl SourceLimit {
    /// An empty table.
    pub fn new() -> SourceLimit {
        SourceLimit {
            slots: Vec::new(),
            keys: RandomState::new(),
            epoch: Instant::now(),
        }
    }

    /// Whether `peer` may have one more answer now (spending a token if so).
    pub fn allow(&mut self, peer: SocketAddr) -> bool {
        self.allow_at(peer, Instant::now())
    }

    /// [`allow`](Self::allow) at a given instant (for tests).
    pub fn allow_at(&mut self, peer: SocketAddr, now: Instant) -> bool {
        if self.slots.is_empty() {
            self.slots = vec![Slot::default(); SETS * WAYS];
        }
        let key = self.keys.hash_one(peer) | 1;
        let t = now.saturating_duration_since(self.epoch).as_secs_f64();
        let first = (key >> 1) as usize % SETS * WAYS;
        let set = &mut self.slots[first..first + WAYS];
        let i = match set.iter().position(|s| s.key == key) {
            Some(i) => i,
            None => {
                // The least recently seen slot (an empty one has never been seen).
                let (i, _) = set
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.seen.total_cmp(&b.1.seen))
                    .unwrap_or((0, &set[0]));
                set[i] = Slot {
                    key,
                    tokens: SOURCE_BURST as f32,
                    seen: t,
                };
                i
            }
        };
        let slot = &mut set[i];
        let refill = (t - slot.seen).max(0.0) * SOURCE_RATE;
        slot.tokens = (f64::from(slot.tokens) + refill).min(SOURCE_BURST) as f32;
        slot.seen = t;
        if slot.tokens >= 1.0 {
            slot.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn refuses_its_own_port_and_service_ports_only() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(loops_back(at("127.0.0.1:7007"), 7007));
        assert!(loops_back(at("10.1.2.3:7007"), 7007)); // another instance: ping-pong
        assert!(loops_back(at("127.0.0.1:7"), 7007)); // another echo service
        assert!(loops_back(at("127.0.0.1:19"), 7007)); // chargen
        assert!(loops_back(at("[::1]:0"), 7007));
        assert!(!loops_back(at("127.0.0.1:1024"), 7007));
        assert!(!loops_back(at("127.0.0.1:40000"), 7007));
        assert!(!loops_back(at("[::1]:51234"), 7007));
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut l = SourceLimit::new();
        let loop_peer: SocketAddr = "127.0.0.1:7102".parse().unwrap();
        let t0 = Instant::now();
        // A loop: answers as fast as they come (here all at one instant).
        let allowed = (0..5000).filter(|_| l.allow_at(loop_peer, t0)).count();
        assert_eq!(allowed, SOURCE_BURST as usize);
        // Refilled at the rate: 10 ms later, 10 more.
        let t1 = t0 + Duration::from_millis(10);
        let more = (0..100).filter(|_| l.allow_at(loop_peer, t1)).count();
        assert_eq!(more, (SOURCE_RATE / 100.0) as usize);
        // Another source is not affected.
        let other: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert!(l.allow_at(other, t1));
        // A client waiting for each echo (one per 2 ms, far above any real one) never is.
        let client: SocketAddr = "[::1]:51234".parse().unwrap();
        for i in 0..10_000u64 {
            let t = t1 + Duration::from_micros(2000 * i);
            assert!(l.allow_at(client, t), "datagram {i}");
        }
    }

    #[test]
    fn a_flood_of_sources_does_not_free_a_loop() {
        let mut l = SourceLimit::new();
        let looping: SocketAddr = "127.0.0.1:7102".parse().unwrap();
        let t0 = Instant::now();
        while l.allow_at(looping, t0) {}
        // Thousands of other sources in between, each seen once, long ago by comparison:
        // the loop, seen last, stays tracked and stays out of tokens.
        for p in 0..(SETS * WAYS) as u16 {
            let t = t0 + Duration::from_nanos(u64::from(p));
            l.allow_at(
                SocketAddr::from(([10, 0, (p >> 8) as u8, p as u8], 40000)),
                t,
            );
            if p % 64 == 0 {
                assert!(!l.allow_at(looping, t), "freed after {p} sources");
            }
        }
    }
}
