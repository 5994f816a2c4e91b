"""What is applied, read without privileges: the manifest x the kernel x bpffs.

status needs no capability: it reads the manifest and opens pins itself (maps with
BPF_F_RDONLY). The kernel lets BPF_OBJ_GET open a program or link only read-write, so a reader
whose pin mode grants read alone sees those from the manifest, and says so. When the manifest
itself is unreadable (it is 0640 loaderd:loaderd-readers), the pins are walked.

JSON uses bpftool's field names for kernel facts, plus loaderd's own (spec, sha256, pin,
freeze, degraded, drift, facts).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from loaderd import sandbox
from loaderd.audit import spool
from loaderd.bpf import kernel, offsets, pins
from loaderd.config import spec as spec_mod
from loaderd.config.settings import load_default
from loaderd.errors import LoaderdError
from loaderd.model import MAP_TYPE_BY_ID, MapType, Settings, Spec
from loaderd.observe.drift import differences
from loaderd.store import manifest
from loaderd.store import statedir as state
from loaderd.store.manifest import Manifest, SpecRecord

NO_PERMISSION = "no permission"
MISSING = "missing"
MISSING_NOTE = "pin missing"

# --- what the caller may read -----------------------------------------------------------------

@dataclass
class View:
    settings: Settings
    manifest: Manifest | None  # None: unreadable or absent
    manifest_note: str | None = None
    # the manifest is there but refused (malformed, not a regular file, ...): state unknown,
    # status fails (a tampered manifest must not read as "nothing to report")
    manifest_refused: bool = False
    notes: list[str] = field(default_factory=list)
    no_permission: bool = False  # the manifest exists but this user may not read it
    absent: bool = False  # no manifest: nothing was ever applied here

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.settings.state_dir, state.MANIFEST)

    def entry(self, spec: str) -> SpecRecord | None:
        return None if self.manifest is None else self.manifest.specs.get(spec)


def read_manifest(settings: Settings) -> tuple[Manifest | None, str | None, bool]:
    """The manifest, or None, why and whether it was refused (True) rather than absent or not
    readable by this user (read directly: State() would try to create dirs)."""
    path = os.path.join(settings.state_dir, state.MANIFEST)
    try:
        found = manifest.read(path, settings.bpffs_root)
        if found is None:
            return None, f"no manifest at {path}: nothing applied yet", False
        return found, None, False
    except LoaderdError as exc:
        return None, str(exc), True
    except PermissionError:
        return None, (f"manifest {path} is not readable by uid {os.getuid()}: showing what the "
                      "pins tell (kernel facts of maps; programs and links by name only)"), False
    except (OSError, ValueError) as exc:
        return None, f"manifest {path} unreadable: {exc}", True


def load_view(config: str | None) -> View:
    return view_for(load_default(config))


def view_for(settings: Settings) -> View:
    manifest, note, refused = read_manifest(settings)
    denied = manifest is None and note is not None and " is not readable by uid " in note
    absent = manifest is None and note is not None and note.startswith("no manifest at ")
    return View(settings, manifest, note, refused, no_permission=denied, absent=absent)


# --- kernel facts, bpftool's field names ------------------------------------------------------

def _boot_to_wall() -> float:
    """Add to a CLOCK_BOOTTIME reading to get wall-clock seconds (load_time is boottime ns)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def prog_facts(fd: int) -> dict[str, Any]:
    info = kernel.prog_info(fd)
    out: dict[str, Any] = {
        "id": info.id, "type": info.type_name, "name": info.name, "tag": info.tag,
        "gpl_compatible": info.gpl_compatible,
        "loaded_at": int(_boot_to_wall() + info.load_time / 1e9), "uid": info.created_by_uid,
        "bytes_xlated": info.xlated_len, "jited": info.jited_len > 0,
        "bytes_jited": info.jited_len,
        "bytes_memlock": int(kernel.fdinfo(fd).get("memlock", "0") or 0),
        "map_ids": list(info.map_ids)}
    if info.btf_id:
        out["btf_id"] = info.btf_id
    if info.run_time_ns:  # like bpftool: only once kernel.bpf_stats_enabled counted something
        out["run_time_ns"], out["run_cnt"] = info.run_time_ns, info.run_cnt
    return out


