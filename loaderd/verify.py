"""Compare what the manifest says is applied with what the kernel actually has.

Used to adopt pins on restart (a match means: no recompile, no re-attach) and by the daemon's
drift check. Facts come from the kernel (ids, tags, link -> program, frozen flag read through
the pinned objects), never from file names alone.
"""

from __future__ import annotations

import os
from typing import Any

from loaderd import kernel
from loaderd.errors import LoaderdError


def _open(path: str, *, rdonly: bool = False) -> int | None:
    try:
        return kernel.obj_get(path, rdonly=rdonly)
    except LoaderdError:
        return None


def differences(entry: dict[str, Any]) -> list[str]:
    """Every way the pinned objects of one manifest spec entry differ from it. [] = intact."""
    base = entry["pin_dir"]
    diffs: list[str] = []
    prog_ids: dict[str, int] = {}
    for name, prog in entry["programs"].items():
        path = os.path.join(base, "progs", name)
        fd = _open(path)
        if fd is None:
            diffs.append(f"program pin missing: {path}")
            continue
        try:
            info = kernel.prog_info(fd)
        finally:
            os.close(fd)
        prog_ids[name] = info.id
        if (info.id, info.tag) != (prog["id"], prog["tag"]):
            diffs.append(f"program {path}: id/tag {info.id}/{info.tag} != manifest "
                         f"{prog['id']}/{prog['tag']}")
    for name, m in entry["maps"].items():
        path = os.path.join(base, "maps", name)
        fd = _open(path, rdonly=True)
        if fd is None:
            diffs.append(f"map pin missing: {path}")
            continue
        try:
            map_id = kernel.map_info(fd).id
            frozen = kernel.map_is_frozen(fd)
        finally:
            os.close(fd)
        if map_id != m["id"]:
            diffs.append(f"map {path}: id {map_id} != manifest {m['id']}")
        if frozen != m["frozen"]:
            diffs.append(f"map {path}: frozen={frozen}, manifest says {m['frozen']}")
    for name, _link in entry.get("links", {}).items():
        path = os.path.join(base, "links", name)
        fd = _open(path)
        if fd is None:
            diffs.append(f"link pin missing: {path} (program {name} is detached)")
            continue
        try:
            linfo = kernel.link_info(fd)
        finally:
            os.close(fd)
        if name in prog_ids and linfo.prog_id != prog_ids[name]:
            diffs.append(f"link {path}: runs program id {linfo.prog_id}, expected "
                         f"{prog_ids[name]}")
    return diffs
