"""Several masters on one etcd: the multi-node network-namespace cluster of
test_master_multinode.py with THREE masters (A, B, C: three addresses in the
masters' namespace) whose registry is a 3-member etcd cluster (TLS with
client certificates, on that namespace's loopback; etcd_env.py). Nodes' hooks
and shimctl list all three masters and move on when one cannot be reached.

Shows: nodes register through A and every master serves them (grants, exec,
port-forward, the tunnel) from its watch-fed copy; a ticket granted by one
master is single use through every master (the shim's replay cache); a
node's credential cannot take another node's container through any master;
killing A during 500 grants from several clients loses no grant, no
registration, and makes no node register again; one etcd member down
(the leader) changes nothing visible; two down (no quorum): grants fail with
a clear error, and work again when one member returns, with every
registration still there; a node that stops renewing disappears from every
master within one lease."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import test_master_multinode as mn
from containers import BIN, wait_for
from etcd_env import EtcdCluster, free_port

LEASE_S = 6
MASTERS = {"A": mn.IP["m"], "B": "10.231.0.2", "C": "10.231.0.3"}
GRANTLOAD = os.path.join(BIN, "shimlet-grantload")
PROBE = os.path.join(BIN, "shimlet-probe")
PREFIX = "/shimlet-ha"


class HaCluster(mn.Cluster):
    MASTER_SANS = (*MASTERS.values(), mn.MASTER_P_IP)

    def __init__(self):
        for b in (GRANTLOAD, PROBE):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} missing: build first (scripts/build)")
        self.masters = {}
        self.etcd = None
        self.servers = list(MASTERS)  # the masters shimctl is given, in order
        self.dir = None
        try:
            super().__init__()
        except BaseException:
            # Half built: whatever was started goes (the fixture never sees this object).
            if self.dir:
                self.cleanup()
            elif self.etcd:
                self.etcd.cleanup()
            raise

    def _network(self):
        super()._network()
        for name, addr in MASTERS.items():
            if addr != mn.IP["m"]:
                mn.ip("-n", mn.NS["m"], "addr", "add", addr + "/24", "dev", "eth0")

    def master_urls(self):
        return [f"https://{a}:{mn.PORT}" for a in MASTERS.values()]

    def shimctl_servers(self, ns):
        return ",".join(f"https://{MASTERS[n]}:{mn.PORT}" for n in self.servers)

    @contextlib.contextmanager
    def using(self, *names):
        """shimctl is given only these masters for the block."""
        before, self.servers = self.servers, list(names)
        try:
            yield
        finally:
            self.servers = before

    # ------------------------------------------------------------ masters
    def start_master(self):
        if self.etcd is None:
            self.etcd = EtcdCluster(members=3, netns=mn.NS["m"])
        for name in MASTERS:
            self.start_one(name)

    def audit_path(self, name):
        return self.path(f"audit-{name}.log")

    def start_one(self, name, ready=True, tokens=None, etcd_flags=None):
        """ready=False: only until it listens (its registry may not be loaded)."""
        log = open(self.path(f"master-{name}.log"), "a+")
        start = log.tell()
        p = subprocess.Popen(
            mn.in_ns("m", mn.MASTER, "--bind-address", MASTERS[name], "--secure-port", str(mn.PORT),
                     "--tls-cert-file", self.server_crt, "--tls-private-key-file", self.server_key,
                     "--token-auth-file", tokens or self.tokens, "--authorization-policy-file", self.rbac,
                     "--audit-log-path", self.audit_path(name), "--ticket-signing-key-file", self.ticket_key,
                     "--lease-duration", f"{LEASE_S}s", *(etcd_flags or self.etcd.master_flags(PREFIX))),
            stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        self.masters[name] = p

        def listening():
            if p.poll() is not None:
                return True
            log.seek(start)
            if '"listening"' not in log.read():
                return False
            return not ready or self.readyz(name) == 200
        wait_for(listening, 30, f"master {name} ready")
        if p.poll() is not None:
            log.seek(start)
            raise AssertionError(f"shimlet-master {name} did not start: " + log.read())

    def readyz(self, name):
        p = mn.run(mn.in_ns("c", "curl", "-sS", "--max-time", "5", "--cacert", self.ca, "-o", "/dev/null", "-w",
                            "%{http_code}", f"https://{MASTERS[name]}:{mn.PORT}/readyz"), check=False)
        return int(p.stdout.decode() or 0)

    def kill_master(self, name):
        p = self.masters[name]
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    @property
    def master_pid(self):
        return self.masters["A"].pid

    def audit_lines(self, name="A"):
        with open(self.audit_path(name)) as f:
            return [json.loads(l) for l in f if l.strip()]

    def cleanup(self):
        try:
            super().cleanup()
        finally:
            if self.etcd:
                self.etcd.cleanup()

    # ------------------------------------------------------------ grants
    def grantload(self, pod, n, clients, servers=None):
        """shimlet-grantload in the client namespace (Popen; JSON line on stdout)."""
        urls = ",".join(f"https://{MASTERS[m]}:{mn.PORT}" for m in (servers or list(MASTERS)))
        body = json.dumps({"command": ["true"], "jkt": "A" * 43})
        p = subprocess.Popen(mn.in_ns("c", GRANTLOAD, "--server", urls, "--ca", self.ca, "--token",
                                      mn.TOKENS["alice"], "--path",
                                      f"/apis/shimlet.io/v1/namespaces/default/pods/{pod}/exec", "--body", body,
                                      "-n", str(n), "-c", str(clients), "--timeout-ms", "10000"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        return p


def grant_result(p, timeout=180):
    out, err = p.communicate(timeout=timeout)
    lines = out.decode().strip().splitlines()
    assert lines, err.decode()
    return json.loads(lines[-1])


def node_puts(lines, after_ts=""):
    return [l for l in lines if l.get("verb") == "register" and l["ts"] > after_ts]


@pytest.fixture(scope="module")
def cluster():
    c = None
    try:
        c = HaCluster()
        yield c
    finally:
        if c:
            c.cleanup()
        else:
            for name in mn.NS.values():
                mn.ip("netns", "del", name, check=False)


@pytest.fixture(scope="module")
def pods(cluster):
    out = {}
    for n in mn.NODES:
        out[n] = cluster.container(n, f"ha-{n}-{mn.TAG}", args=mn.WEB)
    for m in MASTERS:
        wait_for(lambda: all(c.pod in cluster.pods(MASTERS[m]) for c in out.values()), 10, f"both pods on {m}")
    for c in out.values():
        wait_for(lambda: cluster.shimctl("exec", c.pod, "--", "wget", "-q", "-O", "/dev/null",
                                         "http://127.0.0.1:8080/").returncode == 0, 20, "httpd up")
    return out


def all_listed(cluster, pods, masters=MASTERS):
    return all(all(c.pod in cluster.pods(MASTERS[m]) for c in pods.values()) for m in masters)


# ---------------------------------------------------------------- one registry, every master

def test_registered_through_a_served_by_every_master(cluster, pods):
    for n, c in pods.items():
        for m in MASTERS:
            p = cluster.pods(MASTERS[m])[c.pod]
            assert p["spec"]["nodeName"] == mn.NODES[n], (m, p)
    # The hooks list A first: A took the registrations, B and C never did.
    regs = [l for l in node_puts(cluster.audit_lines("A")) if l["reason"] == "registered"]
    assert {l["container_id"] for l in regs} >= {c.id for c in pods.values()}, regs
    for m in ("B", "C"):
        assert not node_puts(cluster.audit_lines(m)), m


@pytest.mark.parametrize("m", ["B", "C"])
def test_exec_port_forward_and_tunnel_through_b_and_c(cluster, pods, m):
    with cluster.using(m):
        for c in pods.values():
            p = cluster.shimctl("exec", c.pod, "--", "sh", "-c", "cat /www/index.html; exit 6")
            assert p.returncode == 6 and p.stdout.startswith(b"hello-from-"), p.stderr
        body = mn.http_get(cluster, pods["a"].pod, "/index.html")
        assert body.startswith(b"hello-from-")
        p = cluster.shimctl("--proxy", "exec", pods["b"].pod, "--", "echo", "tunnelled")
        assert p.returncode == 0 and p.stdout == b"tunnelled\n", p.stderr
    grants = [l for l in cluster.audit_lines(m) if l.get("resource") == "pods/exec" and l["code"] == 201]
    assert grants and grants[-1]["shim"]["node"] == mn.NODES["b"], grants[-1:]


# A client for the master's tunnel (design.md "Proxy mode") that relays one
# local TCP connection through it, so that shimlet-probe presents a ticket
# to the shim THROUGH a master. The TLS to the master runs on memory BIOs
# (one thread, no concurrent use of an SSL object); the probe's own TLS to
# the shim passes inside.
TUNNEL_PY = r"""
import json, select, socket, ssl, subprocess, sys
host, port, ca, token, path = sys.argv[1:6]
probe = sys.argv[6:]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname=host)
tcp = socket.create_connection((host, int(port)), timeout=20)
def flush():
    d = out.read()
    if d:
        tcp.sendall(d)
