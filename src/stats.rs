//! Stats as a person running a load test reads them: per-worker records, totals that never go
//! backward, and how evenly the shared listener spread connections across workers.
//!
//! The master (or thread mode) builds a [`Snapshot`]; the control socket serves it as JSON; the
//! `stats` command renders it. The JSON schema is documented in the README.

use std::fmt::Write as _;

use protocol::stats::Counters;
use serde::{Deserialize, Serialize};

/// Version of the JSON schema below.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything `prefork-echo stats --json` prints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub version: u32,
    /// `process` or `thread`.
    pub mode: String,
    /// The master's pid (the only process in thread mode).
    pub master_pid: u32,
    /// Seconds since the master started.
    pub uptime_secs: f64,
    /// Current worker generation.
    pub generation: u32,
    /// Live workers (process mode) or acceptor threads (thread mode).
    pub workers: Vec<WorkerRow>,
    /// Sums over every worker that ever ran, live or gone; `active` counts live ones only.
    pub totals: Counters,
    /// Accept fairness over live workers.
    pub fairness: Fairness,
    /// Pool slots no longer respawned because their workers kept failing at start (the
    /// server is degraded: it serves with the others). Empty when healthy.
    #[serde(default)]
    pub abandoned_slots: Vec<u32>,
    /// What the master has done since it started (process mode; zeros elsewhere).
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// Connections the kernel holds that no worker has accepted yet (process and
    /// fork-per-conn modes; `null` elsewhere and for a datagram service).
    #[serde(default)]
    pub accept_queue: Option<AcceptQueue>,
    /// A binary upgrade in its window: the old master keeps the sockets to take the service
    /// back should this (new) master die. `null` otherwise.
    #[serde(default)]
    pub upgrade: Option<UpgradeWindow>,
}

/// A binary upgrade whose old master still waits, as the new master sees it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct UpgradeWindow {
    /// The old master: it has no workers, and keeps the sockets until the window closes.
    pub old_master_pid: u32,
    /// The new master, serving (the one answering).
    pub new_master_pid: u32,
    /// Seconds until the old master retires on its own (`upgrade --commit`: now).
    pub closes_in_secs: f64,
}

/// The listening socket's accept queue: a queue that stays near its limit means the workers
/// cannot keep up, and the kernel will soon drop handshakes.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcceptQueue {
    /// Connections waiting to be accepted.
    pub waiting: u32,
    /// The most it holds (`--backlog`, as capped by `net.core.somaxconn`).
    pub limit: u32,
}

/// The master's life-cycle events, counted since the server started (carried across binary
/// upgrades, see `master::Carryover`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Lifecycle {
    /// Reloads whose new generation took over.
    pub reloads: u64,
    /// Reloads abandoned (bad config, a worker that died starting, too slow).
    pub reloads_failed: u64,
    /// Binary upgrades whose new master took over (counted by the new master).
    pub upgrades: u64,
    /// Binary upgrades whose new master failed.
    pub upgrades_failed: u64,
    /// Workers replaced after dying unasked.
    pub respawns: u64,
    /// Upgrades taken back: the new master died within the window, the old one serves again
    /// (each also counts in `upgrades` and `upgrades_failed`).
    pub rollbacks: u64,
}

/// One worker's record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WorkerRow {
    /// Slot number.
    pub id: u32,
    /// Process id (the master's in thread mode).
    pub pid: u32,
    /// Generation it belongs to.
    pub generation: u32,
    /// `starting`, `running` or `draining`.
    pub state: String,
    /// Seconds since it was started.
    pub uptime_secs: f64,
    /// Seconds since its last report; `null` before the first.
    pub last_report_age_secs: Option<f64>,
    /// Its counters as of that report.
    pub counters: Counters,
    /// Connections waiting in its own socket's accept queue (`--balance reuseport`; with a
    /// shared socket the queue is the pool's, in the snapshot's `accept_queue`).
    #[serde(default)]
    pub accept_queue: Option<u32>,
}

/// How evenly accepted connections are spread over the live workers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Fairness {
    /// Each live worker's share of their accepted connections, in `workers` order.
    pub shares: Vec<f64>,
    /// Jain's fairness index: 1 when every worker accepted as many, 1/n when one took all;
    /// `null` before any connection.
    pub jain_index: Option<f64>,
}

impl Fairness {
    /// Fairness of these per-worker accept counts.
    pub fn of(accepted: &[u64]) -> Fairness {
        let sum: f64 = accepted.iter().map(|&a| a as f64).sum();
        if sum == 0.0 {
            return Fairness {
                shares: vec![0.0; accepted.len()],
                jain_index: None,
            };
        }
        let squares: f64 = accepted.iter().map(|&a| (a as f64).powi(2)).sum();
        Fairness {
            shares: accepted.iter().map(|&a| a as f64 / sum).collect(),
            jain_index: Some(sum * sum / (accepted.len() as f64 * squares)),
        }
    }
}

