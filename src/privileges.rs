//! Dropping root: when started as root with `--user`, the server binds its sockets first, then
//! gives the control socket and pid file to the serving user and becomes that user (group
//! first, then supplementary groups, then user: the order that cannot be undone halfway).

use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User, chown, setgid, setgroups, setuid};
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

/// Becomes `user` (and `group`, or the user's own group), handing `owned` (the control socket,
/// the pid file) to it first. Returns the uid and gid now in force.
pub fn drop_to(
    user: &str,
    group: Option<&str>,
    owned: &[&Path],
) -> Result<(Uid, Gid), PrivilegeError> {
    if !Uid::effective().is_root() {
        return Err(PrivilegeError::NotRoot(Uid::effective().as_raw()));
    }
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
    for path in owned {
        chown(*path, Some(u.uid), Some(gid)).map_err(sys(format!("chown {}", path.display())))?;
    }
    setgroups(&[gid]).map_err(sys("setgroups"))?;
    setgid(gid).map_err(sys("setgid"))?;
    setuid(u.uid).map_err(sys("setuid"))?;
    // Make sure it stuck: root must not be recoverable.
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::Sys {
            what: "root could be regained after setuid".into(),
            source: nix::Error::EPERM,
        });
    }
    Ok((u.uid, gid))
}
