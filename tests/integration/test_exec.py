"""shimctl exec end to end: real runc containers with shimlet-hook as their
createRuntime/poststop hook, the real shim and shimlet-session, and
`shimctl --local` minting tickets with the state dir's local.key."""
import contextlib
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import termios
import time
import uuid

import pytest

from containers import BIN, Container, alive, run, wait_for

HOOK = os.path.join(BIN, "shimlet-hook")
SHIMCTL = os.path.join(BIN, "shimctl")
SEQ_N = 2000000
F_GETPIPE_SZ = 1032  # fcntl.F_GETPIPE_SZ (Python 3.10+; named here for older ones)


def pids_with_cmdline(needle):
    """Host pids whose argv contains the exact argument `needle` (bytes)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if needle in f.read().split(b"\0") and alive(int(p)):
                    out.append(int(p))
    return out


def kill_cmdline(needle, timeout=10, appear=False):
    """SIGKILL every process with the argument `needle` until none is left;
    with appear, first wait until one exists: `sh -c 'echo ready; sleep N'`
    may be seen after its echo and before it forked the sleep."""
    if appear:
        wait_for(lambda: pids_with_cmdline(needle), timeout, f"a process with {needle!r} in its argv")

    def gone():
        pids = pids_with_cmdline(needle)
        for x in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(x, signal.SIGKILL)
        return not pids
    wait_for(gone, timeout, f"every process with {needle!r} in its argv to die")


class ShimEnv:
    """A private hook config + state dir, and containers hooked to it."""

    def __init__(self, **cfg):
        """cfg: more hook config keys."""
        for b in (HOOK, SHIMCTL, os.path.join(BIN, "shimlet"), os.path.join(BIN, "shimlet-session")):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} missing: build first (scripts/build)")
        self.dir = tempfile.mkdtemp(prefix="shimlet-cli-")
        self.state = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "hook.json")
        with open(self.config, "w") as f:
            json.dump({"state_dir": self.state, "fail_container_on_error": True, **cfg}, f)
        self.containers = []

    def hooks(self):
        entry = lambda stage: [{"path": HOOK, "args": ["shimlet-hook", "--config", self.config, stage]}]
        return {"createRuntime": entry("createRuntime"), "poststop": entry("poststop")}

    def container(self, annotations=None, **kw):
        def edit(cfg):
            if annotations:
                cfg["annotations"] = dict(annotations)

        c = Container(hooks=self.hooks(), edit=edit, **kw)
        self.containers.append(c)
        c.start()
        reg = os.path.join(self.state, c.id, "registration.json")
        wait_for(lambda: os.path.exists(reg), 5, f"registration of {c.id}")
        return c

    def registration(self, cid):
        with open(os.path.join(self.state, cid, "registration.json")) as f:
            return json.load(f)

    def shimctl(self, *args, state_dir=None, tls=False, **kw):
        """--local: the shim's root-only unix socket; tls=True: its TLS port."""
        return [SHIMCTL, "--local", *(["--tls"] if tls else []), "--state-dir", state_dir or self.state, *args]

    def cleanup(self):
        for c in self.containers:
            with contextlib.suppress(Exception):
                c.cleanup()
        # A shim that outlived its container (hook failure) dies with the test.
        if os.path.isdir(self.state):
            for cid in os.listdir(self.state):
                with contextlib.suppress(Exception):
                    pid = self.registration(cid)["shim_pid"]
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if self.state.encode() in f.read():
                            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def env():
    e = ShimEnv()
    try:
        yield e
    finally:
        e.cleanup()


@pytest.fixture(scope="module")
def ctr(env):
    return env.container()


