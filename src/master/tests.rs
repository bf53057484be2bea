//! The master's policy, tested without processes: the real `Master`, turn by turn, with a
//! [`Fake`] system that records what it is asked to do (spawn slot 3 of generation 2, TERM pid
//! X), hands the master real socket pairs as worker channels (the test writes the workers'
//! frames into the other end), and a clock the test moves. Integration tests in `tests/`
//! prove the same behaviour with real processes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use protocol::ipc::Message;
use protocol::stats::Counters;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR2};
use worker::WorkerConfig;

use super::*;
use crate::cli::Spawn;
use crate::spawn::{Exited, Handover, SpawnError, Spawned};

/// What the master asked of the system.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Act {
    Spawn { id: u32, generation: u32, pid: i32 },
    Kill { pid: i32, sig: Signal },
    Successor { pid: i32 },
    Announce,
}

/// The world as the fake sees it: shared with the test, which moves time and plays workers.
#[derive(Default)]
struct World {
    now: Option<Instant>,
    acts: Vec<Act>,
    next_pid: i32,
    exited: Vec<Exited>,
    /// The workers' ends of their channels, by pid.
    channels: HashMap<i32, StdUnixStream>,
    /// The successor's readiness pipe (a duplicate of the write end it was handed).
    successor_ready: Option<std::fs::File>,
    /// Spawns fail while set (out of descriptors, a missing binary).
    spawn_fails: bool,
}

#[derive(Clone)]
struct Fake(Rc<RefCell<World>>);

impl Fake {
    fn die(&self, pid: i32, how: &str) {
        let mut w = self.0.borrow_mut();
        w.channels.remove(&pid);
        w.exited.push(Exited {
            pid: Pid::from_raw(pid),
            how: how.into(),
            code: None,
        });
    }
}

impl System for Fake {
    fn now(&self) -> Instant {
        self.0.borrow().now.unwrap_or_else(Instant::now)
    }

    fn spawn_worker(
        &mut self,
        _how: Spawn,
        _exe: &CString,
        _listener: RawFd,
        _udp: Option<RawFd>,
        cfg: WorkerConfig,
        _shed: &mut dyn FnMut(),
    ) -> Result<Spawned, SpawnError> {
        let mut w = self.0.borrow_mut();
        if w.spawn_fails {
            return Err(SpawnError::Fork(std::io::Error::from_raw_os_error(
                libc::EAGAIN,
            )));
        }
        let (master_end, worker_end) = StdUnixStream::pair().map_err(SpawnError::Channel)?;
        w.next_pid += 1;
        let pid = 1000 + w.next_pid;
        w.channels.insert(pid, worker_end);
        w.acts.push(Act::Spawn {
            id: cfg.id,
            generation: cfg.generation,
            pid,
        });
        Ok(Spawned {
            pid: Pid::from_raw(pid),
            channel: master_end,
        })
    }

    fn spawn_successor(
        &mut self,
        _exe: &CString,
        handover: &Handover,
        _shed: &mut dyn FnMut(),
    ) -> std::io::Result<Pid> {
        use std::os::fd::BorrowedFd;
        let mut w = self.0.borrow_mut();
        // SAFETY: `handover.ready` is the open write end of the master's readiness pipe for the
        // duration of this call; it is duplicated, not taken.
        let dup = unsafe { BorrowedFd::borrow_raw(handover.ready) }.try_clone_to_owned()?;
        w.successor_ready = Some(std::fs::File::from(dup));
        w.next_pid += 1;
        let pid = 1000 + w.next_pid;
        w.acts.push(Act::Successor { pid });
        Ok(Pid::from_raw(pid))
    }

    fn kill(&mut self, pid: Pid, sig: Signal) -> nix::Result<()> {
        self.0.borrow_mut().acts.push(Act::Kill {
            pid: pid.as_raw(),
            sig,
        });
        // SIGKILL and SIGQUIT end a process at once; TERM asks it to drain (the test decides
        // when it is done).
        if matches!(sig, Signal::SIGKILL | Signal::SIGQUIT) {
            self.die(pid.as_raw(), &format!("signal {sig}"));
        }
        Ok(())
    }

    fn reap(&mut self) -> Vec<Exited> {
        std::mem::take(&mut self.0.borrow_mut().exited)
    }

    fn notify(&mut self, _state: &str) {}

    fn announce(&mut self, _addr: SocketAddr, _workers: u32) {
        self.0.borrow_mut().acts.push(Act::Announce);
    }
}

