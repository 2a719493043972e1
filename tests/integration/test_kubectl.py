"""A stock kubectl (/usr/bin/kubectl, the version dispatcher) pointed
at shimlet-master through an ordinary kubeconfig (token auth, the master's CA)
runs exec, port-forward and cp in real runc containers; the master relays the
upgraded connection to the container's shim.

Paths: the master's /version picks the client. v1.32.4 -> kubectl v1.32
(WebSocket first: v5.channel.k8s.io exec, SPDY-in-WebSocket port-forward
tunnel); v1.27.16 -> kubectl v1.27 (SPDY only); v1.32 with
KUBECTL_REMOTE_COMMAND_WEBSOCKETS/KUBECTL_PORT_FORWARD_WEBSOCKETS=false -> SPDY."""
import concurrent.futures
import contextlib
import hashlib
import os
import pty
import random
import re
import select
import signal
import socket
import subprocess
import time
import uuid

import pytest

from containers import kill_tree
from master_env import TOKENS, MasterEnv, wait_for

KUBECTL = "/usr/bin/kubectl"
PY = "/usr/bin/python3"
PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pf_peers.py")
SPDY_ENV = {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false", "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}

# name -> (master --kube-version, extra kubectl environment)
PATHS = {
    "websocket": ("v1.32.4", {}),
    "spdy-v1.27": ("v1.27.16", {}),
    "spdy-env": ("v1.32.4", SPDY_ENV),
}


