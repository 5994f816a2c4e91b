"""Rules beyond the schema (docs/spec-format.md): unique names, map flags and sizes the
kernel would refuse, typed and range-checked `initial` entries, fallbacks that exist."""

from __future__ import annotations

import re
import resource
from typing import Any

from loaderd.config import schema as schemacheck
from loaderd.config import source as srccheck
from loaderd.config import yamlsafe
from loaderd.config.yamlsafe import Marks, Path
from loaderd.errors import Kind, LoaderdError, Location, article
from loaderd.model import (
    PERF_LINK_SEP,
    BtfAttach,
    CType,
    MapEntry,
    MapFlag,
    MapSpec,
    MapType,
    OrderedAttach,
    Param,
    ParamType,
    ProgramSpec,
    link_program,
)

PAGE_SIZE = resource.getpagesize()
_EXCLUSIVE = ((MapFlag.RDONLY, MapFlag.WRONLY), (MapFlag.RDONLY_PROG, MapFlag.WRONLY_PROG))
# BPF_MAP_FREEZE leaves these usable: the fact is MapKind.freezable (model.MAP_KINDS).
_FREEZABLE = frozenset(t for t in MapType if t.kind.freezable)
_UNFREEZABLE_WHY = {
    MapType.RINGBUF: "its consumer could never advance: a frozen map refuses the writable "
                     "mmap of the consumer position",
    MapType.PERF_EVENT_ARRAY: "userspace could never install the per-CPU perf event fds "
                              "it is read through",
    MapType.SOCKMAP: "userspace could never add the sockets it holds",
}


class Collector:
    """Errors for one spec file, located through its marks."""

    def __init__(self, path: str, marks: Marks) -> None:
        self.path = path
        self.marks = marks
        self.errors: list[LoaderdError] = []

    def loc(self, path: Path) -> Location:
        mark = self.marks.keys.get(path) or self.marks.at(path)
        line, col = mark if mark else (None, None)
        return Location(self.path, line, col, yamlsafe.field_name(path) or None)

    def line(self, path: Path) -> int | None:
        return self.loc(path).line

    def add(self, kind: Kind, path: Path, message: str, *, value: Any = None,
            allowed: str | None = None) -> None:
        self.errors.append(LoaderdError(kind, message, self.loc(path),
                                        value=schemacheck.short(value), allowed=allowed))


def scalar_range(ctype: CType) -> tuple[int, int]:
    bits = ctype.size * 8
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if ctype.signed else (0, (1 << bits) - 1)


def typed_value(c: Collector, at: Path, raw: Any, ctype: CType) -> int | bytes | None:
    """An `initial` key or value converted to its declared type, or None (error added)."""
    if ctype.name is None:
        digits = 2 * ctype.size
        if not isinstance(raw, str) or not re.fullmatch(r"[0-9a-fA-F]*", raw) \
                or len(raw) != digits:
            c.add(Kind.SEMANTIC, at, f"expected a hex string of exactly {ctype.size} bytes",
                  value=raw, allowed=f"{digits} hex digits")
            return None
        return bytes.fromhex(raw)
    low, high = scalar_range(ctype)
    if not isinstance(raw, int) or isinstance(raw, bool):
        c.add(Kind.SEMANTIC, at, f"expected an integer for {ctype.name}", value=raw,
              allowed=f"{low}..{high}")
        return None
    if not low <= raw <= high:
        c.add(Kind.SEMANTIC, at, f"out of range for {ctype.name}", value=raw,
              allowed=f"{low}..{high}")
        return None
    return raw


def _flag_rules(c: Collector, i: int, m: MapSpec) -> None:
    at: Path = ("maps", i, "flags")
    if m.type.kind.fixed and m.flags:
        c.add(Kind.SEMANTIC, at, f"{m.type} maps take no flags",
              value=", ".join(sorted(m.flags)))
    if MapFlag.NO_PREALLOC in m.flags and not m.type.kind.no_prealloc:
        c.add(Kind.SEMANTIC, at, f"NO_PREALLOC is not supported for {m.type} maps",
              allowed=", ".join(t for t in MapType if t.kind.no_prealloc))
    for one, other in _EXCLUSIVE:
        if one in m.flags and other in m.flags:
            c.add(Kind.SEMANTIC, at, f"{one} and {other} exclude each other")
    if MapFlag.WRONLY in m.flags and m.preserve:
        c.add(Kind.SEMANTIC, ("maps", i, "preserve"), "a WRONLY map cannot be preserved: its "
              "pin may not be opened for reading, so its contents cannot be copied")
    # BCC creates an RDONLY map with a read-only fd: neither the copy into it nor
    # BPF_MAP_FREEZE (which needs a writable fd) can be done through it.
    if MapFlag.RDONLY in m.flags and m.preserve:
        c.add(Kind.SEMANTIC, ("maps", i, "preserve"), "an RDONLY map cannot be preserved: "
              "userspace cannot write the copied contents into it")
    if m.freeze and m.type not in _FREEZABLE:
        why = _UNFREEZABLE_WHY.get(m.type, "freezing leaves it unusable")
        c.add(Kind.SEMANTIC, ("maps", i, "freeze"),
              f"{article(m.type)} map cannot be frozen: {why}",
              allowed="freeze: true on array and hash maps ("
              + ", ".join(sorted(t.value for t in _FREEZABLE)) + ")")
    if MapFlag.RDONLY in m.flags and m.freeze:
        c.add(Kind.SEMANTIC, ("maps", i, "freeze"), "an RDONLY map cannot be frozen (freezing "
              "needs a writable fd) and is already read-only for userspace; for read-only "
              "config use RDONLY_PROG with freeze: true")


