"""shimlet-hook + shimlet (the shim) with real runc and podman containers.

The shim's side of the gate's fd contract and control protocol is checked
with fake_session.py standing in for shimlet-session (started as the gate,
it reports its fds/argv/env over a TCP connection it accepts)."""
import base64
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

from containers import BIN, REPO, Container, alive, run, shared_rootfs, wait_for

HOOK = os.path.join(BIN, "shimlet-hook")
SHIM = os.path.join(BIN, "shimlet")
FAKE_SESSION = os.path.join(REPO, "tests", "integration", "fake_session.py")
NS_TYPES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time")
# conmon measured on this host (docs: /work/shared/reference/peers.md).
CONMON_USS_KB, CONMON_PSS_KB = 528, 855
# The footprint bound holds for the real (static, uninstrumented) shim; the
# ASan pass runs a dynamic, instrumented shim, whose size says nothing. The
# plain pass of scripts/test asserts it.
FOOTPRINT_CHECKED = os.environ.get("SHIMLET_ASAN") != "1"


def cert_pin(cert_path):
    pub = run(["openssl", "x509", "-in", cert_path, "-pubkey", "-noout"]).stdout
    der = run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub).stdout
    return "sha256/" + base64.b64encode(hashlib.sha256(der).digest()).decode()


def smaps(pid):
    # A freshly linked binary's page-cache pages are dirty until written back
    # and would count as the shim's Private_Dirty: flush them first.
    os.sync()
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


class HookEnv:
    """A private state dir + hook config for one test."""

    def __init__(self, **cfg):
        for b in (HOOK, SHIM):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} missing: build first (scripts/build)")
        self.dir = tempfile.mkdtemp(prefix="shimlet-hks-")
        self.state = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "hook.json")
        cfg.setdefault("state_dir", self.state)
        cfg.setdefault("session_binary", FAKE_SESSION)
        # The fake stands in for the gate (TCP) only; warm sessions and the
        # gate's zygote are tested with the real one (test_warm.py, test_flood.py).
        cfg.setdefault("warm_idle_s", 0)
        with open(self.config, "w") as f:
            json.dump(cfg, f)

    def runc_hooks(self):
        entry = lambda stage: [{"path": HOOK, "args": ["shimlet-hook", "--config", self.config, stage]}]
        return {"createRuntime": entry("createRuntime"), "poststop": entry("poststop")}

    def cdir(self, cid):
        return os.path.join(self.state, cid)

    def registration(self, cid):
        with open(os.path.join(self.cdir(cid), "registration.json")) as f:
            return json.load(f)

    def leftovers(self):
        if not os.path.isdir(self.state):
            return []
        return sorted(set(os.listdir(self.state)) - {"local.key", "local.pub", "hook.log"})

    def cleanup(self):
        # Any shim still registered here dies with the test (never leak one).
        if os.path.isdir(self.state):
            for cid in os.listdir(self.state):
                reg = os.path.join(self.state, cid, "registration.json")
                with contextlib.suppress(Exception):
                    with open(reg) as f:
                        pid = json.load(f)["shim_pid"]
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if self.state.encode() in f.read():
                            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def env_factory():
    envs = []

    def make(**cfg):
        e = HookEnv(**cfg)
        envs.append(e)
        return e

    yield make
    for e in envs:
        e.cleanup()


@pytest.fixture
def containers_():
    cs = []
    yield cs
    for c in cs:
        c.cleanup()


def new_container(cs, env, **kw):
    c = Container(hooks=env.runc_hooks(), **kw)
    cs.append(c)
    return c


