//! systemd integration, without libsystemd: socket activation (LISTEN_FDS / LISTEN_PID, the
//! listener arrives as descriptor 3) and readiness notification (datagrams to NOTIFY_SOCKET).
//! Outside systemd both are no-ops.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const FIRST_FD: i32 = 3;

/// The listening socket systemd passed to this process, if any.
pub fn listen_fd() -> Option<OwnedFd> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    if !for_us || count == 0 {
        return None;
    }
    // SAFETY: by the socket-activation protocol, LISTEN_PID naming this process means
    // descriptors 3.. were passed to it, open, for it alone; nothing else here has taken fd 3
    // (the binary has not opened anything yet). It is wrapped exactly once.
    Some(unsafe { OwnedFd::from_raw_fd(FIRST_FD) })
}

/// Sends `state` (e.g. `READY=1`) to the service manager when NOTIFY_SOCKET is set.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        protocol::log!("cannot notify the service manager ({state}): {e}");
    }
}

/// CLOCK_MONOTONIC in microseconds, as `RELOADING=1` wants it in MONOTONIC_USEC.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}