def _size_rules(c: Collector, i: int, m: MapSpec) -> None:
    if m.type is MapType.RINGBUF:
        n = m.max_entries
        if n & (n - 1) or n % PAGE_SIZE:
            c.add(Kind.SEMANTIC, ("maps", i, "max_entries"), "ringbuf size must be a power "
                  f"of 2 and a multiple of the page size ({PAGE_SIZE})", value=n)
    if m.type.kind.array and m.key != CType("u32", 4):
        c.add(Kind.SEMANTIC, ("maps", i, "key"), "array maps are indexed by u32",
              allowed="u32")


def _initial(c: Collector, i: int, m: MapSpec, raw: list[Any]) -> list[MapEntry]:
    at: Path = ("maps", i, "initial")
    if not raw:
        return []
    if m.type.kind.fixed:
        c.add(Kind.SEMANTIC, at, f"{m.type} maps cannot take initial entries")
        return []
    if MapFlag.RDONLY in m.flags:
        c.add(Kind.SEMANTIC, at, "RDONLY maps cannot take initial entries (userspace cannot "
              "write them); use RDONLY_PROG with freeze: true for read-only config")
        return []
    if len(raw) > m.max_entries:
        c.add(Kind.SEMANTIC, at, f"{len(raw)} entries for max_entries {m.max_entries}")
    entries: list[MapEntry] = []
    first: dict[int | bytes, int] = {}
    for j, item in enumerate(raw):
        key = typed_value(c, (*at, j, "key"), item["key"], m.key)
        value = typed_value(c, (*at, j, "value"), item["value"], m.value)
        if key is None or value is None:
            continue
        if key in first:
            c.add(Kind.SEMANTIC, (*at, j, "key"), f"duplicate key (first at initial[{first[key]}])",
                  value=key if isinstance(key, int) else key.hex())
            continue
        first[key] = j
        if m.type.kind.array and isinstance(key, int) and key >= m.max_entries:
            c.add(Kind.SEMANTIC, (*at, j, "key"), "array index out of range", value=key,
                  allowed=f"0..{m.max_entries - 1}")
            continue
        entries.append(MapEntry(key, value, c.line((*at, j))))
    return entries


def _event_rules(c: Collector, i: int, m: MapSpec) -> None:
    if m.events is None:
        return
    if not m.type.kind.fixed:
        c.add(Kind.SEMANTIC, ("maps", i, "events"), "events: only a ringbuf or "
              "perf_event_array map carries events the daemon journals", value=m.type.value,
              allowed="ringbuf, perf_event_array")


def _histogram_rules(c: Collector, i: int, m: MapSpec) -> None:
    if m.histogram is None:
        return
    at: Path = ("maps", i, "histogram")
    if m.type.kind.fixed:
        c.add(Kind.SEMANTIC, at, f"{article(m.type)} map holds events, not slots: it cannot be a "
              "histogram", allowed="array, percpu_array, hash, percpu_hash, lru_hash")
    elif m.key.name is None or m.value.name is None:
        c.add(Kind.SEMANTIC, at, "a histogram's key is the slot and its value the count: "
              "both scalars", value=f"key {m.key.name or 'struct/bytes'}, value "
              f"{m.value.name or 'struct/bytes'}", allowed="key: u32 (or u64), value: u64")


def map_rules(c: Collector, i: int, m: MapSpec, initial: list[Any]) -> tuple[MapEntry, ...]:
    """Check map `i`; return its typed initial entries."""
    _flag_rules(c, i, m)
    _size_rules(c, i, m)
    _event_rules(c, i, m)
    _histogram_rules(c, i, m)
    return tuple(_initial(c, i, m, initial))


def names(c: Collector, maps: tuple[MapSpec, ...], programs: tuple[ProgramSpec, ...]) -> None:
    """Map and program names share the C namespace: unique across both."""
    seen: dict[str, str] = {}
    items = [(("maps", i, "name"), m.name) for i, m in enumerate(maps)]
    items += [(("programs", i, "name"), p.name) for i, p in enumerate(programs)]
    for at, name in items:
        if link_program(name) != name:
            c.add(Kind.SEMANTIC, at, f"name '{name}' ends like a per-CPU link's pin "
                  f"(<program>{PERF_LINK_SEP}<cpu>)", value=name)
        if name in seen:
            c.add(Kind.SEMANTIC, at, f"name '{name}' is already used by {seen[name]}")
        else:
            seen[name] = yamlsafe.field_name(at[:2])