def session_report(endpoint):
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"report\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def test_runc_start_registration_fd_contract_and_cleanup(env_factory, containers_):
    env = env_factory()
    c = new_container(containers_, env)
    t0 = time.time()
    c.start()
    assert time.time() - t0 < 5
    reg = env.registration(c.id)
    d = env.cdir(c.id)
    assert reg["id"] == c.id and reg["pid"] == c.pid and reg["bundle"] == c.bundle
    assert (reg["namespace"], reg["pod"], reg["container"]) == ("default", c.id, c.id)
    assert reg["pin"] == cert_pin(os.path.join(d, "tls.crt"))
    assert reg["created"].endswith("Z")
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    assert oct(os.stat(os.path.join(d, "tls.key")).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.join(env.state, "local.key")).st_mode & 0o777) == "0o600"
    assert "BEGIN PUBLIC KEY" in open(os.path.join(env.state, "local.pub")).read()
    with open(os.path.join(d, "shim.json")) as f:
        shim_cfg = json.load(f)
    assert shim_cfg["id"] == c.id and shim_cfg["pid"] == c.pid
    assert shim_cfg["trusted_keys"][0]["kid"] == "local"
    assert shim_cfg["trusted_keys"][0]["pem"] == open(os.path.join(env.state, "local.pub")).read()
    assert shim_cfg["session_binary"] == os.path.realpath(FAKE_SESSION)

    shim = reg["shim_pid"]
    assert alive(shim)
    assert os.readlink(f"/proc/{shim}/exe") == os.path.realpath(SHIM)
    # Detached: own session, not a child of runc or of us.
    with open(f"/proc/{shim}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Its own session (setsid in the first child, then forked: never a session
    # leader, so it can never acquire a terminal).
    assert int(fields[3]) == int(fields[2]) != os.getsid(0) and int(fields[3]) != shim
    # Tiny when idle (the session binary has not been exec'd in it).
    m = smaps(shim)
    print(f"shim idle footprint: Private_Dirty={m['Private_Dirty']} kB Pss={m['Pss']} kB Rss={m['Rss']} kB")
    if FOOTPRINT_CHECKED:
        assert m["Private_Dirty"] < CONMON_USS_KB, m
        assert m["Pss"] < CONMON_PSS_KB, m
        # After a quiet second the shim drops its code and constants from its
        # page tables (shim.cc drop_code_pages); what its idle loop runs comes
        # back, with the kernel's fault-around neighbours (64 KiB each).
        def quiet_footprint():
            q = smaps(shim)
            return q if q["Pss"] < CONMON_PSS_KB * 3 // 4 else None
        quiet = wait_for(quiet_footprint, 10, "the quiet shim's code pages dropped")
        print(f"shim quiet footprint: Pss={quiet['Pss']} kB Pss_File={quiet['Pss_File']} kB")

    # The shim's fds: exactly what it needs, all CLOEXEC except stdio.
    shim_fds = {int(fd): os.readlink(f"/proc/{shim}/fd/{fd}") for fd in os.listdir(f"/proc/{shim}/fd")}
    assert shim_fds[0] == "/dev/null"
    assert shim_fds[1] == shim_fds[2] == os.path.join(d, "shim.log")
    assert not any("pipe:" in v for v in shim_fds.values()), shim_fds  # no runtime pipes, ready fd closed

    # fd contract seen by the gate (fake_session.py reports over a connection it accepted).
    rep = session_report(reg["endpoint"])
    fds = {int(k): v for k, v in rep["fds"].items()}
    want_ns = []
    for t in NS_TYPES:
        theirs = os.readlink(f"/proc/{c.pid}/ns/{t}")
        if t == "mnt" or theirs != os.readlink(f"/proc/self/ns/{t}"):
            want_ns.append((t, theirs))
    assert fds[0] == "/dev/null" and fds[1] == "/dev/null"
    assert fds[2] == os.path.join(d, "shim.log")
    # fd 3: the shim's TCP listening socket itself (the gate accepts).
    assert fds[3].startswith("socket:") and rep["fd3"] == {"family": socket.AF_INET, "type": socket.SOCK_STREAM,
                                                           "listening": True}
    assert fds[4].startswith("socket:") and rep["fd4"] == {"family": socket.AF_UNIX, "type": socket.SOCK_SEQPACKET,
                                                           "listening": False}
    assert fds[5] == "anon_inode:[pidfd]"
    assert sorted(fds) == list(range(6 + len(want_ns))), fds
    ns_arg = ",".join(f"{t}={6 + i}" for i, (t, _) in enumerate(want_ns))
    # warm_idle_s 0: the gate keeps no zygote and lingers 10 s unused.
    assert rep["argv"] == [os.path.realpath(FAKE_SESSION), "--config", os.path.join(d, "shim.json"), "--ns", ns_arg,
                           "--gate", "10", "--no-zygote"]
    for i, (t, link) in enumerate(want_ns):
        assert fds[6 + i] == link, (t, fds)
    assert rep["replay"] == ["A", "F", "R", "F"]
    assert rep["write_self_errno"] == errno.EROFS  # session binary read-only in the shim's mount ns
    assert rep["self_mount_opts"].split(",")[0] == "ro"
    assert set(rep["env"]) <= {"PATH", "LC_CTYPE"}, rep["env"]  # LC_CTYPE: python's own C-locale coercion
    assert rep["cwd"] == "/" and rep["ppid"] == shim
    # The bind mount stays in the shim's namespace.
    with open("/proc/self/mountinfo") as f:
        assert os.path.realpath(FAKE_SESSION) not in f.read()

    log = open(os.path.join(d, "shim.log")).read().splitlines()
    entries = [json.loads(l) for l in log]
    assert any(e["msg"] == "shim ready" for e in entries)
    # The 'A' made the gate process a session: it ended when it exited.
    wait_for(lambda: any(json.loads(l)["msg"] == "session ended" for l in open(os.path.join(d, "shim.log"))),
             what="session end logged")
    wait_for(lambda: any(json.loads(l)["msg"] == "gate ended" for l in open(os.path.join(d, "shim.log"))),
             what="gate end logged")

    # Container init exits -> the shim stops and cleans up as poststop would
    # (docs/design.md "Stale state"), before any delete.
    c.runc("kill", c.id, "KILL")
    wait_for(lambda: not alive(shim), timeout=10, what="shim exit after container exit")
    wait_for(lambda: not os.path.exists(d), timeout=10, what="state dir removed by the shim's cleanup")
    c.stop()  # runc delete -> poststop hook: nothing left, exits 0 quietly
    assert env.leftovers() == []
    assert not os.path.exists(os.path.join(env.state, "hook.log")) or c.id not in open(
        os.path.join(env.state, "hook.log")).read()


def test_poststop_stops_a_running_shim_and_is_idempotent(env_factory, containers_):
    env = env_factory()
    c = new_container(containers_, env)
    c.start()
    reg = env.registration(c.id)
    state = json.dumps({"ociVersion": "1.0.2", "id": c.id, "status": "stopped", "bundle": c.bundle, "pid": 0})
    for _ in range(2):  # second run: nothing left to do, still exit 0
        p = subprocess.run([HOOK, "--config", env.config], input=state.encode(), capture_output=True, timeout=10)
        assert p.returncode == 0, p.stderr
    assert not alive(reg["shim_pid"])
    assert env.leftovers() == []
    c.stop()


def test_a_shims_cleanup_leaves_another_shims_container_alone(env_factory, containers_):
    """`cleanup ID` is the shim's own (exec'd in its place, same pid): run by
    any other process, as by a shim whose poststop came first and whose id a
    new container took since, it leaves the registered container alone."""
    env = env_factory()
    c = new_container(containers_, env)
    c.start()
    reg = env.registration(c.id)
    p = subprocess.run([HOOK, "--config", env.config, "cleanup", c.id], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert b"left alone" in p.stderr, p.stderr
    assert alive(reg["shim_pid"]) and env.registration(c.id) == reg
    c.stop()
    wait_for(lambda: not alive(reg["shim_pid"]), 10, "the shim to end with its container")
    assert env.leftovers() == []


def test_session_limit_and_shutdown_kills_sessions(env_factory, containers_):
    # max_sessions counts admitted (authenticated) sessions: the gate's
    # second admission is refused ('L'), the gate itself goes on.
    env = env_factory(max_sessions=1)
    c = new_container(containers_, env)
    c.start()
    reg = env.registration(c.id)
    host, port = reg["endpoint"].rsplit(":", 1)
    first = socket.create_connection((host, int(port)), timeout=10)
    try:
        first.sendall(b"hold\n")
        assert first.recv(64) == b"holding\n"
        with socket.create_connection((host, int(port)), timeout=5) as second:
            second.sendall(b"hold\n")
            assert second.recv(64) == b"L\n"  # over the limit
        log = open(os.path.join(env.cdir(c.id), "shim.log")).read()
        assert "too many sessions, admission refused" in log
        lines = [json.loads(l) for l in log.splitlines()]
        sessions = [l["session_pid"] for l in lines if l["msg"] == "session started"]
        gates = [l["gate_pid"] for l in lines if l["msg"] == "gate started"]
        assert len(sessions) == 1 and alive(sessions[0]) and gates == sessions  # the gate became the session
        # Its child took over as the gate (it answered the second connection).
        gate = [p for p in kids(sessions[0]) if alive(p)]
        assert len(gate) == 1, gate
        # SIGTERM to the shim terminates its sessions and the gate, and exits 0.
        os.kill(reg["shim_pid"], signal.SIGTERM)
        wait_for(lambda: not alive(reg["shim_pid"]), what="shim exit on SIGTERM")
        assert not alive(sessions[0]) and not alive(gate[0])
        assert first.recv(64) == b""
    finally:
        first.close()
    c.stop()
    assert env.leftovers() == []


def test_a_gate_that_dies_at_once_is_not_restarted_in_a_loop(env_factory, containers_):
    # A broken session binary: each gate exits at once while the connection
    # that woke it waits in the listen backlog. At most one start a second.
    env = env_factory(session_binary="/bin/false")
    c = new_container(containers_, env)
    c.start()
    host, port = env.registration(c.id)["endpoint"].rsplit(":", 1)
    log = os.path.join(env.cdir(c.id), "shim.log")
    starts = lambda: sum(1 for l in open(log) if '"msg":"gate started"' in l)
    with socket.create_connection((host, int(port)), timeout=5):
        wait_for(lambda: starts() >= 2, 5, "a second gate start")
        t0 = time.time()
        wait_for(lambda: starts() >= 4, 10, "two more")
        assert time.time() - t0 >= 1.5, starts()
    c.stop()
    assert env.leftovers() == []


def kids(pid):
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def marker_hook(path, extra=""):
    """A createRuntime hook after ours: records the registration it sees."""
    return {"path": "/bin/sh", "args": ["sh", "-c", f"cat \"$0\" > {path}.tmp && mv {path}.tmp {path}{extra}", "REG"]}


def hooks_with(env, cid, after):
    h = env.runc_hooks()
    after = dict(after)
    after["args"] = [a.replace("REG", os.path.join(env.cdir(cid), "registration.json")) for a in after["args"]]
    h["createRuntime"].append(after)
    return h


def no_hook_errors(env, cid):
    path = os.path.join(env.state, "hook.log")
    return not os.path.exists(path) or cid not in open(path).read()


def test_create_failing_after_create_runtime_leaves_nothing(env_factory, containers_):
    # runc sets the rlimits after the createRuntime hooks; one it cannot set
    # fails the create, and runc never calls poststop. The shim sees its
    # container's init gone and cleans up as poststop would.
    env = env_factory()
    cid = f"shimlet-t-{uuid.uuid4().hex[:10]}"
    seen = os.path.join(env.dir, "seen.json")

    def edit(cfg):
        cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 2000000, "hard": 2000000}]  # > fs.nr_open
        cfg["hooks"] = hooks_with(env, cid, marker_hook(seen))

    c = Container(name=cid, edit=edit)
    containers_.append(c)
    with pytest.raises(AssertionError, match="rlimit"):
        c.start()
    reg = json.load(open(seen))  # createRuntime ran: the shim was up and registered
    assert reg["id"] == cid and reg["shim_pid"] > 0
    wait_for(lambda: not alive(reg["shim_pid"]), timeout=10, what="shim exit after the failed create")
    wait_for(lambda: env.leftovers() == [], timeout=10, what="state dir removed by the shim's cleanup")
    assert no_hook_errors(env, cid)
    # A later poststop (runc delete of what is left) finds nothing and exits 0 quietly.
    state = json.dumps({"ociVersion": "1.0.2", "id": cid, "status": "stopped", "bundle": c.bundle, "pid": 0})
    p = subprocess.run([HOOK, "--config", env.config], input=state.encode(), capture_output=True, timeout=10)
    assert (p.returncode, p.stderr) == (0, b""), p
    c.started = True
    c.stop()
    assert env.leftovers() == [] and no_hook_errors(env, cid)


