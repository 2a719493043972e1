"""shimlet-cri against a real containerd (Debian's 1.6 with its CRI plugin,
runc and the CNI bridge), started by the module's fixture (cri_env.py): a
client generated from cri/api.proto does what the kubelet does through
shimlet-cri, and the same calls straight to containerd give the answers to
compare with. One containerd, one shared pod (plus one pod for the fault
cases), every pod removed at the end.

Also a fake runtime (a generic gRPC server echoing raw bytes) behind a
second shimlet-cri, for what containerd cannot show: unknown fields both
ways, metadata, trailers, status details, deadlines and streaming."""
import contextlib
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import socket
import threading
import time
import urllib.parse

import grpc
import pytest

from containers import BIN, alive, wait_for
from cri_env import CRI, CriEnv
from test_k8s_spdy import RawTransport, SpdyClient, read_response_head
from test_k8s_ws import WS, Conn, exit_code_of, run_exec, ws_request

# The shared pod's container: echo servers on 8080 and 8081 (busybox nc, one
# process per connection), nothing on 8082.
SERVERS = ["sh", "-c", "nc -ll -p 8080 -e cat & nc -ll -p 8081 -e cat & exec sleep 1000000"]
V1 = "/runtime.v1.RuntimeService/"


# The shims' pre-authentication bounds, small enough for the CRI listener's
# case below to see them (a kubelet sends its request head at once).
PREAUTH = {"preauth_timeout_ms": 5000, "preauth_max_per_source": 16}


@pytest.fixture(scope="module")
def other_key(tmp_path_factory):
    """A second trusted ticket key (kid "other", as a master's would be): the
    TLS port accepts its tickets, the CRI listener does not."""
    d = tmp_path_factory.mktemp("keys")
    key, pub = str(d / "other.key"), str(d / "other.pub")
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)
    return key, pub


@pytest.fixture(scope="module")
def cenv(other_key):
    e = CriEnv({**PREAUTH, "trusted_keys": [{"kid": "other", "path": other_key[1]}]})
    try:
        e.start()
        e.sid, ids = e.run_pod("web", {"c": SERVERS})
        e.cid = ids["c"]
        yield e
    finally:
        errors = e.cleanup()
        assert not errors, errors


def raw(env, sock, method, request_bytes, timeout=30, metadata=None):
    """A unary call with opaque bytes both ways: (status code, details, response bytes)."""
    call = env.channel(sock).unary_unary(method)  # no (de)serializers: bytes
    try:
        return grpc.StatusCode.OK, "", call(request_bytes, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        return e.code(), e.details(), None


def both(env, method, request, timeout=60):
    """The same call through shimlet-cri and straight to containerd."""
    b = request.SerializeToString()
    return raw(env, env.cri_sock, V1 + method, b, timeout), raw(env, env.containerd_sock, V1 + method, b, timeout)


def shim_execs(env, cid):
    """exec.start audit lines in the container's shim.log (execs that went through the shim)."""
    with contextlib.suppress(OSError):
        with open(os.path.join(env.state, cid, "shim.log"), "rb") as f:
            return f.read().count(b'"exec.start"')
    return 0


# ---------------------------------------------------------------- pass-through

def test_runtime_and_image_calls_pass_through_unchanged(cenv):
    a = cenv.api
    for method, req in [("Version", a.VersionRequest(version="v1")),
                        ("ListContainers", a.ListContainersRequest()),
                        ("ContainerStatus", a.ContainerStatusRequest(container_id=cenv.cid)),
                        ("ListPodSandbox", a.ListPodSandboxRequest()),
                        ("PodSandboxStatus", a.PodSandboxStatusRequest(pod_sandbox_id=cenv.sid)),
                        ("ContainerStatus", a.ContainerStatusRequest(container_id="nosuch")),
                        ("Attach", a.AttachRequest(container_id="nosuch", stdout=True))]:
        via, direct = both(cenv, method, req)
        assert via == direct, method
    for method, req in [("ListImages", a.ListImagesRequest()),
                        ("ImageStatus", a.ImageStatusRequest(image=a.ImageSpec(image="localhost/busybox:1")))]:
        b = req.SerializeToString()
        m = "/runtime.v1.ImageService/" + method
        assert raw(cenv, cenv.cri_sock, m, b) == raw(cenv, cenv.containerd_sock, m, b), method
        code, _, body = raw(cenv, cenv.cri_sock, m, b)
        assert code == grpc.StatusCode.OK and body
    # A field this proxy's proto does not define (field 99 of ListContainersRequest)
    # reaches containerd, which ignores it as it would without the proxy.
    b = a.ListContainersRequest().SerializeToString() + bytes([0x98, 0x06, 0x01])  # field 99, varint 1
    assert raw(cenv, cenv.cri_sock, V1 + "ListContainers", b) == raw(cenv, cenv.containerd_sock, V1 + "ListContainers", b)


def test_container_lifecycle_through_the_proxy(cenv):
    """Create, start, stop and remove a container through shimlet-cri: the
    hook runs for it (containerd applies the shipped base_runtime_spec), the
    shim registers and goes with the container."""
    a, rt = cenv.api, cenv.proxy
    cfg = cenv.sandbox_config("web")
    cc = a.ContainerConfig(metadata=a.ContainerMetadata(name="short"), image=a.ImageSpec(image="localhost/busybox:1"),
                           command=["sleep", "1000000"], log_path="short.log")
    cid = rt.CreateContainer(a.CreateContainerRequest(pod_sandbox_id=cenv.sid, config=cc, sandbox_config=cfg),
                             timeout=60).container_id
    rt.StartContainer(a.StartContainerRequest(container_id=cid), timeout=60)
    reg = wait_for(lambda: cenv.registration(cid), 10, "the new container's registration")
    assert reg["annotations"]["io.kubernetes.cri.sandbox-id"] == cenv.sid
    assert reg["cri_endpoint"].startswith("127.0.0.1:")
    st = rt.ContainerStatus(a.ContainerStatusRequest(container_id=cid), timeout=30).status
    assert st.state == a.CONTAINER_RUNNING and st.metadata.name == "short"
    rt.StopContainer(a.StopContainerRequest(container_id=cid, timeout=1), timeout=60)
    wait_for(lambda: not os.path.exists(os.path.join(cenv.state, cid)), 10, "poststop to remove the shim's state")
    assert rt.ContainerStatus(a.ContainerStatusRequest(container_id=cid), timeout=30).status.state == a.CONTAINER_EXITED
    rt.RemoveContainer(a.RemoveContainerRequest(container_id=cid), timeout=60)
    via, direct = both(cenv, "ContainerStatus", a.ContainerStatusRequest(container_id=cid))
    assert via == direct and via[0] == grpc.StatusCode.NOT_FOUND


def test_container_events_stream_same_answer_as_containerd(cenv):
    """GetContainerEvents (server streaming; containerd 1.6 does not implement
    it): the same answer through the proxy. Streams that deliver messages are
    checked against the fake runtime below."""
    got = []
    for sock in (cenv.cri_sock, cenv.containerd_sock):
        with pytest.raises(grpc.RpcError) as e:
            list(cenv.rt(sock).GetContainerEvents(cenv.api.GetEventsRequest(), timeout=30))
        got.append((e.value.code(), e.value.details()))
    assert got[0] == got[1], got


# ---------------------------------------------------------------- ExecSync

def exec_sync(env, sock, cid, cmd, timeout=0, rpc_timeout=60):
    a = env.api
    return raw(env, sock, V1 + "ExecSync",
               a.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout).SerializeToString(), rpc_timeout)


