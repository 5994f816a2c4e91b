"""Headers vs the running kernel's BTF, on the real kernel: the measurement agrees with bpftool,
a BCC program reading current->tgid through the task struct is refused where the headers are
not the running kernel's, and, with the risk accepted, the value it reads is not the tgid."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from loaderd.bpf import kernel, offsets
from loaderd.stage import headers
from tests.conftest import loaderd, make_conf

pytestmark = pytest.mark.kernel

READ_TGID = """loaderd: 1
source:
  inline: |
    #include <linux/sched.h>
    int read_tgid(void *ctx)
    {
        struct task_struct *task = (struct task_struct *)bpf_get_current_task();
        u32 tgid = 0;
        bpf_probe_read_kernel(&tgid, sizeof(tgid), &task->tgid);
        u32 real = bpf_get_current_pid_tgid() >> 32;
        tgid_seen.update(&real, &tgid);
        return 0;
    }
maps:
  - {name: tgid_seen, type: hash, key: u32, value: u32, max_entries: 4096}
programs:
  - name: read_tgid
    type: tracepoint
    attach: {tracepoint: "sched:sched_process_exec"}
"""
POLICY = ("policy: {helpers: {by_type: {tracepoint: [get_current_task, probe_read,"
          " probe_read_kernel]}}}\n")


def bpftool_offset(struct: str, member: str) -> int:
    """The member's byte offset as bpftool prints the running kernel's BTF (independent of
    loaderd's parser)."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                         check=True, capture_output=True, text=True).stdout
    body = out.split(f"STRUCT '{struct}' ", 1)[1].split("\n[", 1)[0]
    m = re.search(rf"'{member}' type_id=\d+ bits_offset=(\d+)", body)
    assert m is not None, body[:400]
    return int(m.group(1)) // 8


def headers_differ() -> bool:
    build, _ = offsets.headers_dirs()
    return offsets.headers_version(build) != offsets.release()


def test_measurement_agrees_with_bpftool_and_finds_the_mismatch() -> None:
    facts = headers.measure()
    assert facts.error is None, facts.error
    assert facts.kernel["task_struct.tgid"] == bpftool_offset("task_struct", "tgid")
    assert facts.kernel["sock_common.skc_family"] == bpftool_offset("sock_common", "skc_family")
    assert facts.kernel["task_struct.comm"] == bpftool_offset("task_struct", "comm")
    if headers_differ():  # this machine: Debian's 6.1 headers on 6.18
        assert not facts.ok
        bad = {m.field: m for m in facts.mismatches}
        assert bad["task_struct.tgid"].headers != bad["task_struct.tgid"].kernel
        assert "are not kernel" in facts.summary()
    else:
        assert facts.ok, facts.summary()


def test_struct_read_refused_then_accepted_reads_garbage(tmp_path: Path,
                                                         bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"tgid": READ_TGID}, POLICY)
    spec_file = tmp_path / "specs" / "tgid.yaml"
    facts = headers.measure()
    tgid = facts.kernel["task_struct.tgid"]
    if not headers_differ():
        pytest.skip("the headers are the running kernel's: nothing to refuse here")
    wrong = facts.compiled["task_struct.tgid"]
    check = loaderd("--config", str(conf), "check", check=False)
    assert check.returncode == 1, check.stdout
    said = check.stderr
    assert f"{spec_file}:2: source: reads struct task_struct (line 7)" in said
    assert f"task_struct.tgid at {wrong} in the headers, {tgid} in the running kernel" in said
    assert "accept_header_mismatch" in said
    refused = loaderd("--config", str(conf), "apply", check=False)
    assert refused.returncode == 1 and "task_struct.tgid" in refused.stderr
    assert not os.path.exists(f"{bpffs_root}/tgid")  # refused before anything was loaded
    status = loaderd("--config", str(conf), "status", check=False)
    assert status.returncode == 3, status  # the last apply was refused
    assert "headers: mismatch" in status.stdout and "refused" in status.stdout
    assert "last apply REFUSED at " in status.stdout and "task_struct.tgid" in status.stdout

    conf.write_text(conf.read_text() + "accept_header_mismatch: true\n")
    accepted = loaderd("--config", str(conf), "check")
    assert "warning: accept_header_mismatch: true: kernel headers" in accepted.stdout
    out = loaderd("--config", str(conf), "apply")
    journaled = [json.loads(ln) for ln in out.stderr.splitlines() if ln.startswith("{")]
    assert any(e["event"] == "degraded" and "accept_header_mismatch" in e["message"]
               for e in journaled), out.stderr
    children = [subprocess.Popen(["/bin/true"]) for _ in range(3)]
    for c in children:
        c.wait()
    fd = kernel.obj_get(f"{bpffs_root}/tgid/maps/tgid_seen", rdonly=True)
    try:
        read = {c.pid: kernel.map_lookup(fd, c.pid.to_bytes(4, "little"), 4)
                for c in children}
    finally:
        os.close(fd)
    values = {pid: int.from_bytes(v, "little") for pid, v in read.items() if v is not None}
    assert values, "the program saw none of the children's execs"
    # The garbage, documented: BCC read 4 bytes at the headers' offset of tgid, which in this
    # kernel's task_struct is some other member; not one child's tgid came out right.
    assert all(v != pid for pid, v in values.items()), values
    loaderd("--config", str(conf), "disable")
