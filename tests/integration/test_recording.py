"""Session recording and replay (docs/recording.md) end to end: a real master
with a recording policy and store, real runc containers whose sessions record
to the node's spool, the hook's renewer and poststop shipping the recordings,
and `shimctl sessions` (list, play, export) reading them back; asciinema (from
Debian) plays the exported file too. One master and one container are shared;
the tests that kill a shim or a container, or fill a disk, bring their own."""
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import termios
import threading
import time
import uuid

import pyte
import pytest

from containers import alive
from master_env import LEASE_S, NODE, SHIMCTL, TOKENS, MasterEnv, wait_for
from test_exec import F_GETPIPE_SZ, Pty
from test_master_e2e import _session_holding

# alice's sessions: fail-closed; carol's: fail-open; namespace "quiet": none;
# "tiny": all, at most 64 KiB each; "interactive": tty sessions only.
TINY_MAX = 65536
POLICY = f"""
apiVersion: shimlet.io/v1
kind: RecordingPolicy
default: none
rules:
- namespaces: [quiet]
  record: none
- namespaces: [tiny]
  record: all
  maxBytes: {TINY_MAX}
- namespaces: [interactive]
  record: tty
- users: [carol]
  record: all
  diskFull: fail-open
- namespaces: [default]
  record: all
  diskFull: fail-closed
"""

EXEC_NAMESPACES = ["quiet", "tiny", "interactive"]  # besides "default" (master_env.py)


def _exec_role(ns):
    return f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {ns}-exec
  namespace: {ns}
