"""`loaderctl`: read-mostly operator tooling over what loaderd applied.

status, list and dump need no capability: they read the manifest and open pins themselves
(maps with BPF_F_RDONLY). The kernel lets BPF_OBJ_GET open a program or link only read-write,
so a reader whose pin mode grants read alone sees those from the manifest, and says so. When
the manifest itself is unreadable (it is 0640 loaderd:loaderd-readers), the pins are walked.

JSON uses bpftool's field names for kernel facts, plus loaderd's own (spec, sha256, pin,
freeze, degraded, drift, facts). Exit codes: 0 ok, 1 failed or a finding, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from loaderd import audit, kernel, pins, state, verify
from loaderd.clikit import (
    add_command,
    add_global_flags,
    cmd_disable,
    cmd_enable,
    cmd_rollback,
    load_settings,
    run,
)
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import CType, Settings, Spec
from loaderd.sanitize import Key

NO_PERMISSION = "no permission"
MISSING = "missing"
MISSING_NOTE = "pin missing"
_PERCPU_MAPS = {kernel.MAP_TYPES[t] for t in ("percpu_hash", "percpu_array", "lru_percpu_hash")}
_UNDUMPABLE = {kernel.MAP_TYPES[t] for t in ("ringbuf", "perf_event_array", "user_ringbuf")}


# --- what the caller may read -----------------------------------------------------------------

@dataclass
class View:
    settings: Settings
    manifest: dict[str, Any] | None  # None: unreadable or absent
    manifest_note: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.settings.state_dir, state.MANIFEST)

    def entry(self, spec: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = (self.manifest or {}).get("specs", {}).get(spec)
        return found


def read_manifest(settings: Settings) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest, or None and why (read directly: State() would try to create dirs)."""
    path = os.path.join(settings.state_dir, state.MANIFEST)
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = json.load(f)
        return data, None
    except FileNotFoundError:
        return None, f"no manifest at {path}: nothing applied yet"
    except PermissionError:
        return None, (f"manifest {path} is not readable by uid {os.getuid()}: showing what the "
                      "pins tell (kernel facts of maps; programs and links by name only)")
    except (OSError, ValueError) as exc:
        return None, f"manifest {path} unreadable: {exc}"


def load_view(config: str | None) -> View:
    settings = load_settings(config)
    manifest, note = read_manifest(settings)
    return View(settings, manifest, note)


# --- kernel facts, bpftool's field names ------------------------------------------------------

