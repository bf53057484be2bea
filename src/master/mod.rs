//! The master: owns the listening socket and the worker pool, and runs the supervision loop.
//!
//! One turn of the loop ([`Master::turn`]): fill the pool → promote a ready reload → announce
//! once → wait (bounded by the next deadline) → collect everything that happened into
//! [`Event`]s (signals recorded by signal-hook, frames and end-of-file on workers' channels,
//! control requests, the successor's readiness) → dispatch each in one `match` → reap → enforce
//! deadlines (drains, hung workers, upgrade). The master never serves a connection and never
//! starts a thread.
//!
//! The policy lives in these files, by role: `pool.rs` (slots, spawning, backoff, scaling),
//! `supervision.rs` (channels, liveness, drain deadlines), `reload.rs` (generations),
//! `upgrade.rs` (binary upgrade), `shutdown.rs` (stop, deadlines), `answers.rs` (control
//! requests and stats). Everything it does to processes and time goes through [`System`], so
//! `tests.rs` drives the same code with fake processes and a fake clock.

mod answers;
mod carryover;
mod pool;
mod reload;
mod settings;
mod shutdown;
mod supervision;
pub mod system;
mod upgrade;
mod window;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use mio::Token;
use protocol::ipc::Message;
use protocol::stats::Counters;
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::balance::Listeners;
use crate::cli::Spawn;
use crate::control::{ClientId, ControlServer, Request};
use crate::liveness::AwakeClock;
use crate::serve_loop::{MAX_WAIT, Ready, ServeLoop, StatsLog};
use crate::signals::{self, Action};

pub use carryover::Carryover;
pub use pool::Backoff;
pub use settings::{MASTER_FDS, MasterConfig, Settings, descriptor_room};
use supervision::WorkerProc;
pub use system::{Os, System};
use upgrade::Successor;

const SUCCESSOR: Token = Token(ServeLoop::FIRST_SOURCE);
/// Tokens of the workers' bus sockets start here (workers' channels stay below).
const HUB_BASE: usize = usize::MAX / 8;
const FIRST_WORKER: usize = ServeLoop::FIRST_SOURCE + 1;
/// After the drain timeout, how long workers get to exit before they are killed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// After an immediate stop is asked of the workers, how long before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a new generation may take to become ready before the reload is abandoned.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new master (binary upgrade) may take to report ready.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the master is in its life cycle; every transition is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Serving; the pool is kept full.
    Running,
    /// Workers finish open connections; SIGKILL after `kill_at`.
    Draining { kill_at: Instant },
    /// Workers were told to stop now; SIGKILL after `kill_at`.
    Stopping { kill_at: Instant },
    /// A binary upgrade's new master serves: this one has no workers but keeps the sockets
    /// until `until`, to take the service back should the new one die (`window.rs`).
    UpgradeWindow { until: Instant },
}

/// Something the loop must act on. Everything that happened in one wait is collected first,
/// then dispatched in order, in one `match` ([`Master::dispatch`]).
#[derive(Debug)]
enum Event {
    /// A signal, recorded by its handler.
    Signal(i32),
    /// A frame from the worker under `key`.
    Message { key: usize, msg: Message },
    /// The worker's channel ended (`why` when it broke rather than closed).
    ChannelClosed { key: usize, why: Option<String> },
    /// A control client's request, to be answered.
    Control { id: ClientId, request: Request },
    /// A scraper asked for the metrics.
    Scrape(crate::metrics::ScrapeId),
    /// The new master of a binary upgrade says it serves.
    SuccessorReady,
    /// The new master says the upgrade is final (`upgrade --commit`, or it is stopping or
    /// upgrading in turn): this one retires now.
    SuccessorCommitted,
    /// The new master's stats so far (it reports them while the window is open).
    SuccessorStats(Box<Carryover>),
}

/// Runs the process-mode server on `listeners` until it is stopped. `Ok` is a requested stop;
/// `Err` says why the master gave up.
pub fn run(
    cfg: MasterConfig,
    settings: Settings,
    listener: Listeners,
    addr: SocketAddr,
    control: ControlServer,
    metrics: Option<crate::metrics::MetricsServer>,
) -> Result<()> {
    let signals = Signals::new(signals::numbers()).context("installing signal handlers")?;
    let mut master = Master::new(Os, cfg, settings, listener, addr, control, Some(signals))?;
    if master.settings.worker.service.needs_bus() {
        master.hub = Some(crate::hub::Hub::new(HUB_BASE));
    }
    if let Some(m) = metrics {
        master.metrics = Some(master.lp.watch_metrics(m)?);
    }
    master.run()
}

