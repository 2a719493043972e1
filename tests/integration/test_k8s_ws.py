"""Kubernetes streaming on the shim (docs/design.md "Kubernetes streaming"):
the HTTP/1.1 front door of shimlet-session with exec over WebSocket
(v5.channel.k8s.io / v4.channel.k8s.io), on both URL shapes: the Kubernetes
API path with `Authorization: Bearer <ticket>` (what the master relays) and
the CRI streaming-server path /exec/<ticket>. Real runc containers, the real
hook, shim and session; tickets minted with the state dir's local.key by
`shimlet-probe --mint-only`. The WebSocket client is written here (stdlib
ssl + socket, RFC 6455 framing) so the test controls every byte."""
import base64
import contextlib
import hashlib
import json
import os
import random
import socket
import ssl
import struct
import subprocess
import time
import urllib.parse

import pytest

from containers import BIN
from test_exec import alive, env, pids_with_cmdline, seq_bytes, wait_for  # noqa: F401 (env: the fixture)

PROBE = os.path.join(BIN, "shimlet-probe")
SEQ_N = 2000000
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# The names kube_path() uses: the shim refuses a request naming another
# namespace/pod/container (as the API server and kubelet do).
NAMES = {"io.kubernetes.pod.namespace": "default", "io.kubernetes.pod.name": "p",
         "io.kubernetes.container.name": "c"}


@pytest.fixture(scope="module")
def ctr(env):
    return env.container(annotations=NAMES)


