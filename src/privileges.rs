//! Dropping root: when started as root with `--user`, the server binds its sockets first,
//! creates the control socket and pid file for the serving user (see `runtime_files`), then
//! becomes that user (group first, then supplementary groups, then user: the order that
//! cannot be undone halfway).

use nix::unistd::{Gid, Group, Uid, User, setgid, setgroups, setuid};
use thiserror::Error;

/// Why privileges could not be dropped.
#[derive(Debug, Error)]
pub enum PrivilegeError {
    /// No such user or group.
    #[error("no {kind} named {name:?}")]
    Unknown {
        /// `user` or `group`.
        kind: &'static str,
        /// The name given.
        name: String,
    },
    /// `--user` without being root.
    #[error("--user needs root (this process runs as uid {0})")]
    NotRoot(u32),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The failure.
        source: nix::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> PrivilegeError {
    let what = what.into();
    move |source| PrivilegeError::Sys { what, source }
}

/// The user (and group) to serve as, looked up before any file is created so those files can
/// be created for it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The user's name.
    pub name: String,
    /// Its uid.
    pub uid: Uid,
    /// The group to serve with: `--group`, or the user's own.
    pub gid: Gid,
}

/// Looks up `user` and `group` (or the user's own group).
pub fn lookup(user: &str, group: Option<&str>) -> Result<Target, PrivilegeError> {
    let u = User::from_name(user)
        .map_err(sys(format!("looking up user {user:?}")))?
        .ok_or_else(|| PrivilegeError::Unknown {
            kind: "user",
            name: user.into(),
        })?;
    let gid = match group {
        Some(g) => {
            Group::from_name(g)
                .map_err(sys(format!("looking up group {g:?}")))?
                .ok_or_else(|| PrivilegeError::Unknown {
                    kind: "group",
                    name: g.into(),
                })?
                .gid
        }
        None => u.gid,
    };
    Ok(Target {
        name: user.into(),
        uid: u.uid,
        gid,
    })
}

/// Whether this process already serves as `target`: a new master started by a binary upgrade
/// of a server that dropped to that user runs as it from the start, with every file it needs
/// inherited, and has nothing to drop.
pub fn already(target: &Target) -> bool {
    Uid::effective() == target.uid
        && Uid::current() == target.uid
        && Gid::effective() == target.gid
        && !Uid::effective().is_root()
}

/// Becomes `target`: group first, then supplementary groups, then user, and checks that root
/// cannot be regained. The files it must own were created for it beforehand.
pub fn become_user(target: &Target) -> Result<(), PrivilegeError> {
    if !Uid::effective().is_root() {
        return Err(PrivilegeError::NotRoot(Uid::effective().as_raw()));
    }
    setgroups(&[target.gid]).map_err(sys("setgroups"))?;
    setgid(target.gid).map_err(sys("setgid"))?;
    setuid(target.uid).map_err(sys("setuid"))?;
    // Make sure it stuck: root must not be recoverable.
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::Sys {
            what: "root could be regained after setuid".into(),
            source: nix::Error::EPERM,
        });
    }
    Ok(())
}
