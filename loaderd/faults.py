"""Crash points for the kill -9 tests of the commit protocol.

`LOADERD_FAULT=<point>` makes the process (and, from a staging worker, its parent apply
process) die with SIGKILL at that point, exactly as an OOM kill or `kill -9` would. Unset in
production; reading one environment variable is the whole cost.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_compile", "after_load", "after_pin", "after_attach", "mid_commit")


def armed(name: str) -> bool:
    """For a confined compile worker, which may not signal its parent (Landlock scopes
    signals): it tells the parent, which then calls point()."""
    return os.environ.get("LOADERD_FAULT") == name


def point(name: str, *, worker: bool = False) -> None:
    if os.environ.get("LOADERD_FAULT") != name:
        return
    if worker:
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
