"""Real runc containers for the integration tests: a busybox-static rootfs,
bundles made from `runc spec`, and RAII-style cleanup (context managers and
pytest finalizers) so nothing is left behind even when a test fails."""
import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("SHIMLET_BIN", os.path.join(REPO, "build", "bin"))
RUNC_ROOT = "/run/shimlet-test/runc"
BUSYBOX = "/bin/busybox"  # Debian busybox-static


def wait_for(pred, timeout=5.0, what="condition", interval=0.05):
    """pred()'s first truthy value within timeout seconds, else AssertionError naming what."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alive(pid):
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone (ESRCH when it exits between open and read)
        return False


def run(cmd, check=True, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    p = subprocess.run(cmd, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}: {p.stderr!r}")
    return p


def make_rootfs(path):
    """A minimal rootfs: busybox-static with every applet linked, passwd/group."""
    if not os.path.exists(BUSYBOX):
        raise AssertionError(f"{BUSYBOX} missing: install busybox-static (scripts/deps)")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "home/user", "run", "var/tmp"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    os.chmod(os.path.join(path, "tmp"), 0o1777)
    shutil.copy2(BUSYBOX, os.path.join(path, "bin/busybox"))
    applets = run([BUSYBOX, "--list-full"]).stdout.decode().split()
    for a in applets:
        dst = os.path.join(path, a)
        if not os.path.lexists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink("/bin/busybox", dst)
    with open(os.path.join(path, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    with open(os.path.join(path, "etc/group"), "w") as f:
        f.write("root:x:0:\nuser:x:1000:\nextra1:x:2001:user\nextra2:x:2002:user\nnogroup:x:65534:\n")
    os.chown(os.path.join(path, "home/user"), 1000, 1000)
    return path


_ROOTFS_CACHE = None


def shared_rootfs():
    """One pristine rootfs per test run, copied per container (cheap: ~1 MB)."""
    global _ROOTFS_CACHE
    if _ROOTFS_CACHE is None:
        d = tempfile.mkdtemp(prefix="shimlet-rootfs-")
        atexit.register(shutil.rmtree, d, True)  # removed when the test run ends
        _ROOTFS_CACHE = make_rootfs(os.path.join(d, "rootfs"))
    return _ROOTFS_CACHE


class Container:
    """A runc container in its own bundle directory.

    edit(config) hooks let tests shape config.json (user, caps, seccomp, ...)."""

    def __init__(self, name=None, args=("sleep", "100000"), edit=None, hooks=None, root=RUNC_ROOT):
        self.id = name or f"shimlet-t-{uuid.uuid4().hex[:10]}"
        self.root = root
        self.dir = tempfile.mkdtemp(prefix=f"{self.id}-")
        self.bundle = os.path.join(self.dir, "bundle")
        os.makedirs(self.bundle)
        shutil.copytree(shared_rootfs(), os.path.join(self.bundle, "rootfs"), symlinks=True)
        run(["runc", "spec"], cwd=self.bundle)
        with open(self.config_path) as f:
            cfg = json.load(f)
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = list(args)
        cfg["root"]["readonly"] = False
        if hooks:
            cfg["hooks"] = hooks
        if edit:
            edit(cfg)
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=1)
        self.started = False

    @property
    def config_path(self):
        return os.path.join(self.bundle, "config.json")

    def runc(self, *args, check=True, **kw):
        return run(["runc", "--root", self.root, *args], check=check, **kw)

    def start(self):
        os.makedirs(self.root, exist_ok=True)
        # The container inherits runc's stdio with -d: never hand it a pipe we
        # wait on (subprocess would block until the container exits).
        with open(os.path.join(self.dir, "runc.log"), "w+") as log:
            p = subprocess.run(["runc", "--root", self.root, "run", "-d", "--pid-file", os.path.join(self.dir, "pid"),
                                self.id], cwd=self.bundle, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            if p.returncode != 0:
                log.seek(0)
                raise AssertionError(f"runc run {self.id} failed: {log.read()}")
        self.started = True
        return self

    @property
    def pid(self):
        with open(os.path.join(self.dir, "pid")) as f:
            return int(f.read())

    def state(self):
        p = self.runc("state", self.id, check=False)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def exec(self, *argv, user=None, check=False, **kw):
        """`runc exec` in the container (the reference for parity)."""
        extra = ["--user", user] if user else []
        return self.runc("exec", *extra, self.id, *argv, check=check, stdin=subprocess.DEVNULL, **kw)

    def stop(self, timeout=5):
        if not self.started:
            return
        self.runc("kill", self.id, "KILL", check=False)
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.state()
            if st is None or st.get("status") == "stopped":
                break
            time.sleep(0.02)
        self.runc("delete", "-f", self.id, check=False)
        self.started = False

    def cleanup(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


@contextlib.contextmanager
def container(**kw):
    c = Container(**kw)
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


def kill_tree(proc, sig=signal.SIGKILL):
    """Kill a Popen started with start_new_session=True, with its group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)