rules:
- apiGroups: [""]
  resources: ["pods", "pods/exec"]
  verbs: ["get", "list", "create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {ns}-exec
  namespace: {ns}
subjects:
- kind: User
  name: alice
roleRef:
  kind: Role
  name: {ns}-exec
---"""


# Who may read recordings: alice everywhere (ClusterRoleBinding), carol only
# in "default" (RoleBinding: no list across namespaces), dave nothing. And
# alice may exec in EXEC_NAMESPACES.
RBAC = "".join(_exec_role(ns) for ns in EXEC_NAMESPACES) + """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: session-viewer
rules:
- apiGroups: ["shimlet.io"]
  resources: ["sessions"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: alice-sessions
subjects:
- kind: User
  name: alice
roleRef:
  kind: ClusterRole
  name: session-viewer
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: carol-sessions
  namespace: default
subjects:
- kind: User
  name: carol
roleRef:
  kind: ClusterRole
  name: session-viewer
"""

# asciicast data back to bytes: U+EF80..U+EFFF are raw bytes 0x80..0xFF,
# which Python's surrogateescape writes for U+DC80..U+DCFF.
_RAW = {0xEF00 + b: 0xDC00 + b for b in range(0x80, 0x100)}


def data_bytes(s):
    return s.translate(_RAW).encode("utf-8", "surrogateescape")


def parse_cast(raw):
    lines = raw.split(b"\n")
    assert lines[-1] == b"", "a recording ends with a newline"
    header = json.loads(lines[0])
    events = [json.loads(l) for l in lines[1:-1]]
    return header, events


def stream(events, code):
    return b"".join(data_bytes(d) for _, c, d in events if c == code)


def replay_screen(header, events):
    """The screen a terminal of the header's size shows after the output
    events, resized where the recording says."""
    screen = pyte.Screen(header["width"], header["height"])
    st = pyte.ByteStream(screen)
    for _, c, d in events:
        if c == "o":
            st.feed(data_bytes(d))
        elif c == "r":
            cols, rows = d.split("x")
            screen.resize(int(rows), int(cols))
    return [l.rstrip() for l in screen.display]


def _recording_env(files, lease_s=LEASE_S):
    """A master with the recording policy and store (under files), its hook config recording to env.rec_root."""
    pol, rbac = os.path.join(files, "policy.yaml"), os.path.join(files, "rbac-sessions.yaml")
    with open(pol, "w") as f:
        f.write(POLICY)
    with open(rbac, "w") as f:
        f.write(RBAC)
    store = os.path.join(files, "store")
    e = MasterEnv(extra_args=["--authorization-policy-file", rbac, "--recording-policy-file", pol,
                              "--recording-dir", store], lease_s=lease_s)
    e.store = store
    e.kc_alice = e.kubeconfig("kc-alice.yaml", user="alice")
    e.kc_carol = e.kubeconfig("kc-carol.yaml", user="carol")
    e.rec_root = os.path.join(e.dir, "recordings")
    write_config(e, e.hook_config, {"dir": e.rec_root})
    return e


@pytest.fixture(scope="module")
def env():
    files = tempfile.mkdtemp(prefix="rec-e2e-files-")
    try:
        e = _recording_env(files)
        try:
            yield e
        finally:
            e.cleanup()
    finally:
        shutil.rmtree(files, ignore_errors=True)


def write_config(env, path, recording, **master):
    env.write_hook_config(path, env.state, env.url)
    with open(path) as f:
        cfg = json.load(f)
    cfg["recording"] = recording
    cfg["master"].update(master)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def pod(env):
    name = "rec-" + uuid.uuid4().hex[:6]
    c = env.container(name)
    c.pod = name
    return c


def shell_tty_size(init_pid):
    """(rows, cols) of the terminal of the `sh` exec'd into init_pid's container."""
    ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if int(pid) == init_pid or os.readlink(f"/proc/{pid}/ns/pid") != ns:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() != b"sh\0":
                    continue
            fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NOCTTY)
            try:
                return struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))[:2]
            finally:
                os.close(fd)
    return None


def as_alice(env, *args, **kw):
    return env.shimctl("--kubeconfig", env.kc_alice, *args, **kw)


def grant_sid(env, cmd):
    return [l for l in env.audit_lines() if l.get("resource") == "pods/exec" and l.get("command") == cmd][-1][
        "session_id"]


def stored(env, sid, timeout=30, c=None):
    """The recording's metadata once the master has it whole. With c (a
    container), a timeout says what its spool and shim log show."""
    def got():
        st, m = env.get(f"/apis/shimlet.io/v1/sessions/{sid}")
        return m if st == 200 else None
    try:
        return wait_for(got, timeout, f"recording {sid} at the master", interval=0.2)
    except AssertionError as e:
        if c is None:
            raise
        raise AssertionError(f"{e}; {_spool_and_log(env, c)}") from None


def _spool_and_log(env, c):
    """The container's spool (name, size) and its shim log's renewal and recording lines, for failure messages."""
    spool = os.path.join(getattr(c, "mnt", None) or env.rec_root, c.id)
    try:
        files = [(f, os.path.getsize(os.path.join(spool, f))) for f in sorted(os.listdir(spool))]
    except OSError as e:
        files = repr(e)
    try:
        lines = [l for l in open(os.path.join(env.state, c.id, "shim.log")).read().splitlines()
                 if "renew" in l or "record" in l]
    except OSError as e:
        lines = [repr(e)]
    return f"spool {spool}: {files}; shim log: {lines[-12:]}"


def export(env, sid):
    p = as_alice(env, "sessions", "export", "--", sid)  # local tickets' ids may start with '-'
    assert p.returncode == 0, p.stderr
    return p.stdout


def node_end(env, sid):
    return wait_for(lambda: [l for l in env.audit_lines() if l["event"] == "session_end" and
                             l.get("session_id") == sid and l.get("via") == "node"], 15, "the node's session end")[0]


# ---------------------------------------------------------------- tty

def test_tty_session_plays_back_to_the_same_screen(env, pod):
    """Typed input, a resize and output through the master: the recording
    replays (here, in shimctl's player and in asciinema) to the screen the
    user saw, byte for byte; typed input the terminal showed is not recorded
    again, input at a hidden prompt once."""
    t = Pty(["env", "HOME=" + env.home, SHIMCTL, "--kubeconfig", env.kc_alice, "exec", "-it", pod.pod, "--", "sh"],
            30, 90)
    # The user's terminal: it answers the shell's cursor position queries
    # (busybox ash asks after each prompt), as a real one does.
    screen = pyte.Screen(90, 30)
    term = pyte.ByteStream(screen)
    screen.write_process_input = lambda data: os.write(t.master, data.encode())
    fed = [0]

    def shown(pred):
        def check(o):
            term.feed(o[fed[0]:])
            fed[0] = len(o)
            return pred(o)
        return check

    prompt = lambda o: o.rstrip().endswith(b"#") or o.endswith(b"# \x1b[6n")
    try:
        t.read_until(shown(prompt))
        os.write(t.master, b"sleep 0.4; echo one-$((6*7))\r")  # a pause the players must keep
        t.read_until(shown(lambda o: b"one-42" in o and prompt(o)))
        os.write(t.master, b"stty -echo; printf pw:; read SECRET; stty echo; echo got-${#SECRET}\r")
        # printf's output after the line's end: the shell echoes the typed line
        # as it comes, and that echo may stop right after its own "pw:".
        t.read_until(shown(lambda o: o.endswith(b"\r\npw:")))  # echo is off now: a hidden prompt
        os.write(t.master, b"hunter2\r")
        t.read_until(shown(lambda o: b"got-7" in o and prompt(o)))
        mark = len(t.out)
        t.set_size(40, 100)  # the kernel sends shimctl SIGWINCH
        screen.resize(40, 100)
        # The resize reached the container's terminal. (Not the shell's redraw:
        # busybox ash puts it off to its next key when SIGWINCH comes while it
        # handles one, here the terminal's answer to its cursor query.)
        wait_for(lambda: shell_tty_size(pod.pid) == (40, 100), 15, "the resize at the container's terminal")
        os.write(t.master, b"stty size; printf '\\033[1;31mred\\033[0m\\n'\r")
        t.read_until(shown(lambda o: b"40 100" in o[mark:] and b"red" in o[mark:] and prompt(o)))
        os.write(t.master, b"exit 3\r")
        t.read_until(shown(lambda o: o.endswith(b"exit 3\r\n")))
        assert t.wait() == 3
    finally:
        t.close()
    live = t.out
    term.feed(live[fed[0]:])
    want = [l.rstrip() for l in screen.display]
    assert any("one-42" in l for l in want) and any("got-7" in l for l in want), want

    sid = grant_sid(env, ["sh"])
    meta = stored(env, sid)
    assert meta["complete"] and meta["tty"] and meta["end"] == "end: exit code 3", meta
    assert (meta["user"], meta["pod"], meta["container"], meta["node"]) == ("alice", pod.pod, "app", NODE), meta
    raw = export(env, sid)
    assert len(raw) == meta["bytes"]
    header, events = parse_cast(raw)
    s = header["shimlet"]
    assert (header["width"], header["height"]) == (90, 30), header
    assert s["session_id"] == sid and s["user"] == "alice" and s["command"] == ["sh"] and s["pod"] == pod.pod, s
    assert s["container_id"] == pod.id and s["jti"] and s["start"] and s["tty"], s
    # What the terminal showed, exactly; the resize where it happened.
    out = stream(events, "o")
    assert out == live
    at = len(b"".join(data_bytes(d) for _, c, d in events[:[c for _, c, _ in events].index("r")] if c == "o"))
    assert at == mark and [c for _, c, _ in events].count("r") == 1
    assert replay_screen(header, events) == want
    # The echo rule: only what was typed at the hidden prompt, once.
    assert stream(events, "i") == b"hunter2\r", events
    # Byte counts match the session's (the node's session end record).
    end = node_end(env, sid)
    assert meta["out_bytes"] == end["bytes_out"] == len(out), (meta, end)
    assert end["recording"]["id"] == sid and end["recording"]["complete"], end
    assert end["recording"]["path"] == os.path.join(env.store, "default", sid + ".cast"), end

    # Players write exactly the output events, with their timing.
    t0 = time.monotonic()
    p = as_alice(env, "sessions", "play", "--idle-time-limit", "0.2", sid, timeout=60)
    assert p.returncode == 0 and p.stderr == b"", p.stderr
    assert p.stdout == out
    # Paused between events as recorded (each pause cut to 0.2 s), not dumped at once.
    times = [e[0] for e in events if e[1] == "o"]
    paced = sum(min(b - a, 0.2) for a, b in zip([0.0] + times, times))
    assert paced >= 0.2 and time.monotonic() - t0 >= paced, (paced, time.monotonic() - t0)
    cast = os.path.join(env.dir, sid + ".cast")
    with open(cast, "wb") as f:
        f.write(raw)
    a = subprocess.run(["asciinema", "play", "-s", "20", "-i", "0.2", cast], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert a.returncode == 0 and a.stdout == out, a.stderr


# ---------------------------------------------------------------- non-tty

# The longest test here (50 MB of random bytes, 2.4x that in the file): its
# own xdist group with its own master, beside the rest of the file.
@pytest.mark.slow
@pytest.mark.xdist_group("recording-bulk")
def test_non_tty_50mb_reassembles_to_the_same_checksum(env, pod):
    cmd = ["sh", "-c", "cat; head -c 50000000 /dev/urandom; echo to-stderr >&2"]
    stdin = b"typed \x00\xff\xfe bytes\n"
    p = as_alice(env, "exec", "-i", pod.pod, "--", *cmd, stdin=None, input=stdin, timeout=300)
    assert p.returncode == 0, p.stderr[-500:]
    assert len(p.stdout) == len(stdin) + 50000000 and p.stderr == b"to-stderr\n"
    sid = grant_sid(env, cmd)
    meta = stored(env, sid, timeout=120)
    assert meta["complete"] and not meta["truncated"] and not meta["tty"], meta
    assert meta["out_bytes"] == len(p.stdout) and meta["in_bytes"] == len(stdin) and meta["err_bytes"] == 10, meta
    header, events = parse_cast(export(env, sid))
    assert hashlib.sha256(stream(events, "o")).hexdigest() == hashlib.sha256(p.stdout).hexdigest()
    assert stream(events, "i") == stdin and stream(events, "e") == b"to-stderr\n"
    assert (header["width"], header["height"]) == (80, 24) and "r" not in {c for _, c, _ in events}
    # shimctl's player gives stdout and stderr back as they were.
    pl = as_alice(env, "sessions", "play", "--speed", "1000", sid, timeout=300)
    assert pl.returncode == 0 and pl.stderr == b"to-stderr\n", pl.stderr[-300:]
    assert hashlib.sha256(pl.stdout).hexdigest() == hashlib.sha256(p.stdout).hexdigest()
    end = node_end(env, sid)
    assert end["bytes_out"] == len(p.stdout) + 10 and end["recording"]["bytes"] == meta["bytes"], end
    # Nothing left on the node once the master has it.
    wait_for(lambda: not os.listdir(os.path.join(env.rec_root, pod.id)), 10, "the node's spool emptied")


def test_policy_none_records_nothing(env):
    """Namespace "quiet" is not recorded: no claim in the ticket, no file."""
    name = "quiet-" + uuid.uuid4().hex[:6]
    c = env.container(name, namespace="quiet")
    try:
        cmd = ["sh", "-c", "echo not-recorded"]
        p = as_alice(env, "exec", "-it", "-n", "quiet", name, "--", *cmd)
        assert p.returncode == 0 and p.stdout == b"not-recorded\r\n", p.stderr
        sid = grant_sid(env, cmd)
        grant = [l for l in env.audit_lines() if l.get("session_id") == sid and l.get("resource") == "pods/exec"][-1]
        assert "recording" not in grant, grant
        assert "recording" not in node_end(env, sid)
        assert not os.path.exists(os.path.join(env.rec_root, c.id))  # made by a first recording only
        assert env.get(f"/apis/shimlet.io/v1/sessions/{sid}")[0] == 404
    finally:
        c.stop()


def _grant(env, sid):
    return [l for l in env.audit_lines() if l.get("session_id") == sid and l.get("resource") == "pods/exec"][-1]


def _node_end_of(env, cmd):
    """The node's session end record of the (unique) command: for local tickets, which have no grant."""
    return wait_for(lambda: [l for l in env.audit_lines() if l["event"] == "session_end" and
                             l.get("via") == "node" and l.get("command") == cmd], 15, f"the node's end of {cmd}")[-1]


def test_truncated_recording_is_marked_everywhere(env):
    """Namespace "tiny"'s rule has maxBytes 64 KiB: the grant's ticket
    carries it, the shim stops recording at it (the session itself goes on,
    every byte to the client), and the truncation is marked in the recording
    (a `truncated` marker, then only the terminal marker), in its metadata,
    in the node's end record and in play's closing note."""
    name = "tiny-" + uuid.uuid4().hex[:6]
    c = env.container(name, namespace="tiny")
    try:
        cmd = ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' y; echo; echo past-the-limit >&2; exit 5"]
        p = as_alice(env, "exec", "-n", "tiny", name, "--", *cmd)
        assert p.returncode == 5 and p.stdout == b"y" * 300000 + b"\n" and p.stderr == b"past-the-limit\n", \
            (p.returncode, len(p.stdout), p.stderr)
        sid = grant_sid(env, cmd)
        rec = _grant(env, sid)["recording"]
        assert rec["rule"] == "rule 2" and rec["max_bytes"] == TINY_MAX, rec
        meta = stored(env, sid)
        assert meta["truncated"] and meta["complete"] and meta["end"] == "end: exit code 5", meta
        assert meta["namespace"] == "tiny" and meta["bytes"] <= TINY_MAX, meta
        raw = export(env, sid)
        assert len(raw) == meta["bytes"]
        _, events = parse_cast(raw)
        marks = [i for i, (_, code, _) in enumerate(events) if code == "m"]
        assert len(marks) == 2 and marks[1] == len(events) - 1, events[-3:]
        cut = marks[0]
        assert events[cut][2] == f"truncated: the recording reached its limit of {TINY_MAX} bytes; " \
                                 "later events are not recorded", events[cut]
        assert events[-1][2] == "end: exit code 5", events[-1]
        # What was recorded is the start of the output, most of the limit's worth; nothing after the marker.
        out = stream(events[:cut], "o")
        assert TINY_MAX // 2 < len(out) < TINY_MAX and p.stdout.startswith(out), len(out)
        assert stream(events, "e") == b"", "stderr came after the limit"
        end = node_end(env, sid)
        assert end["recording"]["truncated"] and end["recording"]["complete"], end
        assert end["bytes_out"] == len(p.stdout) + len(p.stderr), end  # the session counted every byte
        # The player plays what is there and says it is cut.
        pl = as_alice(env, "sessions", "play", "--speed", "1000", sid)
        assert pl.returncode == 0 and pl.stdout == out, (pl.returncode, len(pl.stdout))
        assert pl.stderr == b"shimctl: the recording was truncated at its size limit\n", pl.stderr
        p = as_alice(env, "sessions", "list", "-n", "tiny")
        assert re.search(rb"^" + sid.encode() + rb" .* truncated\b", p.stdout, re.M), p.stdout
    finally:
        c.stop()


def test_tty_rule_records_tty_sessions_only(env):
    """`record: tty` (namespace "interactive", through the master) and the
    hook config's `local: tty` (shimctl --local): a tty exec is recorded, one
    without a tty is not (no claim in its ticket, no recording in its end
    record, nothing at the master)."""
    name = "inter-" + uuid.uuid4().hex[:6]
    c = env.container(name, namespace="interactive")
    cfg = env.path("hook-local-tty.json")
    write_config(env, cfg, {"dir": env.rec_root, "local": "tty"})
    lname = "ltty-" + uuid.uuid4().hex[:6]
    lc = env.container(lname, config=cfg)
    try:
        # Through the master.
        tty_cmd, plain_cmd = ["sh", "-c", "echo typed-" + name], ["sh", "-c", "echo piped-" + name]
        p = as_alice(env, "exec", "-t", "-n", "interactive", name, "--", *tty_cmd)
        assert p.returncode == 0 and p.stdout == f"typed-{name}\r\n".encode(), p.stderr
        p = as_alice(env, "exec", "-n", "interactive", name, "--", *plain_cmd)
        assert p.returncode == 0 and p.stdout == f"piped-{name}\n".encode(), p.stderr
        tty_sid, plain_sid = grant_sid(env, tty_cmd), grant_sid(env, plain_cmd)
        assert _grant(env, tty_sid)["recording"]["rule"] == "rule 3", _grant(env, tty_sid)  # "interactive"
        assert "recording" not in _grant(env, plain_sid), _grant(env, plain_sid)
        meta = stored(env, tty_sid)
        assert meta["tty"] and meta["complete"] and meta["namespace"] == "interactive", meta
        assert stream(parse_cast(export(env, tty_sid))[1], "o") == f"typed-{name}\r\n".encode()
        assert node_end(env, tty_sid)["recording"]["complete"]
        assert "recording" not in node_end(env, plain_sid)
        assert env.get(f"/apis/shimlet.io/v1/sessions/{plain_sid}")[0] == 404
        # shimctl --local, under the hook config's "local": "tty".
        local = [SHIMCTL, "--local", "--state-dir", env.state, "exec"]
        tty_cmd, plain_cmd = ["sh", "-c", "echo typed-" + lname], ["sh", "-c", "echo piped-" + lname]
        p = subprocess.run(local + ["-t", lc.id, "--", *tty_cmd], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=60)
        assert p.returncode == 0 and p.stdout == f"typed-{lname}\r\n".encode(), p.stderr
        p = subprocess.run(local + [lc.id, "--", *plain_cmd], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=60)
        assert p.returncode == 0 and p.stdout == f"piped-{lname}\n".encode(), p.stderr
        rec = _node_end_of(env, tty_cmd)["recording"]
        assert rec["complete"], rec
        meta = stored(env, rec["id"])
        assert meta["tty"] and meta["pod"] == lname, meta
        assert "recording" not in _node_end_of(env, plain_cmd)
        starts = [json.loads(l) for l in open(os.path.join(env.state, lc.id, "shim.log")) if '"recording.start"' in l]
        assert len(starts) == 1 and starts[0]["recording"] == rec["id"], starts
    finally:
        c.stop()
        lc.stop()


# ---------------------------------------------------------------- killed sessions

def _running(word):
    """A process whose command line has `word` (in any container: host /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if word.encode() in f.read():
                    return True
    return False


@pytest.mark.parametrize("victim", ["session", "shim", "container"])
def test_killed_session_recording_reaches_the_master_incomplete(env, victim):
    """The recording up to the kill reaches the master, marked incomplete:
    * session SIGKILLed, the container up: the container's renewer (every
      renew_interval_s, 1 s here) finishes the orphaned .rec and ships it;
    * shim SIGKILLed: every session ends when its shim exits (docs/design.md
      "Pre-authentication gate"): the session kills its command and closes
      its recording as incomplete itself, while the container runs on. No
      shim, no renewer: it waits in the node's outbox for the poststop;
    * container killed (no poststop yet): the shim's own cleanup ships it."""
    name = f"kill-{victim[:4]}-" + uuid.uuid4().hex[:6]
    c = env.container(name)
    word = f"before-the-{victim}-dies-{name}"
    cmd = ["sh", "-c", f"echo {word}; sleep 1000"]
    p = subprocess.Popen([SHIMCTL, "--kubeconfig", env.kc_alice, "exec", name, "--", *cmd],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HOME": env.home})
    try:
        assert p.stdout.readline() == f"{word}\n".encode()
        # The session process: it holds its provisional end record (and its recording).
        pid, _ = wait_for(lambda: _session_holding(os.path.join(env.state, c.id, "ends")), 5, "the session")
        # Killed once the writer thread has the line on disk (what is still in its
        # queue when a process is killed outright is lost: milliseconds of output).
        rec_dir = os.path.join(env.rec_root, c.id)
        on_disk = lambda: any(b'"o", "before-the-' in open(os.path.join(rec_dir, n), "rb").read()
                              for n in os.listdir(rec_dir) if n.endswith(".rec"))
        wait_for(on_disk, 5, "the output on the recording's disk")
        sid = grant_sid(env, cmd)
        if victim == "session":
            os.kill(pid, signal.SIGKILL)
            assert p.wait(timeout=15) != 0
            meta = stored(env, sid)  # renew_interval_s is 1: a thirtieth of the bound
            assert meta["end"].startswith("incomplete: the session ended without closing its recording"), meta
        elif victim == "shim":
            os.kill(env.registration(c.id)["shim_pid"], signal.SIGKILL)
            assert p.wait(timeout=15) != 0
            wait_for(lambda: not alive(pid), 5, "the session's end")
            wait_for(lambda: not _running(word), 5, "the command killed with its session")
            assert c.state()["status"] == "running"
            cast = os.path.join(rec_dir, sid + ".cast")
            wait_for(lambda: os.path.exists(cast), 5, "the recording closed by its session")
            _, events = parse_cast(open(cast, "rb").read())
            assert events[-1][1:] == ["m", "incomplete: session terminated: its shim exited"], events[-1]
        else:
            c.runc("kill", c.id, "KILL")
            assert p.wait(timeout=15) != 0
            # No poststop yet: the shim's own `shimlet-hook cleanup` (its
            # container gone) finishes the recording and sends it.
            meta = stored(env, sid)
            assert meta["end"].startswith("incomplete: the container exited during the session"), meta
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        c.stop()  # poststop: sends what is left (a second cleanup: idempotent)
    meta = stored(env, sid)
    assert not meta["complete"] and meta["end"].startswith("incomplete: "), meta
    _, events = parse_cast(export(env, sid))
    assert stream(events, "o") == f"{word}\n".encode(), events
    # Sent by poststop, or (when it ran out of time) by a renewer sweeping gone containers.
    wait_for(lambda: not os.path.exists(os.path.join(env.rec_root, c.id)), 10, "the container's spool removed")


# ---------------------------------------------------------------- disk full

@pytest.fixture
def small_disk(env):
    """The node's recording root on a 1 MiB tmpfs, and a container using it."""
    mnt = tempfile.mkdtemp(prefix="rec-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", mnt], check=True)
    c = None
    try:
        cfg = env.path("hook-small-disk.json")
        write_config(env, cfg, {"dir": mnt})
        name = "full-" + uuid.uuid4().hex[:6]
        c = env.container(name, config=cfg)
        c.pod, c.mnt = name, mnt
        yield c
    finally:
        if c:
            c.stop()
        subprocess.run(["umount", "-l", mnt], check=False)
        os.rmdir(mnt)


def test_disk_full_policies(env, small_disk):
    c = small_disk
    two_mb = ["sh", "-c", "head -c 2000000 /dev/zero | tr '\\0' x; echo; echo done"]
    # fail-closed (alice): the session ends with a clear message. 8 MB: more
    # than the writer's backlog at which the engine stops reading output, so
    # the command cannot end before the writer has met the full disk.
    eight_mb = ["sh", "-c", "head -c 8000000 /dev/zero | tr '\\0' x; echo; echo done"]
    p = as_alice(env, "exec", c.pod, "--", *eight_mb)
    assert p.returncode == 254, (p.returncode, p.stderr)
    assert b"recording" in p.stderr and b"No space left on device" in p.stderr, p.stderr
    assert len(p.stdout) < 8000000
    meta = stored(env, grant_sid(env, eight_mb), c=c)  # what was written reaches the master, incomplete
    assert not meta["complete"], meta
    # fail-open (carol): the session goes on, unrecorded past the failure.
    wait_for(lambda: not os.listdir(os.path.join(c.mnt, c.id)), 15, "the small disk emptied")
    cmd = two_mb[:2] + [two_mb[2] + " "]  # another command line, to find its grant
    p = env.shimctl("--kubeconfig", env.kc_carol, "exec", c.pod, "--", *cmd)
    assert p.returncode == 0 and p.stdout.endswith(b"done\n") and len(p.stdout) == 2000006, p.stderr
    meta = stored(env, grant_sid(env, cmd), c=c)
    assert not meta["complete"] and meta["user"] == "carol", meta
    log = open(os.path.join(env.state, c.id, "shim.log")).read()
    assert "recording.failed" in log, log[-2000:]
    # fail-closed when the disk is full before the command starts: it never runs.
    wait_for(lambda: not os.listdir(os.path.join(c.mnt, c.id)), 15, "the small disk emptied")
    filler = os.path.join(c.mnt, "filler")
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4096"], stderr=subprocess.DEVNULL)
    try:
        cmd = ["sh", "-c", "touch /ran; echo ran"]
        p = as_alice(env, "exec", c.pod, "--", *cmd)
        assert p.returncode == 254 and p.stdout == b"", (p.returncode, p.stdout, p.stderr)
        assert b"recording" in p.stderr, p.stderr
        assert c.exec("test", "-e", "/ran").returncode == 1, "the command ran"
    finally:
        os.unlink(filler)
    # fail-closed when the disk fills after the command's output is on disk
    # and only its end is left to write: the command exits 0, but the session
    # does not report success for an incomplete recording (exit 254).
    _disk_full_at_the_end(env, c, filler)


def _disk_full_at_the_end(env, c, filler):
    spool = os.path.join(c.mnt, c.id)
    wait_for(lambda: not os.listdir(spool), 15, "the small disk emptied")
    # The command prints "a", then N bytes (N from /n: the recording file then
    # ends 6 bytes short of a page, too few for its end marker), then waits
    # for /go and exits 0 without output.
    cmd = ["sh", "-c", 'echo a; while [ ! -e /n ]; do sleep 0.02; done; printf "%0$(cat /n)d" 0; '
           'while [ ! -e /go ]; do sleep 0.02; done']
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(as_alice, env, "exec", c.pod, "--", *cmd)
        try:
            def first_event():
                recs = [f for f in os.listdir(spool) if f.endswith(".rec")]
                if len(recs) != 1:
                    return None
                with open(os.path.join(spool, recs[0]), "rb") as f:
                    raw = f.read()
                return (recs[0], raw) if raw.endswith(b', "o", "a\\n"]\n') else None
            name, raw = wait_for(first_event, 15, "the recording's first event on disk")
            t = raw.rsplit(b"\n", 2)[-2][1:].split(b",")[0]  # the event's time, as the writer formats it
            page, slack = 4096, 6
            # [T, "o", "0...0"]\n: 12 bytes and the time's around the N bytes.
            n = (page - slack - (len(raw) + 12 + len(t))) % page or page
            assert c.exec("sh", "-c", f"echo {n} > /n.tmp && mv /n.tmp /n").returncode == 0
            path = os.path.join(spool, name)
            wait_for(lambda: os.path.getsize(path) % page == page - slack, 15, "the output on disk, a page less 6")
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4096"], stderr=subprocess.DEVNULL)
            assert c.exec("touch", "/go").returncode == 0
            p = fut.result(timeout=60)
        finally:
            c.exec("touch", "/n", "/go")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(filler)
    assert p.returncode == 254, (p.returncode, p.stderr)
    assert b"recording cannot be written" in p.stderr and b"own status (exit code 0) is withheld" in p.stderr, p.stderr
    assert p.stdout == b"a\n" + b"0" * n, p.stdout[:100]
    meta = stored(env, grant_sid(env, cmd), c=c)
    assert not meta["complete"], meta


def _spool_usage(root):
    """What recording/spool.h's usage() counts: the regular files of root/*/*."""
    total = 0
    for d in os.listdir(root) if os.path.isdir(root) else ():  # made by the first recording
        for n in os.listdir(os.path.join(root, d)):
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(root, d, n))
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def test_outbox_bound_refuses_new_recordings_and_drops_none(env):
    """spool_max_bytes (1 MiB, its minimum) reached by a live recording that
    cannot be shipped yet: a new recorded exec fails as on a full disk
    (fail-closed: refused before its command runs; fail-open: runs
    unrecorded, the end record says why); the recording that holds the
    outbox is never dropped to make room, reaches the master whole, and once
    it has gone new recordings start again."""
    spool = env.path("rec-spool-bound")
    cfg = env.path("hook-spool-bound.json")
    write_config(env, cfg, {"dir": spool, "spool_max_bytes": 1 << 20})
    name = "spool-" + uuid.uuid4().hex[:6]
    c = env.container(name, config=cfg)
    try:
        big = ["sh", "-c", f": {name}; head -c 1200000 /dev/zero | tr '\\0' a; echo; "
               "while [ ! -e /release ]; do sleep 0.05; done; echo released"]
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(as_alice, env, "exec", name, "--", *big)
            try:
                wait_for(lambda: _spool_usage(spool) >= 1 << 20, 20, "the outbox above its bound")
                # fail-closed (alice): refused before anything runs.
                cmd = ["sh", "-c", "touch /ran; echo ran"]
                p = as_alice(env, "exec", name, "--", *cmd)
                assert p.returncode == 254 and p.stdout == b"", (p.returncode, p.stdout, p.stderr)
                assert b"recording cannot be written" in p.stderr and b"outbox is full" in p.stderr, p.stderr
                assert c.exec("test", "-e", "/ran").returncode == 1, "the command ran"
                end = node_end(env, grant_sid(env, cmd))
                assert "outbox is full" in end["recording"]["error"], end
                # fail-open (carol): runs, unrecorded.
                cmd = ["sh", "-c", "echo unrecorded"]
                p = env.shimctl("--kubeconfig", env.kc_carol, "exec", name, "--", *cmd)
                assert p.returncode == 0 and p.stdout == b"unrecorded\n", p.stderr
                sid = grant_sid(env, cmd)
                end = node_end(env, sid)
                assert "outbox is full" in end["recording"]["error"] and end["exit_code"] == 0, end
                assert env.get(f"/apis/shimlet.io/v1/sessions/{sid}")[0] == 404
            finally:
                c.exec("touch", "/release")
                held = fut.result(timeout=60)
        # The recording that held the outbox: whole at the master.
        assert held.returncode == 0 and held.stdout == b"a" * 1200000 + b"\nreleased\n", held.stderr
        meta = stored(env, grant_sid(env, big))
        assert meta["complete"] and not meta["truncated"] and meta["out_bytes"] == len(held.stdout), meta
        # Shipped and deleted: the outbox has room again.
        wait_for(lambda: _spool_usage(spool) == 0, 15, "the outbox emptied")
        cmd = ["sh", "-c", "echo recorded-again"]
        p = as_alice(env, "exec", name, "--", *cmd)
        assert p.returncode == 0 and p.stdout == b"recorded-again\n", p.stderr
        assert stored(env, grant_sid(env, cmd))["complete"]
    finally:
        c.stop()


