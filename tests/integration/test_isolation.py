"""Per-session isolation on the host: SELinux off, Landlock on.

Real runc containers hooked to shimlet-hook, the real shim and sessions,
`shimctl --local`. Two exec sessions of one container as the same uid must
not reach each other (/proc/PID/environ, mem, fd, ptrace, signals, the pty),
while the container's own processes still reach a session and the session
still sees the container. Per-session limits: a pids limit stops a fork bomb
in one session (the container and a sibling stay healthy), a memory limit
kills only the offending session, and shimctl reports it with exit code 254.
Killing a session leaves no process and no cgroup behind (v1 and v2)."""
import contextlib
import glob
import json
import os
import pty
import random
import shutil
import signal
import subprocess
import tempfile

import pytest

from containers import BIN, Container, wait_for

HOOK = os.path.join(BIN, "shimlet-hook")
SHIMCTL = os.path.join(BIN, "shimctl")
PTRACE_PROBE = os.path.join(BIN, "shimlet-ptrace-probe")
KILLED_EXIT = 254  # client/client.h kSessionKilledExit, docs/design.md


def landlock_abi():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return libc.syscall(444, None, 0, 1)


class IsoEnv:
    """A hook config with an "isolation" object, its state dir, containers."""

    def __init__(self, isolation):
        for b in (HOOK, SHIMCTL, PTRACE_PROBE, os.path.join(BIN, "shimlet"), os.path.join(BIN, "shimlet-session")):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} missing: build first (scripts/build)")
        self.dir = tempfile.mkdtemp(prefix="shimlet-iso-")
        self.state = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "hook.json")
        with open(self.config, "w") as f:
            json.dump({"state_dir": self.state, "fail_container_on_error": True, "isolation": isolation}, f)
        self.containers = []
        self.procs = []

    def container(self, edit=None):
        hook = lambda stage: [{"path": HOOK, "args": ["shimlet-hook", "--config", self.config, stage]}]

        def ed(cfg):
            # The ptrace probe is static: copy it into the rootfs.
            if edit:
                edit(cfg)

        c = Container(hooks={"createRuntime": hook("createRuntime"), "poststop": hook("poststop")}, edit=ed)
        shutil.copy2(PTRACE_PROBE, os.path.join(c.bundle, "rootfs/bin/ptrace-probe"))
        self.containers.append(c)
        c.start()
        wait_for(lambda: os.path.exists(os.path.join(self.state, c.id, "registration.json")), 5, "registration")
        return c

    def shimctl(self, *args):
        return [SHIMCTL, "--local", "--state-dir", self.state, *args]

    def run(self, *args, timeout=30, input=None):
        return subprocess.run(self.shimctl(*args), input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout)

    def background(self, *args, tty=False):
        """A long-running session; with tty, shimctl gets a pty of ours."""
        kw = {}
        if tty:
            master, slave = pty.openpty()
            kw = dict(stdin=slave, stdout=slave, stderr=slave)
        else:
            kw = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p = subprocess.Popen(self.shimctl(*args), start_new_session=True, **kw)
        if tty:
            os.close(slave)
            p.pty_master = master
        self.procs.append(p)
        return p

    def shim_log(self, c):
        with open(os.path.join(self.state, c.id, "shim.log")) as f:
            return [json.loads(l) for l in f if l.startswith("{")]

    def cleanup(self):
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
            if hasattr(p, "pty_master"):
                with contextlib.suppress(OSError):
                    os.close(p.pty_master)
        for c in self.containers:
            with contextlib.suppress(Exception):
                c.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def strict():
    if landlock_abi() < 6:
        pytest.fail(f"this host's Landlock ABI is {landlock_abi()}; the host isolation tests need ABI >= 6")
    e = IsoEnv({"landlock": "strict"})
    try:
        yield e
    finally:
        e.cleanup()


def ctr_read(c, path):
    p = c.exec("cat", path)
    return p.stdout.decode().strip() if p.returncode == 0 else ""


def start_victim(env, c, tty=True):
    """Session A: records its pid and tty in the container, then sleeps with a secret in its environ."""
    a = env.background("exec", "-i", "-t", c.id, "--", "sh", "-c",
                       "tty > /tmp/A.tty; echo $$ > /tmp/A.pid; exec env SECRET_A=topsecret sleep 1000", tty=True)
    wait_for(lambda: ctr_read(c, "/tmp/A.pid") and ctr_read(c, "/tmp/A.tty"), 15, "session A to start")
    return a, ctr_read(c, "/tmp/A.pid"), ctr_read(c, "/tmp/A.tty")


