"""Cgroup targets resolved without a kernel: the cgroup2 mount from a mountinfo text, paths
kept below it, and a unit refused in one sentence where systemd is not running."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from loaderd.bpf import cgroup
from loaderd.errors import LoaderdError
from loaderd.model import CgroupSkbAttach

HYBRID = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_cgroup2_mount_is_read_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(HYBRID)
    assert cgroup.cgroup2_mount(str(info), check_visible=False) == "/sys/fs/cgroup/unified"
    info.write_text(HYBRID.splitlines()[0] + "\n")
    with pytest.raises(LoaderdError, match="cgroup2 is not mounted"):
        cgroup.cgroup2_mount(str(info), check_visible=False)


def test_a_cgroup2_mount_hidden_under_a_later_one_is_skipped(tmp_path: Path) -> None:
    # A container's view: the host's hybrid mount is still listed, under a tmpfs mounted over
    # /sys/fs/cgroup, then its own cgroup2 on /sys/fs/cgroup. The listed device of the hidden
    # one is not what its path shows now.
    info = tmp_path / "mountinfo"
    info.write_text(HYBRID.replace("0:38", "0:9999") + "99 31 0:77 / "
                    f"{tmp_path} rw - cgroup2 cgroup2 rw\n")
    st = os.stat(tmp_path)
    info.write_text(info.read_text().replace("0:77", f"{os.major(st.st_dev)}:"
                                             f"{os.minor(st.st_dev)}"))
    assert cgroup.cgroup2_mount(str(info)) == str(tmp_path)


def test_unit_without_systemd_is_one_sentence(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setattr(cgroup, "SYSTEMD_RUNNING", str(tmp_path / "absent"))
    with pytest.raises(LoaderdError) as exc:
        cgroup.resolve(CgroupSkbAttach("ingress", unit="web.service"))
    assert exc.value.message == (f"systemd is not running (no {tmp_path}/absent): unit "
                                 "web.service cannot be resolved to its cgroup")


def test_missing_cgroup_names_the_directory() -> None:
    with pytest.raises(LoaderdError, match=r"no such cgroup: .*/ldtest_never_made"):
        cgroup.resolve(CgroupSkbAttach("ingress", path="ldtest_never_made"))


@pytest.mark.parametrize("order, flags", [("first", 1 << 3), ("last", 0)])
def test_an_order_on_a_kernel_without_cgroup_mprog_is_one_sentence(
        monkeypatch: pytest.MonkeyPatch, order: str, flags: int) -> None:
    """On older kernels a cgroup link's BPF_LINK_CREATE takes no placement flags (EINVAL);
    `last` (no flags) is the plain attach every kernel with cgroup links has."""
    from loaderd.bpf import attach, kernel
    from loaderd.errors import Kind, Location
    seen: list[int] = []

    def old_kernel(prog_fd: int, target: int, attach_type: int, fl: int = 0,
                   relative: int = 0, expected_revision: int = 0) -> int:
        seen.append(fl)
        if fl:
            raise kernel.KernelError(Kind.KERNEL, "BPF_LINK_CREATE failed: Invalid argument",
                                     Location(), errno=errno.EINVAL, op="BPF_LINK_CREATE")
        return 99

    monkeypatch.setattr(kernel, "mprog_link_create", old_kernel)
    a = CgroupSkbAttach("egress", path="web", order=order)
    if flags:
        with pytest.raises(LoaderdError) as err:
            attach._mprog_link(a, 5, 7, None)
        assert str(err.value.message) == ("order first: this kernel cannot order programs on a "
                                          "cgroup hook (its cgroup links take no "
                                          "BPF_F_BEFORE/BPF_F_AFTER: EINVAL)")
    else:
        assert attach._mprog_link(a, 5, 7, None) == 99
    assert seen == [flags]


def test_a_unit_is_found_by_its_invocation_id_never_in_a_delegated_subtree(
        tmp_path: Path) -> None:
    """The one root-owned directory named after the unit, below slices, carrying its id; a
    look-alike below a service (a delegated subtree: its owner can set user.* xattrs) or in a
    directory not owned by root is never taken; two candidates: neither."""
    inv = "4099f651cff448ad8eddae332ac87066"
    real = tmp_path / "system.slice" / "web.service"
    delegated = tmp_path / "user.slice" / "user@1000.service" / "app.slice" / "web.service"
    not_root = tmp_path / "evil.slice" / "web.service"
    for d in (real, delegated, not_root):
        d.mkdir(parents=True)
        try:
            os.setxattr(d, "user.invocation_id", inv.encode())
        except OSError as exc:
            pytest.skip(f"no user xattrs on {tmp_path}: {exc.strerror}")
    os.chown(not_root.parent, 1000, 1000)
    assert cgroup._invocation_cgroup(str(tmp_path), "web.service", inv) == str(real)
    assert cgroup._invocation_cgroup(str(tmp_path), "web.service", "0" * 32) is None
    os.chown(not_root.parent, 0, 0)  # now a second candidate: ambiguous, neither is taken
    assert cgroup._invocation_cgroup(str(tmp_path), "web.service", inv) is None
    os.removexattr(not_root, "user.invocation_id")
    os.removexattr(real, "user.invocation_id")
    os.setxattr(real, "user.invocation_id", bytes.fromhex(inv))  # 16 raw bytes read as hex
    assert cgroup._invocation_cgroup(str(tmp_path), "web.service", inv) == str(real)
