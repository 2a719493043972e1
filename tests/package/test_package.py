"""The Debian packages as an operator gets them (docs/operations.md): their
metadata, the systemd unit checked offline, then one fresh Debian 12 root
(tests/package/chroot.py) through the operator's whole life cycle, in order:
`apt-get install ./shimlet_*.deb ...` (dependencies resolved by their declared
names from the mirror), the installed binaries and files, scripts/demo against
the installed paths (a runc container with the hook, exec and port-forward
through the master), the master's and shimlet-cri's units under the root's
own systemd (systemd-nspawn -b), and `apt-get purge`, after which the root's
file list must equal the one before installation.

Run by scripts/test's `package` stage after scripts/package:
    SHIMLET_DEBS=build-package/debs python3 -m pytest tests/package -v -p no:cacheprovider
"""
import glob
import json
import os
import re
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chroot import REPO, Booted, Root, log

DEBS = os.environ.get("SHIMLET_DEBS", os.path.join(REPO, "build-package", "debs"))
PACKAGES = ["shimlet", "shimlet-master", "shimctl"]
UNIT = "shimlet-master.service"
CRI_UNIT = "shimlet-cri.service"
# Highest accepted `systemd-analyze security` exposure per service (0..10); docs/operations.md explains what remains.
EXPOSURE = {UNIT: 2.0, CRI_UNIT: 1.2, "shimlet-node-metrics.service": 2.0}


def project_version():
    with open(os.path.join(REPO, "CMakeLists.txt")) as f:
        return re.search(r"project\(shimlet VERSION (\S+)", f.read()).group(1)


VERSION = project_version()


def deb(name):
    found = glob.glob(os.path.join(DEBS, f"{name}_{VERSION}-*_*.deb"))
    if len(found) != 1:
        raise AssertionError(f"want one {name}_{VERSION}-*.deb in {DEBS}, found {found}: run scripts/package")
    return found[0]


def field(path, name):
    return subprocess.run(["dpkg-deb", "-f", path, name], check=True, capture_output=True, text=True).stdout.strip()


def contents(path):
    out = subprocess.run(["dpkg-deb", "-c", path], check=True, capture_output=True, text=True).stdout
    return {line.split()[5].lstrip(".") for line in out.splitlines()}


# ---------------------------------------------------------------- the .deb files

def test_package_metadata_and_files():
    node, master, client = (deb(n) for n in PACKAGES)
    deps = field(node, "Depends")
    # dpkg-shlibdeps found the libraries the binaries link (not a hand list)
    for lib in ("libc6", "libssl3", "libnghttp2-14", "libevent-2.1-7", "libseccomp2", "libcap-ng0", "libselinux1",
                "libwslay1", "libhttp-parser2.9", "libsystemd0"):
        assert re.search(rf"\b{re.escape(lib)}\b", deps), (lib, deps)
    assert field(node, "Recommends") == "runc | crun"
    mdeps = field(master, "Depends")
    for lib in ("libssl3", "libsystemd0", "libprometheus-cpp-core1.0", "libyaml-0-2", "openssl", "hostname"):
        assert re.search(rf"\b{re.escape(lib)}\b", mdeps), (lib, mdeps)
    assert "libssl3" in field(client, "Depends")

    files = contents(node)
    for p in ("/usr/bin/shimlet-hook", "/usr/bin/shimlet", "/usr/bin/shimlet-session", "/usr/bin/shimlet-node-metrics",
              "/usr/bin/shimlet-cri", "/lib/systemd/system/" + CRI_UNIT, "/etc/shimlet/hook.json",
              "/usr/share/doc/shimlet/operations.md",
              "/usr/share/containers/oci/hooks.d/shimlet.json", "/usr/share/selinux/packages/shimlet.pp",
              "/usr/share/man/man8/shimlet-hook.8.gz", "/usr/share/doc/shimlet/examples/hook.json",
              "/lib/systemd/system/shimlet-node-metrics.service", "/lib/systemd/system/shimlet-node-metrics.timer"):
        assert p in files, p
    files = contents(master)
    for p in ("/usr/sbin/shimlet-master", "/lib/systemd/system/shimlet-master.service", "/etc/shimlet/master.conf",
              "/usr/share/man/man8/shimlet-master.8.gz", "/usr/share/doc/shimlet-master/operations.md",
              "/usr/share/doc/shimlet-master/examples/rbac-metrics.yaml"):
        assert p in files, p
    files = contents(client)
    for p in ("/usr/bin/shimctl", "/usr/share/man/man1/shimctl.1.gz",
              "/usr/share/bash-completion/completions/shimctl", "/usr/share/zsh/vendor-completions/_shimctl"):
        assert p in files, p
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", node], check=True, capture_output=True).stdout
    assert b"conffiles" in conffiles