def _ring_positions(fd: int, path: str | None) -> tuple[int, int] | None:
    """(consumer, producer) of a ring buffer. The kernel maps a ring only through a
    read-write fd (measured: EINVAL for BPF_F_RDONLY), so the pin is opened read-write for
    this read-only mapping where this user may (root, the pin's owner); else None."""
    rw = -1
    try:
        try:
            pos = mmap.mmap(fd, 2 * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError:
            if path is None:
                return None
            rw = kernel.obj_get(path)
            pos = mmap.mmap(rw, 2 * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, LoaderdError):
        return None
    finally:
        if rw >= 0:
            os.close(rw)
    try:
        cons, prod = (struct.unpack_from("<Q", pos, at)[0] for at in (0, mmap.PAGESIZE))
    finally:
        pos.close()
    return int(cons), int(prod)


def fill(fd: int, info: kernel.MapInfo, path: str | None = None) -> dict[str, Any]:
    """How full a map is: a hash's entries over max_entries (a full hash refuses new keys:
    the program's update fails and it silently stops counting), a ring buffer's unread bytes
    over its size (a full ring drops new records; the kernel counts none). Arrays are always
    full (every slot exists): nothing to say."""
    mtype = MAP_TYPE_BY_ID.get(info.type)
    if mtype is None:
        return {}
    if mtype is MapType.RINGBUF:
        got = _ring_positions(fd, path)
        if got is None:
            return {}
        pending = max(0, got[1] - got[0])
        return {"bytes_pending": pending, "fill": round(pending / info.max_entries, 4)}
    if mtype.kind.array or mtype.kind.fixed:
        return {}
    n = 0
    for _ in kernel.map_keys(fd, info.key_size):
        n += 1
        if n >= info.max_entries:
            break
    return {"entries": n, "fill": round(n / info.max_entries, 4)}


def map_facts(fd: int, path: str | None = None) -> dict[str, Any]:
    info = kernel.map_info(fd)
    out: dict[str, Any] = {
        "id": info.id, "type": info.type_name, "name": info.name, "flags": info.map_flags,
        "bytes_key": info.key_size, "bytes_value": info.value_size,
        "max_entries": info.max_entries}
    fdi = kernel.fdinfo(fd)
    out["bytes_memlock"] = int(fdi.get("memlock", "0") or 0)
    out["frozen"] = int(fdi.get("frozen", "0") or 0)
    if info.btf_id:
        out["btf_id"] = info.btf_id
    with contextlib.suppress(LoaderdError):
        out.update(fill(fd, info, path))
    return out


def link_facts(fd: int) -> dict[str, Any]:
    info = kernel.link_info(fd)
    out: dict[str, Any] = {"id": info.id, "type": info.type_name, "prog_id": info.prog_id}
    if info.type == kernel.LINK_TYPE_RAW_TRACEPOINT:
        out["tp_name"] = info.tp_name
    elif info.tp_name is not None:
        out["event_type"], out["tracepoint"] = "tracepoint", info.tp_name
    if info.ifindex is not None:
        out["ifindex"] = info.ifindex
    if info.file is not None:  # bpftool's uprobe fields
        out["event_type"] = kernel.PERF_EVENT_TYPE_NAMES.get(info.perf_event_type or 0)
        out["file"], out["offset"] = info.file, info.offset
    if info.cgroup_id:
        out["cgroup_id"] = info.cgroup_id
    if info.netns_ino is not None:
        out["netns_ino"] = info.netns_ino
    if info.attach_type is not None:  # bpftool's spelling: tcx_ingress, tcx_egress
        out["attach_type"] = kernel.ATTACH_TYPE_NAMES.get(info.attach_type, info.attach_type)
    return out


def open_pin(path: str, *, rdonly: bool) -> tuple[int | None, str | None]:
    """(fd, None) or (None, MISSING | NO_PERMISSION | error text)."""
    try:
        return kernel.obj_get(path, rdonly=rdonly), None
    except kernel.KernelError as exc:
        if exc.errno == errno.ENOENT:
            return None, MISSING
        if exc.errno in (errno.EACCES, errno.EPERM):
            return None, NO_PERMISSION
        return None, str(exc)


def pin_facts(path: str, read: Callable[[int], dict[str, Any]], *, rdonly: bool
              ) -> tuple[dict[str, Any] | None, str | None]:
    fd, why = open_pin(path, rdonly=rdonly)
    if fd is None:
        return None, why
    try:
        return read(fd), None
    finally:
        os.close(fd)


# --- status -----------------------------------------------------------------------------------

def _fallback_note(why: str | None, kind: str, have_manifest: bool) -> str:
    shown = "showing manifest data" if have_manifest else "no manifest to show instead"
    if why == NO_PERMISSION and kind == "map":
        return (f"map pin not readable by uid {os.getuid()} (its mode/group grants no read); "
                f"{shown}")
    if why == NO_PERMISSION:
        return (f"{kind} pin not openable by uid {os.getuid()} (BPF_OBJ_GET opens {kind}s "
                f"read-write only); {shown}")
    if why == MISSING:
        return MISSING_NOTE
    return f"pin not openable: {why}"


@dataclass(frozen=True)
class Recorded:
    """One spec's objects as status shows them: its manifest record, or (no readable
    manifest) the names walked from its pin directory, with no recorded facts."""

    name: str
    pin_dir: str
    record: SpecRecord | None
    programs: tuple[str, ...]
    maps: tuple[str, ...]
    links: tuple[str, ...]

    @classmethod
    def of(cls, r: SpecRecord) -> Recorded:
        return cls(r.name, r.pin_dir, r, tuple(r.programs), tuple(r.maps), tuple(r.links))


def _row(row: dict[str, Any], read: Callable[[int], dict[str, Any]], kind: str, *,
         rdonly: bool, fallback: dict[str, Any], recorded: dict[str, Any] | None,
         unchecked: list[str]) -> dict[str, Any]:
    """`row` with the kernel's facts of the pin, or else what the manifest recorded (and why
    the kernel's could not be read)."""
    facts, why = pin_facts(row["pin"], read, rdonly=rdonly)
    if facts is not None:
        return {**row, **facts, "facts": "kernel"}
    if why == NO_PERMISSION:
        unchecked.append(row["pin"])
    return {**row, **fallback, **(recorded or {}),
            "facts": "manifest" if recorded is not None else "none",
            "note": _fallback_note(why, kind, recorded is not None)}


def _object_rows(spec: Recorded, unchecked: list[str]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    r = spec.record
    common = {"spec": spec.name, "sha256": r.sha256 if r else None}

    def pin(kind: str, name: str) -> str:
        return os.path.join(spec.pin_dir, kind, name)

    progs = []
    for name in sorted(spec.programs):
        p = r.programs.get(name) if r else None
        progs.append(_row(
            {**common, "pin": pin("progs", name), "degraded": p.degraded if p else None,
             "function": p.function if p else name}, prog_facts, "program", rdonly=False,
            fallback={"name": name}, unchecked=unchecked,
            recorded=None if p is None else {"id": p.id, "type": p.type.value, "tag": p.tag}))
    maps = []
    for name in sorted(spec.maps):
        m = r.maps.get(name) if r else None
        path = pin("maps", name)
        maps.append(_row({**common, "pin": path, "freeze": m.frozen if m else None},
                         functools.partial(map_facts, path=path), "map", rdonly=True,
                         fallback={"name": name},
                         recorded=None if m is None else {"id": m.id}, unchecked=unchecked))
    links = []
    for name in sorted(spec.links):
        lk = r.links.get(name) if r else None
        links.append(_row({**common, "pin": pin("links", name), "program": name,
                           "target": lk.target.text if lk else None}, link_facts, "link",
                          rdonly=False, fallback={}, unchecked=unchecked,
                          recorded=None if lk is None else {"id": lk.id}))
    return progs, maps, links


def _partial_drift(progs: list[dict[str, Any]], maps: list[dict[str, Any]],
                   links: list[dict[str, Any]], record: SpecRecord) -> list[str]:
    """Drift from what this reader could open; drift.differences needs every pin open."""
    diffs = []
    for kind, rows in (("program", progs), ("link", links)):
        diffs += [f"{kind} pin missing: {r['pin']}" for r in rows if r.get("note") == MISSING_NOTE]
    for row in maps:
        m = record.maps[row["name"]]
        if row.get("note") == MISSING_NOTE:
            diffs.append(f"map pin missing: {row['pin']}")
        elif row["facts"] == "kernel":
            if row["id"] != m.id:
                diffs.append(f"map {row['pin']}: id {row['id']} != manifest {m.id}")
            if bool(row["frozen"]) != m.frozen:
                diffs.append(f"map {row['pin']}: frozen={bool(row['frozen'])}, manifest says "
                             f"{m.frozen}")
    return diffs


def spec_report(spec: Recorded) -> dict[str, Any]:
    unchecked: list[str] = []
    progs, maps, links = _object_rows(spec, unchecked)
    r = spec.record
    drift: list[str] | None
    if r is None:
        drift = None  # nothing to compare against
    elif unchecked:
        drift = _partial_drift(progs, maps, links, r)
    else:
        drift = differences(r)  # the daemon's own definition
    for row in progs + maps + links:
        row["drift"] = None if drift is None else [d for d in drift if row["pin"] in d]
        row["degraded"] = row.get("degraded")
    return {"spec": spec.name, "sha256": r.sha256 if r else None, "file": r.file if r else None,
            "pin_dir": spec.pin_dir, "txid": r.txid if r else None,
            "degraded": any(p.get("degraded") for p in progs), "drift": drift,
            "unchecked": unchecked, "programs": progs, "maps": maps, "links": links,
            "signature": manifest.signature_dict(r.signature) if r and r.signature else None}


def _walked(root: str, denied: list[str]) -> Iterator[Recorded]:
    """The specs the bpffs layout shows (names only); `denied` gets the root when this user
    may not list it (outside the readers' group)."""
    try:
        listed = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    except PermissionError:
        denied.append(root)
        return
    for spec in listed:
        if not pins.NAME_RE.fullmatch(spec):
            continue  # _staging and anything not a spec name
        base = os.path.join(root, spec)
        names: list[tuple[str, ...]] = []
        for kind in ("progs", "maps", "links"):
            try:
                found = os.listdir(os.path.join(base, kind))
            except OSError:
                found = []
            names.append(tuple(n for n in found if pins.NAME_RE.fullmatch(n)))
        yield Recorded(spec, base, None, *names)


def status(view: View) -> dict[str, Any]:
    m = view.manifest
    head: dict[str, Any] = {"path": view.manifest_path, "readable": m is not None}
    denied: list[str] = []
    if m is not None:
        head.update(status=m.status.value, txid=m.txid, written_at=m.written_at)
        specs = [spec_report(Recorded.of(r)) for _, r in sorted(m.specs.items())]
    else:
        head["note"] = view.manifest_note
        head["manifest_refused"] = view.manifest_refused
        specs = [spec_report(w) for w in _walked(view.settings.bpffs_root, denied)]
    # Nothing to see for this user: neither the manifest nor the pins (partial views are not).
    head["no_permission"] = False
    head["absent"] = view.absent
    notes = list(view.notes)
    if m is None and denied:
        head["no_permission"] = view.no_permission
        notes.append(f"{denied[0]} cannot be listed by uid {os.getuid()}: status needs "
                     "membership of the pin readers' group (pins.group), root or the loaderd "
                     "user")
    refusal = state.read_refusal(os.path.join(view.settings.state_dir, state.REFUSED))
    head["refused"] = None if refusal is None else {
        "at": refusal.at, "errors": refusal.errors, "reason": refusal.reason}
    # An apply killed before it ended (its applying marker left, the lock free): what
    # programs_dir says may not be what is applied. None: no such apply, or one still running.
    head["interrupted"] = state.State(view.settings.state_dir).interrupted()
    missing = pins.bpffs_missing(view.settings.bpffs_root)
    head["bpffs_missing"] = None if missing is None else missing[1]
    if missing is not None:
        notes.append(f"{missing[1]}; fix: {pins.bpffs_fix(missing[0])}")
    # Audit events journald did not take (it was stopped): kept for the resident to replay.
    backlog = spool.Spool(os.path.join(view.settings.state_dir, spool.SPOOL)).backlog()
    head["journal_spool"] = None if backlog is None else {
        "path": backlog.path, "events": backlog.events, "since": backlog.since}
    if backlog is not None:
        notes.append(backlog.sentence() + "; the resident replays them to the journal once "
                     "journald is back")
    try:  # the hold counts only as root's or the state dir owner's (State.owners)
        owners = frozenset({0, os.stat(view.settings.state_dir).st_uid})
    except OSError:
        owners = frozenset({0})
    hold = state.read_hold(os.path.join(view.settings.state_dir, state.HOLD), owners)
    head["rollback"] = None
    if hold is not None:  # a held rollback: what is applied is a generation, not programs_dir
        moved = state.tree_digest(view.settings.programs_dir) != hold.programs_sha256
        head["rollback"] = {"generation": hold.generation, "at": hold.at,
                            "programs_dir_changed": moved, "sentence": hold.sentence(moved)}
    # The resident's event counters (untrusted file, same owners as the hold): what the
    # journal and metrics say too, for one place to look.
    counts = state.read_event_counts(os.path.join(view.settings.state_dir, state.EVENTS), owners)
    head["events"] = None if counts is None else {
        "at": counts.at, "pid": counts.pid,
        "maps": [{"spec": c.spec, "map": c.map, "read": c.read, "dropped": c.dropped,
                  "lost": c.lost, "backlog": c.backlog} for c in counts.maps]}
    if any(s["unchecked"] for s in specs):
        notes.append("some pins could not be opened by this user" + (
            ": their facts come from the manifest and drift was checked only for what could be "
            "opened" if m is not None else "") + "; run as root (or the loaderd user) for the "
            "full picture")
    support = sandbox.probe()
    if not support.available:
        notes.append(f"compile sandbox DEGRADED: {support.describe()}: compile workers run "
                     "without Landlock")
    hstate, hsentence = offsets.describe(view.settings.state_dir)
    if hstate == "mismatch":
        hsentence += ("; such specs are " + ("loaded anyway (accept_header_mismatch: true)"
                                             if view.settings.accept_header_mismatch
                                             else "refused"))
    return {"manifest": head, "specs": specs, "notes": notes,
            "headers": {"state": hstate, "detail": hsentence},
            "sandbox": {"landlock_abi": support.abi, "reason": support.reason or None}}


# --- applied specs (types for dumps, flags for compliance) ------------------------------------

def applied_spec(view: View, name: str) -> tuple[Spec | None, str | None]:
    """The spec exactly as applied (sha256 matches the manifest) or, with no manifest, the
    current one in programs_dir. (None, why) when no readable file matches."""

    entry = view.entry(name)
    limits = view.settings.policy.limits
    candidates: list[str] = []
    if entry is not None:
        if entry.txid:
            candidates.append(os.path.join(view.settings.state_dir, state.GENERATIONS,
                                           entry.txid, os.path.basename(entry.file)))
        candidates.append(entry.file)
    candidates.append(os.path.join(view.settings.programs_dir, f"{name}.yaml"))
    for path in candidates:
        if not os.path.isfile(path):
            continue
        parsed, _errors = spec_mod.parse_spec(path, limits=limits, owner_uid=None)
        if parsed and parsed.name == name and (entry is None
                                               or parsed.sha256 == entry.sha256):
            return parsed, None
    with contextlib.suppress(OSError):
        specs, _errors = spec_mod.load_dir(view.settings.programs_dir, view.settings,
                                           check_owner=False)
        for parsed in specs:
            if parsed.name == name and (entry is None or parsed.sha256 == entry.sha256):
                return parsed, None
    return None, (f"no readable spec file matches the applied version of '{name}': "
                  "keys and values shown as raw bytes")



def to_json(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True,
                      default=lambda o: o.hex() if isinstance(o, bytes) else str(o))

