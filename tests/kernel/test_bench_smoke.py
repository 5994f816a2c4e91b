"""The benchmark's own functions, for N=1, on the real kernel: they produce numbers, a restart
compiles nothing, the counter misses nothing across a daemon restart. No timing assertions."""

from __future__ import annotations

import math
import os

import pytest

from bench import sandbox_cost
from bench.run import (
    audit_throughput,
    cold_and_restart,
    missed_across_restart,
    p4_rows,
    p5_rows,
    p6_rows,
    rows_for,
    rss_rows,
    table,
)

pytestmark = pytest.mark.kernel


def test_cold_start_and_restart_n1() -> None:
    r = cold_and_restart(1, reps=1, clang=None)
    s = r["samples"]
    for key in ("baseline", "apply", "apply_j1", "restart_apply", "run_ready", "restart_ready"):
        assert len(s[key]) == 1 and s[key][0] > 0 and math.isfinite(s[key][0]), key
    assert s["restart_apply_compiles"] == [0]
    assert s["restart_run_compiles"] == [0]
    assert r["baseline_report"]["loaded"] == 1
    assert r["resident"]["bcc_libs"] == []
    assert r["resident_restart"]["vmrss_kb"] > 0
    rows = rows_for(r) + rss_rows(r)
    assert "P1 cold apply, N=1" in table(rows)
    assert "P3 resident VmRSS after a restart" in table(rows)
    assert not os.path.exists(r["bpffs_root"])  # every pin of the run removed


def test_missed_events_and_audit_throughput() -> None:
    p4 = missed_across_restart(before_s=0.5, after_s=0.5)
    assert p4["generated"] > 0
    assert p4["restart_compiles"] == 0
    assert p4["missed"] == 0  # a pinned link keeps counting while no daemon runs
    assert not os.path.exists(p4["bpffs_root"])
    p5 = audit_throughput(events=200, rounds=1)
    assert p5["stderr_json"] > 0 and p5["json_write"] > 0
    # P5: stderr, journald and its client CPU per event
    assert len(p4_rows(p4)) == 3 and len(p5_rows(p5)) == 3


def test_sandbox_cost_numbers() -> None:
    r = sandbox_cost.measure(reps=1)
    for key in ("enter", "landlock", "seccomp", "confined", "unconfined"):
        assert len(r["samples"][key]) == 1 and r["samples"][key][0] > 0, key
    rows = p6_rows(r)
    assert len(rows) == 4 and rows[0].figure.startswith("P6 sandbox setup")


def test_objects_cold_and_restart_n1() -> None:
    from bench.workload import find_clang

    clang = find_clang()
    if clang is None:
        pytest.skip("no clang: the precompiled objects cannot be built here")
    r = cold_and_restart(1, reps=1, jobs1=False, daemon=False, clang=clang)
    s = r["samples"]
    assert len(s["object_apply"]) == 1 and s["object_apply"][0] > 0
    assert s["object_restart_loads"] == [0]
    assert any(row.figure.startswith("P7 cold apply of N=1 CO-RE objects") for row in rows_for(r))
    assert not os.path.exists(r["objects_bpffs_root"])
