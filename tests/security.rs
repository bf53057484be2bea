//! Trust boundaries: what a hostile local user or a stale file must never make the server (or
//! its control commands) do. Each test reproduces a finding of the adversarial trial.

mod common;

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, echo_to_eof, wait_until};
use nix::unistd::Uid;

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_symlink_at_the_pid_file_path_never_redirects_the_write() {
    let dir = common::scratch_dir();
    let victim = dir.join("root-only");
    std::fs::write(&victim, "precious\n").unwrap();
    set_mode(&victim, 0o600);
    let pid_file = dir.join("master.pid");
    symlink(&victim, &pid_file).unwrap();
    let server = Server::start(&["--workers", "1", "--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(std::fs::symlink_metadata(&pid_file).unwrap().is_file());
    assert_eq!(common::read_pid(&pid_file), server.pid);
    drop(server);

    // The README's --user setup: a directory the serving user may write. As that user,
    // plant a symlink to a root-only file; root's next start must neither write through it
    // nor hand the target to the user.
    let Some(user) = common::nobody() else { return };
    let shared = common::scratch_dir();
    nix::unistd::chown(&shared, Some(user.uid), Some(user.gid)).unwrap();
    let planted = shared.join("master.pid");
    symlink(&victim, &planted).unwrap();
    let server = Server::start(&[
        "--workers",
        "1",
        "--user",
        "nobody",
        "--pid-file",
        planted.to_str().unwrap(),
        "--control",
        shared.join("ctl.sock").to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(
        std::fs::metadata(&victim).unwrap().uid(),
        0,
        "victim still root's"
    );
    let meta = std::fs::symlink_metadata(&planted).unwrap();
    assert!(meta.is_file() && meta.uid() == user.uid.as_raw());
    drop(server);
    let _ = std::fs::remove_dir_all(&shared);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn runtime_files_in_a_directory_others_can_write_are_refused() {
    let dir = common::scratch_dir();
    set_mode(&dir, 0o777);
    for flag in ["--pid-file", "--control"] {
        let path = dir.join("x");
        let f = Server::try_start(
            common::BIN,
            &["--workers", "1", flag, path.to_str().unwrap()],
        )
        .err()
        .unwrap_or_else(|| panic!("{flag} in a 0777 directory was accepted"));
        assert_eq!(
            f.status.and_then(|s| s.code()),
            Some(1),
            "{flag}: {}",
            f.stderr
        );
        assert!(
            f.stderr.contains("writable by users other than its owner"),
            "{}",
            f.stderr
        );
    }
    // Sticky (like /tmp): allowed, as long as nothing another user owns sits at the path.
    set_mode(&dir, 0o1777);
    let pid_file = dir.join("ok.pid");
    let server = Server::start(&["--workers", "1", "--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(common::read_pid(&pid_file), server.pid);
    drop(server);
    if let Some(user) = common::nobody() {
        let squatted = dir.join("squat.pid");
        std::fs::write(&squatted, "1\n").unwrap();
        nix::unistd::chown(&squatted, Some(user.uid), Some(user.gid)).unwrap();
        let f = Server::try_start(
            common::BIN,
            &["--workers", "1", "--pid-file", squatted.to_str().unwrap()],
        )
        .err()
        .expect("a pid file another user planted in a sticky directory was accepted");
        assert!(f.stderr.contains("belongs to uid"), "{}", f.stderr);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stop_and_reload_by_pid_file_signal_only_the_server_that_wrote_it() {
    let dir = common::scratch_dir();
    let pid_file = dir.join("echo.pid");
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let _guard = common::KillOnDrop::new(bystander.id() as i32);
    let stale = format!("{}\n", bystander.id());
    let stale_start = format!("{}\nstarttime 1\n", bystander.id());
    for text in ["-1\n", "0\n", "1\n", &stale, &stale_start] {
        std::fs::write(&pid_file, text).unwrap();
        for cmd in ["stop", "reload"] {
            let out = common::output_within(
                Command::new(common::BIN).args([cmd, "--pid-file", pid_file.to_str().unwrap()]),
                common::COMMAND,
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} with {text:?}: {err}");
            assert!(
                err.contains("not signalling it") || err.contains("stale"),
                "{err}"
            );
        }
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "{text:?} killed a bystander"
        );
    }
    // The real thing still works: the file written by the server vouches for it.
    let mut server = Server::start(&["--workers", "1", "--pid-file", pid_file.to_str().unwrap()]);
    common::run_ok(&["stop", "--pid-file", pid_file.to_str().unwrap()], &[]);
    assert!(
        server
            .wait_exit(Duration::from_secs(5))
            .is_some_and(|s| s.success())
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_default_control_socket_is_private_and_keyed_by_address() {
    let runtime = common::scratch_dir();
    let env = [("XDG_RUNTIME_DIR", runtime.to_str().unwrap())];
    let v4 = Server::launch(common::BIN, &["--workers", "1"], &env, false).unwrap();
    let port = v4.addr.port().to_string();
    // IPv6 loopback on the same port: a second server, a second control socket.
    let v6_addr = format!("[::1]:{port}");
    let v6 = Server::launch(
        common::BIN,
        &["--workers", "1", "--listen", &v6_addr],
        &env,
        false,
    );
    let private = runtime.join("prefork-echo");
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the default directory is private");
    assert!(private.join(format!("127.0.0.1-{port}.sock")).exists());
    let stats_of = |listen: &str| {
        let out = common::run_ok(&["stats", "--json", "--listen", listen], &env);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["master_pid"].as_i64().unwrap() as i32
    };
    assert_eq!(stats_of(&v4.addr.to_string()), v4.pid);
    match v6 {
        Ok(v6) => {
            assert!(private.join(format!("::1-{port}.sock")).exists());
            assert_eq!(
                stats_of(&v6_addr),
                v6.pid,
                "stats --listen [::1] reached the IPv6 server"
            );
        }
        Err(f) => common::skip(&format!(
            "no IPv6 loopback here ({}); IPv6 part skipped",
            f.stderr.trim()
        )),
    }
    drop(v4);
    // A directory someone else prepared (here: too open) is not used.
    let runtime2 = common::scratch_dir();
    let planted = runtime2.join("prefork-echo");
    std::fs::create_dir(&planted).unwrap();
    set_mode(&planted, 0o777);
    let env2 = [("XDG_RUNTIME_DIR", runtime2.to_str().unwrap())];
    let f = Server::launch(common::BIN, &["--workers", "1"], &env2, false)
        .err()
        .expect("an open runtime directory was used");
    assert_eq!(f.status.and_then(|s| s.code()), Some(1), "{}", f.stderr);
    assert!(f.stderr.contains("refusing"), "{}", f.stderr);
    let _ = std::fs::remove_dir_all(&runtime);
    let _ = std::fs::remove_dir_all(&runtime2);
}

#[test]
fn a_control_socket_served_by_another_user_is_not_believed() {
    let Some(user) = common::nobody() else { return };
    // Another user's socket in a sticky, world-writable directory (the old /tmp default):
    // here a real prefork-echo run by nobody, which answers every request plausibly.
    let dir = common::scratch_dir();
    set_mode(&dir, 0o1777);
    let fake = dir.join("prefork-echo-7007.sock");
    // A copy nobody can execute, wherever the checkout lives.
    let bin = common::BinaryCopy::new();
    let mut cmd = Command::new(&bin.path);
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "1", "--control"])
        .arg(&fake)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let _guard = common::KillOnDrop::new(child.id() as i32);
    common::read_announce(&mut child);
    for args in [&["reload"][..], &["stats"], &["stop"], &["scale", "3"]] {
        let out = common::output_within(
            Command::new(common::BIN)
                .args(args)
                .arg("--control")
                .arg(&fake),
            common::COMMAND,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} believed a stranger: {err}"
        );
        assert!(err.contains("not trusting it"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spoofed_udp_sources_that_could_loop_are_not_echoed() {
    for mode in ["process", "thread"] {
        let server = Server::start(&["--workers", "1", "--udp", "--mode", mode]);
        // A datagram "from" a well-known service port (chargen, echo, ...): answering it is
        // how two servers ping-pong forever. Binding below 1024 takes root.
        if Uid::effective().is_root() {
            let low = (900..1000)
                .find_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
                .expect("a free port below 1024");
            low.send_to(b"loop?", server.addr).unwrap();
            assert!(
                wait_until(Duration::from_secs(10), || {
                    server.stats()["totals"]["datagrams_refused"].as_u64() == Some(1)
                }),
                "{mode}: {}",
                server.stats()
            );
            low.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 16];
            assert!(
                low.recv_from(&mut buf).is_err(),
                "{mode}: a loop-prone source got an echo"
            );
        } else {
            common::skip("not root: cannot send from a port below 1024");
        }
        // Ordinary clients are echoed as before.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.send_to(b"hello", server.addr).unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let table = server.ctl(&["stats"]);
        assert!(String::from_utf8_lossy(&table.stdout).contains("datagrams in="));
    }
}

#[test]
fn a_control_request_is_answered_despite_extra_bytes_or_a_half_close() {
    let server = Server::start(&["--workers", "1"]);
    for request in [&b"stats\n"[..], b"stats\nand more bytes", b"stats\r\n"] {
        let mut s = UnixStream::connect(&server.control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let v: serde_json::Value = serde_json::from_str(answer.trim())
            .unwrap_or_else(|e| panic!("{request:?}: {e}: {answer:?}"));
        assert_eq!(v["master_pid"].as_i64(), Some(i64::from(server.pid)));
    }
    echo_to_eof(server.connect(), b"still serving");
}

/// Sends one UDP datagram with a forged source, through a raw socket (`IPPROTO_RAW`: the
/// header is ours, the kernel fills in the IP checksum and length). Root only.
fn spoof_udp(from: std::net::SocketAddrV4, to: std::net::SocketAddrV4, payload: &[u8]) {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&from.ip().octets());
    p.extend_from_slice(&to.ip().octets());
    p.extend_from_slice(&from.port().to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    p.extend_from_slice(payload);
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .expect("a raw socket (root)");
    raw.send_to(&p, &std::net::SocketAddr::V4(to).into())
        .expect("sending the forged datagram");
}

fn udp_total(server: &Server, name: &str) -> u64 {
    server.stats()["totals"][name].as_u64().unwrap_or(0)
}

#[test]
fn one_spoofed_datagram_cannot_set_two_udp_echo_servers_ping_ponging() {
    if !Uid::effective().is_root() {
        return common::skip("forging a datagram's source takes a raw socket (root)");
    }
    let v4 = |s: &Server| match s.addr {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    for mode in ["process", "thread"] {
        let args = [
            "--udp",
            "--workers",
            "1",
            "--mode",
            mode,
            "--stats-interval",
            "0.1",
        ];
        let a = Server::start(&args);
        let b = Server::start(&args);
        // As if B had sent A a datagram: A echoes it to B, B echoes it back to A, ...
        spoof_udp(v4(&b), v4(&a), b"ping-pong");
        let refused = || udp_total(&a, "datagrams_refused") + udp_total(&b, "datagrams_refused");
        assert!(
            wait_until(Duration::from_secs(30), || refused() > 0),
            "{mode}: no datagram refused; in: A {} B {}",
            udp_total(&a, "datagrams_in"),
            udp_total(&b, "datagrams_in")
        );
        // The loop has ended: neither server's count moves any more.
        let counts = || (udp_total(&a, "datagrams_in"), udp_total(&b, "datagrams_in"));
        let mut last = counts();
        let mut still = 0;
        assert!(
            wait_until(Duration::from_secs(30), || {
                std::thread::sleep(Duration::from_millis(300));
                let now = counts();
                still = if now == last { still + 1 } else { 0 };
                last = now;
                still >= 3
            }),
            "{mode}: the loop goes on: {last:?}"
        );
        eprintln!("{mode}: the loop ended after {last:?} datagrams in (A, B)");
        // Bounded by the burst (and what trickles in at the rate meanwhile), not unbounded.
        assert!(last.0 + last.1 < 20_000, "{mode}: {last:?}");
        // An ordinary client still gets its echoes from both.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        for s in [&a, &b] {
            for i in 0..50 {
                let msg = format!("echo {i}");
                client.send_to(msg.as_bytes(), s.addr).unwrap();
                let mut buf = [0u8; 32];
                let (n, _) = client.recv_from(&mut buf).expect("an echo");
                assert_eq!(&buf[..n], msg.as_bytes());
            }
        }
    }
}
