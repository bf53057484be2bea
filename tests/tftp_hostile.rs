//! `--service tftp` against what an attacker would try (issue 22): a root swapped by a less
//! privileged owner after start-up, spoofed requests from sources that never answer (lock-out
//! and amplification), ERROR ping-pong, FIFOs, uploads killed half-way, hostile names and
//! options, a file system filled by uploads. Every mode where it applies.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::tftp::*;
use common::{Server, wait_until};

/// Every serving mode, and exec'd workers.
const MODES: [&[&str]; 4] = [
    &["--mode", "process", "--workers", "1"],
    &["--mode", "process", "--workers", "1", "--spawn", "exec"],
    &["--mode", "thread", "--workers", "1"],
    &["--mode", "fork-per-conn"],
];

fn start(mode: &[&str], root: &Path, extra: &[&str]) -> Server {
    let root = root.to_str().unwrap();
    let mut args = vec!["--service", "tftp", "--root", root];
    args.extend_from_slice(mode);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--stats-interval", "0.2"]);
    Server::start(&args)
}

/// Downloads `name` with a raw client acknowledging every block; `Err(code)` if refused.
fn try_fetch(server: SocketAddr, name: &[u8]) -> Result<Vec<u8>, u16> {
    let c = udp_client();
    c.send_to(&request(false, name, "octet", &[]), server)
        .unwrap();
    let mut got = Vec::new();
    loop {
        let (p, from) = recv(&c, "DATA");
        let (op, block) = head(&p);
        if op == 5 {
            return Err(block);
        }
        assert_eq!(op, 3, "{}", String::from_utf8_lossy(&p));
        got.extend_from_slice(&p[4..]);
        c.send_to(&ack(block), from).unwrap();
        if p.len() < 516 {
            return Ok(got);
        }
    }
}

/// Uploads `data` as `name` with a raw client; `Err(code)` if refused.
fn try_upload(server: SocketAddr, name: &[u8], data: &[u8]) -> Result<(), u16> {
    let c = udp_client();
    c.send_to(&request(true, name, "octet", &[]), server)
        .unwrap();
    let (p, tid) = recv(&c, "ACK 0");
    match head(&p) {
        (4, 0) => {}
        (5, code) => return Err(code),
        other => panic!("unexpected answer {other:?}"),
    }
    for (i, chunk) in data
        .chunks(512)
        .chain(
            // An exact multiple of 512 ends with an empty block.
            data.len().is_multiple_of(512).then_some(&[][..]),
        )
        .enumerate()
    {
        let block = (i + 1) as u16;
        let mut d = vec![0, 3];
        d.extend_from_slice(&block.to_be_bytes());
        d.extend_from_slice(chunk);
        c.send_to(&d, tid).unwrap();
        let (p, _) = recv(&c, "ACK");
        match head(&p) {
            (4, b) if b == block => {}
            (5, code) => return Err(code),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn a_root_swapped_after_start_changes_nothing_in_every_mode() {
    let Some(user) = common::nobody() else {
        common::skip("not root: cannot give the root to another user");
        return;
    };
    for mode in MODES {
        let root = root_with(&[513]);
        let scratch = root.parent().unwrap().to_path_buf();
        // The served directory belongs to a less privileged user, who may rename it.
        nix::unistd::chown(&root, Some(user.uid), Some(user.gid)).unwrap();
        let outside = scratch.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("planted"), b"outside the root").unwrap();
        let server = start(mode, &root, &["--tftp-write"]);
        assert_eq!(try_fetch(server.addr, b"f513").map(|d| d.len()), Ok(513));
        // That user swaps the directory for a symlink to somewhere else.
        std::fs::rename(&root, scratch.join("root.old")).unwrap();
        std::os::unix::fs::symlink(&outside, &root).unwrap();
        assert_eq!(
            try_fetch(server.addr, b"planted"),
            Err(1),
            "{mode:?}: a file outside the original root is not found"
        );
        assert_eq!(
            try_fetch(server.addr, b"f513").map(|d| d.len()),
            Ok(513),
            "{mode:?}: the original files are still served"
        );
        assert_eq!(
            try_upload(server.addr, b"new", b"written"),
            Ok(()),
            "{mode:?}"
        );
        assert!(
            wait_until(Duration::from_secs(10), || scratch
                .join("root.old/new")
                .exists()),
            "{mode:?}: the upload lands in the original root"
        );
        assert!(
            !outside.join("new").exists(),
            "{mode:?}: no file is created outside the original root"
        );
        drop(server);
    }
}