def _boot_to_wall() -> float:
    """Add to a CLOCK_BOOTTIME reading to get wall-clock seconds (load_time is boottime ns)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def fdinfo(fd: int) -> dict[str, str]:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
        pairs = (line.split(":", 1) for line in f if ":" in line)
        return {k.strip(): v.strip() for k, v in pairs}


def prog_facts(fd: int) -> dict[str, Any]:
    info = kernel.prog_info(fd)
    out: dict[str, Any] = {
        "id": info.id, "type": info.type_name, "name": info.name, "tag": info.tag,
        "gpl_compatible": info.gpl_compatible,
        "loaded_at": int(_boot_to_wall() + info.load_time / 1e9), "uid": info.created_by_uid,
        "bytes_xlated": info.xlated_len, "jited": info.jited_len > 0,
        "bytes_jited": info.jited_len,
        "bytes_memlock": int(fdinfo(fd).get("memlock", "0") or 0),
        "map_ids": list(info.map_ids)}
    if info.btf_id:
        out["btf_id"] = info.btf_id
    if info.run_time_ns:  # like bpftool: only once kernel.bpf_stats_enabled counted something
        out["run_time_ns"], out["run_cnt"] = info.run_time_ns, info.run_cnt
    return out


def map_facts(fd: int) -> dict[str, Any]:
    info = kernel.map_info(fd)
    out: dict[str, Any] = {
        "id": info.id, "type": info.type_name, "name": info.name, "flags": info.map_flags,
        "bytes_key": info.key_size, "bytes_value": info.value_size,
        "max_entries": info.max_entries}
    fdi = fdinfo(fd)
    out["bytes_memlock"] = int(fdi.get("memlock", "0") or 0)
    out["frozen"] = int(fdi.get("frozen", "0") or 0)
    if info.btf_id:
        out["btf_id"] = info.btf_id
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


def _object_rows(name: str, entry: dict[str, Any], unchecked: list[str]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    base = entry["pin_dir"]
    common = {"spec": name, "sha256": entry.get("sha256")}
    progs, maps, links = [], [], []
    for pname, p in sorted(entry.get("programs", {}).items()):
        path = os.path.join(base, "progs", pname)
        row: dict[str, Any] = {**common, "pin": path, "degraded": p.get("degraded"),
                               "function": p.get("function", pname)}
        facts, why = pin_facts(path, prog_facts, rdonly=False)
        if facts is not None:
            row.update(facts, facts="kernel")
        else:
            row.update(name=pname, facts="manifest" if p else "none",
                       note=_fallback_note(why, "program", bool(p)))
            row.update({k: p[k] for k in ("id", "type", "tag") if k in p})
            if why == NO_PERMISSION:
                unchecked.append(path)
        progs.append(row)
    for mname, m in sorted(entry.get("maps", {}).items()):
        path = os.path.join(base, "maps", mname)
        row = {**common, "pin": path, "freeze": m.get("frozen")}
        facts, why = pin_facts(path, map_facts, rdonly=True)
        if facts is not None:
            row.update(facts, facts="kernel")
        else:
            row.update(name=mname, facts="manifest" if m else "none",
                       note=_fallback_note(why, "map", bool(m)))
            if "id" in m:
                row["id"] = m["id"]
            if why == NO_PERMISSION:
                unchecked.append(path)
        maps.append(row)
    for lname, link in sorted(entry.get("links", {}).items()):
        path = os.path.join(base, "links", lname)
        row = {**common, "pin": path, "program": lname, "target": link.get("target")}
        facts, why = pin_facts(path, link_facts, rdonly=False)
        if facts is not None:
            row.update(facts, facts="kernel")
        else:
            row.update(facts="manifest" if link else "none", note=_fallback_note(why, "link",
                                                                           bool(link)))
            if "id" in link:
                row["id"] = link["id"]
            if why == NO_PERMISSION:
                unchecked.append(path)
        links.append(row)
    return progs, maps, links


def _partial_drift(progs: list[dict[str, Any]], maps: list[dict[str, Any]],
                   links: list[dict[str, Any]], entry: dict[str, Any]) -> list[str]:
    """Drift from what this reader could open; verify.differences needs every pin open."""
    diffs = []
    for kind, rows in (("program", progs), ("link", links)):
        diffs += [f"{kind} pin missing: {r['pin']}" for r in rows if r.get("note") == MISSING_NOTE]
    for row in maps:
        m = entry["maps"].get(row["name"], {})
        if row.get("note") == MISSING_NOTE:
            diffs.append(f"map pin missing: {row['pin']}")
        elif row["facts"] == "kernel":
            if row["id"] != m.get("id"):
                diffs.append(f"map {row['pin']}: id {row['id']} != manifest {m.get('id')}")
            if bool(row["frozen"]) != m.get("frozen"):
                diffs.append(f"map {row['pin']}: frozen={bool(row['frozen'])}, manifest says "
                             f"{m.get('frozen')}")
    return diffs


def spec_report(name: str, entry: dict[str, Any], *, from_manifest: bool = True
                ) -> dict[str, Any]:
    unchecked: list[str] = []
    progs, maps, links = _object_rows(name, entry, unchecked)
    drift: list[str] | None
    if not from_manifest:
        drift = None  # nothing to compare against
    elif unchecked:
        drift = _partial_drift(progs, maps, links, entry)
    else:
        drift = verify.differences(entry)  # the daemon's own definition
    for row in progs + maps + links:
        row["drift"] = None if drift is None else [d for d in drift if row["pin"] in d]
        row["degraded"] = row.get("degraded")
    return {"spec": name, "sha256": entry.get("sha256"), "file": entry.get("file"),
            "pin_dir": entry["pin_dir"], "txid": entry.get("txid"),
            "degraded": any(p.get("degraded") for p in progs), "drift": drift,
            "unchecked": unchecked, "programs": progs, "maps": maps, "links": links}


def _walked_entries(root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Pseudo manifest entries from the bpffs layout (names only)."""
    with contextlib.suppress(FileNotFoundError):
        for spec in sorted(os.listdir(root)):
            if not pins.NAME_RE.fullmatch(spec):
                continue  # _staging and anything not a spec name
            base = os.path.join(root, spec)
            entry: dict[str, Any] = {"pin_dir": base}
            for kind, key in (("progs", "programs"), ("maps", "maps"), ("links", "links")):
                try:
                    names = os.listdir(os.path.join(base, kind))
                except OSError:
                    names = []
                entry[key] = {n: {} for n in names if pins.NAME_RE.fullmatch(n)}
            yield spec, entry


