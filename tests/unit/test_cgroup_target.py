"""Cgroup targets resolved without a kernel: the cgroup2 mount from a mountinfo text, paths
kept below it, and a unit refused in one sentence where systemd is not running."""

from __future__ import annotations

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
    assert cgroup.cgroup2_mount(str(info)) == "/sys/fs/cgroup/unified"
    info.write_text(HYBRID.splitlines()[0] + "\n")
    with pytest.raises(LoaderdError, match="cgroup2 is not mounted"):
        cgroup.cgroup2_mount(str(info))


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
