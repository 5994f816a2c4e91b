"""Long-lived care on the real kernel (issue 18 item 5): how full each hash and ring buffer
is, in `loaderctl status`, and journaled by the resident once a map is 90% full."""

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

from tests.conftest import REPO, loaderd, make_conf

pytestmark = pytest.mark.kernel

SPEC = """loaderd: 1
source:
  inline: |
    int on_exec(void *ctx) {
        u32 pid = bpf_get_current_pid_tgid() >> 32;
        u64 one = 1;
        seen.update(&pid, &one);       /* never cleaned: fills */
        struct { u64 a[4]; } e = {};
        unread.ringbuf_output(&e, sizeof(e), 0);   /* nobody reads it */
        return 0;
    }
maps:
  - name: seen
    type: hash
    key: u32
    value: u64
    max_entries: 20
    initial: [INITIAL]
  - {name: unread, type: ringbuf, max_entries: 4096}
programs:
  - {name: on_exec, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
""".replace("INITIAL", ", ".join(f"{{key: {4000000 + i}, value: 1}}" for i in range(18)))


def _maps(conf: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "loaderd.cli.loaderctl", "--config", str(conf),
                          "status", "--json"], capture_output=True, text=True, env=env,
                         check=False, timeout=120)
    report = json.loads(out.stdout)
    (spec,) = report["specs"]
    return {m["name"]: m for m in spec["maps"]}


def test_fill_in_status_and_journaled_when_almost_full(tmp_path: Path, bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"fill": SPEC})
    loaderd("--config", str(conf), "apply")
    maps = _maps(conf)
    assert maps["seen"]["entries"] >= 18 and maps["seen"]["fill"] >= 0.9  # (host execs add)
    for _ in range(5):
        subprocess.run(["/bin/true"], check=True)
    maps = _maps(conf)
    assert maps["seen"]["entries"] == 20 and maps["seen"]["fill"] == 1.0  # full: refuses more
    assert maps["unread"]["bytes_pending"] >= 5 * 40 and maps["unread"]["fill"] > 0
    text = subprocess.run([sys.executable, "-m", "loaderd.cli.loaderctl", "--config", str(conf),
                           "status"], capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "20/20 entries (100% full)" in text.stdout, text.stdout

    # Fill the ring past 90% ourselves (40-byte records, 4096 bytes: ~93 execs), not by
    # hoping the host execs enough.
    for _ in range(110):
        subprocess.run(["/bin/true"], check=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "loaderd", "--config", str(conf), "run",
                             "--no-apply", "--drift-interval", "0.5"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    time.sleep(5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    filling = [ln for ln in lines if ln["event"] == "map_filling"]
    # each once, not every tick
    assert sorted(ln["map"] for ln in filling) == ["seen", "unread"], err[-3000:]
    seen = next(ln for ln in filling if ln["map"] == "seen")
    assert "100% full (20 of 20 entries;" in seen["message"] and "lru_hash" in seen["message"]
    ring = next(ln for ln in filling if ln["map"] == "unread")
    assert "bytes unread" in ring["message"] and "reader" in ring["message"]
