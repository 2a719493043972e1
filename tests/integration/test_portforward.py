"""shimctl port-forward end to end: real runc containers hooked to shimlet-hook,
the real shim and shimlet-session, `shimctl --local`, and real peers in the
container's network namespace (pf_peers.py, busybox nc, sshd, iperf3)."""
import asyncio
import base64
import contextlib
import errno
import glob
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from containers import BIN, REPO, Container, alive, kill_tree, run, wait_for

HOOK = os.path.join(BIN, "shimlet-hook")
SHIMCTL = os.path.join(BIN, "shimctl")
PEERS = os.path.join(REPO, "tests", "integration", "pf_peers.py")
PY = "/usr/bin/python3"

sys.path.insert(0, os.path.dirname(PEERS))
from pf_peers import bulk_payload, stream_block  # noqa: E402

# 1000 forwarded connections: every process in the chain needs > 1024 fds
# (children inherit this: the hook, the shim, its sessions, the peers).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < min(_hard, 16384):
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(_hard, 16384), _hard))


def children(ppid, comm=None):
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
            name = st[st.index("(") + 1:st.rindex(")")]
            fields = st.rsplit(")", 1)[1].split()
            if int(fields[1]) == ppid and fields[0] != "Z" and (comm is None or name == comm):
                out.append(int(p))
    return out


def listening(c, port):
    """Whether something in c's network namespace listens on TCP port (v4 or v6)."""
    pat = b":%04X " % port
    for f in ("tcp", "tcp6"):
        with open(f"/proc/{c.pid}/net/{f}", "rb") as fh:
            if any(pat in line and line.split()[3] == b"0A" for line in fh.read().splitlines()[1:]):
                return True
    return False