/// A master on a fake system, and the handles a test needs to play the world around it.
struct Rig {
    m: Master<Fake>,
    world: Fake,
    dir: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn settings(workers: u32) -> Settings {
    Settings {
        workers,
        worker_timeout: Some(Duration::from_secs(30)),
        worker: WorkerConfig {
            listen_fd: -1,
            ipc_fd: -1,
            udp_fd: -1,
            id: 0,
            generation: 1,
            max_unsent: 65536,
            drain_timeout: 10.0,
            stats_interval: 1.0,
            max_conns: 0,
            idle_timeout: 0.0,
            service: worker::service::ServiceKind::Echo,
            proxy_protocol: false,
            proxy_from: worker::config::DEFAULT_PROXY_FROM.into(),
            proxy_timeout: 5.0,
            root: None,
            tftp_write: false,
            tftp_max_file: worker::tftp::DEFAULT_MAX_FILE,
        },
    }
}

fn rig(workers: u32) -> Rig {
    rig_with(workers, crate::balance::Balance::Shared)
}

fn rig_with(workers: u32, balance: crate::balance::Balance) -> Rig {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "prefork-echo-policy-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let control = ControlServer::bind(&dir.join("ctl.sock"), None).unwrap();
    let (listener, addr) = match balance {
        crate::balance::Balance::Shared => {
            let l = crate::listener::bind("127.0.0.1:0".parse().unwrap(), 8).unwrap();
            let addr = crate::listener::local_addr(&l).unwrap();
            (crate::balance::Listeners::shared(l), addr)
        }
        crate::balance::Balance::Reuseport => {
            let (all, addr) =
                crate::balance::bind_group("127.0.0.1:0".parse().unwrap(), 8, 1, false).unwrap();
            (
                crate::balance::Listeners::reuseport(all, addr, 8).unwrap(),
                addr,
            )
        }
    };
    let world = Fake(Rc::new(RefCell::new(World {
        now: Some(Instant::now()),
        ..World::default()
    })));
    let s = settings(workers);
    let cfg = MasterConfig {
        spawn: Spawn::Fork,
        exe: CString::new("/nonexistent").unwrap(),
        control: dir.join("ctl.sock"),
        log_stats: false,
        config_file: None,
        pid_file: None,
        base: s.clone(),
        predecessor: None,
        udp: None,
        totals: Counters::default(),
    };
    let m = Master::new(world.clone(), cfg, s, listener, addr, control, None).unwrap();
    Rig { m, world, dir }
}

impl Rig {
    /// One loop turn, without waiting.
    fn turn(&mut self) -> bool {
        self.m.turn(Some(Duration::ZERO)).unwrap()
    }

    /// Moves the clock, one turn per second (as the real loop wakes at least once a second).
    fn pass(&mut self, d: Duration) {
        let mut left = d;
        while !left.is_zero() {
            let step = left.min(Duration::from_secs(1));
            let mut w = self.world.0.borrow_mut();
            w.now = w.now.map(|t| t + step);
            drop(w);
            left -= step;
            self.turn();
        }
    }

    fn acts(&self) -> Vec<Act> {
        std::mem::take(&mut self.world.0.borrow_mut().acts)
    }

    fn send(&self, pid: i32, msg: &Message) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        let w = self.world.0.borrow();
        let mut ch = w.channels.get(&pid).expect("a live worker's channel");
        ch.write_all(&frame).unwrap();
    }

    fn signal(&mut self, sig: i32) {
        self.m.dispatch(Event::Signal(sig));
    }

    /// Pids spawned for generation `generation`, by slot, from `acts`.
    fn spawned(acts: &[Act], generation: u32) -> Vec<(u32, i32)> {
        acts.iter()
            .filter_map(|a| match *a {
                Act::Spawn {
                    id,
                    generation: g,
                    pid,
                } if g == generation => Some((id, pid)),
                _ => None,
            })
            .collect()
    }

    /// Starts the pool and has every worker report ready; returns their pids by slot.
    fn serving(&mut self) -> Vec<i32> {
        self.turn();
        let pids: Vec<i32> = Rig::spawned(&self.acts(), 1)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        for &p in &pids {
            self.send(p, &Message::Ready);
        }
        self.turn();
        self.turn();
        assert!(self.m.announced, "announced once every worker is ready");
        self.acts();
        pids
    }