PROBES = {
    "environ": "cat /proc/$P/environ",
    "mem": "exec 3< /proc/$P/mem",
    "fd": "readlink /proc/$P/fd/0",
    "fd-open": "exec 4< /proc/$P/fd/0",
    "signal": "kill -USR1 $P",
    "signal0": "kill -0 $P",
    "pty": "echo intruder > $T",
    "ptrace": "ptrace-probe $P",
}


def probe_script(pid, tty):
    lines = [f"P={pid}; T={tty}"]
    for name, cmd in PROBES.items():
        lines.append(f"if out=$({cmd} 2>&1 </dev/null); then echo \"{name}: ALLOWED $out\"; "
                     f"else echo \"{name}: DENIED $out\"; fi")
    return "\n".join(lines)


def verdicts(text):
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if k in PROBES:
            out[k] = v
    return out


def shimlet_dirs(c, warm=False):
    """Every session cgroup directory under the container's cgroups (v1 and
    v2); a warm session's (shimlet-warm-*, test_warm.py) only with warm=True."""
    found = []
    with open(f"/proc/{c.pid}/cgroup") as f:
        for line in f:
            _, ctrl, path = line.strip().split(":", 2)
            for root in glob.glob("/sys/fs/cgroup/*") + ["/sys/fs/cgroup"]:
                d = root + path
                if os.path.isdir(d):
                    found += glob.glob(os.path.join(d, "shimlet-*"))
    return sorted({d for d in found if warm or not os.path.basename(d).startswith("shimlet-warm-")})


def test_sibling_sessions_are_isolated(strict):
    c = strict.container()
    a, apid, atty = start_victim(strict, c)
    b = strict.run("exec", c.id, "--", "sh", "-c", probe_script(apid, atty))
    res = verdicts(b.stdout.decode())
    assert set(res) == set(PROBES), (b.stdout, b.stderr)
    for k, v in res.items():
        assert v.startswith("DENIED"), f"session B could {k} session A: {v}\n{b.stdout.decode()}"
    assert "topsecret" not in b.stdout.decode()
    # A survived B's signals, and its own pty still works.
    assert a.poll() is None, "session A died"
    # The control: the container's own process (runc exec, no Landlock
    # domain) still reaches a session, as with runc exec.
    env = c.exec("cat", f"/proc/{apid}/environ")
    assert env.returncode == 0 and b"SECRET_A=topsecret" in env.stdout, env
    # The session sees the container: files and processes (ps/stat).
    log = strict.shim_log(c)
    starts = [r for r in log if r.get("msg") == "exec.start" and "isolation" in r]
    assert starts and all(r["isolation"]["landlock"].startswith("strict abi ") for r in starts), starts
    assert all(r["isolation"]["landlock"] != "strict abi 0" for r in starts), starts


def test_session_still_reaches_the_container(strict):
    c = strict.container()
    p = strict.run("exec", c.id, "--", "sh", "-c",
                   "cat /proc/1/cmdline | tr '\\0' ' '; echo; ps -o pid,args | grep -c 'sleep 100000'; "
                   "echo hello > /tmp/from-session; cat /tmp/from-session")
    out = p.stdout.decode()
    assert p.returncode == 0, (out, p.stderr)
    assert "sleep 100000" in out and "hello" in out
    assert ctr_read(c, "/tmp/from-session") == "hello"


def test_compat_mode_allows_signalling_the_container():
    e = IsoEnv({"landlock": "compat"})
    try:
        c = e.container()
        # Strict mode forbids it (scoped signals); compat restores runc exec's reach.
        p = e.run("exec", c.id, "--", "kill", "-0", "1")
        assert p.returncode == 0, p.stderr
        a, apid, _ = start_victim(e, c)
        q = e.run("exec", c.id, "--", "sh", "-c", f"cat /proc/{apid}/environ")
        assert q.returncode != 0 and b"topsecret" not in q.stdout, q
    finally:
        e.cleanup()


def test_strict_mode_blocks_signalling_the_container(strict):
    c = strict.container()
    p = strict.run("exec", c.id, "--", "kill", "-0", "1")
    assert p.returncode != 0, p


