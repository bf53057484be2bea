//! What the master tells others: answers to control requests, the stats snapshot, and the
//! periodic stats log line.

use mio::Token;

use super::{Event, Master, Phase, System};
use crate::control::{ClientId, Request, Response};
use crate::stats::{Snapshot, WorkerRow};

impl<S: System> Master<S> {
    /// The stats snapshot: live workers in slot order, totals including the departed.
    pub(super) fn snapshot(&self) -> Snapshot {
        let now = self.sys.now();
        let mut rows: Vec<WorkerRow> = self
            .workers
            .iter()
            .map(|(_, w)| WorkerRow {
                id: w.id,
                pid: w.pid.as_raw() as u32,
                generation: w.generation,
                state: match (w.ready, w.draining) {
                    (_, true) => "draining",
                    (false, _) => "starting",
                    (true, false) => "running",
                }
                .to_string(),
                uptime_secs: now.duration_since(w.started).as_secs_f64(),
                last_report_age_secs: w.last_report.map(|t| now.duration_since(t).as_secs_f64()),
                counters: w.counters,
                accept_queue: self
                    .listener
                    .as_ref()
                    .filter(|l| l.balance() == crate::balance::Balance::Reuseport)
                    .and_then(|l| l.queue(w.id))
                    .map(|q| q.waiting),
            })
            .collect();
        rows.sort_by_key(|r| (r.generation, r.id));
        let mut snap = Snapshot::new(
            "process",
            now.duration_since(self.started).as_secs_f64(),
            self.generation,
            rows,
            &self.retired,
        );
        snap.lifecycle = self.lifecycle;
        snap.upgrade = self.upgrade_window();
        snap.accept_queue = self.listener.as_ref().and_then(|l| l.total_queue());
        snap.abandoned_slots = (0..self.settings.workers)
            .filter(|&id| self.slots.get(id as usize).is_some_and(|s| s.abandoned))
            .collect();
        snap
    }

    /// What a successor inherits: the stats go on as one server's.
    pub(super) fn carryover(&self) -> super::Carryover {
        let snap = self.snapshot();
        super::Carryover {
            totals: snap.totals,
            uptime_secs: snap.uptime_secs,
            started_monotonic: (super::carryover::monotonic_now() - snap.uptime_secs).max(0.0),
            generation: snap.generation,
            lifecycle: snap.lifecycle,
        }
    }

    /// Reads what control clients sent; each complete request becomes an event, answered
    /// when it is dispatched.
    pub(super) fn read_control(&mut self, token: Token, out: &mut Vec<Event>) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        control.handle(self.lp.registry(), token, &mut |request, id| {
            out.push(Event::Control {
                id,
                request: request.clone(),
            });
            None
        });
    }

    /// Reads what scrapers sent; each complete request becomes an event.
    pub(super) fn read_scrape(&mut self, token: Token, out: &mut Vec<Event>) {
        if let Some(m) = self.metrics.as_mut() {
            m.handle(self.lp.registry(), token, &mut |id| {
                out.push(Event::Scrape(id))
            });
        }
    }

    /// Answers a scraper with the exposition of the current snapshot.
    pub(super) fn on_scrape(&mut self, id: crate::metrics::ScrapeId) {
        let body = crate::metrics::render(&self.snapshot());
        if let Some(m) = self.metrics.as_mut() {
            m.respond(self.lp.registry(), id, &body);
        }
    }

    /// Answers a control request (a reload is answered later, once it succeeds or fails).
    pub(super) fn on_request(&mut self, id: ClientId, request: Request) {
        let answer = match request {
            Request::Stats => Response::Stats(Box::new(self.snapshot())),
            Request::Reload => match self.start_reload(Some(id)) {
                Ok(()) => return,
                Err(why) => Response::error(why),
            },
            Request::Stop => {
                // The operator stops the service: the old master must not take it back.
                self.commit_predecessor("the server is stopping");
                if self.phase == Phase::Running {
                    self.begin_drain("control request");
                }
                Response::Stopping {
                    ok: true,
                    pid: std::process::id(),
                    drain_timeout_secs: self.settings.drain().as_secs_f64(),
                }
            }
            Request::Upgrade => match self.start_upgrade() {
                Ok(()) => Response::Upgrading {
                    ok: true,
                    new_master_pid: self.successor.as_ref().map_or(0, |s| s.pid.as_raw() as u32),
                },
                Err(e) => {
                    protocol::log!("control request: no upgrade: {e:#}");
                    Response::error(format!("no upgrade: {e:#}"))
                }
            },
            Request::UpgradeCommit => match self.commit_predecessor("control request") {
                Some(pid) => Response::Committed {
                    ok: true,
                    old_master_pid: pid,
                },
                None => Response::error(
                    "no upgrade window is open (the previous master has retired, or --upgrade-grace is 0)",
                ),
            },
            Request::Scale(n) => match self.scale(n) {
                Ok(()) => Response::Scaled {
                    ok: true,
                    workers: self.settings.workers,
                },
                Err(why) => {
                    protocol::log!("control request: scale {n} refused: {why}");
                    Response::error(why)
                }
            },
        };
        self.answer(vec![id], &answer);
    }

    pub(super) fn answer(&mut self, waiters: Vec<ClientId>, answer: &Response) {
        if let Some(c) = self.control.as_mut() {
            for id in waiters {
                c.respond(self.lp.registry(), id, answer);
            }
        }
    }

    pub(super) fn log_stats_when_due(&mut self) {
        let now = self.sys.now();
        if self.stats_log.next().is_some_and(|t| now >= t) {
            let snapshot = self.snapshot();
            self.stats_log.tick(now, || snapshot);
        }
    }
}
