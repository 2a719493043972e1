"""The main job through shimlet-master: a real master (generated CA and
certificates, a token file, RBAC YAML), real runc containers whose
shimlet-hook registers them with the master (node token) and whose shim
renews the lease, and shimctl in master mode (flags and kubeconfig files)
getting its grants from the master."""
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

from master_env import LEASE_S, NODE, SHIMCTL, TOKENS, MasterEnv, wait_for


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
    # dave is authenticated but may only read pods
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