def test_no_cap_sys_admin_unless_granted(strict):
    c = strict.container()
    p = strict.run("exec", c.id, "--", "sh", "-c", "grep CapEff /proc/self/status")
    eff = int(p.stdout.decode().split()[1], 16)
    assert not eff & (1 << 21), f"session holds CAP_SYS_ADMIN: {p.stdout}"


def test_pids_limit_stops_a_fork_bomb():
    e = IsoEnv({"landlock": "strict", "limits": {"pids": 32}})
    try:
        c = e.container()
        sibling = e.background("exec", c.id, "--", "sleep", "1000")
        bomb = e.run("exec", c.id, "--", "sh", "-c", "b() { b | b & }; b; sleep 30", timeout=60)
        err = bomb.stderr.decode()
        assert bomb.returncode == KILLED_EXIT, (bomb.returncode, err)
        assert "error: session killed: pids limit (32) exceeded" in err, err
        # The container and the sibling session stay healthy.
        assert sibling.poll() is None
        ok = e.run("exec", c.id, "--", "sh", "-c", "for i in 1 2 3 4 5 6 7 8; do true & done; wait; echo fine")
        assert ok.returncode == 0 and ok.stdout == b"fine\n", ok
        assert c.exec("true").returncode == 0
        ends = [r for r in e.shim_log(c) if r.get("msg") == "session.end" and r.get("killed") == "pids"]
        assert ends and ends[0].get("pids_max_hits", 0) > 0, ends
    finally:
        e.cleanup()


def test_memory_limit_kills_only_the_offender():
    e = IsoEnv({"landlock": "strict", "max_limits": {"memory": 256 << 20}})
    try:
        c = e.container()
        sibling = e.background("exec", c.id, "--", "sleep", "1000")
        # The ticket asks for 64 MiB (within the shim's max).
        hog = e.run("exec", "--limit-memory", "64M", c.id, "--", "sh", "-c",
                    "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived", timeout=60)
        err = hog.stderr.decode()
        assert hog.returncode == KILLED_EXIT, (hog.returncode, err, hog.stdout[:200])
        assert "error: session killed: memory limit (64 MiB) exceeded" in err, err
        assert b"survived" not in hog.stdout
        assert sibling.poll() is None
        assert c.exec("true").returncode == 0
        ends = [r for r in e.shim_log(c) if r.get("msg") == "session.end" and r.get("killed") == "memory"]
        assert ends and ends[0]["memory_peak"] > 32 << 20, ends
        # A ticket asking for more than the shim's max gets the max.
        big = e.run("exec", "--limit-memory", "1G", c.id, "--", "true")
        assert big.returncode == 0
        starts = [r for r in e.shim_log(c) if r.get("msg") == "exec.start" and "isolation" in r]
        assert starts[-1]["isolation"]["limits"]["memory"] == 256 << 20, starts[-1]
    finally:
        e.cleanup()


def test_killed_session_leaves_nothing_behind(strict):
    c = strict.container()
    # A session with a background child that ignores SIGHUP, killed by the client going away.
    # Sleep durations no other test (or parallel run) uses: found by argv across the host.
    s1, s2 = random.sample(range(10**8, 10**9), 2)
    p = strict.background("exec", c.id, "--", "sh", "-c",
                          f"trap '' HUP; sleep {s1} & sleep {s2} & echo $$ > /tmp/S.pid; wait")
    wait_for(lambda: ctr_read(c, "/tmp/S.pid"), 15, "session to start")
    dirs = wait_for(lambda: shimlet_dirs(c), 5, "session cgroup directories")
    hierarchies = {d.split("/sys/fs/cgroup/")[1].split("/")[0] for d in dirs}
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=5)

    def gone():
        ps = subprocess.run(["pgrep", "-f", f"^sleep ({s1}|{s2})$"], stdout=subprocess.PIPE).stdout.split()
        return not ps and not shimlet_dirs(c)

    wait_for(gone, 10, "session processes and cgroups to disappear")
    # Both a v1 hierarchy (pids/memory) and the v2 one were used when present.
    if os.path.isdir("/sys/fs/cgroup/unified"):
        assert "unified" in hierarchies, dirs
    assert c.exec("true").returncode == 0


def test_ticket_limits_claim_is_validated(strict):
    c = strict.container()
    p = strict.run("exec", "--limit-pids", "0", c.id, "--", "true")
    assert p.returncode != 0