def shimctl(env, *args, timeout=60, state_dir=None, tls=False, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(env.shimctl(*args, state_dir=state_dir, tls=tls), timeout=timeout, **kw)


# The byte-exactness tests run over both transports of `--local`: the shim's
# local socket (HTTP/2 without TLS, the default) and its TLS port (--tls).
TRANSPORTS = pytest.mark.parametrize("tls", [False, True], ids=["unix", "tls"])
# The long transfers run in a worker of their own (tests/integration/conftest.py).
BULK = pytest.mark.xdist_group("exec-bulk")


def seq_bytes(n, eol=b"\n"):
    return eol.join(str(i).encode() for i in range(1, n + 1)) + eol


class Pty:
    """shimctl under a pty we own, as its controlling terminal, with a set size."""

    def __init__(self, argv, rows, cols):
        self.master, slave = os.openpty()
        self.set_size(rows, cols, fd=slave)

        def ctty():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     preexec_fn=ctty)
        os.close(slave)
        self.out = b""

    def set_size(self, rows, cols, fd=None):
        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def read_until(self, pred, timeout=10):
        deadline = time.time() + timeout
        while not pred(self.out):
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"timed out; pty output so far: {self.out!r}")
            r, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if r:
                try:
                    d = os.read(self.master, 65536)
                except OSError:  # EIO: every slave fd closed
                    d = b""
                if not d:
                    if not pred(self.out):
                        raise AssertionError(f"pty closed; output: {self.out!r}")
                    break
                self.out += d
        return self.out

    def wait(self, timeout=20):
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.close()

    def close(self):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            os.close(self.master)


# ---- output integrity ----

@BULK
@TRANSPORTS
def test_seq_pipe_mode_byte_exact(env, ctr, tls):
    p = shimctl(env, "exec", ctr.id, "--", "seq", "1", str(SEQ_N), tls=tls)
    assert p.returncode == 0, p.stderr
    want = seq_bytes(SEQ_N)
    assert len(p.stdout) == len(want)
    assert hashlib.sha256(p.stdout).hexdigest() == hashlib.sha256(want).hexdigest()
    assert p.stderr == b""


@BULK
@TRANSPORTS
def test_seq_tty_mode_byte_exact(env, ctr, tls):
    # The container's pty turns \n into \r\n (onlcr); nothing else may change.
    p = shimctl(env, "exec", "-t", ctr.id, "--", "seq", "1", str(SEQ_N), tls=tls)
    assert p.returncode == 0, p.stderr
    want = seq_bytes(SEQ_N, b"\r\n")
    assert len(p.stdout) == len(want)
    assert hashlib.sha256(p.stdout).hexdigest() == hashlib.sha256(want).hexdigest()


def test_seq_tty_raw_under_local_pty(env, ctr):
    # shimctl in raw mode on a real local tty, the remote side raw too: bytes as is.
    t = Pty(env.shimctl("exec", "-it", ctr.id, "--", "sh", "-c", "stty raw -echo; seq 1 200000; echo END"), 24, 80)
    try:
        out = t.read_until(lambda o: o.endswith(b"END\n") or o.endswith(b"END\r\n"), timeout=60)
        assert t.wait() == 0
    finally:
        t.close()
    body = out[out.index(b"1\n"):] if b"1\n" in out else out
    assert body == seq_bytes(200000) + b"END\n"


@BULK
@TRANSPORTS
def test_stdin_100mb_through_cat(env, ctr, tmp_path, tls):
    data = os.urandom(100 << 20)
    src = tmp_path / "in"
    src.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    # Through a pipe (pollable stdin) ...
    with open(src, "rb") as f:
        feeder = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        p = subprocess.run(env.shimctl("exec", "-i", ctr.id, "--", "cat", tls=tls), stdin=feeder.stdout,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        feeder.stdout.close()
        feeder.wait()
    assert p.returncode == 0, p.stderr
    assert len(p.stdout) == len(data)
    assert hashlib.sha256(p.stdout).hexdigest() == want
    # ... and from a regular file (not pollable: always ready), checksummed remotely.
    with open(src, "rb") as f:
        p = shimctl(env, "exec", "-i", ctr.id, "--", "sha256sum", stdin=f, timeout=300, tls=tls)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0].decode() == want


def test_stdin_eof_from_dev_null(env, ctr):
    p = shimctl(env, "exec", "-i", ctr.id, "--", "sh", "-c", "cat; echo eof-seen")
    assert (p.returncode, p.stdout) == (0, b"eof-seen\n"), p.stderr


def test_without_i_stdin_is_not_read(env, ctr):
    r, w = os.pipe()
    try:
        os.write(w, b"must stay here\n")
        p = shimctl(env, "exec", ctr.id, "--", "sh", "-c", "cat; echo done", stdin=r)
        assert p.returncode == 0, p.stderr
        assert p.stdout == b"done\n"
        assert os.read(r, 100) == b"must stay here\n"
    finally:
        os.close(r)
        os.close(w)


