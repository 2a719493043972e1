"""Warm sessions (docs/design.md "Warm sessions"): after a first connection the
shim keeps one session process ready, set up and with the command's zygote
already placed in its cgroups; the next connection is passed to it. These
tests check that such a session behaves exactly like a cold one, that its
placement is invisible to the container and honours the ticket's limits,
and that nothing of it outlives its idle time, a forward, or the container."""
import concurrent.futures
import json
import os
import socket
import subprocess

import pytest

from containers import wait_for
from test_exec import ShimEnv, alive, shimctl
from test_isolation import KILLED_EXIT, shimlet_dirs


class WarmEnv(ShimEnv):
    def shim_pid(self, c):
        return self.registration(c.id)["shim_pid"]

    def shim_log(self, c):
        with open(os.path.join(self.state, c.id, "shim.log")) as f:
            return [json.loads(l) for l in f if l.startswith("{")]


def comm(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def kids(pid):
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/children") as f:
            out += [int(x) for x in f.read().split()]
    return [p for p in out if alive(p)]


def warm_sessions(env, c):
    out = []
    for p in kids(env.shim_pid(c)):
        try:
            if comm(p) == "shimlet-warm":
                out.append(p)
        except OSError:
            pass
    return out


def ready_warm(env, c):
    """The warm session's pid once its zygote is placed (its only child)."""
    def ready():
        w = warm_sessions(env, c)
        return w[0] if len(w) == 1 and kids(w[0]) else None

    return wait_for(ready, 15, "a warm session with its zygote")


def warmed(env):
    """A container after its first (cold) exec, its warm session ready: (container, warm pid, zygote pid)."""
    c = env.container()
    assert shimctl(env, "exec", c.id, "--", "true").returncode == 0
    w = ready_warm(env, c)
    return c, w, kids(w)[0]


def warm_dirs(c):
    return [d for d in shimlet_dirs(c, warm=True) if os.path.basename(d).startswith("shimlet-warm-")]


@pytest.fixture
def env():
    e = WarmEnv()
    try:
        yield e
    finally:
        e.cleanup()


def test_no_warm_session_before_the_first_connection(env):
    c = env.container()
    assert warm_sessions(env, c) == [] and warm_dirs(c) == []
    assert shimctl(env, "exec", c.id, "--", "true").returncode == 0
    ready_warm(env, c)


def test_second_exec_is_served_warm_and_exact(env):
    c, w, zygote = warmed(env)
    p = shimctl(env, "exec", c.id, "--", "sh", "-c", "cat /proc/self/cgroup; ls /proc/self/fd; echo err >&2; exit 42")
    assert p.returncode == 42, p
    assert p.stderr == b"err\n", p
    out = p.stdout.decode()
    assert "/shimlet-warm-" in out, out  # the warm placement's cgroup
    assert out.split("\n")[-5:] == ["0", "1", "2", "3", ""], out  # 3: ls's own directory; nothing leaked
    started = [r for r in env.shim_log(c) if r.get("msg") == "session started" and r.get("session_pid") == w]
    assert started and started[-1].get("warm") is True, started
    # Used once: its zygote and cgroup are gone, the next warm one is another process.
    wait_for(lambda: not alive(zygote), 5, "the used zygote to be gone")
    w2 = ready_warm(env, c)
    assert w2 != w
    wait_for(lambda: len(warm_dirs(c)) == len({d.split("/sys/fs/cgroup/")[1].split("/")[0] for d in warm_dirs(c)}),
             5, "only the new warm session's cgroups")


def test_warm_exec_tty_stdin_and_signal(env):
    c, _, _ = warmed(env)
    p = shimctl(env, "exec", "-i", c.id, "--", "sh", "-c", "cat; kill -9 $$", input=b"x" * 100000, stdin=None)
    assert p.returncode == 137 and p.stdout == b"x" * 100000, (p.returncode, len(p.stdout), p.stderr)
    ready_warm(env, c)
    p = shimctl(env, "exec", "-t", c.id, "--", "tty")
    assert p.returncode == 0 and p.stdout.startswith(b"/dev/pts/"), p


def test_zygote_is_invisible_in_the_container(env):
    c = env.container()
    before = c.exec("ls", "/proc").stdout.split()
    shimctl(env, "exec", c.id, "--", "true")
    w = ready_warm(env, c)
    zygote = kids(w)[0]
    # Host pid namespace: the container cannot see, signal or ptrace it.
    assert os.readlink(f"/proc/{zygote}/ns/pid") == os.readlink("/proc/self/ns/pid")
    assert os.readlink(f"/proc/{zygote}/ns/mnt") == os.readlink(f"/proc/{env.shim_pid(c)}/ns/mnt")
    assert os.readlink(f"/proc/{zygote}/ns/mnt") != os.readlink(f"/proc/{c.pid}/ns/mnt")
    inside = [x for x in c.exec("ls", "/proc").stdout.split() if x.isdigit()]
    assert len(inside) == len([x for x in before if x.isdigit()]), (before, inside)
    # It is placed: in the warm cgroup of every hierarchy the session uses.
    with open(f"/proc/{zygote}/cgroup") as f:
        assert "/shimlet-warm-" in f.read()


def test_limits_apply_to_a_warm_placement_and_misfits_place_afresh():
    e = WarmEnv(isolation={"limits": {"pids": 32}})
    try:
        c, _, _ = warmed(e)
        # Default limits: the warm placement fits; pids.max is written before the command runs.
        p = shimctl(e, "exec", c.id, "--", "sh", "-c", "b() { for i in $(seq 40); do sleep 5 & done; }; b; echo forked")
        assert p.returncode == KILLED_EXIT, p
        assert b"pids limit (32) exceeded" in p.stderr, p
        starts = [r for r in e.shim_log(c) if r.get("msg") == "exec.start" and "isolation" in r]
        assert "/shimlet-warm-" in starts[-1]["isolation"]["cgroup"], starts[-1]
        # A memory limit needs a memory cgroup the warm one lacks (v1): placed afresh, and it holds.
        ready_warm(e, c)
        hog = shimctl(e, "exec", "--limit-memory", "64M", c.id, "--", "sh", "-c",
                      "cat /proc/self/cgroup; x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived")
        assert hog.returncode == KILLED_EXIT and b"memory limit (64 MiB) exceeded" in hog.stderr, hog
        starts = [r for r in e.shim_log(c) if r.get("msg") == "exec.start" and "isolation" in r]
        if os.path.isdir("/sys/fs/cgroup/memory"):
            assert "/shimlet-warm-" not in starts[-1]["isolation"]["cgroup"], starts[-1]
            assert any(r.get("msg") == "warm session placement does not fit the ticket's limits; placing afresh"
                       for r in e.shim_log(c))
    finally:
        e.cleanup()


def test_warm_session_expires_and_leaves_nothing():
    e = WarmEnv(warm_idle_s=2)
    try:
        c, w, zygote = warmed(e)
        assert warm_dirs(c)
        wait_for(lambda: not alive(w) and not alive(zygote) and not warm_dirs(c), 10, "the idle warm session to go")
        assert warm_sessions(e, c) == []
        # The next connection is served cold, and warms again.
        assert shimctl(e, "exec", c.id, "--", "true").returncode == 0
        ready_warm(e, c)
    finally:
        e.cleanup()


def test_forward_gives_the_placement_back(env):
    c, w, zygote = warmed(env)
    # A forward to a port nobody listens on: one connection authenticates a
    # stream (refused inside), the session goes on serving the forward.
    p = subprocess.Popen(env.shimctl("port-forward", c.id, "0:1"), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline().decode()
        assert line.startswith("Forwarding from 127.0.0.1:"), line
        port = int(line.split()[2].rsplit(":", 1)[1])
        # Closed or reset: nothing listens inside. The reset may come before
        # connect() returns to us (a loaded machine): connect raises it then.
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.settimeout(10)
                assert s.recv(1) == b""
        except ConnectionResetError:
            pass

        def dropped():
            try:
                return comm(w) == "shimlet-session" and not alive(zygote)
            except OSError:
                return False

        wait_for(dropped, 10, "the forward session to drop its zygote")
        assert kids(w) == [] and p.poll() is None
        w2 = ready_warm(env, c)
        assert w2 != w
    finally:
        p.kill()
        p.wait()


def test_container_stop_with_a_warm_session_leaves_nothing(env):
    c, w, zygote = warmed(env)
    shim = env.shim_pid(c)
    c.cleanup()
    wait_for(lambda: not alive(shim) and not alive(w) and not alive(zygote), 10, "shim, warm session and zygote")


def test_disabled_by_config():
    e = WarmEnv(warm_idle_s=0)
    try:
        c = e.container()
        for _ in range(2):
            assert shimctl(e, "exec", c.id, "--", "true").returncode == 0
        assert warm_sessions(e, c) == []
        assert not any(r.get("msg") == "warm session started" for r in e.shim_log(c))
    finally:
        e.cleanup()


def served(env, c):
    return [r for r in env.shim_log(c) if r.get("msg") == "session started"]


def settled_pool(env, c):
    """The warm sessions once no local session is serving: at most two (the bounded pool), at least one."""
    def settled():
        ks = kids(env.shim_pid(c))
        names = []
        for p in ks:
            try:
                names.append(comm(p))
            except OSError:
                pass
        return names if "shimlet-session" not in names else None

    names = wait_for(settled, 15, "the served sessions to end")
    assert 1 <= names.count("shimlet-warm") <= 2, names


def test_back_to_back_execs_are_exact_and_served_warm(env):
    c, _, _ = warmed(env)
    before = len(served(env, c))
    for i in range(30):
        p = shimctl(env, "exec", c.id, "--", "sh", "-c", f"echo out{i}; echo err{i} >&2; exit {i % 7}")
        assert (p.returncode, p.stdout, p.stderr) == (i % 7, f"out{i}\n".encode(), f"err{i}\n".encode()), (i, p)
    # Each connection found a warm session (ready, or still starting and then
    # raised to normal priority): the pool is refilled at every handoff.
    took = served(env, c)[before:]
    assert len(took) == 30 and all(r.get("warm") is True for r in took), took
    # Back to back the pool grows to two, so connections find one already placed.
    assert any(r.get("ready") is True for r in took), took
    settled_pool(env, c)


def test_concurrent_clients_all_succeed_exactly(env):
    c, _, _ = warmed(env)
    clients, each = 20, 5

    def client(k):
        out = []
        for i in range(each):
            p = shimctl(env, "exec", c.id, "--", "sh", "-c", f"echo c{k}-{i}; exit {(k + i) % 5}")
            out.append((p.returncode, p.stdout, p.stderr))
        return out

    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(client, range(clients)))
    for k, got in enumerate(results):
        assert got == [((k + i) % 5, f"c{k}-{i}\n".encode(), b"") for i in range(each)], (k, got)
    settled_pool(env, c)
