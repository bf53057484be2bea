//! What the machine allows and what a process costs: io_uring, memory.

/// Private memory (PSS) of a live process, in bytes; fails the test when it cannot be read
/// (a bound checked against 0 would pass whatever the process holds).
pub fn pss(pid: i32) -> u64 {
    let rollup = procfs::process::Process::new(pid)
        .and_then(|p| p.smaps_rollup())
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/smaps_rollup: {e}"));
    let pss = rollup
        .memory_map_rollup
        .iter()
        .find_map(|m| m.extension.map.get("Pss").copied())
        .unwrap_or_else(|| panic!("no Pss in /proc/{pid}/smaps_rollup"));
    assert!(pss > 0, "process {pid} has a PSS of 0: not a live process");
    pss
}

/// Whether this kernel lets the server use `--io uring`; when not, says so (the test that
/// asked is skipped, visibly) and returns false.
pub fn uring_or_skip(what: &str) -> bool {
    match worker::event_loop::probe_uring() {
        Ok(()) => true,
        Err(e) => {
            super::skip(&format!(
                "{what}: this kernel or sandbox refuses io_uring ({e})"
            ));
            false
        }
    }
}

/// Whether process `pid` holds an io_uring instance (a descriptor on `anon_inode:[io_uring]`);
/// fails the test if its descriptors cannot be listed (a "no" would then prove nothing).
pub fn holds_io_uring(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"))
        .flatten()
        .any(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|target| target.to_string_lossy().contains("io_uring"))
        })
}