def status(view: View) -> dict[str, Any]:
    m = view.manifest
    head: dict[str, Any] = {"path": view.manifest_path, "readable": m is not None}
    if m is not None:
        head.update(status=m.get("status"), txid=m.get("txid"), written_at=m.get("written_at"))
        specs = [spec_report(n, e) for n, e in sorted(m.get("specs", {}).items())]
    else:
        head["note"] = view.manifest_note
        specs = [spec_report(n, e, from_manifest=False)
                 for n, e in _walked_entries(view.settings.bpffs_root)]
    notes = list(view.notes)
    if any(s["unchecked"] for s in specs):
        notes.append("some pins could not be opened by this user" + (
            ": their facts come from the manifest and drift was checked only for what could be "
            "opened" if m is not None else "") + "; run as root (or the loaderd user) for the "
            "full picture")
    return {"manifest": head, "specs": specs, "notes": notes}


# --- applied specs (types for dumps, flags for compliance) ------------------------------------

def applied_spec(view: View, name: str) -> tuple[Spec | None, str | None]:
    """The spec exactly as applied (sha256 matches the manifest) or, with no manifest, the
    current one in programs_dir. (None, why) when no readable file matches."""
    from loaderd import spec as spec_mod

    entry = view.entry(name)
    limits = view.settings.policy.limits
    candidates: list[str] = []
    if entry and entry.get("file"):
        if entry.get("txid"):
            candidates.append(os.path.join(view.settings.state_dir, state.GENERATIONS,
                                           entry["txid"], os.path.basename(entry["file"])))
        candidates.append(entry["file"])
    candidates.append(os.path.join(view.settings.programs_dir, f"{name}.yaml"))
    for path in candidates:
        if not os.path.isfile(path):
            continue
        parsed, _errors = spec_mod.parse_spec(path, limits=limits, owner_uid=None)
        if parsed and parsed.name == name and (entry is None
                                               or parsed.sha256 == entry.get("sha256")):
            return parsed, None
    with contextlib.suppress(OSError):
        specs, _errors = spec_mod.load_dir(view.settings.programs_dir, view.settings,
                                           check_owner=False)
        for parsed in specs:
            if parsed.name == name and (entry is None or parsed.sha256 == entry.get("sha256")):
                return parsed, None
    return None, (f"no readable spec file matches the applied version of '{name}': "
                  "keys and values shown as raw bytes")


# --- dump -------------------------------------------------------------------------------------

def _decode(raw: bytes, ctype: CType | None) -> int | bytes:
    if ctype is None or ctype.name is None:
        return raw
    return int.from_bytes(raw[:ctype.size], "little", signed=ctype.signed)


def _type_name(ctype: CType | None) -> str | None:
    if ctype is None:
        return None
    return ctype.name or f"bytes[{ctype.size}]"