def mint(env, ctr, cmd=("echo", "ok"), stdin=False, tty=False, verb="exec", **kw):
    if not os.access(PROBE, os.X_OK):
        raise AssertionError(f"{PROBE} missing: build first (scripts/build)")
    c = {"iss": "local", "sub": "k8s-ws-test", "aud": ctr.id, "verb": verb}
    if verb == "exec":
        c.update({"cmd": list(cmd), "stdin": stdin, "tty": tty})
    c.update(kw)
    p = subprocess.run([PROBE, "--mint-only", "--state-dir", env.state, "--claims", json.dumps(c)],
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["ticket"]


def kube_path(cmd, stdin=False, tty=False, stderr=None, stdout=True, container="c", ns="default", pod="p"):
    q = [("command", a) for a in cmd] + [("stdout", "true" if stdout else "false")]
    if stdin:
        q.append(("stdin", "true"))
    if tty:
        q.append(("tty", "true"))
    if stderr if stderr is not None else not tty:
        q.append(("stderr", "true"))
    if container is not None:
        q.append(("container", container))
    return f"/api/v1/namespaces/{ns}/pods/{pod}/exec?" + urllib.parse.urlencode(q)


class Conn:
    """One TLS connection to the shim speaking HTTP/1.1 (no ALPN, like kubectl)."""

    def __init__(self, env, ctr, alpn=None, timeout=30):
        host, port = env.registration(ctr.id)["endpoint"].rsplit(":", 1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the shim's pin is checked below instead
        if alpn:
            ctx.set_alpn_protocols(alpn)
        raw = socket.create_connection((host, int(port)), timeout=timeout)
        self.s = ctx.wrap_socket(raw)
        der = self.s.getpeercert(binary_form=True)
        assert der, "shim presented no certificate"
        self.buf = b""
        self.closed = False

    def send(self, b):
        self.s.sendall(b)

    def recv_some(self):
        d = self.s.recv(1 << 20)
        if not d:
            self.closed = True
        self.buf += d
        return d

    def read_exact(self, n):
        while len(self.buf) < n:
            if not self.recv_some():
                raise EOFError(f"connection closed; wanted {n} bytes, have {len(self.buf)}")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self):
        while b"\r\n\r\n" not in self.buf:
            if not self.recv_some():
                raise EOFError(f"connection closed before a response head: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for l in lines[1:]:
            k, v = l.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        return status, headers

    def read_response(self):
        """A non-101 response: status, headers, body (Content-Length)."""
        status, headers = self.read_head()
        body = self.read_exact(int(headers.get("content-length", "0")))
        return status, headers, body

    def close(self):
        with contextlib.suppress(OSError):
            self.s.close()


def ws_request(path, protocols=("v5.channel.k8s.io",), ticket=None, key=None, extra=()):
    key = key or base64.b64encode(os.urandom(16)).decode()
    h = [f"GET {path} HTTP/1.1", "Host: shim", "Upgrade: websocket", "Connection: Upgrade",
         f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if protocols:
        h.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    if ticket:
        h.append(f"Authorization: Bearer {ticket}")
    h.extend(extra)
    return ("\r\n".join(h) + "\r\n\r\n").encode(), key


class WS:
    """A minimal RFC 6455 client over Conn (masked frames, pings answered)."""

    def __init__(self, conn):
        self.c = conn
        self.close_code = None

    def send_frame(self, opcode, payload, fin=True):
        b0 = (0x80 if fin else 0) | opcode
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", b0, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", b0, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", b0, 0x80 | 127, n)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload, mask)
        self.c.send(hdr + mask + body)

    def send_channel(self, ch, data=b""):
        self.send_frame(0x2, bytes([ch]) + data)

    def recv_frame(self):
        b0, b1 = self.c.read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.c.read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.c.read_exact(8))[0]
        assert not b1 & 0x80, "server frames must not be masked"
        return b0 & 0x80, b0 & 0x0F, self.c.read_exact(n)

    def recv_message(self):
        """Next data message (opcode, payload); answers pings; None after Close."""
        parts, op0 = [], None
        while True:
            fin, op, payload = self.recv_frame()
            if op == 0x9:
                self.send_frame(0xA, payload)
                continue
            if op == 0xA:
                continue
            if op == 0x8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                with contextlib.suppress(OSError):
                    self.send_frame(0x8, payload[:2])
                return None
            if op != 0:
                op0 = op
            parts.append(payload)
            if fin:
                return op0, b"".join(parts)


def _mask_fast(payload, mask):
    # XOR with a repeated 4-byte mask, via int arithmetic (fast enough for MiB payloads).
    n = len(payload)
    m = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")


def ws_open(env, ctr, path, protocols=("v5.channel.k8s.io",), ticket=None, alpn=None):
    c = Conn(env, ctr, alpn=alpn)
    req, key = ws_request(path, protocols, ticket)
    c.send(req)
    status, headers = c.read_head()
    if status != 101:
        body = c.read_exact(int(headers.get("content-length", "0")))
        c.close()
        return status, headers, body, None
    want = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
    assert headers.get("sec-websocket-accept") == want, headers
    return status, headers, b"", WS(c)


def run_exec(ws, stdin_chunks=(), half_close=True, resize=None, until_stdout=None):
    """Drives an exec: sends stdin (then [255,0] with v5), collects channels until Close."""
    out = {1: bytearray(), 2: bytearray(), 3: bytearray()}
    for chunk in stdin_chunks:
        ws.send_channel(0, chunk)
    if resize:
        ws.send_channel(4, json.dumps({"Width": resize[0], "Height": resize[1]}).encode())
    if half_close:
        ws.send_frame(0x2, bytes([255, 0]))
    while True:
        m = ws.recv_message()
        if m is None:
            break
        op, payload = m
        assert op == 0x2, f"server sent a non-binary message {op}"
        assert payload and payload[0] in (1, 2, 3), payload[:20]
        out[payload[0]] += payload[1:]
    ws.c.close()
    status = json.loads(out[3]) if out[3] else None
    return bytes(out[1]), bytes(out[2]), status


def exit_code_of(status):
    if status["status"] == "Success":
        return 0
    assert status["reason"] == "NonZeroExitCode", status
    causes = status["details"]["causes"]
    return int(next(c["message"] for c in causes if c["reason"] == "ExitCode"))


def both_shapes(env, ctr, cmd, stdin=False, tty=False, **kw):
    """(path, ticket-in-header) for the Kubernetes API shape and the CRI shape, each with a fresh ticket."""
    t1 = mint(env, ctr, cmd, stdin=stdin, tty=tty, **kw)
    t2 = mint(env, ctr, cmd, stdin=stdin, tty=tty, **kw)
    return [(kube_path(cmd, stdin, tty), t1), (f"/exec/{t2}", None)]


class ShimLog:
    def __init__(self, env, ctr):
        self.path = os.path.join(env.state, ctr.id, "shim.log")
        self.start = os.path.getsize(self.path)

    def lines(self):
        out = []
        with open(self.path, "rb") as f:
            f.seek(self.start)
            for raw in f.read().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(raw))
        return out

    def wait_refusal(self, text, timeout=10):
        def find():
            return next((l for l in self.lines() if l.get("msg") == "request.refused" and l.get("level") == "audit"
                         and text in l.get("reason", "")), None)
        return wait_for(find, timeout, f"audit request.refused with {text!r}")


@pytest.fixture
def shimlog(env, ctr):
    return ShimLog(env, ctr)


# ---- exit codes ----

@pytest.mark.parametrize("code", [0, 3, 42])
@pytest.mark.parametrize("shape", ["kube", "cri"])
def test_exit_codes(env, ctr, code, shape):
    cmd = ["sh", "-c", f"echo out; echo err >&2; exit {code}"]
    path, ticket = both_shapes(env, ctr, cmd)[0 if shape == "kube" else 1]
    status, headers, body, ws = ws_open(env, ctr, path, ticket=ticket)
    assert status == 101, body
    assert headers["sec-websocket-protocol"] == "v5.channel.k8s.io"
    out, err, st = run_exec(ws)
    assert (out, err) == (b"out\n", b"err\n")
    assert exit_code_of(st) == code, st
    if code == 0:
        assert st == {"metadata": {}, "status": "Success"}
    assert ws.close_code == 1000


def test_v4_protocol(env, ctr):
    cmd = ["sh", "-c", "echo four; exit 4"]
    t = mint(env, ctr, cmd)
    status, headers, body, ws = ws_open(env, ctr, kube_path(cmd), protocols=("v4.channel.k8s.io",), ticket=t)
    assert status == 101, body
    assert headers["sec-websocket-protocol"] == "v4.channel.k8s.io"
    out, _, st = run_exec(ws, half_close=False)
    assert out == b"four\n" and exit_code_of(st) == 4


def test_alpn_http11_offered(env, ctr):
    # A client that offers ALPN http/1.1 (not h2) gets the HTTP/1.1 front door too.
    cmd = ["echo", "alpn"]
    t = mint(env, ctr, cmd)
    status, _, body, ws = ws_open(env, ctr, kube_path(cmd), ticket=t, alpn=["http/1.1"])
    assert status == 101, body
    assert run_exec(ws)[0] == b"alpn\n"


def test_command_not_found(env, ctr):
    cmd = ["/nonexistent"]
    t = mint(env, ctr, cmd)
    _, _, _, ws = ws_open(env, ctr, kube_path(cmd), ticket=t)
    out, err, st = run_exec(ws)
    assert exit_code_of(st) == 127, st
    assert b"nonexistent" in err


# ---- stdin, half-close, tty ----

@pytest.mark.parametrize("shape", ["kube", "cri"])
def test_stdin_half_close(env, ctr, shape):
    cmd = ["sh", "-c", "cat; echo done"]
    path, ticket = both_shapes(env, ctr, cmd, stdin=True)[0 if shape == "kube" else 1]
    _, _, body, ws = ws_open(env, ctr, path, ticket=ticket)
    assert ws, body
    data = os.urandom(300000)
    chunks = [data[i:i + 32768] for i in range(0, len(data), 32768)]
    out, err, st = run_exec(ws, chunks, half_close=True)
    assert out == data + b"done\n"
    assert exit_code_of(st) == 0


def test_stdin_large_backpressure(env, ctr):
    # 8 MiB through cat while we also read: bounded buffers both ways, nothing lost.
    cmd = ["sh", "-c", "cat | wc -c"]
    t = mint(env, ctr, cmd, stdin=True)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd, stdin=True), ticket=t)
    assert ws, body
    chunk = b"x" * 65536
    for _ in range(128):
        ws.send_channel(0, chunk)
    out, _, st = run_exec(ws, half_close=True)
    assert out.strip() == str(128 * 65536).encode() and exit_code_of(st) == 0


