//! The master: owns the listening socket and the worker pool, and runs the supervision loop.
//!
//! The loop: wait (bounded by the next timer) → turn what happened into [`Event`]s (signals
//! recorded by signal-hook, frames and end-of-file from workers' channels) → handle each →
//! reap every exited child → enforce deadlines → top the pool back up → announce readiness
//! once. The master never serves a connection and never starts a thread.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use mio::net::UnixStream;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use socket2::Socket;
use worker::WorkerConfig;
use worker::ipc::{FrameDecoder, Message};
use worker::stats::Counters;

use crate::cli::Spawn;
use crate::control::{ControlServer, Request};
use crate::signals::{self, Action};
use crate::spawn::spawn_worker;
use crate::stats::{Snapshot, WorkerRow};

const SIGNALS: Token = Token(0);
const FIRST_WORKER: usize = 1;
/// Tokens from here up belong to the control socket.
const CONTROL_BASE: usize = usize::MAX / 2;
/// Longest the loop sleeps with nothing to do.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// After the drain timeout, how long workers get to exit before they are killed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// After an immediate stop is asked of the workers, how long before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What the master needs to run a process-mode pool.
#[derive(Debug)]
pub struct MasterConfig {
    /// Pool size.
    pub workers: u32,
    /// fork or exec.
    pub spawn: Spawn,
    /// The path of this binary, exec'd by exec-mode spawning.
    pub exe: CString,
    /// Graceful-stop budget for open connections.
    pub drain_timeout: Duration,
    /// Template for every worker (descriptors, id and generation are filled in per spawn).
    pub worker: WorkerConfig,
    /// Where to serve the control socket.
    pub control: std::path::PathBuf,
    /// Log a line of totals every stats interval.
    pub log_stats: bool,
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
    /// Asked to drain (it is no longer expected to serve new connections).
    draining: bool,
}

/// Respawn policy for one pool slot: a worker that dies soon after it started is respawned
/// with exponential backoff, and after [`Backoff::LIMIT`] such deaths in a row the master gives
/// up rather than loop forever.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    fast_failures: u32,
    /// When the slot may be filled again.
    pub not_before: Option<Instant>,
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

/// Runs the process-mode server on `listener` until it is stopped. `Ok` is a requested stop;
/// `Err` says why the master gave up.
pub fn run(cfg: MasterConfig, listener: Socket, addr: SocketAddr) -> Result<()> {
    let mut master = Master::new(cfg, listener, addr)?;
    master.run()
}

struct Master {
    cfg: MasterConfig,
    listener: Option<Socket>,
    addr: SocketAddr,
    poll: Poll,
    /// Owned in an `Option` so a fork-mode child can drop it (and so unregister the master's
    /// signal actions) before it becomes a worker.
    signals: Option<Signals>,
    workers: Slab<WorkerProc>,
    by_pid: HashMap<Pid, usize>,
    slots: Vec<Backoff>,
    generation: u32,
    phase: Phase,
    announced: bool,
    /// Why the master gave up, if it did; turns the final exit into an error.
    failure: Option<String>,
    control: Option<ControlServer>,
    started: Instant,
    /// Counters of workers that are gone, so totals never go backward.
    retired: Counters,
    next_stats_log: Option<Instant>,
    last_logged: Option<Snapshot>,
}

impl Master {
    fn new(cfg: MasterConfig, listener: Socket, addr: SocketAddr) -> Result<Master> {
        let poll = Poll::new().context("creating the master's event loop")?;
        let mut signals = Signals::new(signals::numbers()).context("installing signal handlers")?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .context("watching signals")?;
        let control = ControlServer::bind(&cfg.control, poll.registry(), CONTROL_BASE)?;
        let slots = vec![Backoff::default(); cfg.workers as usize];
        let next_stats_log = cfg
            .log_stats
            .then(|| cfg.worker.stats_every())
            .flatten()
            .map(|d| Instant::now() + d);
        Ok(Master {
            cfg,
            listener: Some(listener),
            addr,
            poll,
            signals: Some(signals),
            workers: Slab::new(),
            by_pid: HashMap::new(),
            slots,
            generation: 1,
            phase: Phase::Running,
            announced: false,
            failure: None,
            control: Some(control),
            started: Instant::now(),
            retired: Counters::default(),
            next_stats_log,
            last_logged: None,
        })
    }

