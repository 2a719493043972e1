"""Kubernetes streaming over SPDY/3.1 against the real shim: exec
(v4..v2.channel.k8s.io, channel.k8s.io) and port-forward (portforward.k8s.io),
as a plain `Upgrade: SPDY/3.1` and tunnelled in WebSocket
(SPDY/3.1+portforward.k8s.io), driven by a small SPDY client written here with
the Python stdlib (zlib, ssl, socket) and behaving like client-go/spdystream:
it creates one stream at a time and waits for each SYN_REPLY, never sends
WINDOW_UPDATE, and tunnels SPDY bytes in WebSocket binary messages.

Real runc containers hooked to shimlet-hook; tickets are minted here with the
state dir's local.key (python3-cryptography), like `shimctl --local` does."""
import base64
import hashlib
import json
import os
import queue
import random
import select
import socket
import ssl
import struct
import threading
import time
import uuid
import zlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from test_portforward import env, wait_for  # noqa: F401 (env: the fixture)

SEQ_N = 2000000

# ------------------------------------------------------------------ SPDY/3


def spdy3_dictionary():
    """The SPDY/3 header dictionary (spec section 2.6.10.1), rebuilt here
    independently of proto/spdy.cc: length-prefixed words, then raw text."""
    words = ("options head post put delete trace accept accept-charset accept-encoding accept-language "
             "accept-ranges age allow authorization cache-control connection content-base content-encoding "
             "content-language content-length content-location content-md5 content-range content-type date etag "
             "expect expires from host if-match if-modified-since if-none-match if-range if-unmodified-since "
             "last-modified location max-forwards pragma proxy-authenticate proxy-authorization range referer "
             "retry-after server te trailer transfer-encoding upgrade user-agent vary via warning www-authenticate "
             "method get status").split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie",
                                             "keep-alive", "origin"]
    d = b"".join(struct.pack(">I", len(w)) + w.encode() for w in words)
    d += (b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
          b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
          b"403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
          b"Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
          b"chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
          b"text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
    assert len(d) == 1423 and zlib.adler32(d) == 0xE3C6A7C2
    return d


DICT = spdy3_dictionary()
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FIN = 1


def control(ftype, flags, payload):
    return struct.pack(">HHI", 0x8003, ftype, flags << 24 | len(payload)) + payload


def data_frame(sid, data, flags=0):
    return struct.pack(">II", sid, flags << 24 | len(data)) + data


def header_block(headers):
    out = struct.pack(">I", len(headers))
    for k, v in headers.items():
        k, v = k.encode(), v.encode()
        out += struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v
    return out


def parse_block(b):
    (n,), off, h = struct.unpack_from(">I", b), 4, {}
    for _ in range(n):
        (ln,) = struct.unpack_from(">I", b, off)
        k = b[off + 4:off + 4 + ln].decode()
        off += 4 + ln
        (lv,) = struct.unpack_from(">I", b, off)
        h[k] = b[off + 4:off + 4 + lv].decode()
        off += 4 + lv
    assert off == len(b)
    return h


class Stream:
    def __init__(self, sid):
        self.id = sid
        self.replied = threading.Event()
        self.fin = threading.Event()  # the server's FIN (or RST)
        self.reset = None
        self.data = bytearray()
        self.cond = threading.Condition()
        self.reply_headers = None

    def wait_reply(self, timeout=30):
        assert self.replied.wait(timeout), f"no SYN_REPLY for stream {self.id}"
        assert self.reset is None, f"stream {self.id} reset: {self.reset}"

    def wait_fin(self, timeout=60):
        assert self.fin.wait(timeout), f"no FIN on stream {self.id} (got {len(self.data)} bytes)"
        return bytes(self.data)


class SerialTls:
    """One TLS connection shared by a reader thread and sender threads.

    An OpenSSL SSL object must not be used by two threads at once, and
    Python's ssl module releases the GIL inside SSL_read/SSL_write: a blocking
    recv() in the reader racing a sendall() in a sender corrupts the
    connection state (seen as a spurious EOF under load). Here every SSL call
    holds one lock on a non-blocking socket, and waiting happens outside it."""

    def __init__(self, sock, timeout=60):
        self.sock, self.lock, self.timeout = sock, threading.Lock(), timeout
        sock.setblocking(False)

    def _wait(self, readable, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("TLS connection idle too long")
        select.select([self.sock] if readable else [], [] if readable else [self.sock], [], min(left, 0.2))

    def sendall(self, b):
        """All of b; not atomic against other senders (they lock around it)."""
        view, deadline = memoryview(b), time.monotonic() + self.timeout
        while view:
            with self.lock:
                try:
                    n = self.sock.send(view[:1 << 16])
                except ssl.SSLWantReadError:
                    n, readable = 0, True
                except ssl.SSLWantWriteError:
                    n, readable = 0, False
            if n:
                view, deadline = view[n:], time.monotonic() + self.timeout
            else:
                self._wait(readable, deadline)

    def recv(self, n):
        """Some bytes, or b"" at EOF; raises on errors and on a silent peer."""
        deadline = time.monotonic() + self.timeout
        while True:
            with self.lock:
                try:
                    return self.sock.recv(n)
                except ssl.SSLWantReadError:
                    readable = True
                except ssl.SSLWantWriteError:
                    readable = False
            self._wait(readable, deadline)


class RawTransport:
    def __init__(self, sock, leftover=b""):
        self.sock, self.leftover, self.lock = SerialTls(sock), leftover, threading.Lock()

    def send(self, b):
        with self.lock:  # whole frames: sendall may interleave with other senders otherwise
            self.sock.sendall(b)

    def recv(self):
        if self.leftover:
            b, self.leftover = self.leftover, b""
            return b
        try:
            return self.sock.recv(1 << 16)
        except (OSError, ssl.SSLError):
            return b""


class WsTransport:
    """Client side of RFC 6455 carrying SPDY bytes in binary messages."""

    def __init__(self, sock, leftover=b""):
        self.sock, self.buf, self.lock = SerialTls(sock), bytearray(leftover), threading.Lock()
        self.close_code = None

    def _frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _xor(payload, mask)
        with self.lock:
            self.sock.sendall(head + mask + masked)

    def send(self, b):
        self._frame(2, b)

    def close(self, code=1000):
        self._frame(8, struct.pack(">H", code))

    def _need(self, n):
        while len(self.buf) < n:
            try:
                b = self.sock.recv(1 << 16)
            except (OSError, ssl.SSLError):
                b = b""
            if not b:
                return False
            self.buf += b
        return True

    def recv(self):
        while True:
            if not self._need(2):
                return b""
            b0, b1 = self.buf[0], self.buf[1]
            assert not b1 & 0x80, "server frames must not be masked"
            n, off = b1 & 0x7F, 2
            if n == 126:
                if not self._need(4):
                    return b""
                n, off = struct.unpack_from(">H", self.buf, 2)[0], 4
            elif n == 127:
                if not self._need(10):
                    return b""
                n, off = struct.unpack_from(">Q", self.buf, 2)[0], 10
            if not self._need(off + n):
                return b""
            payload = bytes(self.buf[off:off + n])
            del self.buf[:off + n]
            op = b0 & 0x0F
            if op in (0, 2):
                if payload:
                    return payload
            elif op == 9:
                self._frame(10, payload)
            elif op == 8:
                self.close_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                return b""
            elif op == 1:
                raise AssertionError("text frame in the SPDY tunnel")


def _xor(data, mask):
    n = len(data)
    m = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ m).to_bytes(n, "big")


class SpdyClient:
    """client-go/spdystream-like: odd stream ids, one zlib stream per
    direction, echoes PINGs, ignores windows (never sends WINDOW_UPDATE)."""

    def __init__(self, transport):
        self.t = transport
        self.comp = zlib.compressobj(zdict=DICT)
        self.decomp = zlib.decompressobj(zdict=DICT)
        self.lock = threading.Lock()
        self.next_id = 1
        self.streams = {}
        self.goaway = None
        self.pings = []
        self.eof = threading.Event()
        self.frames = queue.Queue()  # every control frame seen: (type, flags, payload)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def open(self, headers, fin=False):
        with self.lock:
            sid = self.next_id
            self.next_id += 2
            st = Stream(sid)
            self.streams[sid] = st
            block = self.comp.compress(header_block(headers)) + self.comp.flush(zlib.Z_SYNC_FLUSH)
            self.t.send(control(SYN_STREAM, FIN if fin else 0, struct.pack(">IIH", sid, 0, 0) + block))
        return st

    def send(self, st, data, fin=False):
        for i in range(0, max(len(data), 1), 32768):
            chunk = data[i:i + 32768]
            last = i + 32768 >= len(data)
            self.t.send(data_frame(st.id, chunk, FIN if (fin and last) else 0))

    def fin(self, st):
        self.t.send(data_frame(st.id, b"", FIN))

    def rst(self, st, status=5):
        self.t.send(control(RST_STREAM, 0, struct.pack(">II", st.id, status)))

    def send_goaway(self):
        self.t.send(control(GOAWAY, 0, struct.pack(">II", 0, 0)))

    def raw(self, b):
        self.t.send(b)

    def _read(self):
        buf = bytearray()

        def need(n):
            while len(buf) < n:
                b = self.t.recv()
                if not b:
                    return False
                buf.extend(b)
            return True

        try:
            while need(8):
                w0, w1 = struct.unpack_from(">II", buf)
                n = w1 & 0xFFFFFF
                if not need(8 + n):
                    break
                payload = bytes(buf[8:8 + n])
                del buf[:8 + n]
                flags = w1 >> 24
                if w0 & 0x80000000:
                    self._control(w0 & 0xFFFF, flags, payload)
                else:
                    st = self.streams.get(w0 & 0x7FFFFFFF)
                    assert st is not None, f"data for unknown stream {w0 & 0x7FFFFFFF}"
                    assert st.replied.is_set(), "data before SYN_REPLY"
                    with st.cond:
                        st.data += payload
                        st.cond.notify_all()
                    if flags & FIN:
                        st.fin.set()
        finally:
            self.eof.set()
            for st in list(self.streams.values()):
                st.replied.set()
                st.fin.set()

    def _control(self, ftype, flags, p):
        self.frames.put((ftype, flags, p))
        if ftype == SYN_REPLY:
            sid = struct.unpack_from(">I", p)[0] & 0x7FFFFFFF
            st = self.streams[sid]
            st.reply_headers = parse_block(self.decomp.decompress(p[4:]))
            st.replied.set()
            if flags & FIN:
                st.fin.set()
        elif ftype == RST_STREAM:
            sid, status = struct.unpack(">II", p)
            st = self.streams.get(sid)
            if st:
                st.reset = status
                st.replied.set()
                st.fin.set()
        elif ftype == PING:
            self.pings.append(struct.unpack(">I", p)[0])
        elif ftype == GOAWAY:
            self.goaway = struct.unpack(">II", p)
        elif ftype == HEADERS:
            self.decomp.decompress(p[4:])


# ------------------------------------------------------------ environment


def mint(env, cid, verb, **claims):
    """A ticket signed with the node's local.key, as `shimctl --local` mints."""
    with open(os.path.join(env.state, "local.key"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    now = int(time.time())
    payload = {"iss": "local", "sub": "spdy-test", "aud": cid, "iat": now, "exp": now + 60,
               "jti": uuid.uuid4().hex, "verb": verb, **claims}
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    signing_input = b64(json.dumps({"alg": "EdDSA", "typ": "shimlet-ticket+jwt", "kid": "local"}).encode()) + "." + \
        b64(json.dumps(payload).encode())
    return signing_input + "." + b64(key.sign(signing_input.encode()))


def tls_connect(env, cid):
    """TLS to the shim without ALPN (as kubectl), pinned to the registration."""
    reg = env.registration(cid)
    host, port = reg["endpoint"].rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned below instead of a CA
    s = ctx.wrap_socket(socket.create_connection((host.strip("[]"), int(port)), timeout=60))
    cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert reg["pin"] == "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    return s


def read_response_head(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = s.recv(4096)
        if not b:
            break
        buf += b
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    hdrs = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, rest


def upgrade(env, cid, path, ticket, protocols, websocket=False):
    """Sends the upgrade request; returns (status, headers, client or body)."""
    s = tls_connect(env, cid)
    lines = [f"{'GET' if websocket else 'POST'} {path} HTTP/1.1", "Host: shim", f"Authorization: Bearer {ticket}",
             "Connection: Upgrade"]
    if websocket:
        lines += ["Upgrade: websocket", "Sec-WebSocket-Version: 13",
                  f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
                  f"Sec-WebSocket-Protocol: {', '.join(protocols)}"]
    else:
        lines += ["Upgrade: SPDY/3.1"] + [f"X-Stream-Protocol-Version: {p}" for p in protocols]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    status, hdrs, rest = read_response_head(s)
    if status != 101:
        s.settimeout(5)
        body = rest
        try:
            while True:
                b = s.recv(4096)
                if not b:
                    break
                body += b
        except (OSError, ssl.SSLError):
            pass
        s.close()
        return status, hdrs, body
    t = WsTransport(s, rest) if websocket else RawTransport(s, rest)
    return status, hdrs, SpdyClient(t)


def query(argv, stdin, tty, stdout=True, container=None):
    q = "&".join("command=" + _qe(a) for a in argv) + ("&stdout=true" if stdout else "&stdout=false")
    q += "&stdin=true" if stdin else ""
    q += "&tty=true" if tty else "&stderr=true"
    q += "&container=" + _qe(container) if container is not None else ""
    return q


def _qe(s):
    from urllib.parse import quote
    return quote(s, safe="")


def spdy_exec(env, c, argv, stdin=None, tty=False, protocol="v4.channel.k8s.io", resizes=(), shape="api",
              timeout=60, stdout=True, container=None):
    """Runs argv as kubectl exec does over SPDY; returns (stdout, stderr, error-stream bytes, client).
    stdout=False: no stdout stream is created (client-go with Stdout nil); stdout is then None."""
    t = mint(env, c.id, "exec", cmd=list(argv), stdin=stdin is not None, tty=tty)
    if shape == "api":
        path = f"/api/v1/namespaces/default/pods/{c.id}/exec?" + query(argv, stdin is not None, tty, stdout, container)
    else:
        path = f"/exec/{t}"
    status, hdrs, cl = upgrade(env, c.id, path, t, [protocol, "channel.k8s.io"] if protocol != "channel.k8s.io"
                               else [protocol])
    assert status == 101, (status, cl)
    assert hdrs.get("x-stream-protocol-version") == protocol, hdrs
    err = cl.open({"streamtype": "error"})
    err.wait_reply()
    sin = None
    if stdin is not None:
        sin = cl.open({"streamtype": "stdin"})
        sin.wait_reply()
    out = None
    if stdout:
        out = cl.open({"streamtype": "stdout"})
        out.wait_reply()
    serr = None
    if not tty:
        serr = cl.open({"streamtype": "stderr"})
        serr.wait_reply()
    if tty and protocol in ("v4.channel.k8s.io", "v3.channel.k8s.io"):
        rs = cl.open({"streamtype": "resize"})
        rs.wait_reply()
        for delay, (w, h) in resizes:
            time.sleep(delay)
            cl.send(rs, json.dumps({"Width": w, "Height": h}).encode() + b"\n")
    if stdin is not None:
        cl.send(sin, stdin, fin=True)
    status_bytes = err.wait_fin(timeout)
    o = out.wait_fin(timeout) if out else None
    e = serr.wait_fin(timeout) if serr else b""
    # As client-go: reset what is left, GOAWAY, hang up.
    cl.send_goaway()
    assert cl.eof.wait(10), "the shim did not close after GOAWAY"
    return o, e, status_bytes, cl


# ------------------------------------------------------------------ exec


@pytest.mark.parametrize("code", [0, 3, 42])
def test_exec_v4_exit_codes(env, code):
    c = env.container()
    o, e, st, _ = spdy_exec(env, c, ["sh", "-c", f"echo out; echo err >&2; exit {code}"])
    assert o == b"out\n" and e == b"err\n"
    status = json.loads(st)
    if code == 0:
        assert status == {"metadata": {}, "status": "Success"}
    else:
        assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode", status
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": str(code)}], status


@pytest.mark.parametrize("protocol", ["v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"])
def test_exec_older_protocols_report_errors_as_text(env, protocol):
    c = env.container()
    o, _, st, _ = spdy_exec(env, c, ["sh", "-c", "echo hi; exit 3"], protocol=protocol)
    assert o == b"hi\n"
    assert st == b"command terminated with non-zero exit code: exit status 3", st
    o, _, st, _ = spdy_exec(env, c, ["true"], protocol=protocol)
    assert st == b""  # success: nothing on the error stream (kubelet's v1..v3 convention)


def test_exec_cri_shape_and_command_not_found(env):
    c = env.container()
    o, _, st, _ = spdy_exec(env, c, ["echo", "cri"], shape="cri")
    assert o == b"cri\n" and json.loads(st)["status"] == "Success"
    _, e, st, _ = spdy_exec(env, c, ["/no/such/binary"])
    status = json.loads(st)
    assert status["details"]["causes"][0]["message"] == "127", status
    assert b"shimlet:" in e


def test_exec_stdin_piped(env):
    c = env.container()
    data = os.urandom(3 << 20)
    o, _, st, _ = spdy_exec(env, c, ["sha256sum"], stdin=data)
    assert o.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert json.loads(st)["status"] == "Success"
    o, _, _, _ = spdy_exec(env, c, ["cat"], stdin=b"line1\nline2\n")
    assert o == b"line1\nline2\n"


def test_exec_tty_and_resize(env):
    c = env.container()
    o, e, st, _ = spdy_exec(env, c, ["sh", "-c", "sleep 1; stty size; sleep 1.5; stty size; exit 5"], tty=True,
                            resizes=[(0, (123, 45)), (1.5, (100, 30))])
    assert e == b""
    assert b"45 123" in o and b"30 100" in o, o
    assert json.loads(st)["details"]["causes"][0]["message"] == "5"


def test_exec_seq_2000000_complete(env):
    c = env.container()
    o, _, st, _ = spdy_exec(env, c, ["seq", "1", str(SEQ_N)], timeout=120)
    want = b"".join(b"%d\n" % i for i in range(1, SEQ_N + 1))
    assert len(o) == len(want) and o == want
    assert json.loads(st)["status"] == "Success"


def test_exec_claims_must_match(env):
    c = env.container()
    t = mint(env, c.id, "exec", cmd=["id"], stdin=False, tty=False)
    path = f"/api/v1/namespaces/default/pods/{c.id}/exec?" + query(["sh"], False, False)
    status, _, body = upgrade(env, c.id, path, t, ["v4.channel.k8s.io"])
    assert status == 403, (status, body)


def test_exec_stdout_false(env):
    # client-go creates no stdout stream: the command must start without one,
    # its stdout (more than a pipe holds) is discarded, stderr and the status arrive.
    c = env.container()
    for protocol in ("v4.channel.k8s.io", "v2.channel.k8s.io"):
        o, e, st, _ = spdy_exec(env, c, ["sh", "-c", "seq 200000; echo visible >&2; exit 6"], stdout=False,
                                protocol=protocol, timeout=30)
        assert o is None and e == b"visible\n"
        if protocol == "v4.channel.k8s.io":
            assert json.loads(st)["details"]["causes"] == [{"reason": "ExitCode", "message": "6"}], st
        else:
            assert st == b"command terminated with non-zero exit code: exit status 6", st


def test_exec_no_stream_refused_and_container_checked(env):
    c = env.container()
    t = mint(env, c.id, "exec", cmd=["id"], stdin=False, tty=True)
    # tty drops stderr (kubelet), stdout=false: no stream left.
    path = f"/api/v1/namespaces/default/pods/{c.id}/exec?command=id&stdout=false&stderr=true&tty=true"
    status, _, body = upgrade(env, c.id, path, t, ["v4.channel.k8s.io"])
    assert status == 400 and body == b"you must specify at least 1 of stdin, stdout, stderr\n", (status, body)
    t = mint(env, c.id, "exec", cmd=["id"], stdin=False, tty=False)
    path = f"/api/v1/namespaces/default/pods/{c.id}/exec?" + query(["id"], False, False, container="nope")
    status, _, body = upgrade(env, c.id, path, t, ["v4.channel.k8s.io"])
    assert status == 400 and body == f"container nope is not valid for pod {c.id}\n".encode(), (status, body)
    # Its own name (no Kubernetes annotations: the container id) works.
    o, _, st, _ = spdy_exec(env, c, ["echo", "named"], container=c.id)
    assert o == b"named\n" and json.loads(st)["status"] == "Success"


# ------------------------------------------------------------ port-forward


class Forwarder:
    """kubectl port-forward's side: per connection an error and a data stream."""

    def __init__(self, cl):
        self.cl, self.rid, self.lock = cl, 0, threading.Lock()

    def pair(self, port):
        with self.lock:
            rid = str(self.rid)
            self.rid += 1
        err = self.cl.open({"streamtype": "error", "port": str(port), "requestid": rid})
        err.wait_reply()
        self.cl.fin(err)  # client-go closes its side of the error stream at once
        data = self.cl.open({"streamtype": "data", "port": str(port), "requestid": rid})
        data.wait_reply()
        return err, data

    def roundtrip(self, port, payload):
        err, data = self.pair(port)
        self.cl.send(data, payload, fin=True)
        got = data.wait_fin(120)
        return got, err.wait_fin(30)


def pf_session(env, c, ports, websocket):
    t = mint(env, c.id, "portforward", ports=[{"port": p, "proto": "tcp"} for p in ports])
    path = f"/api/v1/namespaces/default/pods/{c.id}/portforward"
    if websocket:
        status, hdrs, cl = upgrade(env, c.id, path, t, ["SPDY/3.1+portforward.k8s.io"], websocket=True)
        assert status == 101 and hdrs.get("sec-websocket-protocol") == "SPDY/3.1+portforward.k8s.io", (status, hdrs)
    else:
        status, hdrs, cl = upgrade(env, c.id, path, t, ["portforward.k8s.io"])
        assert status == 101 and hdrs.get("x-stream-protocol-version") == "portforward.k8s.io", (status, hdrs)
    return Forwarder(cl)


@pytest.mark.parametrize("websocket", [False, True], ids=["spdy", "ws-tunnel"])
def test_portforward_two_ports_refused_port_and_50_concurrent(env, websocket):
    c = env.container()
    env.peer(c, "echo", 7100)
    env.peer(c, "echo", 7101)
    fw = pf_session(env, c, [7100, 7101, 7999], websocket)

    got, err = fw.roundtrip(7100, b"hello 7100")
    assert (got, err) == (b"hello 7100", b"")
    got, err = fw.roundtrip(7101, b"hello 7101")
    assert (got, err) == (b"hello 7101", b"")

    # Nothing listens on 7999: that pair just ends, with nothing on its error
    # stream (any text there makes kubectl >= 1.23 end the whole session),
    # and the session goes on.
    got, err = fw.roundtrip(7999, b"x")
    assert (got, err) == (b"", b""), (got, err)
    # A port the ticket does not name.
    got, err = fw.roundtrip(7102, b"x")
    assert got == b"" and b"not allowed" in err, err

    # 50 concurrent connections over both ports, each checked by sha256.
    results, errors = {}, []

    def one(i):
        try:
            payload = random.Random(i).randbytes(100_000 + i * 4099)
            got, err = fw.roundtrip(7100 + i % 2, payload)
            results[i] = (hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest(), err)
        except BaseException as ex:  # noqa: B902 (reported below)
            errors.append(f"{i}: {ex!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert len(results) == 50 and all(ok and err == b"" for ok, err in results.values()), results

    # Still alive after all of it.
    got, err = fw.roundtrip(7100, b"still here")
    assert (got, err) == (b"still here", b"")
    assert fw.cl.goaway is None and not fw.cl.eof.is_set()
    fw.cl.send_goaway()


def test_portforward_big_transfer_without_window_updates(env):
    """spdystream never returns window: 64 MiB each way must not stall."""
    c = env.container()
    env.peer(c, "echo", 7100)
    fw = pf_session(env, c, [7100], False)
    payload = random.Random(7).randbytes(64 << 20)
    err, data = fw.pair(7100)
    sender = threading.Thread(target=fw.cl.send, args=(data, payload, True))
    sender.start()
    got = data.wait_fin(180)
    sender.join(60)
    assert len(got) == len(payload) and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert err.wait_fin(10) == b""


def test_portforward_any_port_ticket(env):
    """design.md: a ticket port 0 means any TCP port (what the master mints for kubectl)."""
    c = env.container()
    env.peer(c, "echo", 7150)
    fw = pf_session(env, c, [0], False)
    got, err = fw.roundtrip(7150, b"any port")
    assert (got, err) == (b"any port", b"")


def test_portforward_target_closes_first_and_client_reset(env):
    c = env.container()
    env.peer(c, "source", 7300, 1 << 20)  # sends 1 MiB then closes
    env.peer(c, "echo", 7100)
    fw = pf_session(env, c, [7300, 7100], False)
    err, data = fw.pair(7300)
    got = data.wait_fin(60)
    assert len(got) == 1 << 20
    assert err.wait_fin(10) == b""
    # A reset data stream ends that connection only.
    err, data = fw.pair(7100)
    fw.cl.send(data, b"abc")
    fw.cl.rst(data)
    got, e = fw.roundtrip(7100, b"after reset")
    assert (got, e) == (b"after reset", b"")


# ------------------------------------------------------------ bad input


def test_spdy_garbage_and_zlib_bomb_end_only_that_session(env):
    c = env.container()
    env.peer(c, "echo", 7100)
    # Garbage after the upgrade: GOAWAY PROTOCOL_ERROR, connection closed.
    fw = pf_session(env, c, [7100], False)
    fw.cl.raw(b"\x80\x02\x00\x01" + b"\x00" * 60)  # SPDY/2 control frame
    assert fw.cl.eof.wait(10)
    assert fw.cl.goaway and fw.cl.goaway[1] == 1, fw.cl.goaway

    # A zlib bomb in a SYN_STREAM header block: refused the same way.
    fw = pf_session(env, c, [7100], False)
    comp = zlib.compressobj(zdict=DICT)
    big = header_block({"streamtype": "data", "x": "a" * (8 << 20)})
    block = comp.compress(big) + comp.flush(zlib.Z_SYNC_FLUSH)
    fw.cl.raw(control(SYN_STREAM, 0, struct.pack(">IIH", 1, 0, 0) + block))
    assert fw.cl.eof.wait(10)
    assert fw.cl.goaway and fw.cl.goaway[1] == 1, fw.cl.goaway

    # An oversized frame header.
    fw = pf_session(env, c, [7100], False)
    fw.cl.raw(struct.pack(">II", 1, 0xFFFFFF))
    assert fw.cl.eof.wait(10)

    # The shim keeps serving.
    fw = pf_session(env, c, [7100], False)
    got, err = fw.roundtrip(7100, b"ok")
    assert (got, err) == (b"ok", b"")
    # PINGs are echoed.
    fw.cl.raw(control(PING, 0, struct.pack(">I", 41)))
    wait_for(lambda: 41 in fw.cl.pings, 5, "PING echo")
