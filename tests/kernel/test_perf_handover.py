"""Perf buffers read by a resident without any capability (issue 18): `loaderd apply` (root,
CAP_PERFMON) opens the per-CPU BPF_OUTPUT events and hands them over the state directory's
handover socket; the resident (`run --no-apply`, started with an empty bounding set and no
capability, like loaderd.service) maps them, sets the slots and journals the samples. A perf
buffer added later is read after the next apply without a restart; a forged handover (an fd
that is not a perf event, a header of another shape) is refused and its fds closed."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, loaderd, wait_until, write_settings
from tests.kernel.test_perfbuf import _copy

pytestmark = pytest.mark.kernel

SPEC = """loaderd: 1
source:
  inline: |
    TRACEPOINT_PROBE(syscalls, sys_enter_exit_group) {{
        struct {{ u32 pid; s32 code; char comm[16]; }} e = {{}};
        bpf_get_current_comm(&e.comm, sizeof(e.comm));
        if (e.comm[0] != 'l' || e.comm[1] != 'd' || e.comm[2] != 'h' || e.comm[3] != '{tag}')
            return 0;
        e.pid = bpf_get_current_pid_tgid() >> 32;
        e.code = args->error_code;
        exits.perf_submit(args, &e, sizeof(e));
        return 0;
    }}
maps:
  - name: exits
    type: perf_event_array
    max_entries: 64
    events: {{layout: "pid:u32,code:s32,comm:char16:comm"}}
programs:
  - {{name: tracepoint__syscalls__sys_enter_exit_group, type: tracepoint,
     attach: {{tracepoint: "syscalls:sys_enter_exit_group"}}}}
"""

# No capability can come back: securebits keep root's execve from granting any (noroot).
NO_CAPS = ["setpriv", "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,"
           "+no_setuid_fixup_locked,+keep_caps_locked", "--bounding-set=-all",
           "--inh-caps=-all", "--ambient-caps=-all"]


def _lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]


def _exits(log: Path, comm: str) -> list[dict[str, Any]]:
    return [ln for ln in _lines(log) if ln["event"] == "bpf_event"
            and ln.get("event_comm") == comm]


def _caps(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v, 16) for k, v in (ln.split(":\t") for ln in status)
            if k in ("CapEff", "CapPrm", "CapBnd")}


def test_capless_resident_reads_handed_perf_buffers(tmp_path: Path, bpffs_root: str) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    os.chmod(tmp_path, 0o755)
    (specs / "first.yaml").write_text(SPEC.format(tag="a"))
    conf = write_settings(tmp_path, bpffs_root, specs,
                          "policy:\n  limits: {max_event_rate: 100000}\n")
    loaderd("--config", str(conf), "apply")  # nobody listens yet: nothing handed over
    log = tmp_path / "resident.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "w") as err:
        proc = subprocess.Popen([*NO_CAPS, sys.executable, "-m", "loaderd", "--config",
                                 str(conf), "run", "--no-apply", "--drift-interval", "0.5"],
                                env=env, stderr=err, stdout=subprocess.DEVNULL)
    first = _copy(tmp_path, "ldha", "/bin/sh")
    second = _copy(tmp_path, "ldhb", "/bin/sh")
    sock = tmp_path / "state" / "handover.sock"
    try:
        assert wait_until(lambda: any("ready" in ln.get("message", "") for ln in _lines(log)),
                          60), log.read_text()
        caps = _caps(proc.pid)
        assert caps == {"CapEff": 0, "CapPrm": 0, "CapBnd": 0}, caps
        # Without a handover it cannot read the perf buffer (no CAP_PERFMON), and says why.
        said = [ln["message"] for ln in _lines(log) if "cannot read events" in
                ln.get("message", "")]
        assert said and "loaderd-apply hands them" in said[0], said
        assert os.stat(sock).st_mode & 0o777 == 0o600

        out = loaderd("--config", str(conf), "apply")  # adopts, then hands the events over
        assert "handed 1 perf buffer" in out.stderr, out.stderr
        time.sleep(1)
        for code in (3, 5):
            subprocess.run([str(first), "-c", f"exit {code}"], check=False)
        assert wait_until(lambda: len(_exits(log, first.name)) == 2, 10), log.read_text()[-3000:]
        assert [e["event_code"] for e in _exits(log, first.name)] == [3, 5]

        # A second perf buffer, applied while the resident runs: read after the apply's
        # handover and the reload's SIGHUP, no restart.
        (specs / "second.yaml").write_text(SPEC.format(tag="b"))
        out = loaderd("--config", str(conf), "apply")
        assert "handed 2 perf buffers" in out.stderr, out.stderr
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        subprocess.run([str(second), "-c", "exit 7"], check=False)
        subprocess.run([str(first), "-c", "exit 9"], check=False)
        assert wait_until(lambda: len(_exits(log, second.name)) == 1, 10), \
            log.read_text()[-3000:]
        assert _exits(log, second.name)[0]["event_code"] == 7
        # the first one kept its reader (its map is the same): exactly one more event
        assert wait_until(lambda: len(_exits(log, first.name)) == 3, 10)
        assert proc.poll() is None

        # Forged handovers (root may send; what it sends is still checked)
        before = len(os.listdir(f"/proc/{proc.pid}/fd"))
        with open("/dev/null", "rb") as null, \
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            header = json.dumps({"magic": "loaderd-perf-handover/1", "maps": [
                {"spec": "first", "map": "exits", "map_id": 1, "cpus": [0]}]}).encode()
            s.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [null.fileno()]))], 0, str(sock))
            s.sendmsg([b'{"magic": "x"}'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             array.array("i", [null.fileno()]))], 0, str(sock))
        assert wait_until(lambda: sum("handover refused" in ln.get("message", "")
                                      for ln in _lines(log)) == 2, 10), log.read_text()[-2000:]
        refused = [ln["message"] for ln in _lines(log) if "handover refused" in
                   ln.get("message", "")]
        assert "not a perf event" in refused[0] and "not a loaderd handover" in refused[1]
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) == before  # their fds were closed
        # Another reader would take the buffer's slots from the resident (operator seat):
        # loaderctl events refuses, naming the resident and the way out.
        assert wait_until(lambda: (tmp_path / "state" / "events.json").exists(), 10)
        taken = subprocess.run([sys.executable, "-m", "loaderd.cli.loaderctl", "--config",
                                str(conf), "events", "first/exits", "--count", "1",
                                "--duration", "1"], env=env, capture_output=True, text=True,
                               timeout=60, check=False)
        assert taken.returncode == 1, taken.stdout + taken.stderr
        assert f"is a perf buffer the resident (pid {proc.pid}) journals" in taken.stderr
        subprocess.run([str(first), "-c", "exit 4"], check=False)
        assert wait_until(lambda: len(_exits(log, first.name)) == 4, 10)  # still reading
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert not sock.exists()  # the socket it bound is gone with it
