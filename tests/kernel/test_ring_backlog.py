"""A ring buffer nobody read (issue 18): it fills, the kernel drops what comes after without
counting, and the next reader meets the stale backlog. `loaderctl events` (a viewer starting
now) skips it and says so first ({"_backlog": N, "skipped": true, "full": true}); with
--backlog it prints it. The resident journals it (an audit trail keeps records written while
it was down), announced by one line (EVENTS_LOST when the ring was full) and each record marked
backlog; the counters reach `loaderd status --json` through the resident's events.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, loaderd, make_conf, wait_until
from tests.kernel.test_perfbuf import _copy

pytestmark = pytest.mark.kernel

SPEC = """loaderd: 1
source:
  inline: |
    struct rec { u32 pid; u32 n; char comm[16]; u64 rest[5]; };
    int on_exec(void *ctx) {
        char comm[16];
        bpf_get_current_comm(&comm, sizeof(comm));
        if (comm[0] != 'l' || comm[1] != 'd' || comm[2] != 'b' || comm[3] != 'k')
            return 0;
        struct rec *e = recs.ringbuf_reserve(sizeof(struct rec));
        if (!e)
            return 0;
        __builtin_memset(e, 0, sizeof(*e));
        e->pid = bpf_get_current_pid_tgid() >> 32;
        __builtin_memcpy(e->comm, comm, sizeof(comm));
        recs.ringbuf_submit(e, 0);
        return 0;
    }
maps:
  - name: recs
    type: ringbuf
    max_entries: 4096
    events: {layout: "pid:u32,n:u32,comm:char16:comm,rest:bytes40"}
programs:
  - {name: on_exec, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""
FITS = 4096 // 72  # 64-byte records and their 8-byte headers: 56 fit in one page


def _events(conf: Path, *extra: str, work: list[Path] | None = None) -> list[Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "loaderd.cli.loaderctl", "--config",
                             str(conf), "events", "backlog/recs", "--duration", "4", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(2)
    for binary in work or []:
        subprocess.run([str(binary)], check=False)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_loaderctl_skips_stale_backlog_and_says_so(tmp_path: Path, bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"backlog": SPEC})
    loaderd("--config", str(conf), "apply")
    stale, fresh = _copy(tmp_path, "ldbk", "/bin/true"), _copy(tmp_path, "ldbk", "/bin/true")
    for _ in range(100):  # nobody reads: 56 fit, the kernel drops the other 44 uncounted
        subprocess.run([str(stale)], check=True)
    got = _events(conf, work=[fresh] * 3)
    assert got[0] == {"_backlog": FITS, "skipped": True, "full": True}, got[:3]
    assert [e["comm"] for e in got[1:]] == [fresh.name] * 3, got  # only what came after

    for _ in range(5):
        subprocess.run([str(stale)], check=True)
    got = _events(conf, "--backlog")
    assert got[0] == {"_backlog": 5, "skipped": False, "full": False}, got[:3]
    assert [e["comm"] for e in got[1:]] == [stale.name] * 5


def test_resident_journals_backlog_marked_and_counts_it(tmp_path: Path,
                                                        bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"backlog": SPEC})
    loaderd("--config", str(conf), "apply")
    stale, fresh = _copy(tmp_path, "ldbk", "/bin/true"), _copy(tmp_path, "ldbk", "/bin/true")
    for _ in range(100):
        subprocess.run([str(stale)], check=True)
    log = tmp_path / "resident.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "loaderd", "--config", str(conf), "run",
                                 "--no-apply", "--drift-interval", "0.5"], env=env, stderr=err,
                                stdout=subprocess.DEVNULL)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]

    def status() -> dict[str, Any]:
        out = loaderd("--config", str(conf), "status", "--json", check=False).stdout
        events: dict[str, Any] = json.loads(out)["manifest"]["events"] or {}
        return events

    try:
        assert wait_until(lambda: any("ready" in ln.get("message", "") for ln in lines()), 60)
        for _ in range(2):
            subprocess.run([str(fresh)], check=True)
        assert wait_until(lambda: sum(ln["event"] == "bpf_event" for ln in lines())
                          == FITS + 2, 10), log.read_text()[-2000:]
        assert wait_until(lambda: status().get("maps", [{}])[0].get("read") == FITS + 2, 10)
        counts = status()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    said = [ln for ln in lines() if ln["event"] == "events_lost"]
    assert len(said) == 1 and said[0]["backlog"] == FITS and said[0]["full"] is True, said
    assert "was full when its reader attached" in said[0]["message"]
    recs = [ln for ln in lines() if ln["event"] == "bpf_event"]
    assert [(r["event_comm"], r.get("backlog", False)) for r in recs] == (
        [(stale.name, True)] * FITS + [(fresh.name, False)] * 2)
    assert counts["pid"] == proc.pid
    assert counts["maps"] == [{"spec": "backlog", "map": "recs", "read": FITS + 2,
                               "dropped": 0, "lost": 0, "backlog": FITS}]
    text = loaderd("--config", str(conf), "status", check=False).stdout
    assert f"backlog/recs: {FITS + 2} read, 0 dropped (rate limit), 0 lost (kernel), " \
           f"{FITS} stale backlog" in text, text
