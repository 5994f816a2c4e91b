"""Facts from the running kernel's BTF (/sys/kernel/btf/vmlinux): `enum bpf_func_id`, the
raw tracepoint names and the member offsets of structs.

The helper id -> name table must come from the kernel we load into, not from a table shipped
with a library (bcc 0.26's disassembler table is stale). Struct member offsets are the truth
that headers-compiled (BCC) programs are checked against: installed headers that are not the
running kernel's compile other offsets, and struct reads then return garbage. A minimal BTF
walker: header, type section, string section; STRUCT/UNION members (bit offsets, bitfields,
anonymous nested members), ENUMs and the `btf_trace_<name>` typedefs, nothing else.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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
    """(type section, string section) of a raw BTF blob."""
    if len(data) < 24:
        raise BTFError("not a BTF blob (too short)")
    magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise BTFError("not a BTF blob (bad magic)")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    types = data[hdr_len + type_off: hdr_len + type_off + type_len]
    strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
    if len(types) != type_len or len(strings) != str_len:
        raise BTFError("BTF sections run past the end of the blob")
    return types, strings



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


def enum_labels(names: Iterable[str], path: str = VMLINUX_BTF
                ) -> tuple[dict[str, dict[int, str]], list[str]]:
    """value -> member name for each named enum of the running kernel (a layout's
    `enum=NAME`), and the names not found (their fields are shown as numbers). The first
    member of a value wins (enums alias values: TCP_MAX_STATES)."""
    wanted = sorted(set(names))
    if not wanted:
        return {}, []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}, wanted
    found: dict[str, dict[int, str]] = {}
    missing: list[str] = []
    for name in wanted:
        try:
            members = enum_values(data, name)
        except (BTFError, struct.error, ValueError):
            missing.append(name)
            continue
        table: dict[int, str] = {}
        for label, value in members.items():
            table.setdefault(value, label)
        found[name] = table
    return found, missing


# Kinds an anonymous member's type passes through on the way to its struct/union.
_MODIFIERS = frozenset({8, 9, 10, 11, 18})  # TYPEDEF VOLATILE CONST RESTRICT TYPE_TAG
STRUCT, UNION = 4, 5


@dataclass(frozen=True)
class Member:
    offset: int  # in bytes from the start of the outer struct (nested anonymous members added)
    bit_offset: int  # in bits, the same
    bitfield: int  # bitfield size in bits, 0 for a whole member


class Types:
    """An index of a BTF blob's type section: id -> position, and struct/union names -> ids."""

    def __init__(self, data: bytes) -> None:
        self.types, self.strings = _sections(data)
        self.pos: list[int] = [-1]  # type id 0 is void
        self.structs: dict[str, list[int]] = {}
        for kind, _vlen, name_off, body in _types(self.types):
            if kind in (STRUCT, UNION) and name_off:
                self.structs.setdefault(_cstr(self.strings, name_off), []).append(
                    len(self.pos))
            self.pos.append(body - 12)

    def _head(self, type_id: int) -> tuple[int, int, int, int]:
        """(kind, vlen, kind_flag, size_or_type) of a type id."""
        if not 0 < type_id < len(self.pos):
            raise BTFError(f"type id {type_id} out of range")
        _name, info, size = struct.unpack_from("<III", self.types, self.pos[type_id])
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size

    def _resolve(self, type_id: int) -> int:
        for _ in range(32):  # typedef chains are short; a loop is corrupt BTF
            if type_id == 0:
                return 0
            kind, _vlen, _kf, ref = self._head(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = ref
        raise BTFError("type modifier chain too long")

    def members(self, type_id: int, base: int = 0, depth: int = 0) -> dict[str, Member]:
        """Named members of a struct/union, anonymous nested structs/unions flattened into it
        (as C lets you name them), with bit offsets from the outermost struct."""
        if depth > 16:
            raise BTFError("anonymous members nested too deep")
        kind, vlen, kflag, _size = self._head(type_id)
        if kind not in (STRUCT, UNION):
            raise BTFError(f"type id {type_id} is not a struct or union")
        out: dict[str, Member] = {}
        body = self.pos[type_id] + 12
        for i in range(vlen):
            name_off, mtype, moff = struct.unpack_from("<III", self.types, body + 12 * i)
            bits, size = (moff & 0xFFFFFF, moff >> 24) if kflag else (moff, 0)
            bits += base
            if name_off:
                out.setdefault(_cstr(self.strings, name_off), Member(bits // 8, bits, size))
                continue
            inner = self._resolve(mtype)
            if inner and self._head(inner)[0] in (STRUCT, UNION):
                for name, m in self.members(inner, bits, depth + 1).items():
                    out.setdefault(name, m)
        return out

    def struct_members(self, name: str) -> dict[str, Member] | None:
        """Members of the struct (or union) called `name`: the one with members when BTF also
        holds empty forward-like copies; None if the kernel has no such type."""
        best: dict[str, Member] | None = None
        for tid in self.structs.get(name, []):
            got = self.members(tid)
            if best is None or len(got) > len(best):
                best = got
        return best


def field_offsets(data: bytes, fields: Iterable[str]) -> dict[str, Member | None]:
    """"struct.member" -> its Member in BTF blob `data`, or None where the kernel has no such
    struct or member."""
    index = Types(data)
    cache: dict[str, dict[str, Member] | None] = {}
    out: dict[str, Member | None] = {}
    for f in fields:
        sname, _, member = f.partition(".")
        if sname not in cache:
            cache[sname] = index.struct_members(sname)
        found = cache[sname]
        out[f] = None if found is None else found.get(member)
    return out
