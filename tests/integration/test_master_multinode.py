"""Several nodes on one machine, each in its own network namespace, joined by
a bridge in a "net" namespace: node A and node B (own runc --root, hook
config, STATE_DIR, shim listen address = the node's IP; hook + runc run in
the node's netns), the master and a client in their own namespaces, and a
second client that can route only to the master (proxy mode).

Shows: exec and port-forward through the master reach containers on every
node; in redirect mode the bytes bypass the master (its CPU time stays flat
while 1 GiB moves); through the tunnel (--proxy, and the automatic fallback
when the node does not answer) they pass the master; node credentials cannot
register another node's container; a stopped container leaves `list`; a
restarted master learns every container again within one lease while
sessions already streaming are unaffected."""
import contextlib
import datetime
import hashlib
import ipaddress
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from containers import BIN, Container, run, wait_for
from test_master import _name, _write_cert, _write_key, _write_ticket_keys

HOOK = os.path.join(BIN, "shimlet-hook")
SHIMCTL = os.path.join(BIN, "shimctl")
MASTER = os.path.join(BIN, "shimlet-master")
LEASE_S = 6
TAG = uuid.uuid4().hex[:5]
NS = {k: f"smn{TAG}{k}" for k in ("net", "m", "a", "b", "c", "p")}
IP = {"m": "10.231.0.1", "a": "10.231.0.11", "b": "10.231.0.12", "c": "10.231.0.21"}
MASTER_P_IP, P_IP = "10.232.0.1", "10.232.0.2"  # the master's second leg: the proxy-only client's only route
NODES = {"a": "node-a", "b": "node-b"}
TOKENS = {"alice": "tok-mn-alice-31337", "a": "tok-mn-node-a-4242", "b": "tok-mn-node-b-2424"}
PORT = 6443

RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: pod-access}
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
- apiGroups: [""]
  resources: ["pods/exec", "pods/portforward"]
  verbs: ["create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: alice}
subjects: [{kind: User, name: alice}]
roleRef: {kind: ClusterRole, name: pod-access}
"""


def ip(*args, check=True):
    return run(["ip", *args], check=check)


def in_ns(ns, *cmd):
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup
    # mounts runc needs. Only the network namespace changes.
    return ["nsenter", f"--net=/run/netns/{NS[ns]}", "--", *cmd]


def cpu_s(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NodeContainer(Container):
    """A runc container started inside a node's network namespace (so the
    hook, and the shim it starts, live there too)."""

    def __init__(self, node, **kw):
        self.node = node
        super().__init__(**kw)

    def runc(self, *args, check=True, **kw):
        return run(in_ns(self.node, "runc", "--root", self.root, *args), check=check, **kw)

    def start(self):
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.dir, "runc.log"), "w+") as log:
            p = subprocess.run(in_ns(self.node, "runc", "--root", self.root, "run", "-d", "--pid-file",
                                     os.path.join(self.dir, "pid"), self.id),
                               cwd=self.bundle, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            if p.returncode != 0:
                log.seek(0)
                raise AssertionError(f"runc run {self.id} in {NS[self.node]} failed: {log.read()}")
        self.started = True
        return self


class Cluster:
    # The master's serving certificate names these (test_master_ha.py adds its second and third master).
    MASTER_SANS = (IP["m"], MASTER_P_IP)

    def __init__(self):
        for b in (HOOK, SHIMCTL, MASTER, os.path.join(BIN, "shimlet"), os.path.join(BIN, "shimlet-session")):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} missing: build first (scripts/build)")
        self.dir = tempfile.mkdtemp(prefix="smn-")
        self.containers = []
        self.procs = []
        self.master = None
        self.netns_made = []
        self.home = self.path("home")
        os.makedirs(self.home)
        self._network()
        self._pki()
        self._files()
        self.start_master()
        for n in NODES:
            self._node_config(n)

    def path(self, *p):
        return os.path.join(self.dir, *p)

    # ------------------------------------------------------------ network
    def _network(self):
        for k, name in NS.items():
            ip("netns", "add", name)
            self.netns_made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", NS["net"], "link", "add", "br0", "type", "bridge")
        ip("-n", NS["net"], "link", "set", "br0", "up")
        for k, addr in IP.items():
            outer, inner = f"smn{TAG}{k}o", f"smn{TAG}{k}i"
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", outer, "netns", NS["net"])
            ip("link", "set", inner, "netns", NS[k])
            ip("-n", NS["net"], "link", "set", outer, "master", "br0", "up")
            ip("-n", NS[k], "link", "set", inner, "name", "eth0")
            ip("-n", NS[k], "addr", "add", addr + "/24", "dev", "eth0")
            ip("-n", NS[k], "link", "set", "eth0", "up")
        # The proxy-only client: a point-to-point link to the master, whose
        # namespace does not forward, and a default route into it (packets to
        # the nodes are silently dropped there: the direct connect times out).
        ip("link", "add", f"smn{TAG}pm", "type", "veth", "peer", "name", f"smn{TAG}pp")
        ip("link", "set", f"smn{TAG}pm", "netns", NS["m"])
        ip("link", "set", f"smn{TAG}pp", "netns", NS["p"])
        ip("-n", NS["m"], "addr", "add", MASTER_P_IP + "/24", "dev", f"smn{TAG}pm")
        ip("-n", NS["m"], "link", "set", f"smn{TAG}pm", "up")
        ip("-n", NS["p"], "addr", "add", P_IP + "/24", "dev", f"smn{TAG}pp")
        ip("-n", NS["p"], "link", "set", f"smn{TAG}pp", "up")
        ip("-n", NS["p"], "route", "add", "default", "via", MASTER_P_IP)
        run(in_ns("m", "sysctl", "-qw", "net.ipv4.ip_forward=0"))

    # ------------------------------------------------------------ PKI and config
    def _pki(self):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("shimlet-mn-ca")
        now = datetime.datetime.now(datetime.timezone.utc)

        def cert(subject, key, ca=False, ips=()):
            b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
                 .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                 .not_valid_after(now + datetime.timedelta(days=1))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if ips:
                b = b.add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]), False)
            return b.sign(ca_key, hashes.SHA256())

        self.ca = self.path("ca.crt")
        _write_cert(self.ca, cert(ca_name, ca_key, ca=True))
        k = ec.generate_private_key(ec.SECP256R1())
        self.server_crt, self.server_key = self.path("server.crt"), self.path("server.key")
        _write_cert(self.server_crt, cert(_name("shimlet-master"), k, ips=self.MASTER_SANS))
        _write_key(self.server_key, k)
        # The shims trust the master's ticket key: kid "master" from the file name.
        self.ticket_key, self.master_pub = self.path("ticket.key"), self.path("master.pub")
        _write_ticket_keys(self.ticket_key, self.master_pub)

    def _files(self):
        self.tokens = self.path("tokens.csv")
        with open(self.tokens, "w") as f:
            f.write(f"{TOKENS['alice']},alice,uid-alice\n")
            for n, node in NODES.items():
                f.write(f'{TOKENS[n]},system:node:{node},uid-{node},"system:nodes"\n')
        self.rbac = self.path("rbac.yaml")
        with open(self.rbac, "w") as f:
            f.write(RBAC)
        self.audit = self.path("audit.log")

    def master_urls(self):
        """Every master, in the order nodes and clients try them."""
        return [f"https://{IP['m']}:{PORT}"]

    def _node_config(self, n):
        state = self.path("state-" + n)
        urls = self.master_urls()
        with open(self.path(f"hook-{n}.json"), "w") as f:
            json.dump({"state_dir": state, "listen": IP[n] + ":0", "fail_container_on_error": True,
                       "trusted_keys": [self.master_pub],
                       "master": {"url": urls[0] if len(urls) == 1 else urls, "node": NODES[n], "ca": self.ca,
                                  "token": TOKENS[n], "renew_interval_s": 2, "timeout_ms": 3000}}, f)

    # ------------------------------------------------------------ master
    def start_master(self):
        log = open(self.path("master.log"), "a+")
        start = log.tell()
        self.master = subprocess.Popen(
            in_ns("m", MASTER, "--bind-address", "0.0.0.0", "--secure-port", str(PORT), "--tls-cert-file",
                  self.server_crt, "--tls-private-key-file", self.server_key, "--token-auth-file", self.tokens,
                  "--authorization-policy-file", self.rbac, "--audit-log-path", self.audit,
                  "--ticket-signing-key-file", self.ticket_key, "--lease-duration", f"{LEASE_S}s"),
            stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(self.master)

        def listening():
            log.seek(start)
            return '"listening"' in log.read() or self.master.poll() is not None
        wait_for(listening, 10, "master listening")
        if self.master.poll() is not None:
            log.seek(start)
            raise AssertionError("shimlet-master did not start: " + log.read())

    def stop_master(self):
        self.master.send_signal(signal.SIGTERM)
        self.master.wait(10)

    @property
    def master_pid(self):
        # nsenter execs the master: same pid.
        return self.master.pid

    # ------------------------------------------------------------ nodes
    def container(self, n, pod, args=("sleep", "100000")):
        cfg = self.path(f"hook-{n}.json")
        entry = lambda stage: [{"path": HOOK, "args": ["shimlet-hook", "--config", cfg, stage]}]
        ann = {"io.kubernetes.pod.name": pod, "io.kubernetes.pod.namespace": "default",
               "io.kubernetes.container.name": "app"}

        def edit(c):
            c["annotations"] = ann

        c = NodeContainer(n, hooks={"createRuntime": entry("createRuntime"), "poststop": entry("poststop")},
                          edit=edit, args=args, root=f"/run/shimlet-test/smn-{TAG}/{n}")
        self.containers.append(c)
        c.start()
        c.pod = pod
        wait_for(lambda: os.path.exists(self.path("state-" + n, c.id, "registration.json")), 5, "registration")
        return c

    # ------------------------------------------------------------ clients
    def curl(self, method, path, token, body=None, ns="c", host=None):
        """One request to the master (host: another master's address)."""
        host = host or (IP['m'] if ns != 'p' else MASTER_P_IP)
        cmd = in_ns(ns, "curl", "-sS", "--max-time", "10", "--cacert", self.ca, "-X", method, "-H",
                    f"Authorization: Bearer {token}", "-w", "\n%{http_code}", f"https://{host}:{PORT}{path}")
        if body is not None:
            cmd[-1:-1] = ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        p = run(cmd, check=False)
        out, _, code = p.stdout.decode().rpartition("\n")
        return int(code or 0), (json.loads(out) if out.strip() else None)

    def pods(self, host=None):
        st, lst = self.curl("GET", "/api/v1/namespaces/default/pods", TOKENS["alice"], host=host)
        assert st == 200, lst
        return {p["metadata"]["name"]: p for p in lst["items"]}

    def shimctl_servers(self, ns):
        return f"https://{IP['m'] if ns != 'p' else MASTER_P_IP}:{PORT}"

    def shimctl_cmd(self, *args, ns="c"):
        return in_ns(ns, SHIMCTL, "--server", self.shimctl_servers(ns), "--certificate-authority", self.ca, "--token",
                     TOKENS["alice"], *args)

    def shimctl(self, *args, ns="c", timeout=120, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.run(self.shimctl_cmd(*args, ns=ns), env={**os.environ, "HOME": self.home},
                              timeout=timeout, **kw)

    def popen(self, *args, ns="c", **kw):
        p = subprocess.Popen(self.shimctl_cmd(*args, ns=ns), env={**os.environ, "HOME": self.home}, **kw)
        self.procs.append(p)
        return p

    def audit_lines(self):
        with open(self.audit) as f:
            return [json.loads(l) for l in f if l.strip()]

    # ------------------------------------------------------------ cleanup
    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(Exception):
                    p.kill()
                    p.wait(5)
        for c in self.containers:
            with contextlib.suppress(Exception):
                c.cleanup()
        # Shims whose container went away uncleanly die with the test.
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if self.dir.encode() in f.read():
                            os.kill(int(pid), signal.SIGKILL)
        for name in self.netns_made:  # removing a namespace removes its veth ends and the bridge
            ip("netns", "del", name, check=False)
        shutil.rmtree(f"/run/shimlet-test/smn-{TAG}", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = None
    try:
        c = Cluster()
        yield c
    finally:
        if c:
            c.cleanup()
        else:  # a half-built network
            for name in NS.values():
                ip("netns", "del", name, check=False)


WEB = ("sh", "-c", "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && "
                   "dd if=/dev/urandom of=/www/big bs=1M count=48 2>/dev/null && "
                   "exec httpd -f -p 127.0.0.1:8080 -h /www")


@pytest.fixture(scope="module")
def pods(cluster):
    out = {}
    for n in NODES:
        out[n] = cluster.container(n, f"web-{n}-{TAG}", args=WEB)
    wait_for(lambda: all(c.pod in cluster.pods() for c in out.values()), 10, "both pods listed")
    for c in out.values():  # httpd up (the big file is written first)
        wait_for(lambda: cluster.shimctl("exec", c.pod, "--", "wget", "-q", "-O", "/dev/null",
                                         "http://127.0.0.1:8080/").returncode == 0,
                 20, "httpd up")
    return out


@contextlib.contextmanager
def forward(cluster, pod, ns="c", extra=()):
    """`shimctl port-forward POD 0:8080` in the client's namespace; yields the local port."""
    p = cluster.popen(*extra, "port-forward", pod, "0:8080", ns=ns, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline().decode()
        m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line)
        assert m, (line, p.poll(), p.stderr.read() if p.poll() is not None else "")
        yield int(m.group(1))
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# A tiny HTTP/1.0 client run in a client namespace. It sends its request the
# moment it is connected, as curl does (test_portforward.py's first_bytes
# tests stress exactly that).
GET_PY = r"""
import socket, sys, time
port, path, out, rate = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
s = socket.create_connection(("127.0.0.1", port), timeout=120)
s.sendall(("GET %s HTTP/1.0\r\nHost: x\r\n\r\n" % path).encode())
buf = bytearray()
started = False
while True:
    c = s.recv(1 << 18)
    if not c:
        break
    buf += c
    if not started and len(buf) >= 1 << 20:
        open(out + ".started", "w").close()  # the caller waits for the transfer to be under way
        started = True
    if rate:
        time.sleep(len(c) / rate)
head, _, body = bytes(buf).partition(b"\r\n\r\n")
if b" 200 " not in head.split(b"\r\n")[0]:
    sys.exit("bad answer: %r" % head[:200])
open(out, "wb").write(body)
"""


def curl_popen(cluster, port, path, out, ns="c", rate=0):
    return subprocess.Popen(in_ns(ns, sys.executable, "-c", GET_PY, str(port), path, out, str(rate)),
                            stderr=subprocess.PIPE)


def curl_local(cluster, port, path, ns="c"):
    out = cluster.path(f"dl-{uuid.uuid4().hex[:6]}")
    p = curl_popen(cluster, port, path, out, ns=ns)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, err
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def http_get(cluster, pod, path, ns="c", extra=()):
    with forward(cluster, pod, ns=ns, extra=extra) as port:
        return curl_local(cluster, port, path, ns=ns)


# ---------------------------------------------------------------- registry

def test_pods_from_every_node(cluster, pods):
    listed = cluster.pods()
    for n, c in pods.items():
        p = listed[c.pod]
        assert p["spec"]["nodeName"] == NODES[n]
        reg = json.load(open(cluster.path("state-" + n, c.id, "registration.json")))
        assert reg["endpoint"].startswith(IP[n] + ":"), reg["endpoint"]


def test_node_cannot_register_another_nodes_container(cluster, pods):
    a = pods["a"]
    reg = json.load(open(cluster.path("state-a", a.id, "registration.json")))
    # node-b's credential for node-a's path
    st, r = cluster.curl("PUT", f"/apis/shimlet.io/v1/nodes/{NODES['a']}/containers/{a.id}", TOKENS["b"],
                         {**reg, "node": NODES["a"]}, ns="b")
    assert st == 403, r
    # node-b claiming node-a's live container under its own name
    st, r = cluster.curl("PUT", f"/apis/shimlet.io/v1/nodes/{NODES['b']}/containers/{a.id}", TOKENS["b"],
                         {**reg, "node": NODES["b"]}, ns="b")
    assert st == 403, r
    st, r = cluster.curl("PUT", f"/apis/shimlet.io/v1/nodes/{NODES['b']}/containers/{a.id}", TOKENS["b"],
                         {**reg, "node": NODES["a"]}, ns="b")
    assert st == 403, r
    st, r = cluster.curl("DELETE", f"/apis/shimlet.io/v1/nodes/{NODES['b']}/containers/{a.id}", TOKENS["b"], ns="b")
    assert st == 403, r
    assert cluster.pods()[a.pod]["spec"]["nodeName"] == NODES["a"]
    denied = [l for l in cluster.audit_lines() if l.get("user") == f"system:node:{NODES['b']}"
              and l.get("container_id") == a.id]
    assert len(denied) >= 4 and all(l["decision"] == "deny" and l["code"] == 403 for l in denied), denied


# ---------------------------------------------------------------- every node, every path

@pytest.mark.parametrize("n", list(NODES))
def test_exec_reaches_every_node(cluster, pods, n):
    c = pods[n]
    p = cluster.shimctl("exec", c.pod, "--", "sh", "-c", "cat /www/index.html; exit 5")
    assert p.returncode == 5, p.stderr
    assert p.stdout.decode().startswith("hello-from-"), p.stdout
    p = cluster.shimctl("exec", "-i", c.pod, "--", "sha256sum", input=b"x" * 100000, stdin=None)
    assert p.returncode == 0 and p.stdout.split()[0].decode() == hashlib.sha256(b"x" * 100000).hexdigest()


@pytest.mark.parametrize("n", list(NODES))
def test_port_forward_reaches_every_node(cluster, pods, n):
    c = pods[n]
    body = http_get(cluster, c.pod, "/index.html")
    assert body.startswith(b"hello-from-"), body
    want = cluster.shimctl("exec", c.pod, "--", "sha256sum", "/www/big").stdout.split()[0].decode()
    big = http_get(cluster, c.pod, "/big")
    assert len(big) == 48 << 20 and hashlib.sha256(big).hexdigest() == want


@pytest.mark.parametrize("n", list(NODES))
def test_proxy_flag_tunnels_through_the_master(cluster, pods, n):
    c = pods[n]
    before = len([l for l in cluster.audit_lines() if l.get("resource") == "pods/tunnel"])
    p = cluster.shimctl("--proxy", "exec", c.pod, "--", "sh", "-c", "echo via-tunnel; exit 4")
    assert p.returncode == 4 and p.stdout == b"via-tunnel\n", p.stderr
    body = http_get(cluster, c.pod, "/index.html", extra=("--proxy",))
    assert body.startswith(b"hello-from-")
    lines = cluster.audit_lines()
    tunnels = [l for l in lines if l.get("resource") == "pods/tunnel"]
    assert len(tunnels) >= before + 2 and tunnels[-1]["decision"] == "allow" and tunnels[-1]["code"] == 101
    assert tunnels[-1]["shim"]["node"] == NODES[n]
    ends = [l for l in lines if l["event"] == "session_end" and l.get("via") == "tunnel" and l.get("pod") == c.pod]
    assert ends and ends[-1]["bytes_in"] > 0 and ends[-1]["bytes_out"] > 0, ends[-1:]


@pytest.mark.parametrize("n", list(NODES))
def test_unroutable_node_falls_back_to_the_tunnel(cluster, pods, n):
    """Client "p" can only reach the master: the direct connect times out
    (2 s) and shimctl goes through the master's tunnel on its own."""
    c = pods[n]
    t0 = time.time()
    p = cluster.shimctl("exec", c.pod, "--", "echo", "fallback", ns="p")
    assert p.returncode == 0 and p.stdout == b"fallback\n", p.stderr
    assert time.time() - t0 >= 2
    big = http_get(cluster, c.pod, "/big", ns="p")
    assert len(big) == 48 << 20
    # --proxy from there: no wait for the direct attempt
    t0 = time.time()
    p = cluster.shimctl("--proxy", "exec", c.pod, "--", "echo", "proxied", ns="p")
    assert p.returncode == 0 and p.stdout == b"proxied\n", p.stderr
    assert time.time() - t0 < 2


def test_tunnel_refusals(cluster, pods):
    c = pods["a"]
    # a node credential holds no pods/exec: 403, audited as deny
    st, r = cluster.curl("POST", f"/apis/shimlet.io/v1/namespaces/default/pods/{c.pod}/tunnel", TOKENS["b"], ns="b")
    assert st in (400, 403), r
    # not an upgrade
    st, r = cluster.curl("POST", f"/apis/shimlet.io/v1/namespaces/default/pods/{c.pod}/tunnel", TOKENS["alice"])
    assert st == 400 and "Upgrade" in r["message"], r
    # unknown pod
    p = cluster.shimctl("--proxy", "exec", "no-such-pod", "--", "true")
    assert p.returncode == 255 and b"no-such-pod" in p.stderr


# ---------------------------------------------------------------- redirect mode keeps the master out of the data path

def test_redirect_bytes_bypass_the_master(cluster, pods):
    c = pods["b"]
    size = 1 << 30
    before = cpu_s(cluster.master_pid)
    p = subprocess.Popen(cluster.shimctl_cmd("exec", c.pod, "--", "dd", "if=/dev/zero", "bs=1M", "count=1024"),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "HOME": cluster.home})
    cluster.procs.append(p)
    got = 0
    while True:
        chunk = p.stdout.read(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    assert p.wait(120) == 0
    used = cpu_s(cluster.master_pid) - before
    assert got == size
    assert used < 0.3, f"the master used {used:.2f} s CPU while 1 GiB moved client<->node directly"


# ---------------------------------------------------------------- leaving, restarting

def test_stopped_container_vanishes_from_list(cluster, pods):
    c = cluster.container("b", f"short-{TAG}")
    wait_for(lambda: c.pod in cluster.pods(), 10, "short-lived pod listed")
    c.stop()
    wait_for(lambda: c.pod not in cluster.pods(), 5, "stopped pod gone from list")


def test_master_restart_mid_stream(cluster, pods):
    a, b = pods["a"], pods["b"]
    # An exec streaming for ~8 s, and a port-forward draining 48 MiB slowly.
    ex = cluster.popen("exec", a.pod, "--", "sh", "-c", "for i in $(seq 1 8); do echo line-$i; sleep 1; done; exit 9",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fwd = forward(cluster, b.pod)
    port = fwd.__enter__()
    dl = cluster.path("restart-dl")
    # ~8 MiB/s: the 48 MiB transfer spans the restart
    pf = curl_popen(cluster, port, "/big", dl, rate=8 << 20)
    cluster.procs.append(pf)
    # Both streams under way: the exec's first line is out, the download has bytes.
    first = ex.stdout.readline()
    assert first == b"line-1\n", first
    wait_for(lambda: os.path.exists(dl + ".started"), 30, "the download under way")
    assert pf.poll() is None, "the transfer should still be running"
    cluster.stop_master()
    restarted = time.time()
    cluster.start_master()
    wait_for(lambda: {a.pod, b.pod} <= set(cluster.pods()), LEASE_S, "registrations back within one lease")
    assert time.time() - restarted < LEASE_S
    out, err = ex.communicate(timeout=30)
    assert ex.returncode == 9, err
    assert (first + out).decode().split() == [f"line-{i}" for i in range(1, 9)]
    try:
        assert pf.wait(60) == 0, pf.stderr.read()
    finally:
        fwd.__exit__(None, None, None)
    want = cluster.shimctl("exec", b.pod, "--", "sha256sum", "/www/big").stdout.split()[0].decode()
    with open(dl, "rb") as f:
        body = f.read()
    assert len(body) == 48 << 20 and hashlib.sha256(body).hexdigest() == want
