#!/usr/bin/python3
"""P6: what the compile sandbox costs per compile, against the same compile unconfined.

setup: in a forked process (as a compile worker is), the time of `confine.enter()` alone
       (Landlock ruleset with its rules + restrict_self, no_new_privs, the seccomp filter), vs
       the time of one unconfined compile of the same spec.
compile: one spec staged through the real pool (fork, limits, bcc import, compile, load, fds
       passed back, pin=False), confined vs with `confine.enter` replaced by a no-op: the same
       code path without the sandbox. Interleaved repetitions, best of each.

Usage (root, repository root): /usr/bin/python3 -m bench.sandbox_cost [--reps R]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as bench/sandbox_cost.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loaderd import sandbox
from loaderd.audit import log as audit
from loaderd.config.spec import load_spec
from loaderd.model import Settings, Spec
from loaderd.stage import confine, pool

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "programs.d" / "udp_filter.yaml"


def _in_child(fn: Any) -> float:
    """Run fn() in a forked process; its float result (seconds)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, repr(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return float(out)


def _setup_once(which: str, read: list[str]) -> float:
    """As a worker does it: the read list comes from the parent."""
    tmp = tempfile.mkdtemp(prefix="loaderd-bench-")  # removed here: the child may not

    def run() -> float:
        t0 = time.perf_counter()
        if which == "landlock":
            sandbox.confine(confine.rules(tmp, read))
        elif which == "seccomp":
            sandbox.no_new_privs()
            sandbox.deny_bpf_commands()
        else:
            confine.enter(tmp, read=read)
        return time.perf_counter() - t0

    try:
        return _in_child(run)
    finally:
        os.rmdir(tmp)


def _spec() -> Spec:
    d = Path(tempfile.mkdtemp(prefix="loaderd-bench-spec-"))
    os.chmod(d, 0o755)
    shutil.copy(EXAMPLE, d)
    try:
        return load_spec(str(d / EXAMPLE.name), limits=Settings().policy.limits, owner_uid=None)
    finally:
        shutil.rmtree(d)


def _stage_once(spec: Spec, settings: Settings, *, confined: bool) -> float:
    real = confine.enter
    if not confined:
        confine.enter = lambda tmp, support=None, read=None: sandbox.probe()  # type: ignore
    try:
        t0 = time.perf_counter()
        staged, errors = pool.stage_all([spec], settings, "bench", pin=False)
        took = time.perf_counter() - t0
    finally:
        confine.enter = real
    if errors or len(staged) != 1:
        raise RuntimeError(f"stage failed: {errors}")
    return took


def measure(reps: int = 10) -> dict[str, Any]:
    support = sandbox.probe()
    if not support.available:
        return {"skipped": support.describe()}
    audit.configure(journal=False, stream=io.StringIO())
    spec = _spec()
    settings = dataclasses.replace(Settings(), bpffs_root="/sys/fs/bpf/loaderd-bench-unused")
    s: dict[str, list[float]] = {"enter": [], "landlock": [], "seccomp": [], "confined": [],
                                 "unconfined": []}
    _stage_once(spec, settings, confined=True)  # warm the page cache, untimed
    read = confine.read_paths()
    for _ in range(reps):  # interleaved: a load spike hits both sides alike
        s["unconfined"].append(_stage_once(spec, settings, confined=False))
        s["confined"].append(_stage_once(spec, settings, confined=True))
        for which in ("enter", "landlock", "seccomp"):
            s[which].append(_setup_once(which, read))
    audit.configure()
    rules = confine.rules("/tmp")
    return {"abi": support.abi, "reps": reps, "rules": len(rules),
            "samples": s, "best": {k: min(v) for k, v in s.items()}}


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, baseline, ratio)."""
    if "skipped" in r:
        return [("P6 sandbox cost per compile", "—", "—", f"skipped: {r['skipped']}")]
    b = r["best"]

    def ms(x: float) -> str:
        return f"{x * 1000:.2f} ms"

    base = b["unconfined"]
    return [
        (f"P6 sandbox setup in a worker (Landlock ABI {r['abi']}, {r['rules']} rules, "
         "+ seccomp)", ms(b["enter"]), ms(base) + " (unconfined compile)",
         f"{b['enter'] / base:.3f}x"),
        ("P6   of which Landlock ruleset + restrict_self", ms(b["landlock"]), ms(base),
         f"{b['landlock'] / base:.3f}x"),
        ("P6   of which seccomp bpf() filter", ms(b["seccomp"]), ms(base),
         f"{b['seccomp'] / base:.3f}x"),
        ("P6 one compile through the pool, confined", ms(b["confined"]),
         ms(base) + " (same path, unconfined)", f"{b['confined'] / base:.3f}x"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.sandbox_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", help="also write the samples here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (bpf())", file=sys.stderr)
        return 2
    r = measure(args.reps)
    print("| figure | value | baseline | ratio |\n|---|---|---|---|")
    for row in rows(r):
        print("| " + " | ".join(row) + " |")
    if "best" in r:
        extra = (r["best"]["confined"] - r["best"]["unconfined"]) * 1000
        print(f"\nbest of {r['reps']} interleaved repetitions; confined - unconfined = "
              f"{extra:+.2f} ms per compile; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
