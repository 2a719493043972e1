"""shimlet-master end to end: the real binary with generated PKI, tokens and
RBAC manifests. Checks authentication, the authorization matrix, the registry
(leases, node isolation), grants (tickets verified with the master's public
key), the audit log, and that bad input never takes the master down. Every
test that uses `env` runs twice: against the in-memory registry and against
the etcd one (a TLS etcd member started here, etcd_env.py)."""
import base64
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import pytest
from containers import wait_for
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
import datetime
import ipaddress

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("SHIMLET_BIN", os.path.join(REPO, "build", "bin"))
MASTER = os.path.join(BIN, "shimlet-master")
LEASE_S = 3
TICKET_LIFETIME_S = 45

TOKENS = {
    "alice": "tok-alice-6f1e2d3c4b5a",
    "dave": "tok-dave-0a9b8c7d6e5f",
    "node1": "tok-node1-1234567890ab",
    "runner": "tok-runner-feedc0ffee",
    "nobody": "tok-nobody-deadbeef00",
}

RBAC_CLUSTER = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: pod-exec
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
- apiGroups: [""]
  resources: ["pods/exec"]
  verbs: ["create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: pod-viewer
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: admin-all
rules:
- apiGroups: ["*"]
  resources: ["*"]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: viewers
subjects:
- kind: Group
  name: viewers
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: ClusterRole
  name: pod-viewer
  apiGroup: rbac.authorization.k8s.io
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: admins
subjects:
- kind: Group
  name: admins
roleRef:
  kind: ClusterRole
  name: admin-all
  apiGroup: rbac.authorization.k8s.io
"""

RBAC_NAMESPACED = """
# alice may exec in namespace dev (ClusterRole bound by a RoleBinding)
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: alice-exec
  namespace: dev
subjects:
- kind: User
  name: alice
roleRef:
  kind: ClusterRole
  name: pod-exec
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: web-pf
  namespace: web
rules:
- apiGroups: [""]
  resources: ["pods/portforward"]
  resourceNames: ["web-1"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: ops-pf
  namespace: web
subjects:
- kind: Group
  name: ops
roleRef:
  kind: Role
  name: web-pf
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: ci-exec
  namespace: ci
rules:
- apiGroups: [""]
  resources: ["pods/exec"]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: runner-exec
  namespace: ci
subjects:
- kind: ServiceAccount
  name: runner
  namespace: ci
roleRef:
  kind: Role
  name: ci-exec
"""


# ---------------------------------------------------------------- PKI

def _name(cn, orgs=()):
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    return x509.Name(attrs)


def _cert(subject, key, issuer_name, issuer_key, ca=False, san_ip=None, client=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san_ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]), False)
    if client:
        b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    return b.sign(issuer_key, hashes.SHA256())


def _write_key(path, key):
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _write_ticket_keys(key_path, pub_path):
    """A fresh master ticket key (Ed25519) and its public PEM, which shims trust."""
    tk = ed25519.Ed25519PrivateKey.generate()
    _write_key(key_path, tk)
    with open(pub_path, "wb") as f:
        f.write(tk.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return tk


def _write_cert(path, cert):
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _issue(crt, key, subject, issuer_name, issuer_key, **kw):
    """A fresh P-256 key and a certificate for it signed by the issuer, written to crt and key."""
    k = ec.generate_private_key(ec.SECP256R1())
    _write_cert(crt, _cert(subject, k, issuer_name, issuer_key, **kw))
    _write_key(key, k)


def jkt_of_cert_file(path):
    cert = x509.load_pem_x509_certificate(open(path, "rb").read())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.urlsafe_b64encode(hashlib.sha256(spki).digest()).rstrip(b"=").decode()


class Pki:
    def __init__(self, d):
        self.dir = d
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("shimlet-test-ca")
        ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
        self.ca = os.path.join(d, "ca.crt")
        _write_cert(self.ca, ca)
        srv_key = ec.generate_private_key(ec.SECP256R1())
        self.server_crt, self.server_key = os.path.join(d, "server.crt"), os.path.join(d, "server.key")
        _write_cert(self.server_crt, _cert(_name("shimlet-master"), srv_key, ca_name, ca_key, san_ip="127.0.0.1"))
        _write_key(self.server_key, srv_key)
        self.clients = {}
        for who, cn, orgs in [("bob", "bob", ["dev", "viewers"]), ("carol", "carol", ["ops"]),
                              ("erin", "erin", ["admins"]), ("node2", "system:node:n2", ["system:nodes"])]:
            k = ec.generate_private_key(ec.SECP256R1())
            crt, key = os.path.join(d, who + ".crt"), os.path.join(d, who + ".key")
            _write_cert(crt, _cert(_name(cn, orgs), k, ca_name, ca_key, client=True))
            _write_key(key, k)
            self.clients[who] = (crt, key)
        # A certificate from a CA the master does not trust.
        rogue_key = ec.generate_private_key(ec.SECP256R1())
        rogue_name = _name("rogue-ca")
        mk = ec.generate_private_key(ec.SECP256R1())
        crt, key = os.path.join(d, "mallory.crt"), os.path.join(d, "mallory.key")
        _write_cert(crt, _cert(_name("erin", ["admins"]), mk, rogue_name, rogue_key, client=True))
        _write_key(key, mk)
        self.clients["mallory"] = (crt, key)
        self.ticket_key = ed25519.Ed25519PrivateKey.generate()
        self.ticket_key_file = os.path.join(d, "ticket.key")
        _write_key(self.ticket_key_file, self.ticket_key)


# ---------------------------------------------------------------- the master

class Master:
    def __init__(self, d, pki, extra_args=(), etcd=None):
        self.etcd = etcd  # etcd_env.EtcdCluster: the registry is there (under a prefix of its own)
        self.dir, self.pki = d, pki
        self.tokens = os.path.join(d, "tokens.csv")
        with open(self.tokens, "w") as f:
            f.write("# token,user,uid,groups\n")
            f.write(f'{TOKENS["alice"]},alice,uid-alice,"dev,viewers"\n')
            f.write(f'{TOKENS["dave"]},dave,uid-dave\n')
            f.write(f'{TOKENS["node1"]},system:node:n1,uid-n1,"system:nodes"\n')
            f.write(f'"{TOKENS["runner"]}",system:serviceaccount:ci:runner,uid-r,"system:serviceaccounts"\n')
            f.write(f'{TOKENS["nobody"]},nobody,uid-nobody,""\n')
        self.rbac = os.path.join(d, "rbac")
        os.makedirs(self.rbac, exist_ok=True)
        open(os.path.join(self.rbac, "10-cluster.yaml"), "w").write(RBAC_CLUSTER)
        open(os.path.join(self.rbac, "20-namespaced.yml"), "w").write(RBAC_NAMESPACED)
        self.audit = os.path.join(d, "audit.log")
        self.log = open(os.path.join(d, "master.log"), "w+")
        self.proc = subprocess.Popen(
            [MASTER, "--bind-address", "127.0.0.1", "--secure-port", "0",
             "--tls-cert-file", pki.server_crt, "--tls-private-key-file", pki.server_key,
             "--client-ca-file", pki.ca, "--token-auth-file", self.tokens,
             "--authorization-policy-file", self.rbac, "--audit-log-path", self.audit,
             "--ticket-signing-key-file", pki.ticket_key_file, "--lease-duration", f"{LEASE_S}s",
             "--ticket-lifetime", f"{TICKET_LIFETIME_S}s", "--request-timeout", "3",
             *(etcd.master_flags(etcd.prefix) if etcd else []), *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.port = None
        deadline = time.time() + 10
        while time.time() < deadline and self.port is None:
            if self.proc.poll() is not None:
                break
            self.log.seek(0)
            for line in self.log:
                if '"listening"' in line:
                    self.port = json.loads(line)["port"]
            time.sleep(0.05)
        if self.port is None:
            self.stop()
            self.log.seek(0)
            raise AssertionError("shimlet-master did not start: " + self.log.read())
        # Ready = the registry can be read (with etcd: loaded and confirmed current).
        deadline = time.time() + 20
        while self.request("GET", "/readyz")[0] != 200:
            if time.time() > deadline or not self.alive():
                self.log.seek(0)
                raise AssertionError("shimlet-master not ready: " + str(self.request("GET", "/readyz")) +
                                     self.log.read())
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def alive(self):
        return self.proc.poll() is None

    def ctx(self, who=None):
        c = ssl.create_default_context(cafile=self.pki.ca)
        c.check_hostname = False
        if who:
            c.load_cert_chain(*self.pki.clients[who])
        return c

    def request(self, method, path, token=None, cert=None, body=None, headers=None):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx(cert), timeout=10)
        h = dict(headers or {})
        if token:
            h["Authorization"] = "Bearer " + token
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            h["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data.decode(errors="replace")

    def audit_lines(self):
        with open(self.audit) as f:
            return [json.loads(l) for l in f if l.strip()]


@pytest.fixture(scope="module")
def etcd():
    """One TLS etcd member for the etcd-backed runs (started on first use)."""
    from etcd_env import EtcdCluster  # (etcd_env imports this module's PKI helpers)
    c = EtcdCluster(members=1)
    c.prefix = "/shimlet-test-" + c.token
    yield c
    c.cleanup()


@pytest.fixture(scope="module", params=["memory", "etcd"])
def env(request):
    assert os.access(MASTER, os.X_OK), f"{MASTER} not built"
    d = tempfile.mkdtemp(prefix="mst-master-test-")
    pki = Pki(d)
    m = None
    try:
        m = Master(d, pki, etcd=request.getfixturevalue("etcd") if request.param == "etcd" else None)
        yield m
    finally:
        if m:
            m.stop()
        shutil.rmtree(d, ignore_errors=True)


def registration(cid, ns, pod, container, port=40000, node=None, annotations=None):
    pin = "sha256/" + base64.b64encode(hashlib.sha256(cid.encode()).digest()).decode()
    r = {"id": cid, "pid": 1234, "bundle": "/b/" + cid, "runtime_root": "", "namespace": ns, "pod": pod,
         "container": container, "endpoint": f"127.0.0.1:{port}", "pin": pin, "shim_pid": 5678,
         "created": "2026-11-26T18:40:00Z", "annotations": annotations or {}}
    if node:
        r["node"] = node
    return r


def register_n1(env, cid, ns, pod, container, **kw):
    st, body = env.request("PUT", f"/apis/shimlet.io/v1/nodes/n1/containers/{cid}", token=TOKENS["node1"],
                           body=registration(cid, ns, pod, container, **kw))
    assert st in (200, 201), body
    return body


def register_all(env):
    register_n1(env, "c-dev-app", "dev", "p1", "app", port=41001)
    register_n1(env, "c-dev-side", "dev", "p1", "sidecar", port=41002)
    register_n1(env, "c-web-1", "web", "web-1", "nginx", port=41003)
    register_n1(env, "c-web-2", "web", "web-2", "nginx", port=41004)
    register_n1(env, "c-ci", "ci", "job", "build", port=41005)
    register_n1(env, "c-prod", "prod", "db", "pg", port=41006)


JKT = base64.urlsafe_b64encode(hashlib.sha256(b"client key").digest()).rstrip(b"=").decode()


def b64url_json(s):
    return json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))


def verify_ticket(env, ticket):
    h, p, s = ticket.split(".")
    sig = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    env.pki.ticket_key.public_key().verify(sig, (h + "." + p).encode())  # raises if invalid
    return b64url_json(h), b64url_json(p)


# ---------------------------------------------------------------- tests

def test_healthz(env):
    assert env.request("GET", "/healthz") == (200, "ok")


def test_anonymous_refused(env):
    st, body = env.request("GET", "/api/v1/namespaces/dev/pods")
    assert st == 401 and body["kind"] == "Status" and body["reason"] == "Unauthorized", body
    st, body = env.request("POST", "/apis/shimlet.io/v1/namespaces/dev/pods/p1/exec", body={"command": ["id"]})
    assert st == 401


@pytest.mark.parametrize("auth", ["Bearer wrong-token", "Bearer " + TOKENS["alice"] + "x", "Basic YWxpY2U6cHc=",
                                  "Bearer", "Bearer a b c", "bearer  "])
def test_bad_credentials_refused(env, auth):
    st, body = env.request("GET", "/api/v1/namespaces/dev/pods", headers={"Authorization": auth})
    assert st == 401, body


def test_token_and_cert_authentication(env):
    st, body = env.request("GET", "/api/v1/namespaces/dev/pods", token=TOKENS["alice"])
    assert st == 200 and body["kind"] == "PodList", body
    st, body = env.request("GET", "/api/v1/namespaces/dev/pods", cert="bob")  # O=viewers
    assert st == 200 and body["kind"] == "PodList", body
    # Same subject as erin (admins) but from an untrusted CA.
    st, body = env.request("GET", "/api/v1/namespaces/dev/pods", cert="mallory")
    assert st == 401 and "certificate" in body["message"], body
    lines = env.audit_lines()
    bob = [l for l in lines if l.get("user") == "bob"]
    assert bob and bob[-1]["auth"] == "x509" and "viewers" in bob[-1]["groups"]


# (who, token/cert, method, path, body, expected)
EXEC = {"command": ["sh", "-c", "id"], "stdin": True, "tty": False, "jkt": JKT}
PF = {"ports": [{"port": 8080, "proto": "tcp"}], "jkt": JKT}
G = "/apis/shimlet.io/v1/namespaces"
MATRIX = [
    # alice: pod-exec in dev only, viewers cluster-wide
    ("alice", "POST", f"{G}/dev/pods/p1/exec", EXEC, 201),
    ("alice", "POST", f"{G}/prod/pods/db/exec", EXEC, 403),
    ("alice", "POST", f"{G}/dev/pods/p1/portforward", PF, 403),
    ("alice", "GET", "/api/v1/namespaces/prod/pods", None, 200),  # viewers: ClusterRoleBinding
    ("alice", "GET", "/api/v1/pods", None, 200),
    # dave: authenticated, no bindings
    ("dave", "GET", "/api/v1/namespaces/dev/pods", None, 403),
    ("dave", "POST", f"{G}/dev/pods/p1/exec", EXEC, 403),
    ("dave", "GET", "/api/v1/namespaces/dev/pods/p1", None, 403),
    # carol (cert, O=ops): port-forward web-1 only (resourceNames), get in web
    ("carol", "POST", f"{G}/web/pods/web-1/portforward", PF, 201),
    ("carol", "POST", f"{G}/web/pods/web-2/portforward", PF, 403),
    ("carol", "POST", f"{G}/web/pods/web-1/exec", EXEC, 403),
    ("carol", "GET", "/api/v1/namespaces/web/pods/web-1", None, 200),
    ("carol", "GET", "/api/v1/namespaces/web/pods", None, 403),  # get, not list
    ("carol", "GET", "/api/v1/namespaces/dev/pods/p1", None, 403),
    # runner: a ServiceAccount subject in ci, verbs ["*"] on pods/exec
    ("runner", "POST", f"{G}/ci/pods/job/exec", EXEC, 201),
    ("runner", "POST", f"{G}/dev/pods/p1/exec", EXEC, 403),
    ("runner", "GET", "/api/v1/namespaces/ci/pods", None, 403),
    # erin (cert, O=admins): * * *
    ("erin", "POST", f"{G}/prod/pods/db/exec", EXEC, 201),
    ("erin", "POST", f"{G}/web/pods/web-2/portforward", PF, 201),
    # bob (cert, O=dev,viewers): view only
    ("bob", "GET", "/api/v1/namespaces/web/pods/web-2", None, 200),
    ("bob", "POST", f"{G}/dev/pods/p1/exec", EXEC, 403),
    # a node credential is not a user with RBAC rights
    ("node1", "POST", f"{G}/dev/pods/p1/exec", EXEC, 403),
    ("nobody", "GET", "/api/v1/pods", None, 403),
]


def _as(env, who, method, path, body):
    if who in TOKENS:
        return env.request(method, path, token=TOKENS[who], body=body)
    return env.request(method, path, cert=who, body=body)


@pytest.mark.parametrize("who,method,path,body,expected", MATRIX,
                         ids=[f"{m[0]}-{m[1]}-{m[2].split('/', 4)[-1]}" for m in MATRIX])
def test_authorization_matrix(env, who, method, path, body, expected):
    register_all(env)
    st, resp = _as(env, who, method, path, body)
    assert st == expected, resp
    if expected == 403:
        assert resp["kind"] == "Status" and resp["reason"] == "Forbidden" and resp["code"] == 403
        line = env.audit_lines()[-1]
        assert line["decision"] == "deny" and line["reason"].startswith("no RBAC rule allows"), line
    elif st < 300:
        line = env.audit_lines()[-1]
        assert line["decision"] == "allow" and line["reason"].startswith("RBAC: allowed by"), line


def test_registry_list_get_and_shapes(env):
    register_all(env)
    register_n1(env, "c-multi-b", "multi", "mp", "b", port=42002)
    register_n1(env, "c-multi-a", "multi", "mp", "a", port=42001,
                annotations={"kubectl.kubernetes.io/default-container": "a"})
    st, lst = env.request("GET", "/api/v1/namespaces/multi/pods", cert="erin")
    assert st == 200 and lst["kind"] == "PodList" and lst["apiVersion"] == "v1"
    assert [p["metadata"]["name"] for p in lst["items"]] == ["mp"]
    st, pod = env.request("GET", "/api/v1/namespaces/multi/pods/mp", cert="erin")
    assert st == 200, pod
    assert pod["kind"] == "Pod" and pod["apiVersion"] == "v1"
    assert pod["metadata"]["namespace"] == "multi" and pod["metadata"]["name"] == "mp"
    assert sorted(c["name"] for c in pod["spec"]["containers"]) == ["a", "b"]
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["nodeName"] == "n1"
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "a"
    # default container: the annotation
    st, g = env.request("POST", f"{G}/multi/pods/mp/exec", cert="erin", body=EXEC)
    assert st == 201 and g["container_id"] == "c-multi-a" and g["endpoint"] == "127.0.0.1:42001", g
    st, g = env.request("POST", f"{G}/multi/pods/mp/exec", cert="erin", body=dict(EXEC, container="b"))
    assert st == 201 and g["container_id"] == "c-multi-b", g
    st, g = env.request("POST", f"{G}/multi/pods/mp/exec", cert="erin", body=dict(EXEC, container="zzz"))
    assert st == 404 and g["reason"] == "NotFound", g
    st, g = env.request("GET", "/api/v1/namespaces/multi/pods/nope", cert="erin")
    assert st == 404 and g["reason"] == "NotFound"
    # cluster-wide list has every namespace
    st, lst = env.request("GET", "/api/v1/pods", cert="erin")
    assert {"dev", "web", "ci", "prod", "multi"} <= {p["metadata"]["namespace"] for p in lst["items"]}


def test_node_isolation(env):
    register_n1(env, "c-iso", "dev", "iso", "app")
    # node2 (certificate) may not take over node1's live container...
    st, body = env.request("PUT", "/apis/shimlet.io/v1/nodes/n2/containers/c-iso", cert="node2",
                           body=registration("c-iso", "dev", "iso", "app"))
    assert st == 403 and "registered by node" in body["message"], body
    # ...nor act as node1 in the path...
    st, body = env.request("PUT", "/apis/shimlet.io/v1/nodes/n1/containers/c-x", cert="node2",
                           body=registration("c-x", "dev", "x", "app"))
    assert st == 403, body
    # ...nor register a container that says it is on n1...
    st, body = env.request("PUT", "/apis/shimlet.io/v1/nodes/n2/containers/c-y", cert="node2",
                           body=registration("c-y", "dev", "y", "app", node="n1"))
    assert st == 403, body
    # ...nor delete it. A user is not a node.
    st, body = env.request("DELETE", "/apis/shimlet.io/v1/nodes/n2/containers/c-iso", cert="node2")
    assert st == 403, body
    st, body = env.request("PUT", "/apis/shimlet.io/v1/nodes/n1/containers/c-z", token=TOKENS["alice"],
                           body=registration("c-z", "dev", "z", "app"))
    assert st == 403, body
    # its own containers are fine
    st, body = env.request("PUT", "/apis/shimlet.io/v1/nodes/n2/containers/c-n2", cert="node2",
                           body=registration("c-n2", "dev", "n2pod", "app", node="n2"))
    assert st == 201 and body["leaseDurationSeconds"] == LEASE_S, body
    st, body = env.request("PUT", "/apis/shimlet.io/v1/nodes/n2/containers/c-n2", cert="node2",
                           body=registration("c-n2", "dev", "n2pod", "app", node="n2"))
    assert st == 200, body  # renewed
    st, pod = env.request("GET", "/api/v1/namespaces/dev/pods/n2pod", cert="erin")
    assert st == 200 and pod["spec"]["nodeName"] == "n2"
    st, body = env.request("DELETE", "/apis/shimlet.io/v1/nodes/n2/containers/c-n2", cert="node2")
    assert st == 200, body
    st, _ = env.request("GET", "/api/v1/namespaces/dev/pods/n2pod", cert="erin")
    assert st == 404
    st, pod = env.request("GET", "/api/v1/namespaces/dev/pods/iso", cert="erin")
    assert st == 200 and pod["spec"]["nodeName"] == "n1"


def test_unspecified_endpoint_host_becomes_peer_address(env):
    reg = registration("c-any", "dev", "anyhost", "app")
    reg["endpoint"] = "0.0.0.0:43210"
    st, _ = env.request("PUT", "/apis/shimlet.io/v1/nodes/n1/containers/c-any", token=TOKENS["node1"], body=reg)
    assert st == 201
    st, g = env.request("POST", f"{G}/dev/pods/anyhost/exec", cert="erin", body=EXEC)
    assert st == 201 and g["endpoint"] == "127.0.0.1:43210", g


def test_lease_lapse_removes_entry(env):
    register_n1(env, "c-lease", "lease", "lp", "app")
    st, _ = env.request("GET", "/api/v1/namespaces/lease/pods/lp", cert="erin")
    assert st == 200
    # renewing keeps it alive past one lease period
    first = time.time()
    while time.time() - first < LEASE_S + 1:
        time.sleep(1)
        register_n1(env, "c-lease", "lease", "lp", "app")
    st, _ = env.request("GET", "/api/v1/namespaces/lease/pods/lp", cert="erin")
    assert st == 200
    # then it lapses one lease after the last renewal, not before
    last = time.time()
    wait_for(lambda: env.request("GET", "/api/v1/namespaces/lease/pods/lp", cert="erin")[0] == 404, LEASE_S + 5,
             "the lease to lapse")
    assert time.time() - last >= LEASE_S - 1
    st, lst = env.request("GET", "/api/v1/namespaces/lease/pods", cert="erin")
    assert st == 200 and lst["items"] == []
    assert any(l["event"] == "lease_expired" and l["container_id"] == "c-lease" for l in env.audit_lines())


def test_exec_grant_ticket(env):
    register_all(env)
    st, g = env.request("POST", f"{G}/dev/pods/p1/exec", token=TOKENS["alice"],
                        body={"container": "sidecar", "command": ["sh", "-c", "echo hi"], "stdin": True,
                              "tty": True, "jkt": JKT})
    assert st == 201, g
    reg = registration("c-dev-side", "dev", "p1", "sidecar", port=41002)
    assert g["endpoint"] == reg["endpoint"] and g["pin"] == reg["pin"] and g["container_id"] == "c-dev-side"
    hdr, claims = verify_ticket(env, g["ticket"])
    assert hdr == {"alg": "EdDSA", "typ": "shimlet-ticket+jwt", "kid": "master"}
    assert claims["iss"] == "shimlet-master" and claims["sub"] == "alice" and claims["aud"] == "c-dev-side"
    assert claims["verb"] == "exec" and claims["cmd"] == ["sh", "-c", "echo hi"]
    assert claims["stdin"] is True and claims["tty"] is True
    assert claims["cnf"] == {"jkt": JKT}
    assert claims["sid"] == g["session_id"] and claims["node"] == "n1"
    assert claims["exp"] - claims["iat"] == TICKET_LIFETIME_S and abs(claims["iat"] - time.time()) < 5
    assert len(claims["jti"]) >= 16
    # a second grant is a different ticket
    st, g2 = env.request("POST", f"{G}/dev/pods/p1/exec", token=TOKENS["alice"], body=EXEC)
    assert st == 201 and verify_ticket(env, g2["ticket"])[1]["jti"] != claims["jti"]
    assert g2["container_id"] == "c-dev-app"  # first container by default
    # the audit line names the session and jti but never the ticket
    line = [l for l in env.audit_lines() if l.get("session_id") == g["session_id"]][-1]
    assert line["jti"] == claims["jti"] and line["command"] == ["sh", "-c", "echo hi"]
    assert line["shim"] == {"endpoint": g["endpoint"], "container_id": "c-dev-side", "node": "n1"}
    assert line["user"] == "alice" and line["container"] == "sidecar" and line["decision"] == "allow"


def test_portforward_grant_ticket(env):
    register_all(env)
    st, g = env.request("POST", f"{G}/web/pods/web-1/portforward", cert="carol",
                        body={"ports": [80, {"port": 5353, "proto": "udp"}], "jkt": JKT})
    assert st == 201, g
    _, claims = verify_ticket(env, g["ticket"])
    assert claims["verb"] == "portforward" and claims["sub"] == "carol" and claims["aud"] == "c-web-1"
    assert claims["ports"] == [{"port": 80, "proto": "tcp"}, {"port": 5353, "proto": "udp"}]
    assert "cmd" not in claims or claims["cmd"] == []


def test_ticket_bound_to_client_certificate_without_jkt(env):
    register_all(env)
    body = {"command": ["id"]}
    st, g = env.request("POST", f"{G}/prod/pods/db/exec", cert="erin", body=body)
    assert st == 201, g
    _, claims = verify_ticket(env, g["ticket"])
    assert claims["cnf"]["jkt"] == jkt_of_cert_file(env.pki.clients["erin"][0])
    # a token client has no key the master could bind to: refused
    st, g = env.request("POST", f"{G}/dev/pods/p1/exec", token=TOKENS["alice"], body=body)
    assert st == 400 and "jkt" in g["message"], g


def test_session_end_report(env):
    body = {"container_id": "c-dev-app", "user": "alice", "verb": "exec", "command": ["id"], "exit_code": 3,
            "bytes_in": 10, "bytes_out": 2000, "start": "2026-11-26T18:40:00Z", "end": "2026-11-26T18:40:05Z",
            "ticket": "must.not.appear", "junk": "x"}
    st, r = env.request("POST", "/apis/shimlet.io/v1/nodes/n1/sessions/sid-1", token=TOKENS["node1"], body=body)
    assert st == 200, r
    st, r = env.request("POST", "/apis/shimlet.io/v1/nodes/n1/sessions/sid-1", cert="carol", body=body)
    assert st == 403
    ends = [l for l in env.audit_lines() if l["event"] == "session_end"]
    assert len(ends) == 1
    e = ends[0]
    assert e["session_id"] == "sid-1" and e["exit_code"] == 3 and e["bytes_out"] == 2000 and e["node"] == "n1"
    assert "junk" not in e and "ticket" not in e


def test_session_end_only_for_the_nodes_own_containers(env):
    register_all(env)  # c-dev-app is n1's
    body = {"container_id": "c-dev-app", "user": "alice", "verb": "exec", "exit_code": 0}
    st, r = env.request("POST", "/apis/shimlet.io/v1/nodes/n1/sessions/sid-own", token=TOKENS["node1"], body=body)
    assert st == 200, r
    # node2 reporting a session in n1's container: refused and audited
    st, r = env.request("POST", "/apis/shimlet.io/v1/nodes/n2/sessions/sid-other", cert="node2", body=body)
    assert st == 403 and 'registered by node "n1"' in r["message"], r
    lines = env.audit_lines()
    ends = {l["session_id"]: l for l in lines if l["event"] == "session_end"}
    assert ends["sid-own"]["container_registered"] is True and ends["sid-own"]["node"] == "n1"
    assert "sid-other" not in ends
    denied = [l for l in lines if l.get("verb") == "session_end" and l.get("decision") == "deny"]
    assert denied and 'registered by node "n1"' in denied[-1]["reason"], denied
    # a container no longer registered (after poststop's unregister): kept, marked
    body["container_id"] = "c-gone"
    st, r = env.request("POST", "/apis/shimlet.io/v1/nodes/n2/sessions/sid-gone", cert="node2", body=body)
    assert st == 200, r
    gone = [l for l in env.audit_lines() if l["event"] == "session_end" and l["session_id"] == "sid-gone"]
    assert gone and gone[0]["container_registered"] is False and gone[0]["node"] == "n2"


def test_http2(env):
    assert shutil.which("curl"), "curl is required"
    crt, key = env.pki.clients["erin"]
    p = subprocess.run(["curl", "-sS", "--http2", "--cacert", env.pki.ca, "--cert", crt, "--key", key,
                        "-w", "\n%{http_version} %{http_code}",
                        f"https://127.0.0.1:{env.port}/api/v1/namespaces/dev/pods"],
                       capture_output=True, text=True, timeout=20)
    body, _, tail = p.stdout.rpartition("\n")
    assert tail == "2 200", p.stdout + p.stderr
    assert json.loads(body)["kind"] == "PodList"
    p = subprocess.run(["curl", "-sS", "--http2", "--cacert", env.pki.ca, "-H", "Authorization: Bearer nope",
                        "-w", "\n%{http_version} %{http_code}", f"https://127.0.0.1:{env.port}/api/v1/pods"],
                       capture_output=True, text=True, timeout=20)
    assert p.stdout.endswith("2 401"), p.stdout + p.stderr


# ---------------------------------------------------------------- bad input

def _tls_raw(env, payload, read=True):
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    c = env.ctx()
    c.set_alpn_protocols(["http/1.1"])
    t = c.wrap_socket(s)
    try:
        try:
            t.sendall(payload)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the master answered and closed before taking it all; read the answer
        if not read:
            return b""
        out = b""
        while True:
            try:
                d = t.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not d:
                break
            out += d
        return out
    finally:
        t.close()


@pytest.mark.parametrize("body", [b"{", b"[]", b"null", b'{"id": 5}', b"\xff\xfe", b'{"id":"c-bad","namespace":"a"}',
                                  json.dumps(dict(registration("c-bad", "dev", "p", "c"), pin="sha256/short")).encode(),
                                  json.dumps(dict(registration("c-bad", "dev", "p", "c"), endpoint="nohost")).encode(),
                                  json.dumps(dict(registration("c-bad", "dev", "../x", "c"))).encode(),
                                  json.dumps(registration("c-other-id", "dev", "p", "c")).encode()])
def test_bad_registration(env, body):
    st, r = env.request("PUT", "/apis/shimlet.io/v1/nodes/n1/containers/c-bad", token=TOKENS["node1"], body=body)
    assert st == 400 and r["kind"] == "Status", r
    assert env.request("GET", "/healthz")[0] == 200


@pytest.mark.parametrize("body", [b"", b"{", b'{"command": "id", "jkt": "%s"}' % JKT.encode(),
                                  b'{"command": [], "jkt": "%s"}' % JKT.encode(),
                                  b'{"command": [1], "jkt": "%s"}' % JKT.encode(),
                                  b'{"command": ["id"], "jkt": "short"}',
                                  b'{"command": ["id"], "stdin": "yes", "jkt": "%s"}' % JKT.encode()])
def test_bad_grant_body(env, body):
    register_all(env)
    st, r = env.request("POST", f"{G}/dev/pods/p1/exec", token=TOKENS["alice"], body=body)
    assert st == 400 and r["kind"] == "Status", r
    st, r = env.request("POST", f"{G}/web/pods/web-1/portforward", cert="carol", body=b'{"ports":[70000]}')
    assert st == 400, r


def test_oversized_and_malformed_http(env):
    big = b"GET /api/v1/pods HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100000 + b"\r\n\r\n"
    out = _tls_raw(env, big)
    assert out.startswith(b"HTTP/1.1 431"), out[:200]
    many = b"GET /api/v1/pods HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n"
    assert _tls_raw(env, many).startswith(b"HTTP/1.1 431")
    out = _tls_raw(env, b"NOT HTTP AT ALL\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    out = _tls_raw(env, b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    # a body over the limit, chunked
    chunk = b"100000\r\n" + b"a" * 0x100000 + b"\r\n"
    out = _tls_raw(env, b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + chunk)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    # an Upgrade is answered, not hung
    out = _tls_raw(env, b"GET /api/v1/namespaces/dev/pods/p1/exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 4"), out[:200]
    # plaintext to the TLS port, and a TLS handshake that never finishes
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
    try:
        s.recv(100)
    except OSError:
        pass
    s.close()
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    s.sendall(b"\x16\x03\x01\x00\xff")
    s.close()
    # keep-alive: two requests on one connection
    out = _tls_raw(env, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n"
                        b"Connection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 2, out
    assert env.alive() and env.request("GET", "/healthz")[0] == 200


def test_slow_request_times_out(env):
    s = socket.create_connection(("127.0.0.1", env.port), timeout=15)
    c = env.ctx()
    c.set_alpn_protocols(["http/1.1"])
    t = c.wrap_socket(s)
    t.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    start = time.time()
    data = t.recv(1000)
    assert data.startswith(b"HTTP/1.1 408") and time.time() - start < 10, data
    t.close()
    assert env.request("GET", "/healthz")[0] == 200


def test_unknown_paths_and_methods(env):
    for method, path, code in [("GET", "/", 404), ("GET", "/api/v1/namespaces/dev/secrets", 404),
                               ("DELETE", "/api/v1/namespaces/dev/pods/p1", 405),
                               ("GET", f"{G}/dev/pods/p1/exec", 405),
                               ("GET", "/api/v1/namespaces//pods", 404),
                               ("POST", "/apis/shimlet.io/v1/nodes/n1/containers/x", 405)]:
        st, r = env.request(method, path, cert="erin")
        assert st == code and r["kind"] == "Status" and r["code"] == code, (method, path, r)


def test_audit_log_complete_and_secret_free(env):
    lines = env.audit_lines()
    raw = open(env.audit).read()
    for tok in TOKENS.values():
        assert tok not in raw
    assert "must.not.appear" not in raw
    assert ".eyJ" not in raw  # no JWS anywhere (tickets start with a base64url JSON header)
    reqs = [l for l in lines if l["event"] == "request"]
    assert len(reqs) > 50
    for l in reqs:
        assert {"ts", "source", "method", "path", "decision", "code"} <= l.keys(), l
        assert l["decision"] in ("allow", "deny", "error")
        if l["code"] == 401 or l["code"] == 403:
            assert l["decision"] == "deny" and l["reason"], l
    grants = [l for l in reqs if l.get("resource", "").startswith("pods/") and l["code"] == 201]
    assert grants and all(l.get("jti") and l.get("shim") for l in grants)
    assert os.stat(env.audit).st_mode & 0o077 == 0


def test_bad_config_refused():
    d = tempfile.mkdtemp(prefix="mst-master-bad-")
    try:
        pki = Pki(d)
        base = [MASTER, "--bind-address", "127.0.0.1", "--secure-port", "0", "--tls-cert-file", pki.server_crt,
                "--tls-private-key-file", pki.server_key, "--ticket-signing-key-file", pki.ticket_key_file]
        bad_yaml = os.path.join(d, "bad.yaml")
        open(bad_yaml, "w").write("kind: Role\nmetadata: {name: x\nrules: [")
        p = subprocess.run(base + ["--authorization-policy-file", bad_yaml], capture_output=True, text=True,
                           timeout=10)
        assert p.returncode != 0 and "bad.yaml" in p.stderr and "invalid YAML" in p.stderr, p.stderr
        bad_rb = os.path.join(d, "bad-rb.yaml")
        open(bad_rb, "w").write("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n"
                                "metadata: {name: x}\nroleRef: {kind: Role, name: r}\n")
        p = subprocess.run(base + ["--authorization-policy-file", bad_rb], capture_output=True, text=True, timeout=10)
        assert p.returncode != 0 and "may only reference a ClusterRole" in p.stderr, p.stderr
        bad_tok = os.path.join(d, "tokens.csv")
        open(bad_tok, "w").write('secret-token-xyz,alice,1,"unterminated\n')
        p = subprocess.run(base + ["--token-auth-file", bad_tok], capture_output=True, text=True, timeout=10)
        assert p.returncode != 0 and "line 1" in p.stderr and "secret-token-xyz" not in p.stderr, p.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_restarted_master_is_whole_after_one_lease(env):
    """In memory, registrations die with the master: a fresh one learns them
    again as shims renew. In etcd, a fresh master (another one, or this one
    restarted) knows them at once, and a renewal through it is a renewal."""
    register_n1(env, "c-dev-app", "dev", "p1", "app", port=41001)
    d = tempfile.mkdtemp(prefix="mst-master-restart-")
    m = Master(d, env.pki, etcd=env.etcd)
    try:
        st, _ = m.request("GET", "/api/v1/namespaces/dev/pods/p1", cert="erin")
        assert st == (200 if env.etcd else 404)
        st, body = m.request("PUT", "/apis/shimlet.io/v1/nodes/n1/containers/c-dev-app", token=TOKENS["node1"],
                             body=registration("c-dev-app", "dev", "p1", "app", port=41001))  # the next renewal
        assert st == (200 if env.etcd else 201), body
        st, pod = m.request("GET", "/api/v1/namespaces/dev/pods/p1", cert="erin")
        assert st == 200 and pod["spec"]["containers"][0]["name"] == "app"
    finally:
        m.stop()
        shutil.rmtree(d, ignore_errors=True)
