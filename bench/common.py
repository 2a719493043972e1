"""Shared helpers for the benchmarks: a runc container with the shimlet hook,
timing, percentiles. Benchmarks print a table and write JSON results; they are
not pass/fail tests."""
import atexit
import contextlib
import faulthandler
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "integration"))
import containers  # noqa: E402

BIN = containers.BIN


def _on_term(signum, _frame):
    # SIGTERM/SIGHUP (run-all killed, terminal closed) unwind like Ctrl-C so
    # every `with` block tears down its containers and helper processes.
    print(f"benchmark: signal {signum}, cleaning up", file=sys.stderr)
    raise SystemExit(128 + signum)


def _on_alarm(_signum, _frame):
    # A hung step (a wedged relay, a stuck container) must not hang run-all:
    # show where it hung, then unwind through the cleanups like SIGTERM.
    faulthandler.dump_traceback(all_threads=True)
    raise SystemExit(f"benchmark timed out after {TIMEOUT_S}s (SHIMLET_BENCH_TIMEOUT)")


TIMEOUT_S = int(os.environ.get("SHIMLET_BENCH_TIMEOUT", "600"))
signal.signal(signal.SIGTERM, _on_term)
signal.signal(signal.SIGHUP, _on_term)
signal.signal(signal.SIGALRM, _on_alarm)
signal.alarm(TIMEOUT_S)


@atexit.register
def _drop_shared_rootfs():
    # containers.shared_rootfs() makes one busybox rootfs per process in a
    # mkdtemp dir; the tests keep it, a benchmark run must not leave it behind.
    if containers._ROOTFS_CACHE:
        shutil.rmtree(os.path.dirname(containers._ROOTFS_CACHE), ignore_errors=True)


def require_bins(*names):
    """Fail loudly (not skip) when a needed binary is missing."""
    if os.geteuid() != 0:
        sys.exit("benchmarks need root (runc, nsenter, podman)")
    for n in names:
        # ours must come from SHIMLET_BIN (never an installed copy on PATH)
        ok = os.access(os.path.join(BIN, n), os.X_OK) if n.startswith("shim") else shutil.which(n)
        if not ok:
            sys.exit(f"missing {n} (SHIMLET_BIN={BIN}; build with scripts/build plain, tools with scripts/deps)")


class HookedContainer:
    """A runc container with createRuntime/poststop hooks and its own state dir."""

    def __init__(self, args=("sleep", "100000"), name=None, edit=None, hook_config=None):
        self.tmp = tempfile.mkdtemp(prefix="shimlet-bench-")
        self.state = os.path.join(self.tmp, "state")
        cfg = os.path.join(self.tmp, "hook.json")
        with open(cfg, "w") as f:
            json.dump({"state_dir": self.state, "listen": "127.0.0.1:0", **(hook_config or {})}, f)
        hook = {"path": os.path.join(BIN, "shimlet-hook"), "args": ["shimlet-hook", "--config", cfg]}
        try:
            self.c = containers.Container(name=name, args=args, edit=edit,
                                          hooks={"createRuntime": [hook], "poststop": [hook]})
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def __enter__(self):
        try:
            self.c.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.c.cleanup()
        finally:
            subprocess.run(["rm", "-rf", self.tmp])

    @property
    def id(self):
        return self.c.id

    def registration(self):
        with open(os.path.join(self.state, self.id, "registration.json")) as f:
            return json.load(f)

    def shim_pid(self):
        return self.registration()["shim_pid"]

    def shimctl(self, *args):
        return [os.path.join(BIN, "shimctl"), "--local", "--state-dir", self.state, *args]


def timeit(cmd, n, **kw):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
        out.append((time.perf_counter() - t0) * 1000)
        if p.returncode != 0:
            raise RuntimeError(f"{cmd} failed: {p.stderr.decode()}")
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(xs):
    return {"median_ms": statistics.median(xs), "p90_ms": pct(xs, 90), "min_ms": min(xs), "n": len(xs)}


def smaps_rollup(pid):
    r = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                r[parts[0][:-1]] = int(parts[1])
    return {"pss_kb": r.get("Pss", 0), "private_dirty_kb": r.get("Private_Dirty", 0), "rss_kb": r.get("Rss", 0),
            "uss_kb": r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)}


