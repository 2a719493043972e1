"""Ticket abuse with tickets MINTED BY THE MASTER: a real shimlet-master
grants exec/port-forward to alice (token auth), bound to the key of a
shimlet-probe identity; the probe then presents the grant to the shims of
real hook-registered runc containers in abusive ways. Every abuse is refused
by the shim with the right status and message, audited in
STATE/<id>/shim.log (request.refused), and the command did not run (a marker
file in the container's rootfs is absent). Locally minted tickets and the
HTTP/2 mechanics are test_badinput.py's; this file reuses its helpers."""
import http.client
import json
import os
import ssl
import subprocess
import time
import uuid

import pytest

from containers import Container
from master_env import HOOK, NODE, TOKENS, MasterEnv, wait_for
from test_badinput import PROBE, ShimLog, assert_refused, b64url, b64url_dec, exec_header

TICKET_LIFETIME_S = 2  # short, so that expiry costs seconds, not minutes
CLOCK_LEEWAY_S = 5  # shim.json default (docs/design.md)


@pytest.fixture(scope="module")
def env():
    if not os.access(PROBE, os.X_OK):
        raise AssertionError(f"{PROBE} missing: build first (scripts/build)")
    e = MasterEnv(extra_args=["--ticket-lifetime", f"{TICKET_LIFETIME_S}s"])
    try:
        # One client identity for the whole module: the key grants are bound to.
        e.identity = e.path("probe-id")
        # (--mint-only prints the jkt; it needs some signing key: the identity's own.)
        e.jkt = _probe(e, "--mint-only", "--key", e.identity + ".key")["jkt"]
        yield e
    finally:
        e.cleanup()


def _pod(env):
    pod = "abuse-" + uuid.uuid4().hex[:6]
    c = env.container(pod)
    c.pod = pod
    wait_for(lambda: pod in env.pods(), 5, f"pod {pod} registered")
    return c


@pytest.fixture(scope="module")
def ctr(env):
    return _pod(env)


@pytest.fixture(scope="module")
def other(env):
    return _pod(env)