def feed():
    d = tcp.recv(1 << 16)
    if not d:
        raise EOFError
    inc.write(d)
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        flush()
        feed()
flush()
tls.write(("POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nConnection: Upgrade\r\n"
           "Upgrade: shimlet-tunnel\r\nContent-Length: 0\r\n\r\n" % (path, host, token)).encode())
flush()
head = b""
while b"\r\n\r\n" not in head:
    try:
        head += tls.read(1 << 16)
    except ssl.SSLWantReadError:
        feed()
line, _, rest = head.partition(b"\r\n\r\n")
if b" 101 " not in line.split(b"\r\n")[0]:
    print(json.dumps({"tunnel_error": line.decode(errors="replace")}))
    sys.exit(0)
lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen(1)
p = subprocess.Popen(probe + ["--endpoint", "127.0.0.1:%d" % lst.getsockname()[1]], stdout=subprocess.PIPE)
cl, _ = lst.accept()
if rest:
    cl.sendall(rest)
done = False
while not done:
    r, _, _ = select.select([tcp, cl], [], [], 60)
    if not r:
        break
    if tcp in r:
        try:
            feed()
        except (EOFError, OSError):
            done = True
        while True:
            try:
                d = tls.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                done = True
                break
            if not d:
                done = True
                break
            cl.sendall(d)
    if cl in r and not done:
        d = cl.recv(1 << 16)
        if not d:
            done = True
        else:
            tls.write(d)
            flush()