def fallbacks(c: Collector, maps: tuple[MapSpec, ...], programs: tuple[ProgramSpec, ...],
              source: str) -> None:
    """Fallbacks are other functions of this source, not programs or maps of the spec."""
    taken = {p.name: "a program" for p in programs} | {m.name: "a map" for m in maps}
    defined = srccheck.function_names(source)
    for i, p in enumerate(programs):
        for j, name in enumerate(p.fallback):
            at: Path = ("programs", i, "fallback", j)
            if name in taken:
                c.add(Kind.SEMANTIC, at, f"fallback '{name}' is {taken[name]} of this spec; "
                      "name another function of the source")
            elif name not in defined:
                c.add(Kind.SEMANTIC, at, f"fallback '{name}' is not a function in the source")


def object_rules(c: Collector, programs: tuple[ProgramSpec, ...]) -> None:
    """A precompiled object's programs load together in one bpf_object__load: there is no
    per-function retry to fall back with."""
    for i, p in enumerate(programs):
        if p.fallback:
            c.add(Kind.SEMANTIC, ("programs", i, "fallback"), "fallback is for C sources "
                  "(BCC compiles and retries each function); an object's programs load "
                  "together: build the variant you need")


def orders(c: Collector, spec: str, programs: tuple[ProgramSpec, ...]) -> None:
    """A tc or cgroup program placed before/after a program of its own spec names one
    attached before it (programs attach in the order written), never itself."""
    for i, p in enumerate(programs):
        a = p.attach
        parts = a.anchor_parts if isinstance(a, OrderedAttach) else None
        if parts is None or parts[0] != spec:
            continue
        assert isinstance(a, OrderedAttach)
        earlier = [q.name for q in programs[:i] if isinstance(q.attach, OrderedAttach)]
        if parts[1] not in earlier:
            c.add(Kind.SEMANTIC, ("programs", i, "attach", a.KEY, "order", a.order),
                  f"{a.anchor}: a {a.KEY} program of this spec written before this one",
                  value=a.anchor,
                  allowed=", ".join(f"{spec}/{n}" for n in earlier) or "another spec's program")


def btf_names(c: Collector, programs: tuple[ProgramSpec, ...]) -> None:
    """fentry/fexit/lsm from C: BCC finds the target's BTF id by the function's name (its
    KFUNC_PROBE/KRETFUNC_PROBE/LSM_PROBE macros' prefix + the target), so the program's
    name must be that name; a precompiled object says it in its section instead."""
    for i, p in enumerate(programs):
        if isinstance(p.attach, BtfAttach) and p.name != p.attach.bcc_name:
            c.add(Kind.SEMANTIC, ("programs", i, "name"), f"{article(p.type)} program for "
                  f"{p.attach.function} is the C function {p.attach.bcc_name} (BCC's "
                  "macros name it so and load it by that name)", value=p.name,
                  allowed=p.attach.bcc_name)


_S64 = (-(1 << 63), (1 << 63) - 1)
_RESERVED_MACRO = re.compile(r"(?:BPF_|LOADERD_|__)")


def params(c: Collector, raw: dict[str, Any], is_object: bool) -> tuple[Param, ...]:
    """`params:` typed and range-checked; each becomes `#define NAME value` ahead of the C."""
    out: list[Param] = []
    if raw and is_object:
        c.add(Kind.SEMANTIC, ("params",), "params are for C sources (BCC compiles them in as "
              "macros); a precompiled object's constants are fixed: build the variant")
        return ()
    for name, p in raw.items():
        at: Path = ("params", name)
        ptype, value = ParamType(p["type"]), p["value"]
        if _RESERVED_MACRO.match(name):
            c.add(Kind.SEMANTIC, at, "param names starting with BPF_, LOADERD_ or __ are "
                  "taken by BCC, loaderd and the compiler", value=name)
            continue
        extra = sorted(set(p) & {"min", "max", "enum"} - (
            {"min", "max"} if ptype is ParamType.INT else
            {"enum"} if ptype is ParamType.STRING else set()))
        if extra:
            c.add(Kind.SEMANTIC, (*at, extra[0]), f"{article(ptype)} param takes no {extra[0]}",
                  allowed="int: min, max; string: enum")
            continue
        if ptype is ParamType.INT:
            low, high = p.get("min", _S64[0]), p.get("max", _S64[1])
            if not isinstance(value, int) or isinstance(value, bool) or \
                    not low <= value <= high:
                c.add(Kind.SEMANTIC, (*at, "value"), "int param out of range or not an "
                      "integer", value=value, allowed=f"{low}..{high}")
                continue
        elif ptype is ParamType.BOOL:
            if not isinstance(value, bool):
                c.add(Kind.SEMANTIC, (*at, "value"), "bool param is not true/false",
                      value=value, allowed="true, false")
                continue
        else:
            choices = p.get("enum")
            if choices is None:
                c.add(Kind.SEMANTIC, at, "a string param lists its allowed values",
                      allowed="enum: [a, b, ...]")
                continue
            if value not in choices:
                c.add(Kind.SEMANTIC, (*at, "value"), "string param not one of its enum",
                      value=value, allowed=", ".join(choices))
                continue
        out.append(Param(name, ptype, value))
    return tuple(out)
