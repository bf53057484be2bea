//! prefork-echo: the binary's edge. Parses the command line, binds the listening socket,
//! and hands over to the master (process mode) or the thread server. Errors end here as one
//! line and exit code 1; clap's usage errors exit 2.

mod balance;
mod blocking;
mod cli;
mod client;
mod clients;
mod config;
mod control;
mod fork_per_conn;
mod hub;
mod janitor;
mod listener;
mod liveness;
mod master;
mod metrics;
mod privileges;
mod runtime_files;
mod serve_loop;
mod signals;
mod spawn;
mod stats;
mod systemd;
mod thread_mode;

use std::ffi::CString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use clap::Parser;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use balance::{Balance, Listeners};
use cli::{Cli, Command, Mode, ServeArgs};
use worker::service::{ServiceKind, Transport};

fn main() -> ExitCode {
    protocol::log::init();
    let cli = Cli::parse();
    if cli.command.is_none() {
        if let Err(e) = cli::validate(&cli.serve) {
            e.exit(); // a usage error: clap's message, exit code 2
        }
    }
    match cli.command {
        Some(Command::Worker(cfg)) => ExitCode::from(worker::run(cfg) as u8),
        Some(Command::Stats(args)) => edge(client::stats(args)),
        Some(Command::Reload(args)) => edge(client::reload(args)),
        Some(Command::Stop(args)) => edge(client::stop(args)),
        Some(Command::Upgrade(args)) => edge(client::upgrade(args)),
        Some(Command::Scale { workers, ctl }) => edge(client::scale(workers, ctl)),
        Some(Command::Help { command }) => help(command.as_deref()),
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "prefork-echo",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Some(Command::Man) => {
            use clap::CommandFactory;
            edge(
                clap_mangen::Man::new(Cli::command())
                    .render(&mut std::io::stdout())
                    .context("writing the man page"),
            )
        }
        None => edge(serve(cli.serve)),
    }
}

