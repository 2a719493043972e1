"""shimlet-master's GET /metrics (docs/operations.md "Metrics"), read with
python3-prometheus-client's text-format parser, every counter checked against
what this test did to a fresh master: refused credentials, RBAC on the
nonResourceURL /metrics, a real runc container registered by its hook, exec
grants allowed, denied and failing, kubectl-style relay requests, a kubectl
exec relayed and a `shimctl --proxy` tunnel whose byte counts must equal the
audit log's; and
the node's side, `shimlet-node-metrics`, over the same real containers and
over a real shim's counters file after known connections: every field the
shim writes exported once, with the shim's value, sessions by result with their
exact application bytes."""
import calendar
import contextlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from containers import BIN, REPO
from master_env import TOKENS, MasterEnv, wait_for
from test_exec import ShimEnv

# The package's example (deploy/examples/rbac-metrics.yaml), bound to dave (a token user of MasterEnv).
with open(os.path.join(REPO, "deploy/examples/rbac-metrics.yaml")) as _f:
    METRICS_RBAC = _f.read().replace("{kind: User, name: prometheus}", "{kind: User, name: dave}")
assert "name: dave}" in METRICS_RBAC
NODE_METRICS = os.path.join(BIN, "shimlet-node-metrics")
KUBECTL = "/usr/bin/kubectl"
SCRAPER = TOKENS["dave"]  # reads pods and metrics, may not exec


@pytest.fixture(scope="module")
def env():
    rbac = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="metrics-rbac-", delete=False)
    rbac.write(METRICS_RBAC)
    rbac.close()
    e = MasterEnv(extra_args=("--authorization-policy-file", rbac.name))
    try:
        yield e
    finally:
        e.cleanup()
        os.unlink(rbac.name)


