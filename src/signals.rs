//! The signal table: which signals the master answers and what each means. Handlers only
//! record a signal (signal-hook's self-pipe); the master's loop reads and acts. The README's
//! signal table is this table.

use signal_hook::consts::{
    SIGALRM, SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
};

/// What the master does on a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop accepting, let open connections finish up to the drain timeout, then exit.
    /// A second one during the drain stops at once.
    GracefulStop,
    /// Close everything and exit now.
    StopNow,
    /// Reap exited children and replace workers that died.
    Reap,
    /// Start a new generation of workers (re-reading --config), then retire the old one.
    Reload,
    /// One worker more.
    AddWorker,
    /// One worker fewer (never below one).
    RemoveWorker,
    /// Start a new master from the binary on disk, hand it the listener, then retire.
    Upgrade,
    /// Log and ignore. For signals whose default action would kill the master (and leave its
    /// workers, pid file and control socket behind) but that mean nothing to it.
    Ignore,
}

/// One row of the table.
#[derive(Debug)]
pub struct Entry {
    /// Signal number.
    pub signal: i32,
    /// Name without the SIG prefix, as `kill -s` takes it.
    pub name: &'static str,
    /// What the master does.
    pub action: Action,
}

/// Every signal the master handles.
pub const TABLE: &[Entry] = &[
    Entry {
        signal: SIGTERM,
        name: "TERM",
        action: Action::GracefulStop,
    },
    Entry {
        signal: SIGINT,
        name: "INT",
        action: Action::GracefulStop,
    },
    Entry {
        signal: SIGQUIT,
        name: "QUIT",
        action: Action::StopNow,
    },
    Entry {
        signal: SIGCHLD,
        name: "CHLD",
        action: Action::Reap,
    },
    Entry {
        signal: SIGHUP,
        name: "HUP",
        action: Action::Reload,
    },
    Entry {
        signal: SIGTTIN,
        name: "TTIN",
        action: Action::AddWorker,
    },
    Entry {
        signal: SIGTTOU,
        name: "TTOU",
        action: Action::RemoveWorker,
    },
    Entry {
        signal: SIGUSR2,
        name: "USR2",
        action: Action::Upgrade,
    },
    Entry {
        signal: SIGUSR1,
        name: "USR1",
        action: Action::Ignore,
    },
    Entry {
        signal: SIGALRM,
        name: "ALRM",
        action: Action::Ignore,
    },
];

/// The first signal that asks for `action` (what `prefork-echo reload --pid-file` sends).
pub fn signal_for(action: Action) -> Option<i32> {
    TABLE
        .iter()
        .find(|e| e.action == action && action != Action::Ignore)
        .map(|e| e.signal)
}

/// The action for a signal number, if the table has one.
pub fn action(signal: i32) -> Option<Action> {
    TABLE.iter().find(|e| e.signal == signal).map(|e| e.action)
}

/// The signal numbers to install handlers for.
pub fn numbers() -> impl Iterator<Item = i32> {
    TABLE.iter().map(|e| e.signal)
}

/// The name for a signal number (for log lines).
pub fn name(signal: i32) -> &'static str {
    TABLE
        .iter()
        .find(|e| e.signal == signal)
        .map_or("?", |e| e.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signal_appears_once() {
        let mut seen: Vec<i32> = numbers().collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), TABLE.len());
        assert_eq!(action(SIGTERM), Some(Action::GracefulStop));
        assert_eq!(action(SIGUSR1), Some(Action::Ignore));
        assert_eq!(action(signal_hook::consts::SIGWINCH), None);
        assert_eq!(signal_for(Action::Ignore), None);
        assert_eq!(signal_for(Action::Reload), Some(SIGHUP));
        assert_eq!(signal_for(Action::GracefulStop), Some(SIGTERM));
    }
}
