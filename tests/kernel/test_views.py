"""Typed views on the real kernel (issue 18 items 2-3): struct keys/values declared in the
spec, used by the C code through the generated `loaderd_<map>_<key|value>_t` names (a struct
key passed by value), dumped by field; a log2 histogram dumped as BCC prints it; opaque bytes as
hex; `loaderctl events` decoding by the spec's own layout (enums, path kind)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, loaderd, make_conf

pytestmark = pytest.mark.kernel

SPEC = """loaderd: 1
source:
  inline: |
    static __always_inline int ours(char *c) {
        return c[0] == 'l' && c[1] == 'd' && c[2] == 'v' && c[3] == 'w';
    }
    int on_exec(void *ctx) {
        loaderd_execs_key_t k = {};
        k.pid = 7;
        bpf_get_current_comm(&k.comm, sizeof(k.comm));
        if (!ours(k.comm))
            return 0;
        loaderd_execs_value_t zero = {}, *v = execs.lookup_or_try_init(&k, &zero);
        if (v) {
            v->count += 1;
            v->total_ns += 1000;
        }
        loaderd_by_comm_key_t ck = {};
        bpf_get_current_comm(&ck.comm, sizeof(ck.comm));
        by_comm.increment(ck);               /* a struct key passed by value */
        u64 twenty = 20;
        dist.increment(bpf_log2l(twenty));   /* slot 5: 16 -> 31 */
        struct { u32 pid; s32 sig; char file[64]; } e = {};
        e.pid = 7;
        e.sig = 9;
        __builtin_memcpy(e.file, "/tmp/x/10.1.2.3.log", 20);
        evs.ringbuf_output(&e, sizeof(e), 0);
        return 0;
    }
maps:
  - name: execs
    type: hash
    key: {struct: "pid:u32,comm:char16:comm"}
    value: {struct: [{name: count, type: u64}, {name: total_ns, type: u64}]}
    max_entries: 64
  - name: by_comm
    type: hash
    key: {struct: "comm:char16:comm"}
    value: u64
    max_entries: 64
  - name: dist
    type: array
    key: u32
    value: u64
    max_entries: 64
    histogram: {kind: log2, unit: usecs}
    initial: [{key: 1, value: 1}, {key: 3, value: 4}, {key: 4, value: 8}]
  - name: raw
    type: hash
    key: {bytes: 4}
    value: {bytes: 16}
    max_entries: 4
    initial: [{key: "09000000", value: "3b000000000000004000000000000000"}]
  - name: evs
    type: ringbuf
    max_entries: 65536
    events:
      layout:
        - {name: pid, type: u32}
        - {name: sig, type: s32, enum: {HUP: 1, KILL: 9}}
        - {name: file, type: char64, kind: path}
programs:
  - {name: on_exec, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


def ctl(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "loaderd.cli.loaderctl", "--config",
                           str(conf), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def dump(conf: Path, target: str, *extra: str) -> dict[str, Any]:
    out = ctl(conf, "dump", target, "--json", *extra)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_struct_views_histogram_and_bytes_dump_and_events(tmp_path: Path,
                                                         bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"views": SPEC})
    loaderd("--config", str(conf), "apply")
    name = f"ldvw{uuid.uuid4().hex[:8]}"
    run = tmp_path / name
    shutil.copy("/bin/true", run)

    env = dict(os.environ, PYTHONPATH=str(REPO))
    stream = subprocess.Popen([sys.executable, "-m", "loaderd.cli.loaderctl", "--config",
                               str(conf), "events", "views/evs", "--duration", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(2)
    for _ in range(3):
        subprocess.run([str(run)], check=True)
    out, err = stream.communicate(timeout=60)
    assert stream.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    # the spec's layout, not {"data": hex}; the path kept whole; the enum by name
    assert events[:3] == [{"pid": 7, "sig": "KILL", "file": "/tmp/x/10.1.2.3.log"}] * 3, events

    execs = dump(conf, "views/execs")
    assert execs["types"]["key"] == "struct{pid:u32,comm:char16:comm}"
    assert [(e["key"], e["value"]) for e in execs["entries"]] == [
        ({"pid": 7, "comm": name}, {"count": 3, "total_ns": 3000})]
    by_comm = dump(conf, "views/by_comm")
    assert [(e["key"], e["value"]) for e in by_comm["entries"]] == [({"comm": name}, 3)]

    # opaque bytes: hex, not the C string ";" (value) or a tab (key)
    raw = dump(conf, "views/raw")
    assert raw["entries"] == [{"key": "09000000", "value": "3b000000000000004000000000000000"}]

    dist = dump(conf, "views/dist")
    assert [(b["low"], b["high"], b["count"]) for b in dist["histogram"]["buckets"]] == [
        (0, 1, 1), (2, 3, 0), (4, 7, 4), (8, 15, 8), (16, 31, 3)]
    text = ctl(conf, "dump", "views/dist")
    assert text.returncode == 0, text.stderr
    # exactly what BCC's own print_log2_hist prints for the same slots
    from bcc import table  # Debian's python3-bpfcc

    vals = [0] * 64
    for e in dist["entries"]:
        vals[e["key"]] = e["value"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        table._print_log2_hist(vals, "usecs", 0)
    assert text.stdout.splitlines()[1:7] == buf.getvalue().splitlines()