def test_man_pages_render(tmp_path):
    for name, section, pkg, must in (("shimctl", 1, "shimctl", "port-forward"),
                                     ("shimlet-master", 8, "shimlet-master", "--ticket-signing-key-file"),
                                     ("shimlet-hook", 8, "shimlet", "poststop")):
        subprocess.run(["dpkg-deb", "-x", deb(pkg), str(tmp_path)], check=True)
        page = tmp_path / f"usr/share/man/man{section}/{name}.{section}.gz"
        text = subprocess.run(["man", "-l", str(page)], check=True, capture_output=True, text=True,
                              env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": ""}).stdout
        text = re.sub(r".\x08", "", text)
        assert "NAME" in text and "SYNOPSIS" in text or "Usage" in text, text[:500]
        assert must in text, (name, text[:2000])
        assert VERSION in text, name


def test_units_security(tmp_path):
    """The units' offline security score (systemd-analyze verify runs in the installed root, below)."""
    for pkg in PACKAGES:
        subprocess.run(["dpkg-deb", "-x", deb(pkg), str(tmp_path)], check=True)
    units = sorted(glob.glob(str(tmp_path / "lib/systemd/system/*.service")))
    assert sorted(os.path.basename(u) for u in units) == sorted(EXPOSURE), units
    for u in units:
        bound = EXPOSURE[os.path.basename(u)]
        # --threshold in tenths; docs/operations.md keeps the current summary
        p = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--threshold={round(bound * 10)}",
                            "--no-pager", u], capture_output=True, text=True)
        assert p.returncode == 0, (u, p.stdout[-3000:], p.stderr)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
        assert m and float(m.group(1)) <= bound, p.stdout[-500:]
        log(f"{os.path.basename(u)}: exposure {m.group(1)}")


# ---------------------------------------------------------------- one root, install to purge

@pytest.fixture(scope="module")
def root():
    r = Root()
    try:
        # A first boot settles what any boot creates (machine id, journal directory, ...), so that the
        # before/after comparison sees only what the packages did.
        Booted(r).stop()
        r.before = r.files()
        r.passwd = open(r.file("/etc/passwd")).read()
        yield r
    finally:
        r.cleanup()


