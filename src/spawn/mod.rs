//! Starting a worker process: the mechanism, kept apart from the master's policy.
//!
//! Both spawn modes fork. The child then does only async-signal-safe work (prctl, getppid,
//! sigaction, close, fcntl, execv) until it becomes a worker, either by calling into the worker
//! crate in place (fork mode) or by exec'ing the binary on disk with the hidden `worker`
//! command (exec mode). The master never starts a thread, so the child is an exact copy of a
//! single-threaded process; staying async-signal-safe anyway keeps that assumption cheap.

use std::ffi::{CString, c_char};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, sigprocmask};
use nix::unistd::{ForkResult, Pid, fork, getppid};
use worker::WorkerConfig;

use crate::cli::Spawn;

/// A started worker: its pid and the master's end of its IPC socket pair.
#[derive(Debug)]
pub struct Spawned {
    /// The worker's process id.
    pub pid: Pid,
    /// The master's end of the channel; the worker holds the other.
    pub channel: UnixStream,
    /// The master's end of the worker's bus, for a service that needs one (chat).
    pub bus: Option<UnixStream>,
}

/// Names the inherited listener of a new master started by a binary upgrade.
pub const ENV_LISTEN_FD: &str = "PREFORK_ECHO_LISTEN_FD";
/// Names the pipe on which a new master tells its predecessor it is serving.
pub const ENV_UPGRADE_FD: &str = "PREFORK_ECHO_UPGRADE_FD";
/// Names the inherited sockets of slots 1 and up of a new master (`--balance reuseport`),
/// comma-separated.
const ENV_SLOT_FDS: &str = "PREFORK_ECHO_SLOT_FDS";

/// A comma-separated list of descriptors.
fn slot_list(fds: &[RawFd]) -> String {
    fds.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Names the inherited UDP socket of a new master (with `--udp`).
pub const ENV_UDP_FD: &str = "PREFORK_ECHO_UDP_FD";
/// Names the inherited control socket of a new master.
pub const ENV_CONTROL_FD: &str = "PREFORK_ECHO_CONTROL_FD";
/// Names the inherited metrics listener of a new master (with `--metrics`).
pub const ENV_METRICS_FD: &str = "PREFORK_ECHO_METRICS_FD";
/// Names the inherited TFTP root directory of a new master (`--service tftp`).
pub const ENV_ROOT_FD: &str = "PREFORK_ECHO_ROOT_FD";
/// Carries the old master's stats (JSON [`crate::master::Carryover`]; an older master sent bare
/// counters) to a new master, so totals, uptime and generations go on.
pub const ENV_TOTALS: &str = "PREFORK_ECHO_TOTALS";
/// The service manager's variables, never passed on to a worker.
const SYSTEMD_VARS: [&str; 4] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// An exec's path, argv and environment, built before fork so the child need not allocate.
struct ExecPlan {
    path: CString,
    _strings: Vec<CString>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
}

impl ExecPlan {
    fn new(exe: &CString, args: Vec<Vec<u8>>, env: Vec<Vec<u8>>) -> io::Result<ExecPlan> {
        let cstr = |v: Vec<u8>| CString::new(v).map_err(io::Error::other);
        let args = std::iter::once(Ok(exe.clone()))
            .chain(args.into_iter().map(cstr))
            .collect::<io::Result<Vec<_>>>()?;
        let env = env.into_iter().map(cstr).collect::<io::Result<Vec<_>>>()?;
        let nul_ended = |v: &[CString]| {
            v.iter()
                .map(|a| a.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let (argv, envp) = (nul_ended(&args), nul_ended(&env));
        Ok(ExecPlan {
            path: exe.clone(),
            _strings: args.into_iter().chain(env).collect(),
            argv,
            envp,
        })
    }

    /// The current environment, less `drop`, plus `add` (as `KEY=VALUE`).
    fn environment(drop: &[&str], add: &[(&str, String)]) -> Vec<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        std::env::vars_os()
            .filter(|(k, _)| !drop.iter().any(|d| k.as_bytes() == d.as_bytes()))
            .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
            .chain(add.iter().map(|(k, v)| format!("{k}={v}").into_bytes()))
            .collect()
    }

    /// Replaces this process; returns only if exec failed.
    fn exec(&self) {
        // SAFETY: `path`, `argv` and `envp` are NUL-terminated C strings and NULL-terminated
        // pointer arrays, all built before fork and alive until exec replaces us.
        unsafe { libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
    }
}

/// Exit code of a child whose code panicked: the panic is caught in the child and ends it
/// there, so it never unwinds into the parent's code (and drops the parent's state).
pub const EXIT_CHILD_PANIC: i32 = 70;

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The IPC socket pair could not be made (often: out of descriptors).
    #[error("creating the worker's channel: {0}")]
    Channel(io::Error),
    /// The exec plan could not be built (a NUL in an argument).
    #[error("preparing the exec: {0}")]
    Plan(io::Error),
    /// fork(2) failed (out of processes or memory).
    #[error("fork: {0}")]
    Fork(io::Error),
}

/// Starts one worker serving `cfg` (whose descriptor fields are filled in here).
///
/// `become_worker` runs in a fork-mode child just before it turns into a worker: the master
/// uses it to drop what it owns that must not live on in a worker (its signal registrations).
pub fn spawn_worker(
    how: Spawn,
    exe: &CString,
    listener: RawFd,
    udp: Option<RawFd>,
    mut cfg: WorkerConfig,
    become_worker: impl FnOnce(),
) -> Result<Spawned, SpawnError> {
    let (channel, child_end) = UnixStream::pair().map_err(SpawnError::Channel)?;
    cfg.listen_fd = listener;
    cfg.ipc_fd = child_end.as_raw_fd();
    cfg.udp_fd = udp.unwrap_or(-1);
    let bus = if cfg.service.needs_bus() {
        Some(UnixStream::pair().map_err(SpawnError::Channel)?)
    } else {
        None
    };
    cfg.bus_fd = bus.as_ref().map_or(-1, |(_, child)| child.as_raw_fd());
    let plan = match how {
        Spawn::Exec => {
            let args = std::iter::once("worker".to_string())
                .chain(cfg.to_args())
                .map(String::into_bytes)
                .collect();
            // sd_listen_fds(3): the service manager's variables are for the master alone.
            let env = ExecPlan::environment(&SYSTEMD_VARS, &[]);
            Some(ExecPlan::new(exe, args, env).map_err(SpawnError::Plan)?)
        }
        Spawn::Fork => None,
    };
    let pid = fork_child(
        Lineage::Worker,
        &mut [
            listener,
            child_end.as_raw_fd(),
            cfg.udp_fd,
            cfg.bus_fd,
            cfg.root_fd,
        ],
        &worker::HANDLED_SIGNALS,
        || {
            if plan.is_none() {
                become_worker();
            }
        },
        || match &plan {
            Some(plan) => {
                plan.exec();
                // exec failed (binary gone, not executable): this worker cannot boot.
                worker::EXIT_BOOT_FAILURE
            }
            None => worker::run(cfg),
        },
    )
    .map_err(SpawnError::Fork)?;
    drop(child_end);
    Ok(Spawned {
        pid,
        channel,
        bus: bus.map(|(hub_end, _child)| hub_end),
    })
}

mod successor;
pub use successor::*;

/// A child that has exited, as `waitpid` reported it.
#[derive(Debug)]
pub struct Exited {
    /// Its pid.
    pub pid: Pid,
    /// How it ended, for log lines: `exit code N` or `signal SIGX`.
    pub how: String,
    /// Its exit code, if it exited rather than being killed by a signal.
    pub code: Option<i32>,
}

/// Collects every child that has exited, without blocking, so none is left a zombie.
/// SIGCHLD coalesces (many exits, one signal): callers reap on every loop turn.
pub fn reap_exited() -> Vec<Exited> {
    use nix::errno::Errno;
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return out,
            Err(Errno::EINTR) => {}
            Err(e) => {
                protocol::log!("waitpid failed: {e}");
                return out;
            }
            Ok(WaitStatus::Exited(pid, code)) => out.push(Exited {
                pid,
                how: format!("exit code {code}"),
                code: Some(code),
            }),
            Ok(WaitStatus::Signaled(pid, sig, _)) => out.push(Exited {
                pid,
                how: format!("signal {sig}"),
                code: None,
            }),
            Ok(_) => {} // stopped or continued: still a child, not gone
        }
    }
}