    fn run(&mut self) -> Result<()> {
        worker::log!(
            "starting {} worker(s) (spawn={:?}) on {}; control socket {}",
            self.cfg.workers,
            self.cfg.spawn,
            self.addr,
            self.cfg.control.display()
        );
        let mut events = Events::with_capacity(256);
        loop {
            self.manage_workers();
            self.announce_when_ready();
            if self.phase != Phase::Running && self.workers.is_empty() {
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
            let mut happened = Vec::new();
            for event in events.iter() {
                match event.token() {
                    SIGNALS => {
                        if let Some(s) = self.signals.as_mut() {
                            happened.extend(s.pending().map(Event::Signal));
                        }
                    }
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
            worker::log!("{}", self.snapshot().log_line(None));
        }
        worker::log!("all workers exited; master exiting");
        match self.failure.take() {
            Some(why) => Err(anyhow!(why)),
            None => Ok(()),
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Signal(sig) => match signals::action(sig) {
                Some(Action::Reap) => self.reap(),
                Some(Action::GracefulStop) => match self.phase {
                    Phase::Running => self.begin_drain(signals::name(sig)),
                    _ => self.stop_now(&format!("second SIG{}", signals::name(sig))),
                },
                Some(Action::StopNow) => self.stop_now(&format!("SIG{}", signals::name(sig))),
                Some(Action::Reload) => {
                    worker::log!("SIGHUP: reload is not supported yet; ignored")
                }
                None => {}
            },
            Event::Message { key, msg } => {
                let Some(w) = self.workers.get_mut(key) else {
                    return;
                };
                match msg {
                    Message::Ready => {
                        w.ready = true;
                        worker::log!("worker {} (pid {}) is accepting", w.id, w.pid);
                    }
                    Message::Report(c) | Message::Final(c) => {
                        w.counters = c;
                        w.last_report = Some(Instant::now());
                    }
                }
            }
            Event::ChannelClosed { key, why } => {
                if let Some(w) = self.workers.get_mut(key) {
                    if let Some(why) = why {
                        // A worker that speaks garbage is broken: closing its channel makes it
                        // exit (it treats end-of-file as "master gone"), and it is replaced.
                        worker::log!("dropping worker {} (pid {})'s channel: {why}", w.id, w.pid);
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
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    worker::log!("waitpid failed: {e}");
                    return;
                }
                Ok(s) => s,
            };
            let (pid, how, code) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exit code {code}"), Some(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, format!("signal {sig}"), None),
                _ => continue,
            };
            let Some(key) = self.by_pid.remove(&pid) else {
                continue;
            };
            let mut w = self.workers.remove(key);
            if let Some(mut ch) = w.channel.take() {
                // Its final report may still sit in the socket: read it before letting go.
                let mut late = Vec::new();
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = ch.read(&mut buf) {
                    w.decoder.push(&buf[..n]);
                }
                while let Ok(Some(msg)) = w.decoder.next_message() {
                    late.push(msg);
                }
                if let Some(Message::Report(c) | Message::Final(c)) = late.last() {
                    w.counters = *c;
                }
                let _ = self.poll.registry().deregister(&mut ch);
            }
            let mut gone = w.counters;
            gone.active = 0;
            self.retired.add(&gone);
            worker::log!("worker {} (pid {pid}) exited: {how}", w.id);
            self.after_death(&w, &how, code);
        }
    }

    fn after_death(&mut self, w: &WorkerProc, how: &str, code: Option<i32>) {
        if self.phase != Phase::Running || w.generation != self.generation {
            return; // it was asked to go
        }
        if code == Some(worker::EXIT_BOOT_FAILURE) {
            self.give_up(format!(
                "worker {} could not start ({how}; its log line above says why)",
                w.id
            ));
            return;
        }
        let slot = &mut self.slots[w.id as usize];
        match slot.on_death(w.started.elapsed(), w.ready) {
            Some(delay) => {
                slot.not_before = Some(Instant::now() + delay);
                if !delay.is_zero() {
                    worker::log!(
                        "worker {} failed {} time(s) right after starting; respawning in {delay:?}",
                        w.id,
                        slot.failures()
                    );
                }
            }
            None => {
                let n = slot.failures();
                self.give_up(format!(
                    "worker {} died {n} times in a row within {:?} of starting (last: {how}); giving up",
                    w.id,
                    Backoff::FAST
                ));
            }
        }
    }

    /// Fills every empty slot whose backoff has passed.
    fn manage_workers(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        let now = Instant::now();
        for id in 0..self.cfg.workers {
            let filled = self
                .workers
                .iter()
                .any(|(_, w)| w.id == id && w.generation == self.generation);
            let slot = &self.slots[id as usize];
            if filled || slot.not_before.is_some_and(|t| now < t) {
                continue;
            }
            if let Err(e) = self.spawn(id) {
                worker::log!("cannot start worker {id}: {e:#}");
                let slot = &mut self.slots[id as usize];
                match slot.on_death(Duration::ZERO, false) {
                    Some(delay) => slot.not_before = Some(now + delay),
                    None => {
                        self.give_up(format!("cannot start worker {id}: {e:#}"));
                        return;
                    }
                }
            }
        }
    }

    fn spawn(&mut self, id: u32) -> Result<()> {
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| anyhow!("the listener is closed"))?
            .as_raw_fd();
        let mut cfg = self.cfg.worker.clone();
        cfg.id = id;
        cfg.generation = self.generation;
        let signals = &mut self.signals;
        let spawned = spawn_worker(self.cfg.spawn, &self.cfg.exe, listener, cfg, || {
            // In the child: drop the master's signal delivery, which unregisters its actions
            // so they cannot write into a descriptor number the worker reuses.
            drop(signals.take());
        })
        .context("fork")?;
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
            generation: self.generation,
            started: Instant::now(),
            ready: false,
            channel: Some(channel),
            decoder: FrameDecoder::default(),
            counters: Counters::default(),
            last_report: None,
            draining: false,
        });
        self.by_pid.insert(spawned.pid, key);
        worker::log!("spawned worker {id} (pid {})", spawned.pid);
        Ok(())
    }

