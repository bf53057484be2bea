//! Files the server leaves on the host while it runs — the pid file and the control socket's
//! directory — created the way a process that may run as root must create them.
//!
//! The threat is another local user who can write where these files go (a sticky /tmp, or a
//! directory handed to the serving user): a symlink or a swapped file at the path must never
//! make root write to, or chown, a file it did not create. So:
//! - a file is *created*, never opened: a temporary name with `O_CREAT|O_EXCL|O_NOFOLLOW`,
//!   `fchown` on that descriptor, then `rename` over the path (which replaces a symlink there
//!   rather than following it);
//! - the directory is checked first: owned by root, by this process's user or by the serving
//!   user, and writable by nobody else unless it is sticky, in which case a file already at
//!   the path must be ours;
//! - the pid file records the process's start time beside its pid, so `stop --pid-file`
//!   signals only the process that wrote it, never whatever took the number since; and since
//!   the serving user owns the file (an upgraded master, running as that user, must rewrite
//!   it), what the file says is checked against what the process is (see [`verified_pid`]).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Pid, Uid};
use thiserror::Error;

/// Why a runtime file could not be created or trusted.
#[derive(Debug, Error)]
pub enum FileError {
    /// The directory lets other users replace what is in it.
    #[error(
        "refusing {path}: its directory {dir} is writable by users other than its owner \
         (mode {mode:o}, owner uid {owner}) and not sticky; use a private directory"
    )]
    UnsafeDir {
        /// The file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// The directory's mode bits.
        mode: u32,
        /// The directory's owner.
        owner: u32,
    },
    /// The directory belongs to another user.
    #[error("refusing {path}: its directory {dir} belongs to uid {owner}, not to root or to us")]
    ForeignDir {
        /// The file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// The directory's owner.
        owner: u32,
    },
    /// In a sticky directory, something another user owns sits at the path.
    #[error("refusing {path}: it exists and belongs to uid {owner}, not to us")]
    ForeignFile {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A pid file does not name a live prefork-echo master it can vouch for.
    #[error("{0}")]
    Pid(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError::Io { what, path, source }
}

/// Checks that `path`'s directory cannot be tampered with by users other than root, this
/// process's user and `also` (the serving user, with `--user`).
pub fn check_dir(path: &Path, also: Option<Uid>) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let meta = std::fs::metadata(&dir).map_err(io("reading the directory of", path))?;
    let trusted = |uid: u32| {
        uid == 0 || uid == Uid::effective().as_raw() || Some(uid) == also.map(Uid::as_raw)
    };
    if !trusted(meta.uid()) {
        return Err(FileError::ForeignDir {
            path: path.to_path_buf(),
            dir,
            owner: meta.uid(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        if mode & 0o1000 == 0 {
            return Err(FileError::UnsafeDir {
                path: path.to_path_buf(),
                dir,
                mode,
                owner: meta.uid(),
            });
        }
        // Sticky (/tmp): others may create names here but not replace ours.
        if let Ok(existing) = std::fs::symlink_metadata(path) {
            if !trusted(existing.uid()) {
                return Err(FileError::ForeignFile {
                    path: path.to_path_buf(),
                    owner: existing.uid(),
                });
            }
        }
    }
    Ok(())
}

/// Writes `contents` to `path` as a new file (mode 0644) owned by `owner` if given: created
/// under a temporary name with `O_EXCL|O_NOFOLLOW`, chowned through its descriptor, renamed
/// into place. Where this process may not create files in the directory (a successor running
/// as the serving user in root's directory), a regular file at `path` that this user already
/// owns is rewritten in place instead, opened with `O_NOFOLLOW`.
pub fn write_file(path: &Path, contents: &str, owner: Option<(Uid, Gid)>) -> Result<(), FileError> {
    let name = path
        .file_name()
        .ok_or_else(|| FileError::Pid(format!("{} names no file", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp);
    let mut file = match created {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return rewrite_own(path, contents);
        }
        Err(e) => return Err(io("creating", &tmp)(e)),
    };
    let result = (|| {
        if let Some((uid, gid)) = owner {
            nix::unistd::fchown(&file, Some(uid), Some(gid))
                .map_err(|e| io("handing over", &tmp)(e.into()))?;
        }
        file.write_all(contents.as_bytes())
            .map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn rewrite_own(path: &Path, contents: &str) -> Result<(), FileError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("opening", path))?;
    let meta = file.metadata().map_err(io("reading", path))?;
    if !meta.is_file() || meta.uid() != Uid::effective().as_raw() {
        return Err(FileError::ForeignFile {
            path: path.to_path_buf(),
            owner: meta.uid(),
        });
    }
    file.set_len(0).map_err(io("truncating", path))?;
    file.write_all(contents.as_bytes())
        .map_err(io("writing", path))
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// pid, it names one process for the life of the system.
pub fn start_time(pid: Pid) -> Option<u64> {
    let stat = procfs::process::Process::new(pid.as_raw())
        .ok()?
        .stat()
        .ok()?;
    Some(stat.starttime)
}

/// The pid file's text for this process: its pid on the first line (what every pid-file
/// reader expects), its start time on the second.
pub fn pid_file_text() -> String {
    let me = nix::unistd::getpid();
    match start_time(me) {
        Some(t) => format!("{me}\nstarttime {t}\n"),
        None => format!("{me}\n"),
    }
}

/// Writes this process's pid file (see [`write_file`]).
pub fn write_pid_file(path: &Path, owner: Option<(Uid, Gid)>) -> Result<(), FileError> {
    write_file(path, &pid_file_text(), owner)
}

/// Removes the pid file if it still names this process (after an upgrade it names the new
/// master, which removes it itself).
pub fn remove_own_pid_file(path: &Path) {
    let mine = std::fs::read_to_string(path)
        .is_ok_and(|s| s.lines().next().map(str::trim) == Some(&std::process::id().to_string()));
    if mine {
        let _ = std::fs::remove_file(path);
    }
}

/// The most a pid file holds: a pid, a start time, their labels and line ends.
const PID_FILE_MAX: u64 = 128;

/// Reads a pid file and returns the pid only if it names the live prefork-echo master that
/// wrote it: a pid above 1 (0 and -1 would signal process groups, 1 is init) whose start time
/// matches the one recorded, and then — since the file's owner may write anything in it —
/// checked by what the process *is* ([`vouch`]): a prefork-echo binary, not one of its
/// workers, and running as the file's owner (a file the serving user may rewrite can never
/// aim root's `stop` at a process that user could not signal itself).
pub fn verified_pid(path: &Path) -> Result<Pid, FileError> {
    let shown = path.display();
    // The serving user may replace the file: never follow a link it planted (to another
    // server's pid file, /dev/zero, a FIFO), never block opening it, read a few bytes at most.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => FileError::Pid(format!(
                "{shown} is a symbolic link, never a pid file this server wrote; not following it"
            )),
            _ => io("reading the pid file", path)(e),
        })?;
    let meta = file.metadata().map_err(io("reading the pid file", path))?;
    // A pid file the master wrote is a regular file with one name; a second name is a hard
    // link someone made to a file (perhaps another server's) they do not own.
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(FileError::Pid(format!(
            "{shown} is not a regular file with a single name, never a pid file this server \
             wrote; not reading it"
        )));
    }
    let owner = meta.uid();
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(&mut file, PID_FILE_MAX + 1),
        &mut text,
    )
    .map_err(io("reading the pid file", path))?;
    if text.len() as u64 > PID_FILE_MAX {
        return Err(FileError::Pid(format!(
            "{shown} is longer than a pid file ({PID_FILE_MAX} bytes at most); not reading it"
        )));
    }
    let mut lines = text.lines();
    let pid: i32 = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| FileError::Pid(format!("{shown} does not hold a pid")))?;
    if pid <= 1 {
        return Err(FileError::Pid(format!(
            "{shown} names pid {pid}, which is never a prefork-echo master; not signalling it"
        )));
    }
    let pid = Pid::from_raw(pid);
    let recorded: u64 = lines
        .next()
        .and_then(|l| l.trim().strip_prefix("starttime "))
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| {
            FileError::Pid(format!(
                "{shown} records no start time, so pid {pid} cannot be told from a process \
                 that reused the number; not signalling it (use the control socket)"
            ))
        })?;
    match start_time(pid) {
        Some(t) if t == recorded => {}
        Some(_) => {
            return Err(FileError::Pid(format!(
                "{shown} is stale: pid {pid} is now another process; not signalling it"
            )));
        }
        None => {
            return Err(FileError::Pid(format!(
                "{shown} is stale: no process {pid} is running"
            )));
        }
    }
    vouch(pid, owner).map_err(|why| {
        FileError::Pid(format!(
            "{shown} names pid {pid}, which {why}; not signalling it"
        ))
    })?;
    Ok(pid)
}

