"""System-wide audit on the real kernel: a program loaded behind loaderd's back (BCC, in this
test process) is reported as foreign and journaled once; loaderd's own are not; a burst of
loads is found; without CAP_SYS_ADMIN the command says what it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loaderd.bpf import kernel
from loaderd.reports.foreign import bursts
from tests.conftest import REPO, loaderd, write_settings

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: bpf() enumeration")

SPEC = """loaderd: 1
source:
  inline: |
    int mine(struct __sk_buff *skb) { return skb->len; }
programs:
  - {name: mine, type: socket_filter, attach: none}
"""

SNEAKY = """
int sneaky_a(struct __sk_buff *skb) { return 0; }
int sneaky_b(struct __sk_buff *skb) { return 1; }
int sneaky_c(struct __sk_buff *skb) { return 2; }
"""


def audit_system(conf: Path, *args: str) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "loaderd.cli.loaderctl", "--config", str(conf),
                          "audit-system", "--json", *args], capture_output=True, text=True,
                         timeout=120, env=env, check=False)
    assert out.returncode in (0, 1), out.stderr
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    return out.returncode, json.loads(out.stdout), events


@pytest.fixture
def conf(tmp_path: Path, bpffs_root: str) -> Path:
    specs = tmp_path / "specs"
    specs.mkdir()
    os.chmod(tmp_path, 0o755)
    (specs / "own.yaml").write_text(SPEC)
    c = write_settings(tmp_path, bpffs_root, specs)
    loaderd("--config", str(c), "apply")
    return c


def loaded_ids(bpf: Any, names: list[str]) -> list[int]:
    ids = []
    for name in names:
        fn = bpf.load_func(name.encode(), bpf.SOCKET_FILTER)
        ids.append(kernel.prog_info(fn.fd).id)
    return ids


@pytest.mark.kernel
@ROOT_ONLY
def test_program_loaded_behind_loaderds_back_is_reported_once(
        conf: Path, bpffs_root: str, bcc_compile: Callable[[str], Any]) -> None:
    own_fd = kernel.obj_get(f"{bpffs_root}/own/progs/mine")
    try:
        own_id = kernel.prog_info(own_fd).id
    finally:
        os.close(own_fd)
    (sneaky_id,) = loaded_ids(bcc_compile(SNEAKY), ["sneaky_a"])

    rc, report, events = audit_system(conf)
    foreign = {p["id"]: p for p in report["foreign_programs"]}
    assert rc == 1 and report["findings"] is True
    assert sneaky_id in foreign and own_id not in foreign
    assert own_id in report["loaderd_programs"]
    p = foreign[sneaky_id]
    assert (p["type"], p["name"], p["uid"], p["new"]) == ("socket_filter", "sneaky_a", 0, True)
    assert sneaky_id in report["new_foreign_programs"]
    alert = next(e for e in events if e.get("prog_id") == sneaky_id)
    assert alert["priority"] == 2 and alert["audit"] == "foreign_program"
    assert f"foreign BPF program id {sneaky_id}" in alert["message"]
    summary = next(e for e in events if e.get("audit") == "system")
    assert summary["new"] >= 1

    # Second run: still foreign, no longer new, not journaled again.
    _rc, report, events = audit_system(conf)
    again = {p["id"]: p for p in report["foreign_programs"]}
    assert again[sneaky_id]["new"] is False
    assert not any(e.get("prog_id") == sneaky_id for e in events)
    baseline = json.loads((conf.parent / "state" / "sysaudit.json").read_text())
    assert f"socket_filter:sneaky_a:{p['tag']}" in baseline["foreign_programs"]

    # The same code loaded again is a known program, not a new finding.
    (again_id,) = loaded_ids(bcc_compile(SNEAKY), ["sneaky_a"])
    _rc, report, events = audit_system(conf)
    copy = next(p for p in report["foreign_programs"] if p["id"] == again_id)
    assert copy["new"] is False and again_id not in report["new_foreign_programs"]


@pytest.mark.kernel
@ROOT_ONLY
def test_burst_of_loads_is_reported(conf: Path, bcc_compile: Callable[[str], Any]) -> None:
    ids = loaded_ids(bcc_compile(SNEAKY), ["sneaky_a", "sneaky_b", "sneaky_c"])
    rc, report, events = audit_system(conf, "--burst", "2", "--window", "30", "--no-baseline")
    assert rc == 1
    hit = [b for b in report["bursts"] if set(ids) <= set(b["prog_ids"])]
    assert hit and hit[0]["count"] >= 3 and hit[0]["new"] is True
    alert = next(e for e in events if e.get("audit") == "load_burst"
                 and set(ids) <= set(e["prog_ids"]))
    assert alert["priority"] == 2 and "burst of BPF program loads" in alert["message"]
    assert report["threshold"] == {"burst": 2, "window": 30.0}


@pytest.mark.kernel
@ROOT_ONLY
def test_without_cap_sys_admin_it_names_the_capability(conf: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin",
                          sys.executable, "-m", "loaderd.cli.loaderctl", "--config", str(conf),
                          "audit-system"], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 1, out.stdout
    assert "CAP_SYS_ADMIN" in out.stderr and "cannot enumerate" in out.stderr


def _progs(*times: float) -> list[dict[str, Any]]:
    return [{"id": i + 1, "loaded_at": t} for i, t in enumerate(times)]


def test_bursts_from_load_times() -> None:
    assert bursts(_progs(0, 100, 200, 300), threshold=1, window=10) == []
    (b,) = bursts(_progs(0, 1, 2, 100), threshold=2, window=5)
    assert (b["prog_ids"], b["count"], b["first"], b["last"]) == ([1, 2, 3], 3, 0.0, 2.0)
    found = bursts(_progs(0, 1, 2, 50, 51, 52, 53, 200), threshold=2, window=5)
    assert [b["prog_ids"] for b in found] == [[1, 2, 3], [4, 5, 6, 7]]
    assert bursts(_progs(0, 1, 2), threshold=3, window=5) == []  # "more than" the threshold
    assert bursts([], threshold=1, window=1) == []
