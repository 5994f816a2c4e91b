"""Read `enum bpf_func_id` from the running kernel's BTF.

The helper id -> name table must come from the kernel we load into, not from a table shipped
with a library (bcc 0.26's disassembler table is stale). Only the enum is needed, so this is a
minimal BTF type-section walker, not a general parser.
"""

from __future__ import annotations

import functools
import struct

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# Extra bytes following `struct btf_type` per kind: (fixed, per-vlen-member).
_TRAILER: dict[int, tuple[int, int]] = {
    1: (4, 0),  # INT
    2: (0, 0),  # PTR
    3: (12, 0),  # ARRAY
    4: (0, 12),  # STRUCT
    5: (0, 12),  # UNION
    6: (0, 8),  # ENUM
    7: (0, 0),  # FWD
    8: (0, 0),  # TYPEDEF
    9: (0, 0),  # VOLATILE
    10: (0, 0),  # CONST
    11: (0, 0),  # RESTRICT
    12: (0, 0),  # FUNC
    13: (0, 8),  # FUNC_PROTO
    14: (4, 0),  # VAR
    15: (0, 12),  # DATASEC
    16: (0, 0),  # FLOAT
    17: (4, 0),  # DECL_TAG
    18: (0, 0),  # TYPE_TAG
    19: (0, 12),  # ENUM64
}


class BTFError(ValueError):
    pass


def _cstr(strings: bytes, off: int) -> str:
    end = strings.index(b"\0", off)
    return strings[off:end].decode("ascii", "replace")


def enum_values(data: bytes, enum_name: str) -> dict[str, int]:
    """Members of the named (32-bit) enum in a raw BTF blob."""
    magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise BTFError("not a BTF blob (bad magic)")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    types = data[hdr_len + type_off: hdr_len + type_off + type_len]
    strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
    want = enum_name.encode() + b"\0"
    pos = 0
    while pos < len(types):
        name_off, info, _size = struct.unpack_from("<III", types, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind not in _TRAILER:
            raise BTFError(f"unknown BTF kind {kind} at offset {pos}")
        fixed, per = _TRAILER[kind]
        body = pos + 12
        if kind == 6 and strings.startswith(want, name_off):
            return {
                _cstr(strings, struct.unpack_from("<I", types, body + 8 * i)[0]):
                    struct.unpack_from("<i", types, body + 8 * i + 4)[0]
                for i in range(vlen)
            }
        pos = body + fixed + per * vlen
    raise BTFError(f"enum {enum_name} not found in BTF")


@functools.cache
def helper_names(path: str = VMLINUX_BTF) -> dict[int, str]:
    """Helper id -> name without the BPF_FUNC_ prefix (e.g. 1 -> 'map_lookup_elem')."""
    with open(path, "rb") as f:
        members = enum_values(f.read(), "bpf_func_id")
    return {v: k.removeprefix("BPF_FUNC_") for k, v in members.items()
            if k.startswith("BPF_FUNC_") and k != "BPF_FUNC_unspec"}
