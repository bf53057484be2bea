//! The master: owns the listening socket and the worker pool, and runs the supervision loop.
//!
//! The loop: wait (bounded by the next timer) → turn what happened into [`Event`]s (signals
//! recorded by signal-hook, frames and end-of-file from workers' channels, control requests)
//! → handle each → reap every exited child → enforce deadlines (drain, hung workers, reload)
//! → top the pool back up → announce readiness once. The master never serves a connection and
//! never starts a thread.
//!
//! Workers belong to a generation. A reload starts generation N+1 beside N, waits until every
//! new worker reports ready, and only then asks generation N to drain: the listening socket is
//! never closed, so no connection is refused on the way.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use mio::net::UnixStream;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use protocol::ipc::{FrameDecoder, Message};
use protocol::stats::Counters;
use serde_json::json;
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use socket2::Socket;
use worker::WorkerConfig;

use crate::cli::Spawn;
use crate::config::{ConfigError, FileConfig};
use crate::control::{ClientId, ControlServer, Request};
use crate::liveness::{AwakeClock, choose_hung};
use crate::signals::{self, Action};
use crate::spawn::{Handover, reap_exited, spawn_successor, spawn_worker};
use crate::stats::{Snapshot, WorkerRow};
use crate::systemd;

const SIGNALS: Token = Token(0);
const SUCCESSOR: Token = Token(1);
const FIRST_WORKER: usize = 2;
/// Tokens from here up belong to the control socket.
const CONTROL_BASE: usize = usize::MAX / 2;
/// Longest the loop sleeps with nothing to do.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// After the drain timeout, how long workers get to exit before they are killed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// After an immediate stop is asked of the workers, how long before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a new generation may take to become ready before the reload is abandoned.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new master (binary upgrade) may take to report ready.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the master needs to run a process-mode pool.
#[derive(Debug)]
pub struct MasterConfig {
    /// fork or exec.
    pub spawn: Spawn,
    /// The path of this binary, exec'd by exec-mode spawning.
    pub exe: CString,
    /// Where to serve the control socket.
    pub control: PathBuf,
    /// Log a line of totals every stats interval.
    pub log_stats: bool,
    /// Re-read on every reload; its keys override `base`.
    pub config_file: Option<PathBuf>,
    /// Written with the master's pid at start, removed at exit.
    pub pid_file: Option<PathBuf>,
    /// The settings the command line gave.
    pub base: Settings,
    /// Set when this master was started by a binary upgrade: it takes over the control
    /// socket's path and writes `ready` here once it serves.
    pub predecessor: Option<OwnedFd>,
    /// The UDP socket every worker shares, with `--udp`.
    pub udp: Option<std::net::UdpSocket>,
    /// Totals handed over by the master this one replaced (binary upgrade), so totals never
    /// go backward across an upgrade.
    pub totals: Counters,
}

/// The settings a reload can change.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pool size.
    pub workers: u32,
    /// A worker silent for this long is killed and replaced (`None`: never).
    pub worker_timeout: Option<Duration>,
    /// Template for every worker (descriptors, id and generation are filled in per spawn).
    pub worker: WorkerConfig,
}

impl Settings {
    /// These settings with a config file's keys applied.
    pub fn with_file(&self, file: &FileConfig) -> Settings {
        let mut s = self.clone();
        if let Some(n) = file.workers {
            s.workers = n;
        }
        if let Some(d) = file.drain_timeout {
            s.worker.drain_timeout = d;
        }
        if let Some(m) = file.max_unsent {
            s.worker.max_unsent = m as usize;
        }
        if let Some(i) = file.stats_interval {
            s.worker.stats_interval = i;
        }
        if let Some(t) = file.worker_timeout {
            s.worker_timeout = (t > 0.0).then(|| protocol::duration::secs(t));
        }
        s
    }

    /// The settings in force: `base`, overridden by the config file if there is one.
    pub fn resolve(base: &Settings, file: Option<&PathBuf>) -> Result<Settings, ConfigError> {
        match file {
            Some(path) => Ok(base.with_file(&FileConfig::load(path)?)),
            None => Ok(base.clone()),
        }
    }

    fn drain(&self) -> Duration {
        self.worker.drain()
    }
}

/// Where the master is in its life cycle; every transition is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Serving; the pool is kept full.
    Running,
    /// Workers finish open connections; SIGKILL after `kill_at`.
    Draining { kill_at: Instant },
    /// Workers were told to stop now; SIGKILL after `kill_at`.
    Stopping { kill_at: Instant },
}

/// Something the loop must act on.
#[derive(Debug)]
enum Event {
    Signal(i32),
    Message { key: usize, msg: Message },
    ChannelClosed { key: usize, why: Option<String> },
}

/// One live worker process.
#[derive(Debug)]
struct WorkerProc {
    pid: Pid,
    id: u32,
    generation: u32,
    started: Instant,
    ready: bool,
    channel: Option<UnixStream>,
    decoder: FrameDecoder,
    counters: Counters,
    last_report: Option<Instant>,
    /// Asked (or decided) to drain: no longer counted as serving its slot.
    draining: bool,
    /// When it began to drain: it is killed once its own drain timeout (plus grace) is past,
    /// whatever started the drain (a stop, a reload, a scale-down, a TERM sent to it).
    drain_since: Option<Instant>,
    /// Its drain timeout, from the settings it was started with.
    drain: Duration,
    /// SIGKILL was sent: it is only waited for now, and logged once.
    killed: bool,
    /// Awake time (see [`AwakeClock`]) of its last report, or of its start.
    heard: Duration,
}

