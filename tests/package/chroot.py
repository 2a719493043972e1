#!/usr/bin/python3
"""Fresh Debian 12 roots for the package tests (test_package.py).

The base is `debootstrap --variant=minbase bookworm` plus BASE_PACKAGES (what
an operator's machine has anyway: systemd to boot it, and the tools
scripts/demo uses), from the mirror this machine's apt uses. It is built once
and kept as a tarball under build-package/ (keyed by the package list and
BASE_VERSION); each run unpacks a fresh copy there, so nothing is cached
outside the build tree and a fresh clone builds it (network needed).

`run()` executes a command in a copy as its / : pivot_root, not chroot (runc
pivots the container's root itself, which fails under chroot), in new mount
and pid namespaces with /proc, /sys, /dev, /run and /tmp mounted inside. The
mounts exist only in that namespace and every process started there dies with
its pid 1, so nothing outlives a command even when a test fails (the one
exception is what runc puts in the host's cgroup tree; scripts/demo's trap
deletes its container). `Booted` starts the copy's own systemd with
systemd-nspawn (private network) to run units for real.

    python3 tests/package/chroot.py base     # build the cached base (scripts/test starts it early)
"""
import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("SHIMLET_PACKAGE_CACHE", os.path.join(REPO, "build-package"))
SUITE = "bookworm"
BASE_VERSION = "1"  # bump to force a new base
# systemd + dbus: to boot the root; the rest: what scripts/demo runs (runc comes from shimlet's Recommends).
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "curl", "openssl", "busybox-static", "procps"]
# Never compared before/after purge: apt's and dpkg's own bookkeeping and logs, the journal.
VOLATILE = ("/var/cache/", "/var/lib/apt/", "/var/lib/dpkg/", "/var/log/journal/", "/var/log/apt/",
            "/var/log/dpkg.log", "/var/log/alternatives.log", "/var/lib/systemd/deb-systemd-user-helper-enabled/")


def log(msg):
    print(f"[package-test {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def debian_sources():
    """The host's Debian sources (deb822), for the root's apt: bookworm, -updates and -security."""
    for p in ("/etc/apt/sources.list.d/debian.sources",):
        if os.path.exists(p):
            with open(p) as f:
                return f.read()
    return (f"Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")


def mirror():
    for line in debian_sources().splitlines():
        if line.startswith("URIs:"):
            return line.split()[1]
    return "http://deb.debian.org/debian"


def base_tarball():
    """Builds the cached base if needed (one builder at a time); returns its path."""
    key = hashlib.sha256((BASE_VERSION + " ".join(BASE_PACKAGES) + mirror()).encode()).hexdigest()[:12]
    tar = os.path.join(CACHE, f"base-{SUITE}-{key}.tar")
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, ".base.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(tar):
            return tar
        for old in glob.glob(os.path.join(CACHE, f"base-{SUITE}-*.tar")):
            os.unlink(old)
        work = tempfile.mkdtemp(prefix="base-", dir=CACHE)
        try:
            log(f"debootstrap {SUITE} from {mirror()} (once; cached as {tar})")
            sh(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), SUITE, work + "/root",
                mirror()], stdout=subprocess.DEVNULL)
            with open(os.path.join(work, "root/etc/apt/sources.list.d/debian.sources"), "w") as f:
                f.write(debian_sources())
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(work, "root/etc/apt/sources.list"))
            sh(["tar", "-C", work + "/root", "--numeric-owner", "-cf", tar + ".tmp", "."])
            os.rename(tar + ".tmp", tar)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tar


