"""How the integration tests share one run (scripts/test runs them with
pytest-xdist: `-n JOBS --dist loadgroup`; see tests/README.md).

Every test belongs to one xdist group, and a group runs in one worker, in
file order. By default a test file is its own group, so its module fixtures
(a hook config and state dir, containers, a master) are built once and its
tests never overlap each other. Groups run in parallel: tests share nothing
but the machine (unique container ids, private state dirs, ports picked by
the kernel, process markers made unique per run).

A file whose tests are independent of each other but long may split itself:
`@pytest.mark.xdist_group("NAME")` on a test (or `pytestmark` on the module)
puts it in group NAME, which then builds its own copy of the module fixtures
in whichever worker runs it. GROUP_ORDER starts the longest groups first, so
that the run ends with short ones (longest processing time first)."""
import os

import pytest

# Groups that start before the rest, longest first (measured with
# `--durations`); every other group follows in file order.
GROUP_ORDER = [
    "test_selinux_vm",     # debootstrap (cold cache) + one qemu boot under TCG
    "portforward-bulk",    # 4 GiB and 256 MiB transfers, iperf3
    "test_kubectl",
    "exec-bulk",           # 100 MB stdin, slow reader, seq in tty mode
    "recording-bulk",      # 50 MB of random bytes through a recorded exec
    "test_master_multinode",
    "test_master_ha",      # a 3-member etcd cluster, three masters, 500 grants, leases running out
]


def group_of(item):
    mark = item.get_closest_marker("xdist_group")
    if mark:
        return mark.args[0] if mark.args else mark.kwargs.get("name", "default")
    return os.path.splitext(os.path.basename(str(item.fspath)))[0]


@pytest.hookimpl(tryfirst=True)  # before xdist appends "@GROUP" to the node ids
def pytest_collection_modifyitems(config, items):
    rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group_of(item)))
    # Stable: within a group (and among the unranked groups) file order stays.
    items.sort(key=lambda it: rank.get(group_of(it), len(GROUP_ORDER)))
