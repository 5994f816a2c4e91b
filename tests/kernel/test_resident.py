"""The resident `loaderd run` stays lean over its whole life (real kernel): libbcc/LLVM/clang are
never mapped into it, not while its apply child compiles, not after reload or a drift check; a
restart with unchanged specs adopts every pin and compiles nothing.

test_pipeline checks the mapping once after a cold start; this follows the resident through
restart, SIGHUP and drift, sampling /proc/<pid>/maps all along."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bench.workload import COUNTER, Resident, mapped_bcc_libs, proc_status
from tests.conftest import loaderd, wait_until, write_settings

pytestmark = pytest.mark.kernel


def events(log: Path, kind: str) -> list[str]:
    """Audit lines of one kind (stderr JSON sink) in the daemon's log."""
    return [ln for ln in log.read_text().splitlines() if f'"event": "{kind}"' in ln]


def notifications(res: Resident, until: str, timeout: float = 15.0) -> list[str]:
    """sd_notify datagrams the daemon sends from now until one holds the line `until`."""
    deadline = time.monotonic() + timeout
    said: list[str] = []
    while not said or until not in said[-1].split("\n"):
        res.sock.settimeout(max(0.01, deadline - time.monotonic()))
        said.append(res.sock.recv(4096).decode())  # TimeoutError past the deadline
    return said


def prog_ids(manifest: dict[str, Any]) -> dict[str, int]:
    return {n: e["programs"]["count_exec"]["id"] for n, e in manifest["specs"].items()}


def test_resident_never_maps_bcc_and_restart_compiles_nothing(tmp_path: Path,
                                                              bpffs_root: str) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    os.chmod(tmp_path, 0o755)
    for i in range(2):
        (specs / f"count_{i}.yaml").write_text(COUNTER.format(i=i, step=10 + i))
    conf = write_settings(tmp_path, bpffs_root, specs)
    manifest_path = tmp_path / "state" / "manifest.json"
    seen: list[str] = []

    def sample(pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):  # exited: wait_ready reports it
            seen.extend(mapped_bcc_libs(pid))

    first = Resident(conf, tmp_path, drift_interval=0.5)
    try:
        first.wait_ready(240, lambda: sample(first.pid))  # sampled while the child compiles
        assert seen == [], f"resident mapped {sorted(set(seen))} during its initial apply"
        cold = json.loads(manifest_path.read_text())
        assert cold["last_apply"]["compiles"] == 2
    finally:
        first.stop()
    assert first.proc.returncode == 0

    second = Resident(conf, tmp_path, drift_interval=0.5)
    try:
        second.wait_ready(240, lambda: sample(second.pid))
        warm = json.loads(manifest_path.read_text())
        # Nothing changed: the manifest is not rewritten; the adopted event says what was done.
        assert warm == cold
        assert prog_ids(warm) == prog_ids(cold)  # the same kernel objects, adopted
        adopted = [json.loads(ln) for ln in events(second.log_path, "adopted")]
        assert adopted and adopted[0]["compiles"] == 0, adopted
        assert sorted(adopted[0]["specs"]) == ["count_0", "count_1"]

        second.proc.send_signal(signal.SIGHUP)  # reload: re-reads the manifest
        # sd_notify: RELOADING=1 with MONOTONIC_USEC, then READY=1 once re-read.
        said = notifications(second, until="READY=1")
        reloading = next(i for i, m in enumerate(said) if "RELOADING=1" in m.split("\n"))
        assert re.search(r"^MONOTONIC_USEC=\d+$", said[reloading], re.M), said
        assert "READY=1" in said[-1].split("\n") and "(reloaded)" in said[-1]
        assert wait_until(lambda: bool(events(second.log_path, "reload")), timeout=15)
        time.sleep(2)  # four drift ticks: our own re-read must not count as someone's change
        assert len(events(second.log_path, "reload")) == 1
        # A drift check in the resident (it reads pins, never compiles): remove one link pin.
        os.unlink(f"{bpffs_root}/count_1/links/count_exec")
        assert wait_until(lambda: bool(events(second.log_path, "drift")), timeout=15)
        sample(second.pid)
        assert seen == [], f"resident mapped {sorted(set(seen))}"
        status = proc_status(second.pid)  # (its RSS is a figure for bench/, not a test)
        assert status["CapEff"] == "0000000000000000"
    finally:
        second.stop()
    assert second.proc.returncode == 0