impl WorkerProc {
    /// Marks it draining (if not already); returns whether it was serving until now.
    fn start_draining(&mut self, now: Instant) -> bool {
        if self.draining {
            return false;
        }
        self.draining = true;
        self.drain_since = Some(now);
        true
    }
}

/// A binary upgrade under way: a new master started from the binary on disk.
#[derive(Debug)]
struct Successor {
    pid: Pid,
    started: Instant,
    ready: io::PipeReader,
}

/// A reload under way: generation `generation` is starting beside the serving one.
#[derive(Debug)]
struct Reload {
    generation: u32,
    settings: Settings,
    started: Instant,
    /// Control clients waiting for the outcome.
    waiters: Vec<ClientId>,
}

/// Respawn policy for one pool slot: a worker that dies soon after it started is respawned
/// with exponential backoff, and after [`Backoff::LIMIT`] such deaths in a row the slot is
/// abandoned (no respawn loop); the other slots keep serving, and the master gives up only
/// when no slot is left serving.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    fast_failures: u32,
    /// When the slot may be filled again.
    pub not_before: Option<Instant>,
    /// The slot kept failing and is no longer respawned (until a reload or scale resets it).
    pub abandoned: bool,
}

impl Backoff {
    /// A death this soon after start (or before reporting ready) counts as a failed start.
    pub const FAST: Duration = Duration::from_secs(1);
    /// Delay after the first failed start; doubled each time.
    pub const FIRST_DELAY: Duration = Duration::from_millis(100);
    /// Failed starts in a row that make the master give up.
    pub const LIMIT: u32 = 6;

    /// Records a worker's death; returns the respawn delay, or `None` to give up.
    pub fn on_death(&mut self, lived: Duration, was_ready: bool) -> Option<Duration> {
        if was_ready && lived >= Self::FAST {
            self.fast_failures = 0;
            return Some(Duration::ZERO);
        }
        self.fast_failures += 1;
        (self.fast_failures < Self::LIMIT)
            .then(|| Self::FIRST_DELAY * 2u32.pow(self.fast_failures - 1))
    }

    /// Failed starts in a row so far.
    pub fn failures(&self) -> u32 {
        self.fast_failures
    }
}

/// Descriptors the master keeps for itself besides one channel per worker.
pub const MASTER_FDS: u64 = 32;

/// Whether the descriptor limit can hold `workers` channels (and, during a reload, the old
/// generation's beside them is why the master raises its limit to the hard one at start).
pub fn descriptor_room(workers: u32) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit};
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let need = u64::from(workers) + MASTER_FDS;
    if need > limit {
        return Err(format!(
            "{workers} workers need about {need} descriptors but the limit (RLIMIT_NOFILE) is {limit}"
        ));
    }
    Ok(())
}

/// Runs the process-mode server on `listener` until it is stopped. `Ok` is a requested stop;
/// `Err` says why the master gave up.
pub fn run(
    cfg: MasterConfig,
    settings: Settings,
    listener: Socket,
    addr: SocketAddr,
    control: ControlServer,
) -> Result<()> {
    Master::new(cfg, settings, listener, addr, control)?.run()
}

struct Master {
    cfg: MasterConfig,
    /// The settings in force for the serving generation.
    settings: Settings,
    listener: Option<Socket>,
    addr: SocketAddr,
    poll: Poll,
    /// Owned in an `Option` so a fork-mode child can drop it (and so unregister the master's
    /// signal actions) before it becomes a worker.
    signals: Option<Signals>,
    workers: Slab<WorkerProc>,
    by_pid: HashMap<Pid, usize>,
    slots: Vec<Backoff>,
    /// The serving generation.
    generation: u32,
    reload: Option<Reload>,
    successor: Option<Successor>,
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
    next_stats_log: Option<Instant>,
    last_logged: Option<Snapshot>,
}