def request(env, method, path, token, headers=None):
    ctx = ssl.create_default_context(cafile=env.ca)
    conn = http.client.HTTPSConnection("127.0.0.1", env.port, context=ctx, timeout=10)
    try:
        conn.request(method, path, headers={"Authorization": "Bearer " + token, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.getheader("content-type"), r.read().decode()
    finally:
        conn.close()


class Scrape:
    def __init__(self, env):
        code, ctype, body = request(env, "GET", "/metrics", SCRAPER)
        assert code == 200, body
        assert ctype == "text/plain; version=0.0.4; charset=utf-8", ctype
        self.families = {f.name: f for f in text_string_to_metric_families(body)}
        self.text = body

    def samples(self, name):
        """A sample name's samples; families are named without _total (counters) or _count/_sum/_bucket."""
        for suffix in ("", "_total", "_count", "_sum", "_bucket"):
            fam = name[:-len(suffix)] if suffix and name.endswith(suffix) else name
            if fam in self.families and (suffix or fam == name):
                return [s for s in self.families[fam].samples if s.name == name]
        raise AssertionError(f"no metric family for {name}")

    def value(self, name, absent=None, **labels):
        if absent is not None and not any(name.startswith(f) for f in self.families):
            return absent  # the whole family appears with its first event (a fresh master's first scrape)
        found = [s.value for s in self.samples(name) if all(s.labels.get(k) == v for k, v in labels.items())]
        if not found and absent is not None:
            return absent  # a series that appears with its first event (requests by code)
        assert found, (name, labels)
        return sum(found)


def test_metrics_need_rbac_and_a_user(env):
    assert request(env, "GET", "/metrics", TOKENS["alice"])[0] == 403  # authenticated, no nonResourceURL rule
    assert request(env, "GET", "/metrics", "no-such-token")[0] == 401
    s = Scrape(env)
    assert s.value("shimlet_master_requests_total", handler="metrics", code="403") == 1
    assert s.value("shimlet_master_authentication_failures_total") == 1
    assert s.value("shimlet_master_build_info") == 1
    # every grant series exists from the start
    for verb in ("exec", "portforward"):
        for via in ("grant", "relay"):
            for result in ("allowed", "denied", "error"):
                assert s.value("shimlet_master_grants_total", verb=verb, via=via, result=result) == 0


def relay_request(env, token, pod):
    """kubectl's exec upgrade (SPDY) for pod; returns the HTTP status the master answered."""
    ctx = ssl.create_default_context(cafile=env.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", env.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall((f"POST /api/v1/namespaces/default/pods/{pod}/exec?command=id&stdout=true HTTP/1.1\r\n"
                       f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\n"
                       "Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
                       "Content-Length: 0\r\n\r\n").encode())
            line = s.recv(4096).decode().split("\r\n", 1)[0]
            return int(line.split()[1])


def test_counters_follow_what_happened(env):
    before = Scrape(env)
    base = lambda name, **l: before.value(name, absent=0, **l)  # noqa: E731
    for _ in range(3):
        assert request(env, "GET", "/api/v1/pods", "wrong-token")[0] == 401

    pod = "metrics-" + uuid.uuid4().hex[:6]
    c = env.container(pod)
    wait_for(lambda: pod in env.pods(), 5, "pod registered")
    flags = ["--server", env.url, "--certificate-authority", env.ca]
    assert env.shimctl(*flags, "--token", TOKENS["alice"], "exec", pod, "--", "true").returncode == 0
    assert env.shimctl(*flags, "--token", TOKENS["dave"], "exec", pod, "--", "true").returncode == 255  # RBAC
    assert env.shimctl(*flags, "--token", TOKENS["alice"], "exec", "no-such-pod", "--", "true").returncode == 255
    payload = os.urandom(50000)
    p = env.shimctl(*flags, "--token", TOKENS["alice"], "--proxy", "exec", "-i", pod, "--", "wc", "-c",
                    input=payload, stdin=None)
    assert p.returncode == 0 and p.stdout.split() == [b"50000"], p.stderr
    # kubectl through the master's relay (WebSocket exec): 40000 bytes of stdin in, `wc -c`'s answer and 30000
    # bytes out.
    kube_in = os.urandom(40000)
    k = subprocess.run([KUBECTL, "exec", "-i", pod, "--", "sh", "-c", "wc -c; head -c 30000 /dev/zero"],
                       input=kube_in, capture_output=True, timeout=120,
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("KUBECTL_")},
                            "HOME": env.home, "KUBECONFIG": env.kubeconfig("kubeconfig")})
    assert k.returncode == 0 and k.stdout == b"40000\n" + bytes(30000), k.stderr
    assert relay_request(env, TOKENS["dave"], pod) == 403
    assert relay_request(env, TOKENS["alice"], "no-such-pod") == 404

    # The tunnel's end is audited once both sides closed; the nodes report their session ends.
    tunnel = wait_for(lambda: [l for l in env.audit_lines() if l["event"] == "session_end" and
                               l.get("via") == "tunnel" and l.get("pod") == pod], 10, "tunnel session end")
    relay = wait_for(lambda: [l for l in env.audit_lines() if l["event"] == "session_end" and
                              l.get("via") == "relay" and l.get("pod") == pod], 10, "relay session end")
    wait_for(lambda: len([l for l in env.audit_lines() if l["event"] == "session_end" and l.get("via") == "node"
                          and l.get("pod") == pod]) == 3, 15, "the three exec sessions' end records")
    s = Scrape(env)
    d = lambda name, **l: s.value(name, **l) - base(name, **l)  # noqa: E731

    assert d("shimlet_master_authentication_failures_total") == 3
    assert d("shimlet_master_requests_total", handler="unauthenticated", code="401") == 3
    assert d("shimlet_master_grants_total", verb="exec", via="grant", result="allowed") == 2
    assert d("shimlet_master_grants_total", verb="exec", via="grant", result="denied") == 1
    assert d("shimlet_master_grants_total", verb="exec", via="grant", result="error") == 1
    assert d("shimlet_master_grants_total", verb="exec", via="relay", result="denied") == 1
    assert d("shimlet_master_grants_total", verb="exec", via="relay", result="error") == 1
    assert d("shimlet_master_grants_total", verb="exec", via="relay", result="allowed") == 1
    assert d("shimlet_master_grants_total", verb="portforward") == 0
    assert d("shimlet_master_tunnels_total", result="allowed") == 1
    assert s.value("shimlet_master_registered_containers") == 1
    assert s.value("shimlet_master_registered_nodes") == 1
    assert d("shimlet_master_requests_total", handler="node", code="201") == 1  # first registration
    assert d("shimlet_master_requests_total", handler="node", code="200") >= 1  # the shim's renewals
    node_ends = [l for l in env.audit_lines() if l["event"] == "session_end" and l.get("via") == "node"]
    assert s.value("shimlet_master_session_end_records_total") == len(node_ends)
    # Bytes spliced through the tunnel, counted as they moved, equal what the audit line says at its end.
    assert len(tunnel) == 1
    assert d("shimlet_master_relay_bytes_total", via="tunnel", direction="to_shim") == tunnel[0]["bytes_in"]
    assert d("shimlet_master_relay_bytes_total", via="tunnel", direction="to_client") == tunnel[0]["bytes_out"]
    assert tunnel[0]["bytes_in"] > len(payload)  # TLS records of the whole payload went through
    # The same for kubectl's relay (plaintext, after the request head): the payloads and their WebSocket framing.
    assert len(relay) == 1
    assert d("shimlet_master_relay_bytes_total", via="relay", direction="to_shim") == relay[0]["bytes_in"]
    assert d("shimlet_master_relay_bytes_total", via="relay", direction="to_client") == relay[0]["bytes_out"]
    assert len(kube_in) <= relay[0]["bytes_in"] <= len(kube_in) + 8192, relay
    assert len(k.stdout) <= relay[0]["bytes_out"] <= len(k.stdout) + 8192, relay
    assert s.value("shimlet_master_relays") == 0

    # The latency histogram agrees with the request counters, bucket by bucket.
    for handler in ("grant", "relay", "tunnel", "unauthenticated", "node", "metrics"):
        count = s.value("shimlet_master_request_duration_seconds_count", handler=handler)
        assert count == s.value("shimlet_master_requests_total", handler=handler), handler
        buckets = sorted((float(b.labels["le"]), b.value)
                         for b in s.samples("shimlet_master_request_duration_seconds_bucket")
                         if b.labels["handler"] == handler)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), (handler, buckets)
        assert buckets[-1] == (float("inf"), count), (handler, buckets[-1])
        assert s.value("shimlet_master_request_duration_seconds_sum", handler=handler) >= 0
    assert s.value("process_open_fds") > 0 and s.value("process_resident_memory_bytes") > 1 << 20
    c.stop()
    wait_for(lambda: Scrape(env).value("shimlet_master_registered_containers") == 0, 10, "unregistered")


