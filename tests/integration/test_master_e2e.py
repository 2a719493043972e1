"""The main job through shimlet-master: a real master (generated CA and
certificates, a token file, RBAC YAML), real runc containers whose
shimlet-hook registers them with the master (node token) and whose shim
renews the lease, and shimctl in master mode (flags and kubeconfig files)
getting its grants from the master."""
import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from containers import BIN, Container
from test_master import _cert, _name, _write_cert, _write_key  # PKI helpers

HOOK = os.path.join(BIN, "shimlet-hook")
SHIMCTL = os.path.join(BIN, "shimctl")
MASTER = os.path.join(BIN, "shimlet-master")
LEASE_S = 3
NODE = "n1"
TOKENS = {"alice": "tok-e2e-alice-5d4c3b2a", "node": "tok-e2e-node-n1-99887766", "dave": "tok-e2e-dave-1029"}

RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: pod-access
  namespace: default
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
- apiGroups: [""]
  resources: ["pods/exec", "pods/portforward"]
  verbs: ["create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: pod-access
  namespace: default
subjects:
- kind: User
  name: alice
- kind: User
  name: carol
roleRef:
  kind: Role
  name: pod-access
"""


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MasterEnv:
    """PKI, a running shimlet-master, a hook config pointing at it."""

    def __init__(self):
        for b in (HOOK, SHIMCTL, MASTER, os.path.join(BIN, "shimlet"), os.path.join(BIN, "shimlet-session")):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} missing: build first (scripts/build)")
        self.dir = tempfile.mkdtemp(prefix="mst2-e2e-")
        self.containers = []
        self.proc = None
        self.home = os.path.join(self.dir, "home")  # shimctl's $HOME: no stray ~/.kube/config
        os.makedirs(self.home)
        self._pki()
        self._start_master()
        self.state = os.path.join(self.dir, "state")
        self.hook_config = os.path.join(self.dir, "hook.json")
        self.write_hook_config(self.hook_config, self.state, f"https://127.0.0.1:{self.port}")

    def path(self, name):
        return os.path.join(self.dir, name)

    def _pki(self):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("shimlet-e2e-ca")
        self.ca = self.path("ca.crt")
        _write_cert(self.ca, _cert(ca_name, ca_key, ca_name, ca_key, ca=True))
        k = ec.generate_private_key(ec.SECP256R1())
        self.server_crt, self.server_key = self.path("server.crt"), self.path("server.key")
        _write_cert(self.server_crt, _cert(_name("shimlet-master"), k, ca_name, ca_key, san_ip="127.0.0.1"))
        _write_key(self.server_key, k)
        self.certs = {}
        for who in ("bob", "carol"):
            k = ec.generate_private_key(ec.SECP256R1())
            crt, key = self.path(who + ".crt"), self.path(who + ".key")
            _write_cert(crt, _cert(_name(who, ["people"]), k, ca_name, ca_key, client=True))
            _write_key(key, k)
            self.certs[who] = (crt, key)
        tk = ed25519.Ed25519PrivateKey.generate()
        self.ticket_key = self.path("ticket.key")
        _write_key(self.ticket_key, tk)
        # The shims trust the master's ticket key: kid "master" from the file name.
        self.master_pub = self.path("master.pub")
        with open(self.master_pub, "wb") as f:
            f.write(tk.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))

    def _start_master(self):
        tokens = self.path("tokens.csv")
        with open(tokens, "w") as f:
            f.write(f"{TOKENS['alice']},alice,uid-alice\n")
            f.write(f"{TOKENS['dave']},dave,uid-dave\n")
            f.write(f'{TOKENS["node"]},system:node:{NODE},uid-node,"system:nodes"\n')
        rbac = self.path("rbac.yaml")
        with open(rbac, "w") as f:
            f.write(RBAC)
        self.audit = self.path("audit.log")
        self.log = open(self.path("master.log"), "w+")
        self.proc = subprocess.Popen(
            [MASTER, "--bind-address", "127.0.0.1", "--secure-port", "0", "--tls-cert-file", self.server_crt,
             "--tls-private-key-file", self.server_key, "--client-ca-file", self.ca, "--token-auth-file", tokens,
             "--authorization-policy-file", rbac, "--audit-log-path", self.audit,
             "--ticket-signing-key-file", self.ticket_key, "--lease-duration", f"{LEASE_S}s"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.port = None
        deadline = time.time() + 10
        while time.time() < deadline and self.port is None and self.proc.poll() is None:
            self.log.seek(0)
            for line in self.log:
                if '"listening"' in line:
                    self.port = json.loads(line)["port"]
            time.sleep(0.05)
        if self.port is None:
            self.log.seek(0)
            raise AssertionError("shimlet-master did not start: " + self.log.read())
        self.url = f"https://127.0.0.1:{self.port}"

    def write_hook_config(self, path, state, url, fail=True):
        with open(path, "w") as f:
            json.dump({"state_dir": state, "fail_container_on_error": fail, "trusted_keys": [self.master_pub],
                       "master": {"url": url, "node": NODE, "ca": self.ca, "token": TOKENS["node"],
                                  "renew_interval_s": 1, "timeout_ms": 3000}}, f)

    def container(self, pod, args=("sleep", "100000"), config=None, state=None):
        config, state = config or self.hook_config, state or self.state
        entry = lambda stage: [{"path": HOOK, "args": ["shimlet-hook", "--config", config, stage]}]
        ann = {"io.kubernetes.pod.name": pod, "io.kubernetes.pod.namespace": "default",
               "io.kubernetes.container.name": "app"}

        def edit(cfg):
            cfg["annotations"] = ann

        c = Container(hooks={"createRuntime": entry("createRuntime"), "poststop": entry("poststop")}, edit=edit,
                      args=args)
        self.containers.append(c)
        c.start()
        wait_for(lambda: os.path.exists(os.path.join(state, c.id, "registration.json")), 5, "registration.json")
        return c

    def registration(self, cid, state=None):
        with open(os.path.join(state or self.state, cid, "registration.json")) as f:
            return json.load(f)

    def get(self, path, token=TOKENS["alice"]):
        ctx = ssl.create_default_context(cafile=self.ca)
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=10)
        try:
            conn.request("GET", path, headers={"Authorization": "Bearer " + token})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    def pods(self):
        st, lst = self.get("/api/v1/namespaces/default/pods")
        assert st == 200, lst
        return {p["metadata"]["name"]: p for p in lst["items"]}

    def audit_lines(self):
        with open(self.audit) as f:
            return [json.loads(l) for l in f if l.strip()]

    def shimctl(self, *args, env=None, timeout=60, **kw):
        e = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        e["HOME"] = self.home
        e.update(env or {})
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.run([SHIMCTL, *args], env=e, timeout=timeout, **kw)

    def kubeconfig(self, name, user="alice", namespace="default"):
        ca = base64.b64encode(open(self.ca, "rb").read()).decode()
        users = [{"name": "alice", "user": {"token": TOKENS["alice"]}},
                 {"name": "carol", "user": {"client-certificate-data":
                                            base64.b64encode(open(self.certs["carol"][0], "rb").read()).decode(),
                                            "client-key-data":
                                            base64.b64encode(open(self.certs["carol"][1], "rb").read()).decode()}},
                 # paths relative to the kubeconfig's directory
                 {"name": "bob", "user": {"client-certificate": "bob.crt", "client-key": "bob.key"}}]
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": user,
               "clusters": [{"name": "shimlet", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
               "users": users,
               "contexts": [{"name": u["name"], "context": {"cluster": "shimlet", "user": u["name"],
                                                             "namespace": namespace}} for u in users]}
        p = self.path(name)
        with open(p, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        return p

    def cleanup(self):
        for c in self.containers:
            with contextlib.suppress(Exception):
                c.cleanup()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # A shim that outlived its container (hook failure) dies with the test.
        for p in os.listdir("/proc"):
            if p.isdigit():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        if self.dir.encode() in f.read() and int(p) != os.getpid():
                            os.kill(int(p), signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def env():
    e = MasterEnv()
    try:
        yield e
    finally:
        e.cleanup()


WEB_ARGS = ("sh", "-c", "mkdir -p /www && echo hello-through-master > /www/index.html && "
                        "exec httpd -f -p 127.0.0.1:8080 -h /www")


@pytest.fixture(scope="module")
def web(env):
    pod = "web-" + uuid.uuid4().hex[:6]
    c = env.container(pod, args=WEB_ARGS)
    c.pod = pod
    return c


def flags(env):
    return ["--server", env.url, "--certificate-authority", env.ca]


# ---------------------------------------------------------------- registry

def test_pod_registered_by_the_hook(env, web):
    pods = wait_for(lambda: web.pod in env.pods() and env.pods(), 5, "pod listed")
    p = pods[web.pod]
    assert p["spec"]["nodeName"] == NODE
    assert p["status"]["containerStatuses"][0]["containerID"] == "shimlet://" + web.id
    reg = env.registration(web.id)
    puts = [l for l in env.audit_lines() if l.get("method") == "PUT" and l.get("container_id") == web.id]
    assert puts and puts[0]["user"] == f"system:node:{NODE}" and puts[0]["code"] == 201, puts[:1]
    assert reg["endpoint"].startswith("127.0.0.1:")


def test_shim_renews_the_lease(env, web):
    time.sleep(LEASE_S * 2)
    assert web.pod in env.pods(), "the lease lapsed although the shim is alive"
    renewals = [l for l in env.audit_lines()
                if l.get("method") == "PUT" and l.get("container_id") == web.id and l["code"] == 200]
    assert len(renewals) >= LEASE_S, renewals
    assert not any(l["event"] == "lease_expired" and l.get("container_id") == web.id for l in env.audit_lines())


# ---------------------------------------------------------------- shimctl through the master

def test_exec_with_token_flags(env, web):
    p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "exec", web.pod, "--", "sh", "-c",
                    "echo hi; echo err >&2; exit 7")
    assert p.returncode == 7, p.stderr
    assert p.stdout == b"hi\n" and p.stderr == b"err\n"
    grants = [l for l in env.audit_lines() if l.get("user") == "alice" and l.get("resource") == "pods/exec"]
    assert grants and grants[-1]["decision"] == "allow" and grants[-1]["command"] == ["sh", "-c",
                                                                                      "echo hi; echo err >&2; exit 7"]
    assert grants[-1]["shim"]["container_id"] == web.id


def test_exec_with_stdin_and_namespace_flag(env, web):
    p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "-n", "default", "exec", "-i", web.pod, "-c", "app",
                    "--", "cat", input=b"piped through the master\n", stdin=None)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"piped through the master\n"


def test_exec_with_kubeconfig(env, web):
    kc = env.kubeconfig("kubeconfig")
    p = env.shimctl("--kubeconfig", kc, "exec", web.pod, "--", "echo", "from-kubeconfig")
    assert p.returncode == 0 and p.stdout == b"from-kubeconfig\n", p.stderr
    # $KUBECONFIG (a list; missing entries are skipped), then ~/.kube/config
    p = env.shimctl("exec", web.pod, "--", "echo", "env", env={"KUBECONFIG": env.path("nope") + ":" + kc})
    assert p.returncode == 0 and p.stdout == b"env\n", p.stderr
    os.makedirs(os.path.join(env.home, ".kube"), exist_ok=True)
    shutil.copy(kc, os.path.join(env.home, ".kube", "config"))
    try:
        p = env.shimctl("exec", web.pod, "--", "sh", "-c", "exit 3")
        assert p.returncode == 3, p.stderr
    finally:
        os.unlink(os.path.join(env.home, ".kube", "config"))
    # a client-certificate user (-data fields), chosen with --context
    p = env.shimctl("--kubeconfig", kc, "--context", "carol", "exec", web.pod, "--", "echo", "carol")
    assert p.returncode == 0 and p.stdout == b"carol\n", p.stderr
    assert any(l.get("user") == "carol" and l.get("auth") == "x509" and l.get("code") == 201
               for l in env.audit_lines())
    # the context's namespace applies; -n overrides it
    kc_other = env.kubeconfig("kubeconfig-other-ns", namespace="elsewhere")
    p = env.shimctl("--kubeconfig", kc_other, "exec", web.pod, "--", "true")
    assert p.returncode == 255 and b"elsewhere" in p.stderr, p.stderr
    p = env.shimctl("--kubeconfig", kc_other, "-n", "default", "exec", web.pod, "--", "true")
    assert p.returncode == 0, p.stderr


def test_bob_is_forbidden(env, web):
    bob_crt, bob_key = env.certs["bob"]
    p = env.shimctl(*flags(env), "--client-certificate", bob_crt, "--client-key", bob_key, "exec", web.pod, "--",
                    "id")
    assert p.returncode == 255, p
    err = p.stderr.decode()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "forbidden" in err and "bob" in err, err
    assert p.stdout == b""
    # the same through a kubeconfig with relative certificate paths
    p = env.shimctl("--kubeconfig", env.kubeconfig("kubeconfig-bob", user="bob"), "port-forward", web.pod, "8080")
    assert p.returncode == 255 and b"forbidden" in p.stderr, p.stderr
    denied = [l for l in env.audit_lines() if l.get("user") == "bob"]
    assert len(denied) >= 2 and all(l["decision"] == "deny" and l["code"] == 403 for l in denied), denied
    assert {l["resource"] for l in denied} == {"pods/exec", "pods/portforward"}


def test_bad_credentials_and_missing_master(env, web):
    p = env.shimctl(*flags(env), "--token", "wrong-token", "exec", web.pod, "--", "id")
    assert p.returncode == 255 and p.stderr.startswith(b"error: ") and b"Unauthorized" not in p.stdout, p.stderr
    # a master certificate that the given CA did not sign
    p = env.shimctl("--server", env.url, "--certificate-authority", env.master_pub, "--token", TOKENS["alice"],
                    "exec", web.pod, "--", "id")
    assert p.returncode == 255 and p.stderr.startswith(b"error: "), p.stderr
    p = env.shimctl("--server", env.url, "--token", TOKENS["alice"], "exec", web.pod, "--", "id")
    assert p.returncode == 255 and b"not trusted" in p.stderr, p.stderr
    # no master at all: a clear hint
    p = env.shimctl("exec", web.pod, "--", "id")
    assert p.returncode == 255 and b"--server" in p.stderr and b"--local" in p.stderr, p.stderr
    # an unknown pod: the master's 404 message
    p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "exec", "no-such-pod", "--", "id")
    assert p.returncode == 255 and b"no-such-pod" in p.stderr, p.stderr
    # dave is authenticated but has no binding
    p = env.shimctl(*flags(env), "--token", TOKENS["dave"], "exec", web.pod, "--", "id")
    assert p.returncode == 255 and b"forbidden" in p.stderr, p.stderr


def test_port_forward_through_master(env, web):
    kc = env.kubeconfig("kubeconfig-pf")
    pf = subprocess.Popen([SHIMCTL, "--kubeconfig", kc, "port-forward", web.pod, "0:8080"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env={**os.environ, "HOME": env.home})
    try:
        line = pf.stdout.readline().decode()
        m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line)
        assert m, (line, pf.poll())
        body = wait_for(lambda: _get(f"http://127.0.0.1:{m.group(1)}/"), 10, "HTTP through the forward")
        assert body.strip() == "hello-through-master"
    finally:
        pf.send_signal(signal.SIGINT)
        try:
            pf.wait(5)
        except subprocess.TimeoutExpired:
            pf.kill()
            pf.wait()
    grants = [l for l in env.audit_lines() if l.get("resource") == "pods/portforward" and l.get("code") == 201]
    assert grants and grants[-1]["ports"] == [{"port": 8080, "proto": "tcp"}], grants[-1:]


def _get(url):
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None


def test_local_mode_still_works(env, web):
    p = env.shimctl("--local", "--state-dir", env.state, "exec", web.id, "--", "echo", "local")
    assert p.returncode == 0 and p.stdout == b"local\n", p.stderr


# ---------------------------------------------------------------- leaving the registry

def test_container_stop_deletes_registration(env):
    pod = "stop-" + uuid.uuid4().hex[:6]
    c = env.container(pod)
    wait_for(lambda: pod in env.pods(), 5, "pod listed")
    c.stop()
    start = time.time()
    wait_for(lambda: pod not in env.pods(), 5, "pod gone after stop")
    assert time.time() - start < LEASE_S, "removed by the lease, not by the poststop DELETE"
    lines = env.audit_lines()
    assert any(l.get("method") == "DELETE" and l.get("container_id") == c.id and l["code"] == 200 for l in lines)
    assert not any(l["event"] == "lease_expired" and l.get("container_id") == c.id for l in lines)
    assert not os.path.exists(os.path.join(env.state, c.id))
    # no renewal re-registers it afterwards
    time.sleep(2)
    assert pod not in env.pods()


def test_lease_lapses_when_renewals_stop(env):
    pod = "lapse-" + uuid.uuid4().hex[:6]
    c = env.container(pod)
    wait_for(lambda: pod in env.pods(), 5, "pod listed")
    shim = env.registration(c.id)["shim_pid"]
    os.kill(shim, signal.SIGSTOP)  # the renewer's parent: no more renewals
    try:
        start = time.time()
        wait_for(lambda: pod not in env.pods(), LEASE_S + 5, "lease lapse")
        assert time.time() - start >= LEASE_S - 1.5
        assert any(l["event"] == "lease_expired" and l.get("container_id") == c.id for l in env.audit_lines())
        # the container itself still runs; exec through the master is refused (404)
        assert c.state()["status"] == "running"
        p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "exec", pod, "--", "true")
        assert p.returncode == 255 and pod.encode() in p.stderr, p.stderr
    finally:
        os.kill(shim, signal.SIGCONT)
    # renewals resume: the master learns the container again
    wait_for(lambda: pod in env.pods(), 5, "re-registration after the renewer resumed")
    c.stop()


def test_unreachable_master_never_fails_the_container(env):
    # A closed port: registration fails, is logged, and the container still runs.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    state = env.path("state-dead")
    cfg = env.path("hook-dead.json")
    env.write_hook_config(cfg, state, f"https://127.0.0.1:{dead}", fail=False)
    c = env.container("dead-" + uuid.uuid4().hex[:6], config=cfg, state=state)
    assert c.state()["status"] == "running"
    log = open(os.path.join(state, "hook.log")).read()
    assert "cannot connect" in log and str(dead) in log, log
    p = env.shimctl("--local", "--state-dir", state, "exec", c.id, "--", "echo", "ok")
    assert p.returncode == 0 and p.stdout == b"ok\n", p.stderr
    c.stop()
    assert not os.path.exists(os.path.join(state, c.id))