def decoded(env, result):
    code, details, body = result
    if body is None:
        return code, details, None
    r = env.streaming.ExecSyncResponse.FromString(body)
    return code, details, (r.stdout, r.stderr, r.exit_code)


@pytest.mark.parametrize("cmd", [
    ["true"],
    ["sh", "-c", "printf 'out\\n'; printf 'err\\n' >&2; exit 3"],
    ["sh", "-c", "head -c 100000 /dev/urandom | tee /tmp/rnd | od -An | tail -c 300; cat /tmp/rnd >&2"],
    ["sh", "-c", "kill -9 $$"],
    ["sh", "-c", "seq 1 200000"],
], ids=["true", "exit3", "binary", "signal", "seq"])
def test_exec_sync_same_answer_as_containerd_and_through_the_shim(cenv, cmd):
    before = shim_execs(cenv, cenv.cid)
    via = decoded(cenv, exec_sync(cenv, cenv.cri_sock, cenv.cid, cmd))
    assert shim_execs(cenv, cenv.cid) == before + 1, "the ExecSync did not go through the shim"
    direct = decoded(cenv, exec_sync(cenv, cenv.containerd_sock, cenv.cid, cmd))
    if cmd[0] == "sh" and "urandom" in cmd[2]:
        # Random bytes differ per run: same shapes, stderr exactly the bytes stdout summarised.
        assert via[0] == direct[0] == grpc.StatusCode.OK
        assert len(via[2][1]) == len(direct[2][1]) == 100000 and via[2][2] == direct[2][2] == 0
        return
    assert via == direct


def test_exec_sync_missing_binary_same_code_as_containerd(cenv):
    via = exec_sync(cenv, cenv.cri_sock, cenv.cid, ["/no/such/binary"])
    direct = exec_sync(cenv, cenv.containerd_sock, cenv.cid, ["/no/such/binary"])
    assert via[0] == direct[0] == grpc.StatusCode.UNKNOWN, (via, direct)
    assert "/no/such/binary" in via[1] and "/no/such/binary" in direct[1]


def test_exec_sync_timeout_kills_the_command_and_reports_it_as_containerd(cenv):
    for sock in (cenv.cri_sock, cenv.containerd_sock):
        marker = f"sleep 7{os.getpid() % 1000}{'1' if sock == cenv.cri_sock else '2'}"
        t0 = time.monotonic()
        code, details, _ = exec_sync(cenv, sock, cenv.cid, ["sh", "-c", marker], timeout=1)
        took = time.monotonic() - t0
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (sock, code, details)
        assert details == "failed to exec in container: timeout 1s exceeded: context deadline exceeded", details
        assert took < 10, took
        if sock == cenv.cri_sock:
            via_details = details
        # The command is gone (the session kills its processes; containerd kills the exec).
        ps = lambda: exec_sync(cenv, cenv.containerd_sock, cenv.cid, ["ps", "-o", "args"])[2]
        wait_for(lambda: marker.encode() not in cenv.streaming.ExecSyncResponse.FromString(ps()).stdout, 10,
                 f"{marker} to be killed")
    assert via_details == details


def test_exec_sync_long_timeout_as_containerd(cenv):
    """A timeout longer than an int of milliseconds (4294968 s wrapped to
    704 ms), with the kubelet's deadline (the timeout plus 2 minutes): the
    command runs to its end, as under containerd."""
    cmd = ["sh", "-c", "sleep 2; echo done"]
    for sock in (cenv.cri_sock, cenv.containerd_sock):
        got = decoded(cenv, exec_sync(cenv, sock, cenv.cid, cmd, timeout=4294968, rpc_timeout=4294968 + 120))
        assert got == (grpc.StatusCode.OK, "", (b"done\n", b"", 0)), (sock, got)