def free_port():
    """A TCP port free on both loopbacks right now (the kernel's pick)."""
    for _ in range(20):
        with socket.socket() as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6) as s6:
                    s6.bind(("::1", port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue  # taken on ::1: another pick
            return port
    raise AssertionError("no TCP port free on both 127.0.0.1 and ::1")


def pss_kb(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError(f"no Pss for {pid}")


class PfEnv:
    """A private hook config + state dir; containers, netns peers and forwards
    started through it are all cleaned up by cleanup()."""

    def __init__(self, **hook_config):
        for b in (HOOK, SHIMCTL, os.path.join(BIN, "shimlet"), os.path.join(BIN, "shimlet-session")):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} missing: build first (scripts/build)")
        self.dir = tempfile.mkdtemp(prefix="shimlet-pfc-")
        self.state = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "hook.json")
        with open(self.config, "w") as f:
            # Tests here count a shim's session processes: no warm spare
            # (a forward through a warm session is in test_warm.py).
            json.dump({"state_dir": self.state, "fail_container_on_error": True, "warm_idle_s": 0, **hook_config}, f)
        self.containers, self.procs = [], []

    def hooks(self):
        entry = lambda stage: [{"path": HOOK, "args": ["shimlet-hook", "--config", self.config, stage]}]
        return {"createRuntime": entry("createRuntime"), "poststop": entry("poststop")}

    def container(self, args=("sleep", "100000")):
        c = Container(hooks=self.hooks(), args=args)
        self.containers.append(c)
        c.start()
        wait_for(lambda: os.path.exists(os.path.join(self.state, c.id, "registration.json")), 5, "registration")
        return c

    def registration(self, cid):
        with open(os.path.join(self.state, cid, "registration.json")) as f:
            return json.load(f)

    def shimctl(self, *args, tls=False):
        """--local: the shim's root-only unix socket; tls=True: its TLS port."""
        return [SHIMCTL, "--local", *(["--tls"] if tls else []), "--state-dir", self.state, *args]

    def in_netns(self, c, *argv, ready=True, **kw):
        """Runs argv (a host binary) in c's network namespace; waits for 'ready'."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", open(os.path.join(self.dir, f"peer-{len(self.procs)}.err"), "w"))
        p = subprocess.Popen(["nsenter", f"--net=/proc/{c.pid}/ns/net", *argv], start_new_session=True, **kw)
        self.procs.append(p)
        if ready:
            line = p.stdout.readline()
            assert line.strip() == b"ready", f"peer {argv} did not start: {line!r}"
        return p

    def peer(self, c, mode, port, *extra):
        return self.in_netns(c, PY, PEERS, mode, str(port), *map(str, extra))

    def forward(self, target, *ports, addresses=None, tls=False, extra=()):
        fw = Forward(self, target, ports, addresses, tls, extra)
        self.procs.append(fw.p)
        return fw

    def session_pids(self, cid):
        return children(self.registration(cid)["shim_pid"], "shimlet-session")

    def cleanup(self):
        for p in self.procs:
            kill_tree(p)
        # Sanitizer reports of the shim and its sessions land in shim.log
        # (their stderr), which poststop removes: collect them first.
        time.sleep(0.3)
        self.sanitizer = []
        for log in glob.glob(os.path.join(self.state, "*", "shim.log")):
            with contextlib.suppress(OSError), open(log, errors="replace") as f:
                self.sanitizer += [l for l in f if "Sanitizer" in l or "runtime error:" in l]
        for c in self.containers:
            with contextlib.suppress(Exception):
                c.cleanup()
        if os.path.isdir(self.state):
            for cid in os.listdir(self.state):
                with contextlib.suppress(Exception):
                    pid = self.registration(cid)["shim_pid"]
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if self.state.encode() in f.read():
                            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class Forward:
    """A running `shimctl port-forward`; stdout/stderr go to files (never a
    pipe nobody reads)."""

    def __init__(self, env, target, ports, addresses, tls=False, extra=()):
        self.out_path = os.path.join(env.dir, f"fw-{uuid.uuid4().hex[:6]}.out")
        self.err_path = self.out_path[:-4] + ".err"
        args = ["port-forward", *extra, target, *ports]
        if addresses:
            args += ["--address", addresses]
        with open(self.out_path, "w") as o, open(self.err_path, "w") as e:
            self.p = subprocess.Popen(env.shimctl(*args, tls=tls), stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        n = len(ports)

        def ready():
            if self.p.poll() is not None:
                raise AssertionError(f"shimctl exited {self.p.returncode}: {self.stderr()}")
            return len(self.listeners()) >= n and self.listeners()

        wait_for(ready, 15, "Forwarding from lines")

    def stdout(self):
        with open(self.out_path) as f:
            return f.read()

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def listeners(self):
        return re.findall(r"^Forwarding from (\S+):(\d+) -> (\d+(?:/udp)?)$", self.stdout(), re.M)

    def port(self, remote, host="127.0.0.1"):
        for h, local, r in self.listeners():
            if r == str(remote) and h == host:
                return int(local)
        raise AssertionError(f"no listener for {remote} on {host}: {self.stdout()}")


def _env(**hook_config):
    e = PfEnv(**hook_config)
    yield e
    e.cleanup()
    assert not e.sanitizer, "".join(e.sanitizer[:20])


@pytest.fixture
def env():
    yield from _env()


# The long transfers run in a worker of their own (tests/integration/conftest.py).
BULK = pytest.mark.xdist_group("portforward-bulk")

# The shim accepts a ticket up to clock_leeway_s after its exp (default 5 s).
SHORT_LEEWAY_S = 1


@pytest.fixture
def short_leeway_env():
    yield from _env(clock_leeway_s=SHORT_LEEWAY_S)


def recv_all(s):
    chunks = []
    while True:
        b = s.recv(1 << 20)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


# ------------------------------------------------------------------ TCP


def test_forward_basic_and_listeners(env):
    c = env.container()
    env.peer(c, "echo", 7000)
    fixed = free_port()  # a LOCAL port given on the command line (never a fixed number: parallel runs)
    fw = env.forward(c.id, ":7000", f"{fixed}:7000")
    hosts = {h for h, _, _ in fw.listeners()}
    assert "127.0.0.1" in hosts  # and [::1] where the host has IPv6 loopback
    assert fw.port(7000) != fixed and any(l == str(fixed) for _, l, _ in fw.listeners())
    for port in (fw.port(7000), fixed):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"hello through the shim")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"hello through the shim"
    if "[::1]" in hosts:
        with socket.create_connection(("::1", fw.port(7000, "[::1]")), timeout=10) as s:
            s.sendall(b"v6")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"v6"
    assert "Handling connection for" in fw.stdout()
    assert fw.p.poll() is None


async def _one_conn(port, size, started, go, results, i):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    hello = b"%08d" % i
    writer.write(hello)
    await writer.drain()
    assert await reader.readexactly(8) == hello
    started.append(i)
    await go.wait()
    payload = random.randbytes(size)
    got = hashlib.sha256()

    async def send():
        for off in range(0, size, 16384):
            writer.write(payload[off:off + 16384])
            await writer.drain()
        writer.write_eof()

    async def recv():
        n = 0
        while True:
            b = await reader.read(65536)
            if not b:
                return n
            got.update(b)
            n += len(b)

    _, n = await asyncio.gather(send(), recv())
    writer.close()
    results[i] = (n == size and got.digest() == hashlib.sha256(payload).digest(), n, size)


async def _many(port, count, measure):
    started, results, go = [], {}, asyncio.Event()
    tasks = [asyncio.create_task(_one_conn(port, random.randint(8 << 10, 128 << 10), started, go, results, i))
             for i in range(count)]
    deadline = time.time() + 120
    while len(started) < count:
        done = [t for t in tasks if t.done() and t.exception()]
        if done:
            raise done[0].exception()
        assert time.time() < deadline, f"only {len(started)}/{count} connections established"
        await asyncio.sleep(0.05)
    measure()  # every connection is open end to end right now
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 300)
    return results


@BULK
def test_1000_concurrent_connections(env):
    c = env.container()
    env.peer(c, "echo", 7000)
    fw = env.forward(c.id, ":7000")
    port = fw.port(7000)
    mem = {}

    def measure():
        sessions = env.session_pids(c.id)
        assert len(sessions) == 1, sessions
        mem["session_pss_kb"] = pss_kb(sessions[0])
        mem["session_fds"] = len(os.listdir(f"/proc/{sessions[0]}/fd"))
        mem["shimctl_pss_kb"] = pss_kb(fw.p.pid)

    results = asyncio.run(_many(port, 1000, measure))
    bad = {i: r for i, r in results.items() if not r[0]}
    assert len(results) == 1000 and not bad, f"{len(bad)} connections corrupted: {list(bad.items())[:5]}"
    assert mem["session_fds"] >= 1000
    print(f"\n1000 open connections: session Pss {mem['session_pss_kb']} kB ({mem['session_fds']} fds), "
          f"shimctl Pss {mem['shimctl_pss_kb']} kB")
    # Plain: ~3-4 MB for 1000 connections. ASan's shadow memory and quarantine
    # (and a binary that grew with the Kubernetes protocols) need far more.
    limit = 128 * 1024 if os.environ.get("SHIMLET_ASAN") == "1" else 16 * 1024
    assert mem["session_pss_kb"] < limit, mem
    assert fw.p.poll() is None and "error" not in fw.stderr()


def refused_conn(port):
    """A connection the forward cannot complete: reset (possibly before our
    connect() returns) or closed, and never any data."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"anyone?")
            assert s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass


def test_port_without_listener_fails_cleanly_other_port_works(env):
    c = env.container()
    env.peer(c, "echo", 7000)
    fw = env.forward(c.id, ":7000", ":7001")  # nothing listens on 7001
    good, dead = fw.port(7000), fw.port(7001)
    for i in range(20):
        refused_conn(dead)
        msg = b"still fine %d" % i
        with socket.create_connection(("127.0.0.1", good), timeout=10) as s:
            s.sendall(msg)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == msg
    # A long-lived connection on the good port survives the failures around it.
    with socket.create_connection(("127.0.0.1", good), timeout=10) as keep:
        for i in range(5):
            refused_conn(dead)
            keep.sendall(b"x%d" % i)
            assert keep.recv(10) == b"x%d" % i
    err = fw.stderr()
    assert err.count("error: forwarding to port 7001: cannot connect to port 7001 in the container") >= 25, err
    assert "7000" not in err
    assert fw.p.poll() is None


def test_half_close_busybox_wc(env):
    # A real busybox peer: wc counts until EOF (our half-close), answers, exits.
    c = env.container(args=("sh", "-c", "nc -ll -p 7100 -e wc -c"))
    fw = env.forward(c.id, ":7100")
    wait_for(lambda: listening(c, 7100), 5, "busybox nc listening")
    data = os.urandom(300000)
    with socket.create_connection(("127.0.0.1", fw.port(7100)), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # -> END_STREAM -> shutdown(SHUT_WR) in the container
        assert recv_all(s).strip() == str(len(data)).encode()


def test_half_close_from_container_side(env):
    # The container's side ends first (1 MiB, then SHUT_WR) and keeps reading.
    c = env.container()
    out = os.path.join(env.dir, "halfclose.txt")
    env.peer(c, "halfclose", 7200, out)
    fw = env.forward(c.id, ":7200")
    with socket.create_connection(("127.0.0.1", fw.port(7200)), timeout=10) as s:
        got = recv_all(s)  # EOF arrives while our direction is still open
        assert got == stream_block(0)
        tail = os.urandom(2 << 20)
        s.sendall(tail)
        s.shutdown(socket.SHUT_WR)
        wait_for(lambda: os.path.exists(out) and open(out).read().strip(), 10, "peer result")
    assert open(out).read().split() == [str(len(tail)), hashlib.sha256(tail).hexdigest()]


def test_local_reset_reaches_the_container_as_reset(env):
    # A local client that aborts its upload (RST) must not look, in the
    # container, like one that finished it (FIN): the sink would take the
    # truncated bytes for the whole upload.
    c = env.container()
    out = os.path.join(env.dir, "sink.txt")
    env.peer(c, "sink", 7300, out)
    fw = env.forward(c.id, ":7300")
    s = socket.create_connection(("127.0.0.1", fw.port(7300)), timeout=10)
    s.sendall(stream_block(0))
    time.sleep(0.5)  # the bytes reach the container before the reset
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    wait_for(lambda: os.path.exists(out) and open(out).read().strip(), 10, "sink result")
    assert "ConnectionResetError" in open(out).read()
    assert fw.p.poll() is None


def _upload(port, total):
    h = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        i = sent = 0
        while sent < total:
            b = stream_block(i)[: total - sent]
            s.sendall(b)
            h.update(b)
            sent += len(b)
            i += 1
        s.shutdown(socket.SHUT_WR)
        recv_all(s)
    return h.hexdigest()


def _download(port, total):
    h = hashlib.sha256()
    n = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
    return n, h.hexdigest()


def _expected_sha(total):
    h = hashlib.sha256()
    i = sent = 0
    while sent < total:
        b = stream_block(i)[: total - sent]
        h.update(b)
        sent += len(b)
        i += 1
    return h.hexdigest()


# Over both transports of --local: the local socket (default) and the TLS port.
@BULK
@pytest.mark.parametrize("tls", [False, True], ids=["unix", "tls"])
def test_transfer_256m_both_ways(env, tls):
    _transfer(env, 256 << 20, tls)


@BULK
@pytest.mark.slow
def test_transfer_4g_both_ways(env):
    _transfer(env, 4 << 30)


def _transfer(env, total, tls=False):
    c = env.container()
    out = os.path.join(env.dir, "sink.txt")
    env.peer(c, "sink", 7300, out)
    env.peer(c, "source", 7301, total)
    fw = env.forward(c.id, ":7300", ":7301", tls=tls)
    t0 = time.time()
    sha = _upload(fw.port(7300), total)
    wait_for(lambda: os.path.exists(out) and open(out).read().strip(), 30, "sink result")
    up = time.time() - t0
    assert open(out).read().split() == [str(total), sha]
    t0 = time.time()
    n, dsha = _download(fw.port(7301), total)
    down = time.time() - t0
    assert n == total and dsha == _expected_sha(total)
    print(f"\n{total >> 20} MiB: up {total / up / 1e6:.0f} MB/s, down {total / down / 1e6:.0f} MB/s")
    assert fw.p.poll() is None and "error" not in fw.stderr()


def test_client_killed_mid_transfer(env):
    c = env.container()
    out = os.path.join(env.dir, "sink.txt")
    env.peer(c, "sink", 7300, out)
    fw = env.forward(c.id, ":7300")
    wait_for(lambda: env.session_pids(c.id), 5, "session")
    session = env.session_pids(c.id)[0]
    stop = threading.Event()
    sent = [0]

    def pump():
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", fw.port(7300)), timeout=30) as s:
                blk = stream_block(1)
                while not stop.is_set():
                    s.sendall(blk)
                    sent[0] += len(blk)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    wait_for(lambda: sent[0] >= 8 << 20, 30, "bytes flowing through the forward")  # mid transfer
    os.kill(fw.p.pid, signal.SIGKILL)
    fw.p.wait()
    wait_for(lambda: not alive(session), 10, "session exit after the client died")
    # The forwarded connection in the container ends too (no leak).
    wait_for(lambda: os.path.exists(out) and open(out).read().strip(), 10, "container side closed")
    # ... as a reset: the container's peer must not take the cut upload for a whole one.
    assert "ConnectionResetError" in open(out).read()
    stop.set()
    t.join(10)
    shim = env.registration(c.id)["shim_pid"]
    assert alive(shim)
    # The shim serves the next client as before.
    env.peer(c, "echo", 7000)
    fw2 = env.forward(c.id, ":7000")
    with socket.create_connection(("127.0.0.1", fw2.port(7000)), timeout=10) as s:
        s.sendall(b"again")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"again"


def test_container_stopped_mid_transfer(env):
    c = env.container()
    env.peer(c, "source", 7301, 1 << 40)  # effectively endless
    fw = env.forward(c.id, ":7301")
    s = socket.create_connection(("127.0.0.1", fw.port(7301)), timeout=30)
    assert len(s.recv(65536)) > 0
    c.runc("kill", c.id, "KILL", check=False)
    rc = fw.p.wait(timeout=15)
    assert rc == 255  # shimctl's own error, like every port-forward failure
    err = fw.stderr()
    assert "error: lost connection to the shim" in err, err
    # The local connection ended too (reset or EOF), not left hanging.
    s.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        while s.recv(1 << 20):
            pass
    s.close()


def test_idle_forward_stays_up_and_quits_cleanly(short_leeway_env):
    env = short_leeway_env
    c = env.container()
    env.peer(c, "echo", 7000)
    lifetime = 5  # long enough for shimctl to present it on a loaded machine
    minted = time.time()
    fw = env.forward(c.id, ":7000", extra=("--ping-interval", "1", "--ticket-lifetime", str(lifetime)))
    with socket.create_connection(("127.0.0.1", fw.port(7000)), timeout=10) as s:
        # Idle past keepalive PINGs (every 1 s here, 30 s by default) and past
        # the ticket's exp plus the shim's leeway, when the ticket would no
        # longer verify: the connection stays up and new streams are accepted.
        time.sleep(max(0.0, minted + lifetime + SHORT_LEEWAY_S + 1.5 - time.time()))
        s.sendall(b"after idle")
        assert s.recv(100) == b"after idle"
    with socket.create_connection(("127.0.0.1", fw.port(7000)), timeout=10) as s:
        s.sendall(b"new stream after exp")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"new stream after exp"
    session = env.session_pids(c.id)[0]
    fw.p.send_signal(signal.SIGINT)
    assert fw.p.wait(timeout=5) == 0
    wait_for(lambda: not alive(session), 5, "session exit")


# ------------------------------------------------------------------ UDP


def test_udp_dns_like_and_bulk_from_several_clients(env):
    c = env.container()
    env.peer(c, "udp", 5353)
    fw = env.forward(c.id, ":5353/udp")
    port = fw.port("5353/udp")
    errors = []

    def dns_client(k):
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            for q in range(100):
                payload = os.urandom(random.randint(0, 1200))
                s.sendto(b"Q%d-%d:" % (k, q) + payload, ("127.0.0.1", port))
                # Retransmit like a resolver on loss (UDP); every answer must match its query.
                data = None
                for _ in range(5):
                    try:
                        data, _ = s.recvfrom(65536)
                        break
                    except socket.timeout:
                        s.sendto(b"Q%d-%d:" % (k, q) + payload, ("127.0.0.1", port))
                assert data == b"R%d-%d:" % (k, q) + hashlib.sha256(payload).hexdigest().encode(), (k, q, data[:40])
            s.close()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def bulk_client(seed):
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.settimeout(5)
            n = 3000
            s.sendto(b"BULK %d %d" % (n, seed), ("127.0.0.1", port))
            seqs = []
            while True:
                try:
                    data, _ = s.recvfrom(65536)
                except socket.timeout:
                    break  # END itself may be lost: UDP
                if data == b"END":
                    break
                seq = int(data.split(b":", 1)[0])
                assert data == bulk_payload(seq, seed), f"datagram {seq} damaged"
                seqs.append(seq)
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert len(seqs) >= n * 0.95, f"only {len(seqs)}/{n} datagrams"
            s.close()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=dns_client, args=(k,)) for k in range(6)]
    threads += [threading.Thread(target=bulk_client, args=(seed,)) for seed in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # One big datagram keeps its boundary.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"BIG 60000", ("127.0.0.1", port))
    data, _ = s.recvfrom(65536)
    assert data == hashlib.sha256(b"big").digest() * (60000 // 32)
    assert fw.p.poll() is None and "error" not in fw.stderr()


def test_udp_many_short_lived_peers(env):
    # Like a resolver that takes a fresh source port for every query: more
    # peers in a minute than the client keeps flows for. Each new peer must
    # still get its answer (the longest idle flow gives way), not silence
    # until an old flow expires.
    c = env.container()
    env.peer(c, "udp", 5353)
    fw = env.forward(c.id, ":5353/udp")
    port = fw.port("5353/udp")
    for q in range(400):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            query = b"Q%d:x" % q
            data = None
            for _ in range(3):  # UDP: a lost datagram is retried, as a resolver would
                s.sendto(query, ("127.0.0.1", port))
                try:
                    data, _ = s.recvfrom(65536)
                    break
                except socket.timeout:
                    pass
            assert data == b"R%d:" % q + hashlib.sha256(b"x").hexdigest().encode(), (q, data)
    assert fw.p.poll() is None


# ------------------------------------------------------------------ --stdio


def test_stdio_like_nc(env):
    c = env.container(args=("sh", "-c", "nc -ll -p 7100 -e wc -c"))
    wait_for(lambda: listening(c, 7100), 5, "busybox nc listening")
    data = os.urandom(1 << 20)
    log = os.path.join(env.state, c.id, "shim.log")
    earlier = set()  # the previous run's session may log its last line after this run starts
    for tls in (False, True):
        start = os.path.getsize(log)
        p = run(env.shimctl("port-forward", c.id, "--stdio", "7100", tls=tls), input=data, check=False, timeout=30)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == str(len(data)).encode()
        # The audit names the transport: unix:pid=P,uid=0 or 127.0.0.1:PORT.
        with open(log, "rb") as f:
            f.seek(start)
            peers = {json.loads(l).get("peer") for l in f.read().splitlines() if l.startswith(b"{")} - {None}
        want = "127.0.0.1:" if tls else "unix:pid="
        assert peers - earlier and all(x.startswith(want) for x in peers - earlier), (tls, peers, earlier)
        earlier |= peers
    # Nothing listening: a clear error and a non-zero exit.
    p = run(env.shimctl("port-forward", c.id, "--stdio", "7999"), input=b"x", check=False, timeout=30)
    assert p.returncode == 255
    assert b"error: forwarding to port 7999: cannot connect to port 7999 in the container" in p.stderr


def test_stdio_carries_ssh(env):
    for b in ("/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen"):
        assert os.access(b, os.X_OK), f"{b} missing: install openssh-server/openssh-client (scripts/deps)"
    c = env.container()
    d = os.path.join(env.dir, "ssh")
    os.makedirs(d)
    os.chmod(d, 0o700)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/host"])
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/user"])
    shutil.copy(f"{d}/user.pub", f"{d}/authorized_keys")
    with open(f"{d}/sshd_config", "w") as f:
        f.write(f"ListenAddress 127.0.0.1\nPort 22\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin yes\n"
                f"PidFile {d}/sshd.pid\nStrictModes no\nLogLevel ERROR\n")
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
    env.in_netns(c, "/usr/sbin/sshd", "-D", "-e", "-f", f"{d}/sshd_config", ready=False,
                 stdout=subprocess.DEVNULL)
    wait_for(lambda: listening(c, 22), 10, "sshd listening in the netns")
    proxy = " ".join(env.shimctl("port-forward", c.id, "--stdio", "22"))
    ssh = ["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}", "-i", f"{d}/user", "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={d}/known_hosts", "root@shimlet-test"]
    p = run([*ssh, "echo ok"], check=False, timeout=60)
    assert p.returncode == 0 and p.stdout == b"ok\n", p.stderr
    # Bulk through ssh (both directions) over the same kind of forward.
    blob = os.urandom(8 << 20)
    p = run([*ssh, "sha256sum"], input=blob, check=False, timeout=120)
    assert p.returncode == 0 and p.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest(), p.stderr


# ------------------------------------------------------------------ bad input

class RawH2:
    """Just enough HTTP/2 to send what shimctl never would (raw frames over TLS
    with a client certificate); responses are read as frames, bodies as bytes."""

    def __init__(self, endpoint, cert, key):
        host, port = endpoint.rsplit(":", 1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(["h2"])
        ctx.load_cert_chain(cert, key)
        self.s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10))
        self.buf = b""
        self.s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + self.frame(4, 0, 0))

    @staticmethod
    def frame(ftype, flags, stream, payload=b""):
        return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload

    @staticmethod
    def _int(v, prefix):
        m = (1 << prefix) - 1
        if v < m:
            return bytes([v])
        out = [m]
        v -= m
        while v >= 128:
            out.append((v & 127) | 128)
            v >>= 7
        return bytes(out + [v])

    def headers(self, stream, path, ticket, end_stream=False):
        block = b""
        for k, v in ((":method", "POST"), (":scheme", "https"), (":authority", "x"), (":path", path),
                     ("authorization", "Bearer " + ticket)):
            block += b"\x00" + self._int(len(k), 7) + k.encode() + self._int(len(v), 7) + v.encode()
        return self.frame(1, 0x4 | (0x1 if end_stream else 0), stream, block)

    def send(self, data):
        self.s.sendall(data)

    def frames(self, timeout=5):
        """Frames until the connection closes or `timeout` passes without any."""
        self.s.settimeout(timeout)
        while True:
            while len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + n:
                    break
                f = (self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF, self.buf[9:9 + n])
                self.buf = self.buf[9 + n:]
                if f[0] == 4 and not f[1] & 1:
                    self.send(self.frame(4, 1, 0))  # SETTINGS ACK
                yield f
            try:
                b = self.s.recv(65536)
            except (socket.timeout, ssl.SSLError, OSError):
                return
            if not b:
                return
            self.buf += b


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def mint(env, cid, ports, client_key):
    """A ticket as shimctl --local would mint it, with ports of our choosing."""
    spki = run(["openssl", "pkey", "-in", client_key, "-pubout", "-outform", "DER"]).stdout
    now = int(time.time())
    claims = {"iss": "local", "sub": "test", "aud": cid, "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex,
              "verb": "portforward", "ports": [{"port": p, "proto": "tcp"} for p in ports],
              "cnf": {"jkt": b64u(hashlib.sha256(spki).digest())}}
    head = {"alg": "EdDSA", "typ": "shimlet-ticket+jwt", "kid": "local"}
    signing = (b64u(json.dumps(head).encode()) + "." + b64u(json.dumps(claims).encode())).encode()
    msg = os.path.join(env.dir, "msg")
    with open(msg, "wb") as f:
        f.write(signing)
    sig = run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", os.path.join(env.state, "local.key"),
               "-in", msg]).stdout
    return signing.decode() + "." + b64u(sig)


