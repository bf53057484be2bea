//! Root's runtime files under `--user`: a pid file the serving user owns (and may rewrite)
//! must never aim root's `stop`/`reload` at another process, and a clean stop must leave
//! neither the pid file nor the control socket behind in root's directory (the janitor).
//! Both need root and the user `nobody`; elsewhere they skip, saying so.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Server, echo_to_eof, wait_until};

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `sh -c SCRIPT` as `user` (the serving user an attacker would have become).
fn as_user(user: &nix::unistd::User, script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as {}: {script}: {}",
        user.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `PID\nstarttime T\n` for a live process, as the server writes its own.
fn pid_line(pid: i32) -> String {
    let t = procfs::process::Process::new(pid)
        .unwrap()
        .stat()
        .unwrap()
        .starttime;
    format!("{pid}\nstarttime {t}\n")
}

fn stop_by_pid_file(pid_file: &Path) -> std::process::Output {
    Command::new(common::BIN)
        .args(["stop", "--pid-file", pid_file.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn a_pid_file_the_serving_user_rewrites_cannot_aim_roots_stop_at_another_process() {
    let Some(user) = common::nobody() else {
        return common::skip("needs root and a user named nobody");
    };
    for args in [
        &["--mode", "process", "--workers", "2"][..],
        &["--mode", "process", "--workers", "2", "--spawn", "exec"],
        &["--mode", "thread"],
        &["--mode", "fork-per-conn"],
    ] {
        let dir = common::scratch_dir();
        set_mode(&dir, 0o755);
        let pid_file = dir.join("master.pid");
        let mut all = args.to_vec();
        all.extend(["--user", "nobody", "--pid-file", pid_file.to_str().unwrap()]);
        let mut server = Server::start(&all);
        assert_eq!(
            std::fs::metadata(&pid_file).unwrap().uid(),
            user.uid.as_raw(),
            "{args:?}: the serving user owns the pid file (an upgraded master rewrites it)"
        );
        let genuine = std::fs::read_to_string(&pid_file).unwrap();
        // A root process the serving user would like root to kill, named with its real start
        // time so the start-time check alone cannot tell.
        let mut sleeper = Command::new("sleep").arg("120").spawn().unwrap();
        let _guard = common::KillOnDrop::new(sleeper.id() as i32);
        let mut targets = vec![(sleeper.id() as i32, "runs as uid 0")];
        if args[1] == "process" {
            // A worker runs as the serving user: the uid rule lets it through; its role not.
            let worker = server.workers()[0];
            targets.push((worker, "worker"));
        }
        for (target, why) in targets {
            let forged = pid_file.with_extension("forged");
            std::fs::write(&forged, pid_line(target)).unwrap();
            set_mode(&forged, 0o644);
            as_user(
                &user,
                &format!("cat {} > {}", forged.display(), pid_file.display()),
            );
            for verb in ["stop", "reload"] {
                let out = Command::new(common::BIN)
                    .args([verb, "--pid-file", pid_file.to_str().unwrap()])
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "{args:?} {verb} {target}: {err}"
                );
                assert!(
                    err.contains("not signalling it") && err.contains(why),
                    "{args:?} {verb} {target}: {err}"
                );
                assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
            }
            assert!(common::alive(target), "{args:?}: {target} was signalled");
            assert!(
                common::alive(server.pid),
                "{args:?}: the server was stopped"
            );
        }
        assert!(sleeper.try_wait().unwrap().is_none(), "the sleep lives");
        echo_to_eof(server.connect(), b"still serving");
        // The genuine file still stops the server, as the serving user left it or not.
        as_user(
            &user,
            &format!(
                "printf '{}' > {}",
                genuine.replace('\n', "\\n"),
                pid_file.display()
            ),
        );
        let out = stop_by_pid_file(&pid_file);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(server.wait_exit(Duration::from_secs(30)).is_some());
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Live (not zombie) processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    procfs::process::all_processes()
        .unwrap()
        .filter_map(|p| p.ok())
        .filter(|p| p.stat().is_ok_and(|s| s.state != 'Z'))
        .filter(|p| {
            p.cmdline()
                .is_ok_and(|c| c.iter().any(|a| a.contains(needle)))
        })
        .map(|p| p.pid())
        .collect()
}

#[test]
fn a_clean_stop_with_user_leaves_nothing_behind_in_roots_directory() {
    if common::nobody().is_none() {
        return common::skip("needs root and a user named nobody");
    }
    for mode in ["process", "thread", "fork-per-conn"] {
        for by_signal in [false, true] {
            let dir = common::scratch_dir();
            set_mode(&dir, 0o755); // root's: the serving user may not unlink in it
            let (pid_file, control) = (dir.join("master.pid"), dir.join("ctl.sock"));
            let mut server = Server::start(&[
                "--mode",
                mode,
                "--workers",
                "1",
                "--user",
                "nobody",
                "--pid-file",
                pid_file.to_str().unwrap(),
                "--control",
                control.to_str().unwrap(),
            ]);
            assert!(pid_file.exists() && control.exists());
            echo_to_eof(server.connect(), b"hello");
            if by_signal {
                server.signal(nix::sys::signal::Signal::SIGTERM);
            } else {
                let out = Command::new(common::BIN)
                    .args(["stop", "--control", control.to_str().unwrap()])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            server.assert_exits_ok(Duration::from_secs(30));
            // Gone by the time the master has exited, not some time later.
            let left: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(
                left.is_empty(),
                "{mode} (signal: {by_signal}): left behind {left:?}; {}",
                server.stderr()
            );
            // And nothing of the server lingers (its janitor included).
            let dir_name = dir.to_str().unwrap().to_string();
            assert!(
                wait_until(Duration::from_secs(10), || processes_mentioning(&dir_name)
                    .is_empty()),
                "{mode}: still running: {:?}",
                processes_mentioning(&dir_name)
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn after_an_upgrade_with_user_the_successors_stop_leaves_nothing_behind_either() {
    if common::nobody().is_none() {
        return common::skip("needs root and a user named nobody");
    }
    let dir = common::scratch_dir();
    set_mode(&dir, 0o755);
    let (pid_file, control) = (dir.join("master.pid"), dir.join("ctl.sock"));
    let mut server = Server::start(&[
        "--workers",
        "1",
        "--user",
        "nobody",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ]);
    server.signal(nix::sys::signal::Signal::SIGUSR2);
    assert!(server.wait_for_log(
        "upgrade: started a new master (pid ",
        Duration::from_secs(20)
    ));
    let successor: i32 = server
        .stderr()
        .split("upgrade: started a new master (pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .expect("the successor's pid in the log");
    let _guard = common::KillOnDrop::new(successor);
    server.assert_exits_ok(Duration::from_secs(60));
    // The files are the successor's now: still there while it serves.
    assert!(control.exists() && pid_file.exists());
    assert_eq!(common::read_pid(&pid_file), successor);
    echo_to_eof(std::net::TcpStream::connect(server.addr).unwrap(), b"hello");
    let out = stop_by_pid_file(&pid_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .is_none()),
        "left behind: {:?}",
        std::fs::read_dir(&dir).unwrap().collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The serving user may also *replace* its pid file (it owns the directory here, as the README
/// allows): a symbolic link to another root server's pid file, to `/dev/zero` or to a FIFO,
/// a FIFO itself, or a second name (hard link) of another server's pid file must be refused
/// at once — never followed (it stopped root's other server), never read without bound
/// (`/dev/zero` grew the client to GBs), never waited on (a FIFO hung `stop` for ever).
#[test]
fn a_pid_file_swapped_for_a_link_a_fifo_or_a_device_is_refused_without_following_it() {
    let Some(user) = common::nobody() else {
        return common::skip("needs root and a user named nobody");
    };
    // Root's other server, the one the serving user would like root to stop.
    let other_dir = common::scratch_dir();
    set_mode(&other_dir, 0o755);
    let other_pid_file = other_dir.join("other.pid");
    let other = Server::start(&[
        "--workers",
        "1",
        "--pid-file",
        other_pid_file.to_str().unwrap(),
    ]);
    let dir = common::scratch_dir();
    nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
    set_mode(&dir, 0o755);
    let pid_file = dir.join("master.pid");
    let server = Server::start(&[
        "--workers",
        "1",
        "--user",
        "nobody",
        "--pid-file",
        pid_file.to_str().unwrap(),
    ]);
    let p = pid_file.display();
    let swaps = [
        (
            format!("rm -f {p}; ln -s {} {p}", other_pid_file.display()),
            "symbolic link",
        ),
        (format!("rm -f {p}; ln -s /dev/zero {p}"), "symbolic link"),
        (format!("rm -f {p}; mkfifo {p}"), "not a regular file"),
    ];
    for (swap, why) in &swaps {
        as_user(&user, swap);
        for verb in ["stop", "reload"] {
            let out = common::output_within(
                Command::new(common::BIN).args([verb, "--pid-file", pid_file.to_str().unwrap()]),
                Duration::from_secs(20),
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{swap}: {verb}: {err}");
            assert!(err.contains(why), "{swap}: {verb}: {err}");
        }
        assert!(
            common::alive(other.pid),
            "{swap}: root's other server was signalled"
        );
        assert!(
            common::alive(server.pid),
            "{swap}: the server was signalled"
        );
    }
    // A second name of root's other pid file (made here as root: the kernel's
    // protected_hardlinks would stop the serving user, but not every host sets it).
    as_user(&user, &format!("rm -f {p}"));
    std::fs::hard_link(&other_pid_file, &pid_file).unwrap();
    let out = common::output_within(
        Command::new(common::BIN).args(["stop", "--pid-file", pid_file.to_str().unwrap()]),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "hard link: {err}");
    assert!(err.contains("single name"), "hard link: {err}");
    assert!(
        common::alive(other.pid),
        "hard link: root's other server was signalled"
    );
    std::fs::remove_file(&pid_file).unwrap();
    echo_to_eof(other.connect(), b"root's other server still serves");
    echo_to_eof(server.connect(), b"and so does this one");
}
