"""P5 journald sink on a host without a journal socket: a private systemd-journald in a new mount
namespace, started by `journald_throughput()` as
`unshare --mount --propagation private python3 -m bench.journal EVENTS ROUNDS`.

Inside, tmpfs over /run and /var/log/journal (the host's files are neither read nor written), a
journald that creates its own sockets, the timed emits, then `journalctl --sync` and a count of
the stored entries (journald drops above RateLimitBurst=10000 per 30 s: keep EVENTS*ROUNDS below).
Prints one JSON line: {"journald": events/s, "cpu_us": client CPU microseconds per event,
"send_cpu_us": the same for a bare `journal.send` of the same fields (built once), "sent": n,
"stored": n}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

JOURNALD = "/lib/systemd/systemd-journald"


def available() -> str | None:
    """Why a private journald cannot run here, or None."""
    for tool in ("unshare", "mount", "journalctl"):
        if not shutil.which(tool):
            return f"no {tool}"
    if not os.access(JOURNALD, os.X_OK):
        return f"no {JOURNALD}"
    return None


def journald_throughput(events: int, rounds: int) -> dict[str, Any]:
    """Run this module in a private mount namespace; its JSON report, or {"note": why not}."""
    why = available()
    if why:
        return {"note": f"no private journald: {why}"}
    from bench.workload import child_env

    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                           "-m", "bench.journal", str(events), str(rounds)],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    if proc.returncode != 0:
        return {"note": f"private journald failed: {proc.stderr.strip()[-500:]}"}
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def _inside(events: int, rounds: int) -> dict[str, Any]:
    for d in ("/run", "/var/log/journal"):
        if os.path.isdir(d):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", d], check=True)
    journald = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from loaderd.audit import log as audit

        deadline = time.monotonic() + 10
        while not audit.journal_available():
            if time.monotonic() > deadline or journald.poll() is not None:
                raise RuntimeError("private journald did not open its socket")
            time.sleep(0.02)
        from systemd import journal

        from bench.run import FIELDS, MESSAGE

        audit.configure(journal=True)
        ev = audit.Event.PROG_LOADED
        bare = {"MESSAGE": MESSAGE, "MESSAGE_ID": ev.message_id, "PRIORITY": str(ev.priority),
                "SYSLOG_IDENTIFIER": audit.SYSLOG_IDENTIFIER, "LOADERD_EVENT": "bare_send",
                **{audit.journal_field(k): audit._text(v) for k, v in FIELDS.items()}}
        best, cpu, send_cpu = 0.0, float("inf"), float("inf")
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(events):
                audit.emit(ev, MESSAGE, **FIELDS)
            best = max(best, events / (time.perf_counter() - t0))
            cpu = min(cpu, (time.process_time() - c0) / events * 1e6)
            c0 = time.process_time()
            for _ in range(events // 4):  # journald's rate limit: a quarter as many
                journal.send(**bare)
            send_cpu = min(send_cpu, (time.process_time() - c0) / (events // 4) * 1e6)
        subprocess.run(["journalctl", "--sync"], check=True, capture_output=True)
        out = subprocess.run(["journalctl", "-q", "--no-pager", "-o", "cat",
                              f"MESSAGE_ID={audit.Event.PROG_LOADED.message_id}",
                              "LOADERD_EVENT=prog_loaded"],
                             check=True, capture_output=True, text=True).stdout
        return {"journald": best, "cpu_us": cpu, "send_cpu_us": send_cpu,
                "sent": events * rounds, "stored": len(out.splitlines())}
    finally:
        journald.terminate()
        journald.wait(10)


if __name__ == "__main__":
    print(json.dumps(_inside(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
