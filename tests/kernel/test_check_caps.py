"""`loaderd check` without CAP_BPF (issue 12 item 9): the missing capability is named, from
the process's own /proc/self/status, before any compile; it used to blame the compiler
("could not open bpf map: Operation not permitted")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_conf
from tests.kernel.test_lifecycle import COUNTER

pytestmark = pytest.mark.kernel


@pytest.fixture
def world_conf(bpffs_root: str) -> Iterator[Path]:
    """Settings and a spec an unprivileged author can read (outside pytest's 0700 tmp)."""
    d = Path(tempfile.mkdtemp(prefix="ldcheck-", dir="/tmp"))
    try:
        yield make_conf(d, bpffs_root, {"counter": COUNTER.format(step=1)})
    finally:
        shutil.rmtree(d, ignore_errors=True)


def check_as_nobody(conf: Path, code: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
           "--bounding-set=-all", "--no-new-privs", sys.executable, "-m", "loaderd",
           "--config", str(conf), "check", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": code, "HOME": "/"})


def test_check_without_cap_bpf_says_so_before_compiling(world_conf: Path,
                                                        shared_code: str) -> None:
    out = check_as_nobody(world_conf, shared_code)
    assert out.returncode == 1, out.stdout + out.stderr
    assert ("error: /proc/self/status: compiling and verifying needs CAP_BPF, which this "
            "process does not have (CapEff 0000000000000000)") in out.stderr, out.stderr
    assert "--no-kernel" in out.stderr
    assert "could not open bpf map" not in out.stdout + out.stderr
    assert "1 spec, 1 error" in out.stdout, out.stdout
    # The part that needs no capability still works for the author.
    ok = check_as_nobody(world_conf, shared_code, "--no-kernel")
    assert ok.returncode == 0 and "1 spec, 0 errors" in ok.stdout, ok.stdout + ok.stderr


def test_check_as_root_still_compiles(world_conf: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-m", "loaderd", "--config", str(world_conf), "check"],
                         capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: counter/count_exec: verifier accepted" in out.stdout
