//! Which process serves the address a load tool loads, read from the kernel's socket tables
//! (`/proc/net/{tcp,tcp6,udp,udp6}`) and each process's descriptors (`/proc/PID/fd`).
//!
//! A pid typed by hand (or found with `pgrep`) may name another user's server on a shared
//! host; its CPU and memory would be reported as the cost of load it never saw. So a given
//! pid is believed only if it, or one of its descendants, holds a socket listening on the
//! target, and `auto` finds that process itself.

use std::collections::HashSet;
use std::net::SocketAddr;

use procfs::process::{FDTarget, Process};

/// The kind of socket the server listens with.
// Each load tool is its own binary and names one of the two.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A TCP listener (echo, chat).
    Tcp,
    /// An unconnected UDP socket (TFTP's request port).
    Udp,
}

/// Why no server could be named.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// Nothing in this network namespace listens on the address.
    #[error("nothing listens on {0} ({1}); is the server running there?")]
    NothingListens(SocketAddr, &'static str),
    /// A socket listens, but no process this user may inspect holds it.
    #[error(
        "something listens on {0}, but no process whose descriptors you may read holds it \
         (another user's server?): not measuring it"
    )]
    NotYours(SocketAddr),
    /// Unrelated processes share the address (SO_REUSEPORT).
    #[error("several unrelated processes listen on {target}: {pids}; pass --server-pid PID")]
    Several {
        /// The address.
        target: SocketAddr,
        /// Each root process, with its name.
        pids: String,
    },
    /// The pid given does not serve the target.
    #[error(
        "--server-pid {pid} ({name}) does not serve {target}: {who}; not reporting another server's cost"
    )]
    WrongServer {
        /// The pid given.
        pid: i32,
        /// Its command name, or why it has none.
        name: String,
        /// The address loaded.
        target: SocketAddr,
        /// Who serves it instead.
        who: String,
    },
    /// The socket tables could not be read.
    #[error("reading {what}: {source}")]
    Proc {
        /// What was read.
        what: &'static str,
        /// The failure.
        source: procfs::ProcError,
    },
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "TCP",
        Transport::Udp => "UDP",
    }
}

/// Whether a socket bound to `local` receives what is sent to `target`: the same port, and
/// the same address or a wildcard (IPv4-mapped IPv6 addresses compared as IPv4).
fn receives(local: SocketAddr, target: SocketAddr) -> bool {
    let ip = local.ip().to_canonical();
    local.port() == target.port() && (ip == target.ip().to_canonical() || ip.is_unspecified())
}

/// Inodes of the sockets listening on `target` in this process's network namespace.
fn listening(target: SocketAddr, transport: Transport) -> Result<HashSet<u64>, ServingError> {
    let proc = |what| move |source| ServingError::Proc { what, source };
    let mut out = HashSet::new();
    match transport {
        Transport::Tcp => {
            let mut all = procfs::net::tcp().map_err(proc("/proc/net/tcp"))?;
            // No IPv6 (a kernel without it) means no table, not a failure.
            all.extend(procfs::net::tcp6().unwrap_or_default());
            out.extend(
                all.iter()
                    .filter(|e| e.state == procfs::net::TcpState::Listen)
                    .filter(|e| receives(e.local_address, target))
                    .map(|e| e.inode),
            );
        }
        Transport::Udp => {
            let mut all = procfs::net::udp().map_err(proc("/proc/net/udp"))?;
            all.extend(procfs::net::udp6().unwrap_or_default());
            // A connected UDP socket (state 1) only hears its one peer: not a server's port.
            out.extend(
                all.iter()
                    .filter(|e| e.state == procfs::net::UdpState::Close)
                    .filter(|e| receives(e.local_address, target))
                    .map(|e| e.inode),
            );
        }
    }
    Ok(out)
}

/// Whether `pid` holds one of `inodes` (false when its descriptors cannot be read).
fn holds(pid: i32, inodes: &HashSet<u64>) -> bool {
    let Ok(fds) = Process::new(pid).and_then(|p| p.fd()) else {
        return false;
    };
    fds.flatten()
        .any(|fd| matches!(fd.target, FDTarget::Socket(i) if inodes.contains(&i)))
}

