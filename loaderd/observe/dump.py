"""`loaderctl dump`: every entry of one map through a read-only fd, typed by its spec and
sanitized unless raw (root only)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from loaderd import layout, sanitize
from loaderd.bpf import btf, kernel, pins
from loaderd.errors import Kind, LoaderdError, Location, article
from loaderd.model import MAP_TYPE_BY_ID, CType, HistKind, Histogram, MapSpec, percpu_slot
from loaderd.observe.status import View, applied_spec, map_facts
from loaderd.sanitize import Key, Opaque
from loaderd.store import statedir

# Maps of other types than loaderd's (MAP_TYPE_BY_ID) that hold events, not entries, too.
_UNDUMPABLE = {kernel.MAP_TYPES["user_ringbuf"]}

# --- dump -------------------------------------------------------------------------------------

def _decode(raw: bytes, ctype: CType | None, enums: Mapping[str, Mapping[int, str]]) -> Any:
    """A key or value as its declared type says: a number, a struct's fields, or opaque bytes
    (hex: never a C string by guessing)."""
    if ctype is None:
        return Opaque(raw)
    if ctype.fields:
        return layout.decode(raw[:ctype.size], ctype.fields, frozenset(), enums)
    if ctype.name is None:
        return Opaque(raw)
    return int.from_bytes(raw[:ctype.size], "little", signed=ctype.signed)


def _type_name(ctype: CType | None) -> str | None:
    if ctype is None:
        return None
    if ctype.fields:
        return "struct{" + layout.layout_text(ctype.fields) + "}"
    return ctype.name or f"bytes[{ctype.size}]"


def histogram(hist: Histogram, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Buckets from slot -> count entries (per-CPU counts summed), like BCC's
    print_log2_hist/print_linear_hist: every slot up to the highest non-empty one."""
    counts: dict[int, int] = {}
    # A log2 slot of a u64 value is at most 64 (BCC's bpf_log2l); a larger key is not a
    # bucket (2**14000 would not even print). Linear slots are bounded by the key type.
    slots = 65 if hist.kind is HistKind.LOG2 else 1 << 16
    for e in entries:
        slot = e["key"]
        count = e["value"] if "value" in e else sum(e["values"])
        if isinstance(slot, int) and isinstance(count, int) and 0 <= slot < slots:
            counts[slot] = counts.get(slot, 0) + count
    top = max((s for s, c in counts.items() if c), default=-1)
    buckets = []
    first = 1 if hist.kind is HistKind.LOG2 else 0
    for i in range(first, top + 1):
        if hist.kind is HistKind.LOG2:
            low, high = (1 << i) >> 1, (1 << i) - 1
            if low == high:
                low -= 1
            n = counts.get(i, 0) + (counts.get(0, 0) if i == 1 else 0)  # slot 0: the value 0
        else:
            low, high = i * hist.step, (i + 1) * hist.step - 1
            n = counts.get(i, 0)
        buckets.append({"low": low, "high": high, "count": n})
    return {"kind": hist.kind.value, "unit": hist.unit, "step": hist.step,
            "total": sum(counts.values()), "buckets": buckets}


def map_pin(view: View, target: str) -> tuple[str, str, str]:
    """(spec, map, pin path) for a `SPEC/MAP` argument."""
    spec_name, _, map_name = target.partition("/")
    pins.check_name(spec_name, "spec name")
    pins.check_name(map_name, "map name")
    entry = view.entry(spec_name)
    if view.manifest is not None and entry is None:
        raise LoaderdError(Kind.STATE, f"no spec '{spec_name}' in the manifest",
                           Location(view.manifest_path),
                           allowed=", ".join(sorted(view.manifest.specs)) or "none")
    base = entry.pin_dir if entry else os.path.join(view.settings.bpffs_root, spec_name)
    return spec_name, map_name, os.path.join(base, "maps", map_name)


def perf_buffer_reader(view: View, spec: str, map_name: str, path: str) -> int | None:
    """The pid of a running resident that reads this perf buffer, if it is one: a perf event
    array has one reader (its slots hold one reader's events), so another reader takes it
    from the resident's audit trail until the resident restarts. From the resident's
    counters file (untrusted, as status reads it) and /proc."""
    try:
        fd = kernel.obj_get(path, rdonly=True)
    except LoaderdError:
        return None
    try:
        if kernel.map_info(fd).type != kernel.MAP_TYPES["perf_event_array"]:
            return None
    finally:
        os.close(fd)
    try:
        owners = frozenset({0, os.stat(view.settings.state_dir).st_uid})
    except OSError:
        return None
    counts = statedir.read_event_counts(os.path.join(view.settings.state_dir, statedir.EVENTS),
                                        owners)
    if counts is None or not os.path.isdir(f"/proc/{counts.pid}"):
        return None
    return counts.pid if any((c.spec, c.map) == (spec, map_name) for c in counts.maps) else None