def test_no_apply_resident_reports_drift_in_its_ready_status(tmp_path: Path,
                                                             bpffs_root: str) -> None:
    """The packaged resident (--no-apply) starts even when loaderd-apply failed: its READY=1
    STATUS says what is true of the pins, not what the manifest claims."""
    specs = tmp_path / "specs"
    specs.mkdir()
    os.chmod(tmp_path, 0o755)
    for i in range(2):
        (specs / f"count_{i}.yaml").write_text(COUNTER.format(i=i, step=1))
    conf = write_settings(tmp_path, bpffs_root, specs)
    loaderd("--config", str(conf), "apply")
    os.unlink(f"{bpffs_root}/count_1/links/count_exec")
    res = Resident(conf, tmp_path, no_apply=True)
    try:
        res.wait_ready(60)
        ready = next(m for m in res.messages if "READY=1" in m.split("\n"))
        assert "STATUS=2 specs applied; DRIFT in 1: count_1 (see journal)" in ready, ready
        assert events(res.log_path, "drift")
    finally:
        res.stop()


def test_watchdog_pings_and_stopping_notification(tmp_path: Path, bpffs_root: str) -> None:
    """With WatchdogSec= (WATCHDOG_USEC), WATCHDOG=1 comes at least every half period; SIGTERM
    is answered with STOPPING=1 before the exit."""
    specs = tmp_path / "specs"
    specs.mkdir()
    os.chmod(tmp_path, 0o755)
    (specs / "count_0.yaml").write_text(COUNTER.format(i=0, step=1))
    conf = write_settings(tmp_path, bpffs_root, specs)
    res = Resident(conf, tmp_path, env={"WATCHDOG_USEC": "400000"})
    try:
        res.wait_ready(240)
        said = notifications(res, until="WATCHDOG=1")
        said += notifications(res, until="WATCHDOG=1", timeout=1.0)  # a second one, in time
    finally:
        res.stop()
    assert res.proc.returncode == 0
    assert sum("WATCHDOG=1" in m.split("\n") for m in said) >= 2, said
    assert "STOPPING=1" in res.messages[-1].split("\n"), res.messages[-3:]


def _status_until(res: Resident, pred: Any, timeout: float = 20.0) -> str:
    """The first STATUS= from now on for which pred(text) holds."""
    deadline = time.monotonic() + timeout
    while True:
        res.sock.settimeout(max(0.01, deadline - time.monotonic()))
        for line in res.sock.recv(4096).decode().split("\n"):  # TimeoutError past deadline
            if line.startswith("STATUS=") and pred(line[len("STATUS="):]):
                return line[len("STATUS="):]


def test_no_apply_resident_says_a_refused_apply_and_the_kill_switch(tmp_path: Path,
                                                                    bpffs_root: str) -> None:
    """What `systemctl status loaderd` shows (STATUS=): a refused apply (why, where, since when)
    at start and after a SIGHUP; the kill switch pulled by hand (no SIGHUP, no `reload` event:
    none happened) within a tick; a good apply clears the refusal."""
    specs = tmp_path / "specs"
    specs.mkdir()
    os.chmod(tmp_path, 0o755)
    (specs / "count_0.yaml").write_text(COUNTER.format(i=0, step=1))
    conf = write_settings(tmp_path, bpffs_root, specs)
    loaderd("--config", str(conf), "apply")
    bad = specs / "zz_bad.yaml"
    bad.write_text("loaderd: 1\nsource:\n  file: zz_bad.bpf.c\nprograms:\n"
                   "  - {name: f, type: tracepoint,\n"
                   '     attach: {tracepoint: "sched:sched_process_exec"}}\n')
    refused = loaderd("--config", str(conf), "apply", check=False)
    assert refused.returncode == 1
    res = Resident(conf, tmp_path, no_apply=True, drift_interval=0.5)
    try:
        res.wait_ready(60)
        ready = next(m for m in res.messages if "READY=1" in m.split("\n"))
        text = ready.split("STATUS=", 1)[1].split("\n")[0]
        assert text.startswith("1 spec applied; last apply REFUSED at "), text
        assert f"{bad}:3:3: source.file: " in text and "cannot open" in text, text
        assert text.endswith("; the set before it stays applied"), text

        # A broken C file: the reason is clang's, located (what the reload's SIGHUP shows).
        (specs / "zz_bad.bpf.c").write_text("int f(void *ctx) { return 1 +; }\n")
        os.chmod(specs / "zz_bad.bpf.c", 0o644)
        assert loaderd("--config", str(conf), "apply", check=False).returncode == 1
        res.proc.send_signal(signal.SIGHUP)
        text = _status_until(res, lambda t: "expected expression" in t)
        assert f"{specs / 'zz_bad.bpf.c'}:1:30: source: C source does not compile: " in text

        # The kill switch by hand: no SIGHUP; the resident notices the manifest change.
        loaderd("--config", str(conf), "disable")
        text = _status_until(res, lambda t: t.startswith("kill switch pulled at "))
        assert "nothing applied until `loaderd enable`" in text
        loaderd("--config", str(conf), "enable")
        bad.unlink()
        loaderd("--config", str(conf), "apply")
        text = _status_until(res, lambda t: t == "1 spec applied")
        time.sleep(1.5)  # ticks: still one reload event (the SIGHUP), none for disable/enable
        assert len(events(res.log_path, "reload")) == 1
    finally:
        res.stop()
