//! The processes a test starts: kill guards, reaping, and what /proc says of them.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::STARTUP;

/// Kills a process tree when dropped, pass or fail: for tests that start the binary by hand
/// (under `sh`, with inherited descriptors) rather than through [`Server`].
pub struct KillOnDrop(pub i32);

impl KillOnDrop {
    /// Guards the tree rooted at `pid` (and adopts its orphans, see [`adopt_orphans`]).
    pub fn new(pid: i32) -> KillOnDrop {
        adopt_orphans();
        KillOnDrop(pid)
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_tree(self.0);
        // The root too, if it is ours and nobody waited for it (a new master after an
        // upgrade is adopted by this process, with no `Child` to wait on it).
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
            match waitpid(Pid::from_raw(self.0), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => thread::sleep(Duration::from_millis(5)),
                _ => return,
            }
        }
    }
}

/// The announce line of a server started by hand, waiting at most [`STARTUP`]: a server that
/// never announces fails the test instead of hanging it. Its stdout stays drained afterwards.
pub fn read_announce(child: &mut Child) -> String {
    let out = child.stdout.take().expect("the server's stdout is piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(out).lines().map_while(Result::ok);
        if let Some(first) = lines.next() {
            let _ = tx.send(first);
        }
        lines.for_each(drop);
    });
    rx.recv_timeout(STARTUP)
        .expect("the server did not announce itself in time")
}

/// SIGKILLs `pid` and every descendant (found before killing, so none escapes reparenting).
pub fn kill_tree(pid: i32) {
    let below = descendants(pid);
    for &p in below.iter().chain(std::iter::once(&pid)) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    // The descendants were orphaned by the kill and, this process being a subreaper (see
    // `adopt_orphans`), are now its children: reap them, so no zombie is left behind. Only
    // these pids: `waitpid(-1)` could take a child another test is waiting for. The root is
    // reaped by whoever holds its `Child`.
    reap_pids(below);
}

/// Reaps each of `pids` that is, or becomes within 2 s, a child of this process (a pid that
/// is not ours is skipped at once).
pub(super) fn reap_pids(mut left: Vec<i32>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&p| {
            use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
            !matches!(
                waitpid(Pid::from_raw(p), Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_)
            )
        });
        if !left.is_empty() {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Makes this test process the reaper of orphans below it (PR_SET_CHILD_SUBREAPER): a
/// server's workers, or a new master after an upgrade, outlive the process that started them,
/// and would otherwise end as zombies of PID 1, which in a container may never reap them.
pub fn adopt_orphans() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = nix::sys::prctl::set_child_subreaper(true);
    });
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// (pid, ppid, state) of every process, from /proc; fails the test if /proc cannot be
/// listed (an empty list would read as "no workers" and "no descendants"). A process that
/// exits while being listed is left out: it is gone either way.
fn processes() -> Vec<(i32, i32, char)> {
    procfs::process::all_processes()
        .unwrap_or_else(|e| panic!("listing /proc: {e}"))
        .flatten()
        .filter_map(|p| {
            let stat = p.stat().ok()?;
            Some((p.pid, stat.ppid, stat.state))
        })
        .collect()
}

/// Live (non-zombie) children of `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|&(_, ppid, state)| ppid == pid && state != 'Z')
        .map(|(p, _, _)| p)
        .collect()
}

/// Every live descendant of `pid`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let procs = processes();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, ppid, state) in &procs {
            if ppid == p && state != 'Z' && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// /proc/PID/status of a live process.
pub fn status(pid: i32) -> procfs::process::Status {
    procfs::process::Process::new(pid)
        .and_then(|p| p.status())
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"))
}

/// Whether `pid` is a child of this test process (alive or not yet reaped): only then is it
/// certainly one this test started, not a stranger that reused the number.
pub(super) fn is_my_child(pid: i32) -> bool {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.ppid == std::process::id() as i32)
}

/// Whether `pid` is a live (non-zombie) process.
pub fn alive(pid: i32) -> bool {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.state != 'Z')
}