def client_cert(env):
    key, cert = os.path.join(env.dir, "client.key"), os.path.join(env.dir, "client.crt")
    run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key])
    run(["openssl", "req", "-x509", "-new", "-key", key, "-subj", "/CN=test", "-days", "1", "-out", cert])
    return cert, key


def test_bad_input_refused_and_shim_unharmed(env):
    c = env.container()
    env.peer(c, "echo", 7000)
    reg = env.registration(c.id)
    cert, key = client_cert(env)

    # A ticket for port 7000 used for 7001: refused on that stream, with a clear error.
    h = RawH2(reg["endpoint"], cert, key)
    t = mint(env, c.id, [7000], key)
    h.send(h.headers(1, "/v1/portforward", t, end_stream=True) + h.headers(3, "/v1/portforward/7001", t))
    body = b""
    for ftype, flags, sid, payload in h.frames(3):
        if ftype == 0 and sid == 3:
            body += payload
            if flags & 1:
                break
    assert b"ticket does not allow port 7001/tcp" in body, body

    # Too many streams at once on that connection (the shim allows 1024):
    # the excess is refused; the rest are served. (Requests stay open, so the
    # streams stay open too.)
    burst = b"".join(h.headers(5 + 2 * i, "/v1/portforward/7000", t) for i in range(1100))
    h.send(burst)
    resets, goaway, answered = {}, None, set()
    for ftype, flags, sid, payload in h.frames(5):
        if ftype == 3:
            resets[sid] = int.from_bytes(payload, "big")
        elif ftype == 7:
            goaway = (int.from_bytes(payload[4:8], "big"), payload[8:])
            break
        elif ftype == 1:
            answered.add(sid)
    refused = [sid for sid, code in resets.items() if code in (1, 7)]  # PROTOCOL_ERROR / REFUSED_STREAM
    if goaway:
        # nghttp2 treats the violation as a connection error: GOAWAY
        # PROTOCOL_ERROR naming the cause, after serving the streams in bounds.
        assert goaway[0] == 1 and b"max concurrent streams exceeded" in goaway[1], goaway
        assert len(answered) >= 900, len(answered)
    else:
        assert refused and len(answered) >= 1000, (len(answered), len(resets))

    # A replayed ticket on a new connection: refused.
    h2 = RawH2(reg["endpoint"], cert, key)
    h2.send(h2.headers(1, "/v1/portforward", t, end_stream=True))
    body = b"".join(p for ft, _, sid, p in h2.frames(3) if ft == 0 and sid == 1)
    assert b"replay" in body, body

    # Malformed frames: a DATA frame on stream 0, then garbage. The session
    # answers GOAWAY (PROTOCOL_ERROR) and ends; nothing else is harmed.
    for junk in (RawH2.frame(0, 0, 0, b"xx"), os.urandom(4096), RawH2.frame(1, 0x4, 2, b"\xff" * 50)):
        h3 = RawH2(reg["endpoint"], cert, key)
        h3.send(junk)
        kinds = [f[0] for f in h3.frames(3)]
        assert 7 in kinds or not kinds, kinds  # GOAWAY, or the connection was dropped

    shim = reg["shim_pid"]
    assert alive(shim)
    wait_for(lambda: len(env.session_pids(c.id)) <= 2, 10, "bad sessions to end")
    fw = env.forward(c.id, ":7000")
    with socket.create_connection(("127.0.0.1", fw.port(7000)), timeout=10) as s:
        s.sendall(b"unharmed")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"unharmed"


