"""Bad input against a real hooked runc container: every bad ticket, request,
HTTP/2 stream or byte stream is refused with a clear error, logged as an
audit line in STATE/<id>/shim.log, and the shim keeps serving afterwards
(same shim pid, `shimctl --local exec ID -- echo ok` still works).

The requests come from tests/tools/probe.cc (shimlet-probe), which can send
what shimctl never would: arbitrary tickets, malformed HTTP/2, garbage."""
import base64
import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from containers import BIN, run
from test_exec import ShimEnv, alive, wait_for

PROBE = os.path.join(BIN, "shimlet-probe")
PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pf_peers.py")
EXEC_OK = json.dumps({"command": ["echo", "ok"], "stdin": False, "tty": False})

# HTTP/2 error codes (RFC 9113 section 7).
PROTOCOL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM = 1, 6, 7


@pytest.fixture(scope="module")
def env():
    if not os.access(PROBE, os.X_OK):
        raise AssertionError(f"{PROBE} missing: build first (scripts/build)")
    e = ShimEnv()
    try:
        yield e
    finally:
        e.cleanup()


@pytest.fixture(scope="module")
def ctr(env):
    return env.container()


@pytest.fixture(scope="module")
def other(env):
    return env.container()


class ShimLog:
    """The lines a test added to STATE/<id>/shim.log."""

    def __init__(self, path):
        self.path = path
        self.start = os.path.getsize(path)

    def lines(self):
        with open(self.path, "rb") as f:
            f.seek(self.start)
            out = []
            for raw in f.read().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(raw))
            return out

    def refusals(self):
        return [l for l in self.lines() if l.get("level") == "audit" and l.get("msg") == "request.refused"]

    def wait_refusal(self, text, timeout=10):
        """The audit line for this refusal (its reason contains text)."""
        return wait_for(lambda: next((l for l in self.refusals() if text in l.get("reason", "")), None), timeout,
                        f"audit request.refused with {text!r} in {self.path}; got {self.refusals()}")


@pytest.fixture
def shimlog(env, ctr):
    """Per test: a view of the new shim.log lines; afterwards the shim must
    still be the same process and still serve a normal exec."""
    pid = env.registration(ctr.id)["shim_pid"]
    log = ShimLog(os.path.join(env.state, ctr.id, "shim.log"))
    yield log
    assert alive(pid), "the shim died"
    assert env.registration(ctr.id)["shim_pid"] == pid
    p = subprocess.run(env.shimctl("exec", ctr.id, "--", "echo", "ok"), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, b"ok\n"), p.stderr
    assert env.registration(ctr.id)["shim_pid"] == pid


