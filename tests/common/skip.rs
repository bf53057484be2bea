//! Skips that show and count. A test (or a part of one) that cannot run here — a missing
//! tool, not root, a kernel that refuses io_uring — calls one of these instead of returning
//! quietly: the message goes straight to the process's stderr, past the harness's capture,
//! and one line is appended to the file named by `PREFORK_ECHO_SKIP_LOG` (set by `.ci/run`),
//! which `.ci/run` counts into its closing line as skipped rather than passed.

use std::io::Write;

/// The running test's name: libtest names each test's thread after the test.
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string()
}

/// Records that (part of) the current test was skipped, and why.
pub fn skip(reason: &str) {
    let test = test_name();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("PREFORK_ECHO_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One short write per line: O_APPEND keeps lines whole across test processes.
            let _ = f.write_all(format!("{test}\t{reason}\n").as_bytes());
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