cl.close()
print(p.communicate(timeout=60)[0].decode().strip().splitlines()[-1])
"""


def probe_through(cluster, master, pod, ticket, pin, identity, marker):
    cmd = [PROBE, "--identity", identity, "--timeout", "20", "--pin", pin, "--ticket", ticket,
           "--header", "shimlet-exec:" + json.dumps({"command": ["sh", "-c", f"echo ran >> /{marker}; echo ok"],
                                                      "stdin": False, "tty": False})]
    p = subprocess.run(mn.in_ns("c", sys.executable, "-c", TUNNEL_PY, MASTERS[master], str(mn.PORT), cluster.ca,
                                mn.TOKENS["alice"], f"/apis/shimlet.io/v1/namespaces/default/pods/{pod}/tunnel",
                                *cmd),
                       capture_output=True, timeout=90)
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout.decode().strip().splitlines()[-1])


def test_ticket_is_single_use_across_masters(cluster, pods):
    """A ticket granted by A, presented through B's tunnel, runs once; the
    same ticket through C's tunnel (or A's) is refused by the shim's replay
    cache: single use does not depend on which master relays it."""
    c = pods["a"]
    identity = cluster.path("probe-id")
    mint = subprocess.run([PROBE, "--identity", identity, "--mint-only", "--key", identity + ".key"],
                          capture_output=True, timeout=30)
    jkt = json.loads(mint.stdout.decode().strip().splitlines()[-1])["jkt"]
    marker = "ran-" + mn.TAG
    cmd = ["sh", "-c", f"echo ran >> /{marker}; echo ok"]
    st, g = cluster.curl("POST", f"/apis/shimlet.io/v1/namespaces/default/pods/{c.pod}/exec", mn.TOKENS["alice"],
                         {"command": cmd, "jkt": jkt}, host=MASTERS["A"])
    assert st == 201, g
    out = probe_through(cluster, "B", c.pod, g["ticket"], g["pin"], identity, marker)
    assert (out.get("status"), out.get("stdout"), out.get("exit_code")) == (200, "ok\n", 0), out
    for m in ("C", "A"):
        out = probe_through(cluster, m, c.pod, g["ticket"], g["pin"], identity, marker)
        assert out.get("status") == 403 and "ticket already used" in json.dumps(out), (m, out)
    with open(os.path.join(c.bundle, "rootfs", marker)) as f:
        assert f.read().count("ran") == 1


def test_ownership_holds_across_masters(cluster, pods):
    a = pods["a"]
    reg = json.load(open(cluster.path("state-a", a.id, "registration.json")))
    for m in MASTERS:  # node-b through every master, against node-a's container registered through A
        host = MASTERS[m]
        st, r = cluster.curl("PUT", f"/apis/shimlet.io/v1/nodes/{mn.NODES['b']}/containers/{a.id}",
                             mn.TOKENS["b"], {**reg, "node": mn.NODES["b"]}, ns="b", host=host)
        assert st == 403 and "registered by node" in r["message"], (m, r)
        st, r = cluster.curl("DELETE", f"/apis/shimlet.io/v1/nodes/{mn.NODES['b']}/containers/{a.id}",
                             mn.TOKENS["b"], ns="b", host=host)
        assert st == 403, (m, r)
        st, r = cluster.curl("POST", f"/apis/shimlet.io/v1/nodes/{mn.NODES['b']}/sessions/sid-{m}",
                             mn.TOKENS["b"], {"container_id": a.id, "verb": "exec"}, ns="b", host=host)
        assert st == 403 and 'registered by node "node-a"' in r["message"], (m, r)
    for m in MASTERS:
        assert cluster.pods(MASTERS[m])[a.pod]["spec"]["nodeName"] == mn.NODES["a"]


# ---------------------------------------------------------------- a master dies

def test_kill_master_a_during_500_grants(cluster, pods):
    pod = pods["a"].pod
    before = time.time()
    loads = [cluster.grantload(pod, 125, 2) for _ in range(4)]  # 4 processes x 2 clients = 8 clients, 500 grants
    # Let A serve part of the stream, then kill it mid-way.
    wait_for(lambda: sum(1 for l in cluster.audit_lines("A")
                         if l.get("resource") == "pods/exec" and l["code"] == 201 and l["ts"] >= mn_ts(before)) >= 60,
             60, "A serving grants")
    killed_ts = mn_ts(time.time())
    cluster.kill_master("A")
    results = [grant_result(p) for p in loads]
    assert sum(r["ok"] for r in results) == 500 and sum(r["failed"] for r in results) == 0, results
    by = {}
    for r in results:
        for k, v in r["by_master"].items():
            by[k] = by.get(k, 0) + v
    # A answered the start of the stream (a grant it minted as it died may have
    # been asked again of B: the client never saw it), B the rest.
    assert by.get(f"https://{MASTERS['A']}:{mn.PORT}") and by.get(f"https://{MASTERS['B']}:{mn.PORT}"), by
    # Nothing lost, nobody registered again: over two leases B and C keep
    # every pod and see only renewals (the hooks moved from A to B).
    deadline = time.time() + 2 * LEASE_S
    while time.time() < deadline:
        assert all_listed(cluster, pods, masters=("B", "C")), "a registration was lost"
        time.sleep(0.5)
    puts = node_puts(cluster.audit_lines("B"), killed_ts) + node_puts(cluster.audit_lines("C"), killed_ts)
    assert puts and all(l["reason"] == "lease renewed" and l["code"] == 200 for l in puts), puts
    cluster.start_one("A")  # back for the next tests: whole at once, from etcd
    assert all_listed(cluster, pods, masters=("A",))


def mn_ts(t):
    """An audit timestamp (RFC 3339 UTC, microseconds) for time t, for comparisons."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1e6)