@pytest.fixture(scope="module")
def installed(root):
    debs = [deb(n) for n in PACKAGES]
    assert len({os.path.dirname(d) for d in debs}) == 1
    # docs/operations.md's line, as an operator types it.
    p = root.run(["bash", "-c", "cd /mnt/debs && apt-get update -qq && "
                                "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                                "./shimlet_*.deb ./shimlet-master_*.deb ./shimctl_*.deb"],
                 binds=[(DEBS, "debs")])
    log("installed: " + p.stdout.decode().splitlines()[-1] if p.stdout else "installed")
    return root


def test_installed_binaries_and_files(installed):
    r = installed
    for path in ("/usr/bin/shimctl", "/usr/sbin/shimlet-master", "/usr/bin/shimlet-hook", "/usr/bin/shimlet",
                 "/usr/bin/shimlet-session", "/usr/bin/shimlet-node-metrics", "/usr/bin/shimlet-cri"):
        out = r.run([path, "--version"]).stdout.decode()
        assert out == f"{os.path.basename(path)} {VERSION}\n", out
    # runc came from the Recommends, by its declared name
    status = r.run(["dpkg-query", "-W", "-f", "${Status}", "runc"]).stdout.decode()
    assert status == "install ok installed", status
    # where podman and CRI-O look for hooks, naming the installed hook and config
    hook = json.load(open(r.file("/usr/share/containers/oci/hooks.d/shimlet.json")))
    assert hook["version"] == "1.0.0" and set(hook["stages"]) == {"createRuntime", "poststop"}
    assert hook["hook"]["path"] == "/usr/bin/shimlet-hook"
    assert hook["hook"]["args"] == ["shimlet-hook", "--config", "/etc/shimlet/hook.json"]
    assert os.access(r.file(hook["hook"]["path"]), os.X_OK)
    # the shipped hook config holds the limits at the defaults of the documented example (deploy/hook.json)
    shipped = json.load(open(r.file("/etc/shimlet/hook.json")))
    with open(os.path.join(REPO, "deploy", "hook.json")) as f:
        example = json.load(f)
    limits = ("max_sessions", "max_local_sessions", "preauth_timeout_ms", "preauth_max_connections",
              "preauth_max_per_source", "preauth_max_memory")
    assert {k: shipped.get(k) for k in limits} == {k: example[k] for k in limits}, shipped
    # the master's generated keys: secrets root's only, public halves readable
    modes = {n: os.stat(r.file("/etc/shimlet/master/" + n)).st_mode & 0o777
             for n in ("ticket.key", "tls.key", "tokens.csv", "ticket.pub", "tls.crt")}
    assert modes == {"ticket.key": 0o600, "tls.key": 0o600, "tokens.csv": 0o600, "ticket.pub": 0o644,
                     "tls.crt": 0o644}, modes
    pub = r.run(["/usr/sbin/shimlet-master", "--ticket-signing-key-file", "/etc/shimlet/master/ticket.key",
                 "--print-ticket-public-key"]).stdout.decode()
    assert pub == open(r.file("/etc/shimlet/master/ticket.pub")).read()
    # the master enabled by the postinst (no systemd running in a chroot: not started), shimlet-cri not
    assert os.path.islink(r.file("/etc/systemd/system/multi-user.target.wants/" + UNIT))
    assert not os.path.lexists(r.file("/etc/systemd/system/multi-user.target.wants/" + CRI_UNIT))
    # the units verify where they are installed: binaries, credentials, directives, dependencies
    units = [os.path.basename(u) for u in glob.glob(r.file("/lib/systemd/system/shimlet*"))]
    assert {UNIT, CRI_UNIT, "shimlet-node-metrics.service", "shimlet-node-metrics.timer"} <= set(units), units
    p = r.run(["systemd-analyze", "verify", "--man=no", *units], check=False)
    assert p.returncode == 0 and p.stderr.strip() == b"", (p.stdout, p.stderr)
    # the SELinux module is only loaded where SELinux is enabled: not here
    assert not os.path.exists(r.file("/var/lib/selinux"))


def test_demo_against_installed_paths(installed):
    """scripts/demo with the packages' binaries: master, runc container with the hook, exec, port-forward."""
    p = installed.run(["env", "SHIMLET_DEMO_NOBUILD=1", "SHIMLET_BIN=/usr/bin",
                       "SHIMLET_MASTER_BIN=/usr/sbin/shimlet-master", "/mnt/src/scripts/demo"],
                      binds=[(REPO, "src")], check=False, timeout=300)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out[-4000:] + p.stderr.decode(errors="replace")[-4000:]
    assert "demo: OK" in out
    assert "exit code came back: 42" in out


PROM_TOKEN = "tok-package-test-prometheus-0001"


def _curl(b, path, token=None):
    cmd = ["curl", "-sS", "-o", "/dev/stdout", "-w", "\n%{http_code}", "--cacert", "/etc/shimlet/master/tls.crt",
           f"https://127.0.0.1:6443{path}"]
    if token:
        cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = b.exec(*cmd).stdout
    body, _, code = out.rpartition("\n")
    return int(code), body


def _show(b, *props, unit=UNIT):
    out = b.exec("systemctl", "show", unit, *[f"--property={p}" for p in props]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _proc_status(b, pid):
    status = b.exec("cat", f"/proc/{pid}/status").stdout
    return dict(re.split(r":\s*", line, 1) for line in status.splitlines() if ":" in line)


def _restarted_after_kill(b, unit):
    """SIGKILL the unit's main process; wait for Restart=on-failure to bring it back, ready again."""
    old = _show(b, "MainPID", unit=unit)["MainPID"]
    b.exec("kill", "-KILL", old)
    deadline = time.monotonic() + 30
    while True:
        s = _show(b, "ActiveState", "MainPID", "NRestarts", unit=unit)
        if s["NRestarts"] == "1" and s["ActiveState"] == "active" and s["MainPID"] not in ("0", old):
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.2)


def test_master_unit_under_systemd(installed):
    """The packaged unit started by the root's own systemd: ready, confined, its state directory writable,
    restarted, serving metrics."""
    r = installed
    # The operator's part: a token and an RBAC binding for the metrics scraper.
    with open(r.file("/etc/shimlet/master/tokens.csv"), "a") as f:
        f.write(f"{PROM_TOKEN},prometheus,uid-prometheus\n")
    r.run(["cp", "/usr/share/doc/shimlet-master/examples/rbac-metrics.yaml", "/etc/shimlet/master/rbac/metrics.yaml"])
    # Recording on, as master.conf's comment says: its two example lines uncommented, and a policy.
    with open(r.file("/etc/shimlet/master/recording-policy.yaml"), "w") as f:
        f.write("apiVersion: shimlet.io/v1\nkind: RecordingPolicy\ndefault: tty\n")
    conf = r.file("/etc/shimlet/master.conf")
    text = open(conf).read()
    for line in ('recording-policy-file = "/etc/shimlet/master/recording-policy.yaml"',
                 'recording-dir = "/var/lib/shimlet-master/recordings"'):
        assert f"# {line}\n" in text, text
        text = text.replace(f"# {line}\n", f"{line}\n")
    with open(conf, "w") as f:
        f.write(text)
    b = Booted(r)
    try:
        # Enabled by the postinst, so started at boot; `start` returns once READY=1 (Type=notify) or fails.
        assert b.exec("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
        b.exec("systemctl", "start", UNIT)
        s = _show(b, "ActiveState", "SubState", "Type", "MainPID", "NRestarts", "DynamicUser", "WatchdogUSec")
        assert (s["ActiveState"], s["SubState"], s["Type"], s["DynamicUser"]) == ("active", "running", "notify",
                                                                                "yes"), s
        assert s["WatchdogUSec"] == "30s", s
        st = _proc_status(b, s["MainPID"])
        uid = int(st["Uid"].split()[0])
        assert 61184 <= uid <= 65519, st["Uid"]  # systemd's dynamic user range
        assert st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0, st
        assert st["Seccomp"] == "2", st  # SystemCallFilter=
        # StateDirectory=: /var/lib/shimlet-master (DynamicUser's link to /var/lib/private), the dynamic user's;
        # the recording store made its directories there.
        assert b.exec("readlink", "/var/lib/shimlet-master").stdout.strip() == "private/shimlet-master"
        for d in ("/var/lib/private/shimlet-master", "/var/lib/shimlet-master/recordings",
                  "/var/lib/shimlet-master/recordings/.uploads"):
            assert b.exec("stat", "-c", "%u %a %F", d).stdout.split(maxsplit=2) == [str(uid), "700", "directory\n"], d

        assert _curl(b, "/healthz") == (200, "ok")
        for _ in range(2):
            assert _curl(b, "/api/v1/pods", token="not-a-token")[0] == 401
        code, body = _curl(b, "/metrics", token=PROM_TOKEN)
        assert code == 200, body
        samples = [s for f in text_string_to_metric_families(body) for s in f.samples]

        def value(name, **labels):
            for s in samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
            raise AssertionError(f"no sample {name} {labels}")

        assert value("shimlet_master_authentication_failures_total") == 2
        assert value("shimlet_master_requests_total", handler="unauthenticated", code="401") == 2
        assert value("shimlet_master_requests_total", handler="health", code="200") == 1
        assert value("shimlet_master_build_info", version=VERSION) == 1
        assert value("process_open_fds") > 3  # /proc/self is readable under ProcSubset=pid
        assert value("shimlet_master_registered_containers") == 0

        # Restart=on-failure: a killed master comes back, ready again.
        _restarted_after_kill(b, UNIT)
        assert _curl(b, "/healthz") == (200, "ok")
        journal = b.exec("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout
        assert journal.count('"listening"') == 2, journal[-2000:]

        # The node metrics timer, as an operator with node_exporter's textfile collector enables it.
        b.exec("mkdir", "-p", "/var/lib/prometheus/node-exporter")
        b.exec("systemctl", "enable", "--now", "shimlet-node-metrics.timer")
        b.exec("systemctl", "start", "shimlet-node-metrics.service")  # oneshot: returns when it has run
        text = b.exec("cat", "/var/lib/prometheus/node-exporter/shimlet.prom").stdout
        node = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert node["shimlet_node_containers"] == 0 and node["shimlet_node_build_info"] == 1, text
    except BaseException:
        log("console: " + b.console())
        raise
    finally:
        b.stop()


def test_cri_unit_under_systemd(installed):
    """shimlet-cri.service as an operator enables it: ready, confined, serving its socket, restarted."""
    b = Booted(installed)
    try:
        assert b.exec("systemctl", "is-enabled", CRI_UNIT, check=False).stdout.strip() == "disabled"
        # Before any container: the unit makes the hook's state directory (root's 0700, as the hook would).
        assert b.exec("test", "-e", "/run/shimlet", check=False).returncode == 1
        b.exec("systemctl", "enable", "--now", CRI_UNIT)  # returns once READY=1 (Type=notify) or fails
        s = _show(b, "ActiveState", "SubState", "Type", "MainPID", unit=CRI_UNIT)
        assert (s["ActiveState"], s["SubState"], s["Type"]) == ("active", "running", "notify"), s
        st = _proc_status(b, s["MainPID"])
        assert st["Uid"].split()[0] == "0", st["Uid"]
        assert st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0, st
        assert st["Seccomp"] == "2", st
        # PrivateUsers=: a user namespace of its own where root is the only user
        assert b.exec("cat", f"/proc/{s['MainPID']}/uid_map").stdout.split() == ["0", "0", "1"]
        assert b.exec("stat", "-c", "%u %a", "/run/shimlet").stdout.split() == ["0", "700"]
        assert b.exec("stat", "-c", "%u %F", "/run/shimlet/cri.sock").stdout.strip() == "0 socket"
        # Only /run/shimlet is writable, and the host's network is not its own.
        ns = [b.exec("readlink", f"/proc/{pid}/ns/net").stdout for pid in (s["MainPID"], "1")]
        assert ns[0] != ns[1], ns
        in_unit = ["nsenter", "-t", s["MainPID"], "-m", "--"]
        p = b.exec(*in_unit, "touch", "/etc/shimlet/probe", check=False)
        assert p.returncode != 0 and "Read-only file system" in p.stderr, p
        b.exec(*in_unit, "sh", "-c", "touch /run/shimlet/probe && rm /run/shimlet/probe")
        # Restart=on-failure: a killed proxy comes back and serves its socket again (the old one is replaced).
        b.exec("mkdir", "-m", "0700", "/run/shimlet/c1")  # as a container's state
        s = _restarted_after_kill(b, CRI_UNIT)
        assert b.exec("stat", "-c", "%F", "/run/shimlet/cri.sock").stdout.strip() == "socket"
        journal = b.exec("journalctl", "-u", CRI_UNIT, "-o", "cat", "--no-pager").stdout
        assert journal.count('"serving"') == 2, journal[-2000:]
        # Stopped: its socket gone, the containers' state kept (RuntimeDirectoryPreserve=yes).
        b.exec("systemctl", "stop", CRI_UNIT)
        assert b.exec("ls", "-A", "/run/shimlet").stdout.split() == ["c1"]
    except BaseException:
        log("console: " + b.console())
        log("journal: " + b.exec("journalctl", "-u", CRI_UNIT, "--no-pager", check=False).stdout[-4000:])
        raise
    finally:
        b.stop()


def test_purge_leaves_what_was_there_before(installed):
    r = installed
    r.run(["bash", "-c", "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q --autoremove shimlet shimlet-master "
                         "shimctl"])
    left = r.run(["dpkg-query", "-W", "-f", "${Package} ${Status}\\n"]).stdout.decode()
    assert not re.search(r"^(shimlet|shimctl|runc)", left, re.M), left
    # The operator's own file is theirs to remove; purge kept it (and so its directories).
    assert os.path.exists(r.file("/etc/shimlet/master/rbac/metrics.yaml"))
    for p in ("/etc/shimlet/master/rbac/metrics.yaml", "/etc/shimlet/master/recording-policy.yaml",
              "/etc/shimlet/master/rbac", "/etc/shimlet/master",
              "/etc/shimlet", "/var/lib/prometheus/node-exporter", "/var/lib/prometheus"):
        (os.unlink if p.endswith(".yaml") else os.rmdir)(r.file(p))  # rmdir: purge left them empty
    after = r.files()
    assert after - r.before == set(), sorted(after - r.before)
    assert r.before - after == set(), sorted(r.before - after)
    assert open(r.file("/etc/passwd")).read() == r.passwd  # DynamicUser: no user was created
