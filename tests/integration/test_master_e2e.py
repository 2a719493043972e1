"""The main job through shimlet-master: a real master (generated CA and
certificates, a token file, RBAC YAML), real runc containers whose
shimlet-hook registers them with the master (node token) and whose shim
renews the lease, and shimctl in master mode (flags and kubeconfig files)
getting its grants from the master."""
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
import time
import urllib.request
import uuid

import pytest

from containers import alive
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


def _renewals(env, cid):
    return [l for l in env.audit_lines() if l.get("method") == "PUT" and l.get("container_id") == cid and
            l["code"] == 200]


def test_shim_renews_the_lease(env, web):
    # renew_interval_s is 1: LEASE_S + 1 renewals after the registration span
    # more than one lease, which would have lapsed without them.
    wait_for(lambda: len(_renewals(env, web.id)) >= LEASE_S + 1, LEASE_S * 3, "renewals over more than a lease")
    assert web.pod in env.pods(), "the lease lapsed although the shim is alive"
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


def _fetch_once_through(pf):
    """One HTTP GET through a running `shimctl port-forward POD 0:8080`, then SIGINT it."""
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


def test_port_forward_through_master(env, web):
    kc = env.kubeconfig("kubeconfig-pf")
    pf = subprocess.Popen([SHIMCTL, "--kubeconfig", kc, "port-forward", web.pod, "0:8080"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env={**os.environ, "HOME": env.home})
    _fetch_once_through(pf)
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
    # No renewal re-registers it afterwards: once no process names the
    # container (the shim, a renewer `shimlet-hook ... renew ID`), none can.
    wait_for(lambda: not _procs_naming(c.id), 5, "the shim and its renewer gone")
    assert pod not in env.pods()


def _procs_naming(word):
    """Pids whose argv has `word` as one argument."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if word.encode() in f.read().split(b"\0"):
                        out.append(int(p))
            except OSError:
                continue
    return out


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
    # Without fail_container_on_error the registration runs after the hook
    # returned (docs/design.md "Master registration"): its failure follows.
    hook_log = os.path.join(state, "hook.log")
    wait_for(lambda: os.path.exists(hook_log) and "cannot connect" in open(hook_log).read(), 15,
             "the failed registration in hook.log")
    log = open(hook_log).read()
    assert str(dead) in log, log
    p = env.shimctl("--local", "--state-dir", state, "exec", c.id, "--", "echo", "ok")
    assert p.returncode == 0 and p.stdout == b"ok\n", p.stderr
    c.stop()
    assert not os.path.exists(os.path.join(state, c.id))


# ---------------------------------------------------------------- session ends reach the master
# The session writes STATE/<id>/ends/<sid>.json; the shim's renewer (every
# renew_interval_s = 1 s here) POSTs it to /nodes/n1/sessions/SID and deletes it.

def _session_ends(env, sid):
    return [l for l in env.audit_lines() if l["event"] == "session_end" and l.get("session_id") == sid]


def _node_end(env, sid):
    return wait_for(lambda: [l for l in _session_ends(env, sid) if l.get("via") == "node"], 10,
                    f"the node's session_end for {sid}")[0]


def _ends_dir_empty(env, cid):
    d = os.path.join(env.state, cid, "ends")
    return os.path.isdir(d) and not [n for n in os.listdir(d) if n.endswith(".json")]


def test_exec_session_end_reaches_the_master(env, web):
    cmd = ["sh", "-c", "echo hi; exit 3"]
    p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "exec", web.pod, "--", *cmd)
    assert p.returncode == 3 and p.stdout == b"hi\n", p.stderr
    grant = [l for l in env.audit_lines() if l.get("resource") == "pods/exec" and l.get("command") == cmd][-1]
    sid = grant["session_id"]
    end = _node_end(env, sid)
    assert end["user"] == "alice" and end["verb"] == "exec" and end["command"] == cmd, end
    assert end["exit_code"] == 3 and "signal" not in end, end
    assert end["bytes_out"] >= 3 and end["bytes_in"] == 0, end
    assert end["node"] == NODE and end["container_id"] == web.id and end["jti"] == grant["jti"], end
    assert (end["namespace"], end["pod"], end["container"]) == ("default", web.pod, "app"), end
    assert end["start"] <= end["end"] and end["peer"].startswith("127.0.0.1:"), end
    # Delivered once, and the outbox is empty again.
    wait_for(lambda: _ends_dir_empty(env, web.id), 5, "the outbox emptied")
    # Two more renewals (each one flushes the outbox): nothing posted twice.
    n = len(_renewals(env, web.id))
    wait_for(lambda: len(_renewals(env, web.id)) >= n + 2, 10, "two more renewals")
    assert len([l for l in _session_ends(env, sid) if l.get("via") == "node"]) == 1
    # The posts themselves are audited as the node's requests.
    posts = [l for l in env.audit_lines() if l.get("verb") == "session_end" and l.get("session_id") == sid]
    assert posts and posts[-1]["user"] == f"system:node:{NODE}" and posts[-1]["code"] == 200, posts


def test_exec_signal_and_stdin_bytes_in_the_session_end(env, web):
    cmd = ["sh", "-c", "cat >/dev/null; kill -9 $$"]
    p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "exec", "-i", web.pod, "--", *cmd,
                    stdin=None, input=b"x" * 1000)
    assert p.returncode == 137, p.stderr
    grant = [l for l in env.audit_lines() if l.get("resource") == "pods/exec" and l.get("command") == cmd][-1]
    end = _node_end(env, grant["session_id"])
    assert end["exit_code"] == 137 and end["signal"] == 9 and end["bytes_in"] == 1000, end


def test_port_forward_session_end_reaches_the_master(env, web):
    pf = subprocess.Popen([SHIMCTL, *flags(env), "--token", TOKENS["alice"], "port-forward", web.pod, "0:8080"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HOME": env.home})
    _fetch_once_through(pf)
    grant = [l for l in env.audit_lines() if l.get("resource") == "pods/portforward" and l.get("code") == 201][-1]
    end = _node_end(env, grant["session_id"])
    assert end["verb"] == "portforward" and end["user"] == "alice" and "command" not in end, end
    # An HTTP GET one way, the response (headers + body) the other.
    assert end["bytes_in"] >= len("GET / HTTP/1.1\r\n"), end
    assert end["bytes_out"] > len("hello-through-master\n"), end
    assert end["node"] == NODE and end["pod"] == web.pod and end["jti"] == grant["jti"], end


def test_tunnel_and_node_session_ends_are_distinguishable(env, web):
    cmd = ["sh", "-c", "echo via-tunnel; exit 5"]
    p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "--proxy", "exec", web.pod, "--", *cmd)
    assert p.returncode == 5 and p.stdout == b"via-tunnel\n", p.stderr
    grant = [l for l in env.audit_lines() if l.get("resource") == "pods/exec" and l.get("command") == cmd][-1]
    end = _node_end(env, grant["session_id"])
    assert end["exit_code"] == 5 and end["via"] == "node", end
    tunnels = wait_for(lambda: [l for l in env.audit_lines() if l["event"] == "session_end" and
                                l.get("via") == "tunnel" and l.get("container_id") == web.id], 5, "tunnel end")
    assert all("exit_code" not in t for t in tunnels), tunnels


def _post_session_end(env, node, sid, token, body):
    ctx = ssl.create_default_context(cafile=env.ca)
    conn = http.client.HTTPSConnection("127.0.0.1", env.port, context=ctx, timeout=10)
    try:
        conn.request("POST", f"/apis/shimlet.io/v1/nodes/{node}/sessions/{sid}", body=json.dumps(body),
                     headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_session_end_needs_the_nodes_own_credential(env, web):
    sid = "forged" + uuid.uuid4().hex[:8]
    body = {"container_id": web.id, "user": "mallory", "verb": "exec", "exit_code": 0, "node": "n2"}
    st, _ = _post_session_end(env, "n2", sid, TOKENS["node"], body)  # n1's token for n2
    assert st == 403
    st, _ = _post_session_end(env, NODE, sid, TOKENS["alice"], body)  # not a node at all
    assert st == 403
    assert not _session_ends(env, sid)
    # The node's own: recorded, attributed to the authenticated node whatever the body says.
    st, _ = _post_session_end(env, NODE, sid, TOKENS["node"], {**body, "via": "relay", "bogus": "x"})
    assert st == 200
    (line,) = _session_ends(env, sid)
    assert line["node"] == NODE and line["via"] == "node" and "bogus" not in line, line


def test_session_end_kept_until_the_master_accepts_it(env):
    """With the master unreachable the record stays in the outbox (renewals
    fail); once the hook config points at the master again (the renewer
    reads it at every tick) the next renewal delivers it."""
    cfg_path = env.path("hook-later.json")
    env.write_hook_config(cfg_path, env.state, "https://127.0.0.1:1", fail=False)
    pod = "ends-" + uuid.uuid4().hex[:6]
    c = env.container(pod, config=cfg_path)
    try:
        p = env.shimctl("--local", "--state-dir", env.state, "exec", c.id, "--", "sh", "-c", "echo kept; exit 4")
        assert p.returncode == 4 and p.stdout == b"kept\n", p.stderr
        ends = os.path.join(env.state, c.id, "ends")
        files = wait_for(lambda: [n for n in os.listdir(ends) if n.endswith(".json")], 5, "the record spooled")
        assert len(files) == 1
        st = os.stat(os.path.join(ends, files[0]))
        assert st.st_mode & 0o777 == 0o600
        with open(os.path.join(ends, files[0])) as f:
            rec = json.load(f)
        assert rec["exit_code"] == 4 and rec["command"] == ["sh", "-c", "echo kept; exit 4"], rec
        # Two renewals fail after the record was spooled: it is still there.
        shim_log = os.path.join(env.state, c.id, "shim.log")
        failed = lambda: open(shim_log).read().count('"lease renewal failed"')
        n = failed()
        wait_for(lambda: failed() >= n + 2, 10, "two failed renewals")
        assert os.path.exists(os.path.join(ends, files[0]))
        env.write_hook_config(cfg_path, env.state, env.url, fail=False)
        end = _node_end(env, rec["session_id"])
        assert end["exit_code"] == 4 and end["pod"] == pod and end["container"] == "app", end
        # shimctl --local passed its own stdout: the session copied nothing, and says so.
        assert end["bytes_out"] == 0 and end["stdio"] == "client", end
        wait_for(lambda: _ends_dir_empty(env, c.id), 5, "the outbox emptied")
    finally:
        c.stop()


def _session_holding(cid_ends):
    """The shimlet-session process that holds a provisional record (<sid>.open) open."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if not open(f"/proc/{pid}/comm").read().startswith("shimlet-sess"):
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
                if t.startswith(cid_ends + "/") and t.endswith(".open"):
                    return int(pid), t
        except OSError:
            continue
    return None


def test_killed_session_still_reaches_the_master(env):
    """A session process SIGKILLed (as by the OOM killer) writes no end record:
    its provisional one, locked while it lived, is sent instead, marked."""
    pod = "killed-" + uuid.uuid4().hex[:6]
    c = env.container(pod)
    try:
        cmd = ["sh", "-c", "echo ready; sleep 1000"]
        p = subprocess.Popen([SHIMCTL, *flags(env), "--token", TOKENS["alice"], "exec", pod, "--", *cmd],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HOME": env.home})
        try:
            assert p.stdout.readline() == b"ready\n"
            ends = os.path.join(env.state, c.id, "ends")
            pid, path = wait_for(lambda: _session_holding(ends), 5, "the session's provisional record")
            grant = [l for l in env.audit_lines() if l.get("resource") == "pods/exec" and l.get("command") == cmd][-1]
            os.kill(pid, signal.SIGKILL)
            assert p.wait(timeout=10) != 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert os.path.exists(path), "the killed session's provisional record is gone"
        assert not [n for n in os.listdir(ends) if n.endswith(".json")], "a killed session wrote a final record?"
    finally:
        c.stop()  # poststop: the lock is free now, the record is promoted and flushed
    end = _node_end(env, grant["session_id"])
    assert end["command"] == cmd and end["user"] == "alice" and end["pod"] == pod, end
    assert "killed" in end["error"] and end["end"] >= end["start"] and "exit_code" not in end, end
    assert end["jti"] == grant["jti"] and end["node"] == NODE, end


def test_session_end_replaces_the_provisional_record(env, web):
    """A session that ends normally leaves only its final record: no .open file.
    And the provisional record's locked fd does not reach the command."""
    p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "exec", web.pod, "--", "ls", "/proc/self/fd")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [b"0", b"1", b"2", b"3"], p.stdout  # 3: ls's own directory
    ends = os.path.join(env.state, web.id, "ends")
    # shimctl has its status before the session process wrote its record: a moment.
    wait_for(lambda: not [n for n in os.listdir(ends) if n.endswith(".open")], 5, "no provisional record left")


def _rare_renewals_config(env):
    """A hook config whose renewals are too rare to matter (1 h): only a
    cleanup (poststop, or the shim's own) can deliver what is spooled."""
    cfg_path = env.path("hook-rare-renewals.json")
    env.write_hook_config(cfg_path, env.state, env.url)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["master"]["renew_interval_s"] = 3600
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return cfg_path


def test_poststop_flushes_the_last_session_ends(env):
    """Renewals too rare to matter: only poststop's final flush can deliver
    the record before the state directory goes."""
    pod = "last-" + uuid.uuid4().hex[:6]
    c = env.container(pod, config=_rare_renewals_config(env))
    try:
        cmd = ["sh", "-c", "echo bye; exit 6"]
        p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "exec", pod, "--", *cmd)
        assert p.returncode == 6, p.stderr
        grant = [l for l in env.audit_lines() if l.get("resource") == "pods/exec" and l.get("command") == cmd][-1]
        ends = os.path.join(env.state, c.id, "ends")
        wait_for(lambda: [n for n in os.listdir(ends) if n.endswith(".json")], 5, "the record spooled")
        assert not _session_ends(env, grant["session_id"])
    finally:
        c.stop()
    end = _node_end(env, grant["session_id"])
    assert end["exit_code"] == 6 and end["pod"] == pod, end
    assert not os.path.exists(os.path.join(env.state, c.id))