# ---------------------------------------------------------------- etcd members die

def test_one_etcd_member_down_changes_nothing(cluster, pods):
    leader = cluster.etcd.leader()
    load = cluster.grantload(pods["b"].pod, 200, 2)
    time.sleep(0.3)  # the stream is under way when the leader dies
    killed_ts = mn_ts(time.time())
    cluster.etcd.kill(leader)
    r = grant_result(load)
    assert r["ok"] == 200 and r["failed"] == 0, r
    # Renewals go on (each waits out the election within its deadline), and
    # no master ever said the registry was unavailable.
    wait_for(lambda: len(node_puts(cluster.audit_lines("A"), killed_ts)) >= 4, 3 * LEASE_S, "renewals after the kill")
    for m in MASTERS:
        lines = [l for l in cluster.audit_lines(m) if l["ts"] >= killed_ts]
        assert not [l for l in lines if l.get("code", 0) >= 500], (m, [l for l in lines if l.get("code", 0) >= 500])
    assert all_listed(cluster, pods)
    cluster.etcd.start(leader)
    cluster.etcd.wait_healthy()


def test_two_etcd_members_down_then_one_back(cluster, pods):
    pod = pods["a"].pod
    survivor = 0
    for i in (1, 2):
        cluster.etcd.kill(i)

    def refused():
        p = cluster.shimctl("exec", pod, "--", "true")
        return p if p.returncode == 255 else None
    p = wait_for(refused, 40, "grants refused without an etcd quorum", interval=0.5)
    err = p.stderr.decode()
    assert "registry unavailable" in err and "etcd" in err, err
    for m in MASTERS:  # each master finds out on its own, within the bound
        def grant():
            st, r = cluster.curl("POST", f"/apis/shimlet.io/v1/namespaces/default/pods/{pod}/exec",
                                 mn.TOKENS["alice"], {"command": ["true"], "jkt": "A" * 43}, host=MASTERS[m])
            return (st, r) if st != 201 else None
        st, r = wait_for(grant, 20, f"master {m} refusing grants", interval=0.5)
        assert st == 503 and r["reason"] == "ServiceUnavailable" and "registry unavailable" in r["message"], (m, r)
        assert cluster.readyz(m) == 503
    cluster.etcd.start(1)
    wait_for(lambda: cluster.shimctl("exec", pod, "--", "true").returncode == 0, 60, "grants back with a quorum",
             interval=0.5)
    for m in MASTERS:  # the others confirm their copy on their own next probe (a busy machine: a few seconds)
        wait_for(lambda: cluster.readyz(m) == 200, 20, f"master {m} ready again with a quorum", interval=0.2)
    assert all_listed(cluster, pods), "a registration was lost while etcd had no quorum"
    cluster.etcd.start(2)
    cluster.etcd.wait_healthy()
    assert cluster.etcd.procs[survivor] is not None


