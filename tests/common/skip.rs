//! Skips that show and count. A test (or a part of one) that cannot run here — a missing
//! tool, not root, a kernel that refuses io_uring — calls one of these instead of returning
//! quietly: the message goes straight to the process's stderr, past the harness's capture,
//! and one line is appended to the file named by `PREFORK_ECHO_SKIP_LOG` (set by `.ci/run`),
//! which `.ci/run` counts into its closing line as skipped rather than passed.
//!
//! The worker crate's unit tests include this same file (`#[path]`), so it uses only `std`.

use std::io::Write;

/// The running test as `.ci/run` matches it against libtest's output: the test binary's name
/// without cargo's hash (`chat`, `prefork_echo_worker`), `::`, and the test's name, which
/// libtest gives the thread running it.
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| match n.rsplit_once('-') {
            Some((stem, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => stem.to_string(),
            _ => n,
        })
        .unwrap_or_else(|| "unknown".to_string());
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    format!("{binary}::{test}")
}

/// Records that (part of) the current test was skipped, and why. A test that skips only a
/// part still counts as skipped: it did not prove all its name says.
pub fn skip(reason: &str) {
    let test = test_name();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("PREFORK_ECHO_SKIP_LOG") {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            // One short write per line: O_APPEND keeps lines whole across test processes.
            .and_then(|mut f| f.write_all(format!("{test}\t{reason}\n").as_bytes()));
        // A skip that cannot be recorded would be counted as a pass: fail instead.
        if let Err(e) = written {
            panic!("recording the skip in {}: {e}", path.to_string_lossy());
        }
    }
}

/// A skip for want of a tool that `.ci/run` installs: on CI (`CI` set) that tool must be
/// there, so its absence fails the test instead of passing it untested.
pub fn skip_missing_tool(tool: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{tool} is missing on CI, which installs it (.ci/run): this test would test nothing"
    );
    skip(&format!("{tool} is not installed (.ci/run installs it)"));
}

/// Whether `program` is on `PATH` (as `sh`'s `command -v` finds it).
pub fn on_path(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `program` is on `PATH`; if not, a [`skip_missing_tool`] for it.
pub fn have_tool(program: &str) -> bool {
    let found = on_path(program);
    if !found {
        skip_missing_tool(program);
    }
    found
}