fn name(pid: i32) -> String {
    Process::new(pid)
        .and_then(|p| p.stat())
        .map_or_else(|_| "no such process".into(), |s| s.comm)
}

/// The processes holding a listening socket on `target` whose parent does not: a prefork
/// master (its workers hold the same socket), a single-process server.
fn roots(target: SocketAddr, transport: Transport) -> Result<Vec<i32>, ServingError> {
    let inodes = listening(target, transport)?;
    if inodes.is_empty() {
        return Err(ServingError::NothingListens(
            target,
            transport_name(transport),
        ));
    }
    let all = procfs::process::all_processes().map_err(|source| ServingError::Proc {
        what: "/proc",
        source,
    })?;
    let holders: Vec<(i32, i32)> = all
        .flatten()
        .filter(|p| holds(p.pid, &inodes))
        .filter_map(|p| Some((p.pid, p.stat().ok()?.ppid)))
        .collect();
    let pids: HashSet<i32> = holders.iter().map(|&(p, _)| p).collect();
    let mut roots: Vec<i32> = holders
        .iter()
        .filter(|(_, parent)| !pids.contains(parent))
        .map(|&(p, _)| p)
        .collect();
    roots.sort_unstable();
    if roots.is_empty() {
        return Err(ServingError::NotYours(target));
    }
    Ok(roots)
}

/// The one process tree serving `target` (for `--server-pid auto`).
pub fn find(target: SocketAddr, transport: Transport) -> Result<i32, ServingError> {
    match roots(target, transport)?.as_slice() {
        [one] => Ok(*one),
        many => Err(ServingError::Several {
            target,
            pids: many
                .iter()
                .map(|&p| format!("{p} ({})", name(p)))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Checks that `pid` or one of its descendants listens on `target`.
pub fn check(pid: i32, target: SocketAddr, transport: Transport) -> Result<(), ServingError> {
    let inodes = listening(target, transport)?;
    if super::tree(pid).into_iter().any(|p| holds(p, &inodes)) {
        return Ok(());
    }
    let who = match roots(target, transport) {
        Ok(r) => format!(
            "{} listening there ({})",
            r.iter()
                .map(|&p| format!("pid {p} ({})", name(p)))
                .collect::<Vec<_>>()
                .join(", "),
            "--server-pid auto measures it"
        ),
        Err(e) => e.to_string(),
    };
    Err(ServingError::WrongServer {
        pid,
        name: name(pid),
        target,
        who,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    #[test]
    fn a_wildcard_or_the_same_address_receives_a_target() {
        let t: SocketAddr = "127.0.0.1:7007".parse().unwrap();
        assert!(receives("127.0.0.1:7007".parse().unwrap(), t));
        assert!(receives("0.0.0.0:7007".parse().unwrap(), t));
        assert!(receives("[::]:7007".parse().unwrap(), t));
        assert!(receives("[::ffff:127.0.0.1]:7007".parse().unwrap(), t));
        assert!(!receives("127.0.0.2:7007".parse().unwrap(), t));
        assert!(!receives("127.0.0.1:7008".parse().unwrap(), t));
    }

    #[test]
    fn this_process_is_found_as_the_server_of_its_own_listeners() {
        let me = std::process::id() as i32;
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        assert_eq!(find(addr, Transport::Tcp).unwrap(), me);
        check(me, addr, Transport::Tcp).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let uaddr = udp.local_addr().unwrap();
        assert_eq!(find(uaddr, Transport::Udp).unwrap(), me);
        // A process outside this one's tree serves neither.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let wrong = check(other.id() as i32, addr, Transport::Tcp);
        other.kill().unwrap();
        other.wait().unwrap();
        let Err(ServingError::WrongServer { who, .. }) = wrong else {
            panic!("{wrong:?}");
        };
        assert!(who.contains(&format!("pid {me} ")), "{who}");
        drop(tcp);
        assert!(matches!(
            find(addr, Transport::Tcp),
            Err(ServingError::NothingListens(..))
        ));
    }
}