def test_exec_sync_output_caps_as_containerd(cenv):
    # Up to 16 MiB per stream is returned whole; more exceeds the 16 MiB
    # message limit and fails the same way.
    for n, want in ((8 << 20, grpc.StatusCode.OK), (17 << 20, None)):
        cmd = ["head", "-c", str(n), "/dev/zero"]
        via, direct = exec_sync(cenv, cenv.cri_sock, cenv.cid, cmd), exec_sync(cenv, cenv.containerd_sock, cenv.cid, cmd)
        assert via[0] == direct[0], (n, via[:2], direct[:2])
        if want == grpc.StatusCode.OK:
            assert via[2] == direct[2]
            assert len(cenv.streaming.ExecSyncResponse.FromString(via[2]).stdout) == n


def test_exec_sync_invalid_requests_answered_by_containerd(cenv):
    exec_id = lambda s: re.sub(r'exec "[0-9a-f]{64}"', 'exec "ID"', s)  # containerd's random exec id
    for cid, cmd in (("nosuch", ["true"]), (cenv.cid, []), ("../x", ["true"])):
        via, direct = exec_sync(cenv, cenv.cri_sock, cid, cmd), exec_sync(cenv, cenv.containerd_sock, cid, cmd)
        assert (via[0], exec_id(via[1])) == (direct[0], exec_id(direct[1])), (cid, cmd)
        assert via[0] != grpc.StatusCode.OK



# ---------------------------------------------------------------- Exec / PortForward URLs

class PlainConn(Conn):
    """test_k8s_ws.Conn over plain TCP: the CRI URLs are http:// (containerd's and the shim's CRI listener)."""

    def __init__(self, url, timeout=30):
        u = urllib.parse.urlsplit(url)
        self.s = socket.create_connection((u.hostname, u.port), timeout=timeout)
        self.buf, self.closed = b"", False


class PlainSock:
    """The blocking plain socket behind test_k8s_spdy's transports (no TLS to serialise)."""

    def __init__(self, sock):
        self.sock = sock
        sock.settimeout(60)

    def sendall(self, b):
        self.sock.sendall(b)

    def recv(self, n):
        return self.sock.recv(n)


def target(url):
    u = urllib.parse.urlsplit(url)
    return u.path + ("?" + u.query if u.query else "")


def exec_url(env, sock, cid, cmd, tty=False, stdin=False, stdout=True, stderr=None):
    stderr = not tty if stderr is None else stderr
    r = env.rt(sock).Exec(env.api.ExecRequest(container_id=cid, cmd=cmd, tty=tty, stdin=stdin, stdout=stdout,
                                              stderr=stderr), timeout=30)
    return r.url


def ws_exec(url, protocol="v4.channel.k8s.io", stdin=(), resize=None):
    """(stdout, stderr, exit code) of a WebSocket exec on url; (status, body) if not upgraded."""
    c = PlainConn(url)
    req, key = ws_request(target(url), (protocol,))
    c.send(req)
    status, headers = c.read_head()
    if status != 101:
        body = c.read_exact(int(headers.get("content-length", "0"))) if "content-length" in headers else b""
        c.close()
        return status, body
    assert headers.get("sec-websocket-protocol") == protocol, headers
    out, err, st = run_exec(WS(c), stdin, half_close=protocol.startswith("v5"), resize=resize)
    return out, err, exit_code_of(st)


def spdy_upgrade(url, protocols):
    s = socket.create_connection((urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port), timeout=60)
    lines = [f"POST {target(url)} HTTP/1.1", "Host: 127.0.0.1", "Connection: Upgrade", "Upgrade: SPDY/3.1"]
    lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    status, hdrs, rest = read_response_head(s)
    if status != 101:
        s.close()
        return status, None
    t = RawTransport.__new__(RawTransport)
    t.sock, t.leftover, t.lock = PlainSock(s), rest, threading.Lock()
    cl = SpdyClient(t)
    cl.protocol = hdrs.get("x-stream-protocol-version")  # the server's choice
    return status, cl


def spdy_exec(url, stdin=None, tty=False, stdout=True, stderr=True):
    """client-go's SPDY exec (v4): (stdout, stderr, Status JSON)."""
    status, cl = spdy_upgrade(url, ["v4.channel.k8s.io", "channel.k8s.io"])
    assert status == 101, status
    err = cl.open({"streamtype": "error"})
    err.wait_reply()
    streams = {}
    for name, want in (("stdin", stdin is not None), ("stdout", stdout), ("stderr", stderr and not tty),
                       ("resize", tty)):
        if want:
            streams[name] = cl.open({"streamtype": name})
            streams[name].wait_reply()
    if stdin is not None:
        cl.send(streams["stdin"], stdin, fin=True)
    st = err.wait_fin(60)
    out = streams["stdout"].wait_fin(60) if "stdout" in streams else None
    e = streams["stderr"].wait_fin(60) if "stderr" in streams else None
    cl.send_goaway()
    return out, e, json.loads(st) if st else None


