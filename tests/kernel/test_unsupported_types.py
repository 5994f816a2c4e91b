"""kprobe/kretprobe, fentry/fexit and lsm on a kernel that cannot run them (this project's test
kernel: no kprobe PMU, no BPF trampolines, no BPF LSM): `check` and `apply` refuse each in one
sentence found by probing the kernel, before anything compiles, never a BCC traceback; the
policy refuses them like any type. The probes themselves are checked against the kernel's own
word (sysfs, bpftool feature probe)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from loaderd.bpf import attach, kernel
from loaderd.model import FentryAttach, FexitAttach, KprobeAttach, LsmAttach
from tests.conftest import loaderd, make_conf

pytestmark = pytest.mark.kernel

KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"

SPECS = {
    "kprobe": ("int count_open(struct pt_regs *ctx) { return 0; }", "count_open",
               "{kprobe: {function: do_sys_openat2}}"),
    "kretprobe": ("int count_ret(struct pt_regs *ctx) { return 0; }", "count_ret",
                  "{kprobe: {function: do_sys_openat2, retprobe: true}}"),
    "fentry": ("KFUNC_PROBE(do_unlinkat, int dfd) { return 0; }", "kfunc__do_unlinkat",
               "{fentry: do_unlinkat}"),
    "fexit": ("KRETFUNC_PROBE(do_unlinkat, int dfd, void *name, int ret) { return 0; }",
              "kretfunc__do_unlinkat", "{fexit: do_unlinkat}"),
    "lsm": ("LSM_PROBE(bpf, int cmd) { return 0; }", "lsm__bpf", "{lsm: bpf}"),
}
TYPE = {"kprobe": "kprobe", "kretprobe": "kprobe", "fentry": "fentry", "fexit": "fexit",
        "lsm": "lsm"}


def spec_text(which: str) -> str:
    src, name, where = SPECS[which]
    return (f"loaderd: 1\nsource:\n  inline: |\n    {src}\nprograms:\n"
            f"  - {{name: {name}, type: {TYPE[which]}, attach: {where}}}\n")


def bpftool_says_available(prog_type: str) -> bool:
    out = subprocess.run(["bpftool", "feature", "probe", "kernel"], capture_output=True,
                         text=True, check=True).stdout
    return f"eBPF program_type {prog_type} is available" in out


def expected_sentence(which: str) -> str:
    if which in ("kprobe", "kretprobe"):
        return (f"this kernel has no kprobe PMU ({KPROBE_PMU} is missing): kprobe programs "
                "cannot attach here")
    what = "lsm" if which == "lsm" else "fentry/fexit"
    ptype = "lsm" if which == "lsm" else "tracing"
    return (f"this kernel cannot load {what} programs (a probe load of {ptype} programs fails, "
            "as bpftool feature probe reports)")


def test_the_probes_agree_with_the_kernel() -> None:
    assert (attach.kernel_refusal(KprobeAttach("do_sys_openat2")) is None) == \
        os.path.isdir(KPROBE_PMU)
    for a, name in ((FentryAttach("do_unlinkat"), "tracing"),
                    (FexitAttach("do_unlinkat"), "tracing"), (LsmAttach("bpf"), "lsm")):
        assert kernel.prog_type_supported(a.kind.kernel_id) == bpftool_says_available(name)
    # What loads here is said to load (no false refusal of a type the kernel has).
    assert kernel.prog_type_supported(kernel.PROG_TYPES["kprobe"])
    assert kernel.prog_type_supported(kernel.PROG_TYPES["sched_cls"])


@pytest.mark.parametrize("which", list(SPECS))
def test_check_and_apply_refuse_in_one_sentence(tmp_path: Path, bpffs_root: str,
                                                which: str) -> None:
    if which in ("kprobe", "kretprobe") and os.path.isdir(KPROBE_PMU):
        pytest.skip("this kernel has a kprobe PMU: the refusal cannot be shown here")
    if which in ("fentry", "fexit", "lsm") and attach.kernel_refusal(
            SPECS_ATTACH[which]) is None:
        pytest.skip(f"this kernel runs {which} programs: the refusal cannot be shown here")
    conf = make_conf(tmp_path, bpffs_root, {which: spec_text(which)})
    want = expected_sentence(which)
    for cmd in ("check", "apply"):
        out = loaderd("--config", str(conf), cmd, check=False)
        text = out.stdout + out.stderr
        assert out.returncode != 0, text
        assert want in text, text
        assert f"{which}.yaml:6:" in text  # located at the program
        # no compile ran: BCC is not named (as a word: a sha256 in the events may hold "bcc")
        assert "Traceback" not in text and not re.search(r"\bbcc\b", text.lower())
        assert "verifier" not in text and "ok:" not in text  # nothing was compiled
    assert not os.path.exists(f"{bpffs_root}/{which}")


SPECS_ATTACH = {"fentry": FentryAttach("do_unlinkat"), "fexit": FexitAttach("do_unlinkat"),
                "lsm": LsmAttach("bpf")}


def test_policy_refuses_them_and_bcc_names_are_checked(tmp_path: Path,
                                                       bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {w: spec_text(w) for w in SPECS},
                     "policy:\n  program_types: [tracepoint]\n")
    out = loaderd("--config", str(conf), "check", check=False)
    text = out.stdout + out.stderr
    assert text.count("program type not allowed by policy") == len(SPECS)
    bad = spec_text("fentry").replace("name: kfunc__do_unlinkat", "name: on_unlink")
    (tmp_path / "specs" / "fentry.yaml").write_text(bad)
    out = loaderd("--config", str(conf), "check", check=False)
    text = out.stdout + out.stderr
    assert "a fentry program for do_unlinkat is the C function kfunc__do_unlinkat" in text
