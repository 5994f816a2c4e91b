"""Read `enum bpf_func_id` and the raw tracepoint names from the running kernel's BTF.

The helper id -> name table must come from the kernel we load into, not from a table shipped
with a library (bcc 0.26's disassembler table is stale). Only the enum and the
`btf_trace_<name>` typedefs are needed, so this is a minimal BTF type-section walker, not a
general parser.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterator

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


def _sections(data: bytes) -> tuple[bytes, bytes]:
    magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise BTFError("not a BTF blob (bad magic)")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    return (data[hdr_len + type_off: hdr_len + type_off + type_len],
            data[hdr_len + str_off: hdr_len + str_off + str_len])


def _types(types: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(kind, vlen, name_off, offset of the members) of each type record."""
    pos = 0
    while pos < len(types):
        name_off, info, _size = struct.unpack_from("<III", types, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind not in _TRAILER:
            raise BTFError(f"unknown BTF kind {kind} at offset {pos}")
        fixed, per = _TRAILER[kind]
        yield kind, vlen, name_off, pos + 12
        pos += 12 + fixed + per * vlen


def enum_values(data: bytes, enum_name: str) -> dict[str, int]:
    """Members of the named (32-bit) enum in a raw BTF blob."""
    types, strings = _sections(data)
    want = enum_name.encode() + b"\0"
    for kind, vlen, name_off, body in _types(types):
        if kind == 6 and strings.startswith(want, name_off):
            return {
                _cstr(strings, struct.unpack_from("<I", types, body + 8 * i)[0]):
                    struct.unpack_from("<i", types, body + 8 * i + 4)[0]
                for i in range(vlen)
            }
    raise BTFError(f"enum {enum_name} not found in BTF")


def typedef_names(data: bytes, prefix: str) -> set[str]:
    """Names of the typedefs starting with `prefix`, prefix removed. Module BTF (split BTF)
    carries its own string section for its own types, which is all this reads."""
    types, strings = _sections(data)
    want = prefix.encode()
    return {_cstr(strings, name_off)[len(prefix):] for kind, _vlen, name_off, _body
            in _types(types) if kind == 8 and strings.startswith(want, name_off)}


@functools.cache
def raw_tracepoints(btf_dir: str = os.path.dirname(VMLINUX_BTF)) -> frozenset[str] | None:
    """Every name BPF_RAW_TRACEPOINT_OPEN accepts: the kernel generates a `btf_trace_<name>`
    typedef next to each tracepoint's BPF probe (built-in ones in vmlinux, a module's in its
    own BTF), including tracepoints that have no tracefs event (DECLARE_TRACE), and none for
    tracefs-only events (syscalls' sys_enter_*). None: no kernel BTF to decide with."""
    names: set[str] = set()
    try:
        files = sorted(os.listdir(btf_dir))
    except OSError:
        return None
    if "vmlinux" not in files:
        return None
    for name in files:
        try:
            with open(os.path.join(btf_dir, name), "rb") as f:
                names |= typedef_names(f.read(), "btf_trace_")
        except (OSError, BTFError, struct.error):
            if name == "vmlinux":
                return None
    return frozenset(names)


@functools.cache
def helper_names(path: str = VMLINUX_BTF) -> dict[int, str]:
    """Helper id -> name without the BPF_FUNC_ prefix (e.g. 1 -> 'map_lookup_elem')."""
    with open(path, "rb") as f:
        members = enum_values(f.read(), "bpf_func_id")
    return {v: k.removeprefix("BPF_FUNC_") for k, v in members.items()
            if k.startswith("BPF_FUNC_") and k != "BPF_FUNC_unspec"}