# ---------------------------------------------------------------- RBAC and audit

def test_reading_recordings_needs_rbac_and_is_audited(env, pod):
    cmd = ["sh", "-c", "echo for-the-record"]
    assert as_alice(env, "exec", pod.pod, "--", *cmd).returncode == 0
    sid = grant_sid(env, cmd)
    stored(env, sid)
    # alice: list (all namespaces, filtered), get.
    p = as_alice(env, "sessions", "list", "--user", "alice", "-o", "json")
    assert p.returncode == 0, p.stderr
    items = json.loads(p.stdout)["items"]
    assert sid in [i["id"] for i in items] and {i["user"] for i in items} == {"alice"}, items
    p = as_alice(env, "sessions", "list")
    assert p.returncode == 0 and re.search(rb"^" + sid.encode() + rb" +default +" + pod.pod.encode(), p.stdout,
                                          re.M), p.stdout
    # carol: only in "default".
    carol = ["--kubeconfig", env.kc_carol]
    assert env.shimctl(*carol, "sessions", "list", "-n", "default").returncode == 0
    p = env.shimctl(*carol, "sessions", "list")
    assert p.returncode == 255 and b"cannot list resource \"sessions\"" in p.stderr, p.stderr
    assert env.shimctl(*carol, "sessions", "export", sid).returncode == 0
    # dave: nothing, and no way to tell a real id from a made-up one.
    dave = ["--server", env.url, "--certificate-authority", env.ca, "--token", TOKENS["dave"]]
    for args in (["list"], ["list", "-n", "default"], ["play", sid], ["export", sid], ["export", "no-such-id"]):
        p = env.shimctl(*dave, "sessions", *args)
        assert p.returncode == 255 and b"forbidden" in p.stderr, (args, p.stderr)
    lines = [l for l in env.audit_lines() if l.get("resource") == "sessions"]
    assert [l for l in lines if l["user"] == "dave" and l["verb"] == "list" and l["decision"] == "deny"], lines
    assert [l for l in lines if l["user"] == "dave" and l["verb"] == "get" and l.get("session") == sid and
            l["decision"] == "deny"], lines
    ok = [l for l in lines if l["user"] == "alice" and l["verb"] == "list" and l["decision"] == "allow"]
    assert ok and ok[-1]["count"] >= 1 and ok[-1]["code"] == 200, ok
    # The upload itself is the node's, and only the node's.
    st, _ = env.get(f"/apis/shimlet.io/v1/nodes/{NODE}/recordings/{sid}")
    assert st == 405