/// Why `pid` is not a prefork-echo master that the owner (`owner`) of its pid file may direct
/// signals at, or `Ok` if it is. Read from /proc, which the process cannot forge:
/// - its uids: all of them `owner`'s, unless root owns the file (only root could write it);
///   a file the serving user owns thus lends root's signal only to that user's own processes;
/// - its executable: the same file as this client's, or one named like it or `prefork-echo…`
///   (an upgrade replaces the binary, and /proc then says `… (deleted)`);
/// - its role: not a worker (exec'd workers run the hidden `worker` command; forked ones are
///   exact copies of their parent master: same executable, arguments and environment, where
///   an upgraded master was exec'd with a hand-over variable of its own).
fn vouch(pid: Pid, owner: u32) -> Result<(), String> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status"))
        .map_err(|e| format!("cannot be inspected ({e})"))?;
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|u| u.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if uids.len() != 4 {
        return Err("shows no uids".into());
    }
    if owner != 0 && uids.iter().any(|&u| u != owner) {
        return Err(format!(
            "runs as uid {} while the pid file belongs to uid {owner}, who could have \
             written any pid in it",
            uids[1]
        ));
    }
    let exe = Executable::of(pid).ok_or("is not a program this client can identify")?;
    let mine = Executable::of(nix::unistd::getpid());
    let same_file = mine
        .as_ref()
        .is_some_and(|m| m.id.is_some() && m.id == exe.id);
    let alike = |name: &str| {
        name.starts_with("prefork-echo") || mine.as_ref().is_some_and(|m| m.name == name)
    };
    if !same_file && !alike(&exe.name) {
        return Err(format!("runs {:?}, not prefork-echo", exe.path));
    }
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    if cmdline.split(|&b| b == 0).nth(1) == Some(b"worker") {
        return Err("is a prefork-echo worker, not the master".into());
    }
    let parent = procfs::process::Process::new(pid.as_raw())
        .and_then(|p| p.stat())
        .map(|s| Pid::from_raw(s.ppid))
        .ok();
    if let Some(parent) = parent.filter(|p| p.as_raw() > 1) {
        let same = |name: &str| {
            let of = |p: Pid| std::fs::read(format!("/proc/{p}/{name}")).ok();
            of(pid).is_some() && of(pid) == of(parent)
        };
        if Executable::of(parent).is_some_and(|p| p.id.is_some() && p.id == exe.id)
            && same("cmdline")
            && same("environ")
        {
            return Err(format!(
                "is a worker forked by master {parent}, not the master"
            ));
        }
    }
    Ok(())
}