def test_tty_and_resize(env, ctr):
    cmd = ["sh", "-c", "read x; stty size; exit 7"]
    t = mint(env, ctr, cmd, stdin=True, tty=True)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd, stdin=True, tty=True), ticket=t)
    assert ws, body
    ws.send_channel(4, json.dumps({"Width": 123, "Height": 45}).encode())
    time.sleep(0.3)
    ws.send_channel(0, b"go\r")
    out, err, st = run_exec(ws, half_close=False)
    assert b"45 123" in out, out
    assert err == b""
    assert exit_code_of(st) == 7


# ---- bulk output ----

def test_seq_complete(env, ctr):
    cmd = ["seq", "1", str(SEQ_N)]
    t = mint(env, ctr, cmd)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd), ticket=t)
    assert ws, body
    out, err, st = run_exec(ws)
    want = seq_bytes(SEQ_N)
    assert len(out) == len(want)
    assert hashlib.sha256(out).digest() == hashlib.sha256(want).digest()
    assert err == b"" and exit_code_of(st) == 0


def test_slow_reader_backpressure(env, ctr):
    # A client that stops reading: the session stops reading the command's
    # output (bounded memory) and nothing is lost when the client resumes.
    n = 3000000 + random.randint(0, 10**5)  # unique argv: the process is found across the host
    cmd = ["seq", "1", str(n)]
    t = mint(env, ctr, cmd)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd), ticket=t)
    assert ws, body
    pid = wait_for(lambda: next(iter(pids_with_cmdline(str(n).encode())), None), 10, "seq in the container")
    # The event: seq stops writing (blocked on its full pipe) while it still
    # runs, long before its 20 MB are out.
    seen = []

    def blocked():
        with open(f"/proc/{pid}/io") as f:
            seen.append(int(next(l for l in f if l.startswith("wchar:")).split()[1]))
        return len(seen) >= 4 and seen[-1] == seen[-4]

    wait_for(blocked, 30, "seq blocked writing while the client is not reading", interval=0.1)
    assert alive(pid) and seen[-1] < len(seq_bytes(n)), seen[-1]
    out, _, st = run_exec(ws)
    assert hashlib.sha256(out).digest() == hashlib.sha256(seq_bytes(n)).digest()
    assert exit_code_of(st) == 0


