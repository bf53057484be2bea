//! Bad input at start-up: one clear line on stderr, the documented exit code, and no process
//! left behind.

mod common;

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    common::output_within(Command::new(common::BIN).args(args), common::COMMAND)
}

fn one_error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{err}");
    assert!(
        lines[0].starts_with("prefork-echo: error: "),
        "{}",
        lines[0]
    );
    assert!(out.stdout.is_empty(), "nothing announced");
    err
}

#[test]
fn a_port_in_use_exits_1_naming_the_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for mode in ["process", "thread"] {
        let out = run(&["--listen", &addr, "--mode", mode, "--workers", "2"]);
        assert_eq!(out.status.code(), Some(1));
        let err = one_error_line(&out);
        assert!(err.contains(&addr) && err.contains("in use"), "{err}");
    }
}

/// A malformed address is a usage error like any other bad flag value: exit 2, clap's
/// message naming the flag (issue 15 item 4 moved it from exit 1).
#[test]
fn an_address_that_does_not_parse_is_a_usage_error() {
    for bad in ["nonsense", "127.0.0.1", "127.0.0.1:99999", "[::1:80"] {
        let out = run(&["--listen", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: --listen: cannot use listen address"),
            "{bad}: {err}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn options_that_do_not_fit_the_mode_or_are_out_of_range_exit_2() {
    for args in [
        &["--mode", "fork-per-conn", "--udp"][..],
        &["--drain-timeout", "1e19"],
        &["--drain-timeout", "1e20"],
        &["--idle-timeout", "1e19"],
        &["--worker-timeout", "1e300"],
        &["--stats-interval", "31536001"],
        &["scale", "4", "--pid-file", "/nonexistent"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    }
}

#[test]
fn help_is_a_command_too_and_names_signals_and_exit_codes() {
    for args in [&["help"][..], &["help", "--help"], &["help", "stats"]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
    }
    let out = run(&["help", "no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
    let help = String::from_utf8_lossy(&run(&["--help"]).stdout).to_string();
    for word in [
        "HUP reload",
        "USR2 binary upgrade",
        "Exit codes",
        "usage error",
    ] {
        assert!(help.contains(word), "{word} missing from --help");
    }
    for cmd in ["stop", "reload"] {
        let h = String::from_utf8_lossy(&run(&[cmd, "--help"]).stdout).to_string();
        let sig = if cmd == "stop" { "SIGTERM" } else { "SIGHUP" };
        assert!(
            h.contains(sig),
            "{cmd} --help should say it sends {sig}: {h}"
        );
    }
}

#[test]
fn bad_flags_exit_2_with_a_usage_error() {
    for args in [
        &["--no-such-flag"][..],
        &["--workers", "0"],
        &["--workers", "many"],
        &["--mode", "coroutine"],
        &["--spawn", "vfork"],
        &["--service", "gopher"],
        &["--backlog", "-5"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains("--help"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn more_workers_than_the_descriptor_limit_allows_exits_1() {
    // `ulimit -n` in a shell that then execs the server sets a low hard limit for it alone.
    let out = common::output_within(
        Command::new("sh").args([
            "-c",
            &format!(
                "ulimit -n 64 && exec {} --listen 127.0.0.1:0 --workers 100",
                common::BIN
            ),
        ]),
        common::COMMAND,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out);
    assert!(
        err.contains("--workers 100") && err.contains("RLIMIT_NOFILE"),
        "{err}"
    );
}

#[test]
fn help_lists_every_option() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--listen",
        "--workers",
        "--mode",
        "--spawn",
        "--backlog",
        "--drain-timeout",
        "--max-unsent",
        "--stats-interval",
        "--service",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
    assert!(
        !help.contains("worker --listen-fd"),
        "the internal command stays hidden"
    );
}

#[test]
fn version_names_the_commit_and_completions_and_man_page_are_generated() {
    let out = run(&["--version"]);
    let v = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(v.starts_with("prefork-echo "), "{v}");
    let commit = v
        .split('(')
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or("");
    assert!(
        commit == "unknown commit"
            || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{v}"
    );
    // The bash completion script is valid bash (checked by bash itself) and knows the flags.
    let script = run(&["completions", "bash"]);
    assert!(script.status.success());
    let text = String::from_utf8_lossy(&script.stdout).to_string();
    assert!(text.contains("--metrics") && text.contains("--service"));
    let dir = common::scratch_dir();
    let file = dir.join("prefork-echo.bash");
    std::fs::write(&file, &script.stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let man = run(&["man"]);
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.contains(".TH prefork-echo 1") && page.contains("\\-\\-drain\\-timeout"),
        "{page}"
    );
    assert_eq!(run(&["completions", "tcsh"]).status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A control command with nothing to talk to says there is no server, and where it looked;
/// never a bare errno, never a cause twice.
#[test]
fn control_commands_without_a_server_say_so_once() {
    // A port just freed: no server there, so no control socket at its default path.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for verb in ["stats", "reload", "stop"] {
        let out = run(&[verb, "--listen", &addr.to_string()]);
        assert_eq!(out.status.code(), Some(1), "{verb}");
        let err = one_error_line(&out);
        let sock = format!("-{}.sock: no such file)", addr.port());
        assert!(
            err.contains(&format!(
                "error: no server on {addr} (looked for its control socket at "
            )) && err.contains(&sock)
                && !err.contains("os error"),
            "{verb}: {err}"
        );
    }
    let dir = common::scratch_dir();
    let sock = dir.join("nothing.sock");
    let err = one_error_line(&run(&["stats", "--control", sock.to_str().unwrap()]));
    assert!(
        err.contains(&format!(
            "no server at control socket {} (no such file)",
            sock.display()
        )),
        "{err}"
    );
    // A socket file left behind by a server that is gone: nobody listens on it.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let err = one_error_line(&run(&["scale", "2", "--control", stale.to_str().unwrap()]));
    assert!(err.contains("(a socket file nobody listens on)"), "{err}");
    // A missing pid file: its cause, once.
    let pid_file = dir.join("master.pid");
    for verb in ["stop", "reload"] {
        let err = one_error_line(&run(&[verb, "--pid-file", pid_file.to_str().unwrap()]));
        assert_eq!(
            err.matches("No such file or directory").count(),
            1,
            "{verb}: {err}"
        );
        assert!(err.contains(pid_file.to_str().unwrap()), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
