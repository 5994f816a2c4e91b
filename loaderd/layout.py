"""Record layouts: `pid:u32,uid:u32,comm:bytes16` parsed into fields with C alignment, and
records decoded by them. One language for the spec schema, the daemon's event pump and
`loaderctl events`.

Records decode by a layout (spec scalar names, or bytesN); bytes past the layout come as
`_rest`. Without a layout a record is `{"data": bytes}`. A u32/s32 field the sanitizer treats as
an address (`saddr`, `daddr`, `ip`, ...) is read in network order, as the kernel stores
iphdr/sockaddr addresses, into an IPv4Address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from loaderd.errors import Kind, LoaderdError
from loaderd.model import SCALAR_TYPES
from loaderd.sanitize import IP_FIELDS

_FIELD = re.compile(r"([a-z_][a-z0-9_]{0,47}):(u8|u16|u32|u64|s8|s16|s32|s64|bytes(\d{1,4}))")


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int
    kind: str  # a SCALAR_TYPES name, or "bytes"


def parse_layout(text: str) -> tuple[Field, ...]:
    """`name:type,...` in C order with C alignment (scalars aligned to their size)."""
    fields: list[Field] = []
    offset = 0
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _FIELD.fullmatch(part)
        if m is None:
            raise LoaderdError(Kind.SEMANTIC, "bad event layout field", value=part,
                               allowed="name:u8|u16|u32|u64|s8|s16|s32|s64|bytesN, comma "
                               "separated, in the C struct's order")
        name, kind = m.group(1), m.group(2)
        if m.group(3):
            size, kind = int(m.group(3)), "bytes"
        else:
            size = SCALAR_TYPES[kind][0]
            offset = (offset + size - 1) // size * size
        if size == 0:
            raise LoaderdError(Kind.SEMANTIC, "bytes field of size 0", value=part)
        fields.append(Field(name, offset, size, kind))
        offset += size
    if not fields:
        raise LoaderdError(Kind.SEMANTIC, "empty event layout")
    return tuple(fields)


def decode(record: bytes, layout: tuple[Field, ...] | None,
           addresses: frozenset[str] = IP_FIELDS) -> dict[str, Any]:
    """A record's fields by `layout`; 4-byte scalars named in `addresses` become IPv4Address."""
    if layout is None:
        return {"data": record}
    out: dict[str, Any] = {}
    end = 0
    for f in layout:
        raw = record[f.offset:f.offset + f.size]
        if len(raw) < f.size:
            out["_short"] = True  # the record is smaller than the layout says
            break
        if f.kind == "bytes":
            out[f.name] = raw  # 16-byte addresses too: the sanitizer reads bytes in network order
        elif f.size == 4 and f.name.lower() in addresses:
            # network order: read little-endian, 10.1.2.3 would be masked as 3.2.1.0/24
            out[f.name] = ipaddress.IPv4Address(raw)
        else:
            out[f.name] = int.from_bytes(raw, "little", signed=SCALAR_TYPES[f.kind][1])
        end = f.offset + f.size
    if len(record) > end and "_short" not in out:
        out["_rest"] = record[end:]
    return out