def test_sigkilled_runtime_leaves_nothing(env_factory, containers_):
    # The runtime killed between createRuntime and start: its container's
    # init goes with it, no poststop ever comes.
    env = env_factory()
    cid = f"shimlet-t-{uuid.uuid4().hex[:10]}"
    seen, blocker = os.path.join(env.dir, "seen.json"), os.path.join(env.dir, "blocker.pid")

    def edit(cfg):
        cfg["hooks"] = hooks_with(env, cid, marker_hook(seen, f"; echo $$ > {blocker}; exec sleep 60"))

    c = Container(name=cid, edit=edit)
    containers_.append(c)
    os.makedirs(c.root, exist_ok=True)
    runc = subprocess.Popen(["runc", "--root", c.root, "run", "-d", cid], cwd=c.bundle, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    c.started = True
    try:
        wait_for(lambda: os.path.exists(blocker) and os.path.getsize(blocker) > 0, timeout=20, what="createRuntime")
        reg = json.load(open(seen))
        assert alive(reg["shim_pid"])
        runc.kill()
        runc.wait(timeout=10)
        wait_for(lambda: not alive(reg["shim_pid"]), timeout=15, what="shim exit after the runtime's death")
        wait_for(lambda: env.leftovers() == [], timeout=10, what="state dir removed by the shim's cleanup")
        assert no_hook_errors(env, cid)
    finally:
        with contextlib.suppress(Exception):
            os.kill(int(open(blocker).read()), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runc.pid, signal.SIGKILL)
    c.stop()  # runc delete -f of the remains: poststop, if any, finds nothing
    assert env.leftovers() == [] and no_hook_errors(env, cid)


def test_podman_create_failing_after_create_runtime(env_factory, podman_names):
    # As seen with podman and a bad rlimit: `podman run` fails, podman rm
    # follows; nothing of ours stays behind, and shimctl offers nothing.
    env = env_factory()
    hooks_dir = render_hooks_dir(env)
    seen = os.path.join(env.dir, "seen")
    with open(os.path.join(hooks_dir, "zz-marker.json"), "w") as f:
        json.dump({"version": "1.0.0", "hook": {"path": "/bin/sh", "args": ["sh", "-c", f"ls {env.state} >> {seen}"]},
                   "when": {"always": True}, "stages": ["createRuntime"]}, f)
    name = f"hks-{uuid.uuid4().hex[:8]}"
    podman_names.append(name)
    p = run(["podman", "--runtime", "runc", "--hooks-dir", hooks_dir, "run", "-d", "--name", name, "--ulimit",
             "nofile=2000000:2000000", "--rootfs", podman_rootfs(env), "sleep", "100000"], check=False,
            stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode != 0 and b"rlimit" in p.stderr, p.stderr
    cid = run(["podman", "inspect", "-f", "{{.Id}}", name]).stdout.decode().strip()
    assert cid in open(seen).read()  # our createRuntime ran before the failure
    wait_for(lambda: env.leftovers() == [], timeout=10, what="state dir removed by the shim's cleanup")
    shimctl = os.path.join(BIN, "shimctl")
    r = run([shimctl, "--local", "--state-dir", env.state, "exec", cid[:12], "--", "true"], check=False)
    assert r.returncode == 255 and b"no container" in r.stderr, r.stderr
    run(["podman", "rm", "-f", "-t", "0", name])
    assert env.leftovers() == [] and no_hook_errors(env, cid)


def test_broken_shim_binary_does_not_stop_the_container(env_factory, containers_):
    env = env_factory(shim_binary="/nonexistent/shimlet")
    c = new_container(containers_, env)
    c.start()
    assert c.state()["status"] == "running"
    assert env.leftovers() == []
    assert "shim_binary /nonexistent/shimlet" in open(os.path.join(env.state, "hook.log")).read()
    c.stop()


def test_shim_failing_at_start_is_cleaned_up(env_factory, containers_):
    # The shim starts but cannot bind: the hook reports its log line, kills nothing
    # alive, and removes the directory; the container still runs.
    env = env_factory(listen="192.0.2.1:1")
    c = new_container(containers_, env)
    c.start()
    assert c.state()["status"] == "running"
    assert env.leftovers() == []
    assert "bind 192.0.2.1:1" in open(os.path.join(env.state, "hook.log")).read()
    c.stop()


def test_fail_container_on_error_fails_the_container(env_factory, containers_):
    env = env_factory(shim_binary="/nonexistent/shimlet", fail_container_on_error=True)
    c = new_container(containers_, env)
    with pytest.raises(AssertionError, match="runc run"):
        c.start()
    c.started = True  # runc may have left the container created: delete it
    c.stop()
    assert env.leftovers() == []


@pytest.mark.parametrize("fail", [False, True])
def test_hook_never_hangs_on_open_stdin(env_factory, fail):
    env = env_factory(fail_container_on_error=fail)
    p = subprocess.Popen([HOOK, "--config", env.config, "createRuntime"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.stdin.write(b'{"ociVersion":"1.0.2","id":"x","status":"creating",')
        p.stdin.flush()
        t0 = time.time()
        rc = p.wait(timeout=15)
        assert time.time() - t0 < 10
        assert rc == (1 if fail else 0)
        assert b"not complete" in p.stderr.read()
    finally:
        with contextlib.suppress(Exception):
            p.kill()
        p.stdin.close()
        p.wait()


def test_hook_refuses_bad_ids_and_junk(env_factory):
    env = env_factory(fail_container_on_error=True)
    for state in ('{"ociVersion":"1","id":"../../etc","status":"creating","bundle":"/x","pid":1}',
                  '{"id":"a/b","status":"stopped","bundle":"/x"}', "[]", "\xff" * 10):
        p = subprocess.run([HOOK, "--config", env.config], input=state.encode("utf-8", "surrogateescape")
                           if isinstance(state, str) else state, capture_output=True, timeout=10)
        assert p.returncode == 1, (state, p.stderr)
        assert p.stderr.count(b"\n") == 1  # one clear line
    assert env.leftovers() == []


# ---- podman -------------------------------------------------------------


def render_hooks_dir(env):
    hooks_dir = os.path.join(env.dir, "hooks.d")
    run([os.path.join(REPO, "scripts", "install-hooks"), hooks_dir, BIN, env.config])
    with open(os.path.join(hooks_dir, "shimlet.json")) as f:
        rendered = json.load(f)
    assert rendered["hook"]["path"] == os.path.join(os.path.realpath(BIN), "shimlet-hook")
    return hooks_dir


@pytest.fixture
def podman_names():
    names = []
    yield names
    for n in names:
        run(["podman", "rm", "-f", "-t", "0", n], check=False)


def podman_run(env, hooks_dir, name, rootfs, *extra):
    return run(["podman", "--runtime", "runc", "--hooks-dir", hooks_dir, "run", "-d", "--name", name,
                "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096", *extra, "--rootfs", rootfs,
                "sleep", "100000"], check=False, stdin=subprocess.DEVNULL, timeout=60)


def podman_rootfs(env):
    dst = os.path.join(env.dir, "rootfs")
    shutil.copytree(shared_rootfs(), dst, symlinks=True)
    return dst


def test_podman_start_and_rm(env_factory, podman_names):
    env = env_factory()
    hooks_dir = render_hooks_dir(env)
    name = f"hks-{uuid.uuid4().hex[:8]}"
    podman_names.append(name)
    p = podman_run(env, hooks_dir, name, podman_rootfs(env))
    assert p.returncode == 0, p.stderr
    cid = p.stdout.decode().strip()
    reg = env.registration(cid)
    pid = int(run(["podman", "inspect", "-f", "{{.State.Pid}}", name]).stdout)
    assert reg["id"] == cid and reg["pid"] == pid
    assert reg["pin"] == cert_pin(os.path.join(env.cdir(cid), "tls.crt"))
    host, port = reg["endpoint"].rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=5).close()
    shim = reg["shim_pid"]
    assert alive(shim)
    m = smaps(shim)
    if FOOTPRINT_CHECKED:
        assert m["Private_Dirty"] < CONMON_USS_KB and m["Pss"] < CONMON_PSS_KB, m
    rep = session_report(reg["endpoint"])
    assert rep["fds"]["5"] == "anon_inode:[pidfd]" and rep["replay"] == ["A", "F", "R", "F"]
    run(["podman", "rm", "-f", "-t", "0", name])
    wait_for(lambda: not alive(shim), what="shim exit after podman rm")
    wait_for(lambda: env.leftovers() == [], what="state dir cleaned by poststop")


def test_podman_broken_shim_binary(env_factory, podman_names):
    for fail in (False, True):
        env = env_factory(shim_binary="/nonexistent/shimlet", fail_container_on_error=fail)
        hooks_dir = render_hooks_dir(env)
        name = f"hks-{uuid.uuid4().hex[:8]}"
        podman_names.append(name)
        p = podman_run(env, hooks_dir, name, podman_rootfs(env))
        if fail:
            assert p.returncode != 0
        else:
            assert p.returncode == 0, p.stderr
            assert run(["podman", "inspect", "-f", "{{.State.Status}}", name]).stdout.strip() == b"running"
        run(["podman", "rm", "-f", "-t", "0", name], check=False)
        assert env.leftovers() == []


def real_podman(env_factory, podman_names, *extra):
    """A podman container (hooks.d) served by the real shimlet-session:
    (env, name, container id, the `shimctl --local exec` argv prefix)."""
    env = env_factory(session_binary=os.path.join(BIN, "shimlet-session"))
    name = f"hks-{uuid.uuid4().hex[:8]}"
    podman_names.append(name)
    p = podman_run(env, render_hooks_dir(env), name, podman_rootfs(env), *extra)
    assert p.returncode == 0, p.stderr
    base = [os.path.join(BIN, "shimctl"), "--local", "--state-dir", env.state, "exec"]
    return env, name, p.stdout.decode().strip(), base


def test_podman_exec_through_the_real_session(env_factory, podman_names):
    """podman (hooks.d) + the real shimlet-session: shimctl --local exec works,
    exit codes come back, and everything goes away with `podman rm`."""
    env, name, cid, base = real_podman(env_factory, podman_names)
    shim = env.registration(cid)["shim_pid"]
    r = run(base + [cid[:12], "--", "sh", "-c", "echo hi from $(hostname); exit 7"], check=False)
    assert r.returncode == 7, r.stderr
    assert r.stdout.startswith(b"hi from "), r.stdout
    r = run(base + ["-i", cid, "--", "cat"], check=False, input=b"through podman\n")
    assert (r.returncode, r.stdout) == (0, b"through podman\n"), r.stderr
    run(["podman", "rm", "-f", "-t", "0", name])
    wait_for(lambda: not alive(shim), what="shim exit after podman rm")
    wait_for(lambda: env.leftovers() == [], what="state dir cleaned by poststop")


def test_podman_names_and_id_prefix(env_factory, podman_names):
    """podman 4.3 sets no name annotation: a container is reachable by a
    unique id prefix, and by its hostname when the user chose one; a
    registration whose shim is gone is never offered."""
    host = f"web-{uuid.uuid4().hex[:6]}"
    env, name, cid, base = real_podman(env_factory, podman_names, "--hostname", host)
    assert len(cid) == 64
    reg = env.registration(cid)
    assert (reg["namespace"], reg["pod"], reg["container"]) == ("default", host, host)
    for target in (host, cid[:6], cid[:12], cid):
        r = run(base + [target, "--", "hostname"], check=False)
        assert (r.returncode, r.stdout) == (0, host.encode() + b"\n"), (target, r.stderr)
    # Unknown: a few candidates, one per line, podman ids shortened as podman does.
    r = run(base + ["no-such-name", "--", "true"], check=False)
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 255 and lines[0].startswith("error: no container matches 'no-such-name'"), lines
    assert f"  {cid[:12]} (default/{host}, container {host})" in lines, lines
    # A dead shim (SIGKILLed: nothing cleaned up) is never offered.
    os.kill(reg["shim_pid"], signal.SIGKILL)
    wait_for(lambda: not alive(reg["shim_pid"]), what="shim killed")
    r = run(base + [cid, "--", "true"], check=False)
    assert r.returncode == 255 and f"container {cid[:12]} is not running".encode() in r.stderr, r.stderr
    r = run(base + [host, "--", "true"], check=False)
    assert r.returncode == 255 and b"no container matches" in r.stderr, r.stderr
    run(["podman", "rm", "-f", "-t", "0", name])
    wait_for(lambda: env.leftovers() == [], what="state dir cleaned by poststop")