def test_delete_through_a_master_without_the_registry_is_refused(cluster, pods):
    """A master whose copy does not have a container (not loaded yet: etcd
    has no quorum as it starts; or its watch lags) may not answer the node's
    DELETE with 404 "not registered": the key is in etcd, and the hook takes
    404 as done, so the registration would stay listed for as long as the
    node renews anything. Fail closed: 503 until etcd can say."""
    a = pods["a"]
    cluster.kill_master("C")
    for i in (1, 2):
        cluster.etcd.kill(i)
    try:
        cluster.start_one("C", ready=False)
        assert cluster.readyz("C") == 503
        st, r = cluster.curl("DELETE", f"/apis/shimlet.io/v1/nodes/{mn.NODES['a']}/containers/{a.id}",
                             mn.TOKENS["a"], ns="a", host=MASTERS["C"])
        assert st == 503, (st, r)
    finally:
        for i in (1, 2):
            cluster.etcd.start(i)
        cluster.etcd.wait_healthy()
    wait_for(lambda: cluster.readyz("C") == 200, 30, "C loaded once etcd has a quorum", interval=0.2)
    assert all_listed(cluster, pods), "a DELETE refused for lack of etcd removed a registration"
    st, r = cluster.curl("DELETE", f"/apis/shimlet.io/v1/nodes/{mn.NODES['a']}/containers/never-{mn.TAG}",
                         mn.TOKENS["a"], ns="a", host=MASTERS["C"])
    assert st == 404 and "is not registered" in r["message"], (st, r)  # etcd says so


