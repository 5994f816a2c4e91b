"""The mount checks behind the bpffs/tracefs-missing sentences (issue 17), on directories that
are not those filesystems; tests/kernel/test_mounts_missing.py and
tests/e2e/test_mounts_missing_service.py meet them for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from loaderd.bpf import kernel, pins
from loaderd.errors import LoaderdError


def test_a_pin_root_on_another_filesystem_names_the_mount_point(tmp_path: Path) -> None:
    root = tmp_path / "bpf" / "loaderd"
    missing = pins.bpffs_missing(str(root))  # neither exists: the nearest ancestor is named
    assert missing is not None and missing[0] == str(tmp_path), missing
    assert missing[1] == (f"no bpf filesystem is mounted at {tmp_path} (the pin root {root} "
                          "is below it): every pin there is gone")
    root.mkdir(parents=True)
    missing = pins.bpffs_missing(str(root))
    assert missing is not None and missing[0] == str(root) and "is not on one" in missing[1]
    with pytest.raises(LoaderdError) as err:
        pins.check_bpffs_mounted(str(root))
    assert f"mount -t bpf -o mode=0700 bpf {root}" in str(err.value)
    assert "systemctl restart loaderd" in str(err.value)
    assert "; fix: mount it" in str(err.value) and "allowed" not in str(err.value)


def test_tracefs_missing_is_said_for_a_plain_directory(tmp_path: Path) -> None:
    err = kernel.tracefs_missing(str(tmp_path))
    assert err is not None
    assert err.message.startswith(f"tracefs is not mounted at {tmp_path}: tracepoint programs "
                                  "cannot be attached; fix: mount it")
    assert f"mount -t tracefs tracefs {tmp_path}" in str(err) and err.allowed is None
    with pytest.raises(LoaderdError) as raised:  # a missing id file is not "no such tracepoint"
        kernel.tracepoint_id("sched", "sched_process_exec", str(tmp_path))
    assert raised.value.message.startswith("tracefs is not mounted at ")
