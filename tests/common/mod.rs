//! Shared test harness: starts the real binary on port 0, reads the address it announces,
//! and guarantees its whole process tree is killed when the test ends, pass or fail.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub mod chat;
pub mod churn;
pub mod memory;
mod rng;
pub mod skip;
pub mod tftp;

pub use rng::Rng;
#[allow(unused_imports)] // not every test file skips
pub use skip::{skip, skip_missing_tool};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_prefork-echo");

/// echo-load, the load generator (its own workspace member, built beside the server by
/// `cargo test --workspace`).
pub fn echo_load() -> PathBuf {
    let path = Path::new(BIN).with_file_name("echo-load");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build -p echo-load)",
        path.display()
    );
    path
}

/// No test may run longer than this: the watchdog kills the server tree, which makes any
/// client blocked on it fail instead of hang.
const WATCHDOG: Duration = Duration::from_secs(240);
/// How long a server may take to announce itself.
const STARTUP: Duration = Duration::from_secs(30);

/// A running server process tree.
pub struct Server {
    child: Child,
    /// The address it announced.
    pub addr: SocketAddr,
    /// The master's pid.
    pub pid: i32,
    /// The whole announce line.
    pub line: String,
    /// Its control socket (in a directory of this test's own).
    pub control: PathBuf,
    dir: PathBuf,
    stderr: Arc<Mutex<String>>,
    watchdog: Option<mpsc::Sender<()>>,
    exited: Option<ExitStatus>,
    /// Every worker pid seen: a worker whose master died first is reparented to this
    /// (subreaper) process and must be reaped here.
    seen: Mutex<HashSet<i32>>,
}

/// A server that failed to start: its exit status and what it wrote to stderr.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

impl Server {
    /// Starts `prefork-echo ARGS --listen 127.0.0.1:0` and waits for its announce line.
    pub fn start(args: &[&str]) -> Server {
        match Server::try_start(BIN, args) {
            Ok(s) => s,
            Err(f) => panic!("server did not start: {f:?}"),
        }
    }

    /// Like [`start`](Self::start) with another binary path (a copy of the binary).
    pub fn try_start(bin: impl AsRef<Path>, args: &[&str]) -> Result<Server, StartFailure> {
        Server::launch(bin, args, &[], true)
    }

    /// Starts `bin ARGS` with extra environment variables; with `own_control` false the
    /// server picks its default control path (then `control` is not where it listens).
    pub fn launch(
        bin: impl AsRef<Path>,
        args: &[&str],
        env: &[(&str, &str)],
        own_control: bool,
    ) -> Result<Server, StartFailure> {
        adopt_orphans();
        let mut cmd = Command::new(bin.as_ref());
        cmd.envs(env.iter().copied());
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let dir = scratch_dir();
        let control = dir.join("control.sock");
        if own_control && !args.contains(&"--control") {
            cmd.arg("--control").arg(&control);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the server binary");
        let pid = child.id() as i32;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (err_pipe, sink) = (child.stderr.take().unwrap(), Arc::clone(&stderr));
        thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let watchdog = start_watchdog(pid);
        let line = match rx.recv_timeout(STARTUP) {
            Ok(line) => line,
            Err(_) => {
                let status = wait_for_exit(&mut child, Duration::from_secs(5));
                if status.is_none() {
                    kill_tree(pid);
                    let _ = child.wait();
                }
                let _ = watchdog.send(());
                thread::sleep(Duration::from_millis(50)); // let the stderr reader catch up
                let stderr = stderr.lock().unwrap().clone();
                return Err(StartFailure { status, stderr });
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split(' ').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected announce line: {line:?}"));
        Ok(Server {
            child,
            addr,
            pid,
            line,
            control,
            dir,
            stderr,
            watchdog: Some(watchdog),
            exited: None,
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (polling) until stderr contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.stderr().contains(needle))
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig).expect("signalling the master");
    }

    /// The master's live children (its workers), sorted.
    pub fn workers(&self) -> Vec<i32> {
        let mut w = children_of(self.pid);
        w.sort_unstable();
        self.seen.lock().unwrap().extend(w.iter().copied());
        w
    }

    /// Waits up to `timeout` for the master to exit; `None` if it did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = wait_for_exit(&mut self.child, timeout);
        }
        self.exited
    }

    /// Waits up to `timeout` for the master to exit, and asserts that it exited 0 (its
    /// stderr in the failure message).
    pub fn assert_exits_ok(&mut self, timeout: Duration) {
        let status = self.wait_exit(timeout);
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?}\n{}",
            self.stderr()
        );
    }

    /// Runs `prefork-echo ARGS --control <its control socket>` and returns what happened.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .expect("running a prefork-echo command")
    }

    /// Waits until the master has run for `secs` more seconds of its own uptime (several loop
    /// turns), as its stats answers show: time for anything it would still do to happen.
    pub fn let_turns_pass(&self, secs: f64) {
        let start = self.stats()["uptime_secs"].as_f64().unwrap_or(0.0);
        assert!(wait_until(Duration::from_secs(30), || {
            self.stats()["uptime_secs"].as_f64().unwrap_or(0.0) > start + secs
        }));
    }

    /// How many lines of its stderr contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.stderr().lines().filter(|l| l.contains(needle)).count()
    }

    /// Runs `prefork-echo stats --json` against this server and parses what it prints.
    pub fn stats(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .arg("stats")
            .arg("--control")
            .arg(&self.control)
            .arg("--json")
            .output()
            .expect("running prefork-echo stats");
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats --json prints JSON")
    }

    /// A connected client with a read timeout, so a broken server fails a test, not hangs it.
    pub fn connect(&self) -> TcpStream {
        client(self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            let _ = w.send(());
        }
        kill_tree(self.pid);
        let _ = self.child.wait();
        let seen: Vec<i32> = self.seen.lock().unwrap().iter().copied().collect();
        reap_pids(seen);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A copy of the server binary in a directory of its own, so a test can play "bad deploy"
/// (exec spawning and upgrades run whatever binary is at that path now).
pub struct BinaryCopy {
    /// The directory (removed on drop).
    pub dir: PathBuf,
    /// The copy.
    pub path: PathBuf,
}

impl BinaryCopy {
    /// The copy lives in a world-traversable directory (mode 0755 under the temp dir), so a
    /// process running as another user (`nobody`) can execute it wherever the checkout is.
    pub fn new() -> BinaryCopy {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch_dir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("prefork-echo");
        std::fs::copy(BIN, &path).expect("copying the binary");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        BinaryCopy { dir, path }
    }

    /// Replaces the binary, atomically (running processes keep the old one), with a
    /// program that exits 1 at once.
    pub fn break_it(&self) {
        use std::os::unix::fs::PermissionsExt;
        let broken = self.dir.join("broken");
        std::fs::write(&broken, "#!/bin/sh\nexit 1\n").unwrap();
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&broken, &self.path).unwrap();
    }
}