def test_exec_url_is_the_shims_and_matches_containerd(cenv):
    reg = cenv.registration(cenv.cid)
    cmd = ["sh", "-c", "printf 'o%.0s' $(seq 1 5000); printf e >&2; exit 7"]
    ours = exec_url(cenv, cenv.cri_sock, cenv.cid, cmd)
    theirs = exec_url(cenv, cenv.containerd_sock, cenv.cid, cmd)
    assert ours.startswith(f"http://{reg['cri_endpoint']}/exec/"), ours
    assert not theirs.startswith(f"http://{reg['cri_endpoint']}/"), theirs
    before = shim_execs(cenv, cenv.cid)
    want = (b"o" * 5000, b"e", 7)
    assert ws_exec(ours) == want
    assert shim_execs(cenv, cenv.cid) == before + 1
    assert ws_exec(theirs) == want
    # SPDY, the same answers on both.
    for url in (exec_url(cenv, cenv.cri_sock, cenv.cid, cmd), exec_url(cenv, cenv.containerd_sock, cenv.cid, cmd)):
        out, err, st = spdy_exec(url)
        assert (out, err, st["details"]["causes"][0]["message"]) == (b"o" * 5000, b"e", "7"), url


def test_exec_url_stdin_byte_exact_both_protocols(cenv):
    data = os.urandom(1 << 20)
    for sock in (cenv.cri_sock, cenv.containerd_sock):
        url = exec_url(cenv, sock, cenv.cid, ["sha256sum"], stdin=True)
        out, err, st = spdy_exec(url, stdin=data)
        assert out.split()[0].decode() == hashlib.sha256(data).hexdigest() and st["status"] == "Success", sock
    # v5 closes stdin over the WebSocket itself (the shim serves v5; containerd 1.6 does not).
    url = exec_url(cenv, cenv.cri_sock, cenv.cid, ["cat"], stdin=True)
    assert ws_exec(url, "v5.channel.k8s.io", [data[:300000], data[300000:]]) == (data, b"", 0)


def test_exec_url_tty_and_resize_like_containerd(cenv):
    # The size arrives on the resize channel after the start: wait for it in the container.
    cmd = ["sh", "-c", "read x; until stty size 2>/dev/null | grep -q '^[1-9]'; do sleep 0.05; done; stty size; exit 4"]
    got = []
    for sock in (cenv.cri_sock, cenv.containerd_sock):
        url = exec_url(cenv, sock, cenv.cid, cmd, tty=True, stdin=True)
        got.append(ws_exec(url, stdin=[b"go\r"], resize=(101, 37)))
    assert got[0] == got[1], got
    out, err, code = got[0]
    assert b"37 101" in out and err == b"" and code == 4, got[0]


# kubectl's SPDY offer (client-go: v5 first; a runtime without v5 over SPDY picks v4).
KUBECTL_SPDY = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]


class SpdyTty:
    """`kubectl exec -it` over SPDY on a CRI exec URL: client-go's streams for
    a tty, one at a time (error, stdin, stdout, resize; no stderr)."""

    def __init__(self, url):
        status, self.cl = spdy_upgrade(url, KUBECTL_SPDY)
        assert status == 101, (url, status)
        self.protocol = self.cl.protocol
        self.st = {}
        for name in ("error", "stdin", "stdout", "resize"):
            self.st[name] = self.cl.open({"streamtype": name})
            self.st[name].wait_reply()

    def keys(self, b):
        self.cl.send(self.st["stdin"], b)

    def resize(self, w, h):
        self.cl.send(self.st["resize"], json.dumps({"Width": w, "Height": h}).encode() + b"\n")

    def until(self, pattern, start, timeout=30):
        """Waits for pattern in stdout from offset start; returns the offset after it."""
        out, deadline = self.st["stdout"], time.monotonic() + timeout
        with out.cond:
            while not (m := re.compile(pattern).search(out.data, start)):
                left = deadline - time.monotonic()
                assert left > 0 and not out.fin.is_set(), f"no {pattern!r} on stdout: {bytes(out.data)!r}"
                out.cond.wait(min(left, 0.5))  # data notifies; a bare FIN is seen at the next slice
        return m.end()

    def finish(self):
        """(stdout, Status) once the command exited; then hangs up as client-go does."""
        status = self.st["error"].wait_fin(30)
        out = self.st["stdout"].wait_fin(30)
        self.cl.send_goaway()
        assert self.cl.eof.wait(10), "no hang-up after GOAWAY"
        self.cl.t.sock.sock.close()
        return out, json.loads(status)


class WsTty:
    """The same over WebSocket (kubectl's v5.channel.k8s.io): stdin 0, stdout 1, error 3, resize 4."""

    def __init__(self, url, protocol="v5.channel.k8s.io"):
        c = PlainConn(url)
        c.send(ws_request(target(url), (protocol,))[0])
        status, headers = c.read_head()
        assert status == 101 and headers.get("sec-websocket-protocol") == protocol, (status, headers)
        self.protocol, self.ws, self.out, self.err = protocol, WS(c), bytearray(), bytearray()

    def keys(self, b):
        self.ws.send_channel(0, b)

    def resize(self, w, h):
        self.ws.send_channel(4, json.dumps({"Width": w, "Height": h}).encode())

    def _next(self, deadline):
        """One message into its channel's buffer; False once the server closed."""
        self.ws.c.s.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            m = self.ws.recv_message()
        except (socket.timeout, EOFError) as e:
            raise AssertionError(f"no message ({e!r}); stdout so far: {bytes(self.out)!r}") from e
        if m is None:
            return False
        op, payload = m
        assert op == 0x2 and payload[:1] in (b"\x01", b"\x03"), (op, payload[:40])  # a tty has no stderr
        (self.out if payload[0] == 1 else self.err).extend(payload[1:])
        return True

    def until(self, pattern, start, timeout=30):
        deadline = time.monotonic() + timeout
        while not (m := re.compile(pattern).search(self.out, start)):
            assert self._next(deadline), f"closed before {pattern!r} on stdout: {bytes(self.out)!r}"
        return m.end()

    def finish(self):
        deadline = time.monotonic() + 30
        while self._next(deadline):
            pass
        assert self.ws.close_code == 1000, self.ws.close_code
        self.ws.c.close()
        return bytes(self.out), json.loads(self.err)