def check_raw(raw: bool) -> None:
    if raw and os.geteuid() != 0:
        raise LoaderdError(Kind.CAPABILITY, "--raw shows unsanitized data and is for root only",
                           allowed="drop --raw (sanitized output)")


def sanitize_key(view: View, notes: list[str]) -> Key:
    """The pseudonymization key, or a one-run key (and a note) when it is not readable."""

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
        mtype = MAP_TYPE_BY_ID.get(info.type)
        if info.type in _UNDUMPABLE or (mtype is not None and mtype.kind.fixed):
            raise LoaderdError(Kind.KERNEL, f"{article(info.type_name)} map holds events, not "
                               "entries: nothing to dump", Location(path))
        decl = _declared(view, spec_name, map_name, info, notes)
        key_t, val_t = (decl.key, decl.value) if decl else (None, None)
        fields = (key_t.fields if key_t else ()) + (val_t.fields if val_t else ())
        enums, missing = btf.enum_labels(layout.enum_names(fields))
        notes += [f"enum {name} is not in the running kernel's BTF: shown as numbers"
                  for name in missing]
        entries = list(_entries(fd, info, key_t, val_t, ip, enums))
    finally:
        os.close(fd)
    out: dict[str, Any] = {"spec": spec_name, "map": map_name, "pin": path, **facts,
                           "types": {"key": _type_name(key_t), "value": _type_name(val_t)},
                           "sanitized": not raw, "entries": entries, "notes": notes}
    if decl is not None and decl.histogram is not None:
        out["histogram"] = histogram(decl.histogram, entries)
    if not raw:
        out["entries"], out["key_source"] = _sanitize_entries(
            view, entries, ip, pseudonymize, ipv4_prefix, ipv6_prefix, notes)
    return out


def _declared(view: View, spec_name: str, map_name: str, info: kernel.MapInfo,
              notes: list[str]) -> MapSpec | None:
    parsed, why = applied_spec(view, spec_name)
    if parsed is None:
        notes.append(why or "spec unavailable")
        return None
    decl = next((m for m in parsed.maps if m.name == map_name), None)
    if decl is None or (decl.key.size, decl.value.size) != (info.key_size, info.value_size):
        notes.append(f"the pinned map's sizes differ from the spec's declaration of "
                     f"'{map_name}': keys and values shown as raw bytes")
        return None
    return decl


def _entries(fd: int, info: kernel.MapInfo, key_t: CType | None, val_t: CType | None,
             ip: Sequence[str], enums: Mapping[str, Mapping[int, str]]
             ) -> Iterator[dict[str, Any]]:
    # Fields named for --ip stay raw bytes (network order) for the sanitizer to mask.
    key_t = None if "key" in ip else key_t
    val_t = None if "value" in ip else val_t
    mtype = MAP_TYPE_BY_ID.get(info.type)
    percpu = mtype is not None and mtype.kind.percpu
    slot = percpu_slot(info.value_size)
    ncpus = kernel.possible_cpus() if percpu else 1
    size = mtype.kind.value_size(info.value_size, ncpus) if mtype else info.value_size
    for key in kernel.map_keys(fd, info.key_size):
        value = kernel.map_lookup(fd, key, size)
        if value is None:
            continue  # deleted while we walked
        row: dict[str, Any] = {"key": _decode(key, key_t, enums)}
        if percpu:
            row["values"] = [_decode(value[i * slot:i * slot + info.value_size], val_t, enums)
                             for i in range(ncpus)]
        else:
            row["value"] = _decode(value, val_t, enums)
        yield row


def _sanitize_entries(view: View, entries: list[dict[str, Any]], ip: Sequence[str],
                      pseudonymize: Sequence[str], v4: int, v6: int, notes: list[str]
                      ) -> tuple[Any, str]:

    key = sanitize_key(view, notes)
    fields = set(ip) | {f"{f}s" for f in ip if f == "value"}
    pseud = set(pseudonymize) | {f"{f}s" for f in pseudonymize if f == "value"}
    rules = sanitize.Rules(ipv4_prefix=v4, ipv6_prefix=v6,
                           ip_fields=frozenset(fields), pseudonymize=frozenset(pseud),
                           redact=frozenset(), drop=frozenset())
    return sanitize.Sanitizer(key, rules)(entries), key.source


