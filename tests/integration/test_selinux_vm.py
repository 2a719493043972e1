"""Per-session isolation by SELinux alone, proven in an enforcing VM.

tests/vm/build_image.py builds a Debian bookworm image (cached under build/vm,
rebuilt when tests/vm/packages.txt or the policy sources change), installs the
project's policy module with semodule, copies build/bin in, labels offline and
boots it under qemu software emulation with security=selinux enforcing=1.
Inside, as the shim's domain, runc starts two busybox containers in
shimlet_container_t with distinct MCS pairs, and two concurrent exec sessions
of one container are started with the project's selinux/ code
(build/bin/selinux-launch: superset label via setexeccon, pty relabelled,
socket label via setsockcreatecon). Landlock is not used by the launcher, so
the isolation seen is SELinux's alone (the guest prints its LSM list).

The same checks then run on the real path ("real-*" checks): runc starts a
third container with shimlet-hook as its createRuntime/poststop hook, the
hook starts the real shim, and two `shimctl --local exec -t` sessions go
through shimlet-session (the local socket, ticket, nsenter with setexeccon and the pty
relabelled). The guest's hook config sets isolation.landlock = "off", so the
isolation seen there is SELinux's alone too.

A guest kernel that locks up under the emulator (a soft lockup, seen once in
CI before any shimlet code ran) panics and is booted once more on a fresh
image (tests/vm/build_image.py BOOT_ATTEMPTS); a failed check is never retried.

Needs root, debootstrap, qemu-system-x86, a Debian 6.1 kernel in /boot
(scripts/deps) and network for the first build. Missing pieces FAIL.
"""
import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("SHIMLET_BIN", os.path.join(REPO, "build", "bin"))
BUILDER = os.path.join(REPO, "tests", "vm", "build_image.py")
CACHE = os.environ.get("SHIMLET_VM_CACHE", os.path.join(REPO, "build", "vm"))

# One VM boot per run: deselected in the ASan pass (an ASan build would need libasan in the guest).
# The module fixture builds and boots the VM (its own 1800 s bound): more than pytest.ini's per-test 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2100)]

EXPECTED_CHECKS = [
    "enforcing", "backend-status", "module-loaded", "shim-domain", "exec-file-context",
    "container-ctr1-label", "container-ctr2-label",
    "session-A-label", "session-B-label", "sessions-distinct",
    "session-A-pty-label", "session-B-pty-label", "session-A-socket-label", "session-B-socket-label",
    "container-file-written", "container-cannot-read-session",
    "avc-session-A-denied", "avc-session-B-denied", "avc-signal",
]
for _s in ("A", "B"):
    for _p in ("read-peer-environ", "read-peer-fd", "signal-peer", "write-peer-pty", "write-own-pty",
               "read-container-init-environ", "read-container-file", "write-container-file", "create-file"):
        EXPECTED_CHECKS.append(f"session-{_s}-{_p}")
        EXPECTED_CHECKS.append(f"real-session-{_s}-{_p}")
    EXPECTED_CHECKS += [f"real-session-{_s}-label", f"real-session-{_s}-pty-label", f"real-avc-session-{_s}-denied"]
EXPECTED_CHECKS += ["real-hook-registered", "real-shim-domain", "real-sessions-distinct", "real-container-file-written",
                    "real-container-cannot-read-session", "real-isolation-logged"]


@pytest.fixture(scope="module")
def vm_log():
    if os.geteuid() != 0:
        pytest.fail("the SELinux VM test needs root (debootstrap, chroot, mount)")
    for b in ("selinux-launch", "shimlet", "shimlet-session", "shimlet-hook", "shimctl"):
        if not os.path.exists(os.path.join(BIN, b)):
            pytest.fail(f"{BIN}/{b} missing: build the project first (scripts/build)")
    os.makedirs(CACHE, exist_ok=True)
    log = os.path.join(CACHE, "run.log")
    if os.path.exists(log):
        os.remove(log)
    t0 = time.time()
    p = subprocess.run([sys.executable, BUILDER, "--boot", "--log", log, "--cache", CACHE, "--bin", BIN],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1800)
    took = time.time() - t0
    print(p.stdout.decode(errors="replace"))
    print(f"SELinux VM test: build+boot wall time {took:.1f}s")
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    print(text)
    if p.returncode != 0:
        pytest.fail(f"VM builder failed (exit {p.returncode}):\n{p.stdout.decode(errors='replace')[-4000:]}\n{text[-4000:]}")
    return text


def test_vm_ran_to_completion(vm_log):
    assert "=== policy loaded: enforce=1 mls=1" in vm_log, vm_log[-3000:]
    assert "checks: done" in vm_log, vm_log[-3000:]
    assert "=== VM T_END" in vm_log, vm_log[-3000:]


def test_all_checks_pass(vm_log):
    results = dict(re.findall(r"^CHECK (\S+): (PASS|FAIL)", vm_log, re.M))
    missing = [c for c in EXPECTED_CHECKS if c not in results]
    failed = [line for line in vm_log.splitlines() if line.startswith("CHECK ") and ": FAIL" in line]
    assert not missing, f"checks missing from the VM output: {missing}\n{vm_log[-4000:]}"
    assert not failed, "failed checks:\n" + "\n".join(failed)


def test_session_labels_are_supersets(vm_log):
    ctr = re.search(r"CHECK container-ctr1-label: PASS .*label=(\S+)", vm_log).group(1)
    labels = re.findall(r"^session [AB]: host pid=\d+ label=(\S+)", vm_log, re.M)
    assert len(labels) == 2 and labels[0] != labels[1], labels
    for l in labels:
        assert l.startswith(ctr + ","), (ctr, l)
        cat = int(l.rsplit(",c", 1)[1])
        assert 1000 <= cat <= 1023, l


def test_denials_are_audited(vm_log):
    section = vm_log.split("=== AVC denials:", 1)
    assert len(section) == 2, "no AVC section in the VM output"
    avcs = section[1]
    assert re.search(r"denied +\{ signal \}.*shimlet_container_t:s0:c1,c2,c10\d\d tcontext=\S+shimlet_container_t:s0:c1,c2,c10\d\d", avcs), avcs
    assert re.search(r"denied +\{ \w+ \}.*tcontext=\S+:s0:c1,c2,c10\d\d tclass=(file|dir|chr_file)", avcs), avcs


def test_real_session_labels_are_supersets(vm_log):
    labels = re.findall(r"^real session [AB]: pid=\d+ tty=\S+ label=(\S+)", vm_log, re.M)
    assert len(labels) == 2 and labels[0] != labels[1], labels
    for l in labels:
        assert l.startswith("system_u:system_r:shimlet_container_t:s0:c5,c6,c"), l
        cat = int(l.rsplit(",c", 1)[1])
        assert 1000 <= cat <= 1023, l