def interactive_shell(tty, code):
    """kubectl exec -it -- sh: two resizes, each seen by `stty size` at the
    container's terminal, typed input echoed, then `exit`: (stdout, Status).
    The typed lines never hold the sizes' text, so only stty's output matches;
    each line waits in the shell until its size has arrived (containerd
    applies a resize asynchronously: typed input may overtake it)."""
    pos = 0
    for w, h in ((101, 37), (83, 29)):  # wider than prompt + line: no wrapping in the echo
        tty.resize(w, h)
        tty.keys(f'H={h} W={w};until stty size|grep -qx "$H $W";do sleep .05;done;stty size\r'.encode())
        pos = tty.until(rb"\r\n%d %d\r\n" % (h, w), pos)
    # The line discipline's work: the typed line echoed, output lines end in \r\n.
    tty.keys(b"echo ab''cd\r")
    pos = tty.until(rb"echo ab''cd\r\n(?:.*\r\n)?abcd\r\n", pos)
    tty.keys(b"exit %d\r" % code)
    return tty.finish()


@pytest.mark.parametrize("proto", ["spdy", "ws"])
@pytest.mark.parametrize("code", [0, 3])
def test_exec_url_interactive_tty_resizes_echo_and_exit_status(cenv, proto, code):
    """The kubelet's Exec for `kubectl exec -it` (tty, stdin, stdout; no
    stderr) through the shim, over SPDY (what the kubelet and apiserver
    speak to a runtime's URL) and WebSocket; SPDY also against containerd's
    own URL, which must give the same sizes, echo and Status."""
    socks = [cenv.cri_sock] + ([cenv.containerd_sock] if proto == "spdy" else [])
    got = []
    for sock in socks:
        url = exec_url(cenv, sock, cenv.cid, ["sh"], tty=True, stdin=True, stdout=True, stderr=False)
        before = shim_execs(cenv, cenv.cid)
        tty = SpdyTty(url) if proto == "spdy" else WsTty(url)
        assert tty.protocol == ("v4.channel.k8s.io" if proto == "spdy" else "v5.channel.k8s.io"), tty.protocol
        _, status = interactive_shell(tty, code)
        assert shim_execs(cenv, cenv.cid) == before + (sock == cenv.cri_sock), sock
        if code == 0:
            assert status["status"] == "Success", status
        else:
            assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode", status
            assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}], status
        got.append({k: status.get(k) for k in ("status", "reason", "details")})
    assert all(g == got[0] for g in got), got


def test_exec_url_streams_chosen_by_the_request(cenv):
    """CRI stdout/stderr flags: a stream the Exec did not ask for is not sent (as containerd)."""
    cmd = ["sh", "-c", "echo out; echo err >&2"]
    for stdout, stderr in ((False, True), (True, False)):
        for sock in (cenv.cri_sock, cenv.containerd_sock):
            url = exec_url(cenv, sock, cenv.cid, cmd, stdout=stdout, stderr=stderr)
            out, err, st = spdy_exec(url, stdout=stdout, stderr=stderr)
            assert (out, err) == ((b"out\n" if stdout else None), (b"err\n" if stderr else None)), (sock, url)
            assert st["status"] == "Success"
    # Invalid combinations are the runtime's to refuse, with its own words.
    for req in (dict(tty=True, stderr=True, stdout=True), dict(stdout=False, stderr=False)):
        errs = []
        for sock in (cenv.cri_sock, cenv.containerd_sock):
            with pytest.raises(grpc.RpcError) as e:
                cenv.rt(sock).Exec(cenv.api.ExecRequest(container_id=cenv.cid, cmd=["true"], **req), timeout=30)
            errs.append((e.value.code(), e.value.details()))
        assert errs[0] == errs[1] and errs[0][0] == grpc.StatusCode.INVALID_ARGUMENT, errs


def test_exec_url_single_use_and_expiry(cenv):
    url = exec_url(cenv, cenv.cri_sock, cenv.cid, ["true"])
    assert ws_exec(url) == (b"", b"", 0)
    status, body = ws_exec(url)
    assert status == 403 and b"already" in body, (status, body)
    # Only the CRI shapes on the CRI listener (no Kubernetes API paths, no tickets in headers).
    u = urllib.parse.urlsplit(url)
    c = PlainConn(url)
    c.send(ws_request("/api/v1/namespaces/default/pods/web/exec?command=true&stdout=true", ("v4.channel.k8s.io",))[0])
    assert c.read_response()[0] == 404
    c.close()
    # A URL not used within its lifetime (shimlet-cri --url-ticket-lifetime; the
    # shim's clock leeway is 1 s here) is refused.
    cenv.stop_cri()
    cenv.start_cri("--url-ticket-lifetime", "1")
    try:
        url = exec_url(cenv, cenv.cri_sock, cenv.cid, ["true"])
        time.sleep(3)  # waiting out the expiry is the point: no event to wait on
        status, body = ws_exec(url)
        assert status == 403 and b"expired" in body, (status, body)
    finally:
        cenv.stop_cri()
        cenv.start_cri()
    assert u.hostname == "127.0.0.1"


