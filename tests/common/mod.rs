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

mod binary;
pub mod chat;
pub mod churn;
pub mod memory;
mod procs;
pub mod readme_schema;
mod rng;
pub mod skip;
pub mod tftp;

#[allow(unused_imports)] // not every test file replaces the binary
pub use binary::BinaryCopy;
pub use procs::*;
pub use rng::Rng;
#[allow(unused_imports)] // each test file uses a different part of the harness
pub use skip::{have_tool, skip, skip_missing_tool};

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
        // Tests written before the upgrade window wait for the old master to exit once its
        // successor serves; tests of the window pass their own --upgrade-grace.
        if !args.contains(&"--upgrade-grace") {
            cmd.args(["--upgrade-grace", "0"]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A binary copied by a test (BinaryCopy) can be "busy" for a moment: another test's
        // fork may still hold the copy's write descriptor until its child execs (ETXTBSY).
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(20));
                }
                other => break other.expect("spawning the server binary"),
            }
        };
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

    /// The pids of the new masters this master said it started (upgrades).
    pub fn successors(&self) -> Vec<i32> {
        self.stderr()
            .split("upgrade: started a new master (pid ")
            .skip(1)
            .filter_map(|r| r.split(')').next()?.parse().ok())
            .collect()
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
        output_within(
            Command::new(BIN)
                .args(args)
                .arg("--control")
                .arg(&self.control),
            COMMAND,
        )
    }

    /// After an upgrade was asked: waits (30 s at most, failing the test otherwise) until the
    /// pid file at `pid_file` names a master other than this one — its successor — and returns
    /// that pid with a guard that kills it when the test ends, pass or fail. A file caught
    /// mid-rewrite is read again, not taken as an answer.
    pub fn successor_in(&self, pid_file: &Path) -> (i32, KillOnDrop) {
        let named = || {
            std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|t| t.lines().next()?.parse::<i32>().ok())
        };
        assert!(
            wait_until(Duration::from_secs(30), || named()
                .is_some_and(|p| p != self.pid)),
            "no successor named in {}: {}",
            pid_file.display(),
            self.stderr()
        );
        let pid = read_pid(pid_file);
        (pid, KillOnDrop::new(pid))
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
        let out = output_within(
            Command::new(BIN)
                .arg("stats")
                .arg("--control")
                .arg(&self.control)
                .arg("--json"),
            COMMAND,
        );
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
        // A new master this one started (an upgrade) outlives it as this process's child,
        // out of reach of the kill above: from the moment the old master logs its pid, it is
        // killed here too, whatever panicked before a test's own guard was made.
        for successor in self.successors() {
            if is_my_child(successor) {
                drop(KillOnDrop(successor));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How long a command that should finish at once (a usage error, a control request) may run.
pub const COMMAND: Duration = Duration::from_secs(60);

/// Runs `cmd` to completion like `Command::output`, but within `within`: a command that is
/// still running then (a regression that accepted a bad flag and started serving) is killed
/// with its whole tree and fails the test, instead of hanging the suite.
pub fn output_within(cmd: &mut Command, within: Duration) -> std::process::Output {
    adopt_orphans();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", cmd.get_program()));
    let pid = child.id() as i32;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut all = Vec::new();
            let _ = pipe.read_to_end(&mut all);
            all
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let Some(status) = wait_for_exit(&mut child, within) else {
        kill_tree(pid);
        let _ = child.wait();
        let err = err.join().unwrap_or_default();
        panic!(
            "{cmd:?} still ran after {within:?} (killed): {}",
            String::from_utf8_lossy(&err)
        );
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
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
    let out = output_within(
        Command::new(BIN).args(args).envs(env.iter().copied()),
        COMMAND,
    );
    assert!(
        out.status.success(),
        "prefork-echo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The user `nobody`, when this test runs as root and can act as it; `None` (a counted
/// [`skip`] saying why) otherwise.
pub fn nobody() -> Option<nix::unistd::User> {
    if !nix::unistd::Uid::effective().is_root() {
        skip("not root: cannot act as another user here");
        return None;
    }
    let u = nix::unistd::User::from_name("nobody").ok().flatten();
    if u.is_none() {
        skip("no user named nobody");
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

/// Reads `s` until the server closes it (end of stream, or a reset), within `within`, and
/// returns what came first; fails the test if it is still open then (a read timeout is not
/// a close).
pub fn read_until_closed(s: &mut TcpStream, within: Duration, what: &str) -> Vec<u8> {
    use std::io::ErrorKind;
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: still open after {within:?}");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: still open after {within:?}")
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                return got;
            }
            Err(e) => panic!("{what}: reading: {e}"),
        }
    }
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
    // Unreadable is a failure, not "holds nothing": a test may assert a process holds none.
    let inodes: HashSet<u64> = procfs::process::Process::new(pid)
        .and_then(|p| p.fd())
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect();
    let entries = procfs::net::tcp()
        .expect("reading /proc/net/tcp")
        .into_iter()
        .chain(procfs::net::tcp6().unwrap_or_default()); // no IPv6: no IPv6 entries
    entries
        .filter(|e| inodes.contains(&e.inode) && e.local_address.port() == server_port)
        .map(|e| e.remote_address.port())
        .collect()
}