impl Snapshot {
    /// Builds the snapshot from live rows and the counters of workers already gone.
    pub fn new(
        mode: &str,
        uptime_secs: f64,
        generation: u32,
        workers: Vec<WorkerRow>,
        retired: &Counters,
    ) -> Snapshot {
        let mut totals = *retired;
        totals.active = 0;
        for w in &workers {
            totals.add(&w.counters);
        }
        let accepted: Vec<u64> = workers.iter().map(|w| w.counters.accepted).collect();
        Snapshot {
            version: SCHEMA_VERSION,
            mode: mode.to_string(),
            master_pid: std::process::id(),
            uptime_secs,
            generation,
            fairness: Fairness::of(&accepted),
            workers,
            totals,
            abandoned_slots: Vec::new(),
            lifecycle: Lifecycle::default(),
            accept_queue: None,
            upgrade: None,
        }
    }

    /// A one-line summary for `--log-stats`, with rates against `previous` when given.
    pub fn log_line(&self, previous: Option<&Snapshot>) -> String {
        let t = &self.totals;
        let mut line = format!(
            "stats: workers={} active={} accepted={} in={}B out={}B errors={}",
            self.workers.len(),
            t.active,
            t.accepted,
            t.bytes_in,
            t.bytes_out,
            t.accept_errors + t.io_errors
        );
        if let Some(r) = previous.and_then(|p| Rates::between(p, self)) {
            let _ = write!(
                line,
                " rate: {:.0} conn/s, in {}/s, out {}/s",
                r.accepted,
                human_bytes(r.bytes_in),
                human_bytes(r.bytes_out)
            );
        }
        if let Some(j) = self.fairness.jain_index {
            let _ = write!(line, " jain={j:.3}");
        }
        line
    }

    /// The human table of `prefork-echo stats`. Rates are against `previous` (the last sample
    /// of `--watch`), or averages since start-up when there is none.
    pub fn table(&self, previous: Option<&Snapshot>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "mode={} master pid={} uptime={:.1}s generation={}",
            self.mode, self.master_pid, self.uptime_secs, self.generation
        );
        let _ = writeln!(
            out,
            "{:>4} {:>8} {:>4} {:<9} {:>9} {:>7} {:>10} {:>10} {:>10} {:>7} {:>6}",
            "id",
            "pid",
            "gen",
            "state",
            "accepted",
            "active",
            "bytes in",
            "bytes out",
            "errors",
            "share",
            "report"
        );
        for (w, share) in self.workers.iter().zip(&self.fairness.shares) {
            let c = &w.counters;
            let _ = writeln!(
                out,
                "{:>4} {:>8} {:>4} {:<9} {:>9} {:>7} {:>10} {:>10} {:>10} {:>6.1}% {:>6}",
                w.id,
                w.pid,
                w.generation,
                w.state,
                c.accepted,
                c.active,
                human_bytes(c.bytes_in as f64),
                human_bytes(c.bytes_out as f64),
                c.accept_errors + c.io_errors,
                share * 100.0,
                w.last_report_age_secs
                    .map_or("-".to_string(), |a| format!("{a:.1}s")),
            );
        }
        let t = &self.totals;
        let _ = writeln!(
            out,
            "{:>4} {:>8} {:>4} {:<9} {:>9} {:>7} {:>10} {:>10} {:>10}",
            "all",
            "",
            "",
            "",
            t.accepted,
            t.active,
            human_bytes(t.bytes_in as f64),
            human_bytes(t.bytes_out as f64),
            t.accept_errors + t.io_errors
        );
        let (r, over) = match previous.and_then(|p| Rates::between(p, self)) {
            Some(r) => (r, "last interval"),
            None => (Rates::average(self), "average since start"),
        };
        let _ = writeln!(
            out,
            "rates ({over}): {:.1} conn/s, in {}/s, out {}/s",
            r.accepted,
            human_bytes(r.bytes_in),
            human_bytes(r.bytes_out)
        );
        let _ = writeln!(
            out,
            "errors: accept={} io={} closed by limit={} proxy header={}; fairness (Jain) = {}",
            t.accept_errors,
            t.io_errors,
            t.closed_by_limit,
            t.proxy_errors,
            self.fairness
                .jain_index
                .map_or("n/a".to_string(), |j| format!("{j:.3}"))
        );
        if let Some(q) = self.accept_queue {
            let per_worker: Vec<String> = self
                .workers
                .iter()
                .filter_map(|w| w.accept_queue.map(|n| format!("{}:{n}", w.id)))
                .collect();
            let _ = writeln!(
                out,
                "accept queue: {} waiting (limit {}){}",
                q.waiting,
                q.limit,
                if per_worker.is_empty() {
                    String::new()
                } else {
                    format!("; per worker {}", per_worker.join(" "))
                }
            );
        }
        if let Some(u) = self.upgrade {
            let _ = writeln!(
                out,
                "UPGRADE WINDOW: new master {} serving; old master {} keeps the sockets {:.1}s more, \
                 to take the service back should the new one die (`prefork-echo upgrade --commit` retires it now)",
                u.new_master_pid, u.old_master_pid, u.closes_in_secs
            );
        }
        if self.mode == "process" {
            let l = &self.lifecycle;
            let _ = writeln!(
                out,
                "life cycle: reloads={} (failed {}) upgrades={} (failed {}, rolled back {}) respawns={}",
                l.reloads, l.reloads_failed, l.upgrades, l.upgrades_failed, l.rollbacks, l.respawns
            );
        }
        if !self.abandoned_slots.is_empty() {
            let _ = writeln!(
                out,
                "DEGRADED: slot(s) {:?} kept failing at start and are not respawned (a reload or scale retries them)",
                self.abandoned_slots
            );
        }
        let _ = writeln!(
            out,
            "udp: datagrams in={} out={} refused={} (loop-prone or over-limit sources)",
            t.datagrams_in, t.datagrams_out, t.datagrams_refused
        );
        let _ = writeln!(
            out,
            "transfers (--service tftp): started={} done={} failed={} bytes={} retransmits={}",
            t.transfers,
            t.transfers_done,
            t.transfers_failed,
            human_bytes(t.transfer_bytes as f64),
            t.retransmits
        );
        let _ = writeln!(
            out,
            "chat (--service chat): lines={} deliveries={} slow consumers dropped={} bus frames out={} in={}",
            t.chat_lines, t.chat_deliveries, t.slow_consumers, t.bus_out, t.bus_in
        );
        out
    }
}