impl Drop for BinaryCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pid a pid file names (its first line; the second records the start time).
pub fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .expect("reading the pid file")
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("a pid on the pid file's first line")
}

/// Runs `prefork-echo ARGS` with `env` added, fails the test (showing its stderr) unless it
/// succeeds, and returns its stdout.
pub fn run_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running prefork-echo");
    assert!(
        out.status.success(),
        "prefork-echo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The user `nobody`, when this test runs as root and can act as it; `None` (saying why, so
/// the skip shows in the output) otherwise.
pub fn nobody() -> Option<nix::unistd::User> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: cannot act as another user here; skipping that part");
        return None;
    }
    let u = nix::unistd::User::from_name("nobody").ok().flatten();
    if u.is_none() {
        eprintln!("no user named nobody; skipping that part");
    }
    u
}

/// A fresh directory for one server's files (removed when the server is dropped).
pub fn scratch_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "prefork-echo-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

fn start_watchdog(pid: i32) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(WATCHDOG) {
            eprintln!("watchdog: killing server tree {pid} after {WATCHDOG:?}");
            kill_tree(pid);
        }
    });
    tx
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

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
fn reap_pids(mut left: Vec<i32>) {
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

/// (pid, ppid, state) of every process, from /proc.
fn processes() -> Vec<(i32, i32, char)> {
    procfs::process::all_processes()
        .map(|all| {
            all.flatten()
                .filter_map(|p| {
                    let stat = p.stat().ok()?;
                    Some((p.pid, stat.ppid, stat.state))
                })
                .collect()
        })
        .unwrap_or_default()
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

/// Whether `pid` is a live (non-zombie) process.
pub fn alive(pid: i32) -> bool {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.state != 'Z')
}

/// A connected client with generous timeouts.
pub fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connecting to the server");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Writes `msg` and reads back exactly as many bytes, asserting they are the same.
pub fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("writing to the server");
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).expect("reading the echo");
    assert!(back == msg, "echo differs from what was sent");
}

/// Sends `msg`, half-closes, and reads until the server closes: everything must come back.
pub fn echo_to_eof(mut s: TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("writing to the server");
    s.shutdown(Shutdown::Write).expect("half-closing");
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("reading to EOF");
    assert_eq!(back.len(), msg.len(), "echo length");
    assert!(back == msg, "echo differs from what was sent");
}

/// Raises this test process's soft descriptor limit to the hard one; returns it.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

/// Client-side ports of the TCP connections to `server_port` whose server end is held by
/// process `pid` (matched through socket inodes in /proc/PID/fd and /proc/net/tcp{,6}).
pub fn client_ports_held_by(pid: i32, server_port: u16) -> HashSet<u16> {
    use procfs::process::FDTarget;
    let inodes: HashSet<u64> = procfs::process::Process::new(pid)
        .and_then(|p| p.fd())
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| match fd.target {
                    FDTarget::Socket(inode) => Some(inode),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let entries = procfs::net::tcp()
        .unwrap_or_default()
        .into_iter()
        .chain(procfs::net::tcp6().unwrap_or_default());
    entries
        .filter(|e| inodes.contains(&e.inode) && e.local_address.port() == server_port)
        .map(|e| e.remote_address.port())
        .collect()
}
