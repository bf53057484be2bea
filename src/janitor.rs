//! The janitor: with `--user`, the one thing the server still needs root for after dropping
//! privileges is removing its own runtime files at exit. The control socket and pid file sit
//! in a directory only root may write (`/run/prefork-echo`), so a master serving as `nobody`
//! cannot unlink them, and every clean stop used to leave both behind.
//!
//! So, before dropping privileges, the master forks a tiny root process that does nothing
//! else. It takes no input but one byte on a socket pair ("the master is exiting") and, when
//! the master has gone without asking (a crash, or a binary upgrade handing the files to a
//! successor), the end of that socket. It removes only the two names it was given, through
//! directory descriptors opened at start (never a path resolved later), and only while each
//! name is still the very file the master created (device and inode) and no live server owns
//! it: a control socket somebody still listens on (an upgrade's successor) or a pid file
//! naming a live process is left alone — and the janitor waits for that process instead.
//! Detached (its own session, reparented), it ignores the terminal's and the service
//! manager's stop signals: those are for the master, whose exit it outlives by moments.

use std::ffi::{CString, OsStr};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{AtFlags, OFlag, open};
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::sys::stat::{Mode, fstatat};
use nix::unistd::{ForkResult, Pid, UnlinkatFlags, fork, setsid, unlinkat};

/// How long the master waits for the janitor to confirm the files are gone.
const FINISH_WAIT: Duration = Duration::from_secs(2);
/// How often the janitor looks whether a successor it waits for has exited.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// One runtime file to remove: its directory (held open), its name there, and the identity
/// of the file the master created.
struct Tidy {
    dir: OwnedFd,
    name: CString,
    path: PathBuf,
    id: (u64, u64),
}

impl Tidy {
    /// Records `path` as it is now (just created by this process, as root).
    fn of(path: &Path) -> Option<Tidy> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir = open(
            dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let name = CString::new(path.file_name()?.as_bytes()).ok()?;
        Some(Tidy {
            dir,
            name,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Whether the name still holds the file the master created.
    fn still_ours(&self) -> bool {
        fstatat(
            &self.dir,
            self.name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| (st.st_dev, st.st_ino) == self.id)
    }

    fn remove(&self) {
        if let Err(e) = unlinkat(&self.dir, self.name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            protocol::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// The master's end: dropping it without [`finish`](Janitor::finish) lets the janitor find
/// out by itself.
pub struct Janitor {
    line: UnixStream,
}

impl Janitor {
    /// Forks the janitor for the control socket at `control` and the pid file at `pid_file`,
    /// as they are now. Call as root, single-threaded, before dropping privileges. `None`
    /// (with a warning) if it cannot be set up: the server then runs as before and may leave
    /// its files behind.
    pub fn spawn(control: &Path, pid_file: Option<&Path>) -> Option<Janitor> {
        let files: Vec<(Tidy, bool)> = std::iter::once((control, true))
            .chain(pid_file.map(|p| (p, false)))
            .filter_map(|(p, socket)| Tidy::of(p).map(|t| (t, socket)))
            .collect();
        if files.is_empty() {
            return None;
        }
        let (ours, theirs) = match UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => {
                protocol::warn!("no janitor for the runtime files: {e}");
                return None;
            }
        };
        let master = nix::unistd::getpid();
        // SAFETY: the master is single-threaded here (it starts threads, if any, later), so
        // the child may run ordinary code; every path in the child ends in `_exit`.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(ours);
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    detach(theirs, files, master)
                }))
                .map_or(1, |()| 0);
                // SAFETY: leaving the forked child without running the parent's exit code.
                unsafe { libc::_exit(code) }
            }
            Ok(ForkResult::Parent { child }) => {
                drop(theirs);
                // The intermediate child exits at once (its child is the janitor).
                let _ = nix::sys::wait::waitpid(child, None);
                Some(Janitor { line: ours })
            }
            Err(e) => {
                protocol::warn!("no janitor for the runtime files: fork: {e}");
                None
            }
        }
    }

    /// Tells the janitor the master is exiting and waits (briefly) until it has removed what
    /// is no longer served: on return the files are gone, unless a successor serves them.
    pub fn finish(mut self) {
        let _ = self.line.set_read_timeout(Some(FINISH_WAIT));
        let mut done = [0u8; 1];
        if self.line.write_all(b"x").is_ok() {
            let _ = self.line.read(&mut done);
        }
    }
}

/// In the first child: a new session, a second fork so the janitor is nobody's child (the
/// master's reaping and child counts never see it), then the janitor itself.
fn detach(line: UnixStream, files: Vec<(Tidy, bool)>, master: Pid) {
    let _ = setsid();
    // SAFETY: single-threaded (a fork of a single-threaded process); the grandchild runs on
    // and ends in `_exit` in `Janitor::spawn`'s child branch via this function's return.
    // The intermediate child just returns, which ends it (`_exit` by the caller).
    if let Ok(ForkResult::Child) = unsafe { fork() } {
        janitor(line, files, master);
    }
}