def node_metrics(env, output):
    config = env.hook_config if isinstance(env, MasterEnv) else env.config
    p = subprocess.run([NODE_METRICS, "--config", config, "--output", output], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0 and p.stdout == "", p.stderr
    with open(output) as f:
        samples = [s for fam in text_string_to_metric_families(f.read()) for s in fam.samples]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}


def test_node_metrics_from_the_hook(env, tmp_path):
    """`shimlet-node-metrics --output` (node_exporter's textfile collector) sees the node's real containers."""
    out = str(tmp_path / "shimlet.prom")
    before = node_metrics(env, out)
    pod = "node-metrics-" + uuid.uuid4().hex[:6]
    c = env.container(pod)
    m = node_metrics(env, out)
    assert m[("shimlet_node_containers", ())] == before[("shimlet_node_containers", ())] + 1
    labels = (("container", "app"), ("container_id", c.id), ("namespace", "default"), ("pod", pod))
    assert m[("shimlet_node_shim_up", labels)] == 1, m
    assert m[("shimlet_node_build_info", (("version", Scrape(env).families["shimlet_master_build_info"]
                                           .samples[0].labels["version"]),))] == 1
    assert os.stat(out).st_mode & 0o777 == 0o644 and os.listdir(tmp_path) == ["shimlet.prom"]  # no temp left
    c.stop()
    m = node_metrics(env, out)
    assert m[("shimlet_node_containers", ())] == before[("shimlet_node_containers", ())]
    assert ("shimlet_node_shim_up", labels) not in m