def test_sigkilled_runtime_unregisters_and_flushes_without_poststop(env):
    """The runtime SIGKILLed while a later createRuntime hook holds it (issue
    12 §3, docs/design.md "Stale state"): the container's init dies with it
    and no poststop ever runs. The shim sees its init gone and its own
    cleanup does what poststop would: the session end spooled before is
    delivered (renewals are too rare to have sent it), the registration is
    DELETEd, the state directory removed. (A create failing after
    createRuntime is no such case with runc: its destroy of the failed
    container runs the poststop hooks.)"""
    pod = "rtkill-" + uuid.uuid4().hex[:6]
    blocker, poststop_ran = env.path(pod + ".blocker"), env.path(pod + ".poststop")
    hooks = env.hooks(_rare_renewals_config(env))
    hooks["createRuntime"].append({"path": "/bin/sh", "args": ["sh", "-c", f"echo $$ > {blocker}; exec sleep 60"]})
    hooks["poststop"].insert(0, {"path": "/bin/sh", "args": ["sh", "-c", f"touch {poststop_ran}"]})
    c = env.new_container(pod, hooks=hooks)
    os.makedirs(c.root, exist_ok=True)
    runc = subprocess.Popen(["runc", "--root", c.root, "run", "-d", c.id], cwd=c.bundle, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    c.started = True  # cleanup: runc delete -f of what is left
    try:
        wait_for(lambda: os.path.exists(blocker) and os.path.getsize(blocker) > 0, 20, "the later createRuntime hook")
        shim = env.registration(c.id)["shim_pid"]
        wait_for(lambda: pod in env.pods(), 5, "pod listed")
        # A session through the master before the runtime dies (a port-forward:
        # the rootfs is not pivoted yet; nothing listens); its end record is spooled.
        p = env.shimctl(*flags(env), "--token", TOKENS["alice"], "port-forward", pod, "--stdio", "9")
        assert p.returncode == 255 and b"cannot connect to port 9 in the container" in p.stderr, p.stderr
        grant = [l for l in env.audit_lines() if l.get("resource") == "pods/portforward" and
                 l.get("shim", {}).get("container_id") == c.id][-1]
        ends = os.path.join(env.state, c.id, "ends")
        wait_for(lambda: [n for n in os.listdir(ends) if n.endswith(".json")], 5, "the session's end record spooled")
        assert not _session_ends(env, grant["session_id"]), "delivered by a renewal"
        os.killpg(runc.pid, signal.SIGKILL)
        runc.wait(10)
        wait_for(lambda: not alive(shim), 15, "the shim's exit after its container's init")
        wait_for(lambda: pod not in env.pods(), 10, "the pod unregistered")
        lines = env.audit_lines()
        assert [l for l in lines if l.get("method") == "DELETE" and l.get("container_id") == c.id and
                l["code"] == 200], "no DELETE of the registration"
        assert not [l for l in lines if l["event"] == "lease_expired" and l.get("container_id") == c.id]
        end = _node_end(env, grant["session_id"])
        assert end["verb"] == "portforward" and end["pod"] == pod and end["container_registered"], end
        wait_for(lambda: not os.path.exists(os.path.join(env.state, c.id)), 10, "the state directory removed")
        assert not os.path.exists(poststop_ran), "a poststop ran"
    finally:
        with contextlib.suppress(Exception):
            os.kill(int(open(blocker).read()), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runc.pid, signal.SIGKILL)
        runc.wait(10)
        c.stop()