def probe(env, ctr, *args, timeout=90):
    p = subprocess.run([PROBE, "--state-dir", env.state, "--id", ctr.id, "--timeout", "20", *args],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert "probe_error" not in out, out
    return out


def claims(ctr, **kw):
    c = {"iss": "local", "sub": "badinput-test", "aud": ctr.id, "verb": "exec", "cmd": ["echo", "ok"],
         "cnf_jkt": "self"}
    c.update(kw)
    return json.dumps({k: v for k, v in c.items() if v is not None})


def mint_args(ctr, **kw):
    return ["--mint", "--claims", claims(ctr, **kw)]


def exec_header(command=("echo", "ok"), stdin=False, tty=False):
    return ["--header", "shimlet-exec:" + json.dumps({"command": list(command), "stdin": stdin, "tty": tty})]


def assert_refused(out, status, text):
    assert out["status"] == status, out
    assert text in out.get("error", ""), out
    assert "stdout" not in out, out  # nothing ran


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def b64url_dec(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


# ---- the probe works: a good ticket runs the command ----

def test_good_ticket_runs(env, ctr, shimlog):
    out = probe(env, ctr, *mint_args(ctr), *exec_header())
    assert (out["status"], out["stdout"], out["exit_code"]) == (200, "ok\n", 0), out
    assert not shimlog.refusals()


# ---- tickets ----

@pytest.mark.parametrize("auth,text", [
    ("Bearer garbage", "ticket is not a compact JWS"),
    ("Bearer a.b.c", "ticket header is not base64url"),
    ("Bearer " + "A" * 70000, "ticket too large"),
])
def test_garbage_ticket(env, ctr, shimlog, auth, text):
    out = probe(env, ctr, "--header", "authorization:" + auth, *exec_header())
    assert_refused(out, 403, text)
    shimlog.wait_refusal(text)


def test_no_ticket(env, ctr, shimlog):
    out = probe(env, ctr, *exec_header())
    assert_refused(out, 401, "missing ticket")
    shimlog.wait_refusal("missing ticket")
    out = probe(env, ctr, "--header", "authorization:Basic cm9vdDpyb290", *exec_header())
    assert_refused(out, 401, "missing ticket")


def test_expired(env, ctr, shimlog):
    now = int(time.time())
    out = probe(env, ctr, *mint_args(ctr, iat=now - 100, exp=now - 60), *exec_header())
    assert_refused(out, 403, "ticket expired")
    shimlog.wait_refusal("ticket expired")


def test_not_yet_valid(env, ctr, shimlog):
    now = int(time.time())
    out = probe(env, ctr, *mint_args(ctr, iat=now + 100, exp=now + 130), *exec_header())
    assert_refused(out, 403, "ticket not valid yet")
    shimlog.wait_refusal("ticket not valid yet")


def test_lifetime_too_long(env, ctr, shimlog):
    now = int(time.time())
    out = probe(env, ctr, *mint_args(ctr, iat=now, exp=now + 3600), *exec_header())
    assert_refused(out, 403, "exceeds the maximum 300s")
    shimlog.wait_refusal("ticket lifetime 3600s exceeds the maximum")


def test_replayed(env, ctr, shimlog):
    out = probe(env, ctr, "--repeat-ticket", *mint_args(ctr), *exec_header())
    assert (out["first"]["status"], out["first"]["stdout"]) == (200, "ok\n"), out
    assert_refused(out["second"], 403, "ticket already used (replay refused)")
    shimlog.wait_refusal("ticket already used")


def test_forged_untrusted_key(env, ctr, shimlog, tmp_path):
    key = tmp_path / "evil.key"
    run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)])
    # Claiming the trusted kid does not help: the signature does not verify.
    out = probe(env, ctr, "--key", str(key), "--kid", "local", *mint_args(ctr), *exec_header())
    assert_refused(out, 403, "ticket signature invalid")
    shimlog.wait_refusal("ticket signature invalid")
    out = probe(env, ctr, "--key", str(key), "--kid", "evil", *mint_args(ctr), *exec_header())
    assert_refused(out, 403, 'ticket kid "evil" is not trusted')
    shimlog.wait_refusal("is not trusted")


def test_tampered_payload(env, ctr, shimlog):
    tok = probe(env, ctr, "--mint-only", "--claims", claims(ctr))["ticket"]
    h, p, s = tok.split(".")
    body = json.loads(b64url_dec(p))
    body["cmd"] = ["sh", "-c", "echo pwned"]
    forged = ".".join([h, b64url(json.dumps(body).encode()), s])
    out = probe(env, ctr, "--ticket", forged, *exec_header(["sh", "-c", "echo pwned"]))
    assert_refused(out, 403, "ticket signature invalid")
    shimlog.wait_refusal("ticket signature invalid")
    # A flipped signature bit, and alg "none", are refused as well.
    flipped = s[:10] + ("A" if s[10] != "A" else "B") + s[11:]
    out = probe(env, ctr, "--ticket", ".".join([h, p, flipped]), *exec_header())
    assert_refused(out, 403, "ticket signature invalid")
    none = b64url(json.dumps({"alg": "none", "typ": "shimlet-ticket+jwt"}).encode())
    out = probe(env, ctr, "--ticket", ".".join([none, p, ""]), *exec_header())
    assert_refused(out, 403, 'ticket alg "none" is not allowed')


