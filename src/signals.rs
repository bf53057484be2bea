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
    /// A second one during the drain stops at once. To an old master in its upgrade window:
    /// retire now (the new master serves on).
    GracefulStop,
    /// Close everything and exit now. To an old master in its upgrade window: retire now.
    StopNow,
    /// Reap exited children and replace workers that died.
    Reap,
    /// Start a new generation of workers (re-reading --config), then retire the old one.
    Reload,
    /// One worker more.
    AddWorker,
    /// One worker fewer (never below one).
    RemoveWorker,
    /// Start a new master from the binary on disk, hand it the listener; once it serves, keep
    /// the sockets for the upgrade window (taking the service back if it dies), then retire.
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

/// A verb of the control interface: the `prefork-echo VERB` command, the control request
/// `VERB`, and, where one exists, the action a signal of [`TABLE`] asks for (what the command
/// sends when given only a pid file).
#[derive(Debug)]
pub struct Verb {
    /// The word, on the command line and on the control socket.
    pub name: &'static str,
    /// The signal table's action for it, if a signal can ask for it.
    pub action: Option<Action>,
    /// Whether it takes a count (`scale N`).
    pub takes_count: bool,
}

/// Every control verb. The CLI's subcommands, the control request parser and the `--pid-file`
/// fallback all read this table (a test checks the CLI names each one).
pub const VERBS: &[Verb] = &[
    Verb {
        name: "stats",
        action: None,
        takes_count: false,
    },
    Verb {
        name: "reload",
        action: Some(Action::Reload),
        takes_count: false,
    },
    Verb {
        name: "stop",
        action: Some(Action::GracefulStop),
        takes_count: false,
    },
    Verb {
        name: "scale",
        action: None,
        takes_count: true,
    },
    Verb {
        name: "upgrade",
        action: Some(Action::Upgrade),
        takes_count: false,
    },
];

/// The verb named `name`, if there is one.
pub fn verb(name: &str) -> Option<&'static Verb> {
    VERBS.iter().find(|v| v.name == name)
}

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
    fn every_verb_is_a_command_a_request_and_if_signalled_a_signal() {
        use clap::CommandFactory;
        let cli = crate::cli::Cli::command();
        for v in VERBS {
            assert!(
                cli.find_subcommand(v.name).is_some(),
                "no `{}` command",
                v.name
            );
            let line = if v.takes_count {
                format!("{} 2", v.name)
            } else {
                v.name.to_string()
            };
            let req = crate::control::Request::parse(line.as_bytes()).unwrap();
            assert_eq!(req.verb().name, v.name);
            if let Some(action) = v.action {
                assert!(signal_for(action).is_some(), "{} has no signal", v.name);
            }
        }
    }

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
