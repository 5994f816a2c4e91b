"""Compare what the manifest says is applied with what the kernel actually has.

Used to adopt pins on restart (a match means: no recompile, no re-attach) and by the daemon's
drift check. Facts come from the kernel (ids, tags, link -> program, frozen flag read through
the pinned objects), never from file names alone.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TypeVar

from loaderd.bpf import attach, kernel
from loaderd.errors import LoaderdError
from loaderd.model import UprobeAttach, link_program
from loaderd.store.manifest import SpecRecord

T = TypeVar("T")


def _read(path: str, read: Callable[[int], T], diffs: list[str], what: str, *,
          rdonly: bool = False, wronly: bool = False, note: str = "") -> T | None:
    """`read(fd)` of the object pinned at `path`; None (and a difference recorded) if it
    cannot be opened. A missing pin and a pin we may not open are different findings."""
    try:
        fd = kernel.obj_get(path, rdonly=rdonly, wronly=wronly)
    except LoaderdError as exc:
        code = getattr(exc, "errno", 0)
        diffs.append(f"{what} pin missing: {path}{note}" if code == errno.ENOENT else
                     f"{what} pin {path}: cannot open: {os.strerror(code) if code else exc}")
        return None
    try:
        return read(fd)
    finally:
        os.close(fd)


def _map_facts(fd: int) -> tuple[int, bool]:
    return kernel.map_info(fd).id, kernel.map_is_frozen(fd)


def differences(record: SpecRecord, *, by_name: bool = False) -> list[str]:
    """Every way the pinned objects of one spec record differ from it. [] = intact.
    `by_name`: also look XDP interfaces up by name (only in the host's network namespace)."""
    base = record.pin_dir
    diffs: list[str] = []
    prog_ids: dict[str, int] = {}
    for name, prog in record.programs.items():
        path = os.path.join(base, "progs", name)
        info = _read(path, kernel.prog_info, diffs, "program")
        if info is None:
            continue
        prog_ids[name] = info.id
        if (info.id, info.tag) != (prog.id, prog.tag):
            diffs.append(f"program {path}: id/tag {info.id}/{info.tag} != manifest "
                         f"{prog.id}/{prog.tag}")
    for name, m in record.maps.items():
        path = os.path.join(base, "maps", name)
        # Open the way the pin's mode allows (a WRONLY map's pin has no read bits).
        wronly = m.access == "wronly"
        facts = _read(path, _map_facts, diffs, "map", rdonly=not wronly, wronly=wronly)
        if facts is None:
            continue
        map_id, frozen = facts
        if map_id != m.id:
            diffs.append(f"map {path}: id {map_id} != manifest {m.id}")
        if frozen != m.frozen:
            diffs.append(f"map {path}: frozen={frozen}, manifest says {m.frozen}")
    for name, link in record.links.items():
        path = os.path.join(base, "links", name)
        linfo = _read(path, kernel.link_info, diffs, "link",
                      note=f" (program {link_program(name)} is detached)")
        if linfo is None:
            continue
        owner = link_program(name)  # a per-CPU link (perf_event) names its CPU too
        if owner in prog_ids and linfo.prog_id != prog_ids[owner]:
            diffs.append(f"link {path}: runs program id {linfo.prog_id}, expected "
                         f"{prog_ids[owner]}")
        off = attach.target_difference(linfo, link.target, link.ifindex, by_name=by_name)
        if off:
            diffs.append(f"link {path}: {off}")
        if isinstance(link.target, UprobeAttach) and link.binary_ino is not None:
            # Hashing only where the apply looks (by_name): the resident's tick stats it.
            off = attach.binary_difference(link.target, link.binary_ino, link.binary_sha256,
                                           hashed=by_name)
            if off:
                diffs.append(f"link {path}: {off}")
    return diffs