def _probe(env, *args, identity=True, timeout=60):
    ident = ["--identity", env.identity] if identity else []
    p = subprocess.run([PROBE, *ident, "--timeout", "20", *args], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert "probe_error" not in out, out
    return out


def grant(env, pod, verb="exec", jkt=None, **body):
    """A real grant from the master (POST .../pods/POD/exec|portforward)."""
    body = {"container": "app", "jkt": jkt or env.jkt, **body}
    conn = http.client.HTTPSConnection("127.0.0.1", env.port, context=ssl.create_default_context(cafile=env.ca),
                                       timeout=10)
    try:
        conn.request("POST", f"/apis/shimlet.io/v1/namespaces/default/pods/{pod}/{verb}", body=json.dumps(body),
                     headers={"Authorization": "Bearer " + TOKENS["alice"], "Content-Type": "application/json"})
        r = conn.getresponse()
        g = json.loads(r.read())
    finally:
        conn.close()
    assert r.status == 201, g
    return g


def present(env, g, *args, ctr=None, ticket=None, **kw):
    """Presents a grant's ticket (or a variant) to a shim: by default the
    grant's own endpoint/pin; ctr= sends it to that container's shim."""
    if ctr is not None:
        reg = env.registration(ctr.id)
        ep, pin = reg["endpoint"], reg["pin"]
    else:
        ep, pin = g["endpoint"], g["pin"]
    return _probe(env, "--endpoint", ep, "--pin", pin, "--ticket", ticket or g["ticket"], *args, **kw)


def claims_of(ticket):
    return json.loads(b64url_dec(ticket.split(".")[1]))


def marker_cmd(name):
    return ["sh", "-c", f"echo ran >> /{name}; echo ok"]


def ran(c, name):
    p = os.path.join(c.bundle, "rootfs", name)
    return open(p).read().count("ran") if os.path.exists(p) else 0


@pytest.fixture
def shimlog(env, ctr):
    pid = env.registration(ctr.id)["shim_pid"]
    yield ShimLog(os.path.join(env.state, ctr.id, "shim.log"))
    assert env.registration(ctr.id)["shim_pid"] == pid and os.path.exists(f"/proc/{pid}"), "the shim died"


def test_a_master_grant_runs_once_and_is_audited(env, ctr, shimlog):
    m = "m-good"
    g = grant(env, ctr.pod, command=marker_cmd(m))
    c = claims_of(g["ticket"])
    assert (c["aud"], c["verb"], c["cmd"], c["node"], c["sub"]) == (ctr.id, "exec", marker_cmd(m), NODE, "alice"), c
    assert g["container_id"] == ctr.id and g["node"] == NODE == env.pods()[ctr.pod]["spec"]["nodeName"], g
    out = present(env, g, *exec_header(marker_cmd(m)))
    assert (out["status"], out["stdout"], out["exit_code"]) == (200, "ok\n", 0), out
    assert ran(ctr, m) == 1
    assert not shimlog.refusals()
    grants = [l for l in env.audit_lines() if l.get("jti") == c["jti"]]
    assert grants and grants[0]["user"] == "alice" and grants[0]["code"] == 201, grants


def test_replayed(env, ctr, shimlog):
    m = "m-replay"
    g = grant(env, ctr.pod, command=marker_cmd(m))
    out = present(env, g, "--repeat-ticket", *exec_header(marker_cmd(m)))
    assert (out["first"]["status"], out["first"]["stdout"]) == (200, "ok\n"), out
    assert_refused(out["second"], 403, "ticket already used (replay refused)")
    shimlog.wait_refusal("ticket already used")
    # A third use on a fresh connection: still refused; the command ran once.
    out = present(env, g, *exec_header(marker_cmd(m)))
    assert_refused(out, 403, "ticket already used")
    assert ran(ctr, m) == 1


def test_expired(env, ctr, shimlog):
    m = "m-expired"
    g = grant(env, ctr.pod, command=marker_cmd(m))
    c = claims_of(g["ticket"])
    assert c["exp"] - c["iat"] == TICKET_LIFETIME_S and g["expires"] == c["exp"], (c, g)
    time.sleep(max(0.0, c["exp"] + CLOCK_LEEWAY_S + 1 - time.time()))
    out = present(env, g, *exec_header(marker_cmd(m)))
    assert_refused(out, 403, "ticket expired")
    shimlog.wait_refusal("ticket expired")
    assert ran(ctr, m) == 0


def test_forged(env, ctr, other, shimlog):
    m = "m-forged"
    g = grant(env, ctr.pod, command=["echo", "ok"])
    h, p, s = g["ticket"].split(".")
    body = json.loads(b64url_dec(p))

    def with_claims(**kw):
        return ".".join([h, b64url(json.dumps({**body, **kw}).encode()), s])

    # A changed claim under the master's signature: another argv, longer life,
    # another container (sent to that container's shim).
    cases = [(with_claims(cmd=marker_cmd(m)), None, marker_cmd(m)),
             (with_claims(exp=body["exp"] + 200), None, ["echo", "ok"]),
             (with_claims(aud=other.id), other, ["echo", "ok"])]
    # A flipped signature byte.
    flipped = s[:10] + ("A" if s[10] != "A" else "B") + s[11:]
    cases.append((".".join([h, p, flipped]), None, ["echo", "ok"]))
    for tok, to, cmd in cases:
        out = present(env, g, *exec_header(cmd), ticket=tok, ctr=to)
        assert_refused(out, 403, "ticket signature invalid")
    shimlog.wait_refusal("ticket signature invalid")
    olog = ShimLog(os.path.join(env.state, other.id, "shim.log"))
    olog.start = 0  # the whole log: the refusal above is already in it
    olog.wait_refusal("ticket signature invalid")
    assert ran(ctr, m) == 0 and ran(other, m) == 0
    # None of the forgeries used the genuine ticket up.
    out = present(env, g, *exec_header(["echo", "ok"]))
    assert (out["status"], out["stdout"]) == (200, "ok\n"), out


def test_retargeted_to_another_container(env, ctr, other, shimlog):
    m = "m-retarget"
    g = grant(env, other.pod, command=marker_cmd(m))
    assert g["container_id"] == other.id
    out = present(env, g, *exec_header(marker_cmd(m)), ctr=ctr)
    assert_refused(out, 403, f"ticket is for container {other.id}, not {ctr.id}")
    shimlog.wait_refusal(f"ticket is for container {other.id}")
    assert ran(ctr, m) == 0 and ran(other, m) == 0
    # It still works where it belongs (the refusal did not use it up).
    out = present(env, g, *exec_header(marker_cmd(m)))
    assert (out["status"], out["stdout"]) == (200, "ok\n"), out
    assert ran(other, m) == 1 and ran(ctr, m) == 0


def test_retargeted_to_another_node(env, ctr, shimlog):
    """Container ids are only unique per host (runc names are the caller's):
    a same-named container on node n2 must not accept a ticket the master
    granted for n1's container, even when the client connects to n2's shim
    directly. Here "n2" is a second hook config (node n2, own state dir and
    runc root) on this host; its registration with the master is refused
    (n1's node token, duplicate id), its shim runs anyway."""
    m = "m-node"
    g = grant(env, ctr.pod, command=marker_cmd(m))
    assert claims_of(g["ticket"])["node"] == NODE
    state2, cfg2 = env.path("state-n2"), env.path("hook-n2.json")
    env.write_hook_config(cfg2, state2, env.url, fail=False)
    with open(cfg2) as f:
        cfg = json.load(f)
    cfg["master"]["node"] = "n2"
    with open(cfg2, "w") as f:
        json.dump(cfg, f)
    entry = lambda stage: [{"path": HOOK, "args": ["shimlet-hook", "--config", cfg2, stage]}]

    def edit(c):
        c["annotations"] = {"io.kubernetes.pod.name": ctr.pod, "io.kubernetes.pod.namespace": "default",
                            "io.kubernetes.container.name": "app"}
        c["linux"]["cgroupsPath"] = "/shimlet-abuse-n2-" + uuid.uuid4().hex[:8]  # not ctr's cgroup

    twin = Container(name=ctr.id, root=env.path("runc-n2"), edit=edit, args=("sleep", "100000"),
                     hooks={"createRuntime": entry("createRuntime"), "poststop": entry("poststop")})
    env.containers.append(twin)  # cleaned up with the env, even on failure
    twin.start()
    reg = os.path.join(state2, twin.id, "registration.json")
    wait_for(lambda: os.path.exists(reg), 5, "the twin's registration.json")
    with open(reg) as f:
        r = json.load(f)
    twin_log = ShimLog(os.path.join(state2, twin.id, "shim.log"))
    out = _probe(env, "--endpoint", r["endpoint"], "--pin", r["pin"], "--ticket", g["ticket"],
                 *exec_header(marker_cmd(m)))
    assert_refused(out, 403, f"ticket is for node {NODE}, not n2")
    twin_log.wait_refusal(f"ticket is for node {NODE}, not n2")
    assert ran(twin, m) == 0 and ran(ctr, m) == 0
    # On its own node the grant works (the refusal did not use it up).
    out = present(env, g, *exec_header(marker_cmd(m)))
    assert (out["status"], out["stdout"]) == (200, "ok\n"), out
    assert ran(ctr, m) == 1 and ran(twin, m) == 0
    twin.stop()


def test_other_argv(env, ctr, shimlog):
    m = "m-argv"
    for cmd in (marker_cmd(m), ["echo ok"], ["echo", "ok", "x"], ["echo"]):
        g = grant(env, ctr.pod, command=["echo", "ok"])
        out = present(env, g, *exec_header(cmd))
        assert_refused(out, 403, "ticket does not allow this command")
        # The request check comes after the ticket's one use: the grant is
        # spent, not reusable for a second guess.
        out = present(env, g, *exec_header(["echo", "ok"]))
        assert_refused(out, 403, "ticket already used")
    shimlog.wait_refusal("ticket does not allow this command")
    assert ran(ctr, m) == 0


@pytest.mark.parametrize("granted,requested", [
    ({"stdin": False, "tty": False}, {"stdin": True}),
    ({"stdin": False, "tty": False}, {"tty": True}),
    ({"stdin": True, "tty": False}, {}),
    ({"stdin": True, "tty": True}, {"stdin": True}),
])
def test_other_stdin_tty(env, ctr, shimlog, granted, requested):
    m = "m-flags"
    g = grant(env, ctr.pod, command=marker_cmd(m), **granted)
    out = present(env, g, *exec_header(marker_cmd(m), **requested))
    assert_refused(out, 403, "ticket does not allow these stdin/tty flags")
    shimlog.wait_refusal("ticket does not allow these stdin/tty flags")
    assert ran(ctr, m) == 0


def test_other_port_and_verb(env, ctr, shimlog):
    for path, text in (("/v1/portforward/8081", "ticket does not allow port 8081/tcp"),
                       ("/v1/portforward/8080/udp", "ticket does not allow port 8080/udp"),
                       ("/v1/portforward/22", "ticket does not allow port 22/tcp")):
        g = grant(env, ctr.pod, verb="portforward", ports=[8080])
        c = claims_of(g["ticket"])
        assert c["verb"] == "portforward" and c["ports"] == [{"port": 8080, "proto": "tcp"}], c
        out = present(env, g, "--path", path)
        assert_refused(out, 403, text)
        shimlog.wait_refusal(text)
    # A port-forward grant does not open an exec, nor an exec grant a forward
    # (refused before the ticket's use: still good for its own verb).
    g = grant(env, ctr.pod, verb="portforward", ports=[8080])
    m = "m-verb"
    out = present(env, g, *exec_header(marker_cmd(m)))
    assert_refused(out, 403, "ticket is for portforward, not exec")
    shimlog.wait_refusal("ticket is for portforward, not exec")
    assert ran(ctr, m) == 0
    ge = grant(env, ctr.pod, command=["echo", "ok"])
    out = present(env, ge, "--path", "/v1/portforward/8080")
    assert_refused(out, 403, "ticket is for exec, not portforward")
    shimlog.wait_refusal("ticket is for exec, not portforward")
    out = present(env, g, "--path", "/v1/portforward")
    assert out["status"] == 200, out
    out = present(env, ge, *exec_header(["echo", "ok"]))
    assert (out["status"], out["stdout"]) == (200, "ok\n"), out


def test_client_without_the_bound_key(env, ctr, shimlog):
    m = "m-key"
    g = grant(env, ctr.pod, command=marker_cmd(m))
    # Another client certificate (a fresh key), then none at all.
    out = present(env, g, *exec_header(marker_cmd(m)), identity=False)
    assert_refused(out, 403, "ticket is bound to another client key")
    shimlog.wait_refusal("ticket is bound to another client key")
    out = present(env, g, "--no-client-cert", *exec_header(marker_cmd(m)))
    assert_refused(out, 403, "no client certificate was presented")
    shimlog.wait_refusal("no client certificate was presented")
    assert ran(ctr, m) == 0
    # A grant bound to someone else's key is useless to us even with our cert.
    g2 = grant(env, ctr.pod, command=marker_cmd(m), jkt=b64url(os.urandom(32)))
    out = present(env, g2, *exec_header(marker_cmd(m)))
    assert_refused(out, 403, "ticket is bound to another client key")
    assert ran(ctr, m) == 0
    # The holder of the key can still use the first grant.
    out = present(env, g, *exec_header(marker_cmd(m)))
    assert (out["status"], out["stdout"]) == (200, "ok\n"), out
    assert ran(ctr, m) == 1
