"""Record layouts: one language for map keys/values, ring/perf event records, the spec schema,
the daemon's event pump and `loaderctl events/dump`.

Text form (`events: {layout: ...}`, `--layout`, the manifest): comma-separated fields in the C
struct's order, `name:type[:kind]`:
- type: `u8`..`u64`, `s8`..`s64`, an array of them (`u32[4]`), `bytesN` (opaque, shown as hex)
  or `charN` (a C string: text up to its first NUL);
- kind: `hex`, `ipv4` (u32 or bytes4, network order), `ipv6` (bytes16), `string`, `path`,
  `comm` (C strings; a path or comm is not scanned for addresses), `enum=NAME` (a BTF enum of
  the running kernel, e.g. `enum=tcp_states`... any `enum NAME` in /sys/kernel/btf/vmlinux) or
  `enum={0=RUNNING;1=SLEEPING}` (an inline table).
Names starting with `_` (`_pad`) are decoded but not shown. Offsets follow C alignment
(scalars aligned to their size), so padding is computed, never written by hand; a struct's
size is rounded up to its widest scalar, as C does.

The list form (YAML: `[{name: pid, type: u32}, {name: sig, type: s32, enum: {KILL: 9}}]`)
builds the same fields. A u32/s32 field the sanitizer treats as an address by name (`saddr`,
`daddr`, `ip`, ...) is read in network order into an IPv4Address, as before.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from loaderd.errors import Kind, LoaderdError, article
from loaderd.model import FIELD_KINDS, SCALAR_TYPES, CType, Field, FieldKind
from loaderd.sanitize import IP_FIELDS, Name, Opaque

__all__ = [
    "Field",
    "decode",
    "enum_names",
    "field_value",
    "layout_end",
    "layout_text",
    "parse_fields",
    "parse_layout",
    "struct_ctype",
]

NAME = r"[a-z_][a-z0-9_]{0,47}"
_LABEL = r"[A-Za-z0-9_]{1,32}"
# A struct key/value's fields become C members (stage/compile.py): a name clang reads as a
# keyword or a type is refused here, in the spec's terms, not as a compile error.
_C_WORDS = frozenset({
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else",
    "enum", "extern", "float", "for", "goto", "if", "inline", "int", "long", "register",
    "restrict", "return", "short", "signed", "sizeof", "static", "struct", "switch", "typedef",
    "union", "unsigned", "void", "volatile", "while", "asm", "typeof", "bool", "true", "false",
    "u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "size_t"})
_TYPE = r"(?:(?:u8|u16|u32|u64|s8|s16|s32|s64)(?:\[\d{1,4}\])?|bytes\d{1,4}|char\d{1,4})"
_KIND = (r"(?:hex|int|ipv4|ipv6|string|path|comm|enum=[A-Za-z_][A-Za-z0-9_]{0,63}|"
         rf"enum=\{{-?\d{{1,20}}={_LABEL}(?:;-?\d{{1,20}}={_LABEL})*\}})")
_FIELD_RE = re.compile(rf"({NAME}):({_TYPE})(?::({_KIND}))?")
# The whole text form, for the JSON schema (tests hold the schema's pattern to this).
LAYOUT_PATTERN = rf"^{_FIELD_RE.pattern}(?:,{_FIELD_RE.pattern})*$"
_ALLOWED = ("name:type[:kind], comma separated in the C struct's order; type u8|u16|u32|u64|"
            "s8|s16|s32|s64 (or an array, u32[4]), bytesN or charN; kind hex|ipv4|ipv6|string|"
            "path|comm|enum=NAME|enum={N=LABEL;...}")
_SPLIT = re.compile(r",(?![^{]*\})")  # commas outside an inline enum table
MAX_BYTES = 4096


def _bad(message: str, value: Any) -> LoaderdError:
    return LoaderdError(Kind.SEMANTIC, message, value=value, allowed=_ALLOWED)


def _make(name: str, type_text: str, kind_text: str | None,
          table: Mapping[int, str] | None, offset: int) -> Field:
    count = 1
    m = re.fullmatch(r"(bytes|char)(\d+)", type_text)
    if m:
        tname, size = m.group(1), int(m.group(2))
        if size == 0:
            raise _bad(f"{tname} field of size 0", f"{name}:{type_text}")
    else:
        a = re.fullmatch(r"([us]\d+)(?:\[(\d+)\])?", type_text)
        if a is None or a.group(1) not in SCALAR_TYPES:
            raise _bad("unknown field type", f"{name}:{type_text}")
        tname, size = a.group(1), SCALAR_TYPES[a.group(1)][0]
        count = int(a.group(2)) if a.group(2) else 1
        if count == 0:
            raise _bad("array of 0 elements", f"{name}:{type_text}")
    enum_name: str | None = None
    entries: tuple[tuple[int, str], ...] = ()
    if table is not None:
        kind = FieldKind.ENUM
        entries = tuple(sorted(table.items()))
    elif kind_text is None or kind_text == "":
        kind = FieldKind.INT if tname in SCALAR_TYPES else (
            FieldKind.HEX if tname == "bytes" else FieldKind.STRING)
    elif kind_text.startswith("enum="):
        kind = FieldKind.ENUM
        body = kind_text[5:]
        if body.startswith("{"):
            pairs = [p.split("=", 1) for p in body[1:-1].split(";")]
            entries = tuple(sorted((int(v), label) for v, label in pairs))
        else:
            enum_name = body
    else:
        try:
            kind = FieldKind(kind_text)
        except ValueError:
            raise _bad("unknown field kind", f"{name}:{type_text}:{kind_text}") from None
    group = "scalar" if tname in SCALAR_TYPES else tname
    if kind not in FIELD_KINDS[group]:
        raise _bad(f"{article(group)} field cannot be {kind}", f"{name}:{type_text}:{kind_text}")
    if (kind is FieldKind.IPV4 and size * count != 4) or (kind is FieldKind.IPV6 and size != 16):
        raise _bad(f"an {kind} field is {4 if kind is FieldKind.IPV4 else 16} bytes",
                   f"{name}:{type_text}")
    if kind in (FieldKind.ENUM, FieldKind.IPV4) and count != 1 and tname in SCALAR_TYPES:
        raise _bad(f"an array cannot be {kind}", f"{name}:{type_text}")
    align = size if tname in SCALAR_TYPES else 1
    offset = (offset + align - 1) // align * align
    return Field(name, offset, size, tname, kind, count, enum_name, entries)


def _finish(fields: list[Field]) -> tuple[Field, ...]:
    if not fields:
        raise LoaderdError(Kind.SEMANTIC, "empty layout", allowed=_ALLOWED)
    seen: set[str] = set()
    for f in fields:
        if f.name in _C_WORDS or f.name.startswith("__"):
            raise _bad("a C keyword, type or reserved (__) name cannot name a field", f.name)
        if f.name in seen and not f.hidden:
            raise _bad("duplicate field name", f.name)
        seen.add(f.name)
    if fields[-1].offset + fields[-1].total > MAX_BYTES:
        raise _bad(f"layout larger than {MAX_BYTES} bytes", fields[-1].name)
    return tuple(fields)


def parse_layout(text: str) -> tuple[Field, ...]:
    """The text form, `name:type[:kind],...`, into fields with C alignment."""
    fields: list[Field] = []
    offset = 0
    for part in filter(None, (p.strip() for p in _SPLIT.split(text))):
        m = _FIELD_RE.fullmatch(part)
        if m is None:
            raise _bad("bad layout field", part)
        f = _make(m.group(1), m.group(2), m.group(3), None, offset)
        fields.append(f)
        offset = f.offset + f.total
    return _finish(fields)


def parse_fields(items: Any) -> tuple[Field, ...]:
    """The list form (YAML): `[{name, type, kind?, enum?}]`; `enum` is a BTF enum name or an
    inline table written as a C enum, `{LABEL: value}`."""
    if isinstance(items, str):
        return parse_layout(items)
    fields: list[Field] = []
    offset = 0
    for item in items:
        name, type_text = str(item.get("name", "")), str(item.get("type", ""))
        if re.fullmatch(NAME, name) is None or re.fullmatch(_TYPE, type_text) is None:
            raise _bad("bad layout field", f"{name}:{type_text}")
        enum = item.get("enum")
        kind_text = item.get("kind")
        table: dict[int, str] | None = None
        if isinstance(enum, Mapping):
            table = {}
            for label, v in enum.items():  # as a C enum: LABEL: value
                if isinstance(v, bool) or not isinstance(v, int) or \
                        re.fullmatch(_LABEL, str(label)) is None:
                    raise _bad("an enum table maps labels of [A-Za-z0-9_] to integers",
                               f"{label}: {v}")
                table.setdefault(v, str(label))
        elif enum is not None:
            kind_text = f"enum={enum}"
        f = _make(name, type_text, kind_text, table, offset)
        fields.append(f)
        offset = f.offset + f.total
    return _finish(fields)


def layout_text(fields: tuple[Field, ...]) -> str:
    """The text form of `fields` (what the manifest keeps; parse_layout reads it back)."""
    out = []
    for f in fields:
        t = f"{f.type}{f.size}" if f.type in ("bytes", "char") else (
            f.type if f.count == 1 else f"{f.type}[{f.count}]")
        default = FieldKind.INT if f.type in SCALAR_TYPES else (
            FieldKind.HEX if f.type == "bytes" else FieldKind.STRING)
        if f.kind is FieldKind.ENUM:
            kind = ":enum=" + (f.enum or "{" + ";".join(f"{v}={k}" for v, k in f.table) + "}")
        else:
            kind = "" if f.kind is default else f":{f.kind}"
        out.append(f"{f.name}:{t}{kind}")
    return ",".join(out)


def struct_ctype(fields: tuple[Field, ...]) -> CType:
    """A struct key/value: size rounded up to its widest scalar, as C lays it out."""
    align = max(f.align for f in fields)
    end = fields[-1].offset + fields[-1].total
    return CType(None, (end + align - 1) // align * align, fields)


def enum_names(fields: tuple[Field, ...]) -> frozenset[str]:
    """The BTF enums a layout names (the reader resolves them: bpf.btf.enum_labels)."""
    return frozenset(f.enum for f in fields if f.enum is not None)


@functools.cache
def _table(entries: tuple[tuple[int, str], ...]) -> dict[int, str]:
    return dict(entries)


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def layout_end(layout: tuple[Field, ...] | None) -> int:
    """Where a record of `layout` ends: past it are `_rest` bytes (or perf padding)."""
    return 0 if not layout else max(f.offset + f.total for f in layout)


def field_value(f: Field, raw: bytes, addresses: frozenset[str] = IP_FIELDS,
                enums: Mapping[str, Mapping[int, str]] | None = None) -> Any:
    """One field's value from its `f.total` bytes, as its kind says (the module docstring)."""
    kind = f.kind
    if kind is FieldKind.INT:
        if f.count != 1:
            signed = SCALAR_TYPES[f.type][1]
            return [int.from_bytes(raw[i:i + f.size], "little", signed=signed)
                    for i in range(0, f.total, f.size)]
        if f.size == 4 and f.name.lower() in addresses:
            # network order: read little-endian, 10.1.2.3 would be masked as 3.2.1.0/24
            return ipaddress.IPv4Address(raw)
        return int.from_bytes(raw, "little", signed=SCALAR_TYPES[f.type][1])
    if kind is FieldKind.STRING:
        return _cstring(raw)
    if kind is FieldKind.HEX:
        return Opaque(raw)
    if kind is FieldKind.PATH or kind is FieldKind.COMM:
        return Name(_cstring(raw))
    if kind is FieldKind.IPV4:
        return ipaddress.IPv4Address(raw)
    if kind is FieldKind.IPV6:
        return ipaddress.IPv6Address(raw)
    # ENUM
    value = int.from_bytes(raw, "little", signed=SCALAR_TYPES[f.type][1])
    table = _table(f.table) if f.table else (enums or {}).get(f.enum or "", {})
    return table.get(value, value)


def decode(record: bytes, layout: tuple[Field, ...] | None,
           addresses: frozenset[str] = IP_FIELDS,
           enums: Mapping[str, Mapping[int, str]] | None = None) -> dict[str, Any]:
    """A record's fields by `layout`, each as its kind says (see the module docstring). A
    record shorter than the layout stops at the first field it cuts (`_short`); the bytes of
    a longer one past the layout are `_rest`."""
    if layout is None:
        return {"data": Opaque(record)}
    out: dict[str, Any] = {}
    end = 0
    for f in layout:
        raw = record[f.offset:f.offset + f.total]
        if len(raw) < f.total:
            out["_short"] = True  # the record is smaller than the layout says
            break
        end = f.offset + f.total
        if not f.hidden:
            out[f.name] = field_value(f, raw, addresses, enums)
    if len(record) > end and "_short" not in out:
        out["_rest"] = Opaque(record[end:])
    return out