/// What /proc says a process runs.
struct Executable {
    /// The path, without the ` (deleted)` the kernel adds once the file was replaced.
    path: PathBuf,
    /// Its file name.
    name: String,
    /// (device, inode) of the file itself, reachable even when deleted.
    id: Option<(u64, u64)>,
}

impl Executable {
    fn of(pid: Pid) -> Option<Executable> {
        let link = format!("/proc/{pid}/exe");
        let shown = std::fs::read_link(&link).ok()?;
        let shown = shown.to_string_lossy();
        let path = PathBuf::from(shown.strip_suffix(" (deleted)").unwrap_or(&shown));
        let name = path.file_name()?.to_string_lossy().into_owned();
        let id = std::fs::metadata(&link).ok().map(|m| (m.dev(), m.ino()));
        Some(Executable { path, name, id })
    }
}

/// A private directory for this user's runtime files, created if missing: `$XDG_RUNTIME_DIR`
/// (already private, per the XDG spec) plus `prefork-echo`; as root without it,
/// `/run/prefork-echo`; otherwise `/tmp/prefork-echo-UID`. An existing directory is used only
/// if it is a real directory (not a symlink), ours, and closed to others.
pub fn private_dir() -> Result<PathBuf, FileError> {
    let me = Uid::effective();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("prefork-echo"),
        None if me.is_root() => PathBuf::from("/run/prefork-echo"),
        None => PathBuf::from(format!("/tmp/prefork-echo-{me}")),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", &dir)(e)),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(io("reading", &dir))?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != me.as_raw() || mode & 0o077 != 0 {
        return Err(FileError::UnsafeDir {
            path: dir.clone(),
            dir,
            mode,
            owner: meta.uid(),
        });
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("prefork-echo-rf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn a_symlink_at_the_path_is_replaced_never_followed() {
        let d = scratch("symlink");
        let victim = d.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let pid_file = d.join("master.pid");
        symlink(&victim, &pid_file).unwrap();
        write_pid_file(&pid_file, None).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let meta = std::fs::symlink_metadata(&pid_file).unwrap();
        assert!(meta.is_file(), "the symlink was replaced by a regular file");
        assert_eq!(verified_pid(&pid_file).unwrap(), nix::unistd::getpid());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn world_writable_directories_are_refused_unless_sticky() {
        let d = scratch("modes");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_dir(&d.join("x.pid"), None).unwrap_err();
        assert!(matches!(e, FileError::UnsafeDir { .. }), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_dir(&d.join("x.pid"), None).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_dir(&d.join("x.pid"), None).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pid_files_that_do_not_vouch_for_a_live_process_are_refused() {
        let d = scratch("pids");
        let f = d.join("p");
        for (text, why) in [
            ("-1\n", "never"),
            ("0\n", "never"),
            ("1\n", "never"),
            ("abc\n", "does not hold a pid"),
            (&format!("{}\n", std::process::id()), "no start time"),
            (&format!("{}\nstarttime 1\n", std::process::id()), "stale"),
            ("4194300\nstarttime 1\n", "stale"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = verified_pid(&f).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_pid_file_naming_another_program_is_refused_whatever_its_start_time() {
        let d = scratch("other");
        let f = d.join("p");
        let mut sleep = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(sleep.id() as i32);
        // /proc shows the new program only once exec is done.
        for _ in 0..500 {
            if Executable::of(pid).is_some_and(|e| e.name == "sleep") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let t = start_time(pid).unwrap();
        std::fs::write(&f, format!("{pid}\nstarttime {t}\n")).unwrap();
        let e = verified_pid(&f).unwrap_err().to_string();
        let _ = sleep.kill();
        let _ = sleep.wait();
        assert!(e.contains("not prefork-echo"), "{e}");
        // This process is its own binary: vouched for (the test of the happy path).
        std::fs::write(&f, pid_file_text()).unwrap();
        assert_eq!(verified_pid(&f).unwrap(), nix::unistd::getpid());
        if Uid::effective().is_root() {
            // Owned by someone else than the process it names: refused.
            nix::unistd::chown(&f, Some(Uid::from_raw(65534)), None).unwrap();
            let e = verified_pid(&f).unwrap_err().to_string();
            assert!(e.contains("runs as uid 0"), "{e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