/// Per-second rates of the totals.
#[derive(Debug)]
pub struct Rates {
    /// Connections accepted per second.
    pub accepted: f64,
    /// Bytes read per second.
    pub bytes_in: f64,
    /// Bytes written per second.
    pub bytes_out: f64,
}

impl Rates {
    /// Rates between two snapshots of the same server; `None` if no time passed between them.
    pub fn between(a: &Snapshot, b: &Snapshot) -> Option<Rates> {
        let dt = b.uptime_secs - a.uptime_secs;
        (dt > 0.0).then(|| Rates {
            accepted: b.totals.accepted.saturating_sub(a.totals.accepted) as f64 / dt,
            bytes_in: b.totals.bytes_in.saturating_sub(a.totals.bytes_in) as f64 / dt,
            bytes_out: b.totals.bytes_out.saturating_sub(a.totals.bytes_out) as f64 / dt,
        })
    }

    /// Average rates since the server started.
    pub fn average(s: &Snapshot) -> Rates {
        let dt = s.uptime_secs.max(1e-9);
        Rates {
            accepted: s.totals.accepted as f64 / dt,
            bytes_in: s.totals.bytes_in as f64 / dt,
            bytes_out: s.totals.bytes_out as f64 / dt,
        }
    }
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u32, accepted: u64, bytes: u64, active: u64) -> WorkerRow {
        WorkerRow {
            id,
            pid: 100 + id,
            generation: 1,
            state: "running".into(),
            uptime_secs: 1.0,
            last_report_age_secs: Some(0.1),
            accept_queue: None,
            counters: Counters {
                accepted,
                active,
                bytes_in: bytes,
                bytes_out: bytes,
                ..Counters::default()
            },
        }
    }

    #[test]
    fn jain_index_is_one_when_even_and_one_over_n_when_one_takes_all() {
        assert_eq!(Fairness::of(&[5, 5, 5, 5]).jain_index, Some(1.0));
        let all_on_one = Fairness::of(&[12, 0, 0, 0]).jain_index.unwrap();
        assert!((all_on_one - 0.25).abs() < 1e-12);
        assert_eq!(Fairness::of(&[0, 0]).jain_index, None);
        assert_eq!(Fairness::of(&[3, 1]).shares, vec![0.75, 0.25]);
    }

    #[test]
    fn totals_keep_retired_traffic_and_count_only_live_connections() {
        let retired = Counters {
            accepted: 10,
            active: 99, // stale gauge of a dead worker: must not count
            bytes_in: 1000,
            bytes_out: 1000,
            ..Counters::default()
        };
        let s = Snapshot::new(
            "process",
            2.0,
            1,
            vec![row(0, 1, 5, 1), row(1, 2, 7, 0)],
            &retired,
        );
        assert_eq!(s.totals.accepted, 13);
        assert_eq!(s.totals.bytes_in, 1012);
        assert_eq!(s.totals.active, 1);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), s);
        assert!(s.table(None).contains("all"));
    }
}
