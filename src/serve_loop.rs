//! The loop skeleton the three serving loops share — the master, thread mode and
//! fork-per-conn: one poll with the signal self-pipe and the control socket registered under
//! fixed tokens, a wait bounded by the next deadline (never more than [`MAX_WAIT`], so timers
//! stay honest), EINTR absorbed, and readiness sorted into signals, control clients and the
//! mode's own sources; plus the `--log-stats` cadence. Each mode keeps only its policy.

use std::io;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::{Events, Interest, Poll, Registry, Token};
use signal_hook_mio::v1_0::Signals;

use crate::control::ControlServer;
use crate::stats::Snapshot;

/// The signal self-pipe's token.
const SIGNALS: Token = Token(0);
/// Tokens from here up belong to the control socket; a mode's own sources use those below
/// [`METRICS_BASE`].
const CONTROL_BASE: usize = usize::MAX / 2;
/// Tokens from here to [`CONTROL_BASE`] belong to the metrics endpoint.
const METRICS_BASE: usize = usize::MAX / 4;
/// Longest a loop sleeps with nothing to do.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// What became ready during one wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// A signal was delivered (recorded by its handler, read from the self-pipe).
    Signal(i32),
    /// A control client (or the control listener) is ready: pass the token to
    /// [`ControlServer::handle`].
    Control(Token),
    /// A metrics scraper (or the metrics listener): pass the token to
    /// [`MetricsServer::handle`](crate::metrics::MetricsServer::handle).
    Metrics(Token),
    /// One of the mode's own sources.
    Source(Token),
}

/// A mode's poll, with signals and the control socket registered.
pub struct ServeLoop {
    poll: Poll,
    /// In an `Option` so a fork child can drop it, which unregisters the parent's signal
    /// actions before they could write into a descriptor number the child reuses.
    signals: Option<Signals>,
    events: Events,
}

impl ServeLoop {
    /// The first token a mode may use for its own sources.
    pub const FIRST_SOURCE: usize = 1;

    /// A loop watching `signals` (if any: tests inject them instead) and `control`.
    pub fn new(mut signals: Option<Signals>, control: &mut ControlServer) -> Result<ServeLoop> {
        let poll = Poll::new().context("creating the event loop")?;
        if let Some(s) = signals.as_mut() {
            poll.registry()
                .register(s, SIGNALS, Interest::READABLE)
                .context("watching signals")?;
        }
        control
            .register(poll.registry(), CONTROL_BASE)
            .context("watching the control socket")?;
        Ok(ServeLoop {
            poll,
            signals,
            events: Events::with_capacity(256),
        })
    }

    /// Where the mode registers its own sources (tokens from [`Self::FIRST_SOURCE`] up).
    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// Watches the metrics endpoint; returns it, registered.
    pub fn watch_metrics(
        &self,
        mut metrics: crate::metrics::MetricsServer,
    ) -> Result<crate::metrics::MetricsServer> {
        metrics
            .register(self.poll.registry(), METRICS_BASE)
            .context("watching the metrics socket")?;
        Ok(metrics)
    }

    /// Watches `control` again (after [`unwatch`](Self::unwatch)), or a new control socket.
    pub fn watch_control(&self, control: &mut ControlServer) -> Result<()> {
        control
            .register(self.poll.registry(), CONTROL_BASE)
            .context("watching the control socket")
    }

    /// Watches `metrics` again after [`unwatch`](Self::unwatch).
    pub fn rewatch_metrics(&self, metrics: &mut crate::metrics::MetricsServer) -> Result<()> {
        metrics
            .register(self.poll.registry(), METRICS_BASE)
            .context("watching the metrics socket")
    }

    /// Stops watching a listener (it stays open): its connections wait in its queue for
    /// whoever else accepts on it.
    pub fn unwatch(&self, fd: std::os::fd::RawFd) {
        let _ = self
            .poll
            .registry()
            .deregister(&mut mio::unix::SourceFd(&fd));
    }

    /// Drops the signal registrations (in a fork child, before it becomes something else).
    pub fn drop_signals(&mut self) {
        drop(self.signals.take());
    }

    /// Waits until something is ready, or until the earliest of `deadlines` (at most
    /// [`MAX_WAIT`], or exactly `wait` when given), and says what happened.
    pub fn wait(
        &mut self,
        now: Instant,
        deadlines: impl IntoIterator<Item = Option<Instant>>,
        wait: Option<Duration>,
    ) -> io::Result<Vec<Ready>> {
        let timeout = wait.unwrap_or_else(|| {
            deadlines
                .into_iter()
                .flatten()
                .min()
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(now))
                .min(MAX_WAIT)
        });
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            // A signal interrupted the wait: its handler recorded it, and the self-pipe is
            // readable on the next turn.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => self.events.clear(),
            Err(e) => return Err(e),
        }
        let mut ready = Vec::new();
        for event in self.events.iter() {
            match event.token() {
                SIGNALS => {
                    if let Some(s) = self.signals.as_mut() {
                        ready.extend(s.pending().map(Ready::Signal));
                    }
                }
                t if t.0 >= CONTROL_BASE => ready.push(Ready::Control(t)),
                t if t.0 >= METRICS_BASE => ready.push(Ready::Metrics(t)),
                t => ready.push(Ready::Source(t)),
            }
        }
        Ok(ready)
    }
}

/// The `--log-stats` cadence: a line of totals and rates every interval.
#[derive(Debug, Default)]
pub struct StatsLog {
    every: Option<Duration>,
    next: Option<Instant>,
    last: Option<Snapshot>,
}

impl StatsLog {
    /// Logging every `every` (never with `None`), starting one interval after `now`.
    pub fn new(every: Option<Duration>, now: Instant) -> StatsLog {
        StatsLog {
            every,
            next: every.map(|d| now + d),
            last: None,
        }
    }

    /// When the next line is due, for the loop's wait.
    pub fn next(&self) -> Option<Instant> {
        self.next
    }

    /// Logs a line if one is due, with rates since the previous one.
    pub fn tick(&mut self, now: Instant, snapshot: impl FnOnce() -> Snapshot) {
        let (Some(every), Some(next)) = (self.every, self.next) else {
            return;
        };
        if now >= next {
            self.next = Some(now + every);
            let snap = snapshot();
            protocol::log!("{}", snap.log_line(self.last.as_ref()));
            self.last = Some(snap);
        }
    }

    /// Logs the final line (totals at exit), if stats are logged at all.
    pub fn finish(&self, snapshot: impl FnOnce() -> Snapshot) {
        if self.every.is_some() {
            protocol::log!("{}", snapshot().log_line(None));
        }
    }
}
