"""Wall-clock steps (backwards and forwards) between and during applies: txids, generation order
and rollback follow the order of the applies, not the clock (issue 17).

The clock is stepped for the loaderd process only, with libfaketime (`faketime -f`, Debian's
faketime package: LD_PRELOAD over clock_gettime/time): the host clock is shared with everything
else on it and cannot be stepped safely, and a time namespace (unshare --time) offsets only
CLOCK_MONOTONIC and CLOCK_BOOTTIME, never CLOCK_REALTIME, which is the clock txids are made of.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_conf, no_staging_leftovers
from tests.kernel.test_lifecycle import COUNTER, prog_tag

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(shutil.which("faketime") is None,
                                 reason="faketime (scripts/setup-host.sh TEST_PKGS) missing")]


def at(offset: str | None, conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`loaderd` with its wall clock stepped by `offset` (faketime syntax, e.g. "-2d")."""
    prefix = ["faketime", "-f", offset] if offset else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "loaderd", "--config", str(conf),
                           *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def txid(conf: Path) -> str:
    doc = json.loads((conf.parent / "state" / "manifest.json").read_text())
    assert doc["status"] == "committed"
    return str(doc["txid"])


def test_txids_and_generations_follow_apply_order_across_clock_steps(
        tmp_path: Path, bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"counter": COUNTER.format(step=1)})
    spec = tmp_path / "specs" / "counter.yaml"
    prog = f"{bpffs_root}/counter/progs/count_exec"
    order, tags = [], []
    # now; 2 days back; 1 year ahead; back to now (a step backwards of a year)
    for step, offset in enumerate([None, "-2d", "+365d", None], start=1):
        spec.write_text(COUNTER.format(step=step))
        at(offset, conf, "apply")
        order.append(txid(conf))
        tags.append(prog_tag(prog)[1])
    assert order == sorted(order) and len(set(order)) == len(order), order
    gens = sorted(os.listdir(tmp_path / "state" / "generations"))
    assert gens == order  # pruning (KEEP_GENERATIONS) and rollback see apply order
    # Rollback, with the clock 30 days back: to the apply before the last one, by apply order
    # (by the clock it would be the "-2d" one), under a txid after all of them.
    at("-30d", conf, "rollback")
    assert prog_tag(prog)[1] == tags[2]
    assert txid(conf) > order[-1]
    assert no_staging_leftovers(bpffs_root)
    at(None, conf, "disable")