# The shim's stats.json (docs/design.md "Pre-authentication gate") -> the node's series (docs/operations.md
# "Node metrics"); a field of the real file that is missing here fails the test below.
STATS_SERIES = {
    ("sessions", "tcp"): ("shimlet_node_sessions", {"door": "tcp"}),
    ("sessions", "local"): ("shimlet_node_sessions", {"door": "local"}),
    ("sessions", "warm"): ("shimlet_node_warm_sessions", {}),
    ("sessions", "tcp_started"): ("shimlet_node_sessions_started_total", {"door": "tcp"}),
    ("sessions", "local_started"): ("shimlet_node_sessions_started_total", {"door": "local"}),
    ("sessions", "local_refused"): ("shimlet_node_limit_hits_total", {"limit": "max_local_sessions"}),
    ("sessions", "max_sessions"): ("shimlet_node_sessions_max", {"door": "tcp"}),
    ("sessions", "max_local_sessions"): ("shimlet_node_sessions_max", {"door": "local"}),
    ("preauth", "accepted"): ("shimlet_node_unauthenticated_accepted_total", {}),
    ("preauth", "cri_accepted"): ("shimlet_node_unauthenticated_accepted_cri_total", {}),
    ("preauth", "dropped_total"): ("shimlet_node_limit_hits_total", {"limit": "preauth_max_connections"}),
    ("preauth", "dropped_per_source"): ("shimlet_node_limit_hits_total", {"limit": "preauth_max_per_source"}),
    ("preauth", "dropped_memory"): ("shimlet_node_limit_hits_total", {"limit": "preauth_max_memory"}),
    ("preauth", "refused_sessions"): ("shimlet_node_limit_hits_total", {"limit": "max_sessions"}),
    ("preauth", "open"): ("shimlet_node_unauthenticated_open", {}),
    ("preauth", "open_peak"): ("shimlet_node_unauthenticated_open_peak", {}),
    **{("preauth", o): ("shimlet_node_unauthenticated_connections_total", {"outcome": o})
       for o in ("admitted", "refused_request", "refused_protocol", "timed_out", "peer_closed")},
    **{("ended", f"{door}_{r}"): ("shimlet_node_sessions_ended_total", {"door": door, "result": r})
       for door in ("tcp", "local") for r in ("ok", "exit_nonzero", "refused", "error")},
    **{("bytes", f"{door}_{d}"): ("shimlet_node_session_bytes_total", {"door": door, "direction": d})
       for door in ("tcp", "local") for d in ("in", "out")},
}
STATS_OBJECTS = ("sessions", "preauth", "ended", "bytes")


