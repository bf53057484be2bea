//! Supervision: reading workers' channels, and judging them — a hung worker is killed and
//! replaced, a draining worker that outlives its drain deadline is killed.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use protocol::ipc::{FrameDecoder, Message};
use protocol::stats::Counters;

use super::{DRAIN_GRACE, Event, Master, System};
use crate::liveness::choose_hung;

/// One live worker process.
#[derive(Debug)]
pub(super) struct WorkerProc {
    pub(super) pid: Pid,
    pub(super) id: u32,
    pub(super) generation: u32,
    pub(super) started: Instant,
    pub(super) ready: bool,
    pub(super) channel: Option<UnixStream>,
    pub(super) decoder: FrameDecoder,
    pub(super) counters: Counters,
    pub(super) last_report: Option<Instant>,
    /// Asked (or decided) to drain: no longer counted as serving its slot.
    pub(super) draining: bool,
    /// When it began to drain: it is killed once its own drain timeout (plus grace) is past,
    /// whatever started the drain (a stop, a reload, a scale-down, a TERM sent to it).
    pub(super) drain_since: Option<Instant>,
    /// Its drain timeout, from the settings it was started with.
    pub(super) drain: Duration,
    /// SIGKILL was sent: it is only waited for now, and logged once.
    pub(super) killed: bool,
    /// Awake time (see [`AwakeClock`]) of its last report, or of its start.
    pub(super) heard: Duration,
}

impl WorkerProc {
    /// Marks it draining (if not already); returns whether it was serving until now.
    pub(super) fn start_draining(&mut self, now: Instant) -> bool {
        if self.draining {
            return false;
        }
        self.draining = true;
        self.drain_since = Some(now);
        true
    }
}

impl<S: System> Master<S> {
    /// A frame from a worker: it is ready, it reports (its heartbeat), or it drains.
    pub(super) fn on_message(&mut self, key: usize, msg: Message) {
        let (now, awake) = (self.sys.now(), self.clock.now());
        let Some(w) = self.workers.get_mut(key) else {
            return;
        };
        match msg {
            Message::Ready => {
                w.ready = true;
                w.last_report = Some(now);
                w.heard = awake;
                protocol::log!(
                    "worker {}/g{} (pid {}) is accepting",
                    w.id,
                    w.generation,
                    w.pid
                );
            }
            Message::Draining => {
                if w.start_draining(now) {
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
                w.last_report = Some(now);
                w.heard = awake;
            }
        }
    }

    /// A worker's channel ended. A worker that speaks garbage is broken: closing its channel
    /// makes it exit (it treats end-of-file as "master gone"), and it is replaced.
    pub(super) fn on_channel_closed(&mut self, key: usize, why: Option<String>) {
        if let Some(w) = self.workers.get_mut(key) {
            if let Some(why) = why {
                protocol::log!("dropping worker {} (pid {})'s channel: {why}", w.id, w.pid);
            }
            if let Some(mut ch) = w.channel.take() {
                let _ = self.lp.registry().deregister(&mut ch);
            }
        }
    }

    /// Reads everything a worker's channel has; a closed or broken channel ends it.
    pub(super) fn read_channel(&mut self, key: usize, out: &mut Vec<Event>) {
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

    /// Every draining worker gets its own drain timeout plus grace, whatever started its
    /// drain (a reload, a scale-down, a TERM sent to it directly): one that outlives it (hung,
    /// or SIGSTOPped) is killed, so no old generation lingers forever.
    pub(super) fn kill_overdue_drains(&mut self) {
        let now = self.sys.now();
        for (_, w) in &mut self.workers {
            let Some(since) = w.drain_since else { continue };
            if !w.killed && now.duration_since(since) > w.drain + DRAIN_GRACE {
                protocol::warn!(
                    "worker {}/g{} (pid {}) still draining {:?} after it began (drain timeout {:?}); killing it",
                    w.id,
                    w.generation,
                    w.pid,
                    now.duration_since(since),
                    w.drain
                );
                w.killed = true;
                let _ = self.sys.kill(w.pid, Signal::SIGKILL);
            }
        }
    }

    /// A worker whose reports (its heartbeats) stopped for `--worker-timeout` is stuck: an
    /// infinite loop, a deadlock, SIGSTOP. It cannot be asked to leave, so it is killed, and
    /// replaced like any worker that died. Silence is judged on the master's awake clock,
    /// after reading whatever the channels hold, and at most half the pool goes per turn
    /// (see `liveness`).
    pub(super) fn kill_hung_workers(&mut self) {
        let (Some(limit), Some(_)) = (
            self.settings.worker_timeout,
            self.settings.worker.stats_every(),
        ) else {
            return;
        };
        let silences = |m: &Master<S>| -> Vec<(usize, Duration)> {
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
            self.dispatch(event);
        }
        let pool = self.workers.iter().filter(|(_, w)| !w.draining).count();
        for key in choose_hung(&silences(self), limit, pool) {
            let now = self.clock.now();
            let Some(w) = self.workers.get_mut(key) else {
                continue;
            };
            protocol::warn!(
                "worker {}/g{} (pid {}) sent no report for {:?} of the master's time awake; killing it",
                w.id,
                w.generation,
                w.pid,
                now.saturating_sub(w.heard)
            );
            w.killed = true;
            let _ = self.sys.kill(w.pid, Signal::SIGKILL);
        }
    }
}