    fn announce_when_ready(&mut self) {
        if self.announced || self.phase != Phase::Running {
            return;
        }
        let ready = self
            .workers
            .iter()
            .filter(|(_, w)| w.ready && w.generation == self.generation)
            .count();
        if ready == self.cfg.workers as usize {
            self.announced = true;
            crate::announce(self.addr, "process", self.cfg.workers);
        }
    }

    fn begin_drain(&mut self, signal: &str) {
        let kill_at = Instant::now() + self.cfg.drain_timeout + DRAIN_GRACE;
        self.phase = Phase::Draining { kill_at };
        // Close our copy of the listener; once the workers close theirs the kernel refuses
        // new connections instead of queueing them for nobody.
        self.listener = None;
        worker::log!(
            "SIG{signal}: graceful stop; draining {} worker(s) for up to {:?}",
            self.workers.len(),
            self.cfg.drain_timeout
        );
        for (_, w) in &mut self.workers {
            w.draining = true;
        }
        self.signal_all(Signal::SIGTERM);
    }

    fn stop_now(&mut self, why: &str) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        self.phase = Phase::Stopping {
            kill_at: Instant::now() + STOP_GRACE,
        };
        self.listener = None;
        worker::log!("{why}: stopping now");
        self.signal_all(Signal::SIGQUIT);
    }

    fn give_up(&mut self, why: String) {
        worker::log!("{why}");
        self.failure.get_or_insert(why);
        self.stop_now("giving up");
    }

    fn next_timer(&self) -> Option<Instant> {
        let kill_at = match self.phase {
            Phase::Draining { kill_at } | Phase::Stopping { kill_at } => Some(kill_at),
            Phase::Running => None,
        };
        let respawn = self.slots.iter().filter_map(|s| s.not_before).min();
        let control = self.control.as_ref().and_then(ControlServer::next_deadline);
        [kill_at, respawn, control, self.next_stats_log]
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
        Snapshot::new(
            "process",
            now.duration_since(self.started).as_secs_f64(),
            self.generation,
            rows,
            &self.retired,
        )
    }

    fn serve_control(&mut self, token: Token) {
        let Some(mut control) = self.control.take() else {
            return;
        };
        control.handle(self.poll.registry(), token, &mut |req| match req {
            Request::Stats => serde_json::to_string(&self.snapshot()).unwrap_or_default(),
        });
        self.control = Some(control);
    }

    fn log_stats_when_due(&mut self) {
        let Some(every) = self.cfg.worker.stats_every() else {
            return;
        };
        if self.next_stats_log.is_some_and(|t| Instant::now() >= t) {
            self.next_stats_log = Some(Instant::now() + every);
            let snap = self.snapshot();
            worker::log!("{}", snap.log_line(self.last_logged.as_ref()));
            self.last_logged = Some(snap);
        }
    }

    fn enforce_deadlines(&mut self) {
        if let Some(control) = self.control.as_mut() {
            control.expire(self.poll.registry());
        }
        self.log_stats_when_due();
        if let Phase::Draining { kill_at } | Phase::Stopping { kill_at } = self.phase {
            if Instant::now() >= kill_at && !self.workers.is_empty() {
                worker::log!(
                    "{} worker(s) still running after the deadline; killing",
                    self.workers.len()
                );
                self.signal_all(Signal::SIGKILL);
                // Give them a moment to die; the next turns reap them.
                self.phase = Phase::Stopping {
                    kill_at: Instant::now() + MAX_WAIT,
                };
            }
        }
    }

    fn signal_all(&self, sig: Signal) {
        for (_, w) in &self.workers {
            match kill(w.pid, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => worker::log!("cannot send {sig} to worker {} (pid {}): {e}", w.id, w.pid),
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
