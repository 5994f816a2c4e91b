"""Fuzz the parsers at scale: `python3 -m tests.fuzz --count N [--seed S] [--jobs J]`.

Drives the YAML loader, the spec schema and semantic checks (and the policy checks of what they
accept), the settings loader, the manifest parser and the event decoder + sanitizer with
generated and mutated inputs seeded from tests/corpus. Findings: a crash (any exception but a
located LoaderdError), an unlocated error, a hang (over 1 s; a per-input alarm, and a watchdog
in the parent for code an alarm cannot interrupt). Prints a JSON summary; exit 1 on a finding.
`--replay I` runs input I of the seed again in this process and shows its traceback.
Not part of CI's time: CI runs a short slice (tests/unit/test_fuzz_slice.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .engine import HANG_S, Corpus, Finding, Gen, Targets, indices, install_alarm, workdir_base

# No progress that long (wall clock): the alarm could not break in. Generous: on a shared host
# the 1 s of CPU an alarmed input may spend, twice (the re-run), can take many seconds.
WATCHDOG_S = 60 * HANG_S
PROGRESS_S = 60.0


def _worker(seed: int, start: int, count: int, w: int, workers: int, plant: bool,
            deadline: float, progress: Any, out: Any) -> None:
    install_alarm()
    corpus = Corpus()
    counts: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(dir=workdir_base()) as d:
        os.chmod(d, 0o755)
        targets = Targets(Path(d), corpus, plant)
        for i in indices(start, count, w, workers):
            if time.time() > deadline:
                break
            progress[2 * w] = i
            f = targets.run(seed, i)
            if f is not None:
                out.put(("finding", f))
            counts[targets.last_target] += 1
            progress[2 * w + 1] += 1
    out.put(("counts", dict(counts)))
    out.put(("done", w))


def _summarize(findings: list[Finding]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.target, f.what, f.detail[:120]), []).append(f)
    return [{"target": t, "what": w, "detail": d, "count": len(fs),
             "first": {"seed": fs[0].seed, "index": fs[0].index},
             "input": fs[0].data[:400].decode("utf-8", "backslashreplace")}
            for (t, w, d), fs in sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def run(seed: int, count: int, start: int, jobs: int, plant: bool, time_limit: float,
        save: Path | None) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    progress = ctx.Array("q", 2 * jobs, lock=False)
    out: Any = ctx.Queue()
    deadline = time.time() + time_limit
    t0 = time.monotonic()
    procs: dict[int, Any] = {}
    first: dict[int, int] = {}  # worker -> the first index it owns (restarts move it)
    for w in range(jobs):
        first[w] = start + w
        progress[2 * w] = -1
        procs[w] = ctx.Process(target=_worker, args=(seed, start, count, w, jobs, plant,
                                                     deadline, progress, out), daemon=True)
        procs[w].start()
    findings: list[Finding] = []
    slow: list[Finding] = []  # over HANG_S once, not on the re-run: reported, not failed
    counts: collections.Counter[str] = collections.Counter()
    seen = {w: (-2, time.monotonic()) for w in procs}
    done: set[int] = set()
    last_report = time.monotonic()
    while len(done) < len(procs):
        try:
            kind, value = out.get(timeout=0.5)
            if kind == "finding" and value.what == "slow-once":
                slow.append(value)
            elif kind == "finding":
                findings.append(value)
                if len(findings) <= 100:  # as found: a long run can be fixed while it runs
                    print(f"fuzz: {value.what} in {value.target} at --seed {value.seed} "
                          f"--replay {value.index}: {value.detail[:200]}", file=sys.stderr,
                          flush=True)
            elif kind == "counts":
                counts.update(value)
            else:
                done.add(value)
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        for w, p in procs.items():
            if w in done:
                continue
            cur = progress[2 * w]
            if cur < 0 and not p.is_alive():
                raise SystemExit(f"fuzz: worker {w} died before its first input "
                                 f"(exit {p.exitcode})")
            if cur != seen[w][0]:
                seen[w] = (cur, now)
            elif now - seen[w][1] > WATCHDOG_S or not p.is_alive():
                # Stuck where the alarm cannot reach, or died (a crash of the interpreter):
                # a finding at that input; a fresh worker takes the rest of its share.
                alive = p.is_alive()
                why = "no progress (wall clock)" if alive else f"worker died ({p.exitcode})"
                p.kill()
                p.join()
                findings.append(Finding(seed, cur, "?", "hang" if alive else "crash", why,
                                        b""))
                nxt = cur + jobs
                progress[2 * w] = -1
                seen[w] = (-2, now)
                procs[w] = ctx.Process(target=_worker, args=(
                    seed, nxt - w, count - (nxt - w - start), w, jobs, plant, deadline,
                    progress, out), daemon=True)
                procs[w].start()
        if now - last_report > PROGRESS_S:
            last_report = now
            n = sum(progress[2 * w + 1] for w in procs)
            print(f"fuzz: {n} inputs, {now - t0:.0f} s, {len(findings)} findings",
                  file=sys.stderr, flush=True)
    wall = time.monotonic() - t0
    for p in procs.values():
        p.join()
    total = sum(counts.values())
    if save is not None and findings:
        save.mkdir(parents=True, exist_ok=True)
        for f in findings[:200]:
            (save / f"{f.seed}-{f.index}-{f.target}-{f.what}.bin").write_bytes(f.data)
    return {"seed": seed, "start": start, "inputs": total, "wall_s": round(wall, 1),
            "per_s": round(total / wall, 1) if wall else None, "jobs": jobs,
            "targets": dict(sorted(counts.items())), "hang_s": HANG_S,
            "findings": len(findings), "groups": _summarize(findings),
            "slow_once": [{"target": f.target, "index": f.index} for f in slow[:50]],
            "slow_once_count": len(slow)}


def replay(seed: int, index: int) -> int:
    install_alarm()
    with tempfile.TemporaryDirectory(dir=workdir_base()) as d:
        targets = Targets(Path(d), Corpus())
        import random
        rng = random.Random(f"{seed}:{index}")
        name = rng.choice(targets.names)
        print(f"input {index} of seed {seed}: target {name}")
        try:
            targets.funcs[name](Gen(rng, targets.c))
        except BaseException:
            traceback.print_exc()
            print(targets.last[:2000].decode("utf-8", "backslashreplace"))
            return 1
    print("no finding")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.fuzz", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first input index")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--time-limit", type=float, default=float("inf"),
                    help="stop after this many seconds (the summary says how many ran)")
    ap.add_argument("--save", type=Path, help="write each finding's input here")
    ap.add_argument("--replay", type=int, metavar="I")
    ap.add_argument("--plant", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.replay is not None:
        return replay(a.seed, a.replay)
    result = run(a.seed, a.count, a.start, max(1, a.jobs), a.plant, a.time_limit, a.save)
    print(json.dumps(result, indent=1))
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
