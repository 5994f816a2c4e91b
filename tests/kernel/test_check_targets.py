"""`loaderd check` resolves attach targets the way `apply` does, attaching nothing (real
kernel): a missing tracepoint, raw tracepoint or interface is a located refusal of `check`,
and what `check` accepts, `apply` attaches."""

from __future__ import annotations

import ctypes
import os
import random
from pathlib import Path

import pytest

from loaderd.bpf import btf
from tests.conftest import loaderd, make_conf

pytestmark = pytest.mark.kernel


def spec(ptype: str, attach: str, ctx: str = "void *ctx", ret: str = "0") -> str:
    return (f"loaderd: 1\nsource:\n  inline: |\n    int f({ctx}) {{ return {ret}; }}\n"
            f"programs:\n  - name: f\n    type: {ptype}\n    attach: {attach}\n")


MISSING = {
    "tracepoint": (spec("tracepoint", '{tracepoint: "sched:no_such_event"}'),
                   "f: attach target: no such tracepoint (/sys/kernel/tracing/events/sched/"
                   "no_such_event/id) (got 'sched:no_such_event')"),
    "raw_tracepoint": (spec("raw_tracepoint", "{raw_tracepoint: no_such_raw_tp}"),
                       "f: attach target: no such raw tracepoint (got 'no_such_raw_tp')"),
    # a tracefs event that is no raw tracepoint (syscall events are perf-only)
    "raw_tracepoint_syscall_event": (spec("raw_tracepoint", "{raw_tracepoint: sys_enter_bpf}"),
                                     "no such raw tracepoint (got 'sys_enter_bpf')"),
    "xdp": (spec("xdp", "{xdp: {interface: nosuchif0, mode: skb}}", "struct xdp_md *ctx",
                 "XDP_PASS"), "f: attach target: no such network interface (got 'nosuchif0')"),
}


@pytest.mark.parametrize("case", sorted(MISSING))
def test_check_refuses_a_missing_target_located_and_attaches_nothing(
        tmp_path: Path, bpffs_root: str, case: str) -> None:
    text, message = MISSING[case]
    conf = make_conf(tmp_path, bpffs_root, {"bad": text})
    out = loaderd("--config", str(conf), "check", check=False)
    assert out.returncode == 1, out
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert f"{tmp_path}/specs/bad.yaml:8: programs[0].attach: " in errors[0], errors
    assert message in errors[0], errors
    assert "1 spec, 1 error" in out.stdout
    assert not os.path.exists(bpffs_root)  # nothing pinned, nothing attached
    # and apply refuses the same spec
    applied = loaderd("--config", str(conf), "apply", check=False)
    assert applied.returncode == 1 and "bad.yaml" in applied.stderr, applied


def test_what_check_accepts_apply_attaches(tmp_path: Path, bpffs_root: str,
                                           dummy_iface: str) -> None:
    """Including a raw tracepoint with no tracefs event (DECLARE_TRACE, e.g. pelt_cfs_tp)."""
    raw_only = sorted((btf.raw_tracepoints() or frozenset()) - _tracefs_events())
    assert raw_only, "this kernel has no BTF-only raw tracepoint to try"
    specs = {
        "tp": spec("tracepoint", '{tracepoint: "sched:sched_process_exec"}'),
        "raw": spec("raw_tracepoint", f"{{raw_tracepoint: {raw_only[0]}}}"),
        "pkt": spec("xdp", f"{{xdp: {{interface: {dummy_iface}, mode: skb}}}}",
                    "struct xdp_md *ctx", "XDP_PASS"),
    }
    conf = make_conf(tmp_path, bpffs_root, specs)
    out = loaderd("--config", str(conf), "check")
    assert "3 specs, 0 errors" in out.stdout and not os.path.exists(bpffs_root)
    loaderd("--config", str(conf), "apply")
    for name in specs:
        assert os.path.exists(f"{bpffs_root}/{name}/links/f"), name
    loaderd("--config", str(conf), "disable")


def _tracefs_events() -> set[str]:
    root = "/sys/kernel/tracing/events"
    return {e for c in os.listdir(root) if os.path.isdir(f"{root}/{c}")
            for e in os.listdir(f"{root}/{c}") if os.path.isdir(f"{root}/{c}/{e}")}


def test_btf_raw_tracepoint_names_are_what_the_kernel_opens() -> None:
    """The name list check uses against the kernel itself: a no-op RAW_TRACEPOINT program
    opened (and closed at once) on a sample of listed names and of tracefs-only events."""
    known = btf.raw_tracepoints()
    assert known and "sched_switch" in known
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    insns = (ctypes.c_uint64 * 2)(0xB7, 0x95)  # r0 = 0; exit
    prog = lib.bpf_prog_load(17, b"ld_probe", b"GPL", insns, 2, None)  # RAW_TRACEPOINT
    assert prog >= 0, ctypes.get_errno()
    rng = random.Random(11)
    listed = rng.sample(sorted(known), 40)
    unlisted = [*rng.sample(sorted(_tracefs_events() - known), 20), "no_such_raw_tp"]
    try:
        for name, want in [(n, True) for n in listed] + [(n, False) for n in unlisted]:
            fd = lib.bpf_raw_tracepoint_open(name.encode(), prog)
            if fd >= 0:
                os.close(fd)
            assert (fd >= 0) is want, (name, fd)
    finally:
        os.close(prog)


def test_check_through_a_closed_pipe_keeps_its_verdict(tmp_path: Path, bpffs_root: str) -> None:
    """`loaderd check | head -1` on a refused set: 1, not the 0 a BrokenPipeError gave."""
    from tests.unit.test_cli import _closed_pipe_run

    conf = make_conf(tmp_path, bpffs_root, {"bad": MISSING["tracepoint"][0]})
    assert _closed_pipe_run(["--config", str(conf), "check"], close_stderr=True) == 1
    (tmp_path / "g").mkdir()
    good = make_conf(tmp_path / "g", bpffs_root, {
        "tp": spec("tracepoint", '{tracepoint: "sched:sched_process_exec"}')})
    assert _closed_pipe_run(["--config", str(good), "check"], close_stderr=False) == 141