def map_pin(view: View, target: str) -> tuple[str, str, str]:
    """(spec, map, pin path) for a `SPEC/MAP` argument."""
    spec_name, _, map_name = target.partition("/")
    pins.check_name(spec_name, "spec name")
    pins.check_name(map_name, "map name")
    entry = view.entry(spec_name)
    if view.manifest is not None and entry is None:
        raise LoaderdError(Kind.STATE, f"no spec '{spec_name}' in the manifest",
                           Location(view.manifest_path),
                           allowed=", ".join(sorted(view.manifest.get("specs", {}))) or "none")
    base = entry["pin_dir"] if entry else os.path.join(view.settings.bpffs_root, spec_name)
    return spec_name, map_name, os.path.join(base, "maps", map_name)


def check_raw(raw: bool) -> None:
    if raw and os.geteuid() != 0:
        raise LoaderdError(Kind.CAPABILITY, "--raw shows unsanitized data and is for root only",
                           allowed="drop --raw (sanitized output)")


def sanitize_key(view: View, notes: list[str]) -> Key:
    """The pseudonymization key, or a one-run key (and a note) when it is not readable."""
    from loaderd import sanitize

    try:
        return sanitize.load_key(view.settings.state_dir, create=os.geteuid() == 0)
    except LoaderdError as exc:
        notes.append(f"{exc}; pseudonyms use a one-run key (consistent within this output only)")
        return sanitize.ephemeral_key()


def dump(view: View, target: str, *, raw: bool, ip: Sequence[str] = (),
         pseudonymize: Sequence[str] = (), ipv4_prefix: int = 24, ipv6_prefix: int = 48
         ) -> dict[str, Any]:
    """Every entry of one map through a read-only fd, typed by its spec, sanitized unless raw."""
    spec_name, map_name, path = map_pin(view, target)
    check_raw(raw)
    notes: list[str] = []
    fd = kernel.obj_get(path, rdonly=True)
    try:
        facts = map_facts(fd)
        info = kernel.map_info(fd)
        if info.type in _UNDUMPABLE:
            raise LoaderdError(Kind.KERNEL, f"a {info.type_name} map holds events, not "
                               "entries: nothing to dump", Location(path))
        key_t, val_t = _declared_types(view, spec_name, map_name, info, notes)
        entries = list(_entries(fd, info, key_t, val_t, ip))
    finally:
        os.close(fd)
    out: dict[str, Any] = {"spec": spec_name, "map": map_name, "pin": path, **facts,
                           "types": {"key": _type_name(key_t), "value": _type_name(val_t)},
                           "sanitized": not raw, "entries": entries, "notes": notes}
    if not raw:
        out["entries"], out["key_source"] = _sanitize_entries(
            view, entries, ip, pseudonymize, ipv4_prefix, ipv6_prefix, notes)
    return out


def _declared_types(view: View, spec_name: str, map_name: str, info: kernel.MapInfo,
                    notes: list[str]) -> tuple[CType | None, CType | None]:
    parsed, why = applied_spec(view, spec_name)
    if parsed is None:
        notes.append(why or "spec unavailable")
        return None, None
    decl = next((m for m in parsed.maps if m.name == map_name), None)
    if decl is None or (decl.key.size, decl.value.size) != (info.key_size, info.value_size):
        notes.append(f"the pinned map's sizes differ from the spec's declaration of "
                     f"'{map_name}': keys and values shown as raw bytes")
        return None, None
    return decl.key, decl.value


def _entries(fd: int, info: kernel.MapInfo, key_t: CType | None, val_t: CType | None,
             ip: Sequence[str]) -> Iterator[dict[str, Any]]:
    # Fields named for --ip stay raw bytes (network order) for the sanitizer to mask.
    key_t = None if "key" in ip else key_t
    val_t = None if "value" in ip else val_t
    percpu = info.type in _PERCPU_MAPS
    slot = (info.value_size + 7) // 8 * 8
    ncpus = kernel.possible_cpus() if percpu else 1
    size = slot * ncpus if percpu else info.value_size
    for key in kernel.map_keys(fd, info.key_size):
        value = kernel.map_lookup(fd, key, size)
        if value is None:
            continue  # deleted while we walked
        row: dict[str, Any] = {"key": _decode(key, key_t)}
        if percpu:
            row["values"] = [_decode(value[i * slot:i * slot + info.value_size], val_t)
                             for i in range(ncpus)]
        else:
            row["value"] = _decode(value, val_t)
        yield row


