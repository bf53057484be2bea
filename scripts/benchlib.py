"""Shared pieces of the load scripts: build the binaries, start a server on 127.0.0.1:0 and
read the address it announces, run echo-load, and stop servers by PID (the whole tree).

Every server a script starts is registered and killed at exit, even on Ctrl-C or an error.
Traffic goes to loopback only."""

import atexit
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Cargo puts binaries under CARGO_TARGET_DIR when it is set (relative to where cargo runs,
# which is ROOT for every build here), else under ROOT/target.
def _target_dir(manifest_dir):
    t = os.environ.get("CARGO_TARGET_DIR")
    return (ROOT / t if not os.path.isabs(t) else Path(t)) if t else manifest_dir / "target"


RELEASE = _target_dir(ROOT) / "release"
SERVER = RELEASE / "prefork-echo"
LOAD = RELEASE / "echo-load"
_started = []

# Become the reaper of orphans below this process (PR_SET_CHILD_SUBREAPER = 36): a server's
# workers outlive a SIGKILLed master and would otherwise end as zombies of PID 1, which in a
# container may never reap them. kill_tree() reaps the pids it kills.
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
except (OSError, AttributeError):
    pass
# CPU lists for `taskset`, set by a script's --pin-server / --pin-load (None: no pinning).
PIN = {"server": None, "load": None}


def pinned(role, argv):
    """argv, run under `taskset -c CPUS` when the role is pinned."""
    cpus = PIN.get(role)
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build():
    """Builds the release binaries (once per script run)."""
    log("building release binaries")
    subprocess.run(["cargo", "build", "--release", "--workspace", "--bins"], cwd=ROOT, check=True)


def build_peer(name):
    """Builds scripts/peers/NAME and returns its binary path."""
    manifest = ROOT / "scripts" / "peers" / name / "Cargo.toml"
    log(f"building peer {name}")
    subprocess.run(["cargo", "build", "--release", "--manifest-path", str(manifest)], cwd=ROOT, check=True)
    return _target_dir(ROOT / "scripts" / "peers" / name) / "release" / name


def descendants(pid):
    """pid and every descendant, from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, i = [pid], 0
    while i < len(out):
        out += [c for c, p in parent.items() if p == out[i]]
        i += 1
    return out


def reap(pids, timeout=2.0):
    """Waits (bounded) for each of `pids` that is, or has become, a child of this process."""
    left, deadline = set(pids), time.time() + timeout
    while left and time.time() < deadline:
        for p in list(left):
            try:
                if os.waitpid(p, os.WNOHANG)[0] == p:
                    left.discard(p)
            except ChildProcessError:
                left.discard(p)
        if left:
            time.sleep(0.01)


def kill_tree(pid, sig=signal.SIGKILL):
    tree = descendants(pid)
    for p in tree:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGKILL:
        reap(tree)


class Server:
    """A server process that prints `listening on ADDR ...` once ready."""

    def __init__(self, argv, name, startup=60):
        self.name = name
        self.proc = subprocess.Popen(pinned("server", argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True)
        _started.append(self)
        deadline = time.time() + startup
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("listening on ") or self.proc.poll() is not None:
                break
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{name} did not start (got {line!r})")
        self.addr = line.split()[2]
        self.pid = self.proc.pid

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL of the whole tree if it has not exited in time."""
        if self.proc.poll() is None:
            tree = descendants(self.proc.pid)
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            for p in tree:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            reap([p for p in tree if p != self.proc.pid])
        if self in _started:
            _started.remove(self)


def start_prefork(mode, workers, spawn="fork", extra=()):
    ctl = Path(tempfile.mkdtemp(prefix="prefork-echo-bench-")) / "control.sock"
    argv = [str(SERVER), "--listen", "127.0.0.1:0", "--workers", str(workers),
            "--mode", mode, "--spawn", spawn, "--control", str(ctl),
            "--drain-timeout", "2", *extra]
    server = Server(argv, f"{mode}-{spawn}" if mode == "process" else mode)
    server.control = ctl
    return server


def load(target, server_pid=None, budget=None, **opts):
    """Runs echo-load with --json; returns (exit code, report dict or None)."""
    argv = pinned("load", [str(LOAD), "--target", target, "--json"])
    if server_pid:
        argv += ["--server-pid", str(server_pid)]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not None and v is not False:
            argv += [flag, str(v)]
    # `budget` bounds the echo-load process itself; echo-load's own --timeout is in opts.
    budget = budget or (float(opts.get("duration") or 10) + 90)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return None, None
    try:
        return p.returncode, json.loads(p.stdout)
    except json.JSONDecodeError:
        log(f"echo-load failed: {p.stderr.strip()}")
        return p.returncode, None


def pyplot():
    """matplotlib.pyplot with the Agg backend, installed into target/py on first use."""
    py = ROOT / "target" / "py"
    sys.path.insert(0, str(py))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("installing matplotlib into target/py")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(py),
                        "matplotlib"], check=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def median(xs):
    """The median of a non-empty list."""
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


@atexit.register
def _cleanup():
    for s in list(_started):
        kill_tree(s.proc.pid)
