"""A real etcd cluster for the master's etcd registry tests: Debian's
etcd-server, N members on loopback, TLS everywhere (client certificates
required from clients and peers; certificates generated here with
python3-cryptography). Members can be killed and started again.

Used by test_master.py (one member, the authorization/ownership/audit tests
against an etcd-backed master) and test_master_ha.py (three members in the
masters' network namespace: members die, quorum is lost and comes back)."""
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

from cryptography.hazmat.primitives.asymmetric import ec

from test_master import _cert, _issue, _name, _write_cert  # PKI helpers

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"


def _die_with_parent():
    """preexec_fn: SIGKILL when the test process dies, however it dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdCluster:
    """`members` etcd members on 127.0.0.1. netns: run them (and etcdctl) in
    that network namespace (/run/netns/NAME), whose loopback is private, so
    fixed ports cannot collide with anyone; without it, free ports of this
    namespace are picked."""

    def __init__(self, members=3, netns=None):
        for b in (ETCD, ETCDCTL):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} missing: install etcd-server and etcd-client (scripts/deps)")
        self.dir = tempfile.mkdtemp(prefix="shimlet-etcd-")
        self.netns = netns
        self.n = members
        self.token = "shimlet-" + uuid.uuid4().hex[:8]
        if netns:
            self.client_ports = [2379 + 10000 * i for i in range(members)]
            self.peer_ports = [2380 + 10000 * i for i in range(members)]
        else:
            self.client_ports = [free_port() for _ in range(members)]
            self.peer_ports = [free_port() for _ in range(members)]
        self.procs = [None] * members
        self._pki()
        try:
            for i in range(members):
                self.start(i)
            self.wait_healthy()
        except BaseException:
            self.cleanup()
            raise

    # ------------------------------------------------------------ PKI
    def _pki(self):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("shimlet-test-etcd-ca")
        self.cafile = self.path("ca.crt")
        _write_cert(self.cafile, _cert(ca_name, ca_key, ca_name, ca_key, ca=True))
        # Members: one certificate for client and peer traffic (no extended
        # key usage: good for both server and client authentication).
        self.member_cert, self.member_key = self.path("member.crt"), self.path("member.key")
        _issue(self.member_cert, self.member_key, _name("etcd-member"), ca_name, ca_key, san_ip="127.0.0.1")
        # The masters' client certificate.
        self.certfile, self.keyfile = self.path("master-etcd.crt"), self.path("master-etcd.key")
        _issue(self.certfile, self.keyfile, _name("shimlet-master"), ca_name, ca_key, client=True)

    def path(self, *p):
        return os.path.join(self.dir, *p)

    # ------------------------------------------------------------ members
    def _cmd(self, *cmd):
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *cmd] if self.netns else list(cmd)

    def client_url(self, i):
        return f"https://127.0.0.1:{self.client_ports[i]}"

    @property
    def servers(self):
        """--etcd-servers for shimlet-master."""
        return ",".join(self.client_url(i) for i in range(self.n))

    def master_flags(self, prefix):
        return ["--etcd-servers", self.servers, "--etcd-cafile", self.cafile, "--etcd-certfile", self.certfile,
                "--etcd-keyfile", self.keyfile, "--etcd-prefix", prefix]

    def start(self, i):
        peers = ",".join(f"m{j}=https://127.0.0.1:{self.peer_ports[j]}" for j in range(self.n))
        log = open(self.path(f"m{i}.log"), "ab")
        self.procs[i] = subprocess.Popen(self._cmd(
            ETCD, "--name", f"m{i}", "--data-dir", self.path(f"m{i}.data"),
            "--listen-client-urls", self.client_url(i), "--advertise-client-urls", self.client_url(i),
            "--listen-peer-urls", f"https://127.0.0.1:{self.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"https://127.0.0.1:{self.peer_ports[i]}",
            "--initial-cluster", peers, "--initial-cluster-state", "new", "--initial-cluster-token", self.token,
            "--cert-file", self.member_cert, "--key-file", self.member_key, "--trusted-ca-file", self.cafile,
            "--client-cert-auth",
            "--peer-cert-file", self.member_cert, "--peer-key-file", self.member_key,
            "--peer-trusted-ca-file", self.cafile, "--peer-client-cert-auth"),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.close()

    def kill(self, i):
        p = self.procs[i]
        if p and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        self.procs[i] = None

    def etcdctl(self, *args, endpoints=None, timeout=15):
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run(self._cmd(
            ETCDCTL, "--endpoints", endpoints or self.servers, "--cacert", self.cafile, "--cert", self.certfile,
            "--key", self.keyfile, "--command-timeout", "3s", *args),
            env=env, capture_output=True, text=True, timeout=timeout)

    def healthy(self, i):
        return self.etcdctl("endpoint", "health", endpoints=self.client_url(i)).returncode == 0

    def wait_healthy(self, members=None, timeout=60):
        members = range(self.n) if members is None else members
        deadline = time.time() + timeout
        while time.time() < deadline:
            for i in members:
                if self.procs[i] is not None and self.procs[i].poll() is not None:
                    raise AssertionError(f"etcd member m{i} exited: " + open(self.path(f"m{i}.log")).read()[-3000:])
            if all(self.healthy(i) for i in members):
                return
            time.sleep(0.2)
        raise AssertionError(f"etcd members {list(members)} not healthy after {timeout}s")

    def leader(self):
        """Index of the member that is the raft leader."""
        p = self.etcdctl("endpoint", "status", "-w", "json")
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        for s in st:
            if s["Status"]["header"]["member_id"] == s["Status"]["leader"]:
                return self.client_ports.index(int(s["Endpoint"].rsplit(":", 1)[1]))
        raise AssertionError("no leader: " + p.stdout)

    def cleanup(self):
        for i in range(self.n):
            with contextlib.suppress(Exception):
                self.kill(i)
        shutil.rmtree(self.dir, ignore_errors=True)