def unique_seconds():
    """A sleep duration no other test (or parallel run) uses: its process is
    found by its argv across the host."""
    return str(random.randint(10**8, 10**9))


def test_client_drop_kills_process(env, ctr):
    secs = unique_seconds()
    cmd = ["sleep", secs]
    t = mint(env, ctr, cmd)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd), ticket=t)
    assert ws, body
    pid = wait_for(lambda: next(iter(pids_with_cmdline(secs.encode())), None), 5, "sleep in the container")
    ws.c.close()
    wait_for(lambda: not alive(pid), 5, "the exec killed after the client dropped")


# ---- refusals: clear HTTP errors, the shim keeps serving ----

def assert_served(env, ctr):
    cmd = ["echo", "still"]
    t = mint(env, ctr, cmd)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd), ticket=t)
    assert ws, body
    assert run_exec(ws)[0] == b"still\n"


def test_missing_ticket(env, ctr, shimlog):
    status, _, body, _ = ws_open(env, ctr, kube_path(["echo", "ok"]))
    assert status == 401 and b"missing ticket" in body
    shimlog.wait_refusal("missing ticket")


@pytest.mark.parametrize("shape", ["kube", "cri"])
def test_bad_ticket(env, ctr, shimlog, shape):
    t = mint(env, ctr, ["echo", "ok"])
    bad = t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB")
    path, ticket = (kube_path(["echo", "ok"]), bad) if shape == "kube" else (f"/exec/{bad}", None)
    status, _, body, _ = ws_open(env, ctr, path, ticket=ticket)
    assert status == 403 and b"ticket signature invalid" in body, body
    line = shimlog.wait_refusal("ticket signature invalid")
    assert bad not in json.dumps(line), "the ticket must not be logged"


@pytest.mark.parametrize("shape", ["kube", "cri"])
def test_replayed_ticket(env, ctr, shimlog, shape):
    cmd = ["echo", "once"]
    t = mint(env, ctr, cmd)
    path, ticket = (kube_path(cmd), t) if shape == "kube" else (f"/exec/{t}", None)
    _, _, body, ws = ws_open(env, ctr, path, ticket=ticket)
    assert ws, body
    assert run_exec(ws)[0] == b"once\n"
    status, _, body, _ = ws_open(env, ctr, path, ticket=ticket)
    assert status == 403 and b"ticket already used" in body, body
    shimlog.wait_refusal("ticket already used")