def write_result(name, data):
    out = os.environ.get("SHIMLET_BENCH_OUT", os.path.join(os.path.dirname(HERE), "build", "bench"))
    os.makedirs(out, exist_ok=True)
    data["uptime"] = open("/proc/loadavg").read().strip()
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    print(f"(results in {out}/{name}.json; load: {data['uptime']})")


def free_port():
    """A TCP port free on 127.0.0.1 right now (tiny race, fine on a test box)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10, proc=None, what="server"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} not listening on 127.0.0.1:{port} after {timeout}s")


def children(pid):
    out = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def stop_proc(proc, timeout=3):
    """Stop a Popen and every process it forked (by pid, children first seen
    through /proc, so daemons that setsid are caught too)."""
    if proc is None:
        return
    pids = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@contextlib.contextmanager
def popen(cmd, **kw):
    """Popen that is always stopped (with its children) on exit."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.Popen(cmd, **kw)
    try:
        yield p
    finally:
        stop_proc(p)


class Sshd:
    """A private sshd on 127.0.0.1:<free port>: generated host and user keys,
    key-only root login, pinned known_hosts; nothing of the system's ssh setup
    is used or changed (except creating /run/sshd, its privsep dir)."""

    def __init__(self, max_startups="200"):
        # max_startups None: OpenSSH's default (10:30:100) for unauthenticated connections.
        self.max_startups = max_startups
        self.dir = tempfile.mkdtemp(prefix="shimlet-bench-sshd-")
        self.port = free_port()
        self.proc = None
        self.cipher = os.environ.get("SHIMLET_BENCH_SSH_CIPHER")  # e.g. aes128-gcm@openssh.com

    def path(self, n):
        return os.path.join(self.dir, n)

    def __enter__(self):
        try:
            for k in ("host", "user"):
                containers.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "shimlet-bench", "-f", self.path(k)])
            shutil.copy(self.path("user.pub"), self.path("authorized_keys"))
            with open(self.path("host.pub")) as f:
                hostkey = " ".join(f.read().split()[:2])
            with open(self.path("known_hosts"), "w") as f:
                f.write(f"[127.0.0.1]:{self.port} {hostkey}\n")
            with open(self.path("sshd_config"), "w") as f:
                f.write(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.path("host")}
PidFile {self.path("sshd.pid")}
AuthorizedKeysFile {self.path("authorized_keys")}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
MaxSessions 100
LogLevel ERROR
""" + (f"MaxStartups {self.max_startups}\n" if self.max_startups else ""))
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            self.log = open(self.path("sshd.log"), "w")
            self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", self.path("sshd_config")],
                                         stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
            wait_port(self.port, proc=self.proc, what="sshd")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            stop_proc(self.proc)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def ssh(self, command=None, opts=(), verbose_log=None):
        """ssh argv to root@127.0.0.1 on this sshd; command None for -N forwards."""
        cmd = ["ssh", "-F", "/dev/null", "-i", self.path("user"), "-o", "IdentitiesOnly=yes",
               "-o", f"UserKnownHostsFile={self.path('known_hosts')}", "-o", "StrictHostKeyChecking=yes",
               "-o", "BatchMode=yes", "-p", str(self.port), *opts]
        if self.cipher:
            cmd += ["-c", self.cipher]
        if verbose_log:
            cmd += ["-v", "-E", verbose_log]
        cmd.append("root@127.0.0.1")
        return cmd + ([command] if command else [])

    def negotiated_cipher(self):
        """The cipher ssh and this sshd agree on (from `ssh -v`)."""
        log = self.path("cipher.log")
        containers.run(self.ssh("true", verbose_log=log), stdin=subprocess.DEVNULL)
        with open(log) as f:
            for line in f:
                if "kex: server->client cipher:" in line:
                    return line.split("cipher:")[1].split()[0]
        return "unknown"


def listening(port, pid="self"):
    """Whether a TCP socket listens on `port` in the network namespace of `pid`
    (read from /proc, so probing never opens a connection to the server)."""
    for fam in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{fam}") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_listening(port, proc, what, pid=None, timeout=15):
    """Wait until `proc` (a Popen) listens on `port` (in the netns of `pid`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} before listening on port {port}")
        if listening(port, pid or proc.pid):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} not listening on port {port} after {timeout}s")
