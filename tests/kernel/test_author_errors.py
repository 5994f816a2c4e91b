"""Author errors, as `loaderd check` shows them on the real kernel (issue 18 item 4): every
refusal says the cause and the fix; all undeclared maps and all refused programs of a spec in
one run; BCC map macros refused with the spec equivalent before clang; clang's warnings shown
when the compile succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import loaderd, make_conf

pytestmark = pytest.mark.kernel

TWO_REFUSED = """loaderd: 1
source:
  inline: |
    #include <linux/sched.h>
    int first(struct bpf_raw_tracepoint_args *ctx) {
        struct task_struct *p = (struct task_struct *)ctx->args[0];
        return p->pid;      /* BCC turns this into bpf_probe_read */
    }
    int second(void *ctx) { bpf_trace_printk("x\\n"); return 0; }
programs:
  - {name: first, type: raw_tracepoint, attach: {raw_tracepoint: sched_process_exec}}
  - {name: second, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""

UNDECLARED = """loaderd: 1
source:
  inline: |
    BPF_STACK_TRACE(stacks, 128);
    BPF_PROG_ARRAY(jumps, 4);
    int first(void *ctx) { return 0; }
programs:
  - {name: first, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""

HISTOGRAM_MACRO = """loaderd: 1
source:
  inline: |
    BPF_HISTOGRAM(dist);
    int first(void *ctx) { dist.increment(bpf_log2l(5)); return 0; }
maps:
  - {name: dist, type: array, key: u32, value: u64, max_entries: 64}
programs:
  - {name: first, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""

WARNS = """loaderd: 1
source:
  inline: |
    int first(void *ctx) {
        u32 big = 5000000000;
        return big & 0;
    }
programs:
  - {name: first, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


def check(tmp_path: Path, bpffs_root: str, text: str) -> tuple[int, str]:
    conf = make_conf(tmp_path, bpffs_root, {"s": text}, "accept_header_mismatch: true\n")
    out = loaderd("--config", str(conf), "check", check=False)
    return out.returncode, out.stdout + out.stderr


def test_probe_read_from_bcc_rewrite_and_every_refused_program(tmp_path: Path,
                                                                bpffs_root: str) -> None:
    rc, out = check(tmp_path, bpffs_root, TWO_REFUSED)
    assert rc == 1
    # the cause (BCC's rewrite of p->field) and the fix (setting, program type)
    assert "calls helpers not allowed: probe_read" in out
    assert "rewrites a dereference of a kernel pointer (`p->field`" in out
    assert "policy.helpers.by_type.raw_tracepoint (raw_tracepoint: [probe_read])" in out
    # the second program's refusal in the same run
    assert "1 more refused: program 'second' (programs[1])" in out and "trace_printk" in out
    assert "1 spec, 1 error" in out


def test_every_undeclared_map_in_one_error(tmp_path: Path, bpffs_root: str) -> None:
    rc, out = check(tmp_path, bpffs_root, UNDECLARED)
    assert rc == 1 and "source defines maps 'jumps', 'stacks' that the spec does not" in out


def test_bcc_map_macro_refused_with_the_spec_equivalent(tmp_path: Path,
                                                        bpffs_root: str) -> None:
    rc, out = check(tmp_path, bpffs_root, HISTOGRAM_MACRO)
    assert rc == 1 and "redefinition" not in out  # refused before clang saw it
    assert "s.yaml:4: source.inline: BPF_HISTOGRAM(dist, ...) declares a map" in out
    assert "`- {name: dist, type: array, key: u32, value: u64, max_entries: 64, " \
           "histogram: {kind: log2, unit: usecs}}`" in out
    fixed = HISTOGRAM_MACRO.replace("    BPF_HISTOGRAM(dist);\n", "")
    rc, out = check(tmp_path, bpffs_root, fixed)
    assert rc == 0, out


def test_clang_warnings_shown_when_check_succeeds(tmp_path: Path, bpffs_root: str) -> None:
    rc, out = check(tmp_path, bpffs_root, WARNS)
    assert rc == 0, out
    assert "warning: s: clang warnings:" in out
    # at the line and column of the YAML file (the inline block's indent added)
    assert "s.yaml:5:19: warning: implicit conversion" in out, out
    assert "changes value from 5000000000" in out