def test_expired_and_wrong_verb(env, ctr):
    now = int(time.time())
    t = mint(env, ctr, ["echo", "ok"], iat=now - 100, exp=now - 60)
    status, _, body, _ = ws_open(env, ctr, f"/exec/{t}")
    assert status == 403 and b"ticket expired" in body, body
    t = mint(env, ctr, verb="portforward", ports=[{"port": 80, "proto": "tcp"}])
    status, _, body, _ = ws_open(env, ctr, f"/exec/{t}")
    assert status == 403 and b"ticket is for portforward, not exec" in body, body


def test_query_must_match_ticket(env, ctr, shimlog):
    t = mint(env, ctr, ["echo", "ok"])
    status, _, body, _ = ws_open(env, ctr, kube_path(["echo", "other"]), ticket=t)
    assert status == 403 and b"ticket does not allow this command" in body, body
    # Refused before use: the same ticket still works for what it allows.
    status, _, body, ws = ws_open(env, ctr, kube_path(["echo", "ok"], stdin=True), ticket=t)
    assert status == 403 and b"stdin/tty flags" in body, body
    _, _, body, ws = ws_open(env, ctr, kube_path(["echo", "ok"]), ticket=t)
    assert ws, body
    assert run_exec(ws)[0] == b"ok\n"


# ---- which streams: stdout=false, stderr=false, none ----

@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
def test_stdout_false_discards_stdout(env, ctr, protocol):
    # Plenty of stdout (more than a pipe holds) that must never arrive, and
    # must not block the command either; stderr and the exit code do arrive.
    cmd = ["sh", "-c", "seq 200000; echo visible >&2; seq 3; exit 7"]
    t = mint(env, ctr, cmd)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd, stdout=False), protocols=(protocol,), ticket=t)
    assert ws, body
    out, err, st = run_exec(ws, half_close=protocol.startswith("v5"))
    assert out == b"" and err == b"visible\n"
    assert exit_code_of(st) == 7, st
    assert ws.close_code == 1000


def test_stderr_false_discards_stderr(env, ctr):
    cmd = ["sh", "-c", "echo out; echo hidden >&2"]
    t = mint(env, ctr, cmd)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd, stderr=False), ticket=t)
    assert ws, body
    assert run_exec(ws)[:2] == (b"out\n", b"")


def test_stdin_only_runs(env, ctr):
    # stdin alone is a valid choice (kubelet: at least one of the three).
    cmd = ["sh", "-c", "cat > /tmp/k8sgaps-in; exit 5"]
    t = mint(env, ctr, cmd, stdin=True)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd, stdin=True, stdout=False, stderr=False), ticket=t)
    assert ws, body
    out, err, st = run_exec(ws, stdin_chunks=[b"data"])
    assert (out, err) == (b"", b"") and exit_code_of(st) == 5, st


@pytest.mark.parametrize("tty", [False, True])
def test_no_stream_refused_400(env, ctr, shimlog, tty):
    # All three false; or tty=true with stderr only: the tty drops stderr
    # (kubelet), so nothing is left either.
    cmd = ["echo", "ok"]
    t = mint(env, ctr, cmd, tty=tty)
    status, _, body, _ = ws_open(env, ctr, kube_path(cmd, tty=tty, stdout=False, stderr=tty), ticket=t)
    assert status == 400 and body == b"you must specify at least 1 of stdin, stdout, stderr\n", body
    shimlog.wait_refusal("you must specify at least 1 of stdin, stdout, stderr")
    # Refused before use: the ticket still works.
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd, tty=tty), ticket=t)
    assert ws, body
    assert run_exec(ws)[0].strip() == b"ok"


# ---- container=, namespace and pod must be this shim's ----

def test_container_param_checked(env, ctr, shimlog):
    cmd = ["echo", "ok"]
    t = mint(env, ctr, cmd)
    status, _, body, _ = ws_open(env, ctr, kube_path(cmd, container="other"), ticket=t)
    assert status == 400 and body == b"container other is not valid for pod p\n", body
    shimlog.wait_refusal("container other is not valid for pod p")
    for container in ("c", ctr.id, None, ""):  # its name, its id, none, empty (= the default)
        t = mint(env, ctr, cmd)
        _, _, body, ws = ws_open(env, ctr, kube_path(cmd, container=container), ticket=t)
        assert ws, (container, body)
        assert run_exec(ws)[0] == b"ok\n"