def test_unknown_target_and_bad_pin(env):
    c = env.container()
    p = run(env.shimctl("port-forward", "no-such-thing", "80"), check=False, timeout=20)
    assert p.returncode == 255 and b"no container matches 'no-such-thing'" in p.stderr
    # A registration whose pin does not match the shim: refused before anything listens.
    regp = os.path.join(env.state, c.id, "registration.json")
    reg = json.load(open(regp))
    reg["pin"] = "sha256/" + base64.b64encode(b"\0" * 32).decode()
    with open(regp, "w") as f:
        json.dump(reg, f)
    # The pin guards the TLS port (the local socket is reached by path).
    p = run(env.shimctl("port-forward", c.id, ":80", tls=True), check=False, timeout=20)
    assert p.returncode == 255 and b"Forwarding from" not in p.stdout, p
    assert b"pin" in p.stderr.lower(), p.stderr


def test_own_errors_exit_255(env):
    # README: shimctl's own errors print one line and exit 255. A valid IP
    # that is not local cannot be listened on; nor can a port already taken.
    c = env.container()
    p = run(env.shimctl("port-forward", "--address", "8.8.8.8", c.id, "18080:80"), check=False, timeout=20)
    assert p.returncode == 255, p
    assert p.stderr.decode().splitlines() == [
        "error: unable to listen on 8.8.8.8 port 18080: Cannot assign requested address"], p.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = run(env.shimctl("port-forward", "--address", "127.0.0.1", c.id, f"{port}:80"), check=False, timeout=20)
        assert p.returncode == 255 and b"Address already in use" in p.stderr, p
    # Usage errors too.
    p = run(env.shimctl("port-forward", c.id, "99999"), check=False, timeout=20)
    assert p.returncode == 255 and b"REMOTE must be a port number" in p.stderr, p