/// The master's state; its verbs are spread over this module's files by role.
struct Master<S: System> {
    sys: S,
    cfg: MasterConfig,
    /// The settings in force for the serving generation.
    settings: Settings,
    /// The listening socket(s): one shared, or one per slot (`--balance`).
    listener: Option<Listeners>,
    addr: SocketAddr,
    /// The poll, signals and control socket (a fork-mode child drops the signals).
    lp: ServeLoop,
    workers: Slab<WorkerProc>,
    by_pid: HashMap<nix::unistd::Pid, usize>,
    slots: Vec<Backoff>,
    /// The serving generation.
    generation: u32,
    reload: Option<reload::Reload>,
    successor: Option<Successor>,
    /// Started by an upgrade: the old master, waiting out its window (`window.rs`).
    predecessor: Option<window::Predecessor>,
    phase: Phase,
    announced: bool,
    /// Why the master gave up, if it did; turns the final exit into an error.
    failure: Option<String>,
    control: Option<ControlServer>,
    started: Instant,
    /// The master's own time awake, on which worker silence is measured.
    clock: AwakeClock,
    /// Counters of workers that are gone, so totals never go backward.
    retired: Counters,
    stats_log: StatsLog,
    /// Reloads, upgrades and respawns so far, for stats and metrics.
    lifecycle: crate::stats::Lifecycle,
    /// `--metrics`: the Prometheus endpoint.
    metrics: Option<crate::metrics::MetricsServer>,
    /// The workers' bus, for a service whose workers must reach each other (chat).
    hub: Option<crate::hub::Hub>,
}

impl<S: System> Master<S> {
    fn new(
        sys: S,
        cfg: MasterConfig,
        settings: Settings,
        listener: Listeners,
        addr: SocketAddr,
        mut control: ControlServer,
        signals: Option<Signals>,
    ) -> Result<Master<S>> {
        let lp = ServeLoop::new(signals, &mut control)?;
        let now = sys.now();
        let slots = vec![Backoff::default(); settings.workers as usize];
        let carried = cfg.carried;
        let mut retired = carried.totals;
        retired.active = 0;
        // Started by an upgrade: the server's uptime goes on from the first master's start,
        // its generations continue, and this upgrade counts.
        let upgraded = cfg.predecessor.is_some() || carried.generation > 0;
        // From the first master's start on the system-wide clock when the predecessor sent it
        // (this master's exec-to-ready time then counts too), else from its uptime.
        let uptime = if carried.started_monotonic > 0.0 {
            carryover::monotonic_now() - carried.started_monotonic
        } else {
            carried.uptime_secs
        };
        let started = now
            .checked_sub(Duration::try_from_secs_f64(uptime).unwrap_or_default())
            .unwrap_or(now);
        let mut lifecycle = carried.lifecycle;
        lifecycle.upgrades += u64::from(upgraded);
        let stats_log = StatsLog::new(
            cfg.log_stats
                .then(|| settings.worker.stats_every())
                .flatten(),
            now,
        );
        Ok(Master {
            sys,
            cfg,
            settings,
            listener: Some(listener),
            addr,
            lp,
            workers: Slab::new(),
            by_pid: HashMap::new(),
            slots,
            generation: carried.generation.saturating_add(1),
            reload: None,
            successor: None,
            predecessor: None,
            phase: Phase::Running,
            announced: false,
            failure: None,
            control: Some(control),
            started,
            clock: AwakeClock::new(now, MAX_WAIT + Duration::from_secs(1)),
            retired,
            stats_log,
            lifecycle,
            metrics: None,
            hub: None,
        })
    }

    fn run(&mut self) -> Result<()> {
        protocol::log!(
            "starting {} worker(s) (spawn={}) on {}; control socket {}",
            self.settings.workers,
            match self.cfg.spawn {
                Spawn::Fork => "fork",
                Spawn::Exec => "exec",
            },
            self.addr,
            self.cfg.control.display()
        );
        if self.settings.worker_timeout.is_some() && self.settings.worker.stats_every().is_none() {
            protocol::log!(
                "--stats-interval 0: workers send no heartbeat, so hung workers go undetected"
            );
        }
        while !self.turn(None)? {}
        self.stats_log.finish(|| self.snapshot());
        protocol::log!("all workers exited; master exiting");
        match self.failure.take() {
            Some(why) => Err(anyhow!(why)),
            None => Ok(()),
        }
    }

