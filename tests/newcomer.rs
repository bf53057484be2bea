//! What a newcomer runs into in the first minutes: behaviour behind the README's promises
//! that the other test files do not already pin down.

mod common;

use std::time::Duration;

use common::{Server, echo_to_eof};

fn ok_stdout(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_reload_keeps_the_scaled_size_and_every_refusal_is_logged() {
    let dir = common::scratch_dir();
    let conf = dir.join("echo.conf");
    std::fs::write(&conf, "drain_timeout = 5\n").unwrap();
    let server = Server::start(&["--workers", "2", "--config", conf.to_str().unwrap()]);
    assert_eq!(
        ok_stdout(server.ctl(&["scale", "3"])),
        "scaling to 3 workers"
    );
    assert_eq!(
        ok_stdout(server.ctl(&["reload"])),
        "generation 2 serving (3 workers)"
    );
    // A refused reload is answered and logged, whichever way it was asked for.
    std::fs::write(&conf, "workers = four\n").unwrap();
    let out = server.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        server.wait_for_log("control request: reload refused", Duration::from_secs(10)),
        "{}",
        server.stderr()
    );
    assert!(
        server.stderr().contains(conf.to_str().unwrap()),
        "the error names the file"
    );
    // The config file's own `workers` wins over the scaled size.
    std::fs::write(&conf, "workers = 1\n").unwrap();
    assert_eq!(
        ok_stdout(server.ctl(&["reload"])),
        "generation 3 serving (1 worker)"
    );
    echo_to_eof(server.connect(), b"after the reloads");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fork_per_conn_says_that_workers_does_not_apply() {
    let server = Server::start(&["--mode", "fork-per-conn", "--workers", "2"]);
    assert!(server.line.contains("workers=1"), "{}", server.line);
    assert!(
        server.wait_for_log(
            "--workers 2 is ignored in fork-per-conn mode",
            Duration::from_secs(10)
        ),
        "{}",
        server.stderr()
    );
    echo_to_eof(server.connect(), b"one child per connection");
}

#[test]
fn the_log_names_spawn_modes_as_the_command_line_does() {
    let server = Server::start(&["--workers", "1", "--spawn", "exec"]);
    // stderr is collected by a thread of its own: wait for the line, do not race it.
    assert!(
        server.wait_for_log("(spawn=exec)", Duration::from_secs(10)),
        "{}",
        server.stderr()
    );
}

#[test]
fn the_example_systemd_units_verify_on_this_systemd() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        common::skip("systemd-analyze not found: the units are not verified here");
        return;
    };
    assert!(out.status.success());
    // The units name the installed path; verify them against this build instead.
    let dir = common::scratch_dir();
    let root = env!("CARGO_MANIFEST_DIR");
    for unit in ["prefork-echo.service", "prefork-echo.socket"] {
        let text = std::fs::read_to_string(format!("{root}/scripts/systemd/{unit}")).unwrap();
        std::fs::write(
            dir.join(unit),
            text.replace("/usr/local/bin/prefork-echo", common::BIN),
        )
        .unwrap();
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("prefork-echo.service"))
        .arg(dir.join("prefork-echo.socket"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_log_level_comes_from_the_environment() {
    let quiet = Server::launch(
        common::BIN,
        &["--workers", "1"],
        &[("PREFORK_ECHO_LOG", "warn")],
        true,
    )
    .unwrap();
    echo_to_eof(quiet.connect(), b"served quietly");
    // Warnings still show, marked as such (serving as root warns when run as root); once one
    // has been collected, so would the info lines written before it.
    if nix::unistd::Uid::effective().is_root() {
        assert!(
            quiet.wait_for_log("main: warning: serving as root", Duration::from_secs(10)),
            "{}",
            quiet.stderr()
        );
    }
    let log = quiet.stderr();
    assert!(
        !log.contains("spawned worker"),
        "info lines shown at warn:\n{log}"
    );
    let chatty = Server::start(&["--workers", "1"]);
    assert!(chatty.wait_for_log("spawned worker 0/g1", Duration::from_secs(10)));
}