/// `prefork-echo help [COMMAND]`.
fn help(command: Option<&str>) -> ExitCode {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let shown = match command {
        None => cmd.print_help(),
        Some(name) => match cmd.find_subcommand_mut(name) {
            Some(sub) if !sub.is_hide_set() => sub.print_help(),
            _ => {
                eprintln!(
                    "prefork-echo: error: no command named {name:?} (see prefork-echo --help)"
                );
                return ExitCode::from(2);
            }
        },
    };
    match shown {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Every command's errors end here: one line, exit code 1.
fn edge(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prefork-echo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut base = master::Settings {
        workers: match args.workers {
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        },
        worker_timeout: (args.worker_timeout > 0.0)
            .then(|| protocol::duration::secs(args.worker_timeout)),
        upgrade_grace: protocol::duration::secs(args.upgrade_grace),
        worker: worker::WorkerConfig {
            listen_fd: -1,
            ipc_fd: -1,
            udp_fd: -1,
            bus_fd: -1,
            root_fd: -1,
            id: 0,
            generation: 1,
            max_unsent: args.max_unsent as usize,
            drain_timeout: args.drain_timeout,
            stats_interval: args.stats_interval,
            max_conns: args.max_conns,
            idle_timeout: args.idle_timeout,
            service: args.service,
            io: args.io,
            proxy_protocol: args.proxy_protocol,
            proxy_from: args.proxy_from.clone(),
            proxy_timeout: args.proxy_timeout,
            root: args.root.clone(),
            tftp_write: args.tftp_write,
            tftp_max_file: args.tftp_max_file,
            tftp_min_free: args.tftp_min_free,
            max_line: args.max_line as usize,
            chat: args.chat.clone(),
        },
    };
    let mut settings =
        master::Settings::resolve(&base, args.config.as_ref()).context("config file")?;
    if args.io == worker::config::IoDriver::Uring {
        // Refused here, in one line, rather than by every worker failing to boot.
        worker::event_loop::probe_uring()
            .context("--io uring: this kernel or sandbox refuses io_uring; use --io epoll")?;
    }
    let workers = settings.workers;
    let nofile = raise_nofile_limit();
    if u64::from(workers) + master::MASTER_FDS > nofile {
        bail!(
            "--workers {workers} needs about {} descriptors but the limit (RLIMIT_NOFILE) is {nofile}",
            u64::from(workers) + master::MASTER_FDS
        );
    }
    // A master started by a binary upgrade inherits its predecessor's signal mask (all
    // blocked across fork/exec); open it before anything else.
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .context("unblocking signals")?;
    let spawn::Inherited {
        listener: inherited,
        ready: predecessor,
        udp: inherited_udp,
        control: inherited_control,
        metrics: inherited_metrics,
        totals: inherited_totals,
        slots: inherited_slots,
        root: inherited_root,
    } = spawn::from_predecessor();
    // With --balance reuseport, the sockets of slots 1 and up (slot 0's is `socket`).
    let mut more_slots = Vec::new();
    let socket = match (inherited, systemd::listen_fd()) {
        (Some(fd), _) => {
            for slot in inherited_slots {
                more_slots.push(listener::adopt(slot).context("a slot's socket handed over")?);
            }
            listener::adopt(fd).context("the listener handed over by the old master")?
        }
        (None, Some(fd)) => {
            let s = listener::adopt(fd).context("the socket systemd passed")?;
            protocol::log!(
                "socket activation: serving the listening socket systemd passed (fd 3); --listen and --backlog are not used"
            );
            s
        }
        (None, None) => {
            let at = listener::resolve(&args.listen)?;
            let datagram = args.service.transport() == Transport::Datagram;
            match (args.balance, datagram) {
                // Every slot's socket is bound now, before root is dropped: a group takes new
                // members only from the user that formed it.
                (Balance::Reuseport, _) => {
                    let (mut all, _) =
                        balance::bind_group(at, args.backlog, base.workers as usize, datagram)?;
                    more_slots = all.split_off(1);
                    all.remove(0)
                }
                (Balance::Shared, false) => listener::bind(at, args.backlog)?,
                (Balance::Shared, true) => listener::bind_udp(at)?.into(),
            }
        }
    };
    let addr = listener::local_addr(&socket).context("reading the bound address")?;
    // --udp: one socket, or (--balance reuseport) one per slot, bound before root is dropped.
    let udp: Vec<socket2::Socket> = match (args.udp, inherited_udp.is_empty()) {
        (false, _) => Vec::new(),
        (true, false) => inherited_udp
            .into_iter()
            .map(|fd| listener::adopt_udp(fd).map(socket2::Socket::from))
            .collect::<std::io::Result<_>>()
            .context("the UDP socket handed over")?,
        (true, true) if args.balance == Balance::Reuseport => {
            balance::bind_group(addr, 0, base.workers as usize, true)?.0
        }
        (true, true) => vec![listener::bind_udp(addr)?.into()],
    };
    // Everything a root-run server creates is created for the serving user, in a directory
    // checked to be safe (runtime_files), and only then is root dropped.
    let target = args
        .user
        .as_deref()
        .map(|u| privileges::lookup(u, args.group.as_deref()))
        .transpose()
        .context("--user")?;
    let upgraded_as_user = target.as_ref().is_some_and(privileges::already);
    let owner = target
        .as_ref()
        .filter(|_| !upgraded_as_user)
        .map(|t| (t.uid, t.gid));
    let control = match args.control.clone() {
        Some(path) => path,
        None => control::default_path(addr).context("the default control socket directory")?,
    };
    let control_server = match inherited_control {
        Some(fd) => control::ControlServer::adopt(fd, &control)
            .context("the control socket handed over by the old master")?,
        None => control::ControlServer::bind(&control, owner)?,
    };
    let metrics = match (inherited_metrics, args.metrics.as_deref()) {
        (Some(fd), _) => Some(metrics::MetricsServer::adopt(fd.into())),
        (None, Some(a)) => Some(metrics::MetricsServer::bind(listener::resolve(a)?)?),
        (None, None) => None,
    };
    if let Some(m) = &metrics {
        protocol::log!("metrics on http://{}/metrics", m.local_addr()?);
    }
    let pid_file = args.pid_file.clone();
    if let Some(path) = &pid_file {
        runtime_files::check_dir(path, target.as_ref().map(|t| t.uid))
            .and_then(|()| runtime_files::write_pid_file(path, owner))
            .context("the pid file")?;
    }
    // Dropping to --user leaves no right to remove these files from root's directory at
    // exit: a root janitor process does it (janitor.rs).
    let janitor = match &target {
        Some(_) if !upgraded_as_user && nix::unistd::Uid::effective().is_root() => {
            janitor::Janitor::spawn(&control, pid_file.as_deref())
        }
        _ => None,
    };
    // The TFTP root is opened once, here, before root is dropped (or taken over from the old
    // master in an upgrade); every worker and child serves beneath this descriptor.
    let tftp_root = match args.service {
        ServiceKind::Tftp => {
            let path = args.root.as_deref().unwrap_or(std::path::Path::new("."));
            let root = open_root(path, inherited_root, predecessor.is_some(), target.as_ref())
                .with_context(|| format!("--root {}", path.display()))?;
            base.worker.root_fd = root.raw_fd();
            settings.worker.root_fd = root.raw_fd();
            Some(std::sync::Arc::new(root))
        }
        _ => None,
    };
    match &target {
        Some(t) if upgraded_as_user => {
            protocol::log!(
                "serving as {} (uid {}, gid {}), as before the upgrade",
                t.name,
                t.uid,
                t.gid
            );
        }
        Some(t) => {
            privileges::become_user(t).context("dropping privileges")?;
            protocol::log!("serving as {} (uid {}, gid {})", t.name, t.uid, t.gid);
        }
        None if nix::unistd::Uid::effective().is_root() => {
            protocol::warn!("serving as root: pass --user NAME to drop privileges after binding");
        }
        None => {}
    }
    let totals = inherited_totals
        .map(|t| master::Carryover::parse(&t))
        .unwrap_or_default();
    let result = run_mode(
        args,
        settings,
        base,
        (socket, more_slots, udp),
        addr,
        control,
        (control_server, metrics),
        (predecessor, totals),
        tftp_root,
    );
    if let Some(path) = &pid_file {
        // Only our own: after an upgrade the file names the new master.
        runtime_files::remove_own_pid_file(path);
    }
    if let Some(j) = janitor {
        j.finish();
    }
    result
}

/// Hands the bound socket and control socket to the chosen serving mode.
#[allow(clippy::too_many_arguments)]
fn run_mode(
    args: ServeArgs,
    settings: master::Settings,
    base: master::Settings,
    (socket, more_slots, udp): (socket2::Socket, Vec<socket2::Socket>, Vec<socket2::Socket>),
    addr: std::net::SocketAddr,
    control: std::path::PathBuf,
    (control_server, metrics): (control::ControlServer, Option<metrics::MetricsServer>),
    (predecessor, totals): (Option<std::os::fd::OwnedFd>, master::Carryover),
    tftp_root: Option<std::sync::Arc<worker::tftp::Root>>,
) -> Result<()> {
    let workers = settings.workers;
    let stats_every = settings.worker.stats_every().unwrap_or_default();
    let log_stats = (args.log_stats && !stats_every.is_zero()).then_some(stats_every);
    protocol::log::set_role(match args.mode {
        Mode::Process => "master",
        Mode::Thread => "thread-mode",
        Mode::ForkPerConn => "fork-per-conn",
    });
    let drain_timeout = settings.worker.drain();
    // The service every single-process mode drives (process mode's workers build their own
    // from the worker settings, so exec'd workers do too).
    let echo = worker::echo::Echo {
        max_unsent: settings.worker.max_unsent,
        watch_idle: settings.worker.idle().is_some(),
    };
    let tftp = || -> Result<worker::tftp::Tftp> {
        let w = &settings.worker;
        let root = tftp_root
            .clone()
            .context("the --root directory was not opened")?;
        let sizes = (w.tftp_max_file, w.tftp_min_free);
        Ok(worker::tftp::Tftp::new(root, w.tftp_write, sizes))
    };
    let chat = || worker::chat::Chat::from_config(&settings.worker);
    let limits = blocking::Limits::of(&settings.worker);
    let proxy = settings.worker.proxy();
    let single_process = || blocking::SingleProcessConfig {
        drain_timeout,
        control: control.clone(),
        log_stats,
        limits,
        proxy: proxy.clone(),
    };
    match args.mode {
        Mode::Process => {
            let exe = std::env::current_exe().context("finding this binary for exec spawning")?;
            let exe = CString::new(exe.as_os_str().as_bytes()).context("binary path")?;
            let cfg = master::MasterConfig {
                spawn: args.spawn,
                exe,
                control,
                log_stats: log_stats.is_some(),
                config_file: args.config,
                pid_file: args.pid_file,
                base,
                predecessor,
                carried: totals,
                udp: match (udp.is_empty(), args.balance) {
                    (true, _) => None,
                    (false, Balance::Reuseport) => Some(Listeners::reuseport(udp, addr, 0)?),
                    (false, Balance::Shared) => udp.into_iter().next().map(Listeners::shared),
                },
            };
            let listeners = match args.balance {
                Balance::Shared => Listeners::shared(socket),
                Balance::Reuseport => {
                    let all = std::iter::once(socket).chain(more_slots).collect();
                    Listeners::reuseport(all, addr, args.backlog)?
                }
            };
            master::run(cfg, settings, listeners, addr, control_server, metrics)
        }
        Mode::ForkPerConn => {
            if args.workers.is_some_and(|n| n > 1) {
                protocol::log!(
                    "--workers {workers} is ignored in fork-per-conn mode: the master accepts and forks one child per connection"
                );
            }
            let sockets = (control_server, metrics);
            match args.service {
                ServiceKind::Echo => {
                    fork_per_conn::run(single_process(), echo, socket, addr, sockets)
                }
                ServiceKind::Tftp => {
                    fork_per_conn::run(single_process(), tftp()?, socket, addr, sockets)
                }
                ServiceKind::Chat => {
                    fork_per_conn::run(single_process(), chat(), socket, addr, sockets)
                }
            }
        }
        Mode::Thread => {
            let cfg = thread_mode::ThreadConfig {
                acceptors: workers,
                udp: udp.into_iter().next().map(std::net::UdpSocket::from),
                base: single_process(),
            };
            let sockets = (control_server, metrics);
            match args.service {
                ServiceKind::Echo => thread_mode::run(cfg, echo, socket, addr, sockets),
                ServiceKind::Tftp => thread_mode::run(cfg, tftp()?, socket, addr, sockets),
                ServiceKind::Chat => thread_mode::run(cfg, chat(), socket, addr, sockets),
            }
        }
    }
}

/// The TFTP root: the descriptor an upgraded master's predecessor handed over, or the path
/// opened now. A master started by an upgrade whose predecessor handed no descriptor (an older
/// binary) re-opens the path, which may have been swapped since: that directory must then be
/// one no other user could have put there (owned by root or the serving user, writable by
/// neither group nor others), as the runtime directory is checked.
fn open_root(
    path: &std::path::Path,
    inherited: Option<std::os::fd::OwnedFd>,
    upgraded: bool,
    target: Option<&privileges::Target>,
) -> Result<worker::tftp::Root> {
    use worker::tftp::Root;
    if let Some(fd) = inherited {
        return Root::adopt(fd).context("the root directory handed over by the old master");
    }
    let root = Root::open(path).context("opening the directory")?;
    if upgraded {
        root.check_trusted(target.map(|t| t.uid.as_raw()))
            .context("re-opened after an upgrade")?;
    }
    Ok(root)
}

/// Raises the soft descriptor limit to the hard one (a worker holds one descriptor per
/// connection; the usual soft limit of 1024 would cap it far below what it can serve) and
/// returns the limit in force.
fn raise_nofile_limit() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// Prints the one line scripts and tests wait for, once every worker is accepting.
pub(crate) fn announce(addr: SocketAddr, mode: &str, workers: u32) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "listening on {addr} (mode={mode}, workers={workers}, pid={})",
        std::process::id()
    );
    let _ = out.flush();
}