def test_cri_listener_is_behind_the_gate_deadline_and_limits(cenv, other_key):
    """The shim's CRI listener belongs to the pre-authentication gate: node-key
    tickets only; silent
    connections cost no session, the per-source bound drops the idlest at
    once, the deadline closes the rest (a started head gets 408), and an
    Exec through the proxy succeeds while they are held."""
    reg = cenv.registration(cenv.cid)
    host, port = reg["cri_endpoint"].rsplit(":", 1)
    stats_path = os.path.join(cenv.state, cenv.cid, "stats.json")

    def stats():
        with contextlib.suppress(OSError, ValueError):
            with open(stats_path) as f:
                return json.load(f)
        return None

    assert ws_exec(exec_url(cenv, cenv.cri_sock, cenv.cid, ["true"])) == (b"", b"", 0)  # the gate runs
    # Only the node key's tickets (shimlet-cri's): another trusted key's is refused here.
    claims = {"iss": "other", "sub": "t", "aud": cenv.cid, "verb": "exec", "cmd": ["true"], "stdin": False,
              "tty": False}
    p = subprocess.run([os.path.join(BIN, "shimlet-probe"), "--mint-only", "--key", other_key[0], "--kid", "other",
                        "--claims", json.dumps(claims)], capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    status, body = ws_exec(f"http://{host}:{port}/exec/{json.loads(p.stdout)['ticket']}")
    assert status == 403 and b'kid "other" is not trusted' in body, (status, body)
    before = wait_for(stats, what="stats.json")["preauth"]
    extra = 8
    n = PREAUTH["preauth_max_per_source"] + extra
    deadline = PREAUTH["preauth_timeout_ms"] / 1000
    t0 = time.monotonic()
    silent = [socket.create_connection((host, int(port)), timeout=30) for _ in range(n)]
    slow = socket.create_connection((host, int(port)), timeout=30)
    slow.sendall(b"GET /exec/x HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a head that never ends
    # Held now: an Exec through the proxy and its URL on the same listener
    # (the newest connection, never the idlest).
    url = exec_url(cenv, cenv.cri_sock, cenv.cid, ["sh", "-c", "echo held; exit 3"])
    assert ws_exec(url) == (b"held\n", b"", 3)
    exec_done = time.monotonic() - t0

    def closed_now(s):  # EOF already there (no bytes before it)?
        r, _, _ = select.select([s], [], [], 0)
        return bool(r) and s.recv(1, socket.MSG_PEEK) == b""

    gone_early = sum(closed_now(s) for s in silent)
    closed = []
    for s in silent + [slow]:
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
        closed.append((time.monotonic() - t0, data))
        s.close()
    assert exec_done < deadline, exec_done  # the Exec ran while the silent ones were held
    assert gone_early >= extra, (gone_early, exec_done)  # the idlest dropped at once: preauth_max_per_source
    assert gone_early < n, (gone_early, exec_done)  # the others still held when the Exec was done
    assert [d for _, d in closed[:n]] == [b""] * n, closed  # closed without a word
    late = sorted(t for t, _ in closed[:n])[gone_early:]
    assert all(deadline - 0.5 <= t <= deadline + 4 for t in late), (late, deadline)  # at the deadline
    assert closed[n][1].startswith(b"HTTP/1.1 408 ") and deadline - 0.5 <= closed[n][0] <= deadline + 4, closed[n]

    def counted():
        st = stats()
        if not st:
            return None
        p = st["preauth"]
        grown = {k: p[k] - before[k] for k in ("cri_accepted", "timed_out", "dropped_per_source", "admitted")}
        return grown if grown["timed_out"] >= n + 1 - grown["dropped_per_source"] else None

    grown = wait_for(counted, timeout=10, what="the gate's counters in stats.json")
    # >=: the counters read first may lag the warm-up exec by up to a second.
    assert grown["cri_accepted"] >= n + 2 and grown["admitted"] >= 1, grown
    assert grown["dropped_per_source"] >= extra and grown["timed_out"] + grown["dropped_per_source"] == n + 1, grown


class Forwarder:
    """kubectl port-forward's side over SPDY: per connection an error and a data stream."""

    def __init__(self, url):
        status, self.cl = spdy_upgrade(url, ["portforward.k8s.io"])
        assert status == 101, (url, status)
        self.rid, self.lock = 0, threading.Lock()

    def roundtrip(self, port, payload):
        with self.lock:
            rid = str(self.rid)
            self.rid += 1
        err = self.cl.open({"streamtype": "error", "port": str(port), "requestid": rid})
        err.wait_reply()
        self.cl.fin(err)
        data = self.cl.open({"streamtype": "data", "port": str(port), "requestid": rid})
        data.wait_reply()
        self.cl.send(data, payload, fin=True)
        return data.wait_fin(60), err.wait_fin(30)


def pf_url(env, sock, sid, ports=()):
    return env.rt(sock).PortForward(env.api.PortForwardRequest(pod_sandbox_id=sid, port=list(ports)), timeout=30).url


def test_port_forward_url_several_ports_and_connections_like_containerd(cenv):
    ours = pf_url(cenv, cenv.cri_sock, cenv.sid)
    assert ours.startswith(f"http://{cenv.registration(cenv.cid)['cri_endpoint']}/portforward/"), ours
    results = {}
    for name, url in (("ours", ours), ("containerd", pf_url(cenv, cenv.containerd_sock, cenv.sid))):
        fw = Forwarder(url)
        got = [fw.roundtrip(8080, b"to 8080"), fw.roundtrip(8081, b"to 8081")]
        payloads = [os.urandom(200_000 + i) for i in range(8)]
        out = [None] * 8

        def one(i):
            out[i] = fw.roundtrip(8080 + i % 2, payloads[i])[0] == payloads[i]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        refused = fw.roundtrip(8082, b"x")  # nothing listens there
        after = fw.roundtrip(8080, b"after the refusal")  # the connection goes on
        results[name] = (got, out, refused, after)
        fw.cl.send_goaway()
    assert results["ours"][0] == [(b"to 8080", b""), (b"to 8081", b"")], results
    assert results["ours"][1] == [True] * 8
    assert results["ours"][:2] == results["containerd"][:2]
    # A refused port: no data either way, and the connection serves the next
    # pair. containerd names the failure on the pair's error stream; the shim
    # does not on purpose (any error text makes kubectl >= 1.23 end its whole
    # session: docs/design.md "CRI proxy"), it names it in its audit.
    ours, theirs = results["ours"][2], results["containerd"][2]
    assert ours[0] == theirs[0] == b"", results
    assert re.match(rb"error forwarding port 8082 to pod " + cenv.sid.encode() + rb", .*connection refused",
                    theirs[1]), theirs
    assert ours[1] == b"", ours
    refusals = [json.loads(l) for l in open(os.path.join(cenv.state, cenv.cid, "shim.log"), "rb")
                if b'"portforward.error"' in l]
    assert [r for r in refusals if r.get("port") == 8082 and
            re.match(r"error forwarding port 8082 to pod .*: .*[Cc]onnection refused", r.get("error", ""))], refusals
    assert results["ours"][3] == results["containerd"][3] == (b"after the refusal", b""), results


def test_port_forward_url_limited_to_the_requested_ports(cenv):
    fw = Forwarder(pf_url(cenv, cenv.cri_sock, cenv.sid, [8081]))
    assert fw.roundtrip(8081, b"yes") == (b"yes", b"")
    got, err = fw.roundtrip(8080, b"no")
    assert got == b"" and b"not allowed" in err, err
    fw.cl.send_goaway()



# ---------------------------------------------------------------- faults

def test_concurrent_exec_syncs(cenv):
    out = [None] * 16

    def one(i):
        out[i] = decoded(cenv, exec_sync(cenv, cenv.cri_sock, cenv.cid, ["sh", "-c", f"echo {i}; exit {i}"]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == [(grpc.StatusCode.OK, "", (f"{i}\n".encode(), b"", i)) for i in range(16)]


def test_shim_killed_falls_back_to_containerd(cenv):
    """A container whose shim is gone: Exec answers containerd's own URL,
    ExecSync runs through containerd; the fallback is logged once."""
    sid, ids = cenv.run_pod("victim", {"v": ["sleep", "1000000"]})
    try:
        cid = ids["v"]
        reg = cenv.registration(cid)
        os.kill(reg["shim_pid"], signal.SIGKILL)
        wait_for(lambda: not alive(reg["shim_pid"]), 10, "the shim to die")
        url = exec_url(cenv, cenv.cri_sock, cid, ["sh", "-c", "echo fallback; exit 2"])
        assert not url.startswith(f"http://{reg['cri_endpoint']}/"), url
        assert ws_exec(url) == (b"fallback\n", b"", 2)
        for _ in range(2):
            via = decoded(cenv, exec_sync(cenv, cenv.cri_sock, cid, ["sh", "-c", "echo sync; exit 5"]))
            assert via == (grpc.StatusCode.OK, "", (b"sync\n", b"", 5))
        pf = pf_url(cenv, cenv.cri_sock, sid)
        assert not pf.startswith(f"http://{reg['cri_endpoint']}/"), pf
        assert cenv.log("cri").count(f'"container":"{cid}"') == 1, cenv.log("cri")
        cenv.remove_pod(sid, via_proxy=True)  # StopPodSandbox, RemovePodSandbox through the proxy
        via, direct = both(cenv, "PodSandboxStatus", cenv.api.PodSandboxStatusRequest(pod_sandbox_id=sid))
        assert via == direct and via[0] == grpc.StatusCode.NOT_FOUND
    finally:
        if sid in cenv.pods:
            cenv.remove_pod(sid)


def test_containerd_restarted_under_the_proxy(cenv):
    """Calls fail cleanly while containerd is down, then recover without restarting shimlet-cri."""
    a = cenv.api
    cenv.stop_containerd()
    t0 = time.monotonic()
    code, _, _ = raw(cenv, cenv.cri_sock, V1 + "Version", a.VersionRequest().SerializeToString(), timeout=20)
    assert code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 5, code
    # ExecSync needs no runtime: the shim still serves it.
    assert decoded(cenv, exec_sync(cenv, cenv.cri_sock, cenv.cid, ["echo", "up"]))[2] == (b"up\n", b"", 0)
    cenv.start_containerd()
    wait_for(lambda: raw(cenv, cenv.cri_sock, V1 + "Version", a.VersionRequest().SerializeToString())[0] ==
             grpc.StatusCode.OK, 15, "the proxy to reach the restarted containerd")
    via, direct = both(cenv, "ContainerStatus", a.ContainerStatusRequest(container_id=cenv.cid))
    assert via == direct and via[0] == grpc.StatusCode.OK


# ---------------------------------------------------------------- a fake runtime: the proxy is byte-transparent

class EchoRuntime(grpc.GenericRpcHandler):
    """Every method, raw bytes: /x.Echo/Unary returns the request and reports
    the metadata and deadline it got in its trailers; Fail answers a status
    with details and trailers; Stream sends 3 messages; Bidi echoes each
    message as it comes; anything else echoes the request (the interceptor's
    fallbacks land here)."""

    def service(self, details):
        m = details.method

        def handler(requests, ctx):
            md = dict(ctx.invocation_metadata())
            if m.endswith("/Bidi"):
                for r in requests:
                    yield r
                return
            reqs = list(requests)
            assert len(reqs) == 1, reqs
            req = reqs[0]
            ctx.send_initial_metadata([("x-initial", "hello")])
            left = ctx.time_remaining()
            ctx.set_trailing_metadata([("x-got-" + k, v) for k, v in md.items() if k.startswith("x-")] +
                                      [("x-deadline", str(left)), ("x-method", m)])
            if m.endswith("/Fail"):
                ctx.set_trailing_metadata([("x-trailer-bin", b"\x00\xff")])
                ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now: " + req.decode(errors="replace"))
            if m.endswith("/Stream"):
                for i in range(3):
                    yield req + bytes([i])
                return
            yield req

        return grpc.stream_stream_rpc_method_handler(handler)


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    from concurrent import futures
    d = tmp_path_factory.mktemp("cri-echo")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((EchoRuntime(),))
    server.add_insecure_port(f"unix:{d}/runtime.sock")
    server.start()
    os.makedirs(d / "state")
    log = open(d / "cri.log", "wb")
    p = subprocess.Popen([CRI, "--listen", str(d / "cri.sock"), "--runtime-endpoint", f"unix://{d}/runtime.sock",
                          "--state-dir", str(d / "state")], stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for(lambda: p.poll() is None and os.path.exists(d / "cri.sock"), 30, "shimlet-cri's socket")
        ch = grpc.insecure_channel(f"unix:{d}/cri.sock")
        yield ch, d
        ch.close()
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
        log.close()
        server.stop(0)
        assert p.returncode == 0, (d / "cri.log").read_text()


def test_unary_bytes_metadata_deadline_and_trailers_pass_through(echo):
    ch, _ = echo
    body = bytes(range(256)) * 10 + b"\xf8\xff\xff\xff\x0f\x01"  # anything, unknown fields or not
    call = ch.unary_unary("/x.Echo/Unary")
    resp, c = call.with_call(body, timeout=7, metadata=[("x-user", "kubelet"), ("x-bin-bin", b"\x01\x00")])
    assert resp == body
    assert ("x-initial", "hello") in c.initial_metadata()
    t = dict(c.trailing_metadata())
    assert t["x-got-x-user"] == "kubelet" and t["x-got-x-bin-bin"] == b"\x01\x00" and t["x-method"] == "/x.Echo/Unary"
    # gRPC sends a deadline as a timeout rounded up in its unit (the server
    # saw 7.008 s once): forwarded, not the client's exact figure.
    assert 5 < float(t["x-deadline"]) <= 7.1, t["x-deadline"]


def test_status_details_and_trailers_pass_through(echo):
    ch, _ = echo
    with pytest.raises(grpc.RpcError) as e:
        ch.unary_unary("/x.Echo/Fail")(b"abc", timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and e.value.details() == "not now: abc"
    assert dict(e.value.trailing_metadata())["x-trailer-bin"] == b"\x00\xff"


def test_streaming_both_ways_passes_through(echo):
    ch, _ = echo
    assert list(ch.unary_stream("/x.Echo/Stream")(b"s", timeout=10)) == [b"s\x00", b"s\x01", b"s\x02"]
    msgs = [os.urandom(n) for n in (1, 1000, 100000, 3 << 20)]
    assert list(ch.stream_stream("/x.Echo/Bidi")(iter(msgs), timeout=30)) == msgs


def test_intercepted_methods_without_a_shim_reach_the_runtime_unchanged(echo):
    """No registration for the container: Exec/ExecSync/PortForward go to the
    runtime as the kubelet sent them, fields this proxy does not know included."""
    ch, d = echo
    extra = bytes([0xba, 0x3e, 0x02]) + b"hi"  # field 1000 (length-delimited "hi")
    for method, req in [("ExecSync", b"\x0a\x05cid01\x12\x04true" + extra),
                        ("Exec", b"\x0a\x05cid01\x12\x02sh\x28\x01" + extra),
                        ("PortForward", b"\x0a\x05sbx01\x10\x50" + extra)]:
        for v in ("v1", "v1alpha2"):
            resp, c = ch.unary_unary(f"/runtime.{v}.RuntimeService/{method}").with_call(req, timeout=10)
            assert resp == req and dict(c.trailing_metadata())["x-method"] == f"/runtime.{v}.RuntimeService/{method}"
    log = (d / "cri.log").read_text()
    assert log.count('"container":"cid01"') == 1, log  # logged once per container


def test_runtime_down_fails_cleanly(tmp_path):
    """No runtime behind the proxy: UNAVAILABLE at once, no hang."""
    log = open(tmp_path / "cri.log", "wb")
    p = subprocess.Popen([CRI, "--listen", str(tmp_path / "cri.sock"), "--runtime-endpoint",
                          f"unix://{tmp_path}/none.sock", "--state-dir", str(tmp_path)], stdout=log, stderr=log)
    try:
        wait_for(lambda: os.path.exists(tmp_path / "cri.sock"), 30, "shimlet-cri's socket")
        with grpc.insecure_channel(f"unix:{tmp_path}/cri.sock") as ch:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(V1 + "Version")(b"", timeout=20)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 5
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
        log.close()