class Root:
    """A fresh copy of the base under build-package/; removed by cleanup()."""

    def __init__(self):
        tar = base_tarball()
        self.path = os.path.join(CACHE, "root-" + uuid.uuid4().hex[:8])
        os.makedirs(self.path)
        sh(["tar", "-C", self.path, "--numeric-owner", "-xf", tar])
        shutil.copy("/etc/resolv.conf", os.path.join(self.path, "etc/resolv.conf"))

    def file(self, p):
        return os.path.join(self.path, p.lstrip("/"))

    def run(self, cmd, binds=(), check=True, timeout=900, **kw):
        """cmd (a list) inside the root as its /, with binds = [(host_dir, name)] read-only at /mnt/<name>."""
        script = r'''
set -e
R=$1; shift
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mount -t tmpfs -o mode=755 tmpfs "$R/mnt"
while [ "$1" != -- ]; do
  mkdir "$R/mnt/$2"; mount --bind "$1" "$R/mnt/$2"; mount -o remount,bind,ro "$R/mnt/$2"; shift 2
done
shift
cd "$R"
mkdir .pivot-old
pivot_root . .pivot-old
cd /
umount -l /.pivot-old
rmdir /.pivot-old
exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
'''
        args = []
        for host, name in binds:
            args += [host, name]
        full = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "/bin/bash", "-c", script,
                "enter", self.path, *args, "--", *cmd]
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.run(full, timeout=timeout, **kw)
        if check and p.returncode != 0:
            out = p.stdout.decode(errors="replace") if isinstance(p.stdout, bytes) else p.stdout
            err = p.stderr.decode(errors="replace") if isinstance(p.stderr, bytes) else p.stderr
            raise AssertionError(f"in the root: {cmd} exited {p.returncode}\n--- stdout\n{out}\n--- stderr\n{err}")
        return p

    def files(self):
        """Every path in the root (relative to it, with a trailing / for directories) but VOLATILE ones."""
        out = set()
        skip = {"proc", "sys", "dev", "run", "tmp", "mnt"}
        for dirpath, dirnames, filenames in os.walk(self.path):
            rel = "/" + os.path.relpath(dirpath, self.path).lstrip(".")
            if rel == "/":
                dirnames[:] = [d for d in dirnames if d not in skip]
            for d in dirnames:
                out.add(os.path.join(rel, d) + "/")
            for f in filenames:
                out.add(os.path.join(rel, f))
        return {p for p in out if not any(p.startswith(v) for v in VOLATILE)}

    def cleanup(self):
        shutil.rmtree(self.path, ignore_errors=True)


class Booted:
    """The root booted with its own systemd (systemd-nspawn -b, private network, not registered with a host
    machined, which this machine does not run). Commands run in it with exec(); stop() powers it off."""

    def __init__(self, root, timeout=120):
        self.root = root
        self.dir = tempfile.mkdtemp(prefix="nspawn-")
        # nspawn reports the container's pid 1 and, once its systemd is up, READY=1 on $NOTIFY_SOCKET.
        sock_path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(sock_path)
        self.log = open(os.path.join(self.dir, "console.log"), "w+")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit", "--private-network",
             "--notify-ready=yes", "--console=pipe", "--machine=shimlet-pkg-" + uuid.uuid4().hex[:8],
             "--directory", root.path],
            env={**os.environ, "NOTIFY_SOCKET": sock_path}, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.leader = None
        ready = False
        deadline = time.monotonic() + timeout
        try:
            while not ready:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"systemd-nspawn did not boot the root: {self.console()}")
                self.sock.settimeout(min(left, 1.0))
                try:
                    msg = self.sock.recv(4096).decode()
                except socket.timeout:
                    continue
                for line in msg.splitlines():
                    if line.startswith("X_NSPAWN_LEADER_PID="):
                        self.leader = int(line.split("=", 1)[1])
                    ready = ready or line == "READY=1"
            if not self.leader:
                raise AssertionError("systemd-nspawn did not name the container's pid 1")
        except BaseException:
            self.stop()
            raise

    def console(self):
        self.log.seek(0)
        return self.log.read()[-4000:]

    def exec(self, *cmd, check=True, timeout=120, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        p = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", *cmd], timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"in the booted root: {cmd} exited {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def stop(self):
        if self.proc.poll() is None:
            if self.leader:
                subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", "systemctl", "poweroff"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)  # the container's processes die with its pid namespace
                self.proc.wait()
        self.sock.close()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["base"]:
        sys.exit("usage: chroot.py base")
    print(base_tarball())
