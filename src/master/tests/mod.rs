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
            bus: None,
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
        // As before the upgrade window existed; `rig_window` opens one.
        upgrade_grace: Duration::ZERO,
        worker: WorkerConfig {
            listen_fd: -1,
            ipc_fd: -1,
            udp_fd: -1,
            root_fd: -1,
            bus_fd: -1,
            id: 0,
            generation: 1,
            max_unsent: 65536,
            drain_timeout: 10.0,
            stats_interval: 1.0,
            max_conns: 0,
            idle_timeout: 0.0,
            service: worker::service::ServiceKind::Echo,
            io: worker::config::IoDriver::Epoll,
            proxy_protocol: false,
            proxy_from: worker::config::DEFAULT_PROXY_FROM.into(),
            proxy_timeout: 5.0,
            root: None,
            tftp_write: false,
            tftp_max_file: worker::tftp::DEFAULT_MAX_FILE,
            tftp_min_free: worker::tftp::DEFAULT_MIN_FREE,
            max_line: worker::chat::DEFAULT_MAX_LINE,
            chat: Default::default(),
        },
    }
}

fn rig(workers: u32) -> Rig {
    rig_with(workers, crate::balance::Balance::Shared)
}

/// A rig whose master keeps an upgrade window of `grace` after its successor serves.
fn rig_window(workers: u32, grace: Duration) -> Rig {
    let mut r = rig(workers);
    r.m.settings.upgrade_grace = grace;
    r
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
        carried: Default::default(),
    };
    let m = Master::new(world.clone(), cfg, s, listener, addr, control, None).unwrap();
    Rig { m, world, dir }
}

impl Rig {
    /// One loop turn, without waiting. After every turn no timer may be left in the past:
    /// the real loop would then wait zero on every turn, for ever (a busy master).
    fn turn(&mut self) -> bool {
        let done = self.m.turn(Some(Duration::ZERO)).unwrap();
        if !done {
            self.assert_no_past_timer();
        }
        done
    }

    /// The loop's next deadline is in the future (or there is none): nothing passed and
    /// already acted on still holds the wait at zero.
    fn assert_no_past_timer(&self) {
        let now = self.m.sys.now();
        if let Some(t) = self.m.next_timer() {
            assert!(
                t > now,
                "a timer {:?} in the past after a turn (phase {:?}): the loop would spin",
                now.saturating_duration_since(t),
                self.m.phase
            );
        }
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

mod balance;
mod policy;
mod timers;
mod upgrade;
mod window;
