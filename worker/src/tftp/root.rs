//! The one directory a TFTP server may touch (`--root`). Every name a client sends is
//! resolved by the kernel beneath a descriptor of that directory (`openat2` with
//! `RESOLVE_BENEATH`), so `..`, absolute paths and symlinks that lead out fail in the kernel
//! itself, atomically: there is no check-then-open window for a symlink swap to slip through.
//!
//! The directory is opened once, when the server starts (before it drops root), and only
//! that descriptor is used from then on: every worker, exec'd or forked, and every
//! fork-per-conn child inherits it. Renaming the path or putting a symlink in its place later
//! (its owner may be a less privileged user) changes nothing for the running server, as
//! tftpd's `chroot`/`chdir` at start-up does.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, linkat, unlinkat};

use super::packet::{Code, Refusal};

/// The served directory, as the descriptor opened at start.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
}

/// The file a write request writes, unseen until [`Created::publish`] links it into place
/// under its name: an unnamed file (`O_TMPFILE`) in the target's directory, so an upload that
/// fails, or a process killed half-way, leaves nothing behind. Where the file system has no
/// `O_TMPFILE`, a hidden name (`.NAME.tftp-upload`) stands in, removed on failure (but left by
/// a process killed half-way).
#[derive(Debug)]
pub struct Created {
    parent: OwnedFd,
    name: Vec<u8>,
    /// The hidden stand-in name, when the file system refused `O_TMPFILE`.
    temp: Option<Vec<u8>>,
}

impl Drop for Created {
    /// However the upload ends, a stand-in name does not outlive it.
    fn drop(&mut self) {
        self.remove();
    }
}

impl Created {
    /// Gives up the upload: an unnamed file vanishes when closed; a stand-in is removed.
    pub fn remove(&self) {
        if let Some(temp) = &self.temp {
            let _ = unlinkat(
                &self.parent,
                OsStr::from_bytes(temp),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }

    /// Bytes free for this process on the file system the upload goes to.
    pub fn free_bytes(&self) -> Result<u64, Refusal> {
        let st = nix::sys::statvfs::fstatvfs(&self.parent).map_err(refusal)?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    /// Links the complete file into place under its name, never replacing anything there.
    pub fn publish(&self, file: &File) -> Result<(), Refusal> {
        let name = OsStr::from_bytes(&self.name);
        let linked = match &self.temp {
            Some(temp) => {
                let temp = OsStr::from_bytes(temp);
                let r = linkat(&self.parent, temp, &self.parent, name, AtFlags::empty());
                self.remove();
                r
            }
            // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH (root); a server that dropped root
            // links through /proc's name for the descriptor instead.
            None => linkat(file, "", &self.parent, name, AtFlags::AT_EMPTY_PATH).or_else(|_| {
                let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
                linkat(
                    AT_FDCWD,
                    proc.as_str(),
                    &self.parent,
                    name,
                    AtFlags::AT_SYMLINK_FOLLOW,
                )
            }),
        };
        linked.map_err(refusal)
    }
}

/// Beneath the root, never through a magic link (`/proc/self/fd/...`).
fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// A client name as a relative path, or the refusal: absolute names and `..` components
/// are refused outright (the kernel would refuse them too; this gives the clearer message).
fn relative(name: &[u8]) -> Result<&Path, Refusal> {
    let path = Path::new(OsStr::from_bytes(name));
    if path.is_absolute() {
        return Err(Refusal::new(Code::Access, "absolute paths are refused"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(Refusal::new(Code::Access, "\"..\" is refused"));
    }
    Ok(path)
}

/// The refusal for a failed open.
fn refusal(e: Errno) -> Refusal {
    match e {
        Errno::ENOENT | Errno::ENOTDIR => Refusal::new(Code::NotFound, "file not found"),
        Errno::EEXIST => Refusal::new(Code::Exists, "file already exists"),
        // EXDEV: the path leads out of the root; ELOOP: a symlink where none may be.
        Errno::EACCES | Errno::EPERM | Errno::EXDEV | Errno::ELOOP | Errno::EISDIR => {
            Refusal::new(Code::Access, "access violation")
        }
        Errno::ENOSPC | Errno::EDQUOT => Refusal::new(Code::DiskFull, "disk full"),
        Errno::ENOSYS => Refusal::new(Code::Undefined, "this kernel lacks openat2 (Linux >= 5.6)"),
        _ => Refusal::new(Code::Undefined, "cannot open the file"),
    }
}

impl Root {
    /// Opens the directory at `path`, once: the server keeps this descriptor for its life.
    pub fn open(path: &Path) -> std::io::Result<Root> {
        let dir = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { dir })
    }

    /// The root from a descriptor opened by the master (inherited across fork or exec),
    /// checked to be a directory.
    pub fn adopt(dir: OwnedFd) -> std::io::Result<Root> {
        let st = fstat(&dir)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
            return Err(std::io::Error::other(
                "the --root descriptor is not a directory",
            ));
        }
        Ok(Root { dir })
    }

    /// Fails unless the directory is owned by root, this process's user or `also`, and
    /// writable by neither group nor others: the check for a directory opened again by path
    /// (which another user could have swapped) rather than inherited.
    pub fn check_trusted(&self, also: Option<u32>) -> std::io::Result<()> {
        let st = fstat(&self.dir)?;
        let me = nix::unistd::Uid::effective().as_raw();
        if st.st_uid != 0 && st.st_uid != me && Some(st.st_uid) != also {
            return Err(std::io::Error::other(format!(
                "the directory is owned by uid {}, not by root or the serving user",
                st.st_uid
            )));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "the directory is writable by group or others (mode {:o})",
                st.st_mode & 0o7777
            )));
        }
        Ok(())
    }

