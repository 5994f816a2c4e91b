"""Perf buffers read by the packaged, capability-free resident (issue 18), on real systemd 252.

The shipped exitsnoop port (a BPF_PERF_OUTPUT tool) is installed as an operator would; at
start loaderd-apply.service (CAP_PERFMON) opens its per-CPU events and hands them through
loaderd-handover.socket to loaderd.service, which holds no capability and journals each exit
with its code. A second perf buffer added by `systemctl reload` is read by the same resident
(no restart); a restart hands them over again; stopping loaderd stops the socket (nothing can
start it behind the operator's back)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sysd import Systemd

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
UNIT, APPLY, SOCKET = "loaderd.service", "loaderd-apply.service", "loaderd-handover.socket"
EXITSNOOP = (REPO / "configs" / "examples" / "exitsnoop.yaml").read_text()


@pytest.fixture(scope="module")
def packaged(sysd: Systemd, deb: Path) -> Iterator[Systemd]:
    sysd.install_deb(deb)
    sysd.write("/etc/loaderd/programs.d/exitsnoop.yaml", EXITSNOOP)
    yield sysd
    sysd.systemctl("stop", UNIT, check=False)


def _bpf_events(sysd: Systemd, since: str, comm: str) -> list[dict[str, Any]]:
    return [e for e in sysd.journal_json("-u", UNIT, f"--since={since}")
            if e.get("LOADERD_EVENT") == "bpf_event" and e.get("LOADERD_EVENT_COMM") == comm]


def _exits(sysd: Systemd, since: str, codes: list[int], timeout: float = 20.0
           ) -> tuple[str, list[dict[str, Any]]]:
    """Run a freshly named shell that exits with each code; its journaled exit events."""
    name = f"ldps{uuid.uuid4().hex[:8]}"
    sysd.run("cp", "/bin/sh", f"/run/{name}")
    for code in codes:
        sysd.run(f"/run/{name}", "-c", f"exit {code}", check=False)
    deadline = time.monotonic() + timeout
    while True:
        got = _bpf_events(sysd, since, name)
        if len(got) >= len(codes) or time.monotonic() > deadline:
            return name, got
        time.sleep(0.3)


def _now(sysd: Systemd) -> str:
    return sysd.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()


def _caps(sysd: Systemd, pid: str) -> dict[str, int]:
    lines = sysd.run("cat", f"/proc/{pid}/status").stdout.splitlines()
    return {k: int(v, 16) for k, v in (ln.split(":\t") for ln in lines)
            if k in ("CapEff", "CapPrm", "CapBnd")}


def test_packaged_resident_journals_perf_buffer_events(packaged: Systemd) -> None:
    since = _now(packaged)
    time.sleep(1)
    packaged.systemctl("start", UNIT, timeout=300)
    assert packaged.show(SOCKET, "ActiveState")["ActiveState"] == "active"
    pid = packaged.show(UNIT, "MainPID")["MainPID"]
    assert _caps(packaged, pid) == {"CapEff": 0, "CapPrm": 0, "CapBnd": 0}
    handed = [e for e in packaged.journal_json("-u", APPLY, f"--since={since}")
              if "handed 1 perf buffer" in str(e.get("MESSAGE", ""))]
    assert handed, packaged.journalctl("-u", APPLY, "-u", UNIT, "-n", "30").stdout
    time.sleep(1)
    _name, got = _exits(packaged, since, [3, 5, 7, 0])
    assert [int(str(e["LOADERD_EVENT_CODE"])) for e in got] == [3, 5, 7, 0], (
        packaged.journalctl("-u", UNIT, "-n", "30").stdout)
    assert all(e["LOADERD_SPEC"] == "exitsnoop" and e["LOADERD_MAP"] == "exits" for e in got)


def test_reload_adds_a_perf_buffer_read_without_restart(packaged: Systemd) -> None:
    pid = packaged.show(UNIT, "MainPID")["MainPID"]
    packaged.write("/etc/loaderd/programs.d/exitsnoop2.yaml",
                   EXITSNOOP.replace("description: process exits",
                                     "description: again, process exits"))
    since = _now(packaged)
    time.sleep(1)
    packaged.systemctl("reload", UNIT, timeout=300)
    assert packaged.show(UNIT, "MainPID")["MainPID"] == pid  # the same resident
    time.sleep(2)
    name, got = _exits(packaged, since, [4, 6])
    per_spec = {s: [int(str(e["LOADERD_EVENT_CODE"])) for e in got if e["LOADERD_SPEC"] == s]
                for s in ("exitsnoop", "exitsnoop2")}
    deadline = time.monotonic() + 20
    while per_spec["exitsnoop2"] != [4, 6] and time.monotonic() < deadline:
        time.sleep(0.5)
        got = _bpf_events(packaged, since, name)
        per_spec = {s: [int(str(e["LOADERD_EVENT_CODE"])) for e in got
                        if e["LOADERD_SPEC"] == s] for s in ("exitsnoop", "exitsnoop2")}
    assert per_spec == {"exitsnoop": [4, 6], "exitsnoop2": [4, 6]}, (
        packaged.journalctl("-u", UNIT, "-u", APPLY, "-n", "40").stdout)
    # The resident's counters (its events.json, owned by loaderd) in root's `loaderd status`
    deadline = time.monotonic() + 40  # written at the next drift tick (30 s)
    while True:
        report = json.loads(packaged.run("loaderd", "status", "--json", check=False).stdout)
        counts = {f"{m['spec']}/{m['map']}": m
                  for m in (report["manifest"]["events"] or {}).get("maps", [])}
        if counts.get("exitsnoop2/exits", {}).get("read", 0) >= 2 or (
                time.monotonic() > deadline):
            break
        time.sleep(1)
    assert report["manifest"]["events"]["pid"] == int(pid)
    assert set(counts) == {"exitsnoop/exits", "exitsnoop2/exits"}, report["manifest"]
    assert counts["exitsnoop2/exits"]["read"] >= 2 and counts["exitsnoop/exits"]["read"] >= 6
    assert all(m["backlog"] == 0 for m in counts.values()), counts  # a fresh perf ring


def test_crashed_resident_gets_its_perf_events_again(packaged: Systemd) -> None:
    """Restart=on-failure: systemd's restart job pulls loaderd-apply in again, whose handover
    waits in the socket (it stays up across the automatic restart) for the new resident."""
    old = packaged.show(UNIT, "MainPID")["MainPID"]
    since = _now(packaged)
    time.sleep(1)
    packaged.systemctl("kill", "--signal=KILL", UNIT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = packaged.show(UNIT, "ActiveState", "MainPID")
        if state["ActiveState"] == "active" and state["MainPID"] not in ("0", old):
            break
        time.sleep(0.5)
    assert state["ActiveState"] == "active" and state["MainPID"] != old, state
    assert packaged.show(SOCKET, "ActiveState")["ActiveState"] == "active"
    time.sleep(2)
    _name, got = _exits(packaged, since, [8])
    assert sorted(str(e["LOADERD_SPEC"]) for e in got) == ["exitsnoop", "exitsnoop2"], (
        packaged.journalctl("-u", UNIT, "-u", APPLY, "-n", "40").stdout)


def test_restart_hands_over_again_and_stop_stops_the_socket(packaged: Systemd) -> None:
    since = _now(packaged)
    time.sleep(1)
    packaged.systemctl("restart", UNIT, timeout=300)
    time.sleep(1)
    _name, got = _exits(packaged, since, [2])
    assert sorted(str(e["LOADERD_SPEC"]) for e in got) == ["exitsnoop", "exitsnoop2"], (
        packaged.journalctl("-u", UNIT, "-u", APPLY, "-n", "40").stdout)
    packaged.systemctl("stop", UNIT)
    assert packaged.show(SOCKET, "ActiveState")["ActiveState"] == "inactive"
    # an apply by hand with the resident stopped hands nothing over and starts nothing
    packaged.systemctl("start", APPLY, timeout=300)
    time.sleep(1)
    assert packaged.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