def test_other_containers_ticket(env, ctr, other, shimlog):
    out = probe(env, ctr, *mint_args(ctr, aud=other.id), *exec_header())
    assert_refused(out, 403, f"ticket is for container {other.id}, not {ctr.id}")
    shimlog.wait_refusal(f"ticket is for container {other.id}")
    # ... and it is good where it belongs.
    out = probe(env, other, *mint_args(other), *exec_header())
    assert (out["status"], out["stdout"]) == (200, "ok\n"), out


def test_ticket_for_other_argv(env, ctr, shimlog):
    out = probe(env, ctr, *mint_args(ctr, cmd=["echo", "ok"]), *exec_header(["sh", "-c", "echo pwned"]))
    assert_refused(out, 403, "ticket does not allow this command")
    shimlog.wait_refusal("ticket does not allow this command")
    # Nothing ran, so no session ended: no "session.end" audit line for it.
    wait_for(lambda: any(l.get("msg") == "connection closed" for l in shimlog.lines()), 10, "connection closed")
    assert not [l for l in shimlog.lines() if l.get("msg") == "session.end"], shimlog.lines()
    # Same words, different argv split.
    out = probe(env, ctr, *mint_args(ctr, cmd=["echo", "ok"]), *exec_header(["echo ok"]))
    assert_refused(out, 403, "ticket does not allow this command")


@pytest.mark.parametrize("ticket_flags,req_flags", [
    ({}, {"stdin": True}),
    ({}, {"tty": True}),
    ({"stdin": True}, {}),
    ({"tty": True, "stdin": True}, {"stdin": True}),
])
def test_ticket_for_other_stdin_tty(env, ctr, shimlog, ticket_flags, req_flags):
    out = probe(env, ctr, *mint_args(ctr, **ticket_flags), *exec_header(**req_flags))
    assert_refused(out, 403, "ticket does not allow these stdin/tty flags")
    shimlog.wait_refusal("ticket does not allow these stdin/tty flags")


def test_ticket_bound_to_another_key(env, ctr, shimlog):
    other_jkt = b64url(os.urandom(32))
    out = probe(env, ctr, *mint_args(ctr, cnf_jkt=other_jkt), *exec_header())
    assert_refused(out, 403, "ticket is bound to another client key")
    shimlog.wait_refusal("ticket is bound to another client key")
    out = probe(env, ctr, "--no-client-cert", *mint_args(ctr), *exec_header())
    assert_refused(out, 403, "no client certificate was presented")
    shimlog.wait_refusal("no client certificate was presented")


def test_wrong_verb(env, ctr, shimlog):
    pf = mint_args(ctr, verb="portforward", cmd=None, ports=[{"port": 8080, "proto": "tcp"}])
    out = probe(env, ctr, *pf, *exec_header())
    assert_refused(out, 403, "ticket is for portforward, not exec")
    shimlog.wait_refusal("ticket is for portforward, not exec")
    out = probe(env, ctr, *mint_args(ctr), "--path", "/v1/portforward/8080")
    assert_refused(out, 403, "ticket is for exec, not portforward")
    shimlog.wait_refusal("ticket is for exec, not portforward")
    out = probe(env, ctr, *mint_args(ctr), "--path", "/v1/portforward")
    assert_refused(out, 403, "ticket is for exec, not portforward")


def test_wrong_verb_on_an_authenticated_connection(env, ctr, shimlog):
    # A port-forward connection is authenticated once; its ticket must still
    # not open an exec on that connection.
    pf = mint_args(ctr, verb="portforward", cmd=None, ports=[{"port": 8080, "proto": "tcp"}])
    out = probe(env, ctr, *pf, "--path", "/v1/portforward", "--also", "/v1/exec", *exec_header())
    assert out["status"] == 200, out
    assert_refused(out["second"], 403, "ticket is for portforward, not exec")
    shimlog.wait_refusal("ticket is for portforward, not exec")