/// The janitor: a quiet root process until the master is gone, then the clean-up.
fn janitor(mut line: UnixStream, files: Vec<(Tidy, bool)>, master: Pid) {
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPIPE,
    ] {
        // SAFETY: installing SIG_IGN, no handler code runs.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    let _ = nix::sys::prctl::set_name(c"prefork-janitor");
    let mut keep: Vec<RawFd> = files.iter().map(|(t, _)| t.dir.as_raw_fd()).collect();
    keep.push(line.as_raw_fd());
    close_others(&keep);
    // One byte: the master is exiting and waits for us; end of file: it is gone.
    let mut byte = [0u8; 1];
    if matches!(line.read(&mut byte), Ok(1)) {
        // The master exits right after our answer; its listener is already closed.
        let done = tidy(&files, Some(master));
        let _ = line.write_all(b"d");
        if done {
            return;
        }
    }
    drop(line);
    follow(&files, master);
}

/// Removes each file that is still the master's and that no live server owns; `exiting`, if
/// given, is a process to count as gone (the master, about to exit). Whether everything is
/// gone.
fn tidy(files: &[(Tidy, bool)], exiting: Option<Pid>) -> bool {
    let mut all_gone = true;
    for (file, socket) in files {
        if !file.still_ours() {
            continue;
        }
        let served = if *socket {
            listening(&file.path)
        } else {
            live_owner(&file.path).is_some_and(|pid| Some(pid) != exiting)
        };
        if served {
            all_gone = false;
        } else {
            file.remove();
        }
    }
    all_gone
}

/// The live process the pid file at `path` names, if it vouches for one.
fn live_owner(path: &Path) -> Option<Pid> {
    crate::runtime_files::verified_pid(path).ok()
}

/// Whether some process listens on the Unix socket bound at `path` (as /proc/net/unix lists
/// it: read, not connected to, so the server it names sees nothing).
fn listening(path: &Path) -> bool {
    const ACCEPTING: u32 = 0x0001_0000; // __SO_ACCEPTCON: a listening socket
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return true; // cannot tell: leave the file
    };
    // The path is the rest of the line after the inode (it may hold spaces itself).
    let want = format!(" {}", path.display());
    table.lines().skip(1).any(|l| {
        let flags = l.split_whitespace().nth(3);
        flags.is_some_and(|f| u32::from_str_radix(f, 16).is_ok_and(|f| f & ACCEPTING != 0))
            && l.ends_with(&want)
    })
}

/// After the master went without a word (it crashed, or retired after an upgrade): waits
/// for whoever serves the files now — the process the pid file names, or, without one, the
/// socket's listener — then removes them. Each turn waits for one live process or ends.
fn follow(files: &[(Tidy, bool)], master: Pid) {
    let pid_file = files
        .iter()
        .find(|(_, socket)| !socket)
        .map(|(f, _)| &f.path);
    let mut waiting_for = master;
    loop {
        while !gone(waiting_for) {
            std::thread::sleep(FOLLOW_EVERY);
        }
        if tidy(files, None) {
            return;
        }
        match pid_file.and_then(|p| live_owner(p)) {
            Some(next) => waiting_for = next,
            // No pid file to name the successor: look again shortly.
            None => std::thread::sleep(FOLLOW_EVERY),
        }
    }
}

/// Whether `pid` has exited (a zombie counts: it serves nothing).
fn gone(pid: Pid) -> bool {
    procfs::process::Process::new(pid.as_raw())
        .and_then(|p| p.stat())
        .map_or(true, |s| s.state == 'Z')
}

/// Closes every descriptor but stdio and `keep`; stdin and stdout become /dev/null (stderr
/// stays, for the one warning the janitor may have).
fn close_others(keep: &[RawFd]) {
    let open_fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in open_fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor of this process that nothing here uses.
            unsafe { libc::close(fd) };
        }
    }
    if let Ok(null) = open(OsStr::new("/dev/null"), OFlag::O_RDWR, Mode::empty()) {
        for target in [0, 1] {
            // SAFETY: dup2 onto stdin/stdout, both owned by this process.
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("prefork-janitor-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_socket_counts_as_served_only_while_someone_listens_on_it() {
        let d = scratch("listen");
        let path = d.join("a ctl.sock"); // a space: the path is the rest of the line
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(listening(&path));
        drop(listener);
        assert!(!listening(&path), "the file remains, nobody listens");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_the_very_file_created_is_removed() {
        let d = scratch("tidy");
        let path = d.join("master.pid");
        std::fs::write(&path, "1\n").unwrap();
        let file = Tidy::of(&path).unwrap();
        assert!(file.still_ours());
        // Replaced by another file under the same name: not ours any more, left alone.
        let other = d.join("other");
        std::fs::write(&other, "x\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(!file.still_ours());
        let files = vec![(file, false)];
        assert!(tidy(&files, None));
        assert!(
            path.exists(),
            "a file the master did not create was removed"
        );
        // Its own file, naming no live process: removed.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "4194300\nstarttime 1\n").unwrap();
        let files = vec![(Tidy::of(&path).unwrap(), false)];
        assert!(tidy(&files, None));
        assert!(!path.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