/// Whether a child dies with its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lineage {
    /// A worker or connection child: dies with this process (PR_SET_PDEATHSIG), ignores
    /// SIGINT (the terminal's Ctrl-C is for the master).
    Worker,
    /// A new master (binary upgrade): outlives this process once it serves (until then it dies
    /// with it; see `prepare_successor`).
    Successor,
}

/// Forks a child that keeps only stdio and `keep` (close-on-exec cleared on those). In the
/// child, in order: it arranges to die with this process, runs `shed` (to drop what the
/// parent owns that must not live on, such as signal registrations), resets every signal of
/// the master's table to its default except `own_handlers` (those the child registers again
/// itself), ignores SIGINT, closes every other descriptor, then runs `child`, whose return
/// value is its exit code. Every signal is blocked in the child until `child` unblocks it
/// (after installing its own handlers), so a signal sent to a brand-new child waits instead of
/// being lost or running the parent's handler there.
///
/// The child never returns into the parent's code: every path ends in `_exit`, a panic
/// included (it is caught and ends the child with [`EXIT_CHILD_PANIC`]).
pub fn fork_child(
    lineage: Lineage,
    keep: &mut [RawFd],
    own_handlers: &[i32],
    shed: impl FnOnce(),
    child: impl FnOnce() -> i32,
) -> io::Result<Pid> {
    let parent = nix::unistd::getpid();
    let mut saved = SigSet::empty();
    sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut saved),
    )?;
    // SAFETY: the master is single-threaded (it never spawns threads), so the child starts
    // with no lock held by a thread that does not exist in it. Until `child` runs, the child
    // makes only async-signal-safe calls, plus `shed`, which only frees what the parent owned.
    let forked = unsafe { fork() };
    match forked {
        Ok(ForkResult::Parent { child }) => {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&saved), None)?;
            Ok(child)
        }
        Ok(ForkResult::Child) => {
            let run = std::panic::AssertUnwindSafe(|| {
                if lineage == Lineage::Worker {
                    prepare_child(parent);
                }
                shed();
                reset_signals(own_handlers, lineage);
                close_all_but(keep);
                child()
            });
            let code = std::panic::catch_unwind(run).unwrap_or(EXIT_CHILD_PANIC);
            // SAFETY: _exit is async-signal-safe and skips the parent's atexit work and
            // destructors, which belong to the parent.
            unsafe { libc::_exit(code) }
        }
        Err(e) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
            Err(e.into())
        }
    }
}