# ------------------------------------------------------------------ measurements


@BULK
@pytest.mark.slow
def test_throughput_iperf3_vs_socat_vs_direct(env):
    for b in ("/usr/bin/iperf3", "/usr/bin/socat"):
        assert os.access(b, os.X_OK), f"{b} missing"
    c = env.container()

    def iperf(*argv):
        # A one-off server per run: a lasting one may still be ending the previous
        # test when the next client comes, and then refuses it ("busy").
        srv = env.in_netns(c, "iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", "5201", ready=False,
                           stdout=subprocess.DEVNULL)
        wait_for(lambda: listening(c, 5201), 10, "iperf3 listening")
        p = run([*argv, "-t", "5", "-J"], timeout=60)
        j = json.loads(p.stdout)
        assert "error" not in j, (argv, j["error"])
        assert srv.wait(30) == 0
        return j["end"]["sum_received"]["bits_per_second"] / 8e6

    direct = iperf("nsenter", f"--net=/proc/{c.pid}/ns/net", "iperf3", "-c", "127.0.0.1", "-p", "5201")
    fw = env.forward(c.id, ":5201")
    shim = iperf("iperf3", "-c", "127.0.0.1", "-p", str(fw.port(5201)))
    shim_rev = iperf("iperf3", "-R", "-c", "127.0.0.1", "-p", str(fw.port(5201)))
    # The docker-shim/kubelet way: socat on the host, nsenter + socat into the netns.
    sport = 20000 + os.getpid() % 10000
    socat = subprocess.Popen(["socat", f"TCP-LISTEN:{sport},bind=127.0.0.1,reuseaddr,fork",
                              f"EXEC:nsenter --net=/proc/{c.pid}/ns/net socat STDIO TCP\\:127.0.0.1\\:5201"],
                             start_new_session=True)
    env.procs.append(socat)
    wait_for(lambda: subprocess.run(["ss", "-ltn", f"sport = :{sport}"], capture_output=True).stdout.count(b"\n") > 1,
             5, "socat listening")
    relay = iperf("iperf3", "-c", "127.0.0.1", "-p", str(sport))
    print(f"\niperf3 single stream, MB/s: direct {direct:.0f}, shimctl forward {shim:.0f} "
          f"(reverse {shim_rev:.0f}), socat relay {relay:.0f}")
    assert shim > 50, shim