# A gRPC proxy in front of etcd (raw bytes, TLS both ways) whose first Txn
# that mentions MARKER is applied by etcd and then answered only after HOLD_S:
# the caller's deadline for that member passes and it asks the next member.
# Streams are refused (UNAVAILABLE: the caller moves on). Touches FLAG once held.
ETCD_PROXY_PY = r"""
import sys, time, grpc
from concurrent import futures
listen, target, ca, cert, key, ccert, ckey, marker, hold_s, flag = sys.argv[1:11]
rd = lambda f: open(f, "rb").read()
up = grpc.secure_channel(target, grpc.ssl_channel_credentials(rd(ca), rd(ckey), rd(ccert)))
held = []
class Proxy(grpc.GenericRpcHandler):
    def service(self, details):
        m = details.method
        if m.endswith("/Watch") or m.endswith("/LeaseKeepAlive"):
            def refuse(it, ctx):
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "not proxied")
            return grpc.stream_stream_rpc_method_handler(refuse)
        call = up.unary_unary(m)
        def unary(req, ctx):
            try:
                resp = call(req, timeout=10)
            except grpc.RpcError as e:
                ctx.abort(e.code(), e.details())
            if m.endswith("/Txn") and marker.encode() in req and not held:
                held.append(1)
                open(flag, "w").close()
                time.sleep(float(hold_s))
            return resp
        return grpc.unary_unary_rpc_method_handler(unary)
srv = grpc.server(futures.ThreadPoolExecutor(16), handlers=[Proxy()])
srv.add_secure_port(listen, grpc.ssl_server_credentials([(rd(key), rd(cert))], rd(ca), True))
srv.start()
print("ready", flush=True)
srv.wait_for_termination()
"""