def test_node_metrics_are_the_shims_counters(tmp_path):
    """Known connections to a real shim, each ending one way (limits of 1 session per door, 2 unauthenticated
    connections per source, a 3 s deadline); its stats.json counts them and shimlet-node-metrics exports each of
    its fields, once, with the shim's value."""
    env = ShimEnv(max_sessions=1, max_local_sessions=1, preauth_max_per_source=2, preauth_timeout_ms=3000)
    held, socks = [], []
    try:
        c = env.container()
        state = os.path.join(env.state, c.id, "stats.json")

        def stats():
            try:
                with open(state) as f:
                    return json.load(f)
            except (OSError, ValueError):
                return None

        def run(tls):
            return subprocess.run(env.shimctl("exec", c.id, "--", "true", tls=tls), stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=30)

        # One long session per door: each door's next one is over its limit.
        for tls in (True, False):
            held.append(subprocess.Popen(env.shimctl("exec", c.id, "--", "sleep", "60", tls=tls),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True))
        wait_for(lambda: (stats() or {}).get("sessions", {}).get("tcp") == 1 and stats()["sessions"]["local"] == 1,
                 15, "one session per door")
        p = run(tls=True)
        assert p.returncode == 255 and b"too many sessions" in p.stderr, p
        assert run(tls=False).returncode == 255
        host, port = env.registration(c.id)["endpoint"].rsplit(":", 1)
        port = int(port)
        socket.create_connection((host, port), timeout=10).close()  # peer_closed
        with socket.create_connection((host, port), timeout=10) as s:  # not TLS: refused_protocol
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                while s.recv(4096):  # until the gate closes it
                    pass
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        with ctx.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname="shim") as s:
            s.sendall(b"GET /exec/not-a-ticket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 4")  # refused_request
        for _ in range(3):  # from one source over preauth_max_per_source: the idlest dropped, the others time out
            socks.append(socket.socket())
            socks[-1].bind(("127.0.0.7", 0))
            socks[-1].connect((host, port))
        want = {"accepted": 8, "admitted": 1, "refused_sessions": 1, "peer_closed": 1, "refused_protocol": 1,
                "refused_request": 1, "dropped_per_source": 1, "timed_out": 2, "open": 0,
                "dropped_total": 0, "dropped_memory": 0}
        counted = lambda: {k: (stats() or {}).get("preauth", {}).get(k) for k in want}  # noqa: E731
        with contextlib.suppress(AssertionError):
            wait_for(lambda: counted() == want, 15, "the shim's counters")
        st = stats()
        assert counted() == want, st
        assert st["preauth"]["open_peak"] >= 2 and st["gate_pid"] > 0, st
        assert st["sessions"] | {"warm": 0} == {"tcp": 1, "local": 1, "warm": 0, "tcp_started": 1,
                                                 "local_started": 1, "local_refused": 1, "max_sessions": 1,
                                                 "max_local_sessions": 1}, st

        # The file as the shim last wrote it, read together with the metrics (unchanged between both reads).
        out = str(tmp_path / "shimlet.prom")
        for _ in range(50):
            st = stats()
            m = node_metrics(env, out)
            if stats() == st:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the shim rewrote stats.json at every read")
        ours = {(name, labels) for name, labels in m if ("container_id", c.id) in labels}
        base = dict(next(labels for name, labels in ours if name == "shimlet_node_shim_up"))
        key = lambda name, **l: (name, tuple(sorted({**base, **l}.items())))  # noqa: E731
        fields = {(k, f) for k in STATS_OBJECTS for f in st[k]}
        assert fields == set(STATS_SERIES), fields ^ set(STATS_SERIES)  # every field the shim writes is mapped
        want_series = {key(n, **l) for n, l in STATS_SERIES.values()}
        for n in ("shimlet_node_shim_up", "shimlet_node_gate_up", "shimlet_node_stats_timestamp_seconds"):
            want_series.add(key(n))
        assert ours == want_series, ours ^ want_series  # and nothing else
        for (k, f), (n, l) in STATS_SERIES.items():
            assert m[key(n, **l)] == st[k][f], (k, f, n, l)
        assert m[key("shimlet_node_gate_up")] == 1 and m[key("shimlet_node_shim_up")] == 1
        # Each accepted connection ended once, or is open (docs/operations.md).
        ended = sum(v for (n, l), v in m.items() if n == "shimlet_node_unauthenticated_connections_total" and
                    ("container_id", c.id) in l)
        ended += sum(m[key("shimlet_node_limit_hits_total", limit=k)] for k in
                     ("preauth_max_connections", "preauth_max_per_source", "preauth_max_memory", "max_sessions"))
        accepted = m[key("shimlet_node_unauthenticated_accepted_total")]
        assert accepted == ended + m[key("shimlet_node_unauthenticated_open")], (accepted, ended)
        ts = calendar.timegm(time.strptime(st["ts"].split(".")[0], "%Y-%m-%dT%H:%M:%S"))
        assert abs(m[key("shimlet_node_stats_timestamp_seconds")] - ts) < 1, (st["ts"], m)
        assert abs(time.time() - ts) < 120
    finally:
        for p in held:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for s in socks:
            s.close()
        env.cleanup()


