//! The log line a connection closed for its PROXY header gets: one each, up to a few per
//! minute, so a flood of bad connections cannot flood the log; the rest are counted in
//! `proxy_errors` and summed up in one line.

use std::io;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ProxyError;

/// Why a connection was closed before its service saw it, as its log line says.
#[derive(Debug)]
pub enum Refusal {
    /// The peer is outside `--proxy-from`.
    NotAllowed,
    /// The header was missing, malformed or too long.
    Bad(ProxyError),
    /// It did not arrive within `--proxy-timeout`.
    Late,
    /// The peer closed, or the connection failed, before the header was complete.
    Closed,
}

impl Refusal {
    /// The refusal an error of [`read_blocking`](super::read_blocking) stands for.
    pub fn of(e: &io::Error) -> Refusal {
        match e.kind() {
            io::ErrorKind::TimedOut => Refusal::Late,
            _ => match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<ProxyError>())
            {
                Some(p) => Refusal::Bad(p.clone()),
                None => Refusal::Closed,
            },
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotAllowed => write!(f, "not allowed to send a PROXY header (--proxy-from)"),
            Refusal::Bad(e) => write!(f, "{e}"),
            Refusal::Late => write!(f, "no PROXY header within --proxy-timeout"),
            Refusal::Closed => write!(f, "closed before its PROXY header was complete"),
        }
    }
}

/// Refusals logged per window, per server: the count lives in a page the master maps before
/// it forks, so fork-per-conn's children and forked workers share it (an exec'd worker,
/// `--spawn exec`, has its own). The rest are counted in `proxy_errors` and summed up in one
/// line when the next window opens.
pub const LOGGED_PER_WINDOW: u64 = 10;
/// The window, in seconds.
pub const WINDOW_SECS: u64 = 60;

/// The refusal log's state: atomics, so forked children can share it (see [`share_log`]).
#[derive(Debug, Default)]
struct RefusalLog {
    /// Monotonic second the current window opened.
    window: AtomicU64,
    /// Lines logged in it.
    logged: AtomicU64,
    /// Refusals not logged in it.
    quiet: AtomicU64,
}

static REFUSALS: LazyLock<&'static RefusalLog> = LazyLock::new(|| {
    // One page shared by this process and every child it forks afterwards (fork-per-conn's
    // connection children): a flood of bad connections logs the first few, not one each.
    // SAFETY: an anonymous shared mapping of one page, no descriptor, checked for failure;
    // zeroed memory is a valid RefusalLog (three AtomicU64 at zero), the page is aligned for
    // it and, never unmapped, lives as long as the 'static reference made from it.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return Box::leak(Box::default()); // this process alone, then
    }
    // SAFETY: as above: a zeroed, aligned, never-unmapped page holding one RefusalLog.
    unsafe { &*page.cast::<RefusalLog>() }
});

/// Sets the refusal log up in this process, so the children it forks from now on share it.
pub fn share_log() {
    LazyLock::force(&REFUSALS);
}

/// Logs one line for a connection closed for its PROXY header, unless [`LOGGED_PER_WINDOW`]
/// were logged in this window already: then it is only counted, and the next window opens
/// with one line saying how many went unlogged.
pub fn log_refused(peer: SocketAddr, why: &Refusal) {
    let log = *REFUSALS;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| u64::try_from(t.tv_sec()).unwrap_or(0));
    let opened = log.window.load(Ordering::Relaxed);
    if now >= opened.saturating_add(WINDOW_SECS)
        && log
            .window
            .compare_exchange(opened, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        log.logged.store(0, Ordering::Relaxed);
        let quiet = log.quiet.swap(0, Ordering::Relaxed);
        if quiet > 0 {
            protocol::warn!(
                "{quiet} more connections were closed for their PROXY header in the last \
                 {WINDOW_SECS} s (not logged one by one; counted in proxy_errors)"
            );
        }
    }
    match log.logged.fetch_add(1, Ordering::Relaxed) + 1 {
        n if n < LOGGED_PER_WINDOW => {
            protocol::warn!("connection from {peer} closed: {why}");
        }
        LOGGED_PER_WINDOW => protocol::warn!(
            "connection from {peer} closed: {why} (the last line per refusal for \
             {WINDOW_SECS} s: more are counted in proxy_errors)"
        ),
        _ => {
            log.quiet.fetch_add(1, Ordering::Relaxed);
        }
    }
}
