"""loaderctl audit-system on the real kernel (issue 12 item 8): the baseline is the service
user's whoever runs it (a root run left it root 0600, unreadable by loaderd-audit.service), and
systemd's own cgroup programs count as systemd's only on facts - a systemd program name and
type, created by uid 0, attached at systemd's hook to a unit's cgroup - never on the name
alone. (The e2e test sees the real systemd's on a clean install.)"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loaderd.bpf import kernel
from loaderd.reports.foreign import _cgroup2_root
from tests.kernel.test_foreign import audit_system, conf

pytestmark = pytest.mark.kernel
__all__ = ["conf"]  # the fixture, used below

SD_FW = "int sd_fw_ingress(struct __sk_buff *skb) { return 1; }"
BPF_CGROUP_INET_INGRESS = 0


@pytest.fixture
def unit_cgroup() -> Iterator[str]:
    """A cgroup named like a unit's (systemd's programs attach to those)."""
    root = _cgroup2_root()
    assert root is not None
    path = os.path.join(root, f"ldtest-{uuid.uuid4().hex[:8]}.service")
    os.mkdir(path)
    try:
        yield path
    finally:
        os.rmdir(path)


def sd_fw(bcc_compile: Callable[[str], Any]) -> Any:
    b = bcc_compile(SD_FW)
    return b.load_func(b"sd_fw_ingress", b.CGROUP_SKB)


def test_systemd_program_attached_to_a_unit_cgroup_is_systemds(
        conf: Path, unit_cgroup: str, bcc_compile: Callable[[str], Any]) -> None:
    fn = sd_fw(bcc_compile)
    prog_id = kernel.prog_info(fn.fd).id
    # A copy of the same code attached nowhere: what systemd keeps loaded for a finished
    # oneshot, or loads before it frees the last copy (measured on systemd 252).
    copy_id = kernel.prog_info(sd_fw(bcc_compile).fd).id
    cg = os.open(unit_cgroup, os.O_RDONLY | os.O_DIRECTORY)
    lib = kernel.libbpf()
    assert lib.bpf_prog_attach(fn.fd, cg, BPF_CGROUP_INET_INGRESS, 0) == 0
    try:
        _rc, report, events = audit_system(conf, "--no-baseline")
        unit = os.path.basename(unit_cgroup)
        theirs = {p["id"]: p for p in report["systemd_programs"]}
        assert theirs[prog_id]["unit"] == unit, report["systemd_programs"]
        assert (theirs[prog_id]["type"], theirs[prog_id]["name"]) == ("cgroup_skb",
                                                                       "sd_fw_ingress")
        assert theirs[copy_id]["unit"] == f"(not attached; the code on {unit})"
        assert not {prog_id, copy_id} & {p["id"] for p in report["foreign_programs"]}
        assert not any(e.get("prog_id") in (prog_id, copy_id) for e in events)
    finally:
        lib.bpf_prog_detach2(fn.fd, cg, BPF_CGROUP_INET_INGRESS)
        os.close(cg)


def test_the_name_alone_is_not_enough(conf: Path, bcc_compile: Callable[[str], Any]) -> None:
    """Same name and type, attached nowhere: foreign, and alerted."""
    fn = sd_fw(bcc_compile)
    prog_id = kernel.prog_info(fn.fd).id
    rc, report, events = audit_system(conf, "--no-baseline")
    assert rc == 1
    assert prog_id in {p["id"] for p in report["foreign_programs"]}
    assert prog_id not in {p["id"] for p in report["systemd_programs"]}
    assert any(e.get("prog_id") == prog_id and e["priority"] == 2 for e in events)


def test_a_root_run_leaves_the_baseline_the_service_users(conf: Path) -> None:
    state = conf.parent / "state"
    nobody = 65534
    os.chown(state, nobody, -1)  # as systemd's StateDirectory= makes it: the service user's
    with open(conf, "a") as f:
        f.write("service_user: nobody\n")
    audit_system(conf)
    st = os.stat(state / "sysaudit.json")
    assert (st.st_uid, st.st_mode & 0o777) == (nobody, 0o600)
