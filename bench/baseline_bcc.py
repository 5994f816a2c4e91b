"""Baseline: a plain BCC script. One process, serial: `BPF(text=..., allow_rlimit=False)` and
`load_func` per program, for the same C text loaderd compiles. Nothing is pinned or attached.

Usage: baseline_bcc.py WORK.json, where WORK.json is [[c_text, [[function, prog_type], ...]], ...].
Prints one JSON line: {"loaded": n, "import_s": t, "vmrss_kb": ..., "vmhwm_kb": ..., "maps": [...]}
taken after every program is loaded (the objects are still alive), then exits.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main(path: str) -> int:
    with open(path) as f:
        work: list[list[Any]] = json.load(f)
    t0 = time.monotonic()
    from bcc import BPF

    import_s = time.monotonic() - t0
    objs = []
    loaded = 0
    for text, funcs in work:
        b = BPF(text=text.encode(), allow_rlimit=False)
        for func, ptype in funcs:
            b.load_func(func.encode(), ptype)
            loaded += 1
        objs.append(b)
    with open("/proc/self/maps") as f:
        libs = sorted({ln.split()[-1].rsplit("/", 1)[-1] for ln in f
                       if any(k in ln for k in ("libbcc", "libLLVM", "libclang"))})
    print(json.dumps({"loaded": loaded, "import_s": import_s, "vmrss_kb": status_kb("VmRSS"),
                      "vmhwm_kb": status_kb("VmHWM"), "maps": libs}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
