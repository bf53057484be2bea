//! The client's side of the control socket: where to find a server, how to ask it, and
//! whether to believe who answers.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use interprocess::local_socket::traits::Stream as _;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use interprocess::os::unix::uds_local_socket::Stream;
use nix::unistd::Uid;
use std::os::unix::fs::MetadataExt;

use super::{CLIENT_DEADLINE, ControlError, Response};

/// The default control socket path for a server on `addr`: `ADDRESS-PORT.sock` in this
/// user's private runtime directory (see [`crate::runtime_files::private_dir`]), keyed by
/// address and port so servers on `127.0.0.1:7007` and `[::1]:7007` do not collide.
pub fn default_path(addr: SocketAddr) -> Result<PathBuf, ControlError> {
    let dir = crate::runtime_files::private_dir()?;
    Ok(dir.join(format!("{}-{}.sock", addr.ip(), addr.port())))
}

/// The address whose default control path `path` is, if it is one (so an error can name
/// the server the user asked for, not only a file).
fn default_path_of(path: &Path) -> Option<SocketAddr> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".sock")?;
    let (ip, port) = stem.rsplit_once('-')?;
    let addr = SocketAddr::new(ip.parse().ok()?, port.parse().ok()?);
    (default_path(addr).ok()? == path).then_some(addr)
}

/// The wording of [`ControlError::NoServer`].
pub(super) fn no_server(path: &Path, listen: Option<SocketAddr>, why: &str) -> String {
    match listen {
        Some(addr) => format!(
            "no server on {addr} (looked for its control socket at {}: {why}); \
             is it running, and was it started with another --control?",
            path.display()
        ),
        None => format!("no server at control socket {} ({why})", path.display()),
    }
}

/// Sends one request line to the server at `path` and returns its answer, as the JSON line
/// it sent (for `stats --json`) and parsed.
pub fn request_within(
    path: &Path,
    line: &str,
    wait: Duration,
) -> Result<(String, Response), ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.to_fs_name::<GenericFilePath>().map_err(io_err)?;
    let stream = Stream::connect(name).map_err(|source| {
        let why = match source.kind() {
            std::io::ErrorKind::NotFound => "no such file",
            std::io::ErrorKind::ConnectionRefused => "a socket file nobody listens on",
            _ => return io_err(source),
        };
        ControlError::NoServer {
            path: path.to_path_buf(),
            listen: default_path_of(path),
            why,
        }
    })?;
    trust_peer(path, &stream)?;
    stream.set_recv_timeout(Some(wait)).map_err(io_err)?;
    stream
        .set_send_timeout(Some(CLIENT_DEADLINE))
        .map_err(io_err)?;
    (&stream)
        .write_all(format!("{line}\n").as_bytes())
        .map_err(io_err)?;
    let mut answer = String::new();
    (&stream).read_to_string(&mut answer).map_err(io_err)?;
    let answer = answer.trim_end().to_string();
    let parsed = serde_json::from_str(&answer).map_err(|e| ControlError::Garbled {
        path: path.to_path_buf(),
        why: format!("{e}: {}", protocol_truncate(&answer)),
    })?;
    Ok((answer, parsed))
}

fn protocol_truncate(s: &str) -> &str {
    s.char_indices().nth(200).map_or(s, |(i, _)| &s[..i])
}

/// Believes the server at `path` only if the kernel says it runs as this user or root
/// (`SO_PEERCRED`), or as the owner of the socket file in a directory that only root or this
/// user can write (a server started by root that dropped to `--user`). Anyone else could have
/// put a socket there to feed this client false answers.
fn trust_peer(path: &Path, stream: &Stream) -> Result<(), ControlError> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let peer = getsockopt(stream, PeerCredentials)
        .map_err(|e| ControlError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        })?
        .uid();
    let me = Uid::current().as_raw();
    if peer == me || peer == 0 {
        return Ok(());
    }
    let placed_by_root_or_me = || -> Option<bool> {
        let file = std::fs::symlink_metadata(path).ok()?;
        let dir = std::fs::metadata(path.parent()?).ok()?;
        let closed = dir.mode() & 0o022 == 0;
        Some(file.uid() == peer && (dir.uid() == 0 || dir.uid() == me) && closed)
    };
    if placed_by_root_or_me().unwrap_or(false) {
        return Ok(());
    }
    Err(ControlError::Untrusted {
        path: path.to_path_buf(),
        uid: peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_path_names_address_and_port() {
        let v4 = default_path("127.0.0.1:7007".parse().unwrap()).unwrap();
        let v6 = default_path("[::1]:7007".parse().unwrap()).unwrap();
        assert!(
            v4.to_string_lossy().ends_with("/127.0.0.1-7007.sock"),
            "{v4:?}"
        );
        assert!(v6.to_string_lossy().ends_with("/::1-7007.sock"), "{v6:?}");
        assert_ne!(v4, v6);
        assert_eq!(
            default_path_of(&v4),
            Some("127.0.0.1:7007".parse().unwrap())
        );
        assert_eq!(default_path_of(&v6), Some("[::1]:7007".parse().unwrap()));
        assert_eq!(default_path_of(Path::new("/tmp/127.0.0.1-7007.sock")), None);
    }
}