def test_portforward_other_port(env, ctr, shimlog):
    pf = mint_args(ctr, verb="portforward", cmd=None, ports=[{"port": 8080, "proto": "tcp"}])
    out = probe(env, ctr, *pf, "--path", "/v1/portforward/8081")
    assert_refused(out, 403, "ticket does not allow port 8081/tcp")
    shimlog.wait_refusal("ticket does not allow port 8081/tcp")
    out = probe(env, ctr, *pf, "--path", "/v1/portforward/8080/udp")
    assert_refused(out, 403, "ticket does not allow port 8080/udp")
    for bad in ("/v1/portforward/0", "/v1/portforward/99999", "/v1/portforward/80x", "/v1/portforward/8080/sctp"):
        out = probe(env, ctr, *pf, "--path", bad)
        assert out["status"] == 400 and ("bad port-forward path" in out["error"] or "out of range" in out["error"]), (
            bad, out)


def test_unknown_endpoint_and_method(env, ctr, shimlog):
    out = probe(env, ctr, *mint_args(ctr), "--path", "/v1/nope")
    assert_refused(out, 404, "no such endpoint: /v1/nope")
    shimlog.wait_refusal("no such endpoint")
    out = probe(env, ctr, *mint_args(ctr), "--method", "GET", *exec_header())
    assert_refused(out, 405, "exec needs POST")


def test_bad_exec_header(env, ctr, shimlog):
    out = probe(env, ctr, *mint_args(ctr))
    assert_refused(out, 400, "missing shimlet-exec header")
    out = probe(env, ctr, *mint_args(ctr), "--header", "shimlet-exec:{not json")
    assert_refused(out, 400, "must be a JSON object with a command array")
    shimlog.wait_refusal("must be a JSON object")


# ---- streams ----

