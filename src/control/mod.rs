//! The control socket: a Unix socket (mode 0600) on which the master answers one-line requests
//! ([`Request`]) with one line of JSON ([`Response`]), then closes. `prefork-echo stats` is its
//! client ([`request_within`], which checks who answers).
//!
//! It is served from the master's own event loop, so a peer must never be able to stall it:
//! requests are bounded in size, answers are written without blocking, and a peer that has not
//! finished within [`CLIENT_DEADLINE`] is dropped.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid};

use interprocess::local_socket::traits::Listener as _;
use interprocess::local_socket::{
    GenericFilePath, ListenerNonblockingMode, ListenerOptions, ToFsName,
};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use interprocess::os::unix::uds_local_socket::{Listener, Stream};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use thiserror::Error;

use crate::clients::Clients;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 256;
/// How long a control client may take to send its request and read the answer.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
/// How long a client may wait for a deferred answer (a reload waits for the new generation).
pub const DEFERRED_DEADLINE: Duration = Duration::from_secs(300);

mod connect;
mod messages;

pub use connect::{default_path, request_within};

pub use messages::{Request, Response};

/// Names one control client across calls (an answer deferred for a client that has since
/// gone never reaches a newer client in its slot).
pub use crate::clients::ClientId;

/// Why the control socket could not be set up or reached.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Another live server answers on the path.
    #[error("control socket {0} is in use by a running server (choose another with --control)")]
    InUse(PathBuf),
    /// Something that is not a socket is at the path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The path's directory or an existing file there is not safe to use.
    #[error(transparent)]
    Unsafe(#[from] crate::runtime_files::FileError),
    /// The peer at the path is not a server this user may believe.
    #[error(
        "control socket {path} answered as uid {uid}, which is neither you nor root nor the \
         socket's owner in a directory only root or you can write: not trusting it"
    )]
    Untrusted {
        /// The socket path.
        path: PathBuf,
        /// The peer's uid.
        uid: u32,
    },
    /// The answer is not one this build understands.
    #[error("unexpected answer from {path}: {why}")]
    Garbled {
        /// The socket path.
        path: PathBuf,
        /// What was wrong, with the start of the answer.
        why: String,
    },
    /// Nothing answers at the path: no server runs there (see [`connect`]'s wording).
    #[error("{}", connect::no_server(path, *listen, why))]
    NoServer {
        /// The socket path.
        path: PathBuf,
        /// The address whose default path it is, if it is one.
        listen: Option<std::net::SocketAddr>,
        /// What was found at the path instead.
        why: &'static str,
    },
    /// A system call failed.
    #[error("control socket {path}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
}

/// The socket file this process created (or inherited) at a path, as (device, inode): it is
/// unlinked at exit only if the path still names that very file and this process still owns
/// the name — never a file another live server now serves there.
#[derive(Debug)]
struct Name {
    path: PathBuf,
    id: Option<(u64, u64)>,
    owned: bool,
}

impl Name {
    fn identify(path: &Path) -> Option<(u64, u64)> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        meta.file_type()
            .is_socket()
            .then(|| (meta.dev(), meta.ino()))
    }
}