class KubeEnv:
    """A master serving one /version, a pod "kpod" (container "app") with echo
    peers on 7000 and 7001 in its network namespace, and a kubeconfig."""

    def __init__(self, version):
        if not os.access(KUBECTL, os.X_OK):
            raise AssertionError(f"{KUBECTL} missing: install kubectl (scripts/deps)")
        self.m = MasterEnv(extra_args=["--kube-version", version])
        self.version = version
        self.procs = []
        try:
            self.pod = "kpod-" + uuid.uuid4().hex[:6]
            self.c = self.m.container(self.pod)
            wait_for(lambda: self.pod in self.m.pods(), 5, "pod listed")
            self.kubeconfig = self.m.kubeconfig("kubeconfig")
            for port in (7000, 7001):
                self.peer("echo", port)
        except BaseException:
            self.cleanup()
            raise

    def peer(self, mode, port):
        err = open(self.m.path(f"peer-{port}.err"), "w")
        p = subprocess.Popen(["nsenter", f"--net=/proc/{self.c.pid}/ns/net", PY, PEERS, mode, str(port)],
                             stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        self.procs.append(p)
        line = p.stdout.readline()
        assert line.strip() == b"ready", f"peer {mode} {port} did not start: {line!r}"

    def env(self, extra=None):
        e = {k: v for k, v in os.environ.items() if not k.startswith("KUBECTL_")}
        e.update({"HOME": self.m.home, "KUBECONFIG": self.kubeconfig})
        e.update(extra or {})
        return e

    def kubectl(self, *args, env=None, timeout=120, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.run([KUBECTL, *args], env=self.env(env), timeout=timeout, **kw)

    def cleanup(self):
        for p in self.procs:
            kill_tree(p)
        self.m.cleanup()


_ENVS = {}


@pytest.fixture(scope="module")
def envs():
    yield _ENVS
    for e in _ENVS.values():
        with contextlib.suppress(Exception):
            e.cleanup()


@pytest.fixture(params=list(PATHS))
def kc(request, envs):
    """(KubeEnv, kubectl environment) for one protocol path."""
    version, extra = PATHS[request.param]
    if version not in envs:
        envs[version] = KubeEnv(version)
    return envs[version], extra


@pytest.fixture
def k132(envs):
    if "v1.32.4" not in envs:
        envs["v1.32.4"] = KubeEnv("v1.32.4")
    return envs["v1.32.4"]


def relay_lines(env, since=0):
    return [l for l in env.m.audit_lines()[since:] if l.get("relay") or l.get("via") == "relay"]


# ---------------------------------------------------------------- API subset

def test_version_discovery_and_get_pods(k132):
    p = k132.kubectl("version", "-o", "json")
    assert p.returncode == 0, p.stderr
    assert '"gitVersion": "v1.32.4"' in p.stdout.decode(), p.stdout
    p = k132.kubectl("get", "pods")
    assert p.returncode == 0, p.stderr
    assert k132.pod in p.stdout.decode(), p.stdout
    p = k132.kubectl("get", "pod", k132.pod, "-o", "jsonpath={.status.phase} {.spec.containers[0].name}")
    assert p.returncode == 0 and p.stdout == b"Running app", (p.stdout, p.stderr)
    p = k132.kubectl("api-resources", "--api-group=")
    assert p.returncode == 0 and b"pods" in p.stdout, p.stderr


# ---------------------------------------------------------------- exec

def test_exec_output_and_exit_codes(kc):
    env, extra = kc
    p = env.kubectl("exec", env.pod, "--", "sh", "-c", "echo out; echo err >&2", env=extra)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"out\n" and p.stderr == b"err\n", (p.stdout, p.stderr)
    for code in (3, 42):
        p = env.kubectl("exec", env.pod, "--", "sh", "-c", f"echo before-{code}; exit {code}", env=extra)
        assert p.returncode == code, (code, p.returncode, p.stderr)
        assert p.stdout == f"before-{code}\n".encode()
        assert f"command terminated with exit code {code}".encode() in p.stderr, p.stderr
    # -c picks the container; an unknown one is refused by the server
    p = env.kubectl("exec", env.pod, "-c", "app", "--", "echo", "named", env=extra)
    assert p.returncode == 0 and p.stdout == b"named\n", p.stderr
    p = env.kubectl("exec", env.pod, "-c", "nope", "--", "true", env=extra)
    assert p.returncode != 0 and b"nope" in p.stderr, p.stderr


def test_exec_stdin_piped(kc):
    env, extra = kc
    data = random.randbytes(3 << 20)
    p = env.kubectl("exec", "-i", env.pod, "--", "sha256sum", input=data, stdin=None, env=extra)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    p = env.kubectl("exec", "-i", env.pod, "--", "cat", input=b"line one\nline two\n", stdin=None, env=extra)
    assert p.returncode == 0 and p.stdout == b"line one\nline two\n", p.stderr


def test_exec_large_output_complete(kc):
    env, extra = kc
    p = env.kubectl("exec", env.pod, "--", "seq", "1", "2000000", env=extra, timeout=300)
    assert p.returncode == 0, p.stderr
    want = "".join(f"{i}\n" for i in range(1, 2000001)).encode()
    assert p.stdout.count(b"\n") == 2000000
    assert hashlib.sha256(p.stdout).hexdigest() == hashlib.sha256(want).hexdigest()


def test_exec_slow_reader_gets_all_output(kc):
    """kubectl's stdout read slowly (a pipe into a slow consumer): the command
    ends long before its output is read, and the relay and shim still deliver
    every byte (no deadline on a reader that keeps reading)."""
    env, extra = kc
    n = 500000  # 3.4 MB
    p = subprocess.Popen([KUBECTL, "exec", env.pod, "--", "seq", "1", str(n)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env.env(extra), start_new_session=True)
    got = bytearray()
    try:
        while True:
            b = p.stdout.read1(16384)  # ~160 KB/s
            if not b:
                break
            got += b
            time.sleep(0.1)
        err = p.stderr.read()
        p.wait(timeout=30)
    finally:
        kill_tree(p)
    want = "".join(f"{i}\n" for i in range(1, n + 1)).encode()
    assert len(got) == len(want) and hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), (len(got), err)
    assert p.returncode == 0, err


def run_in_pty(argv, env, send=b"", prompt=b"# ", timeout=60):
    """Runs argv with a pseudo-terminal as stdin/stdout/stderr (kubectl -t
    needs one); `send` is typed once `prompt` (the remote shell's) is shown."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    try:
        while send and prompt not in out and time.time() < deadline and p.poll() is None:
            if select.select([master], [], [], 0.2)[0]:
                out += os.read(master, 65536)
        if send:
            os.write(master, send)
        while time.time() < deadline:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every slave fd closed
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        p.wait(timeout=max(1, deadline - time.time()))
        return p.returncode, out
    finally:
        os.close(master)
        if p.poll() is None:
            kill_tree(p)


def test_exec_tty(kc):
    env, extra = kc
    # kubectl only allocates a tty with -i (and a terminal on its stdin)
    code, out = run_in_pty([KUBECTL, "exec", "-it", env.pod, "--", "sh", "-c", "tty; stty size; exit 5"],
                           env.env(extra))
    assert code == 5, out
    assert re.search(rb"/dev/pts/\d+", out), out
    code, out = run_in_pty([KUBECTL, "exec", "-it", env.pod, "--", "sh"], env.env(extra),
                           send=b"echo $((6*7))-from-tty; exit 4\n")
    assert code == 4, out
    assert b"42-from-tty" in out, out


# ---------------------------------------------------------------- port-forward

class PortForward:
    def __init__(self, env, extra, *ports):
        self.out = env.m.path(f"pf-{uuid.uuid4().hex[:6]}.out")
        self.err = self.out[:-4] + ".err"
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.p = subprocess.Popen([KUBECTL, "port-forward", env.pod, *ports], stdout=o, stderr=e,
                                      stdin=subprocess.DEVNULL, env=env.env(extra), start_new_session=True)
        env.procs.append(self.p)

        def ready():
            if self.p.poll() is not None:
                raise AssertionError(f"kubectl port-forward exited {self.p.returncode}: {self.stderr()}")
            return len(self.listeners()) >= len(ports)

        wait_for(ready, 30, "Forwarding from lines")

    def stdout(self):
        return open(self.out).read()

    def stderr(self):
        return open(self.err).read()

    def listeners(self):
        return re.findall(r"^Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)$", self.stdout(), re.M)

    def port(self, remote):
        for local, r in self.listeners():
            if r == str(remote):
                return int(local)
        raise AssertionError(f"no listener for {remote}: {self.stdout()}")

    def stop(self):
        kill_tree(self.p, signal.SIGINT)


def echo_roundtrip(port, size, seed):
    data = random.Random(seed).randbytes(size)
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        while len(got) < size:
            b = s.recv(65536)
            if not b:
                break
            got += b
    return hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), len(got)


def refused_conn(port):
    """A connection to a port nothing listens on in the pod: closed or reset, no data."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(b"anyone?")
            assert s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass


def test_port_forward_two_ports_concurrent(kc):
    env, extra = kc
    pf = PortForward(env, extra, ":7000", ":7001")
    try:
        ports = [pf.port(7000), pf.port(7001)]
        with concurrent.futures.ThreadPoolExecutor(32) as ex:
            futs = [ex.submit(echo_roundtrip, ports[i % 2], random.randint(1 << 10, 1 << 20), i) for i in range(64)]
            res = [f.result(timeout=300) for f in futs]
        bad = [r for r in res if not r[0]]
        assert not bad, f"{len(bad)} of {len(res)} connections corrupted: {bad[:5]}"
        assert pf.p.poll() is None, pf.stderr()
    finally:
        pf.stop()


def test_port_forward_refused_connection_keeps_session(kc):
    env, extra = kc
    pf = PortForward(env, extra, ":7000", ":7002")  # nothing listens on 7002
    try:
        good, dead = pf.port(7000), pf.port(7002)
        with socket.create_connection(("127.0.0.1", good), timeout=30) as keep:
            for i in range(3):
                refused_conn(dead)
                time.sleep(0.3)
                assert pf.p.poll() is None, f"a refused connection ended kubectl port-forward: {pf.stderr()}"
                keep.sendall(b"x%d" % i)
                assert keep.recv(10) == b"x%d" % i
        ok, n = echo_roundtrip(good, 1 << 20, 99)
        assert ok, n
        assert pf.p.poll() is None, pf.stderr()
    finally:
        pf.stop()


# ---------------------------------------------------------------- cp

def test_cp_200mb_both_ways(k132):
    env = k132
    src = env.m.path("big.bin")
    h = hashlib.sha256()
    with open(src, "wb") as f:
        rnd = random.Random(6)
        for _ in range(200):
            b = rnd.randbytes(1 << 20)
            h.update(b)
            f.write(b)
    try:
        p = env.kubectl("cp", src, f"{env.pod}:/tmp/big.bin", timeout=600)
        assert p.returncode == 0, p.stderr
        p = env.kubectl("exec", env.pod, "--", "sha256sum", "/tmp/big.bin")
        assert p.returncode == 0 and p.stdout.split()[0].decode() == h.hexdigest(), (p.stdout, p.stderr)
        back = env.m.path("back.bin")
        p = env.kubectl("cp", f"{env.pod}:/tmp/big.bin", back, timeout=600)
        assert p.returncode == 0, p.stderr
        with open(back, "rb") as f:
            got = hashlib.file_digest(f, "sha256").hexdigest()
        assert got == h.hexdigest()
    finally:
        env.kubectl("exec", env.pod, "--", "rm", "-f", "/tmp/big.bin")
        for f in (src, env.m.path("back.bin")):
            with contextlib.suppress(OSError):
                os.unlink(f)


# ---------------------------------------------------------------- authorization and audit

def test_forbidden_and_audit(kc):
    env, extra = kc
    start = len(env.m.audit_lines())
    p = env.kubectl("--token", TOKENS["dave"], "exec", env.pod, "--", "id", env=extra)
    assert p.returncode != 0
    err = p.stderr.decode()
    assert "Forbidden" in err or "forbidden" in err, err
    assert 'User "dave" cannot create resource "pods/exec"' in err, err
    p = env.kubectl("--token", TOKENS["dave"], "port-forward", env.pod, ":7000", env=extra, timeout=30)
    assert p.returncode != 0 and "forbidden" in p.stderr.decode().lower(), p.stderr
    p = env.kubectl("exec", env.pod, "--", "echo", "allowed", env=extra)
    assert p.returncode == 0 and p.stdout == b"allowed\n", p.stderr

    def settled():
        # The relay's own session_end for the allowed exec (the node's record
        # of the same session, "via": "node", may come first).
        lines = env.m.audit_lines()[start:]
        sids = {l.get("session_id") for l in lines if l["event"] == "request" and l.get("user") == "alice" and
                l.get("resource") == "pods/exec" and l["decision"] == "allow"}
        return lines if any(l["event"] == "session_end" and l.get("via") == "relay" and l.get("session_id") in sids
                            for l in lines) else None

    lines = wait_for(settled, 10, "the relay's session_end line")
    denied = [l for l in lines if l.get("user") == "dave" and l["event"] == "request"]
    assert {l["resource"] for l in denied if l["decision"] == "deny"} >= {"pods/exec", "pods/portforward"}, denied
    assert all(l["code"] == 403 for l in denied if l["decision"] == "deny")
    allowed = [l for l in lines if l["event"] == "request" and l.get("user") == "alice" and
               l.get("resource") == "pods/exec" and l["decision"] == "allow"]
    assert allowed and allowed[-1]["command"] == ["echo", "allowed"] and allowed[-1]["code"] == 101, allowed
    assert allowed[-1]["shim"]["container_id"] == env.c.id
    sid = allowed[-1]["session_id"]
    ends = [l for l in lines if l["event"] == "session_end" and l.get("session_id") == sid and l.get("via") == "relay"]
    assert ends and ends[0]["bytes_out"] > 0 and ends[0]["bytes_in"] > 0 and ends[0]["duration_ms"] >= 0, ends
    # The shim's Kubernetes front door reports the same session from the node
    # (at its next lease renewal), with what only the node knows: the exit code.
    node = wait_for(lambda: [l for l in env.m.audit_lines() if l["event"] == "session_end" and
                             l.get("session_id") == sid and l.get("via") == "node"], 20, "the node's session_end")
    assert node[0]["exit_code"] == 0 and node[0]["command"] == ["echo", "allowed"], node
    assert node[0]["user"] == "alice" and node[0]["container_id"] == env.c.id, node
    assert "Bearer" not in open(env.m.audit).read()


# ---------------------------------------------------------------- the relay alone

class FakeShim:
    """A TLS server registered as a pod's shim: records the request head and
    the bytes after it, answers the upgrade with 101 and closes after a while.
    Shows what the master's relay delivers, independent of the real shim."""

    def __init__(self, m, pod, answer, want=64):
        import ssl
        import threading
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from test_master import _cert, _name, _write_cert, _write_key
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(_name("fake-shim"), key, _name("fake-shim"), key)
        crt, kf = m.path(f"{pod}.crt"), m.path(f"{pod}.key")
        _write_cert(crt, cert)
        _write_key(kf, key)
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        self.pin = "sha256/" + __import__("base64").b64encode(hashlib.sha256(spki).digest()).decode()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(crt, kf)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer, self.want = answer, want
        self.head, self.after, self.alpn = b"", b"", None
        self.done = threading.Event()
        self.t = threading.Thread(target=self.serve, daemon=True)
        self.t.start()
        x509  # noqa: B018 (imported for the cert helpers)

    def serve(self):
        try:
            conn, _ = self.sock.accept()
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                self.alpn = s.selected_alpn_protocol()
                s.settimeout(5)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += s.recv(65536)
                self.head, rest = buf.split(b"\r\n\r\n", 1)
                if callable(self.answer):
                    s.sendall(self.answer(self.head))
                else:
                    s.sendall(self.answer)
                self.after = rest
                s.settimeout(30)
                with contextlib.suppress(OSError):
                    while not self.enough():
                        b = s.recv(65536)
                        if not b:
                            break
                        self.after += b
        finally:
            self.done.set()
            self.sock.close()

    def enough(self):
        return self.want(self.after) if callable(self.want) else len(self.after) >= self.want


def register_fake(env, pod, shim):
    import json as _json
    import ssl as _ssl
    import urllib.request as _u
    cid = "fake-" + uuid.uuid4().hex[:8]
    reg = {"id": cid, "pid": 1, "namespace": "default", "pod": pod, "container": "app",
           "endpoint": f"127.0.0.1:{shim.port}", "pin": shim.pin, "shim_pid": 1, "node": "n1"}
    req = _u.Request(f"{env.m.url}/apis/shimlet.io/v1/nodes/n1/containers/{cid}", method="PUT",
                     data=_json.dumps(reg).encode(), headers={"Authorization": "Bearer " + TOKENS["node"]})
    with _u.urlopen(req, context=_ssl.create_default_context(cafile=env.m.ca), timeout=10) as r:
        assert r.status == 201


def ws_frames(buf):
    """Client WebSocket frames (masked) -> [(opcode, payload)], stops at a partial frame."""
    out, i = [], 0
    while i + 2 <= len(buf):
        op, ln = buf[i] & 0x0F, buf[i + 1] & 0x7F
        j = i + 2
        if ln == 126:
            ln, j = int.from_bytes(buf[j:j + 2], "big"), j + 2
        elif ln == 127:
            ln, j = int.from_bytes(buf[j:j + 8], "big"), j + 8
        mask, j = buf[j:j + 4], j + 4
        if j + ln > len(buf):
            break
        out.append((op, bytes(b ^ mask[k % 4] for k, b in enumerate(buf[j:j + ln]))))
        i = j + ln
    return out


def test_relay_carries_websocket_stdin_intact(k132):
    """kubectl exec -i (WebSocket v5) with 2 MiB of stdin against a fake shim:
    every stdin byte arrives through the relay, in order, then stdin's close."""
    import base64 as _b64
    env = k132
    pod = "fakews-" + uuid.uuid4().hex[:6]
    data = random.randbytes(2 << 20)

    def answer(head):
        key = [l.split(b": ", 1)[1] for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:")][0]
        acc = _b64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + acc + b"\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n")

    def got_close(after):
        # Parsing (and unmasking) everything in Python per read is quadratic:
        # only once all of stdin can be there.
        return len(after) >= len(data) and any(op == 2 and p == b"\xff\x00" for op, p in ws_frames(after))

    shim = FakeShim(env.m, pod, answer, want=got_close)
    register_fake(env, pod, shim)
    p = subprocess.Popen([KUBECTL, "exec", "-i", pod, "--", "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env.env())
    try:
        p.stdin.write(data)
        p.stdin.close()
        assert shim.done.wait(60)
    finally:
        kill_tree(p)
    stdin = b"".join(pl[1:] for op, pl in ws_frames(shim.after) if op == 2 and pl[:1] == b"\x00")
    assert len(stdin) == len(data) and hashlib.sha256(stdin).digest() == hashlib.sha256(data).digest()


def test_relay_forwards_kubectl_bytes_unchanged(k132):
    """kubectl SPDY exec against a fake shim: the shim gets kubectl's request
    with only Authorization replaced by a ticket, over TLS with ALPN http/1.1,
    and kubectl's first SPDY frame (SYN_STREAM) byte for byte after it."""
    env = k132
    pod = "fake-" + uuid.uuid4().hex[:6]
    # Enough: kubectl's first SPDY frame, whole (8-byte header, 24-bit length).
    first_frame = lambda b: len(b) >= 8 and len(b) >= 8 + int.from_bytes(b[5:8], "big")
    shim = FakeShim(env.m, pod, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                                b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n", want=first_frame)
    register_fake(env, pod, shim)
    # The fake shim never answers the SPDY streams (kubectl would wait 30 s
    # for a SYN_REPLY): kubectl is stopped once the shim has what it needs.
    p = subprocess.Popen([KUBECTL, "exec", pod, "--", "echo", "x"], env=env.env(SPDY_ENV), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert shim.done.wait(60)
    finally:
        kill_tree(p)
    assert shim.alpn == "http/1.1"
    lines = shim.head.decode().split("\r\n")
    assert lines[0].startswith(f"POST /api/v1/namespaces/default/pods/{pod}/exec?command=echo&command=x") and \
        lines[0].endswith(" HTTP/1.1"), lines[0]
    hdr = {}
    for l in lines[1:]:
        k, v = l.split(": ", 1)
        hdr.setdefault(k.lower(), []).append(v)
    assert hdr["upgrade"] == ["SPDY/3.1"] and "v4.channel.k8s.io" in hdr["x-stream-protocol-version"], hdr
    assert len(hdr["authorization"]) == 1, hdr
    hdr = {k: v[0] for k, v in hdr.items()}
    auth = hdr["authorization"]
    assert auth.startswith("Bearer ") and auth.count(".") == 2 and TOKENS["alice"] not in shim.head.decode()
    # SPDY/3 control frame, version 3, type 1 (SYN_STREAM), stream 1
    assert shim.after[:4] == b"\x80\x03\x00\x01", shim.after[:32].hex()
    assert shim.after[8:12] == b"\x00\x00\x00\x01", shim.after[:32].hex()
