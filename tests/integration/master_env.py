"""A real shimlet-master for integration tests (generated CA and
certificates, a token file, RBAC YAML, audit log) and a hook config that
registers real runc containers with it; shared by test_master_e2e.py and
test_kubectl.py."""
import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time

from cryptography.hazmat.primitives.asymmetric import ec

from containers import BIN, Container, wait_for
from test_master import _cert, _name, _write_cert, _write_key, _write_ticket_keys  # PKI helpers

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
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: pod-reader
  namespace: default
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: pod-reader
  namespace: default
subjects:
- kind: User
  name: dave
roleRef:
  kind: Role
  name: pod-reader
"""


class MasterEnv:
    """PKI, a running shimlet-master, a hook config pointing at it."""

    def __init__(self, extra_args=(), lease_s=LEASE_S):
        self.extra_args = list(extra_args)  # more shimlet-master flags
        self.lease_s = lease_s  # --lease-duration
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
        # The shims trust the master's ticket key: kid "master" from the file name.
        self.ticket_key, self.master_pub = self.path("ticket.key"), self.path("master.pub")
        _write_ticket_keys(self.ticket_key, self.master_pub)

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
             "--ticket-signing-key-file", self.ticket_key, "--lease-duration", f"{self.lease_s}s", *self.extra_args],
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

    def hooks(self, config=None):
        """config.json's hooks running shimlet-hook with this hook config."""
        entry = lambda stage: [{"path": HOOK, "args": ["shimlet-hook", "--config", config or self.hook_config, stage]}]
        return {"createRuntime": entry("createRuntime"), "poststop": entry("poststop")}

    def new_container(self, pod, namespace="default", args=("sleep", "100000"), config=None, hooks=None):
        """A container of pod NAMESPACE/pod (annotations as the kubelet's), not started, cleaned up with the env."""
        def edit(cfg):
            cfg["annotations"] = {"io.kubernetes.pod.name": pod, "io.kubernetes.pod.namespace": namespace,
                                  "io.kubernetes.container.name": "app"}

        c = Container(hooks=hooks or self.hooks(config), edit=edit, args=args)
        self.containers.append(c)
        return c

    def container(self, pod, args=("sleep", "100000"), config=None, state=None, namespace="default"):
        """A started container of the pod, once its shim has registered."""
        state = state or self.state
        c = self.new_container(pod, namespace, args, config)
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
