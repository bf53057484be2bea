//! What a server costs, read from /proc for its whole process tree: CPU time, context
//! switches and proportional memory (PSS, which splits copy-on-write pages shared by forked
//! workers among them instead of counting them once per process as RSS does).

use std::fs;

/// One sample of a process tree.
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeSample {
    /// CPU seconds of the tree: per process, the larger of utime + stime (whole clock ticks,
    /// but including threads that have exited) and its live threads' schedstat (nanoseconds:
    /// exact for the many tiny children of a fork-per-connection server, which ticks round
    /// to nothing); plus the root's reaped children (cutime + cstime).
    pub cpu_secs: f64,
    /// Voluntary + involuntary context switches of the live threads.
    pub context_switches: u64,
    /// Summed PSS in bytes.
    pub pss_bytes: u64,
    /// Processes in the tree.
    pub processes: usize,
}

fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split(' ').map(str::to_string).collect())
}

/// `pid` and all its descendants.
pub fn tree(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse::<i32>().ok()) {
                    parent_of.push((p, ppid));
                }
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|&&(_, pp)| pp == p)
                .map(|&(c, _)| c),
        );
        i += 1;
    }
    out
}

/// Samples the tree rooted at `pid`.
pub fn sample(pid: i32) -> TreeSample {
    use nix::unistd::{SysconfVar, sysconf};
    let ticks = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    let mut s = TreeSample::default();
    for (i, p) in tree(pid).into_iter().enumerate() {
        let Some(f) = stat_fields(p) else { continue };
        s.processes += 1;
        // Fields after the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
        let num = |k: usize| f.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        s.cpu_secs += ((num(11) + num(12)) / ticks).max(on_cpu_ns(p) as f64 / 1e9);
        if i == 0 {
            // Reaped children (fork-per-connection servers) are charged to the root.
            s.cpu_secs += (num(13) + num(14)) / ticks;
        }
        s.pss_bytes += pss(p);
        s.context_switches += context_switches(p);
    }
    s
}

/// Nanoseconds on CPU of every live thread of `pid` (first field of each schedstat).
fn on_cpu_ns(pid: i32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn pss(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn context_switches(pid: i32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}