def test_stdout_and_stderr_separate(env, ctr):
    p = shimctl(env, "exec", ctr.id, "--", "sh", "-c", "echo out; echo err >&2; echo out2")
    assert (p.returncode, p.stdout, p.stderr) == (0, b"out\nout2\n", b"err\n")


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_closed_stdio_of_shimctl_reads_and_writes_as_dev_null(env, ctr, closed):
    # shimctl started with fd 0, 1 or 2 closed (`<&-`, `>&-`, `2>&-`): like
    # ssh, and runc exec (Go), the closed fd is /dev/null. Else the next fd
    # shimctl opens takes its number and the command gets that one as its
    # stdio (its reads and writes fail, or go into shimctl's own files).
    argv = env.shimctl("exec", "-i", ctr.id, "--", "sh", "-c", "cat; echo out; echo err >&2")
    p = subprocess.run(["sh", "-c", f'exec "$@" {closed}>&-', "sh", *argv], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout == (b"" if closed == 1 else b"out\n")
    assert p.stderr == (b"" if closed == 2 else b"err\n")


def vm_kb(pid, field):
    """A memory field of /proc/PID/status (VmRSS, VmHWM) in kB."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith(field + ":")).split()[1])


@BULK
def test_slow_reader_bounded_memory(env, ctr):
    # A reader that stops: flow control must stop the command, not grow our
    # buffers. 96 MiB, more than the bound: a shimctl that buffered what it
    # cannot write would read it all and grow past the limit.
    # Over TLS: on the local socket the command writes to our pipe itself
    # (passed stdio) and shimctl holds nothing to bound.
    total = 96 << 20
    p = subprocess.Popen(env.shimctl("exec", ctr.id, "--", "dd", "if=/dev/zero", "bs=1048576", f"count={total >> 20}",
                                     tls=True),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        # Under ASan freed buffers stay resident in the allocator's quarantine
        # (and shadow memory is counted), so the bound is wider there.
        limit = 160 * 1024 if os.environ.get("SHIMLET_ASAN") == "1" else 48 * 1024
        # The event: our end of shimctl's stdout is full and shimctl stopped
        # growing (flow control held the rest back in the shim), or it has
        # grown past the bound (the failure: it kept reading what it cannot
        # write). Memory, not a read counter: it holds whatever way it reads.
        # Full, not FIONREAD == its size: shimctl grows the pipe (start_stdio)
        # and writes output as it comes, in pieces that need not fill pages.
        seen, queued = [], []

        def stalled():
            assert p.poll() is None, "shimctl exited while its reader was stalled"
            seen.append(vm_kb(p.pid, "VmRSS"))
            assert vm_kb(p.pid, "VmHWM") < limit, f"shimctl grew to {vm_kb(p.pid, 'VmHWM')} kB with a stalled reader"
            queued.append(struct.unpack("i", fcntl.ioctl(p.stdout.fileno(), termios.FIONREAD, b"\0" * 4))[0])
            pipe_size = fcntl.fcntl(p.stdout.fileno(), F_GETPIPE_SZ)
            return (queued[-1] > pipe_size // 2 and len(seen) >= 4 and seen[-1] == seen[-4]
                    and queued[-1] == queued[-4])

        wait_for(stalled, 60, "shimctl to stop growing (flow control)", interval=0.1)
        hwm = vm_kb(p.pid, "VmHWM")
        assert hwm < limit, f"shimctl peak RSS {hwm} kB with a stalled reader"
        n = 0
        bad = False
        while chunk := p.stdout.read(1 << 20):
            n += len(chunk)
            bad = bad or chunk.count(0) != len(chunk)
        assert p.wait(timeout=120) == 0
        assert n == total and not bad, (n, bad)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_recorded_relay_delivers_what_a_slow_reader_takes_after_the_exit(tmp_path):
    # A recorded local exec relays the command's output to shimctl's own
    # stdout (docs/design.md "Local socket"). The command exits at once (its
    # output fits the pipes); the reader comes only after the drain timeout
    # (2 s): every byte still reaches it, as on the copy path.
    rec = tmp_path / "rec"
    rec.mkdir()
    rec.chmod(0o700)
    e = ShimEnv(recording={"dir": str(rec), "local": "all"})
    r, w = os.pipe()
    try:
        c = e.container()
        p = subprocess.Popen(e.shimctl("exec", c.id, "--", "sh", "-c", "head -c 1500000 /dev/zero; exit 5"),
                             stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE)
        os.close(w)
        w = -1
        time.sleep(3.5)
        got = 0
        while (d := os.read(r, 1 << 20)):
            got += len(d)
        assert p.wait(timeout=30) == 5, p.stderr.read()
        p.stderr.close()
        assert got == 1500000
        with open(os.path.join(e.state, c.id, "shim.log")) as f:
            assert '"stdio":"relay"' in f.read()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        e.cleanup()


# ---- exit codes ----

@TRANSPORTS
@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_codes(env, ctr, code, tls):
    p = shimctl(env, "exec", ctr.id, "--", "sh", "-c", f"exit {code}", tls=tls)
    assert p.returncode == code, p.stderr
    assert p.stderr == b""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV, signal.SIGHUP])
def test_signal_death_is_128_plus_n(env, ctr, sig):
    p = shimctl(env, "exec", ctr.id, "--", "sh", "-c", f"kill -{int(sig)} $$")
    assert p.returncode == 128 + int(sig), p.stderr


def test_command_not_found(env, ctr):
    p = shimctl(env, "exec", ctr.id, "--", "/no/such/binary")
    assert p.returncode == 127
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/no/such/binary" in lines[0], p.stderr


def test_background_child_holding_stdout_does_not_hang(env, ctr):
    t0 = time.time()
    p = shimctl(env, "exec", ctr.id, "--", "sh", "-c", "sleep 1000 & echo started; exit 3", timeout=30)
    took = time.time() - t0
    assert p.returncode == 3, p.stderr
    assert p.stdout == b"started\n"
    assert took < 8, f"took {took:.1f}s (drain_timeout_ms is 2 s)"


def test_stdout_reader_gone_is_sigpipe(env, ctr):
    p = subprocess.Popen(env.shimctl("exec", ctr.id, "--", "seq", "1", "100000000"), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    assert p.wait(timeout=30) == 128 + signal.SIGPIPE
    p.stderr.close()


# ---- process lifetime ----

def test_sigkill_of_shimctl_ends_the_session_processes(env, ctr):
    marker = str(900000 + uuid.uuid4().int % 99999)
    p = subprocess.Popen(env.shimctl("exec", ctr.id, "--", "sh", "-c", f"sleep {marker} & echo ready; sleep {marker}"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        procs = wait_for(lambda: len(pids_with_cmdline(marker.encode())) == 2 and pids_with_cmdline(marker.encode()),
                         5, "both sleeps")
        p.kill()
        p.wait()
        t0 = time.time()
        wait_for(lambda: not any(alive(x) for x in procs), 1.0, "the session's processes to die")
        assert time.time() - t0 <= 1.0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---- terminal ----

def test_tty_size_is_the_clients(env, ctr):
    t = Pty(env.shimctl("exec", "-it", ctr.id, "--", "stty", "size"), 37, 123)
    try:
        out = t.read_until(lambda o: b"\n" in o)
        assert t.wait() == 0
    finally:
        t.close()
    assert out.split(b"\r\n")[0] == b"37 123", out


def test_tty_default_size_without_local_tty(env, ctr):
    p = shimctl(env, "exec", "-t", ctr.id, "--", "stty", "size")
    assert (p.returncode, p.stdout) == (0, b"24 80\r\n"), p.stderr


def test_tty_resize_reaches_the_command(env, ctr):
    script = "trap 'stty size; exit 5' WINCH; echo ready; while :; do sleep 0.1; done"
    t = Pty(env.shimctl("exec", "-it", ctr.id, "--", "sh", "-c", script), 30, 90)
    try:
        t.read_until(lambda o: b"ready" in o)
        t.set_size(51, 101)  # the kernel sends shimctl SIGWINCH
        out = t.read_until(lambda o: b"51 101" in o)
        assert t.wait() == 5, out
    finally:
        t.close()


def test_tty_raw_mode_restored(env, ctr):
    # After shimctl -t exits, the local terminal is back in cooked mode.
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        p = subprocess.run(env.shimctl("exec", "-it", ctr.id, "--", "sh", "-c", "exit 4"), stdin=slave,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        assert p.returncode == 4, p.stderr
        assert termios.tcgetattr(slave) == before
        assert not fcntl.fcntl(slave, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(master)
        os.close(slave)


def test_tty_raw_mode_restored_on_sigterm(env, ctr):
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        p = subprocess.Popen(env.shimctl("exec", "-it", ctr.id, "--", "sh", "-c", "echo ready; sleep 1000"),
                             stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"
        wait_for(lambda: termios.tcgetattr(slave) != before, 5, "raw mode")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == -signal.SIGTERM
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# ---- targets and errors ----

def test_target_by_prefix_and_pod_name(env):
    pod = f"pod-{uuid.uuid4().hex[:6]}"
    ann = lambda name: {"io.kubernetes.pod.namespace": "team", "io.kubernetes.pod.name": pod,
                        "io.kubernetes.container.name": name}
    a = env.container(annotations=ann("app"))
    b = env.container(annotations=ann("sidecar"))
    for c in (a, b):  # which container ran the command: each knows its own id
        with open(os.path.join(c.bundle, "rootfs", "etc", "whoami"), "w") as f:
            f.write(c.id)
    for args, want in ((["-n", "team", pod, "-c", "app"], a.id), (["-n", "team", pod, "-c", "sidecar"], b.id),
                       ([a.id[:-2]], a.id), ([b.id], b.id)):
        p = shimctl(env, "exec", *args, "--", "cat", "/etc/whoami")
        assert p.returncode == 0, p.stderr
        assert p.stdout.decode() == want, args
    p = shimctl(env, "exec", "-n", "team", pod, "--", "true")
    assert p.returncode == 255
    err = p.stderr.decode()
    assert sorted(err.splitlines()[1:]) == [f"  app ({a.id})", f"  sidecar ({b.id})"], err  # one per line
    assert f"pod team/{pod} has 2 containers, choose one with -c" in err
    p = shimctl(env, "exec", "-n", "team", pod, "-c", "nope", "--", "true")
    assert p.returncode == 255 and "has no container 'nope'" in p.stderr.decode()
    p = shimctl(env, "exec", "shimlet-t-", "--", "true")
    assert p.returncode == 255 and "ambiguous" in p.stderr.decode() and a.id in p.stderr.decode()


def test_unknown_target_is_a_clear_error(env, ctr):
    p = shimctl(env, "exec", "no-such-container", "--", "true")
    assert p.returncode == 255
    lines = p.stderr.decode().splitlines()
    assert lines[0].startswith("error: no container matches 'no-such-container'"), lines
    # A few registered containers, one per line (then how many more).
    assert 2 <= len(lines) <= 7 and all(l.startswith("  ") for l in lines[1:]), lines
    assert any(l.strip().startswith(ctr.id) for l in lines[1:]), lines


def test_usage_errors(env, ctr):
    for args, want in ((["exec", ctr.id, "true"], "the command goes after --"), (["exec", ctr.id], "missing command"),
                       (["exec", "--", "true"], "missing TARGET"), (["bogus"], "unknown command 'bogus'")):
        p = shimctl(env, *args)
        assert p.returncode == 255, (args, p)
        lines = p.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (args, p.stderr)


def exec_start_lines(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        lines = [json.loads(l) for l in f.read().splitlines() if l.startswith(b"{")]
    return [l for l in lines if l.get("level") == "audit" and l.get("msg") == "exec.start"]


def test_local_exec_uses_the_root_only_local_socket(env, ctr):
    # --local reaches the shim over STATE/<id>/shim.sock (root's, 0600, HTTP/2
    # without TLS); --tls over its TLS port. The audit line names the peer.
    sock = env.registration(ctr.id)["local_socket"]
    assert sock == os.path.join(env.state, ctr.id, "shim.sock")
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, oct(st.st_mode)
    log = os.path.join(env.state, ctr.id, "shim.log")
    start = os.path.getsize(log)
    peers = {}
    for tls in (False, True):
        marker = f"via-{'tls' if tls else 'unix'}-{uuid.uuid4().hex[:8]}"
        p = shimctl(env, "exec", ctr.id, "--", "echo", marker, tls=tls)
        assert (p.returncode, p.stdout) == (0, marker.encode() + b"\n"), p.stderr
        line = wait_for(lambda: next((l for l in exec_start_lines(log, start) if marker in l.get("command", [])), None),
                        10, f"exec.start audit line for {marker}")
        peers[tls] = line["peer"]
    assert peers[False].startswith("unix:pid=") and peers[False].endswith(",uid=0"), peers
    assert peers[True].startswith("127.0.0.1:"), peers


def test_local_exec_gives_the_command_shimctls_own_stdio(env, ctr):
    # Over the local socket the command writes to shimctl's own stdout and
    # stderr (passed fds, as runc exec does); over TLS, to the session's pipes.
    log = os.path.join(env.state, ctr.id, "shim.log")
    start = os.path.getsize(log)
    for tls in (False, True):
        marker = f"fds-{uuid.uuid4().hex[:8]}"
        p = subprocess.Popen(env.shimctl("exec", ctr.id, "--", "sh", "-c",
                                         f"for f in 1 2; do readlink /proc/self/fd/$f; done; exit 7 # {marker}", tls=tls),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ours = [f"pipe:[{os.fstat(f.fileno()).st_ino}]" for f in (p.stdout, p.stderr)]
        out, err = p.communicate(timeout=30)
        assert p.returncode == 7, err
        theirs = out.decode().split()
        if tls:
            assert len(theirs) == 2 and theirs[0].startswith("pipe:[") and not set(theirs) & set(ours), (theirs, ours)
        else:
            assert theirs == ours
        line = wait_for(lambda: next((l for l in exec_start_lines(log, start) if marker in " ".join(l.get("command", []))),
                                     None), 10, f"exec.start audit line for {marker}")
        assert line["stdio"] == ("pipes" if tls else "client"), line


def test_local_exec_never_passes_a_terminal(env, ctr):
    # stdout a terminal without -t: copied through the session's pipes (a
    # container process holding a host terminal could inject input, TIOCSTI).
    t = Pty(env.shimctl("exec", ctr.id, "--", "sh", "-c", "readlink /proc/self/fd/1; echo END"), 24, 80)
    try:
        out = t.read_until(lambda o: b"END" in o, timeout=30)
        assert t.wait() == 0
    finally:
        t.close()
    assert out.startswith(b"pipe:["), out


def test_local_exec_passed_stdio_killed_client_ends_the_command(env, ctr):
    # The command writes straight into our pipe; killing shimctl mid-stream
    # still ends it (the session sees the connection close).
    marker = str(800000 + uuid.uuid4().int % 99999)
    p = subprocess.Popen(env.shimctl("exec", ctr.id, "--", "yes", marker), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.read(1 << 20).startswith(marker.encode())
        procs = wait_for(lambda: [x for x in pids_with_cmdline(marker.encode()) if x != p.pid], 5, "the command")
        p.kill()
        p.wait()
        wait_for(lambda: not any(alive(x) for x in procs), 5, "the command to die")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()


def test_local_socket_path_longer_than_sun_path(tmp_path):
    # sun_path holds 107 bytes; the shim binds and shimctl connects through the
    # directory's fd, so a deep state dir works.
    deep = ShimEnv()
    try:
        deep.state = os.path.join(deep.dir, "d" * 60, "e" * 60, "state")
        with open(deep.config, "w") as f:
            json.dump({"state_dir": deep.state, "fail_container_on_error": True}, f)
        c = deep.container()
        sock = deep.registration(c.id)["local_socket"]
        assert len(sock.encode()) > 108, sock
        p = shimctl(deep, "exec", c.id, "--", "echo", "deep")
        assert (p.returncode, p.stdout) == (0, b"deep\n"), p.stderr
    finally:
        deep.cleanup()


def test_pin_mismatch_refused(env, ctr, tmp_path):
    fake = tmp_path / "state"
    os.makedirs(fake / ctr.id)
    shutil.copy(os.path.join(env.state, "local.key"), fake / "local.key")
    reg = env.registration(ctr.id)
    reg["pin"] = "sha256/" + "A" * 43 + "="
    (fake / ctr.id / "registration.json").write_text(json.dumps(reg))
    # The pin guards the TLS port (the local socket is reached by path).
    p = shimctl(env, "exec", ctr.id, "--", "echo", "leaked", state_dir=str(fake), tls=True)
    assert p.returncode == 255
    assert p.stdout == b""
    assert "pin mismatch" in p.stderr.decode() and len(p.stderr.decode().splitlines()) == 1, p.stderr


def test_untrusted_key_gets_the_shims_error(env, ctr, tmp_path):
    fake = tmp_path / "state"
    os.makedirs(fake / ctr.id)
    run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(fake / "local.key")])
    shutil.copy(os.path.join(env.state, ctr.id, "registration.json"), fake / ctr.id / "registration.json")
    p = shimctl(env, "exec", ctr.id, "--", "echo", "leaked", state_dir=str(fake))
    assert p.returncode == 255
    assert p.stdout == b""
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "ticket" in lines[0], p.stderr


@TRANSPORTS
def test_command_line_too_long_for_the_request_is_an_error(env, ctr, tls):
    # The command line goes into the request's headers twice (spec and
    # ticket): past their limit the request cannot be sent. shimctl must say
    # so and exit 255, not wait forever for a stream it never opened.
    p = shimctl(env, "exec", ctr.id, "--", "sh", "-c", "echo ${#1}", "x", "a" * 60000, tls=tls, timeout=20)
    assert p.returncode == 255, p.stderr
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "command line" in lines[0], p.stderr
    assert p.stdout == b""


def test_connection_lost_before_status(env, ctr):
    marker = str(800000 + uuid.uuid4().int % 99999)
    p = subprocess.Popen(env.shimctl("exec", ctr.id, "--", "sh", "-c", f"echo ready; sleep {marker}"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        cfg = os.path.join(env.state, ctr.id, "shim.json").encode()
        sessions = pids_with_cmdline(cfg)
        sessions = [s for s in sessions if open(f"/proc/{s}/cmdline", "rb").read().split(b"\0")[0].endswith(
            b"shimlet-session")]
        assert sessions, "no shimlet-session process found"
        for s in sessions:
            # The gate and a warm session match too; either may have exited
            # since the listing (the gate lingers only while idle).
            with contextlib.suppress(ProcessLookupError):
                os.kill(s, signal.SIGKILL)
        assert p.wait(timeout=10) == 255
        # The orphaned command holds shimctl's own stdout and stderr (passed
        # fds, as with runc exec): end it before reading them to EOF.
        kill_cmdline(marker.encode(), appear=True)
        err = p.stderr.read().decode()
        assert err.startswith("error: connection to shim lost") and len(err.splitlines()) == 1, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        # Its sleep (the session is gone) must not outlive the test.
        kill_cmdline(marker.encode())


def test_every_session_of_a_gate_lineage_ends_with_its_shim(env):
    """docs/design.md "Pre-authentication gate": a shim that dies (SIGKILL)
    ends every session, not only the first of its gate's lineage (the shim's
    child, with its PDEATHSIG): later ones are the previous gate's children."""
    c = env.container()
    markers = [str(700000 + uuid.uuid4().int % 99999) for _ in range(3)]
    procs = []
    try:
        for m in markers:  # one after the other: the lineage's 1st, 2nd and 3rd session
            p = subprocess.Popen(env.shimctl("exec", c.id, "--", "sh", "-c", f"echo ready; sleep {m}", tls=True),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(p)
            assert p.stdout.readline() == b"ready\n", p.stderr.read() if p.poll() is not None else ""
        sleeps = [wait_for(lambda m=m: pids_with_cmdline(m.encode()), 5, f"sleep {m}")[0] for m in markers]
        os.kill(env.registration(c.id)["shim_pid"], signal.SIGKILL)
        for i, p in enumerate(procs):
            assert p.wait(timeout=10) != 0, f"session {i + 1}"
            err = p.stderr.read().decode()
            assert "shim exited" in err or "connection to shim lost" in err, (i + 1, err)
        wait_for(lambda: not any(alive(x) for x in sleeps), 5, "every session's command to die")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for m in markers:
            kill_cmdline(m.encode())
        c.cleanup()
