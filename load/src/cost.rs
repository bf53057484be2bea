//! What a server costs, read from /proc (through the `procfs` crate) for its whole process
//! tree: CPU time, context switches and proportional memory (PSS, which splits copy-on-write
//! pages shared by forked workers among them instead of counting them once per process as
//! RSS does).

mod serving;

use std::net::SocketAddr;

use procfs::process::Process;

pub use serving::Transport;

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

/// `pid` and all its descendants.
pub fn tree(pid: i32) -> Vec<i32> {
    let parent_of: Vec<(i32, i32)> = procfs::process::all_processes()
        .map(|all| {
            all.flatten()
                .filter_map(|p| Some((p.pid, p.stat().ok()?.ppid)))
                .collect()
        })
        .unwrap_or_default();
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
    let ticks = procfs::ticks_per_second().max(1) as f64;
    let mut s = TreeSample::default();
    for (i, p) in tree(pid).into_iter().enumerate() {
        let Ok(proc) = Process::new(p) else { continue };
        let Ok(stat) = proc.stat() else { continue };
        s.processes += 1;
        let (on_cpu_ns, switches) = threads(&proc);
        s.cpu_secs += ((stat.utime + stat.stime) as f64 / ticks).max(on_cpu_ns as f64 / 1e9);
        if i == 0 {
            // Reaped children (fork-per-connection servers) are charged to the root.
            s.cpu_secs += (stat.cutime + stat.cstime).max(0) as f64 / ticks;
        }
        s.pss_bytes += pss(&proc);
        s.context_switches += switches;
    }
    s
}

/// Nanoseconds on CPU and context switches, summed over the live threads of `proc`.
fn threads(proc: &Process) -> (u64, u64) {
    let Ok(tasks) = proc.tasks() else {
        return (0, 0);
    };
    tasks.flatten().fold((0, 0), |(ns, sw), t| {
        let on_cpu = t.schedstat().map_or(0, |s| s.sum_exec_runtime);
        let switches = t.status().map_or(0, |st| {
            st.voluntary_ctxt_switches.unwrap_or(0) + st.nonvoluntary_ctxt_switches.unwrap_or(0)
        });
        (ns + on_cpu, sw + switches)
    })
}

fn pss(proc: &Process) -> u64 {
    proc.smaps_rollup()
        .ok()
        .and_then(|r| {
            r.memory_map_rollup
                .iter()
                .find_map(|m| m.extension.map.get("Pss").copied())
        })
        .unwrap_or(0)
}

/// The flags every load tool shares: whose cost to measure, and how to print the report.
#[derive(Debug, clap::Args)]
pub struct Reporting {
    /// Report the server's CPU per unit of work and its memory (PSS), over its whole process
    /// tree. `auto`: the process that listens on --target (found in /proc; it must be one whose
    /// descriptors you may read). A PID is checked the same way: if neither it nor a process
    /// below it listens on --target, the tool refuses rather than report another server.
    #[arg(long, value_name = "PID|auto", value_parser = parse_server)]
    pub server_pid: Option<ServerPid>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `--server-pid` names.
#[derive(Clone, Copy, Debug)]
pub enum ServerPid {
    /// Whatever process tree listens on the target.
    Auto,
    /// This pid, once checked to serve the target.
    Pid(i32),
}

fn parse_server(s: &str) -> Result<ServerPid, String> {
    match s {
        "auto" => Ok(ServerPid::Auto),
        _ => match s.parse::<i32>() {
            Ok(p) if p > 0 => Ok(ServerPid::Pid(p)),
            _ => Err(format!("{s:?} is neither a pid nor `auto`")),
        },
    }
}

impl Reporting {
    /// The pid whose tree to sample, checked to be the server of `target` (None without
    /// `--server-pid`).
    pub fn server(
        &self,
        target: SocketAddr,
        transport: Transport,
    ) -> Result<Option<i32>, serving::ServingError> {
        match self.server_pid {
            None => Ok(None),
            Some(ServerPid::Auto) => serving::find(target, transport).map(Some),
            Some(ServerPid::Pid(pid)) => serving::check(pid, target, transport).map(|()| Some(pid)),
        }
    }
}
