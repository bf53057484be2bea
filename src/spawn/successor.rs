//! Starting a new master in a binary upgrade, and what it inherits from the old one: the
//! same fork, then an exec of the binary on disk with the old master's sockets named in its
//! environment.

use super::*;

/// What a new master inherits from the old one in a binary upgrade.
#[derive(Debug)]
pub struct Handover {
    /// The listening socket (slot 0's with `--balance reuseport`).
    pub listener: RawFd,
    /// With `--balance reuseport`: the sockets of slots 1 and up, in order.
    pub slots: Vec<RawFd>,
    /// With `--udp`: the UDP socket, or one per slot (`--balance reuseport`), in order.
    pub udp: Vec<RawFd>,
    /// The control socket's listener: handed over by descriptor, never unlinked and rebound,
    /// so a successor that fails leaves the old master's control socket working.
    pub control: RawFd,
    /// The metrics listener, with `--metrics` (its port cannot be bound twice).
    pub metrics: Option<RawFd>,
    /// The write end of the readiness pipe.
    pub ready: RawFd,
    /// The TFTP root opened at start: the successor serves the same directory, not whatever
    /// the path names by then.
    pub root: Option<RawFd>,
    /// The old master's stats to carry on ([`crate::master::Carryover`]), as JSON.
    pub carried: String,
}

/// Starts a new master from the binary on disk with this master's arguments, handing it the
/// sockets in `handover` by descriptor (named in the environment). It is not tied to this
/// process's life: it is meant to outlive it. It keeps NOTIFY_SOCKET (it tells the service
/// manager its pid with MAINPID=) but not LISTEN_FDS/LISTEN_PID, which named this process.
pub fn spawn_successor(exe: &CString, handover: &Handover, shed: impl FnOnce()) -> io::Result<Pid> {
    use std::os::unix::ffi::OsStrExt;
    let args = std::env::args_os()
        .skip(1)
        .map(|a| a.as_bytes().to_vec())
        .collect();
    let metrics = handover.metrics.unwrap_or(-1);
    let root = handover.root.unwrap_or(-1);
    let env = ExecPlan::environment(
        &[
            ENV_LISTEN_FD,
            ENV_UPGRADE_FD,
            ENV_UDP_FD,
            ENV_CONTROL_FD,
            ENV_METRICS_FD,
            ENV_ROOT_FD,
            ENV_TOTALS,
            ENV_SLOT_FDS,
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
        ],
        &[
            (ENV_LISTEN_FD, handover.listener.to_string()),
            (ENV_UPGRADE_FD, handover.ready.to_string()),
            (ENV_UDP_FD, slot_list(&handover.udp)),
            (ENV_CONTROL_FD, handover.control.to_string()),
            (ENV_METRICS_FD, metrics.to_string()),
            (ENV_ROOT_FD, root.to_string()),
            (ENV_TOTALS, handover.carried.clone()),
            (ENV_SLOT_FDS, slot_list(&handover.slots)),
        ],
    );
    let plan = ExecPlan::new(exe, args, env)?;
    let mut keep = vec![
        handover.listener,
        handover.ready,
        handover.control,
        metrics,
        root,
    ];
    keep.extend_from_slice(&handover.slots);
    keep.extend_from_slice(&handover.udp);
    let parent = nix::unistd::getpid();
    fork_child(Lineage::Successor, &mut keep, &[], shed, || {
        prepare_successor(parent);
        plan.exec();
        127
    })
}

/// The new master's last steps before exec, all async-signal-safe. Until it reports ready it
/// dies with this master (PR_SET_PDEATHSIG, which survives exec; the new master clears it once
/// it has taken over): a new master that hangs before ready must not hold the port for ever
/// once the old one is gone. And it starts as a freshly exec'd process would: every signal at
/// its default and none blocked, so a stop the old master forwards reaches it even if it never
/// gets as far as opening its own mask (a broken build, a script in the binary's place).
fn prepare_successor(master: Pid) {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != master {
        // SAFETY: async-signal-safe exit without running the master's destructors.
        unsafe { libc::_exit(1) };
    }
    for sig in 1..libc::SIGRTMIN() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no handler code; sigaction is async-signal-safe.
        // The parent's registrations were dropped by `shed`.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// On a new master that has taken over from its predecessor: it no longer dies with it.
pub fn outlive_predecessor() {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(None) {
        protocol::warn!("cannot clear the parent-death signal: {e}");
    }
}

/// The descriptors a predecessor master handed to this process in a binary upgrade.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The TCP listener.
    pub listener: Option<std::os::fd::OwnedFd>,
    /// The pipe to write `ready` on.
    pub ready: Option<std::os::fd::OwnedFd>,
    /// With `--udp`: the UDP socket, or one per slot (`--balance reuseport`), in slot order.
    pub udp: Vec<std::os::fd::OwnedFd>,
    /// The control socket's listener.
    pub control: Option<std::os::fd::OwnedFd>,
    /// The metrics listener.
    pub metrics: Option<std::os::fd::OwnedFd>,
    /// The old master's stats (JSON), if it sent them.
    pub totals: Option<String>,
    /// With `--balance reuseport`: the sockets of slots 1 and up.
    pub slots: Vec<std::os::fd::OwnedFd>,
    /// The TFTP root directory (`--service tftp`).
    pub root: Option<std::os::fd::OwnedFd>,
}

/// What a predecessor master handed to this process (all `None` outside an upgrade).
pub fn from_predecessor() -> Inherited {
    use std::os::fd::FromRawFd;
    let fd = |name| {
        let raw: RawFd = std::env::var(name).ok()?.parse().ok()?;
        // SAFETY: our predecessor set this variable to a descriptor it left open across exec
        // for this process alone (see `spawn_successor`); it is wrapped exactly once, here,
        // before anything else could have taken the number.
        (raw > 2).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
    };
    let fd_list = |name: &str| -> Vec<std::os::fd::OwnedFd> {
        std::env::var(name)
            .unwrap_or_default()
            .split(',')
            .filter_map(|raw| {
                let raw: RawFd = raw.parse().ok()?;
                // SAFETY: as above: left open across exec for this process alone, wrapped once.
                (raw > 2).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
            })
            .collect()
    };
    let inherited = Inherited {
        listener: fd(ENV_LISTEN_FD),
        ready: fd(ENV_UPGRADE_FD),
        // One number from a master that shared one UDP socket; a list from one per slot.
        udp: fd_list(ENV_UDP_FD),
        control: fd(ENV_CONTROL_FD),
        metrics: fd(ENV_METRICS_FD),
        totals: std::env::var(ENV_TOTALS).ok(),
        slots: fd_list(ENV_SLOT_FDS),
        root: fd(ENV_ROOT_FD),
    };
    // Read once: the variables must not reach this master's own workers or successor.
    for name in [
        ENV_LISTEN_FD,
        ENV_UPGRADE_FD,
        ENV_SLOT_FDS,
        ENV_UDP_FD,
        ENV_CONTROL_FD,
        ENV_METRICS_FD,
        ENV_ROOT_FD,
        ENV_TOTALS,
    ] {
        // SAFETY: called at start-up, before this process starts any thread (the master
        // never does; thread mode starts its threads later), so nothing reads the
        // environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    inherited
}
