"""Shared pieces of the load scripts: build the binaries, start a server on 127.0.0.1:0 and
read the address it announces, run echo-load, and stop servers by PID (the whole tree).

Every server a script starts is registered and killed at exit, even on Ctrl-C or an error.
Traffic goes to loopback only."""

import atexit
import ctypes
import datetime
import importlib
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
RESULTS = ROOT / "scripts" / "results"
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
    """matplotlib.pyplot with the Agg backend, installed into TARGET/py on first use.

    Raises ImportError, saying why, when matplotlib cannot be had (no pip, no network)."""
    py = _target_dir(ROOT) / "py"
    if str(py) not in sys.path:
        sys.path.insert(0, str(py))
    try:
        import matplotlib
    except ImportError:
        log(f"installing matplotlib into {py}")
        py.mkdir(parents=True, exist_ok=True)
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(py),
                            "matplotlib"])
        if p.returncode != 0:
            raise ImportError(f"pip could not install matplotlib into {py} (exit {p.returncode})")
        # The failed import above remembered that this directory held nothing (or did not
        # exist): forget that, or Python never looks at what pip just put there.
        sys.path_importer_cache.pop(str(py), None)
        importlib.invalidate_caches()
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_chart(draw, path):
    """Calls draw(path) and returns True only if `path` then exists: a chart is claimed only
    once written. A failure is logged, not raised (the tables stand without the picture)."""
    try:
        draw(path)
    except Exception as e:  # noqa: BLE001 - any failure of an optional picture
        log(f"no chart: {e}")
        return False
    if not Path(path).is_file():
        log(f"no chart: {path} was not written")
        return False
    return True


def results_dir(name, out=None):
    """The new directory a script writes its results to, created here; never one that
    already holds anything.

    Without --out: RESULTS/YYYY-MM-DD-HHMMSS-NAME (with -2, -3, ... if two runs start in the
    same second). RESULTS is scripts/results/, which git ignores except for the runs the
    README quotes, committed on purpose (`git add -f`; see scripts/results/README.md).
    With --out: that directory, refused if it exists and is not empty."""
    if out:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            sys.exit(f"{out} already exists and is not an empty directory: not overwriting it "
                     "(choose another --out)")
        out.mkdir(parents=True, exist_ok=True)
        return out
    stem = f"{datetime.datetime.now():%Y-%m-%d-%H%M%S}-{name}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        out = RESULTS / (stem if n == 1 else f"{stem}-{n}")
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue
    sys.exit(f"no free results directory for {stem} under {RESULTS}")


# Below these a run's medians are one unlucky round from the opposite verdict on a shared
# two-core machine: one binary measured against itself moved 0.70-1.38x from round to
# round (README, "How small a difference this machine can tell apart").
MIN_ROUNDS = 5
MIN_SECONDS = 3.0


def honesty(rounds, duration, samples):
    """Lines saying what a run can support, for its results.md and its output.

    `samples` maps a label (server and point) to its per-round values (None for a failed
    round; `duration` None where a round is not timed). Gives the widest spreads measured
    (min and max over the median), and, when the run has fewer than MIN_ROUNDS rounds or
    shorter measurements than MIN_SECONDS, says that its figures cannot support a
    conclusion."""
    spreads = []
    for label, xs in samples.items():
        xs = [x for x in xs if x]
        if len(xs) >= 2:
            m = median(xs)
            spreads.append((max(xs) / min(xs), label, min(xs) / m, max(xs) / m))
    spreads.sort(reverse=True)
    lines = []
    if spreads:
        lines.append("Spread over rounds (min and max over the median), the widest: "
                     + "; ".join(f"{label} {lo:.2f}-{hi:.2f}x" for _, label, lo, hi in spreads[:3])
                     + ". A difference smaller than this is noise.")
    timed = duration is not None
    if rounds < MIN_ROUNDS or (timed and duration < MIN_SECONDS):
        run = f"{rounds} round(s)" + (f" of {duration:g} s" if timed else "")
        enough = f"--rounds {MIN_ROUNDS}" + (f" --duration {MIN_SECONDS:g}" if timed else "")
        lines.append(f"TOO SMALL TO CONCLUDE: {run}. On this kind of machine one point moves by "
                     "tens of percent between rounds, so a ranking read from this run may be the "
                     f"opposite of the truth; use at least {enough} and compare medians.")
    return lines


def median(xs):
    """The median of a non-empty list."""
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


@atexit.register
def _cleanup():
    for s in list(_started):
        kill_tree(s.proc.pid)
