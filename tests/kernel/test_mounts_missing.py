"""bpffs and tracefs missing (issue 17), on the real kernel, each in a private mount namespace
or on a pin root that is not on bpffs - the host's /sys/fs/bpf and tracefs are never
unmounted. An apply refuses, before it changes anything, with one sentence naming the mount
point and the fix; once the filesystem is mounted the same apply goes through. The running
resident under systemd: tests/e2e/test_mounts_missing_service.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, loaderd, make_conf
from tests.kernel.test_lifecycle import COUNTER

pytestmark = pytest.mark.kernel


def in_private_mounts(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` (sh) in a mount namespace of its own (no propagation back to the host):
    what it mounts or unmounts there is gone with it; "$@" are `args`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PY=sys.executable)
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-ec",
                           script, "sh", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_pin_root_not_on_bpffs_is_refused_then_mounted_applies(tmp_path: Path) -> None:
    mnt = tmp_path / "bpf"  # where a bpffs should be, and is not (a plain dir on /tmp's fs)
    mnt.mkdir()
    root = f"{mnt}/loaderd"
    conf = make_conf(tmp_path, root, {"counter": COUNTER.format(step=1)})
    refused = loaderd("--config", str(conf), "apply", check=False)
    out = refused.stdout + refused.stderr
    assert refused.returncode == 1, out
    assert (f"{root}: no bpf filesystem is mounted at {mnt} (the pin root {root} is below "
            "it): every pin there is gone; fix: mount it (`mount -t bpf -o mode=0700 bpf "
            f"{mnt}`)") in out, out
    assert "internal error" not in out and "Traceback" not in out, out
    assert os.listdir(mnt) == []  # nothing made, nothing half-applied
    assert not (tmp_path / "state" / "manifest.json").exists()
    status = loaderd("--config", str(conf), "status", check=False)
    assert status.returncode == 3, status  # the refusal, said
    assert f"no bpf filesystem is mounted at {mnt}" in status.stdout, status.stdout

    # Recovery: the bpffs mounted (here only in a namespace that dies with the check).
    done = in_private_mounts('mount -t bpf bpf "$1"; $PY -m loaderd --config "$2" apply; '
                             '$PY -m loaderd --config "$2" status', str(mnt), str(conf))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "counter: ok" in done.stdout, done.stdout
    assert "no bpf filesystem" not in done.stdout, done.stdout


def test_tracefs_missing_at_apply_is_refused_before_any_compile(tmp_path: Path,
                                                                bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"counter": COUNTER.format(step=1)})
    spec = tmp_path / "specs" / "counter.yaml"
    line = next(i for i, t in enumerate(spec.read_text().splitlines(), 1) if "attach:" in t)
    gone = in_private_mounts('while mountpoint -q /sys/kernel/tracing; do '
                             'umount /sys/kernel/tracing; done; '
                             'if mountpoint -q /sys/kernel/debug; then umount -l '
                             '/sys/kernel/debug; fi; exec $PY -m loaderd --config "$1" apply',
                             str(conf))
    out = gone.stdout + gone.stderr
    assert gone.returncode == 1, out
    assert (f"{spec}:{line}: programs[0].attach: count_exec: tracefs is not mounted at "
            "/sys/kernel/tracing: tracepoint programs cannot be attached; fix: mount it "
            "(`mount -t tracefs tracefs /sys/kernel/tracing`") in out, out
    assert "compil" not in out.lower(), out  # refused before any compile
    assert not os.path.exists(bpffs_root) or os.listdir(bpffs_root) in ([], ["_staging"])
    assert not (tmp_path / "state" / "manifest.json").exists()
    assert os.path.ismount("/sys/kernel/tracing")  # the host's is still there
    loaderd("--config", str(conf), "apply")  # with tracefs (the host's): applied
    assert loaderd("--config", str(conf), "status").returncode == 0