impl Drop for Name {
    fn drop(&mut self) {
        if self.owned && self.id.is_some() && Name::identify(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct Client {
    stream: Stream,
    request: Vec<u8>,
    /// The request was read and its answer is deferred.
    waiting: bool,
    answer: Vec<u8>,
    written: usize,
}

impl AsFd for Client {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// The listening control socket and its clients, driven by the owner's mio loop.
pub struct ControlServer {
    listener: Listener,
    clients: Clients<Client>,
    name: Name,
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0600, owned by `owner` if given (the serving
    /// user). The directory must be safe (see `runtime_files::check_dir`); a stale socket file
    /// (nobody answering) is replaced; a live one is an error. Created before privileges are
    /// dropped, registered after.
    pub fn bind(path: &Path, owner: Option<(Uid, Gid)>) -> Result<Self, ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        crate::runtime_files::check_dir(path, owner.map(|(u, _)| u))?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket(path.to_path_buf()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        let name = path.to_fs_name::<GenericFilePath>().map_err(io_err)?;
        let listener = ListenerOptions::new()
            .name(name)
            // fchmod before bind: the socket is never reachable with looser permissions.
            .mode(0o600)
            .nonblocking(ListenerNonblockingMode::Both)
            // Unlinking is `Name`'s job: only while the path is still ours.
            .reclaim_name(false)
            .create_sync_as::<Listener>()
            .map_err(io_err)?;
        let id = Name::identify(path);
        if let Some((uid, gid)) = owner {
            // bind(2) never follows a symlink, but the file could be swapped before this
            // chown: so not chown(2), which would follow one, but lchown, on a path checked
            // to be the socket just bound.
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                path,
                Some(uid),
                Some(gid),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_err(e.into()))?;
            if id.is_none() || Name::identify(path) != id {
                return Err(io_err(io::Error::other(
                    "the socket file was replaced while it was being set up",
                )));
            }
        }
        Ok(ControlServer::serving(listener, path, id, true))
    }

    fn serving(listener: Listener, path: &Path, id: Option<(u64, u64)>, owned: bool) -> Self {
        ControlServer {
            listener,
            clients: Clients::new(),
            name: Name {
                path: path.to_path_buf(),
                id,
                owned,
            },
        }
    }

    /// Takes over the listener a predecessor master handed over in a binary upgrade. The name
    /// stays the predecessor's until [`claim_name`](Self::claim_name): a successor that fails
    /// before it serves must leave the path working for the old master.
    pub fn adopt(fd: OwnedFd, path: &Path) -> Result<Self, ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        let listener = Listener::from(fd);
        listener
            .set_nonblocking(ListenerNonblockingMode::Both)
            .map_err(io_err)?;
        nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| io_err(e.into()))?;
        Ok(ControlServer::serving(
            listener,
            path,
            Name::identify(path),
            false,
        ))
    }

    /// The listening descriptor, to hand to a successor.
    pub fn raw_fd(&self) -> RawFd {
        self.listener.as_fd().as_raw_fd()
    }

    /// Whether its path still names this very socket (a successor that exited cleanly removed
    /// it; then the path must be bound anew to be reached).
    pub fn serves_its_path(&self) -> bool {
        self.name.id.is_some() && Name::identify(&self.name.path) == self.name.id
    }

    /// Makes the path this server's own (a successor, once it serves): removed at its exit.
    pub fn claim_name(&mut self) {
        self.name.owned = true;
    }

    /// Watches the socket from `registry`, under tokens from `base` upwards.
    pub fn register(&mut self, registry: &Registry, base: usize) -> io::Result<()> {
        self.clients.set_base(base);
        registry.register(
            &mut SourceFd(&self.listener.as_fd().as_raw_fd()),
            Token(base),
            Interest::READABLE,
        )
    }

    /// Leaves the socket file in place at exit: after an upgrade it names the new master's.
    pub fn release_name(&mut self) {
        self.name.owned = false;
    }

    /// Handles readiness of one of its tokens; `answer` turns a request into its answer, or
    /// `None` to answer later with [`respond`](Self::respond).
    pub fn handle(
        &mut self,
        registry: &Registry,
        token: Token,
        answer: &mut dyn FnMut(&Request, ClientId) -> Option<Response>,
    ) {
        if self.clients.is_listener(token) {
            self.accept(registry);
            return;
        }
        let key = self.clients.key(token);
        if let Some(done) = self.progress(key, answer) {
            if let Some(why) = done {
                protocol::log!("control client dropped: {why}");
            }
            self.clients.remove(registry, key);
        }
    }

    /// Sends a deferred answer; a client that has gone meanwhile is skipped.
    pub fn respond(&mut self, registry: &Registry, id: ClientId, answer: &Response) {
        match self.clients.get(id) {
            Some(e) if e.state.waiting => {
                e.state.waiting = false;
                e.state.answer = (answer.to_line() + "\n").into_bytes();
                e.deadline = Instant::now() + CLIENT_DEADLINE;
            }
            _ => return,
        }
        let key = Clients::<Client>::key_of(id);
        if let Some(done) = self.progress(key, &mut |_, _| None) {
            if let Some(why) = done {
                protocol::log!("control client dropped: {why}");
            }
            self.clients.remove(registry, key);
        }
    }

    /// Drops clients past their deadline (they stalled or never read).
    pub fn expire(&mut self, registry: &Registry) {
        for _ in 0..self.clients.expire(registry, Instant::now()) {
            protocol::log!(
                "control client dropped: no complete exchange within {CLIENT_DEADLINE:?}"
            );
        }
    }

    /// The earliest client deadline, for the owner's poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.next_deadline()
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok(stream) => {
                    let client = Client {
                        stream,
                        waiting: false,
                        request: Vec::new(),
                        answer: Vec::new(),
                        written: 0,
                    };
                    let _ = self
                        .clients
                        .add(registry, client, Instant::now() + CLIENT_DEADLINE);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    protocol::log!("control socket accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Advances one client; `Some(None)` when it is done, `Some(Some(why))` when it misbehaved.
    fn progress(
        &mut self,
        key: usize,
        answer: &mut dyn FnMut(&Request, ClientId) -> Option<Response>,
    ) -> Option<Option<String>> {
        let (id, entry) = self.clients.get_mut(key)?;
        let c = &mut entry.state;
        if c.waiting {
            return None;
        }
        if c.answer.is_empty() {
            // Read up to the first newline. Bytes after it are ignored, and a client that
            // half-closes right after its request (`nc -N`) is still answered.
            let mut buf = [0u8; MAX_REQUEST];
            let mut closed = false;
            while !c.request.contains(&b'\n') {
                match (&c.stream).read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => c.request.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Some(Some(e.to_string())),
                }
                if c.request.len() > MAX_REQUEST && !c.request[..=MAX_REQUEST].contains(&b'\n') {
                    return Some(Some(format!("request longer than {MAX_REQUEST} bytes")));
                }
            }
            let Some(newline) = c.request.iter().position(|&b| b == b'\n') else {
                return closed.then(|| Some("closed before sending a request".into()));
            };
            if newline > MAX_REQUEST {
                return Some(Some(format!("request longer than {MAX_REQUEST} bytes")));
            }
            let line = match Request::parse(&c.request[..newline]) {
                Ok(req) => match answer(&req, id) {
                    Some(response) => response.to_line(),
                    None => {
                        c.waiting = true;
                        entry.deadline = Instant::now() + DEFERRED_DEADLINE;
                        return None;
                    }
                },
                Err(why) => {
                    protocol::log!("control client sent a bad request: {why}");
                    Response::error(why).to_line()
                }
            };
            c.answer = (line + "\n").into_bytes();
        }
        while c.written < c.answer.len() {
            match (&c.stream).write(&c.answer[c.written..]) {
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => return Some(Some(e.to_string())),
            }
        }
        Some(None)
    }
}

/// The answer of thread and fork-per-conn modes to requests other than `stats`: `stop` raises
/// SIGTERM in this process (its loop then drains as for a signal from outside); reloading and
/// scaling belong to process mode.
pub fn single_process_answer(req: &Request, drain: Duration) -> Response {
    match req {
        Request::Stop => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
            Response::Stopping {
                ok: true,
                pid: std::process::id(),
                drain_timeout_secs: drain.as_secs_f64(),
            }
        }
        Request::Stats => Response::error("stats is answered by the caller"),
        Request::Reload | Request::Scale(_) | Request::Upgrade | Request::UpgradeCommit => {
            Response::error("reload, scale and upgrade are for --mode process")
        }
    }
}