@pytest.mark.parametrize("ns,pod", [("default", "q"), ("kube-system", "p")])
def test_other_pod_404(env, ctr, shimlog, ns, pod):
    cmd = ["echo", "ok"]
    t = mint(env, ctr, cmd)
    status, _, body, _ = ws_open(env, ctr, kube_path(cmd, ns=ns, pod=pod), ticket=t)
    assert status == 404 and f'pods "{pod}" not found in namespace {ns}'.encode() in body, body
    shimlog.wait_refusal(f'pods "{pod}" not found')
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd), ticket=t)  # not used up
    assert ws, body
    assert run_exec(ws)[0] == b"ok\n"


def test_attach_501(env, ctr, shimlog):
    t = mint(env, ctr, ["echo", "ok"])
    for path, ticket in ((f"/attach/{t}", None), ("/api/v1/namespaces/default/pods/p/attach?stdout=true", t)):
        status, _, body, _ = ws_open(env, ctr, path, ticket=ticket)
        assert status == 501 and b"attach is not supported" in body, body
    line = shimlog.wait_refusal("attach is not supported")
    assert t not in json.dumps(shimlog.lines()), "the ticket must not be logged"
    assert line["status"] == 501


def test_unknown_path_404(env, ctr, shimlog):
    for path in ("/", "/v1/exec", "/api/v1/namespaces/default/pods/p/log", "/exec", "/exec/a/b"):
        status, _, body, _ = ws_open(env, ctr, path)
        assert status == 404 and body.startswith(b"no such endpoint"), (path, body)
    shimlog.wait_refusal("no such endpoint")


def test_no_supported_subprotocol(env, ctr):
    t = mint(env, ctr, ["echo", "ok"])
    status, _, body, _ = ws_open(env, ctr, f"/exec/{t}", protocols=("v3.channel.k8s.io",))
    assert status == 400 and b"no supported WebSocket subprotocol" in body, body
    # Negotiation fails before the ticket is used: it still works.
    _, _, body, ws = ws_open(env, ctr, f"/exec/{t}")
    assert ws, body
    assert run_exec(ws)[0] == b"ok\n"


def test_plain_get_400(env, ctr):
    c = Conn(env, ctr)
    c.send(b"GET /exec/abc HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = c.read_response()
    c.close()
    assert status == 400 and b"needs an upgrade" in body, body


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header Without Colon\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(100)) + b"\r\n",
])
def test_garbage_request_400_and_shim_survives(env, ctr, shimlog, garbage):
    c = Conn(env, ctr)
    with contextlib.suppress(OSError):
        c.send(garbage)
    status, _, body = c.read_response()
    c.close()
    assert status in (400, 414, 431), (status, body)
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    shimlog.wait_refusal("")
    assert_served(env, ctr)


def test_text_frame_is_fatal(env, ctr):
    secs = unique_seconds()
    cmd = ["sleep", secs]
    t = mint(env, ctr, cmd, stdin=True)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd, stdin=True), ticket=t)
    assert ws, body
    pid = wait_for(lambda: next(iter(pids_with_cmdline(secs.encode())), None), 5, "sleep in the container")
    ws.send_frame(0x1, b"hello")
    while ws.recv_message() is not None:
        pass
    assert ws.close_code == 1003
    wait_for(lambda: not alive(pid), 5, "the exec killed after a text frame")


def test_ping_answered(env, ctr):
    cmd = ["sh", "-c", "read x; echo $x"]
    t = mint(env, ctr, cmd, stdin=True)
    _, _, body, ws = ws_open(env, ctr, kube_path(cmd, stdin=True), ticket=t)
    assert ws, body
    ws.send_frame(0x9, b"are-you-there")
    fin, op, payload = ws.recv_frame()
    assert (op, payload) == (0xA, b"are-you-there")
    out, _, st = run_exec(ws, [b"pong\n"])
    assert out == b"pong\n" and exit_code_of(st) == 0


def test_native_h2_still_served(env, ctr):
    # ALPN h2 keeps the native protocol on the same port.
    p = subprocess.run(env.shimctl("exec", ctr.id, "--", "echo", "native"), capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert (p.returncode, p.stdout) == (0, b"native\n"), p.stderr