impl Master {
    fn new(
        cfg: MasterConfig,
        settings: Settings,
        listener: Socket,
        addr: SocketAddr,
        mut control: ControlServer,
    ) -> Result<Master> {
        let poll = Poll::new().context("creating the master's event loop")?;
        let mut signals = Signals::new(signals::numbers()).context("installing signal handlers")?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .context("watching signals")?;
        control
            .register(poll.registry(), CONTROL_BASE)
            .context("watching the control socket")?;
        let slots = vec![Backoff::default(); settings.workers as usize];
        let mut cfg = cfg;
        cfg.totals.active = 0;
        let retired = cfg.totals;
        let next_stats_log = cfg
            .log_stats
            .then(|| settings.worker.stats_every())
            .flatten()
            .map(|d| Instant::now() + d);
        Ok(Master {
            cfg,
            settings,
            listener: Some(listener),
            addr,
            poll,
            signals: Some(signals),
            workers: Slab::new(),
            by_pid: HashMap::new(),
            slots,
            generation: 1,
            reload: None,
            successor: None,
            phase: Phase::Running,
            announced: false,
            failure: None,
            control: Some(control),
            started: Instant::now(),
            clock: AwakeClock::new(Instant::now(), MAX_WAIT + Duration::from_secs(1)),
            retired,
            next_stats_log,
            last_logged: None,
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
        let mut events = Events::with_capacity(256);
        loop {
            self.manage_workers();
            self.check_reload();
            self.announce_when_ready();
            if self.phase != Phase::Running && self.workers.is_empty() && self.successor.is_none() {
                break;
            }
            let timeout = self
                .next_timer()
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(Instant::now()))
                .min(MAX_WAIT);
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("waiting for events"),
            }
            self.clock.tick(Instant::now());
            let mut happened = Vec::new();
            for event in events.iter() {
                match event.token() {
                    SIGNALS => {
                        if let Some(s) = self.signals.as_mut() {
                            happened.extend(s.pending().map(Event::Signal));
                        }
                    }
                    SUCCESSOR => self.read_successor(),
                    t if t.0 >= CONTROL_BASE => self.serve_control(t),
                    Token(t) => self.read_channel(t - FIRST_WORKER, &mut happened),
                }
            }
            for event in happened {
                self.handle(event);
            }
            // SIGCHLD coalesces and can race the loop: reap on every turn, not only on signal.
            self.reap();
            self.enforce_deadlines();
        }
        if self.cfg.log_stats {
            protocol::log!("{}", self.snapshot().log_line(None));
        }
        protocol::log!("all workers exited; master exiting");
        match self.failure.take() {
            Some(why) => Err(anyhow!(why)),
            None => Ok(()),
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Signal(sig) => {
                let name = signals::name(sig);
                match signals::action(sig) {
                    Some(Action::Reap) => self.reap(),
                    Some(Action::GracefulStop) => match self.phase {
                        Phase::Running => self.begin_drain(&format!("SIG{name}")),
                        _ => self.stop_now(&format!("second SIG{name}")),
                    },
                    Some(Action::StopNow) => self.stop_now(&format!("SIG{name}")),
                    Some(Action::Reload) => {
                        // Refusals are logged by start_reload itself.
                        let _ = self.start_reload(None);
                    }
                    Some(Action::AddWorker) => {
                        if let Err(why) =
                            self.scale(self.settings.workers.saturating_add(1).min(4096))
                        {
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
            Event::Message { key, msg } => {
                let Some(w) = self.workers.get_mut(key) else {
                    return;
                };
                match msg {
                    Message::Ready => {
                        w.ready = true;
                        w.last_report = Some(Instant::now());
                        w.heard = self.clock.now();
                        protocol::log!(
                            "worker {}/g{} (pid {}) is accepting",
                            w.id,
                            w.generation,
                            w.pid
                        );
                    }
                    Message::Draining => {
                        if w.start_draining(Instant::now()) {
                            protocol::log!(
                                "worker {}/g{} (pid {}) is draining; replacing it",
                                w.id,
                                w.generation,
                                w.pid
                            );
                        }
                    }
                    Message::Report(c) | Message::Final(c) => {
                        w.counters = c;
                        w.last_report = Some(Instant::now());
                        w.heard = self.clock.now();
                    }
                }
            }
            Event::ChannelClosed { key, why } => {
                if let Some(w) = self.workers.get_mut(key) {
                    if let Some(why) = why {
                        // A worker that speaks garbage is broken: closing its channel makes it
                        // exit (it treats end-of-file as "master gone"), and it is replaced.
                        protocol::log!("dropping worker {} (pid {})'s channel: {why}", w.id, w.pid);
                    }
                    if let Some(mut ch) = w.channel.take() {
                        let _ = self.poll.registry().deregister(&mut ch);
                    }
                }
            }
        }
    }

    /// Reads everything a worker's channel has; a closed or broken channel ends it.
    fn read_channel(&mut self, key: usize, out: &mut Vec<Event>) {
        let Some(w) = self.workers.get_mut(key) else {
            return;
        };
        let Some(ch) = w.channel.as_mut() else {
            return;
        };
        let mut buf = [0u8; 1024];
        loop {
            match ch.read(&mut buf) {
                Ok(0) => {
                    out.push(Event::ChannelClosed { key, why: None });
                    break;
                }
                Ok(n) => w.decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    out.push(Event::ChannelClosed {
                        key,
                        why: Some(e.to_string()),
                    });
                    break;
                }
            }
        }
        loop {
            match w.decoder.next_message() {
                Ok(Some(msg)) => out.push(Event::Message { key, msg }),
                Ok(None) => break,
                Err(e) => {
                    out.push(Event::ChannelClosed {
                        key,
                        why: Some(e.to_string()),
                    });
                    break;
                }
            }
        }
    }

    /// Collects every exited child (never leaving a zombie) and decides about its slot.
    fn reap(&mut self) {
        for gone in reap_exited() {
            let (pid, how, code) = (gone.pid, gone.how, gone.code);
            let Some(key) = self.by_pid.remove(&pid) else {
                if self.successor.as_ref().is_some_and(|s| s.pid == pid) {
                    if self.phase == Phase::Running {
                        self.upgrade_failed(&format!("the new master exited ({how})"));
                    } else {
                        // Stopped with us (a stop during an upgrade): nothing to restore but
                        // the pid file it wrote over ours.
                        self.forget_successor();
                        protocol::log!("the new master (pid {pid}) stopped with this one ({how})");
                        self.reclaim_pid_file();
                    }
                }
                continue;
            };
            let mut w = self.workers.remove(key);
            if let Some(mut ch) = w.channel.take() {
                // Its final report may still sit in the socket: read it before letting go.
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = ch.read(&mut buf) {
                    w.decoder.push(&buf[..n]);
                }
                while let Ok(Some(msg)) = w.decoder.next_message() {
                    if let Message::Report(c) | Message::Final(c) = msg {
                        w.counters = c;
                    }
                }
                let _ = self.poll.registry().deregister(&mut ch);
            }
            let mut gone = w.counters;
            gone.active = 0;
            self.retired.add(&gone);
            protocol::log!(
                "worker {}/g{} (pid {pid}) exited: {how}",
                w.id,
                w.generation
            );
            self.after_death(&w, &how, code);
        }
    }

    fn after_death(&mut self, w: &WorkerProc, how: &str, code: Option<i32>) {
        if w.draining || self.phase != Phase::Running {
            return; // it was asked to go
        }
        if self
            .reload
            .as_ref()
            .is_some_and(|r| r.generation == w.generation)
        {
            self.abort_reload(format!(
                "worker {} of generation {} exited while starting ({how})",
                w.id, w.generation
            ));
            return;
        }
        if w.generation != self.generation || w.id >= self.settings.workers {
            return; // an old generation or a slot scaled away
        }
        if code == Some(worker::EXIT_BOOT_FAILURE) && !self.announced {
            // At start-up a worker that cannot boot will not boot on a retry either: say so
            // at once (gunicorn's "worker failed to boot") rather than after the backoff.
            self.give_up(format!(
                "worker {} could not boot ({how}): see its \"cannot start\" line above, or the binary could not be executed",
                w.id
            ));
            return;
        }
        let lived = w.started.elapsed();
        self.slot_failed(w.id, lived, w.ready, how);
    }

    /// Applies the backoff policy to slot `id` after a death (or a failed spawn); abandons
    /// the slot when it keeps failing, and gives up only if no slot is left serving.
    fn slot_failed(&mut self, id: u32, lived: Duration, was_ready: bool, how: &str) {
        let Some(slot) = self.slots.get_mut(id as usize) else {
            return;
        };
        match slot.on_death(lived, was_ready) {
            Some(delay) => {
                slot.not_before = Some(Instant::now() + delay);
                if !delay.is_zero() {
                    protocol::log!(
                        "worker {id} failed {} time(s) right after starting ({how}); respawning in {delay:?}",
                        slot.failures()
                    );
                }
            }
            None => {
                slot.abandoned = true;
                let n = slot.failures();
                let serving = self.serving_slots();
                if serving == 0 {
                    self.give_up(format!(
                        "worker {id} failed {n} times in a row within {:?} of starting (last: {how}), and no other worker is serving; giving up",
                        Backoff::FAST
                    ));
                } else {
                    protocol::log!(
                        "worker {id} failed {n} times in a row within {:?} of starting (last: {how}); \
                         no longer respawning slot {id}: DEGRADED, serving with {serving} worker(s) \
                         (a reload or `prefork-echo scale` tries the slot again)",
                        Backoff::FAST
                    );
                }
            }
        }
    }

    /// Slots of the serving generation with a live, non-draining worker.
    fn serving_slots(&self) -> usize {
        (0..self.settings.workers)
            .filter(|&id| self.slot_filled(self.generation, id))
            .count()
    }

    /// Whether a live, serving worker of `generation` holds slot `id`.
    fn slot_filled(&self, generation: u32, id: u32) -> bool {
        self.workers
            .iter()
            .any(|(_, w)| w.id == id && w.generation == generation && !w.draining)
    }

    /// Fills every empty slot whose backoff has passed, for the serving generation and for a
    /// generation being started by a reload.
    fn manage_workers(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        let now = Instant::now();
        for id in 0..self.settings.workers {
            let slot = &self.slots[id as usize];
            if slot.abandoned
                || self.slot_filled(self.generation, id)
                || slot.not_before.is_some_and(|t| now < t)
            {
                continue;
            }
            let template = self.settings.worker.clone();
            if let Err(e) = self.spawn(id, self.generation, template) {
                protocol::log!("cannot start worker {id}: {e:#}");
                self.slot_failed(id, Duration::ZERO, false, &format!("{e:#}"));
                if self.phase != Phase::Running {
                    return;
                }
            }
        }
        let Some(reload) = &self.reload else { return };
        let (generation, count, template) = (
            reload.generation,
            reload.settings.workers,
            reload.settings.worker.clone(),
        );
        for id in 0..count {
            let started = self
                .workers
                .iter()
                .any(|(_, w)| w.id == id && w.generation == generation);
            if !started {
                if let Err(e) = self.spawn(id, generation, template.clone()) {
                    self.abort_reload(format!("cannot start worker {id}: {e:#}"));
                    return;
                }
            }
        }
    }

    fn spawn(&mut self, id: u32, generation: u32, mut cfg: WorkerConfig) -> Result<()> {
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| anyhow!("the listener is closed"))?
            .as_raw_fd();
        cfg.id = id;
        cfg.generation = generation;
        let signals = &mut self.signals;
        let udp = self.cfg.udp.as_ref().map(AsRawFd::as_raw_fd);
        let drain = cfg.drain();
        let spawned = spawn_worker(self.cfg.spawn, &self.cfg.exe, listener, udp, cfg, || {
            // In the child: drop the master's signal delivery, which unregisters its actions
            // so they cannot write into a descriptor number the worker reuses.
            drop(signals.take());
        })?;
        spawned.channel.set_nonblocking(true)?;
        let mut channel = UnixStream::from_std(spawned.channel);
        let entry = self.workers.vacant_entry();
        let key = entry.key();
        self.poll.registry().register(
            &mut channel,
            Token(key + FIRST_WORKER),
            Interest::READABLE,
        )?;
        entry.insert(WorkerProc {
            pid: spawned.pid,
            id,
            generation,
            started: Instant::now(),
            ready: false,
            channel: Some(channel),
            decoder: FrameDecoder::default(),
            counters: Counters::default(),
            last_report: None,
            draining: false,
            drain_since: None,
            drain,
            killed: false,
            heard: self.clock.now(),
        });
        self.by_pid.insert(spawned.pid, key);
        protocol::log!("spawned worker {id}/g{generation} (pid {})", spawned.pid);
        Ok(())
    }

    fn announce_when_ready(&mut self) {
        if self.announced || self.phase != Phase::Running {
            return;
        }
        let ready = self
            .workers
            .iter()
            .filter(|(_, w)| w.ready && w.generation == self.generation && !w.draining)
            .count();
        if ready >= self.settings.workers as usize {
            self.announced = true;
            crate::announce(self.addr, "process", self.settings.workers);
            systemd::notify(&format!("READY=1\nMAINPID={}", std::process::id()));
            if let Some(fd) = self.cfg.predecessor.take() {
                // The control socket's path is ours from now on (removed at our exit).
                if let Some(c) = self.control.as_mut() {
                    c.claim_name();
                }
                // Tell the master that started us that we serve: it drains and exits.
                let mut pipe = std::fs::File::from(fd);
                let _ = std::io::Write::write_all(&mut pipe, b"ready\n");
            }
        }
    }

    /// Starts a reload; `Err` says why it cannot start (a config error, a stop under way).
    fn start_reload(&mut self, waiter: Option<ClientId>) -> Result<(), String> {
        let via = if waiter.is_some() {
            "control request"
        } else {
            "SIGHUP"
        };
        self.try_start_reload(waiter)
            .inspect_err(|why| protocol::log!("{via}: {why}"))
    }

    fn try_start_reload(&mut self, waiter: Option<ClientId>) -> Result<(), String> {
        if self.phase != Phase::Running {
            return Err("the server is stopping; no reload".into());
        }
        if let Some(r) = self.reload.as_mut() {
            protocol::log!("reload of generation {} already under way", r.generation);
            r.waiters.extend(waiter);
            return Ok(());
        }
        let settings = Settings::resolve(&self.cfg.base, self.cfg.config_file.as_ref())
            .and_then(|s| {
                descriptor_room(s.workers).map_err(|why| crate::config::ConfigError::Read {
                    path: "the new settings".into(),
                    reason: why,
                })?;
                Ok(s)
            })
            .map_err(|e| {
                format!(
                    "reload refused, config file: {e}; generation {} keeps serving",
                    self.generation
                )
            })?;
        systemd::notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            systemd::monotonic_usec()
        ));
        let generation = self.generation + 1;
        protocol::log!(
            "reload: starting generation {generation} ({} worker(s)) beside generation {}",
            settings.workers,
            self.generation
        );
        self.reload = Some(Reload {
            generation,
            settings,
            started: Instant::now(),
            waiters: waiter.into_iter().collect(),
        });
        Ok(())
    }