    fn killed(acts: &[Act], sig: Signal) -> Vec<i32> {
        acts.iter()
            .filter_map(|a| match *a {
                Act::Kill { pid, sig: s } if s == sig => Some(pid),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn fills_the_pool_and_announces_once_all_are_ready() {
    let mut r = rig(3);
    r.turn();
    let acts = r.acts();
    assert_eq!(
        Rig::spawned(&acts, 1)
            .iter()
            .map(|s| s.0)
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let pids: Vec<i32> = Rig::spawned(&acts, 1).iter().map(|s| s.1).collect();
    r.send(pids[0], &Message::Ready);
    r.send(pids[1], &Message::Ready);
    r.turn();
    r.turn();
    assert!(
        !r.acts().contains(&Act::Announce),
        "not before the last one"
    );
    r.send(pids[2], &Message::Ready);
    r.turn();
    r.turn();
    assert_eq!(r.acts(), [Act::Announce]);
}

#[test]
fn a_dead_worker_is_replaced_at_once_and_fast_failures_back_off() {
    let mut r = rig(2);
    let pids = r.serving();
    r.pass(Duration::from_secs(5));
    r.acts();
    r.world.die(pids[0], "signal SIGKILL");
    r.turn();
    r.turn();
    let respawned = Rig::spawned(&r.acts(), 1);
    assert_eq!(respawned.len(), 1, "replaced at once after a healthy run");
    assert_eq!(respawned[0].0, 0, "in the same slot");
    // The replacement dies before it reports ready: respawned after 100 ms, not at once.
    r.world.die(respawned[0].1, "exit code 1");
    r.turn();
    r.turn();
    assert!(Rig::spawned(&r.acts(), 1).is_empty(), "backing off");
    r.pass(Duration::from_secs(1));
    assert_eq!(
        Rig::spawned(&r.acts(), 1).len(),
        1,
        "respawned after the delay"
    );
}

#[test]
fn a_slot_that_keeps_failing_is_abandoned_while_the_rest_serves() {
    let mut r = rig(2);
    let pids = r.serving();
    r.pass(Duration::from_secs(5));
    r.acts();
    r.world.die(pids[0], "signal SIGKILL");
    // Every replacement of slot 0 dies at once, six times in a row; slot 1 stays healthy.
    for _ in 0..40 {
        r.send(pids[1], &Message::Report(Counters::default()));
        r.pass(Duration::from_secs(1));
        for (id, pid) in Rig::spawned(&r.acts(), 1) {
            assert_eq!(id, 0);
            r.world.die(pid, "exit code 1");
        }
    }
    assert!(r.m.slots[0].abandoned);
    assert_eq!(
        r.m.phase,
        Phase::Running,
        "the healthy worker keeps serving"
    );
    assert!(r.m.failure.is_none());
    assert_eq!(r.m.snapshot().abandoned_slots, [0]);
    // Scaling (even to the same size) retries it.
    r.m.scale(2).unwrap();
    r.turn();
    assert_eq!(Rig::spawned(&r.acts(), 1).len(), 1);
}

#[test]
fn when_no_slot_can_be_kept_the_master_gives_up() {
    let mut r = rig(1);
    let pids = r.serving();
    r.pass(Duration::from_secs(5));
    r.world.0.borrow_mut().spawn_fails = true;
    r.world.die(pids[0], "signal SIGKILL");
    for _ in 0..40 {
        r.pass(Duration::from_secs(1));
    }
    assert!(
        r.m.failure
            .as_deref()
            .is_some_and(|f| f.contains("giving up"))
    );
    assert_ne!(r.m.phase, Phase::Running);
}

#[test]
fn a_reload_promotes_the_new_generation_only_once_it_is_ready() {
    let mut r = rig(2);
    let old = r.serving();
    r.signal(SIGHUP);
    r.turn();
    let new: Vec<i32> = Rig::spawned(&r.acts(), 2).iter().map(|s| s.1).collect();
    assert_eq!(new.len(), 2);
    r.send(new[0], &Message::Ready);
    r.turn();
    r.turn();
    assert!(
        Rig::killed(&r.acts(), Signal::SIGTERM).is_empty(),
        "not yet"
    );
    r.send(new[1], &Message::Ready);
    r.turn();
    r.turn();
    let mut termed = Rig::killed(&r.acts(), Signal::SIGTERM);
    termed.sort_unstable();
    assert_eq!(termed, old, "the old generation, and only it, drains");
    assert_eq!(r.m.generation, 2);
}

#[test]
fn a_reload_whose_worker_dies_while_starting_is_abandoned() {
    let mut r = rig(2);
    let old = r.serving();
    r.signal(SIGHUP);
    r.turn();
    let new = Rig::spawned(&r.acts(), 2);
    r.world.die(new[0].1, "exit code 1");
    r.turn();
    r.turn();
    let acts = r.acts();
    assert_eq!(
        Rig::killed(&acts, Signal::SIGTERM),
        [new[1].1],
        "the rest of it drains"
    );
    assert_eq!(r.m.generation, 1, "generation 1 keeps serving");
    assert!(r.m.reload.is_none());
    assert!(
        old.iter()
            .all(|p| !Rig::killed(&acts, Signal::SIGTERM).contains(p))
    );
}

#[test]
fn a_reload_not_ready_in_time_is_abandoned() {
    let mut r = rig(1);
    r.serving();
    r.signal(SIGHUP);
    r.turn();
    let new = Rig::spawned(&r.acts(), 2);
    r.pass(RELOAD_TIMEOUT + Duration::from_secs(2));
    assert!(Rig::killed(&r.acts(), Signal::SIGTERM).contains(&new[0].1));
    assert_eq!(r.m.generation, 1);
}

#[test]
fn scaling_adds_slots_and_drains_the_surplus_never_below_one() {
    let mut r = rig(2);
    let pids = r.serving();
    r.signal(SIGTTIN);
    r.turn();
    assert_eq!(Rig::spawned(&r.acts(), 1), [(2, 1003)]);
    r.m.scale(1).unwrap();
    let mut termed = Rig::killed(&r.acts(), Signal::SIGTERM);
    termed.sort_unstable();
    assert_eq!(termed, [pids[1], 1003], "slots 1 and 2 drain");
    r.signal(SIGTTOU);
    assert_eq!(r.m.settings.workers, 1, "never below one");
    assert!(r.acts().is_empty());
    // A reload keeps the scaled size.
    r.signal(SIGHUP);
    r.turn();
    assert_eq!(Rig::spawned(&r.acts(), 2).len(), 1);
}

#[test]
fn a_graceful_stop_drains_then_kills_at_the_deadline_and_a_second_signal_stops_now() {
    let mut r = rig(2);
    let pids = r.serving();
    r.signal(SIGTERM);
    let mut termed = Rig::killed(&r.acts(), Signal::SIGTERM);
    termed.sort_unstable();
    assert_eq!(termed, pids);
    assert!(r.m.listener.is_none(), "our copy of the listener is closed");
    // Drain timeout (10 s) plus grace (2 s): then SIGKILL.
    r.pass(Duration::from_secs(11));
    assert!(Rig::killed(&r.acts(), Signal::SIGKILL).is_empty());
    r.pass(Duration::from_secs(2));
    let mut killed = Rig::killed(&r.acts(), Signal::SIGKILL);
    killed.sort_unstable();
    assert_eq!(killed, pids);
    assert!(r.turn(), "done once every worker is gone");

    let mut r = rig(2);
    let pids = r.serving();
    r.signal(SIGINT);
    r.acts();
    r.signal(SIGTERM);
    let mut quit = Rig::killed(&r.acts(), Signal::SIGQUIT);
    quit.sort_unstable();
    assert_eq!(quit, pids, "a second signal during the drain stops now");
    r.turn(); // reaps them
    assert!(r.turn());
}

#[test]
fn sigquit_stops_now() {
    let mut r = rig(1);
    let pids = r.serving();
    r.signal(SIGQUIT);
    assert_eq!(Rig::killed(&r.acts(), Signal::SIGQUIT), pids);
    r.turn(); // reaps it
    assert!(r.turn());
    assert!(r.m.failure.is_none(), "a requested stop is not a failure");
}

#[test]
fn a_silent_worker_is_killed_but_a_stalled_master_blames_nobody() {
    let mut r = rig(2);
    let pids = r.serving();
    // The master itself is stalled for a minute: one turn, a 60 s jump on the clock.
    let later = r.world.0.borrow().now.map(|t| t + Duration::from_secs(60));
    r.world.0.borrow_mut().now = later;
    r.turn();
    assert!(
        Rig::killed(&r.acts(), Signal::SIGKILL).is_empty(),
        "nobody blamed"
    );
    // Worker 0 keeps reporting; worker 1 falls silent for 31 s of the master's time awake.
    for _ in 0..31 {
        r.send(pids[0], &Message::Report(Counters::default()));
        r.pass(Duration::from_secs(1));
    }
    assert_eq!(Rig::killed(&r.acts(), Signal::SIGKILL), [pids[1]]);
    r.pass(Duration::from_secs(5));
    assert!(
        Rig::killed(&r.acts(), Signal::SIGKILL).is_empty(),
        "killed once, and the healthy one never"
    );
}

#[test]
fn a_draining_worker_is_killed_at_its_own_drain_deadline_whatever_started_it() {
    let mut r = rig(2);
    let pids = r.serving();
    // It was sent TERM by hand: it tells the master it drains, and is replaced at once.
    r.send(pids[0], &Message::Draining);
    r.turn();
    r.turn();
    assert_eq!(
        Rig::spawned(&r.acts(), 1).len(),
        1,
        "replaced while it drains"
    );
    r.pass(Duration::from_secs(13));
    assert_eq!(Rig::killed(&r.acts(), Signal::SIGKILL), [pids[0]]);
}

#[test]
fn a_stop_during_an_upgrade_stops_the_new_master_too_and_waits_for_it() {
    let mut r = rig(1);
    r.serving();
    r.signal(SIGUSR2);
    let acts = r.acts();
    let Some(&Act::Successor { pid: successor }) = acts.last() else {
        panic!("no successor started: {acts:?}");
    };
    r.signal(SIGTERM);
    assert!(Rig::killed(&r.acts(), Signal::SIGTERM).contains(&successor));
    r.pass(Duration::from_secs(13));
    assert!(!r.turn(), "not done while the new master lives");
    r.world.die(successor, "exit code 0");
    r.turn();
    assert!(r.turn(), "done once it is gone");
}

#[test]
fn a_ready_successor_retires_this_master_without_a_stop() {
    let mut r = rig(1);
    let pids = r.serving();
    r.signal(SIGUSR2);
    r.acts();
    let pipe = r.world.0.borrow_mut().successor_ready.take().unwrap();
    (&pipe).write_all(b"ready\n").unwrap();
    r.turn();
    assert_eq!(
        Rig::killed(&r.acts(), Signal::SIGTERM),
        pids,
        "this master drains"
    );
    assert!(r.m.successor.is_none());
}

#[test]
fn a_slot_leaves_the_rotation_before_its_worker_drains_and_its_socket_outlives_the_worker() {
    let mut r = rig_with(3, crate::balance::Balance::Reuseport);
    let pids = r.serving();
    let listeners = |r: &Rig| {
        let l = r.m.listener.as_ref().unwrap();
        (l.steered().to_vec(), l.len())
    };
    assert_eq!(listeners(&r), (vec![0, 1, 2], 3));
    r.m.scale(1).unwrap();
    // By the time slots 1 and 2 are told to drain, no new connection goes to them ...
    assert_eq!(
        Rig::killed(&r.acts(), Signal::SIGTERM),
        vec![pids[1], pids[2]]
    );
    assert_eq!(listeners(&r), (vec![0], 3));
    // ... and each socket closes only once no worker holds it, from the top.
    // (The death is reaped at the end of a turn; the next one closes.)
    r.world.die(pids[2], "exited 0");
    r.turn();
    r.turn();
    assert_eq!(listeners(&r), (vec![0], 2));
    r.world.die(pids[1], "exited 0");
    r.turn();
    r.turn();
    assert_eq!(listeners(&r), (vec![0], 1));
    // Growing again binds new sockets into the group and steers to them.
    r.m.scale(2).unwrap();
    r.turn();
    assert_eq!(listeners(&r), (vec![0, 1], 2));
}

#[test]
fn a_silent_worker_leaves_the_rotation_until_it_is_heard_again() {
    let mut r = rig_with(2, crate::balance::Balance::Reuseport);
    let pids = r.serving();
    let steered = |r: &Rig| r.m.listener.as_ref().unwrap().steered().to_vec();
    assert_eq!(steered(&r), vec![0, 1]);
    // Worker 0 reports every second; worker 1 falls silent.
    for _ in 0..4 {
        r.send(pids[0], &Message::Report(Counters::default()));
        r.pass(Duration::from_secs(1));
    }
    assert_eq!(
        steered(&r),
        vec![0],
        "three silent intervals: out of the rotation"
    );
    assert!(
        Rig::killed(&r.acts(), Signal::SIGKILL).is_empty(),
        "not yet judged hung"
    );
    r.send(pids[1], &Message::Report(Counters::default()));
    r.turn();
    r.turn();
    assert_eq!(steered(&r), vec![0, 1], "heard again: back in");
}