def _fds_under(pid, prefix):
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
                if t.startswith(prefix):
                    out.append(t)
    return out


def _procs(comm_prefix):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if open(f"/proc/{pid}/comm").read().startswith(comm_prefix):
                yield int(pid)


def _tcp_sockets(pid):
    """{inode: state} of the process's TCP sockets ("0A" listening, "01" established)."""
    states = {}
    for f in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{f}") as t:
            for line in t.readlines()[1:]:
                cols = line.split()
                states[cols[9]] = cols[3]
    mine = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            m = re.match(r"socket:\[(\d+)\]$", os.readlink(f"/proc/{pid}/fd/{fd}"))
            if m and m.group(1) in states:
                mine[m.group(1)] = states[m.group(1)]
    return mine


def test_local_tickets_record_on_every_door(env):
    """`shimctl --local` tickets carry no claim: the hook config's
    recording.local decides, on the local socket and on the TCP doors behind
    the pre-authentication gate (WebSocket, SPDY; the native h2 door is the
    master tests' above). The recording is the session's own: made after the
    gate admitted the connection, never in the gate, and the session holds
    no descriptor of the gate's (its one TCP socket is its connection). Every
    recording reaches the master."""
    import test_k8s_spdy
    import test_k8s_ws
    cfg = env.path("hook-local-all.json")
    write_config(env, cfg, {"dir": env.rec_root, "local": "all"})
    name = "local-" + uuid.uuid4().hex[:6]
    c = env.container(name, config=cfg)
    rec_dir = os.path.join(env.rec_root, c.id)
    outputs = {}
    try:
        # The local socket.
        cmd = ["sh", "-c", "echo recorded-locally-" + name]
        p = subprocess.run([SHIMCTL, "--local", "--state-dir", env.state, "exec", c.id, "--", *cmd],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr
        outputs[tuple(cmd)] = p.stdout
        # WebSocket, held open while the session's descriptors are looked at.
        cmd = ["sh", "-c", "echo ws-ready; read x; echo ws-got-$x"]
        t = test_k8s_ws.mint(env, c, cmd, stdin=True)
        st, _, body, ws = test_k8s_ws.ws_open(env, c, f"/exec/{t}")
        assert st == 101, body
        out = b""
        while b"ws-ready\n" not in out:
            op, m = ws.recv_message()
            assert m[0] == 1, m
            out += m[1:]
        # Its session holds its recording (and its connection, established, no listener) ...
        sess = [pid for pid in _procs("shimlet-sess") if _fds_under(pid, rec_dir + "/")]
        assert len(sess) == 1, sess
        assert [n for n in _fds_under(sess[0], rec_dir + "/") if n.endswith(".rec")], "no .rec held"
        assert list(_tcp_sockets(sess[0]).values()) == ["01"], _tcp_sockets(sess[0])
        # ... and no gate holds any recording.
        assert not [pid for pid in _procs("shimlet-gate") if _fds_under(pid, env.rec_root + "/")]
        o, e, status = test_k8s_ws.run_exec(ws, [b"go\n"])
        assert status["status"] == "Success" and e == b"", (status, e)
        outputs[tuple(cmd)] = out + o
        assert outputs[tuple(cmd)] == b"ws-ready\nws-got-go\n"
        # SPDY (the CRI streaming shape: the ticket in the path).
        cmd = ["sh", "-c", "echo over-spdy; echo spdy-err >&2"]
        o, e, st, _ = test_k8s_spdy.spdy_exec(env, c, cmd, shape="cri")
        assert o == b"over-spdy\n" and e == b"spdy-err\n" and json.loads(st)["status"] == "Success", (o, e, st)
        outputs[tuple(cmd)] = o
        # Every one at the master, complete, with the output the client saw.
        for cmd, want in outputs.items():
            mine = lambda: [i for i in json.loads(as_alice(env, "sessions", "list", "-o", "json").stdout)["items"]
                            if i["command"] == list(cmd)]
            meta = wait_for(mine, 30, f"the recording of {cmd} at the master", interval=0.3)[0]
            assert meta["complete"] and meta["pod"] == name and meta["user"] != "alice", meta
            _, events = parse_cast(export(env, meta["id"]))
            assert stream(events, "o") == want, (cmd, events)
        assert stream(events, "e") == b"spdy-err\n", events
    finally:
        c.stop()


def test_local_recorded_relay_delivers_every_byte(env):
    """A recorded non-tty `shimctl --local` exec keeps the client's own
    stdout/stderr (the session relays them: tee into the recording, splice
    to the client, session/session_exec.h). Stdout redirected to a file, a
    file opened for append, a pipe and a socket: every byte reaches it, the
    recording reassembles to the same bytes, stderr stays separate, the exit
    code is the command's."""
    cfg = env.path("hook-local-relay.json")
    write_config(env, cfg, {"dir": env.rec_root, "local": "all"})
    name = "relay-" + uuid.uuid4().hex[:6]
    c = env.container(name, config=cfg)
    tmp = tempfile.mkdtemp(prefix="relay-")
    try:
        base = [SHIMCTL, "--local", "--state-dir", env.state, "exec", c.id, "--"]
        results = {}
        for kind in ("file", "append", "pipe", "socket"):
            # Output on both streams, interleaved; stderr in pieces.
            script = (f": {kind}; i=0; while [ $i -lt 3 ]; do head -c 3000000 /dev/urandom; "
                      "echo err-$i >&2; i=$((i+1)); done; exit 3")
            cmd = ["sh", "-c", script]
            out_path = os.path.join(tmp, kind + ".out")
            prefix = b"kept before the exec\n" if kind == "append" else b""
            with open(out_path, "wb") as f:
                f.write(prefix)
            if kind in ("file", "append"):
                with open(out_path, "ab" if kind == "append" else "r+b") as f:
                    p = subprocess.run(base + cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE,
                                       timeout=120)
                with open(out_path, "rb") as f:
                    got = f.read()
                assert got.startswith(prefix), got[:100]
                got = got[len(prefix):]
                err = p.stderr
            elif kind == "pipe":
                p = subprocess.run(base + cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
                got, err = p.stdout, p.stderr
            else:
                a, b = socket.socketpair()
                chunks = []
                def drain():
                    while (d := b.recv(1 << 16)):
                        chunks.append(d)
                th = threading.Thread(target=drain)
                th.start()
                p = subprocess.run(base + cmd, stdin=subprocess.DEVNULL, stdout=a.fileno(), stderr=subprocess.PIPE,
                                   timeout=120)
                a.close()
                th.join(60)
                b.close()
                got, err = b"".join(chunks), p.stderr
            assert p.returncode == 3, (kind, p.stderr[-300:])
            assert len(got) == 9000000, (kind, len(got))
            assert err == b"err-0\nerr-1\nerr-2\n", (kind, err)
            results[kind] = (cmd, hashlib.sha256(got).hexdigest(), err)
        # The session relayed (its audit line), and did not fall back to the copy path.
        log = open(os.path.join(env.state, c.id, "shim.log")).read()
        starts = [json.loads(l) for l in log.splitlines() if '"exec.start"' in l]
        assert sum(1 for s in starts if s.get("stdio") == "relay") >= 4, starts[-4:]
        for kind, (cmd, digest, err) in results.items():
            mine = lambda: [i for i in json.loads(as_alice(env, "sessions", "list", "-o", "json").stdout)["items"]
                            if i["command"] == cmd]
            meta = wait_for(mine, 60, f"the recording of {kind} at the master", interval=0.3)[0]
            assert meta["complete"] and not meta["truncated"], meta
            _, events = parse_cast(export(env, meta["id"]))
            assert hashlib.sha256(stream(events, "o")).hexdigest() == digest, kind
            assert stream(events, "e") == err, kind
            assert events[-1][1:] == ["m", "end: exit code 3"], events[-1]
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_local_recorded_relay_never_blocks_on_the_client(env):
    """A relayed recorded exec whose stdout pipe nobody reads waits (never
    a gap), and killing shimctl still ends the session: its command dies and
    the recording ends incomplete."""
    cfg = env.path("hook-local-relay-kill.json")
    write_config(env, cfg, {"dir": env.rec_root, "local": "all"})
    name = "relaykill-" + uuid.uuid4().hex[:6]
    c = env.container(name, config=cfg)
    r, w = os.pipe()
    try:
        cmd = ["sh", "-c", f": {name}; head -c 50000000 /dev/zero; echo done"]
        p = subprocess.Popen([SHIMCTL, "--local", "--state-dir", env.state, "exec", c.id, "--", *cmd],
                             stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE)
        os.close(w)
        w = -1
        # The command fills the pipes (ours is 1 MiB at most) and waits: with
        # the pipe half full and nobody reading, 50 MB cannot have gone through.
        wait_for(lambda: '"relay"' in open(os.path.join(env.state, c.id, "shim.log")).read(), 15, "the relay")

        def queued():
            return struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0" * 4))[0]
        wait_for(lambda: queued() > fcntl.fcntl(r, F_GETPIPE_SZ) // 2, 15, "the client's pipe half full")
        assert p.poll() is None
        p.kill()
        p.wait(10)
        mine = lambda: [i for i in json.loads(as_alice(env, "sessions", "list", "-o", "json").stdout)["items"]
                        if i["command"] == cmd]
        meta = wait_for(mine, 30, "the recording at the master", interval=0.3)[0]
        assert not meta["complete"], meta
        _, events = parse_cast(export(env, meta["id"]))
        out = stream(events, "o")
        assert 0 < len(out) < 50000000 and set(out) == {0}, len(out)
        assert events[-1][1] == "m" and events[-1][2].startswith("incomplete: "), events[-1]
        # A byte reaches the client only once it is recorded; the recording may
        # hold at most the one chunk (256 KiB) that was waiting for the client.
        os.set_blocking(r, False)
        got = 0
        with contextlib.suppress(BlockingIOError):
            while (d := os.read(r, 1 << 20)):
                got += len(d)
        assert 0 < got <= len(out) <= got + (256 << 10), (got, len(out))
        # The command is gone with the session.
        wait_for(lambda: not _running(name), 15, "the command killed with its session")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        c.stop()


# ---------------------------------------------------------------- a slow master

class SlowProxy:
    """A TCP proxy on 127.0.0.1 to a master that is slow to answer: what the
    node sends goes straight through, and so does the master's first flight
    on each connection (its TLS handshake); every later chunk from the master
    (its HTTP answer) is held for `delay` seconds (a delay line: latency, not
    a bandwidth cap; order kept). TLS passes through untouched. The hook makes
    one connection per request (Connection: close): each request takes
    `delay` more. Set `delay` at any time: it applies to the chunks read from
    then on."""

    def __init__(self, upstream_port):
        self.upstream = upstream_port
        self.delay = 0.0
        self.connections = 0
        self._socks = []
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self):
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self._lock:
                if self._closed:
                    down.close()
                    up.close()
                    return
                self._socks += [down, up]
                self.connections += 1
            ends = [2]  # both directions done: the sockets are closed
            for src, dst, slow in ((down, up, False), (up, down, True)):
                q = queue.Queue()
                threading.Thread(target=self._read, args=(src, q, slow), daemon=True).start()
                threading.Thread(target=self._write, args=(q, dst, (down, up), ends), daemon=True).start()

    def _read(self, src, q, slow):
        first = True
        while True:
            try:
                d = src.recv(1 << 16)
            except OSError:
                d = b""
            q.put((time.monotonic() + (self.delay if slow and not first else 0), d))
            first = False
            if not d:
                return

    def _write(self, q, dst, pair, ends):
        while True:
            due, d = q.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                if not d:
                    dst.shutdown(socket.SHUT_WR)
                    break
                dst.sendall(d)
            except OSError:
                break
        with self._lock:
            ends[0] -= 1
            if ends[0] == 0:
                for s in pair:
                    s.close()
                    with contextlib.suppress(ValueError):
                        self._socks.remove(s)

    def close(self):
        with self._lock:
            self._closed = True
            socks, self._socks = self._socks, []
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (close alone does not)
        self._acceptor.join(5)
        self._listener.close()
        for s in socks:  # wakes their readers: each pump thread ends
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class Watch:
    """Samples pred() every `interval` seconds in a thread until stop(); `misses` lists the times it was false."""

    def __init__(self, pred, interval=0.25):
        self.samples, self.misses = 0, []
        self._stop = threading.Event()
        self._pred, self._interval = pred, interval
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(self._interval):
            ok = False
            with contextlib.suppress(Exception):
                ok = self._pred()
            self.samples += 1
            if not ok:
                self.misses.append(time.monotonic())

    def stop(self):
        self._stop.set()
        self._t.join(10)


# The slow master: each of its answers held SLOW_DELAY_S, so every request of
# the hook takes longer than renew_interval_s (1 s). The hook's timeout_ms
# fits it, and the lease (the master's) outlasts the longest gap between two
# renewals' PUTs: a renewer runs at most its deadline (timeout_ms + 6 s),
# then the next tick and its PUT.
SLOW_DELAY_S = 1.5
SLOW_TIMEOUT_MS = 20000
SLOW_LEASE_S = 40


@pytest.fixture
def slow_master():
    files = tempfile.mkdtemp(prefix="rec-slow-files-")
    e = proxy = None
    try:
        e = _recording_env(files, lease_s=SLOW_LEASE_S)
        proxy = SlowProxy(e.port)
        yield e, proxy
    finally:
        if proxy:
            proxy.delay = 0  # the containers' poststop goes through it
        if e:
            e.cleanup()
        if proxy:
            proxy.close()
        shutil.rmtree(files, ignore_errors=True)


def _puts(env, cid):
    """The master's audit of the container's registration PUTs (201 registered, 200 renewed)."""
    return [l for l in env.audit_lines() if l.get("method") == "PUT" and l.get("container_id") == cid]


@pytest.mark.xdist_group("recording-slow-master")
def test_slow_master_renewals_wait_and_catch_up(slow_master):
    """The hook talks to the master through a proxy that holds each answer
    1.5 s: every renewal outlasts renew_interval_s. The shim leaves the
    running renewal to finish and skips the ticks meanwhile (never kills it),
    so renewals still reach the master: the container stays registered all
    along (exec through the master works), the session end records and a
    2 MB recording (four 512 KiB upload chunks) reach the master whole. Once
    the master is fast again, what piled up meanwhile arrives at once and
    renewals are back to one a second."""
    env, proxy = slow_master
    cfg = env.path("hook-slow.json")
    write_config(env, cfg, {"dir": env.rec_root}, url=proxy.url, timeout_ms=SLOW_TIMEOUT_MS)
    name = "slow-" + uuid.uuid4().hex[:6]
    c = env.container(name, config=cfg)
    shim_log = os.path.join(env.state, c.id, "shim.log")
    log = lambda: open(shim_log).read()
    registered = lambda: name in env.pods()
    watch = None
    try:
        wait_for(registered, 5, "the registration through the proxy")
        wait_for(lambda: any(l["code"] == 200 for l in _puts(env, c.id)), 5, "a renewal through the proxy")
        renewals = lambda: len([l for l in _puts(env, c.id) if l["code"] == 200])
        proxy.delay = SLOW_DELAY_S
        slow_since, renewed = time.monotonic(), renewals()
        watch = Watch(registered)  # the master's own view, straight from it (not through the proxy)

        def run(cmd, want):
            p = as_alice(env, "exec", name, "--", *cmd)
            assert p.returncode == 0 and p.stdout == want, (p.returncode, p.stdout[-100:], p.stderr)
            return grant_sid(env, cmd)

        small = ["sh", "-c", f": {name}; echo small"]
        big = ["sh", "-c", f": {name}; head -c 2000000 /dev/zero | tr '\\0' r; echo"]
        big_out = b"r" * 2000000 + b"\n"
        small_sid, big_sid = run(small, b"small\n"), run(big, big_out)
        # The slow renewals: ticks skipped while one runs, none killed.
        wait_for(lambda: "previous lease renewal still running, this one skipped" in log(), 10,
                 "a tick skipped while a renewal runs")
        # Through the slow master, whole: both end records and the recording.
        for sid in (small_sid, big_sid):
            wait_for(lambda: [l for l in env.audit_lines() if l["event"] == "session_end" and
                              l.get("session_id") == sid and l.get("via") == "node"], 40,
                     f"the node's session end {sid} through the slow master", interval=0.2)
        meta = stored(env, big_sid, timeout=40, c=c)
        slow_for = time.monotonic() - slow_since
        assert meta["complete"] and meta["out_bytes"] == len(big_out), meta
        assert meta["bytes"] > 3 * 512 * 1024, meta  # four upload chunks at least
        _, events = parse_cast(export(env, big_sid))
        assert stream(events, "o") == big_out
        assert stored(env, small_sid)["complete"]
        # Renewals went through the slow master, and the lease never lapsed.
        assert renewals() > renewed
        puts = _puts(env, c.id)
        assert [l["code"] for l in puts].count(201) == 1, puts  # registered once: never re-registered
        assert not [l for l in env.audit_lines() if l["event"] == "lease_expired"]
        assert watch.samples >= slow_for / 0.5 and not watch.misses, (watch.samples, watch.misses)

        # A backlog made while slow: another end record and recording, behind
        # a renewal slow enough to skip a tick. Still slow, they would take a
        # renewer 10.5 s (its PUT, the end record, a probe and four chunks: 7
        # requests of 1.5 s), and PUTs would come every 2.5 s at best (a PUT,
        # then the next tick). Then the master is fast again.
        skipped = lambda: log().count("previous lease renewal still running, this one skipped")
        n = skipped()
        again = ["sh", "-c", f": {name}; head -c 2000000 /dev/zero | tr '\\0' a; echo"]
        again_sid = run(again, b"a" * 2000000 + b"\n")
        wait_for(lambda: skipped() > n, 10, "a slow renewal with the backlog pending")
        assert env.get(f"/apis/shimlet.io/v1/sessions/{again_sid}")[0] == 404, "not a backlog"
        proxy.delay = 0
        t0 = time.monotonic()
        assert stored(env, again_sid, timeout=7, c=c)["complete"]
        node_end(env, again_sid)
        caught_up = time.monotonic() - t0
        renewed = renewals()
        wait_for(lambda: renewals() >= renewed + 4, 6, "renewals once a second again")
        wait_for(lambda: not os.listdir(os.path.join(env.rec_root, c.id)), 5, "the node's spool emptied")
        wait_for(lambda: not os.listdir(os.path.join(env.state, c.id, "ends")), 5, "the end records' outbox emptied")
        watch.stop()
        assert not watch.misses, watch.misses
        lines = log()
        assert "lease renewal hung, killing it" not in lines, lines[-3000:]
        assert proxy.connections >= 10, proxy.connections  # the hook did go through the proxy
        print(f"slow phase {slow_for:.1f} s, caught up in {caught_up:.1f} s, {skipped()} renewals skipped ticks")
    finally:
        if watch:
            watch.stop()
        proxy.delay = 0
        c.stop()
