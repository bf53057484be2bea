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
    /// The server's uptime at the handover.
    pub uptime_secs: f64,
    /// The generation serving at the handover (0: none handed over).
    pub generation: u32,
    /// Life-cycle counts so far.
    pub lifecycle: Lifecycle,
}

impl Carryover {
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
        // Unreadable: logged, and the stats start again.
        assert_eq!(Carryover::parse("{not json"), Carryover::default());
    }
}