    /// One turn of the loop; `true` once the master is done (stopped and every child gone).
    /// `wait` overrides how long to wait for events (tests pass zero).
    fn turn(&mut self, wait: Option<Duration>) -> Result<bool> {
        self.manage_workers();
        self.update_balance();
        self.check_reload();
        self.announce_when_ready();
        if self.phase != Phase::Running && self.workers.is_empty() && self.successor.is_none() {
            return Ok(true);
        }
        let ready = self
            .lp
            .wait(self.sys.now(), [self.next_timer()], wait)
            .context("waiting for events")?;
        self.clock.tick(self.sys.now());
        let happened = self.collect(ready);
        for event in happened {
            self.dispatch(event);
        }
        // SIGCHLD coalesces and can race the loop: reap on every turn, not only on signal.
        self.reap();
        self.enforce_deadlines();
        Ok(false)
    }

    /// Turns readiness into events, reading what each ready source holds.
    fn collect(&mut self, ready: Vec<Ready>) -> Vec<Event> {
        let mut happened = Vec::new();
        for r in ready {
            match r {
                Ready::Signal(sig) => happened.push(Event::Signal(sig)),
                Ready::Control(t) => self.read_control(t, &mut happened),
                Ready::Metrics(t) => self.read_scrape(t, &mut happened),
                Ready::Source(SUCCESSOR) => self.read_successor(&mut happened),
                // Bus traffic is data the hub passes on, not an event for the policy.
                Ready::Source(t) if self.hub.as_ref().is_some_and(|h| h.owns(t)) => {
                    if let Some(hub) = self.hub.as_mut() {
                        hub.ready(self.lp.registry(), t);
                    }
                }
                Ready::Source(Token(t)) => self.read_channel(t - FIRST_WORKER, &mut happened),
            }
        }
        happened
    }

    /// Acts on one event: the only place where what happened becomes what the master does.
    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Signal(sig) => self.on_signal(sig),
            Event::Message { key, msg } => self.on_message(key, msg),
            Event::ChannelClosed { key, why } => self.on_channel_closed(key, why),
            Event::Control { id, request } => self.on_request(id, request),
            Event::Scrape(id) => self.on_scrape(id),
            Event::SuccessorReady => self.on_successor_ready(),
            Event::SuccessorCommitted => self.retire("the new master committed the upgrade"),
            Event::SuccessorStats(c) => {
                if let Some(s) = self.successor.as_mut() {
                    s.reported = Some(*c);
                }
            }
        }
    }

    fn on_signal(&mut self, sig: i32) {
        let name = signals::name(sig);
        if self.window_signal(sig) {
            return;
        }
        match signals::action(sig) {
            Some(Action::Reap) => self.reap(),
            Some(Action::GracefulStop) => {
                // The operator stops the service: the old master must not take it back.
                self.commit_predecessor("the server is stopping");
                match self.phase {
                    Phase::Running => self.begin_drain(&format!("SIG{name}")),
                    _ => self.stop_now(&format!("second SIG{name}")),
                }
            }
            Some(Action::StopNow) => {
                self.commit_predecessor("the server is stopping");
                self.stop_now(&format!("SIG{name}"));
            }
            Some(Action::Reload) => {
                // Refusals are logged by start_reload itself.
                let _ = self.start_reload(None);
            }
            Some(Action::AddWorker) => {
                if let Err(why) = self.scale(self.settings.workers.saturating_add(1).min(4096)) {
                    protocol::log!("SIGTTIN: {why}");
                }
            }
            Some(Action::RemoveWorker) => {
                let _ = self.scale(self.settings.workers.saturating_sub(1).max(1));
            }
            Some(Action::Upgrade) => {
                if let Err(e) = self.start_upgrade() {
                    protocol::log!("SIGUSR2: no upgrade: {e:#}");
                }
            }
            Some(Action::Ignore) => {
                protocol::log!("SIG{name}: not a signal this server acts on; ignored")
            }
            None => {}
        }
    }
}
