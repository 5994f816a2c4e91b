"""A precompiled BPF ELF object through libbpf.so.1's bpf_object API (Debian's libbpf1, ctypes).

libbpf relocates CO-RE field accesses (BPF_CORE_READ, `preserve_access_index`) against the
running kernel's BTF at load, so the object's struct reads are right on any kernel, with no
headers and no compiler on the host. loaderd uses libbpf for open/relocate/load only: it never
lets libbpf pin (maps asking for `pinning` are refused) or attach; loaderd pins and links the
fds itself, exactly as for BCC.

The object is opened from the bytes loaderd read and hashed (`bpf_object__open_mem`), never
again from its path. libbpf writes its warnings (with the verifier log) to fd 2: the caller
captures it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Any

from loaderd.bpf import kernel
from loaderd.errors import Kind, LoaderdError, Location

_vp = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_object__open_mem": (_vp, [_vp, ctypes.c_size_t, _vp]),
    "bpf_object__load": (ctypes.c_int, [_vp]),
    "bpf_object__close": (None, [_vp]),
    "bpf_object__next_program": (_vp, [_vp, _vp]),
    "bpf_object__next_map": (_vp, [_vp, _vp]),
    "bpf_program__name": (ctypes.c_char_p, [_vp]),
    "bpf_program__section_name": (ctypes.c_char_p, [_vp]),
    "bpf_program__type": (ctypes.c_int, [_vp]),
    "bpf_program__set_autoload": (ctypes.c_int, [_vp, ctypes.c_bool]),
    "bpf_program__fd": (ctypes.c_int, [_vp]),
    "bpf_program__insns": (_vp, [_vp]),
    "bpf_program__insn_cnt": (ctypes.c_size_t, [_vp]),
    "bpf_map__name": (ctypes.c_char_p, [_vp]),
    "bpf_map__type": (ctypes.c_int, [_vp]),
    "bpf_map__key_size": (ctypes.c_uint32, [_vp]),
    "bpf_map__value_size": (ctypes.c_uint32, [_vp]),
    "bpf_map__max_entries": (ctypes.c_uint32, [_vp]),
    "bpf_map__map_flags": (ctypes.c_uint32, [_vp]),
    "bpf_map__fd": (ctypes.c_int, [_vp]),
    "bpf_map__pin_path": (ctypes.c_char_p, [_vp]),
    "bpf_map__is_internal": (ctypes.c_bool, [_vp]),
}
_READY: list[Any] = []


def preload() -> None:
    """Load libbpf now: a confined worker could not open it later."""
    _lib()


def _lib() -> Any:
    if not _READY:
        lib = kernel.libbpf()
        for name, (restype, argtypes) in _SIGNATURES.items():
            func = getattr(lib, name)
            func.restype, func.argtypes = restype, argtypes
        _READY.append(lib)
    return _READY[0]


class _OpenOpts(ctypes.Structure):
    """libbpf 1.1's struct bpf_object_open_opts (sz tells libbpf how much of it we pass)."""

    _fields_ = [("sz", ctypes.c_size_t), ("object_name", ctypes.c_char_p),
                ("relaxed_maps", ctypes.c_bool), ("pin_root_path", ctypes.c_char_p),
                ("_attach_prog_fd", ctypes.c_uint32), ("kconfig", ctypes.c_char_p),
                ("btf_custom_path", ctypes.c_char_p), ("kernel_log_buf", ctypes.c_char_p),
                ("kernel_log_size", ctypes.c_size_t), ("kernel_log_level", ctypes.c_uint32)]


@dataclass(frozen=True)
class ObjProgram:
    name: str
    section: str
    type: int  # enum bpf_prog_type libbpf derived from the section name
    handle: int  # struct bpf_program *


@dataclass(frozen=True)
class ObjMap:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    internal: bool  # .rodata/.data/.bss/.kconfig: global variables
    pin_path: str | None  # libbpf would pin it itself (`pinning` in the map definition)
    handle: int  # struct bpf_map *


class BPFObjectFile:
    """One opened (then loaded) object. close() releases every fd it holds; pins stay."""

    def __init__(self, data: bytes, name: str, where: Location) -> None:
        self.where = where
        self._buf = ctypes.create_string_buffer(data, len(data))  # alive as long as the object
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), object_name=name.encode())
        ctypes.set_errno(0)
        handle = _lib().bpf_object__open_mem(self._buf, len(data), ctypes.byref(opts))
        if not handle:
            err = ctypes.get_errno() or errno.EINVAL
            raise LoaderdError(Kind.SEMANTIC, f"libbpf cannot open the object: "
                               f"{os.strerror(err)}", where)
        self.handle: int | None = handle
        self.loaded = False

    def _iter(self, func: str) -> list[int]:
        out: list[int] = []
        cur = None
        while True:
            cur = getattr(_lib(), func)(self.handle, cur)
            if not cur:
                return out
            out.append(cur)

    def programs(self) -> list[ObjProgram]:
        lib = _lib()
        return [ObjProgram(lib.bpf_program__name(p).decode(),
                           (lib.bpf_program__section_name(p) or b"").decode(),
                           lib.bpf_program__type(p), p)
                for p in self._iter("bpf_object__next_program")]

    def maps(self) -> list[ObjMap]:
        lib = _lib()
        out = []
        for m in self._iter("bpf_object__next_map"):
            pin = lib.bpf_map__pin_path(m)
            out.append(ObjMap(lib.bpf_map__name(m).decode(), lib.bpf_map__type(m),
                              lib.bpf_map__key_size(m), lib.bpf_map__value_size(m),
                              lib.bpf_map__max_entries(m), lib.bpf_map__map_flags(m),
                              bool(lib.bpf_map__is_internal(m)),
                              pin.decode() if pin else None, m))
        return out

    @staticmethod
    def insns(prog: ObjProgram) -> bytes:
        """The program's instructions as libbpf will load them (before relocation)."""
        lib = _lib()
        n = lib.bpf_program__insn_cnt(prog.handle)
        ptr = lib.bpf_program__insns(prog.handle)
        return ctypes.string_at(ptr, n * 8) if ptr and n else b""

    @staticmethod
    def set_autoload(prog: ObjProgram, on: bool) -> None:
        _lib().bpf_program__set_autoload(prog.handle, on)

    def load(self) -> None:
        """Relocate (CO-RE against the running kernel's BTF), create the maps, load the
        programs; raises with errno (the verifier log went to fd 2)."""
        ret = _lib().bpf_object__load(self.handle)
        if ret < 0:
            raise kernel.KernelError(Kind.KERNEL, f"libbpf could not load the object: "
                                     f"{os.strerror(-ret)}", self.where, errno=-ret,
                                     op="bpf_object__load")
        self.loaded = True

    @staticmethod
    def prog_fd(prog: ObjProgram) -> int:
        return int(_lib().bpf_program__fd(prog.handle))

    @staticmethod
    def map_fd(m: ObjMap) -> int:
        return int(_lib().bpf_map__fd(m.handle))

    def close(self) -> None:
        if self.handle:
            _lib().bpf_object__close(self.handle)
            self.handle = None