def test_node_lease_record_answered_late_is_kept(cluster, pods):
    """The Txn that records a node's new etcd lease is applied, but its answer
    comes too late and the client asks the next member: the replayed Txn's
    compare fails and reads back that same lease. The master must take it as
    its own, not revoke it as "another master's" (a revoke deletes the node's
    record and every container another master attached to it meanwhile)."""
    etcd = cluster.etcd
    node, cid = "node-x", f"x-{mn.TAG}"
    token = f"tok-mn-node-x-{mn.TAG}"
    tokens = cluster.path("tokens-x.csv")
    with open(cluster.tokens) as f, open(tokens, "w") as o:
        o.write(f.read().rstrip("\n") + f'\n{token},system:node:{node},uid-node-x,"system:nodes"\n')
    port, flag = free_port(), cluster.path("proxy-held")
    proxy = subprocess.Popen(mn.in_ns("m", sys.executable, "-c", ETCD_PROXY_PY, f"127.0.0.1:{port}",
                                      etcd.client_url(0).removeprefix("https://"), etcd.cafile, etcd.member_cert,
                                      etcd.member_key, etcd.certfile, etcd.keyfile, f"{PREFIX}/nodes/{node}", "3",
                                      flag), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cluster.procs.append(proxy)
    assert proxy.stdout.readline() == b"ready\n", proxy.communicate()[1]
    flags = etcd.master_flags(PREFIX)
    flags[1] = f"https://127.0.0.1:{port}," + flags[1]  # the proxy first: the caller starts there
    cluster.kill_master("C")
    try:
        cluster.start_one("C", tokens=tokens, etcd_flags=flags)
        reg = json.load(open(cluster.path("state-a", pods["a"].id, "registration.json")))
        reg.update(id=cid, node=node, pod=f"ha-x-{mn.TAG}")
        url = f"https://{MASTERS['C']}:{mn.PORT}/apis/shimlet.io/v1/nodes/{node}/containers/{cid}"
        put = subprocess.Popen(mn.in_ns("c", "curl", "-sS", "--max-time", "20", "--cacert", cluster.ca, "-X", "PUT",
                                        "-H", f"Authorization: Bearer {token}", "-H",
                                        "Content-Type: application/json", "--data-binary", json.dumps(reg), "-w",
                                        "\n%{http_code}", url),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        cluster.procs.append(put)
        wait_for(lambda: os.path.exists(flag), 15, "the proxy holding the node's lease record")
        got = etcd.etcdctl("get", f"{PREFIX}/nodes/{node}", "--print-value-only")
        assert got.returncode == 0 and got.stdout.strip(), got
        recorded = json.loads(got.stdout)["lease"]
        out, err = put.communicate(timeout=30)
        assert out.decode().rsplit("\n", 1)[-1] == "201", (out, err)
        got = etcd.etcdctl("get", f"{PREFIX}/nodes/{node}", "--print-value-only")
        assert got.returncode == 0 and got.stdout.strip(), ("the node's record is gone", got)
        assert json.loads(got.stdout)["lease"] == recorded, "the lease recorded first was replaced"
        ttl = etcd.etcdctl("lease", "timetolive", "%x" % recorded)
        assert ttl.returncode == 0 and "already expired" not in ttl.stdout, ttl.stdout
        st, r = cluster.curl("DELETE", f"/apis/shimlet.io/v1/nodes/{node}/containers/{cid}", token, ns="c",
                             host=MASTERS["C"])
        assert st == 200, (st, r)
    finally:
        proxy.kill()
        cluster.kill_master("C")
        cluster.start_one("C")


def test_unreadable_record_is_not_another_nodes_to_take(cluster, pods):
    """A container record no master can decode (written by a newer version, or
    damaged) is attached to its node's etcd lease: that node may replace or
    delete it, another node may not."""
    etcd = cluster.etcd
    got = etcd.etcdctl("get", f"{PREFIX}/nodes/{mn.NODES['a']}", "--print-value-only")
    assert got.returncode == 0 and got.stdout.strip(), got
    lease_a = json.loads(got.stdout)["lease"]
    cid = f"odd-{mn.TAG}"
    key = f"{PREFIX}/containers/{cid}"
    path = f"/apis/shimlet.io/v1/nodes/{{}}/containers/{cid}"
    reg = json.load(open(cluster.path("state-a", pods["a"].id, "registration.json")))
    reg.update(id=cid, pod=f"ha-odd-{mn.TAG}")
    try:
        put = etcd.etcdctl("put", f"--lease={lease_a:x}", key, '{"id":"' + cid + '","unreadable":true}')
        assert put.returncode == 0, put
        time.sleep(0.5)  # every master's watch has it
        for m in MASTERS:
            st, r = cluster.curl("PUT", path.format(mn.NODES["b"]), mn.TOKENS["b"], {**reg, "node": mn.NODES["b"]},
                                 ns="b", host=MASTERS[m])
            assert st == 403, (m, st, r)
            st, r = cluster.curl("DELETE", path.format(mn.NODES["b"]), mn.TOKENS["b"], ns="b", host=MASTERS[m])
            assert st == 403, (m, st, r)
        got = etcd.etcdctl("get", key, "--print-value-only")
        assert "unreadable" in got.stdout, got
        st, r = cluster.curl("PUT", path.format(mn.NODES["a"]), mn.TOKENS["a"], {**reg, "node": mn.NODES["a"]},
                             ns="a", host=MASTERS["B"])
        assert st == 200, (st, r)  # its own node replaces it
        st, r = cluster.curl("DELETE", path.format(mn.NODES["a"]), mn.TOKENS["a"], ns="a", host=MASTERS["C"])
        assert st == 200, (st, r)
    finally:
        etcd.etcdctl("del", key)


# ---------------------------------------------------------------- a node goes quiet

def test_node_that_stops_renewing_disappears_from_every_master(cluster, pods):
    b = pods["b"]
    link_down = time.time()
    mn.ip("-n", mn.NS["b"], "link", "set", "eth0", "down")
    try:
        gone = {}

        def vanished():
            for m in MASTERS:
                if m not in gone and b.pod not in cluster.pods(MASTERS[m]):
                    gone[m] = time.time() - link_down
            return len(gone) == len(MASTERS)
        wait_for(vanished, LEASE_S + 10, "node-b's pod gone from every master", interval=0.1)
        assert max(gone.values()) <= LEASE_S + 1.5, gone  # within one lease of its last renewal
        assert pods["a"].pod in cluster.pods(MASTERS["C"])  # the other node is untouched
        for m in MASTERS:
            assert any(l["event"] == "lease_expired" and l["container_id"] == b.id for l in cluster.audit_lines(m)), m
    finally:
        mn.ip("-n", mn.NS["b"], "link", "set", "eth0", "up")
    # Back on the network, its next renewal registers it again.
    wait_for(lambda: all(b.pod in cluster.pods(MASTERS[m]) for m in MASTERS), 3 * LEASE_S, "node-b back")