    /// The descriptor's number, for a child that must inherit it.
    pub fn raw_fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }

    /// Opens a regular file beneath the root for reading; its size comes along. The type is
    /// checked through an `O_PATH` descriptor first, which opens nothing: a FIFO or a device
    /// in the root is never opened (a FIFO's writer would be let through, a device's open
    /// can have effects of its own). Only then is that very file opened for reading.
    pub fn open_read(&self, name: &[u8]) -> Result<(File, u64), Refusal> {
        let path = relative(name)?;
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(beneath());
        let located = openat2(&self.dir, path, how).map_err(refusal)?;
        let st = fstat(&located).map_err(refusal)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(Refusal::new(Code::Access, "not a regular file"));
        }
        // O_NONBLOCK all the same: should the name have been swapped for a FIFO meanwhile
        // (the fallback below), opening it must not hang the worker.
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
        // The same inode, through /proc's name for the descriptor ...
        let proc = format!("/proc/self/fd/{}", located.as_raw_fd());
        let fd = match nix::fcntl::open(proc.as_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            // ... or, without /proc, the name again, checked to be the same file.
            Err(Errno::ENOENT) => {
                let how = OpenHow::new().flags(flags).resolve(beneath());
                openat2(&self.dir, path, how).map_err(refusal)?
            }
            Err(e) => return Err(refusal(e)),
        };
        let again = fstat(&fd).map_err(refusal)?;
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
            return Err(Refusal::new(Code::Access, "the file changed while opened"));
        }
        Ok((File::from(fd), st.st_size.max(0) as u64))
    }

    /// Creates a new file beneath the root (never an existing one, never through a symlink).
    pub fn create(&self, name: &[u8]) -> Result<(File, Created), Refusal> {
        // A name with a newline, ESC or other control byte would reach a terminal (an
        // admin's `ls`) as line breaks and escape sequences: refused, as an access violation.
        if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err(Refusal::new(
                Code::Access,
                "control characters in a file name are refused",
            ));
        }
        let path = relative(name)?;
        let (parent, base) = match (path.parent(), path.file_name()) {
            (Some(p), Some(b)) => (p, b),
            _ => return Err(Refusal::new(Code::Access, "not a file name")),
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(beneath());
        let dir = openat2(&self.dir, parent, how).map_err(refusal)?;
        // Refused now if the name is taken (the link at the end would fail anyway).
        match fstatat(&dir, base, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(_) => return Err(refusal(Errno::EEXIST)),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(refusal(e)),
        }
        let unnamed = openat(
            &dir,
            ".",
            OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        );
        let (fd, temp) = match unnamed {
            Ok(fd) => (fd, None),
            // No O_TMPFILE on this file system (or kernel): a hidden stand-in name.
            Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {
                let mut temp = b".".to_vec();
                temp.extend_from_slice(base.as_bytes());
                temp.extend_from_slice(b".tftp-upload");
                let fd = openat(
                    &dir,
                    OsStr::from_bytes(&temp),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                )
                .map_err(refusal)?;
                (fd, Some(temp))
            }
            Err(e) => return Err(refusal(e)),
        };
        Ok((
            File::from(fd),
            Created {
                parent: dir,
                name: base.as_bytes().to_vec(),
                temp,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn scratch_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tftp-root-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root/sub")).unwrap();
        d
    }

    #[test]
    fn names_resolve_beneath_the_root_only() {
        let d = scratch_dir("read");
        std::fs::write(d.join("secret"), b"outside").unwrap();
        std::fs::write(d.join("root/sub/f"), b"inside").unwrap();
        std::os::unix::fs::symlink("../secret", d.join("root/out")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("root/abs")).unwrap();
        std::os::unix::fs::symlink("sub/f", d.join("root/in")).unwrap();
        let root = Root::open(&d.join("root")).unwrap();
        let read = |n: &str| {
            root.open_read(n.as_bytes()).map(|(mut f, size)| {
                let mut s = String::new();
                f.read_to_string(&mut s).unwrap();
                (s, size)
            })
        };
        assert_eq!(read("sub/f").unwrap(), ("inside".to_string(), 6));
        assert_eq!(read("./sub//f").unwrap().0, "inside");
        assert_eq!(read("in").unwrap().0, "inside"); // a symlink that stays inside is fine
        for hostile in [
            "../secret",
            "sub/../../secret",
            "/etc/passwd",
            "out",
            "abs",
            "sub",
        ] {
            assert_eq!(read(hostile).unwrap_err().code, Code::Access, "{hostile}");
        }
        assert_eq!(read("missing").unwrap_err().code, Code::NotFound);
        assert_eq!(read("sub/f/x").unwrap_err().code, Code::NotFound);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn creation_makes_new_files_only_and_can_be_undone() {
        let d = scratch_dir("create");
        std::fs::write(d.join("root/old"), b"keep").unwrap();
        std::os::unix::fs::symlink("../victim", d.join("root/link")).unwrap();
        let root = Root::open(&d.join("root")).unwrap();
        assert_eq!(root.create(b"old").unwrap_err().code, Code::Exists);
        assert_eq!(root.create(b"link").unwrap_err().code, Code::Exists);
        assert_eq!(root.create(b"../victim").unwrap_err().code, Code::Access);
        assert_eq!(root.create(b"link/x").unwrap_err().code, Code::Access);
        assert!(!d.join("victim").exists());
        assert_eq!(std::fs::read(d.join("root/old")).unwrap(), b"keep");
        let (f, created) = root.create(b"sub/new").unwrap();
        assert!(!d.join("root/sub/new").exists(), "unseen until complete");
        (&f).write_all(b"whole").unwrap();
        created.publish(&f).unwrap();
        assert_eq!(std::fs::read(d.join("root/sub/new")).unwrap(), b"whole");
        assert_eq!(root.create(b"sub/new").unwrap_err().code, Code::Exists);
        let (_f, created) = root.create(b"sub/gone").unwrap();
        created.remove();
        drop(_f);
        assert_eq!(std::fs::read_dir(d.join("root/sub")).unwrap().count(), 1);
        for hostile in [
            &b"new\nline"[..],
            b"esc\x1b[31m",
            b"del\x7f",
            b"tab\t",
            b"sub/\x01",
        ] {
            assert_eq!(root.create(hostile).unwrap_err().code, Code::Access);
        }
        // A name taken meanwhile is never replaced.
        let (f, created) = root.create(b"raced").unwrap();
        std::fs::write(d.join("root/raced"), b"first").unwrap();
        assert_eq!(created.publish(&f).unwrap_err().code, Code::Exists);
        assert_eq!(std::fs::read(d.join("root/raced")).unwrap(), b"first");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
