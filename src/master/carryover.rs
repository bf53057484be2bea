//! The stats a master hands its successor in a binary upgrade, and how the successor reads
//! them: JSON in which every field defaults, so builds with different counters still agree on
//! the rest.

use protocol::stats::Counters;
use serde::{Deserialize, Serialize};

use crate::stats::Lifecycle;

/// What a master hands its successor in a binary upgrade, so the server's stats go on as one:
/// totals never go backward, uptime counts from the first master's start (rates stay true),
/// generations continue, life-cycle counts add up. Sent as JSON; every field defaults, so a
/// successor of another build keeps what it understands (a field added or removed costs only
/// that field).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Carryover {
    /// Totals over every worker so far, as in [`Snapshot::totals`](crate::stats::Snapshot::totals).
    pub totals: Counters,
    /// The server's uptime at the handover (read only if `started_monotonic` is not there:
    /// from an older build).
    pub uptime_secs: f64,
    /// When the first master started, on the system-wide monotonic clock (CLOCK_MONOTONIC,
    /// seconds): the successor's uptime then includes its own exec-to-ready time. 0: unknown.
    pub started_monotonic: f64,
    /// The generation serving at the handover (0: none handed over).
    pub generation: u32,
    /// Life-cycle counts so far.
    pub lifecycle: Lifecycle,
}

/// Now on CLOCK_MONOTONIC, in seconds: the clock `Instant` reads on Linux, the same in every
/// process (0.0 if it cannot be read).
pub fn monotonic_now() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| std::time::Duration::from(t).as_secs_f64())
        .unwrap_or(0.0)
}

impl Carryover {
    /// What a successor counted on top of `handed` (what it was handed), field by field; a
    /// field it reports lower (a counter its build lacks) adds nothing. The gauge `active` is
    /// not carried.
    pub fn gained_since(&self, handed: &Carryover) -> (Counters, Lifecycle) {
        let mut totals = self.totals.to_array();
        for (x, h) in totals.iter_mut().zip(handed.totals.to_array()) {
            *x = x.saturating_sub(h);
        }
        let mut totals = Counters::from_array(totals);
        totals.active = 0;
        let (a, b) = (&self.lifecycle, &handed.lifecycle);
        let lifecycle = Lifecycle {
            reloads: a.reloads.saturating_sub(b.reloads),
            reloads_failed: a.reloads_failed.saturating_sub(b.reloads_failed),
            upgrades: a.upgrades.saturating_sub(b.upgrades),
            upgrades_failed: a.upgrades_failed.saturating_sub(b.upgrades_failed),
            respawns: a.respawns.saturating_sub(b.respawns),
            rollbacks: a.rollbacks.saturating_sub(b.rollbacks),
        };
        (totals, lifecycle)
    }

    /// Reads what a predecessor handed over. An older master sent bare totals (a counters
    /// object); that is understood too. Text that cannot be read is logged, not silently
    /// dropped, and the stats start from zero.
    pub fn parse(text: &str) -> Carryover {
        let value: Result<serde_json::Value, _> = serde_json::from_str(text);
        let read = value.and_then(|v| {
            if v.get("totals").is_some() {
                serde_json::from_value::<Carryover>(v)
            } else {
                serde_json::from_value::<Counters>(v).map(|totals| Carryover {
                    totals,
                    ..Carryover::default()
                })
            }
        });
        read.unwrap_or_else(|e| {
            protocol::warn!(
                "cannot read the stats the previous master handed over ({e}); totals, uptime and generation start again"
            );
            Carryover::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carryover_keeps_what_it_understands_across_builds() {
        let c = Carryover {
            totals: Counters {
                accepted: 7,
                bytes_in: 100,
                bytes_out: 100,
                ..Counters::default()
            },
            uptime_secs: 12.5,
            started_monotonic: 100.25,
            generation: 3,
            lifecycle: Lifecycle {
                reloads: 2,
                upgrades: 1,
                ..Lifecycle::default()
            },
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(Carryover::parse(&json), c);
        // From a newer build: a counter and a field this one does not know are ignored.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["totals"]["a_counter_from_the_future"] = 5.into();
        v["a_field_from_the_future"] = "x".into();
        assert_eq!(Carryover::parse(&v.to_string()), c);
        // From an older build: a counter it did not have reads as zero, the others are kept.
        v["totals"].as_object_mut().unwrap().remove("bytes_in");
        v["lifecycle"].as_object_mut().unwrap().remove("upgrades");
        let older = Carryover::parse(&v.to_string());
        assert_eq!(older.totals.bytes_in, 0);
        assert_eq!(older.totals.accepted, 7);
        assert_eq!(older.totals.bytes_out, 100);
        assert_eq!((older.generation, older.lifecycle.reloads), (3, 2));
        // From a master that sent bare totals.
        let bare = Carryover::parse(&serde_json::to_string(&c.totals).unwrap());
        assert_eq!(bare.totals, c.totals);
        assert_eq!(bare.generation, 0);
        // What a successor counted on top of what it was handed; never negative.
        let mut later = c;
        later.totals.accepted += 4;
        later.totals.bytes_in = 0;
        later.lifecycle.upgrades += 1;
        let (totals, lifecycle) = later.gained_since(&c);
        assert_eq!(
            (totals.accepted, totals.bytes_in, totals.bytes_out),
            (4, 0, 0)
        );
        assert_eq!((lifecycle.upgrades, lifecycle.reloads), (1, 0));
        // Unreadable: logged, and the stats start again.
        assert_eq!(Carryover::parse("{not json"), Carryover::default());
    }
}