    /// Promotes the new generation once every worker of it is ready; gives up on it if it
    /// takes too long.
    fn check_reload(&mut self) {
        let Some(r) = &self.reload else { return };
        let ready = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == r.generation && w.ready)
            .count();
        if ready < r.settings.workers as usize {
            if r.started.elapsed() > RELOAD_TIMEOUT {
                self.abort_reload(format!(
                    "generation {} was not ready within {RELOAD_TIMEOUT:?}",
                    r.generation
                ));
            }
            return;
        }
        let Some(r) = self.reload.take() else { return };
        let old = self.generation;
        self.generation = r.generation;
        self.settings = r.settings;
        self.slots = vec![Backoff::default(); self.settings.workers as usize];
        let mut retiring = 0;
        let now = Instant::now();
        for (_, w) in self.workers.iter_mut() {
            if w.generation != self.generation && w.start_draining(now) {
                retiring += 1;
                let _ = kill(w.pid, Signal::SIGTERM);
            }
        }
        protocol::log!(
            "reload: generation {} serving ({} worker(s)); draining {retiring} worker(s) of generation {old}",
            self.generation,
            self.settings.workers
        );
        let line =
            json!({"ok": true, "generation": self.generation, "workers": self.settings.workers})
                .to_string();
        self.answer(r.waiters, line);
        systemd::notify("READY=1");
    }

    /// Gives up a reload: the new generation drains away, the old one goes on serving.
    fn abort_reload(&mut self, why: String) {
        let Some(r) = self.reload.take() else { return };
        let now = Instant::now();
        for (_, w) in self.workers.iter_mut() {
            if w.generation == r.generation && w.start_draining(now) {
                let _ = kill(w.pid, Signal::SIGTERM);
            }
        }
        protocol::log!(
            "reload failed: {why}; generation {} keeps serving",
            self.generation
        );
        self.answer(
            r.waiters,
            json!({ "error": format!("reload failed: {why}") }).to_string(),
        );
        systemd::notify("READY=1");
    }

    /// Binary upgrade: start a new master from the binary on disk and hand it the listener,
    /// the UDP socket and the control socket by descriptor, with the totals so far.
    fn start_upgrade(&mut self) -> Result<()> {
        if self.phase != Phase::Running {
            anyhow::bail!("the server is stopping");
        }
        if self.successor.is_some() {
            anyhow::bail!("an upgrade is already under way");
        }
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| anyhow!("the listener is closed"))?
            .as_raw_fd();
        let control = self
            .control
            .as_ref()
            .ok_or_else(|| anyhow!("the control socket is closed"))?
            .raw_fd();
        let (ready, ready_tx) = io::pipe().context("creating the readiness pipe")?;
        nix::fcntl::fcntl(
            &ready,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let handover = Handover {
            listener,
            udp: self.cfg.udp.as_ref().map(AsRawFd::as_raw_fd),
            control,
            ready: ready_tx.as_raw_fd(),
            totals: serde_json::to_string(&self.snapshot().totals)?,
        };
        let signals = &mut self.signals;
        let pid = spawn_successor(&self.cfg.exe, &handover, || {
            drop(signals.take());
        })
        .context("starting the new master")?;
        drop(ready_tx);
        self.poll.registry().register(
            &mut mio::unix::SourceFd(&ready.as_raw_fd()),
            SUCCESSOR,
            Interest::READABLE,
        )?;
        protocol::log!(
            "upgrade: started a new master (pid {pid}) from {:?}",
            self.cfg.exe
        );
        self.successor = Some(Successor {
            pid,
            started: Instant::now(),
            ready,
        });
        Ok(())
    }

    fn read_successor(&mut self) {
        let Some(s) = self.successor.as_mut() else {
            return;
        };
        let mut buf = [0u8; 64];
        match s.ready.read(&mut buf) {
            Ok(n) if buf[..n].starts_with(b"ready") => {}
            // End-of-file without "ready": it died; the reap says how.
            _ => return,
        }
        let Some(s) = self.forget_successor() else {
            return;
        };
        if self.phase != Phase::Running {
            // A stop raced the upgrade: the successor was told to stop too.
            return;
        }
        protocol::log!(
            "upgrade: new master (pid {}) serving; this master retires",
            s.pid
        );
        if let Some(c) = self.control.as_mut() {
            c.release_name();
        }
        // Not a stop of the service: the new master has told the service manager it is the
        // main process now, so no STOPPING=1 from here.
        self.drain_all("binary upgrade", false);
    }

    /// Stops watching the successor's readiness pipe; it is no longer ours to wait for.
    fn forget_successor(&mut self) -> Option<Successor> {
        let s = self.successor.take()?;
        let _ = self
            .poll
            .registry()
            .deregister(&mut mio::unix::SourceFd(&s.ready.as_raw_fd()));
        Some(s)
    }

    fn upgrade_failed(&mut self, why: &str) {
        let Some(s) = self.forget_successor() else {
            return;
        };
        let _ = kill(s.pid, Signal::SIGKILL);
        protocol::log!(
            "upgrade failed: {why}; this master (pid {}) keeps serving",
            std::process::id()
        );
        self.reclaim_pid_file();
    }

    /// A successor writes its pid over ours when it starts; one that failed or was stopped
    /// leaves this master to put its own back.
    fn reclaim_pid_file(&self) {
        if let Some(path) = &self.cfg.pid_file {
            if let Err(e) = crate::runtime_files::write_pid_file(path, None) {
                protocol::log!("cannot rewrite the pid file: {e}");
            }
        }
    }

    fn answer(&mut self, waiters: Vec<ClientId>, line: String) {
        if let Some(c) = self.control.as_mut() {
            for id in waiters {
                c.respond(self.poll.registry(), id, line.clone());
            }
        }
    }

    /// Resizes the pool: new slots fill on the next turn, surplus workers drain. The size is
    /// kept across reloads (unless the config file sets `workers`). Refused when the
    /// descriptor limit cannot hold one channel per worker.
    fn scale(&mut self, workers: u32) -> Result<(), String> {
        if self.phase != Phase::Running {
            return Err("the server is stopping".into());
        }
        descriptor_room(workers)?;
        if workers == self.settings.workers {
            // Also a way to retry abandoned slots.
            self.slots.iter_mut().for_each(|s| *s = Backoff::default());
            return Ok(());
        }
        protocol::log!(
            "scaling from {} to {}",
            self.settings.workers,
            crate::client::plural(u64::from(workers), "worker")
        );
        self.settings.workers = workers;
        self.cfg.base.workers = workers;
        self.slots = vec![Backoff::default(); workers as usize];
        if let Some(r) = self.reload.as_mut() {
            r.settings.workers = workers;
        }
        let now = Instant::now();
        for (_, w) in self.workers.iter_mut() {
            if w.id >= workers && w.start_draining(now) {
                let _ = kill(w.pid, Signal::SIGTERM);
            }
        }
        Ok(())
    }

    fn begin_drain(&mut self, why: &str) {
        self.drain_all(why, true);
    }

    /// Graceful stop (or retirement after an upgrade, `stopping` false: the service goes on
    /// in the new master).
    fn drain_all(&mut self, why: &str, stopping: bool) {
        let kill_at = Instant::now() + self.settings.drain() + DRAIN_GRACE;
        self.phase = Phase::Draining { kill_at };
        if stopping {
            systemd::notify("STOPPING=1");
        }
        if let Some(r) = self.reload.take() {
            self.answer(
                r.waiters,
                json!({"error": "the server is stopping"}).to_string(),
            );
        }
        self.stop_successor(Signal::SIGTERM);
        // Close our copy of the listener; once the workers close theirs the kernel refuses
        // new connections instead of queueing them for nobody.
        self.listener = None;
        self.cfg.udp = None;
        protocol::log!(
            "{why}: graceful stop; draining {} worker(s) for up to {:?}",
            self.workers.len(),
            self.settings.drain()
        );
        // Only those not yet draining: to a worker, a second SIGTERM means "stop now", and a
        // worker of a reloaded generation may still be finishing its connections.
        let now = Instant::now();
        for (_, w) in &mut self.workers {
            if w.start_draining(now) {
                let _ = kill(w.pid, Signal::SIGTERM);
            }
        }
    }

    /// A stop during an upgrade stops the new master too (it holds the listener and may
    /// already serve): the server stops as a whole, and this master waits for it.
    fn stop_successor(&mut self, sig: Signal) {
        if let Some(s) = &self.successor {
            protocol::log!("stopping the new master (pid {}) too: {sig}", s.pid);
            match kill(s.pid, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => protocol::log!("cannot send {sig} to the new master: {e}"),
            }
        }
    }

    fn stop_now(&mut self, why: &str) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        systemd::notify("STOPPING=1");
        self.phase = Phase::Stopping {
            kill_at: Instant::now() + STOP_GRACE,
        };
        if let Some(r) = self.reload.take() {
            self.answer(
                r.waiters,
                json!({"error": "the server is stopping"}).to_string(),
            );
        }
        self.stop_successor(Signal::SIGQUIT);
        self.listener = None;
        protocol::log!("{why}: stopping now");
        self.signal_all(Signal::SIGQUIT);
    }

    fn give_up(&mut self, why: String) {
        protocol::log!("{why}");
        self.failure.get_or_insert(why);
        self.stop_now("giving up");
    }

    fn next_timer(&self) -> Option<Instant> {
        let kill_at = match self.phase {
            Phase::Draining { kill_at } | Phase::Stopping { kill_at } => Some(kill_at),
            Phase::Running => None,
        };
        let respawn = self.slots.iter().filter_map(|s| s.not_before).min();
        let upgrade = self.successor.as_ref().map(|s| s.started + UPGRADE_TIMEOUT);
        let control = self.control.as_ref().and_then(ControlServer::next_deadline);
        [kill_at, respawn, control, self.next_stats_log, upgrade]
            .into_iter()
            .flatten()
            .min()
    }

    /// The stats snapshot: live workers in slot order, totals including the departed.
    fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
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
        snap.abandoned_slots = (0..self.settings.workers)
            .filter(|&id| self.slots.get(id as usize).is_some_and(|s| s.abandoned))
            .collect();
        snap
    }

    fn serve_control(&mut self, token: Token) {
        let Some(mut control) = self.control.take() else {
            return;
        };
        let Ok(registry) = self.poll.registry().try_clone() else {
            self.control = Some(control);
            return;
        };
        control.handle(&registry, token, &mut |req, id| self.on_request(req, id));
        self.control = Some(control);
    }

    /// A control request's answer, or `None` when it comes later (reload).
    fn on_request(&mut self, req: &Request, id: ClientId) -> Option<String> {
        match req {
            Request::Stats => Some(serde_json::to_string(&self.snapshot()).unwrap_or_default()),
            Request::Reload => match self.start_reload(Some(id)) {
                Ok(()) => None,
                Err(why) => Some(json!({ "error": why }).to_string()),
            },
            Request::Stop => {
                if self.phase == Phase::Running {
                    self.begin_drain("control request");
                }
                Some(json!({"ok": true, "pid": std::process::id(), "drain_timeout_secs": self.settings.drain().as_secs_f64()}).to_string())
            }
            Request::Scale(n) => Some(match self.scale(*n) {
                Ok(()) => json!({"ok": true, "workers": self.settings.workers}).to_string(),
                Err(why) => {
                    protocol::log!("control request: scale {n} refused: {why}");
                    json!({ "error": why }).to_string()
                }
            }),
        }
    }

    fn log_stats_when_due(&mut self) {
        let Some(every) = self.settings.worker.stats_every() else {
            return;
        };
        if self.next_stats_log.is_some_and(|t| Instant::now() >= t) {
            self.next_stats_log = Some(Instant::now() + every);
            let snap = self.snapshot();
            protocol::log!("{}", snap.log_line(self.last_logged.as_ref()));
            self.last_logged = Some(snap);
        }
    }

    fn enforce_deadlines(&mut self) {
        if let Some(control) = self.control.as_mut() {
            control.expire(self.poll.registry());
        }
        self.log_stats_when_due();
        self.kill_hung_workers();
        self.kill_overdue_drains();
        if self
            .successor
            .as_ref()
            .is_some_and(|s| s.started.elapsed() > UPGRADE_TIMEOUT)
        {
            if self.phase == Phase::Running {
                self.upgrade_failed(&format!(
                    "the new master was not ready within {UPGRADE_TIMEOUT:?}"
                ));
            } else if let Some(s) = &self.successor {
                let _ = kill(s.pid, Signal::SIGKILL);
            }
        }
        if let Phase::Draining { kill_at } | Phase::Stopping { kill_at } = self.phase {
            if Instant::now() >= kill_at && !self.workers.is_empty() {
                protocol::log!(
                    "{} worker(s) still running after the deadline; killing",
                    self.workers.len()
                );
                self.signal_all(Signal::SIGKILL);
                for (_, w) in &mut self.workers {
                    w.killed = true;
                }
                // Give them a moment to die; the next turns reap them.
                self.phase = Phase::Stopping {
                    kill_at: Instant::now() + MAX_WAIT,
                };
            }
        }
    }

    /// Every draining worker gets its own drain timeout plus grace, whatever started its
    /// drain (a reload, a scale-down, a TERM sent to it directly): one that outlives it (hung,
    /// or SIGSTOPped) is killed, so no old generation lingers forever.
    fn kill_overdue_drains(&mut self) {
        let now = Instant::now();
        for (_, w) in &mut self.workers {
            let Some(since) = w.drain_since else { continue };
            if !w.killed && now.duration_since(since) > w.drain + DRAIN_GRACE {
                protocol::log!(
                    "worker {}/g{} (pid {}) still draining {:?} after it began (drain timeout {:?}); killing it",
                    w.id,
                    w.generation,
                    w.pid,
                    now.duration_since(since),
                    w.drain
                );
                w.killed = true;
                let _ = kill(w.pid, Signal::SIGKILL);
            }
        }
    }

    /// A worker whose reports (its heartbeats) stopped for `--worker-timeout` is stuck: an
    /// infinite loop, a deadlock, SIGSTOP. It cannot be asked to leave, so it is killed, and
    /// replaced like any worker that died. Silence is judged on the master's awake clock,
    /// after reading whatever the channels hold, and at most half the pool goes per turn
    /// (see `liveness`).
    fn kill_hung_workers(&mut self) {
        let (Some(limit), Some(_)) = (
            self.settings.worker_timeout,
            self.settings.worker.stats_every(),
        ) else {
            return;
        };
        let silences = |m: &Master| -> Vec<(usize, Duration)> {
            let now = m.clock.now();
            m.workers
                .iter()
                .filter(|(_, w)| !w.draining && !w.killed)
                .map(|(k, w)| (k, now.saturating_sub(w.heard)))
                .collect()
        };
        if silences(self).iter().all(|&(_, s)| s <= limit) {
            return;
        }
        // Evidence first: reports may be waiting unread (the master was the slow one).
        let keys: Vec<usize> = self.workers.iter().map(|(k, _)| k).collect();
        let mut pending = Vec::new();
        for key in keys {
            self.read_channel(key, &mut pending);
        }
        for event in pending {
            self.handle(event);
        }
        let pool = self.workers.iter().filter(|(_, w)| !w.draining).count();
        for key in choose_hung(&silences(self), limit, pool) {
            let now = self.clock.now();
            let Some(w) = self.workers.get_mut(key) else {
                continue;
            };
            protocol::log!(
                "worker {}/g{} (pid {}) sent no report for {:?} of the master's time awake; killing it",
                w.id,
                w.generation,
                w.pid,
                now.saturating_sub(w.heard)
            );
            w.killed = true;
            let _ = kill(w.pid, Signal::SIGKILL);
        }
    }

    fn signal_all(&self, sig: Signal) {
        for (_, w) in &self.workers {
            match kill(w.pid, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    protocol::log!("cannot send {sig} to worker {} (pid {}): {e}", w.id, w.pid)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_gives_up_and_resets_after_a_healthy_run() {
        let mut b = Backoff::default();
        let mut delays = Vec::new();
        while let Some(d) = b.on_death(Duration::from_millis(10), false) {
            delays.push(d.as_millis());
        }
        assert_eq!(delays, [100, 200, 400, 800, 1600]);
        assert_eq!(b.failures(), Backoff::LIMIT);

        let mut b = Backoff::default();
        assert_eq!(b.on_death(Duration::ZERO, true), Some(Backoff::FIRST_DELAY));
        // A worker that served for a while and then crashed is replaced at once, and the
        // count of failed starts begins again.
        assert_eq!(
            b.on_death(Duration::from_secs(5), true),
            Some(Duration::ZERO)
        );
        assert_eq!(b.failures(), 0);
    }
}