@pytest.fixture
def echo_peer(ctr):
    port = 7000 + os.getpid() % 1000
    p = subprocess.Popen(["nsenter", f"--net=/proc/{ctr.pid}/ns/net", "/usr/bin/python3", PEERS, "echo", str(port)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        assert p.stdout.readline().strip() == b"ready", p.stderr.read()
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_too_many_streams_refused_cleanly(env, ctr, shimlog, echo_peer):
    pf = mint_args(ctr, verb="portforward", cmd=None, ports=[{"port": echo_peer, "proto": "tcp"}])
    out = probe(env, ctr, *pf, "--path", f"/v1/portforward/{echo_peer}", "--streams", "1030", timeout=180)
    # 1024 concurrent streams (proto/h2.h max_concurrent_streams) are served;
    # the rest get RST_STREAM REFUSED_STREAM (retryable), nothing else dies.
    assert out["goaway"] is None, out
    assert not out["closed"], out
    assert out["status"] == {"200": 1024}, out
    assert out["refused"] == 6 and out["rst"] == {str(REFUSED_STREAM): 6}, out
    assert out["unanswered"] == 0, out
    assert out["echo_ok"], out
    shimlog.wait_refusal("too many concurrent streams")


# ---- malformed HTTP/2, garbage ----

@pytest.mark.parametrize("kind,code", [
    ("headers-stream0", PROTOCOL_ERROR),
    ("data-stream0", PROTOCOL_ERROR),
    ("window-zero", PROTOCOL_ERROR),
    ("bad-length", FRAME_SIZE_ERROR),
    ("oversize", FRAME_SIZE_ERROR),
])
def test_malformed_http2(env, ctr, shimlog, kind, code):
    out = probe(env, ctr, *mint_args(ctr), *exec_header(), "--bad-h2", kind)
    # The server says why (GOAWAY with the error code) and closes.
    assert out["goaway"] is not None and out["goaway"]["error_code"] == code, out
    assert out["closed"], out
    line = shimlog.wait_refusal("HTTP/2 protocol error")
    assert out["goaway"]["debug"] == "" or out["goaway"]["debug"] in line["reason"], (out, line)
    assert not [l for l in shimlog.lines() if l.get("msg") == "exec.start"], "a malformed connection ran something"


def test_garbage_after_tls(env, ctr, shimlog):
    out = probe(env, ctr, "--garbage-after-tls", "--bytes", "8192")
    assert out["closed"], out
    shimlog.wait_refusal("HTTP/2 protocol error")


def test_raw_garbage_without_tls(env, ctr, shimlog):
    out = probe(env, ctr, "--raw-garbage", "--bytes", "8192")
    assert out["closed"], out
    line = shimlog.wait_refusal("TLS handshake failed")
    assert "TLS" in line["reason"], line


def test_silent_client_times_out(env, ctr, shimlog):
    # A TCP connection that never starts TLS is dropped after the handshake
    # timeout (10 s), not held forever.
    import socket
    host, port = env.registration(ctr.id)["endpoint"].rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    try:
        s.settimeout(30)
        t0 = time.time()
        assert s.recv(100) == b""
        assert time.time() - t0 < 25
    finally:
        s.close()
    shimlog.wait_refusal("TLS handshake timed out")


# ---- the local socket (STATE/<id>/shim.sock: root only, HTTP/2 without TLS) ----

def local_socket_client(env, ctr, data, uid=None):
    """Connects to the shim's local socket (as uid, keeping CAP_DAC_OVERRIDE so
    the 0700 directory and 0600 socket do not stop it first), sends data and
    returns what came back before the shim closed the connection."""
    sock = env.registration(ctr.id)["local_socket"]
    script = ("import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);s.settimeout(30);"
              "out=b''\n"
              # The peer may close before all of ours is sent (EPIPE) or with it unread (ECONNRESET).
              "try:\n s.sendall(bytes.fromhex(sys.argv[2]))\n"
              "except (BrokenPipeError, ConnectionResetError): pass\n"
              "try:\n while True:\n  d=s.recv(65536)\n  if not d: break\n  out+=d\n"
              "except ConnectionResetError: pass\n"
              "sys.stdout.write(out.hex())")
    argv = ["/usr/bin/python3", "-c", script, sock, data.hex()]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=+dac_override",
                "--ambient-caps=+dac_override", *argv]
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return bytes.fromhex(p.stdout.decode())


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + empty SETTINGS


def test_local_socket_refuses_other_uids(env, ctr, shimlog):
    # Past the file permissions (CAP_DAC_OVERRIDE), a non-root peer is still
    # refused: the session checks SO_PEERCRED before any HTTP/2.
    out = local_socket_client(env, ctr, H2_PREFACE, uid=65534)
    assert out == b"", out  # not even the server's SETTINGS
    line = shimlog.wait_refusal("peer uid 65534 is not 0")
    assert line["peer"].startswith("unix:pid=") and line["peer"].endswith(",uid=65534"), line


def test_local_socket_without_dac_override_cannot_connect(env, ctr):
    sock = env.registration(ctr.id)["local_socket"]
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                        "/usr/bin/python3", "-c", "import socket,sys;socket.socket(socket.AF_UNIX).connect(sys.argv[1])", sock],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert p.returncode != 0 and b"PermissionError" in p.stderr, p.stderr


def test_local_socket_garbage(env, ctr, shimlog):
    out = local_socket_client(env, ctr, os.urandom(8192))
    # The server's SETTINGS (and window), then the close (a bad client preface
    # gets no GOAWAY): nothing else, nothing ran.
    assert out[3] == 0x4 and len(out) < 256, out
    shimlog.wait_refusal("HTTP/2 protocol error")
    assert not [l for l in shimlog.lines() if l.get("msg") == "exec.start"], "garbage ran something"


def test_local_socket_ticket_bound_to_a_key_needs_tls(env, ctr, shimlog):
    # A ticket whose cnf binds a client key cannot be used over the local
    # socket (there is no certificate to prove the key): refused.
    out = probe(env, ctr, "--local-socket", *mint_args(ctr), *exec_header())
    assert_refused(out, 403, "no client certificate was presented")
    shimlog.wait_refusal("no client certificate was presented")