# ------------------------------------------------------------------ first bytes


HTTPD_SH = ("mkdir -p /www && echo first-bytes-ok > /www/index.html && "
            "exec httpd -f -p 127.0.0.1:8080 -h /www")


def _http_get_at_once(port):
    """Connect and send the request with no pause (as curl does); the full
    answer, or what went wrong (a lost request shows as a timeout: busybox
    httpd waits 60 s for a request before its 408)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
            return recv_all(s)
    except OSError as e:
        return repr(e).encode()


def test_first_bytes_reach_the_container_stress(env):
    # Regression: a request sent right after connecting was sometimes lost on
    # the way into the container (httpd saw a connection, no request: 408/EOF).
    c = env.container(args=("sh", "-c", HTTPD_SH))
    wait_for(lambda: listening(c, 8080), 5, "busybox httpd listening")
    fw = env.forward(c.id, ":8080")
    port = fw.port(8080)
    bad = []
    for i in range(200):
        answer = _http_get_at_once(port)
        if not (answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0]
                and answer.endswith(b"first-bytes-ok\n")):
            bad.append((i, answer[:120]))
    assert not bad, f"{len(bad)}/200 requests lost or mangled: {bad[:5]}"
    # Many at once too: each connection's first bytes go out in the same
    # HTTP/2 read as other streams' HEADERS.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(32) as ex:
        answers = list(ex.map(lambda _: _http_get_at_once(port), range(200)))
    bad = [a[:120] for a in answers if not a.endswith(b"first-bytes-ok\n")]
    assert not bad, f"{len(bad)}/200 concurrent requests lost: {bad[:5]}"
    assert fw.p.poll() is None and "error" not in fw.stderr(), fw.stderr()


def test_first_bytes_stdio_piped_stress(env):
    # --stdio with the request already waiting on stdin (and EOF right after).
    c = env.container(args=("sh", "-c", HTTPD_SH))
    wait_for(lambda: listening(c, 8080), 5, "busybox httpd listening")
    bad = []
    for i in range(60):
        p = run(env.shimctl("port-forward", c.id, "--stdio", "8080"),
                input=b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n", check=False, timeout=30)
        if p.returncode != 0 or b" 200 " not in p.stdout.split(b"\r\n")[0] or \
                not p.stdout.endswith(b"first-bytes-ok\n"):
            bad.append((i, p.returncode, p.stdout[:120], p.stderr[-200:]))
    assert not bad, f"{len(bad)}/60 --stdio requests lost: {bad[:5]}"


def test_first_bytes_on_a_fresh_forward(env):
    # The first connection of a new `shimctl port-forward`, made the moment it
    # prints its "Forwarding from" line (as scripts and the master tests do).
    c = env.container(args=("sh", "-c", HTTPD_SH))
    wait_for(lambda: listening(c, 8080), 5, "busybox httpd listening")
    bad = []
    for i in range(40):
        fw = env.forward(c.id, ":8080")
        answer = _http_get_at_once(fw.port(8080))
        if not answer.endswith(b"first-bytes-ok\n"):
            bad.append((i, answer[:120], fw.stderr()[-200:]))
        kill_tree(fw.p)
        env.procs.remove(fw.p)
    assert not bad, f"{len(bad)}/40 first requests lost: {bad[:5]}"


def test_first_bytes_parallel_fresh_stdio(env):
    # Many `shimctl port-forward --stdio` at once, each with its request already
    # piped in: new TLS connections, sessions and container sockets racing.
    c = env.container(args=("sh", "-c", HTTPD_SH))
    wait_for(lambda: listening(c, 8080), 5, "busybox httpd listening")
    from concurrent.futures import ThreadPoolExecutor

    def one(_):
        return run(env.shimctl("port-forward", c.id, "--stdio", "8080"),
                   input=b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n", check=False, timeout=60)

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(96)))
    bad = [(p.returncode, p.stdout[:120], p.stderr[-200:]) for p in results
           if p.returncode != 0 or not p.stdout.endswith(b"first-bytes-ok\n")]
    assert not bad, f"{len(bad)}/96 parallel --stdio requests lost: {bad[:5]}"