def shim_stats(env, cid):
    try:
        with open(os.path.join(env.state, cid, "stats.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def test_node_sessions_by_result_and_bytes(tmp_path):
    """Sessions through both doors, each ending a known way with known application bytes; the shim counts them
    by result with their end records' byte counts, and shimlet-node-metrics exports exactly those."""
    env = ShimEnv()
    try:
        c = env.container()

        def run(*args, tls, **kw):
            kw.setdefault("stdin", subprocess.DEVNULL)
            kw.setdefault("stdout", subprocess.PIPE)
            kw.setdefault("stderr", subprocess.PIPE)
            return subprocess.run(env.shimctl(*args, tls=tls), timeout=60, **kw)

        # TCP (the gate, TLS): three execs that exit 0, stdin of known sizes in, `wc -c`'s answer out ...
        sizes = (1000, 20000, 300000)
        for n in sizes:
            p = run("exec", "-i", c.id, "--", "wc", "-c", tls=True, stdin=None, input=os.urandom(n))
            assert (p.returncode, p.stdout) == (0, b"%d\n" % n), p.stderr
        # ... one whose command exits 3 after 3 bytes of stdout and 2 of stderr ...
        p = run("exec", c.id, "--", "sh", "-c", "printf abc; printf de >&2; exit 3", tls=True)
        assert (p.returncode, p.stdout) == (3, b"abc") and p.stderr.endswith(b"de"), p.stderr
        # ... and an untrusted ticket: refused by the gate, never a session.
        fake = tmp_path / "state"
        os.makedirs(fake / c.id)
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(fake / "local.key")], check=True)
        shutil.copy(os.path.join(env.state, c.id, "registration.json"), fake / c.id / "registration.json")
        for tls in (True, False):
            p = subprocess.run(env.shimctl("exec", c.id, "--", "true", state_dir=str(fake), tls=tls),
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
            assert p.returncode == 255 and b"ticket" in p.stderr, p.stderr
        # The local socket: the untrusted ticket above was a session (refused). A command given our own stdio
        # (pipes here: docs/design.md "Local socket") copies nothing through the session: 0 bytes.
        assert run("exec", c.id, "--", "printf", "hello", tls=False).stdout == b"hello"
        # With stdout on a terminal shimctl passes nothing and the session copies stdout: 1500 bytes out.
        master, slave = os.openpty()
        try:
            p = run("exec", c.id, "--", "head", "-c", "1500", "/dev/zero", tls=False, stdout=slave)
            assert p.returncode == 0, p.stderr
            got = b""
            while len(got) < 1500 and select.select([master], [], [], 10)[0]:
                got += os.read(master, 65536)
            assert got == bytes(1500), got
        finally:
            os.close(master)
            os.close(slave)
        assert run("exec", c.id, "--", "sh", "-c", "exit 5", tls=False).returncode == 5
        p = run("exec", c.id, "--", "/no/such/command", tls=False)  # did not start: error
        assert p.returncode == 127, p.stderr

        want_ended = {"tcp_ok": 3, "tcp_exit_nonzero": 1, "tcp_refused": 0, "tcp_error": 0,
                      "local_ok": 2, "local_exit_nonzero": 1, "local_refused": 1, "local_error": 1}
        want_bytes = {"tcp_in": sum(sizes), "tcp_out": sum(len(b"%d\n" % n) for n in sizes) + 3 + 2,
                      "local_in": 0, "local_out": 1500}
        want_preauth = {"accepted": 5, "admitted": 4, "refused_request": 1}
        settled = lambda st: (st and st["ended"] == want_ended and st["bytes"] == want_bytes and  # noqa: E731
                              {k: st["preauth"][k] for k in want_preauth} == want_preauth)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: settled(shim_stats(env, c.id)), 15, "the shim's session counters")
        st = shim_stats(env, c.id)
        assert settled(st), st
        # Every session started ended once; the gate's refusal is its own, not a session's.
        assert (st["sessions"]["tcp_started"], st["sessions"]["local_started"]) == (4, 5), st
        assert (st["sessions"]["tcp"], st["sessions"]["local"]) == (0, 0), st

        m = node_metrics(env, str(tmp_path / "shimlet.prom"))
        found = {(n, tuple((k, v) for k, v in l if k in ("door", "result", "direction"))): v
                 for (n, l), v in m.items() if ("container_id", c.id) in l}
        for door in ("tcp", "local"):
            started = found[("shimlet_node_sessions_started_total", (("door", door),))]
            ended = 0
            for r in ("ok", "exit_nonzero", "refused", "error"):
                v = found[("shimlet_node_sessions_ended_total", (("door", door), ("result", r)))]
                assert v == want_ended[f"{door}_{r}"], (door, r, v)
                ended += v
            assert started == ended + found[("shimlet_node_sessions", (("door", door),))], door
            for d in ("in", "out"):
                v = found[("shimlet_node_session_bytes_total", (("direction", d), ("door", door)))]
                assert v == want_bytes[f"{door}_{d}"], (door, d, v)
    finally:
        env.cleanup()