def _sanitize_entries(view: View, entries: list[dict[str, Any]], ip: Sequence[str],
                      pseudonymize: Sequence[str], v4: int, v6: int, notes: list[str]
                      ) -> tuple[Any, str]:
    from loaderd import sanitize

    key = sanitize_key(view, notes)
    fields = set(ip) | {f"{f}s" for f in ip if f == "value"}
    pseud = set(pseudonymize) | {f"{f}s" for f in pseudonymize if f == "value"}
    rules = sanitize.Rules(ipv4_prefix=v4, ipv6_prefix=v6,
                           ip_fields=frozenset(fields), pseudonymize=frozenset(pseud),
                           redact=frozenset(), drop=frozenset())
    return sanitize.Sanitizer(key, rules)(entries), key.source


# --- rendering --------------------------------------------------------------------------------

def to_json(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True,
                      default=lambda o: o.hex() if isinstance(o, bytes) else str(o))


def _ts(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def _prog_line(p: dict[str, Any]) -> str:
    facts = "" if p["facts"] == "kernel" else f" [{p['facts']}: {p.get('note')}]"
    extra = (f" loaded {_ts(p['loaded_at'])} xlated {p['bytes_xlated']}B jited "
             f"{p['bytes_jited']}B memlock {p['bytes_memlock']}B"
             if p["facts"] == "kernel" else "")
    if "run_cnt" in p:
        extra += f" run_cnt {p['run_cnt']} run_time_ns {p['run_time_ns']}"
    deg = f" DEGRADED ({p['degraded']})" if p.get("degraded") else ""
    return (f"  prog {p['name']:<20} id {p.get('id', '-'):<6} {p.get('type', '-'):<15} tag "
            f"{p.get('tag', '-')}{extra}{deg}{facts}")


def _map_line(m: dict[str, Any]) -> str:
    if m["facts"] != "kernel":
        return f"  map  {m['name']:<20} id {m.get('id', '-'):<6} [{m['facts']}: {m.get('note')}]"
    frozen = " frozen" if m["frozen"] else ""
    return (f"  map  {m['name']:<20} id {m['id']:<6} {m['type']:<15} key {m['bytes_key']}B "
            f"value {m['bytes_value']}B max_entries {m['max_entries']} flags {m['flags']:#x}"
            f"{frozen}")


def _link_line(lk: dict[str, Any]) -> str:
    where = lk.get("target") or "-"
    if lk["facts"] != "kernel":
        return f"  link {lk['program']:<20} id {lk.get('id', '-'):<6} -> {where} " \
               f"[{lk['facts']}: {lk.get('note')}]"
    return (f"  link {lk['program']:<20} id {lk['id']:<6} {lk['type']:<15} prog_id "
            f"{lk['prog_id']} -> {where}")


def render_status(report: dict[str, Any]) -> str:
    head = report["manifest"]
    if head["readable"]:
        lines = [f"manifest {head['path']}: {head.get('status')} (txid {head.get('txid')}, "
                 f"written {_ts(head.get('written_at'))}), {len(report['specs'])} specs"]
    else:
        lines = [f"manifest: {head.get('note')}"]
    for s in report["specs"]:
        if s["drift"] is None:
            state_text = "drift unknown (no manifest)"
        elif s["drift"]:
            state_text = "DRIFT: " + "; ".join(s["drift"])
        else:
            state_text = "ok" + (" (partially checked)" if s["unchecked"] else "")
        deg = "  DEGRADED" if s["degraded"] else ""
        sha = f"  sha256 {s['sha256'][:12]}" if s["sha256"] else ""
        lines.append(f"{s['spec']}: {state_text}{deg}{sha}")
        lines += [_prog_line(p) for p in s["programs"]]
        lines += [_map_line(m) for m in s["maps"]]
        lines += [_link_line(lk) for lk in s["links"]]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def listing(report: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {"programs": [], "maps": [], "links": []}
    for s in report["specs"]:
        for kind in rows:
            rows[kind] += s[kind]
    return {**rows, "notes": report["notes"]}


def render_list(rows: dict[str, Any]) -> str:
    lines = [f"{'KIND':<5} {'SPEC/NAME':<36} {'ID':>6}  {'TYPE':<15} {'TAG/TARGET':<36} FACTS"]
    for p in rows["programs"]:
        deg = " DEGRADED" if p.get("degraded") else ""
        drift = " DRIFT" if p.get("drift") else ""
        lines.append(f"{'prog':<5} {p['spec'] + '/' + p['name']:<36} {p.get('id', '-'):>6}  "
                     f"{p.get('type', '-'):<15} {p.get('tag', '-'):<36} {p['facts']}"
                     f"{deg}{drift}")
    for m in rows["maps"]:
        frozen = " frozen" if m.get("frozen") else ""
        drift = " DRIFT" if m.get("drift") else ""
        lines.append(f"{'map':<5} {m['spec'] + '/' + m['name']:<36} {m.get('id', '-'):>6}  "
                     f"{m.get('type', '-'):<15} {'':<36} {m['facts']}{frozen}{drift}")
    for lk in rows["links"]:
        drift = " DRIFT" if lk.get("drift") else ""
        lines.append(f"{'link':<5} {lk['spec'] + '/' + lk['program']:<36} "
                     f"{lk.get('id', '-'):>6}  {lk.get('type', '-'):<15} "
                     f"{lk.get('target') or '-':<36} {lk['facts']}{drift}")
    lines += [f"note: {n}" for n in rows["notes"]]
    return "\n".join(lines)


def render_dump(d: dict[str, Any]) -> str:
    types = d["types"]
    lines = [f"# {d['spec']}/{d['map']}: {d['type']} id {d['id']}, {len(d['entries'])} "
             f"entries, key {types['key'] or 'raw'} value {types['value'] or 'raw'}"
             + (", frozen" if d["frozen"] else "")
             + (", sanitized" if d["sanitized"] else ", RAW (unsanitized)")]

    def fmt(v: Any) -> str:
        return v.hex() if isinstance(v, bytes) else str(v)

    for e in d["entries"]:
        value = e["value"] if "value" in e else "[" + ", ".join(fmt(v) for v in e["values"]) + "]"
        lines.append(f"{fmt(e['key'])}: {fmt(value)}")
    lines += [f"# note: {n}" for n in d["notes"]]
    return "\n".join(lines)


# --- commands ---------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    report = status(load_view(args.config))
    print(to_json(report) if args.json else render_status(report))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = listing(status(load_view(args.config)))
    print(to_json(rows) if args.json else render_list(rows))
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    view = load_view(args.config)
    rules = view.settings.sanitize
    d = dump(view, args.target, raw=args.raw, ip=args.ip or (),
             pseudonymize=args.pseudonymize or (),
             ipv4_prefix=rules.ipv4_prefix if args.ipv4_prefix is None else args.ipv4_prefix,
             ipv6_prefix=rules.ipv6_prefix if args.ipv6_prefix is None else args.ipv6_prefix)
    print(to_json(d) if args.json else render_dump(d))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from loaderd import events, sanitize

    view = load_view(args.config)
    _spec, _map, path = map_pin(view, args.target)
    check_raw(args.raw)
    notes: list[str] = []
    clean = None if args.raw else sanitize.Sanitizer(sanitize_key(view, notes),
                                                     view.settings.sanitize)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    layout = events.parse_layout(args.layout) if args.layout else None
    rate = args.rate or view.settings.policy.limits.max_event_rate
    for event in events.stream(path, layout=layout, rate=rate, sanitize=clean,
                               count=args.count, duration=args.duration,
                               addresses=view.settings.sanitize.ip_fields):
        print(json.dumps(event, sort_keys=True,
                         default=lambda o: o.hex() if isinstance(o, bytes) else str(o)),
              flush=True)
    return 0


def cmd_audit_system(args: argparse.Namespace) -> int:
    from loaderd import sysaudit

    view = load_view(args.config)
    report = sysaudit.run(view, burst=args.burst, window=args.window,
                          baseline=not args.no_baseline)
    print(to_json(report) if args.json else sysaudit.render(report))
    return 1 if report["findings"] else 0


def cmd_compliance(args: argparse.Namespace) -> int:
    from loaderd import compliance

    results = compliance.run(load_view(args.config), unit_files=args.unit_file or None)
    print(to_json(compliance.as_json(results)) if args.json else compliance.render(results))
    return 1 if compliance.high_failures(results) else 0


def cmd_forensics(args: argparse.Namespace) -> int:
    from loaderd import forensics

    written = forensics.collect(load_view(args.config), args.dir, since=args.since)
    print(f"forensics bundle: {args.dir} ({len(written)} files, SHA256SUMS included)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loaderctl", description=__doc__.splitlines()[0])
    add_global_flags(p)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str,
            json_flag: bool = True) -> argparse.ArgumentParser:
        sp = add_command(sub, name, func, text)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    add("status", cmd_status, "what is applied, per spec, with kernel facts and drift")
    add("list", cmd_list, "every program, map and link loaderd owns (bpftool-style rows)")
    sp = add("dump", cmd_dump, "a map's entries through a read-only fd, typed and sanitized")
    sp.add_argument("target", metavar="SPEC/MAP")
    sp.add_argument("--raw", action="store_true", help="no sanitization (root only)")
    sp.add_argument("--ip", action="append", choices=("key", "value"),
                    help="key/value holds an IP address (network order): mask it")
    sp.add_argument("--pseudonymize", action="append", choices=("key", "value"),
                    help="replace key/value by a keyed HMAC pseudonym")
    sp.add_argument("--ipv4-prefix", type=int, default=None,
                    help="default: sanitize.ipv4_prefix in loaderd.yaml (24)")
    sp.add_argument("--ipv6-prefix", type=int, default=None,
                    help="default: sanitize.ipv6_prefix in loaderd.yaml (48)")
    sp = add("events", cmd_events, "stream a ring buffer map's records as JSON lines, decoded "
             "and sanitized (root or the pin's owner: consuming needs a read-write fd)",
             json_flag=False)
    sp.add_argument("target", metavar="SPEC/MAP")
    sp.add_argument("--layout", help="record fields in C order, e.g. pid:u32,comm:bytes16")
    sp.add_argument("--count", type=int, help="stop after this many events")
    sp.add_argument("--duration", type=float, help="stop after this many seconds")
    sp.add_argument("--rate", type=int, help="events/s emitted (default limits.max_event_rate)")
    sp.add_argument("--raw", action="store_true", help="no sanitization (root only)")
    sp = add("audit-system", cmd_audit_system, "every BPF program/map on the host: report "
             "those loaderd did not load, and load bursts (needs CAP_SYS_ADMIN)")
    sp.add_argument("--burst", type=int, default=20, help="more loads than this within "
                    "--window seconds is a burst (default 20)")
    sp.add_argument("--window", type=float, default=10.0, help="seconds (default 10)")
    sp.add_argument("--no-baseline", action="store_true",
                    help="report every foreign program as new (ignore/keep no baseline)")
    sp = add("compliance", cmd_compliance, "PASS/FAIL report on the security checklist; exit 1 "
             "on a high-severity FAIL")
    sp.add_argument("--unit-file", action="append",
                    help="unit file to score (default: installed loaderd units)")
    sp = add("forensics", cmd_forensics, "incident bundle: info, xlated code, sanitized dumps, "
             "manifest, specs, journal slice, SHA256SUMS (root)", json_flag=False)
    sp.add_argument("dir", help="new (or empty) directory to write into")
    sp.add_argument("--since", default="-7d", help="journal slice start (journalctl --since)")
    add("disable", cmd_disable, "kill switch: detach and unpin everything loaderd owns",
        json_flag=False)
    add("enable", cmd_enable, "release the kill switch (then apply or reload)", json_flag=False)
    add("rollback", cmd_rollback, "re-apply the previous generation of specs", json_flag=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    audit.configure()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