/// The child's first steps, all async-signal-safe.
fn prepare_child(master: Pid) {
    // Die with the master, even when it is SIGKILLed: no orphan keeps the port. Checking the
    // parent afterwards closes the race where the master died before the prctl.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != master {
        // SAFETY: async-signal-safe exit without running the master's destructors.
        unsafe { libc::_exit(1) };
    }
}

/// Gives the child the dispositions a freshly exec'd process would have: every signal of the
/// master's table back to its default, but those the child handles itself (signal-hook keeps
/// its inherited trampoline for them and re-uses it when the child registers). A worker also
/// ignores SIGINT: a terminal's Ctrl-C goes to the whole process group, and only the master
/// should act on it (it drains the workers gracefully). SIG_IGN survives exec.
fn reset_signals(own_handlers: &[i32], lineage: Lineage) {
    for sig in crate::signals::numbers().filter(|s| !own_handlers.contains(s)) {
        if let Ok(sig) = Signal::try_from(sig) {
            // SAFETY: installing SIG_DFL runs no handler code; sigaction is async-signal-safe.
            // The parent's actions for this signal were dropped by `shed`.
            let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
        }
    }
    if lineage == Lineage::Worker {
        // SAFETY: as above, for SIG_IGN.
        let _ = unsafe { nix::sys::signal::signal(Signal::SIGINT, SigHandler::SigIgn) };
    }
}

/// Closes every descriptor above stderr except `keep` (negative entries stand for none), and
/// clears close-on-exec on `keep`:
/// a worker holds the listener and its own channel, never its siblings' channels (which would
/// hide their end-of-file from the master) or the master's event loop.
fn close_all_but(keep: &mut [RawFd]) {
    // In place: the child must not allocate.
    keep.sort_unstable();
    let mut next: u32 = 3;
    for &fd in keep.iter().filter(|&&fd| fd >= 0) {
        let fd = fd as u32;
        if fd > next {
            close_range(next, fd - 1);
        }
        next = next.max(fd + 1);
        // SAFETY: fcntl on a descriptor we own; async-signal-safe.
        unsafe { libc::fcntl(fd as RawFd, libc::F_SETFD, 0) };
    }
    close_range(next, u32::MAX);
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range(2) only closes descriptors; nothing in this process uses the ones
    // closed here again (the child never returns into the master's code).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if r != 0 {
        // Kernels before 5.9: close one by one up to the descriptor limit.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass; async-signal-safe in practice.
        let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur.min(u64::from(last)) as u32
        } else {
            4096
        };
        for fd in first..=max.min(last) {
            // SAFETY: as above.
            unsafe { libc::close(fd as RawFd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    /// A panic in a forked child must end the child, never unwind back into the code that
    /// called `fork_child` (where, in the master, it would drop the master's state and unlink
    /// the live control socket). If it escaped, the `catch_unwind` below would see it in the
    /// child, which then reports "escaped" on the pipe.
    #[test]
    fn a_panic_in_a_forked_child_never_returns_into_the_callers_code() {
        let (mut rx, tx) = std::io::pipe().unwrap();
        let tx_fd = tx.as_raw_fd();
        let parent = nix::unistd::getpid();
        let outcome = std::panic::catch_unwind(|| {
            fork_child(
                Lineage::Worker,
                &mut [tx_fd],
                &[],
                || {},
                || panic!("a worker bug"),
            )
        });
        if nix::unistd::getpid() != parent {
            // Only reached if the panic escaped `fork_child` in the child.
            let _ = (&tx).write_all(b"escaped");
            // SAFETY: ends the stray child at once, without running the test harness's code.
            unsafe { libc::_exit(0) };
        }
        drop(tx);
        let child = outcome.expect("no panic in the parent").expect("fork");
        let mut said = String::new();
        rx.read_to_string(&mut said).unwrap();
        assert_eq!(said, "", "the child's panic unwound into the caller");
        let status = nix::sys::wait::waitpid(child, None).unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(child, EXIT_CHILD_PANIC)
        );
    }

    #[test]
    fn a_failed_socket_pair_is_not_reported_as_a_failed_fork() {
        let e = SpawnError::Channel(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(
            e.to_string().starts_with("creating the worker's channel: "),
            "{e}"
        );
        let e = SpawnError::Fork(io::Error::from_raw_os_error(libc::EAGAIN));
        assert!(e.to_string().starts_with("fork: "), "{e}");
    }
}
