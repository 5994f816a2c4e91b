"""Capabilities as facts: read from /proc/<pid>/status, checked per program type, dropped for good.

The check runs before anything is compiled so a missing capability is named up front instead of
surfacing as an EPERM halfway through an apply. The drop clears every set (bounding first, while
CAP_SETPCAP is still effective), sets no_new_privs, and then re-reads /proc to prove it.
Capability sets are per thread: call `drop_all()` before starting any thread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from loaderd.errors import Kind, LoaderdError
from loaderd.model import ProgType

CAP_NUMBERS: dict[str, int] = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
    "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27,
    "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}
CAP_NAMES = {v: k for k, v in CAP_NUMBERS.items()}


@dataclass(frozen=True)
class CapState:
    effective: int
    permitted: int
    inheritable: int
    bounding: int
    ambient: int
    no_new_privs: bool

    def has(self, cap: str) -> bool:
        return bool(self.effective >> CAP_NUMBERS[cap] & 1)


def names(mask: int) -> list[str]:
    return [CAP_NAMES.get(i, f"cap_{i}") for i in range(64) if mask >> i & 1]


def read_state(pid: int | str = "self") -> CapState:
    with open(f"/proc/{pid}/status") as f:
        text = f.read()
    fields = dict(re.findall(r"^(Cap\w+|NoNewPrivs):\s*(\S+)$", text, re.M))
    return CapState(
        effective=int(fields["CapEff"], 16), permitted=int(fields["CapPrm"], 16),
        inheritable=int(fields["CapInh"], 16), bounding=int(fields["CapBnd"], 16),
        ambient=int(fields.get("CapAmb", "0"), 16),
        no_new_privs=fields.get("NoNewPrivs", "0") == "1")


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def required_caps(ptype: ProgType, kernel: tuple[int, int] | None = None) -> frozenset[str]:
    """Capabilities needed to load *and attach* a program of this type."""
    caps = ptype.kind.caps
    if (kernel or kernel_version()) < (5, 8):  # CAP_BPF/CAP_PERFMON arrived in 5.8
        return frozenset({"CAP_SYS_ADMIN"}) | (caps & {"CAP_NET_ADMIN"})
    return caps


def check(needed: Iterable[tuple[str, ProgType, str]], state: CapState | None = None) -> None:
    """needed: (spec file, program type, program name). Names the first missing capability."""
    state = state or read_state()
    for path, ptype, program in needed:
        for cap in sorted(required_caps(ptype)):
            if not state.has(cap):
                raise LoaderdError(
                    Kind.CAPABILITY,
                    f"{cap} is missing: {ptype.value} program '{program}' needs "
                    f"{', '.join(sorted(required_caps(ptype)))}; this process has "
                    f"{', '.join(names(state.effective)) or 'none'} "
                    f"(grant it with AmbientCapabilities= in the unit)",
                ).with_file(path)


def drop_all() -> CapState:
    """Drop every capability from every set and forbid regaining any. Returns the proven state."""
    import prctl

    held = read_state()
    if not (held.effective | held.permitted | held.inheritable | held.ambient | held.bounding):
        # Nothing to drop (e.g. a unit with an empty bounding set): no capset(2) at all, so a
        # seccomp filter that denies it cannot stop the daemon.
        prctl.set_no_new_privs(1)
        return read_state()
    if prctl.cap_effective.setpcap:
        for cap in range(prctl.CAP_LAST_CAP + 1):
            prctl.capbset_drop(cap)
    prctl.cap_inheritable.limit()  # empties inheritable, which empties ambient too
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    prctl.set_no_new_privs(1)
    state = read_state()
    if state.effective or state.permitted or state.ambient or state.inheritable:
        raise LoaderdError(Kind.CAPABILITY, "capabilities still present after drop: "
                           + ", ".join(names(state.effective | state.permitted)))
    return state
