"""Thin, typed ctypes wrapper over the bpf()/perf calls BCC 0.26 lacks.

Prefers libbpf.so.1's exported functions (they return -errno); a few calls that libbpf 1.1 has
no entry point for (pin/get relative to a directory fd) go through the raw bpf() syscall.
Every failure raises `KernelError` (a `LoaderdError` of kind KERNEL) naming the operation, the
object and `strerror(errno)`, with `.errno` kept for callers that branch on it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import XDP_MODES
from loaderd.model import possible_cpus as possible_cpus  # sizes per-CPU value buffers

# --- constants (uapi/linux/bpf.h) -------------------------------------------------------------

PROG_TYPES: dict[str, int] = {
    "unspec": 0, "socket_filter": 1, "kprobe": 2, "sched_cls": 3, "sched_act": 4,
    "tracepoint": 5, "xdp": 6, "perf_event": 7, "cgroup_skb": 8, "cgroup_sock": 9,
    "lwt_in": 10, "lwt_out": 11, "lwt_xmit": 12, "sock_ops": 13, "sk_skb": 14,
    "cgroup_device": 15, "sk_msg": 16, "raw_tracepoint": 17, "cgroup_sock_addr": 18,
    "lwt_seg6local": 19, "lirc_mode2": 20, "sk_reuseport": 21, "flow_dissector": 22,
    "cgroup_sysctl": 23, "raw_tracepoint_writable": 24, "cgroup_sockopt": 25, "tracing": 26,
    "struct_ops": 27, "ext": 28, "lsm": 29, "sk_lookup": 30, "syscall": 31, "netfilter": 32,
}
PROG_TYPE_NAMES: dict[int, str] = {v: k for k, v in PROG_TYPES.items()}

MAP_TYPES: dict[str, int] = {
    "unspec": 0, "hash": 1, "array": 2, "prog_array": 3, "perf_event_array": 4,
    "percpu_hash": 5, "percpu_array": 6, "stack_trace": 7, "cgroup_array": 8, "lru_hash": 9,
    "lru_percpu_hash": 10, "lpm_trie": 11, "array_of_maps": 12, "hash_of_maps": 13,
    "devmap": 14, "sockmap": 15, "cpumap": 16, "xskmap": 17, "sockhash": 18,
    "cgroup_storage": 19, "reuseport_sockarray": 20, "percpu_cgroup_storage": 21, "queue": 22,
    "stack": 23, "sk_storage": 24, "devmap_hash": 25, "struct_ops": 26, "ringbuf": 27,
    "inode_storage": 28, "task_storage": 29, "bloom_filter": 30, "user_ringbuf": 31,
    "cgrp_storage": 32, "arena": 33,
}
MAP_TYPE_NAMES: dict[int, str] = {v: k for k, v in MAP_TYPES.items()}

LINK_TYPE_NAMES: dict[int, str] = {
    0: "unspec", 1: "raw_tracepoint", 2: "tracing", 3: "cgroup", 4: "iter", 5: "netns",
    6: "xdp", 7: "perf_event", 8: "kprobe_multi", 9: "struct_ops", 10: "netfilter", 11: "tcx",
    12: "uprobe_multi", 13: "netkit", 14: "sockmap",
}
LINK_TYPE_RAW_TRACEPOINT = 1
LINK_TYPE_XDP = 6
LINK_TYPE_PERF_EVENT = 7
LINK_TYPE_UPROBE_MULTI = 12
LINK_TYPE_TCX = 11
LINK_TYPE_CGROUP = 3
LINK_TYPE_NETNS = 5

# The kernel ids of loaderd's own types are facts of those types (model.MAP_KINDS,
# model.PROG_KINDS); the tables above name any object the kernel holds, foreign ones too.

# Attach types (enum bpf_attach_type) used by loaderd.
ATTACH_XDP = 37
ATTACH_PERF_EVENT = 41
ATTACH_TCX_INGRESS, ATTACH_TCX_EGRESS = 46, 47  # model.TC_DIRECTIONS
# bpftool's names (libbpf_bpf_attach_type_str) of the attach types loaderd makes links for.
ATTACH_TYPE_NAMES: dict[int, str] = {
    0: "cgroup_inet_ingress", 1: "cgroup_inet_egress", 2: "cgroup_inet_sock_create",
    6: "cgroup_device", 8: "cgroup_inet4_bind", 9: "cgroup_inet6_bind",
    10: "cgroup_inet4_connect", 11: "cgroup_inet6_connect", 12: "cgroup_inet4_post_bind",
    13: "cgroup_inet6_post_bind", 14: "cgroup_udp4_sendmsg", 15: "cgroup_udp6_sendmsg",
    18: "cgroup_sysctl", 36: "sk_lookup", 37: "xdp", 41: "perf_event", 46: "tcx_ingress",
    47: "tcx_egress"}

# Flags.
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_RDONLY = 1 << 3  # at map creation: binds to the returned fd only, not kept in map_flags
BPF_F_WRONLY = 1 << 4
BPF_F_PATH_FD = 1 << 14  # OBJ_PIN/OBJ_GET relative to path_fd (kernel >= 6.5)
BPF_F_REPLACE = 1 << 2
# Multi-prog placement (tcx; cgroup links on recent kernels): before/after the program or link
# that relative_fd/_id names, or the whole chain when it names none; BPF_F_ID: relative is an
# id; BPF_F_LINK: it is a link.
BPF_F_BEFORE, BPF_F_AFTER, BPF_F_ID, BPF_F_LINK = 1 << 3, 1 << 4, 1 << 5, 1 << 13
BPF_ANY, BPF_NOEXIST = 0, 1

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8
_SYS_BPF = 321  # x86_64
_SYS_PERF_EVENT_OPEN = 298  # x86_64
_BPF_OBJ_PIN, _BPF_OBJ_GET = 6, 7
_BPF_PROG_QUERY, _BPF_LINK_CREATE = 16, 28
PERF_TYPE_SOFTWARE, PERF_TYPE_TRACEPOINT = 1, 2
PERF_ATTR_FREQ = 1 << 10  # perf_event_attr.freq: sample_period holds sample_freq
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3

# --- errors -----------------------------------------------------------------------------------

# What an EPERM/EACCES most likely means, appended to the message.
CAPS_BPF = "needs CAP_BPF"
CAPS_TRACING = "needs CAP_BPF and CAP_PERFMON"
CAPS_NET = "needs CAP_BPF and CAP_NET_ADMIN"
CAPS_BY_ID = "needs CAP_SYS_ADMIN (enumerating or opening objects by id)"
# EPERM on a map write usually means the fd, not the process, lacks the right.
_MAP_WRITE_HINT = "map fd opened read-only or map frozen, or CAP_BPF missing"
_PIN_HINT = "CAP_BPF missing, or the pin's/directory's mode or owner forbids it"


@dataclass
class KernelError(LoaderdError):
    """A kernel refusal; `errno` is the raw error number (0 if not from a syscall)."""

    errno: int = 0
    op: str = ""


def _fail(op: str, target: str, err: int, hint: str = CAPS_BPF) -> KernelError:
    msg = f"{op} failed: {os.strerror(err)} (errno {err})"
    if err in (errno.EPERM, errno.EACCES):
        msg += f"; {hint}"
    return KernelError(Kind.KERNEL, msg, Location(file=target), errno=err, op=op)


def _check(ret: int, op: str, target: str, hint: str = CAPS_BPF) -> int:
    """libbpf returns -errno on failure (and sets errno); turn that into a KernelError."""
    if ret < 0:
        raise _fail(op, target, -ret, hint)
    return ret


# --- library handles --------------------------------------------------------------------------

_libbpf: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_c_u32_p = ctypes.POINTER(ctypes.c_uint32)
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_obj_pin": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p]),
    "bpf_obj_get_opts": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_void_p]),
    "bpf_map_freeze": (ctypes.c_int, [ctypes.c_int]),
    "bpf_map_create": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                      ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]),
    "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_uint64]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]),
    "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_link_create": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_void_p]),
    "bpf_link_update": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]),
    "bpf_link_detach": (ctypes.c_int, [ctypes.c_int]),
    "bpf_obj_get_info_by_fd": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, _c_u32_p]),
    "bpf_raw_tracepoint_open": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int]),
    "libbpf_probe_bpf_prog_type": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]),
    "bpf_prog_get_next_id": (ctypes.c_int, [ctypes.c_uint32, _c_u32_p]),
    "bpf_map_get_next_id": (ctypes.c_int, [ctypes.c_uint32, _c_u32_p]),
    "bpf_link_get_next_id": (ctypes.c_int, [ctypes.c_uint32, _c_u32_p]),
    "bpf_prog_get_fd_by_id": (ctypes.c_int, [ctypes.c_uint32]),
    "bpf_map_get_fd_by_id": (ctypes.c_int, [ctypes.c_uint32]),
    "bpf_link_get_fd_by_id": (ctypes.c_int, [ctypes.c_uint32]),
    "bpf_prog_query": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, _c_u32_p,
                                      _c_u32_p, _c_u32_p]),
}


def _lib() -> ctypes.CDLL:
    """Load libbpf.so.1 once, lazily, so importing this module never fails."""
    global _libbpf
    if _libbpf is None:
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as exc:
            raise KernelError(Kind.KERNEL, f"cannot load libbpf.so.1: {exc}",
                              allowed="install the libbpf1 package") from None
        for name, (restype, argtypes) in _SIGNATURES.items():
            func = getattr(lib, name)
            func.restype, func.argtypes = restype, argtypes
        _libbpf = lib
    return _libbpf


def libbpf() -> ctypes.CDLL:
    """The shared libbpf.so.1 handle (bpfobject declares its own prototypes on it)."""
    return _lib()


def _call(name: str, *args: Any) -> int:
    ctypes.set_errno(0)
    return int(getattr(_lib(), name)(*args))


# --- pin / get --------------------------------------------------------------------------------

class _ObjGetOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("file_flags", ctypes.c_uint32)]


class _ObjAttr(ctypes.Structure):
    """The BPF_OBJ_PIN/BPF_OBJ_GET part of union bpf_attr."""

    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32), ("path_fd", ctypes.c_int32),
                ("_pad", ctypes.c_uint32)]


def _file_flags(rdonly: bool, wronly: bool) -> int:
    if rdonly and wronly:
        raise KernelError(Kind.KERNEL, "rdonly and wronly are mutually exclusive",
                          errno=errno.EINVAL, op="BPF_OBJ_GET")
    return (BPF_F_RDONLY if rdonly else 0) | (BPF_F_WRONLY if wronly else 0)


def obj_pin(fd: int, path: str) -> None:
    """Pin a prog/map/link fd at `path` on bpffs (the file must not exist)."""
    _check(_call("bpf_obj_pin", fd, os.fsencode(path)), "BPF_OBJ_PIN", path, _PIN_HINT)


def obj_get(path: str, *, rdonly: bool = False, wronly: bool = False) -> int:
    """Open a pinned object. RDONLY/WRONLY limit what the returned (map) fd may do."""
    opts = _ObjGetOpts(ctypes.sizeof(_ObjGetOpts), _file_flags(rdonly, wronly))
    return _check(_call("bpf_obj_get_opts", os.fsencode(path), ctypes.byref(opts)),
                  "BPF_OBJ_GET", path, _PIN_HINT)


def _sys_bpf_obj(cmd: int, attr: _ObjAttr) -> int:
    ctypes.set_errno(0)
    ret = int(_libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_long(cmd), ctypes.byref(attr),
                            ctypes.c_uint(ctypes.sizeof(attr))))
    return -ctypes.get_errno() if ret < 0 else ret


def _obj_at(cmd: int, dir_fd: int, name: str, bpf_fd: int, flags: int) -> int:
    """OBJ_PIN/OBJ_GET relative to a directory fd: BPF_F_PATH_FD, else /proc/self/fd/N/name.

    Resolving relative to an fd we already verified closes the symlink race a full path has.
    """
    if "/" in name or name in ("", ".", ".."):
        raise KernelError(Kind.KERNEL, "name must be one path component", value=name,
                          errno=errno.EINVAL)
    raw = os.fsencode(name)
    attr = _ObjAttr(ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0,
                    bpf_fd, flags | BPF_F_PATH_FD, dir_fd, 0)
    ret = _sys_bpf_obj(cmd, attr)
    if ret != -errno.EINVAL:
        return ret
    via_proc = os.fsencode(f"/proc/self/fd/{dir_fd}/{name}")  # kept alive across the call
    attr.pathname = ctypes.cast(ctypes.c_char_p(via_proc), ctypes.c_void_p).value or 0
    attr.file_flags, attr.path_fd = flags, 0
    return _sys_bpf_obj(cmd, attr)


def obj_pin_at(fd: int, dir_fd: int, name: str, *, where: str | None = None) -> None:
    """Pin `fd` as `name` inside the directory `dir_fd` (`where` names it in errors)."""
    _check(_obj_at(_BPF_OBJ_PIN, dir_fd, name, fd, 0), "BPF_OBJ_PIN", where or name, _PIN_HINT)


def obj_get_at(dir_fd: int, name: str, *, rdonly: bool = False, wronly: bool = False,
               where: str | None = None) -> int:
    """Open the pin `name` inside the directory `dir_fd`."""
    flags = _file_flags(rdonly, wronly)
    return _check(_obj_at(_BPF_OBJ_GET, dir_fd, name, 0, flags), "BPF_OBJ_GET", where or name,
                  _PIN_HINT)


# --- maps -------------------------------------------------------------------------------------

class _MapCreateOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64), ("numa_node", ctypes.c_uint32),
                ("map_ifindex", ctypes.c_uint32)]


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    """Create a map (tests/tools; BCC creates the spec maps). Returns its fd."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    ret = _call("bpf_map_create", map_type, name.encode()[:BPF_OBJ_NAME_LEN - 1] or None,
                key_size, value_size, max_entries, ctypes.byref(opts))
    return _check(ret, "BPF_MAP_CREATE", f"map {name or '<unnamed>'}")


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Set one element. Per-CPU maps take model.MapKind.value_size bytes (a slot per CPU)."""
    ret = _call("bpf_map_update_elem", fd, key, value, flags)
    _check(ret, "BPF_MAP_UPDATE_ELEM", f"map fd {fd}", _MAP_WRITE_HINT)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """One element's value, or None if the key is absent. `value_size` as for map_update."""
    buf = ctypes.create_string_buffer(value_size)
    ret = _call("bpf_map_lookup_elem", fd, key, buf)
    if ret == -errno.ENOENT:
        return None
    _check(ret, "BPF_MAP_LOOKUP_ELEM", f"map fd {fd}")
    return buf.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete one element; False if it was not there."""
    ret = _call("bpf_map_delete_elem", fd, key)
    if ret == -errno.ENOENT:
        return False
    _check(ret, "BPF_MAP_DELETE_ELEM", f"map fd {fd}", _MAP_WRITE_HINT)
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Iterate a map's keys (a NULL start key yields the first)."""
    cur: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        ret = _call("bpf_map_get_next_key", fd, cur, nxt)
        if ret == -errno.ENOENT:
            return
        _check(ret, "BPF_MAP_GET_NEXT_KEY", f"map fd {fd}")
        cur = nxt.raw
        yield cur


def map_freeze(fd: int) -> None:
    """Make the map read-only from the syscall side, for good (programs may still write)."""
    _check(_call("bpf_map_freeze", fd), "BPF_MAP_FREEZE", f"map fd {fd}", _MAP_WRITE_HINT)


def fdinfo(fd: int) -> dict[str, str]:
    """/proc/self/fdinfo/<fd> as key -> value: what bpf_*_info lacks (frozen, memlock)."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as fh:
        pairs = (line.split(":", 1) for line in fh if ":" in line)
        return {k.strip(): v.strip() for k, v in pairs}


def map_is_frozen(fd: int) -> bool:
    """The kernel exposes freeze only in fdinfo (`frozen:\\t1`), not in bpf_map_info."""
    return fdinfo(fd).get("frozen") == "1"


# --- info -------------------------------------------------------------------------------------

class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),  # bit 0; the other 31 bits are padding
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64), ("verified_insns", ctypes.c_uint32),
        ("attach_btf_obj_id", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _LinkNamed(ctypes.Structure):
    """raw_tracepoint: tp_name buffer pointer + length (in/out)."""

    _fields_ = [("name", ctypes.c_uint64), ("name_len", ctypes.c_uint32)]


class _LinkPerfEvent(ctypes.Structure):
    """perf_event (kernel >= 6.6): type, then for tracepoints a tp_name buffer + length, for
    uprobes a file_name buffer + length and the file offset."""

    _fields_ = [("type", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("name", ctypes.c_uint64), ("name_len", ctypes.c_uint32),
                ("offset", ctypes.c_uint32)]


class _LinkTcx(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32)]


class _LinkCgroup(ctypes.Structure):
    _fields_ = [("cgroup_id", ctypes.c_uint64), ("attach_type", ctypes.c_uint32)]


class _LinkNetns(ctypes.Structure):
    _fields_ = [("netns_ino", ctypes.c_uint32), ("attach_type", ctypes.c_uint32)]


class _LinkUprobeMulti(ctypes.Structure):
    """uprobe_multi (kernel >= 6.8): the path buffer, the offsets array (in/out)."""

    _fields_ = [("path", ctypes.c_uint64), ("offsets", ctypes.c_uint64),
                ("ref_ctr_offsets", ctypes.c_uint64), ("cookies", ctypes.c_uint64),
                ("path_size", ctypes.c_uint32), ("count", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("pid", ctypes.c_uint32)]


class _LinkUnion(ctypes.Union):
    _fields_ = [("raw_tracepoint", _LinkNamed), ("perf_event", _LinkPerfEvent),
                ("xdp_ifindex", ctypes.c_uint32), ("tcx", _LinkTcx), ("cgroup", _LinkCgroup),
                ("netns", _LinkNetns), ("uprobe_multi", _LinkUprobeMulti),
                ("_raw", ctypes.c_uint8 * 64)]


class _LinkInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("u", _LinkUnion)]


BPF_PERF_EVENT_TRACEPOINT = 5  # enum bpf_perf_event_type
BPF_PERF_EVENT_UPROBE, BPF_PERF_EVENT_URETPROBE = 1, 2
PERF_EVENT_TYPE_NAMES = {1: "uprobe", 2: "uretprobe", 3: "kprobe", 4: "kretprobe",
                         5: "tracepoint", 6: "event"}


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    tag: str  # hex, as bpftool prints it
    name: str
    map_ids: tuple[int, ...]
    load_time: int  # ns since boot
    created_by_uid: int
    xlated_len: int
    jited_len: int
    run_cnt: int  # counted only while kernel.bpf_stats_enabled=1
    run_time_ns: int
    btf_id: int
    gpl_compatible: bool
    verified_insns: int

    @property
    def type_name(self) -> str:
        return PROG_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str
    btf_id: int

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    ifindex: int | None = None  # xdp and tcx links (0: the interface went away)
    attach_type: int | None = None  # tcx and cgroup links
    cgroup_id: int | None = None  # cgroup links (the cgroup2 directory's inode; 0: removed)
    netns_ino: int | None = None  # netns links (sk_lookup; 0: the namespace went away)
    # uprobe links (perf_event or uprobe_multi): the binary and the file offset; a uprobe_multi
    # link's BPF_F_UPROBE_MULTI_RETURN flag reads as perf_event_type uretprobe (else uprobe)
    file: str | None = None
    offset: int | None = None
    tp_name: str | None = None  # raw_tracepoint and perf_event tracepoint links
    perf_event_type: int | None = None  # perf_event links

    @property
    def type_name(self) -> str:
        return LINK_TYPE_NAMES.get(self.type, str(self.type))


def _get_info(fd: int, info: ctypes.Structure, what: str) -> int:
    """BPF_OBJ_GET_INFO_BY_FD into `info`; returns the length the kernel filled."""
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = _call("bpf_obj_get_info_by_fd", fd, ctypes.byref(info), ctypes.byref(size))
    _check(ret, "BPF_OBJ_GET_INFO_BY_FD", f"{what} fd {fd}")
    return size.value


def _addr(buf: ctypes.Array[Any]) -> int:
    return ctypes.addressof(buf)


def _prog_info_raw(fd: int) -> _ProgInfo:
    info = _ProgInfo()
    _get_info(fd, info, "prog")
    return info


def prog_info(fd: int) -> ProgInfo:
    """Program facts; map_ids need a second call sized by the first's nr_map_ids."""
    info = _prog_info_raw(fd)
    ids: tuple[int, ...] = ()
    if info.nr_map_ids:
        arr = (ctypes.c_uint32 * info.nr_map_ids)()
        second = _ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=_addr(arr))
        _get_info(fd, second, "prog")
        ids = tuple(arr[: min(second.nr_map_ids, info.nr_map_ids)])
    return ProgInfo(
        id=info.id, type=info.type, tag=bytes(info.tag).hex(),
        name=info.name.decode(errors="replace"), map_ids=ids, load_time=info.load_time,
        created_by_uid=info.created_by_uid, xlated_len=info.xlated_prog_len,
        jited_len=info.jited_prog_len, run_cnt=info.run_cnt, run_time_ns=info.run_time_ns,
        btf_id=info.btf_id, gpl_compatible=bool(info.gpl_compatible & 1),
        verified_insns=info.verified_insns)


def prog_xlated(fd: int) -> bytes:
    """The kernel's rewritten instructions (forensics; helper imms are rewritten here).

    Empty without CAP_PERFMON/CAP_SYS_ADMIN-equivalent dump rights (kernel zeroes the length).
    """
    size = _prog_info_raw(fd).xlated_prog_len
    if not size:
        return b""
    buf = ctypes.create_string_buffer(size)
    second = _ProgInfo(xlated_prog_len=size, xlated_prog_insns=_addr(buf))
    _get_info(fd, second, "prog")
    return buf.raw[: min(size, second.xlated_prog_len)]


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _get_info(fd, info, "map")
    return MapInfo(id=info.id, type=info.type, key_size=info.key_size,
                   value_size=info.value_size, max_entries=info.max_entries,
                   map_flags=info.map_flags, name=info.name.decode(errors="replace"),
                   btf_id=info.btf_id)


def link_info(fd: int) -> LinkInfo:
    """Link facts; for tracepoint-ish links the name comes through a buffer we supply."""
    first = _LinkInfo()
    _get_info(fd, first, "link")
    name_buf = ctypes.create_string_buffer(256)
    if first.type == LINK_TYPE_RAW_TRACEPOINT:
        info = _LinkInfo()
        info.u.raw_tracepoint = _LinkNamed(_addr(name_buf), len(name_buf))
        _get_info(fd, info, "link")
        return LinkInfo(info.id, info.type, info.prog_id, tp_name=_cstr(name_buf))
    if first.type == LINK_TYPE_PERF_EVENT:
        return _perf_link_info(fd, first, name_buf)
    if first.type == LINK_TYPE_UPROBE_MULTI:
        return _uprobe_multi_info(fd, first)
    if first.type == LINK_TYPE_CGROUP:
        return LinkInfo(first.id, first.type, first.prog_id,
                        attach_type=first.u.cgroup.attach_type,
                        cgroup_id=first.u.cgroup.cgroup_id)
    if first.type == LINK_TYPE_NETNS:
        return LinkInfo(first.id, first.type, first.prog_id,
                        attach_type=first.u.netns.attach_type, netns_ino=first.u.netns.netns_ino)
    if first.type == LINK_TYPE_TCX:
        return LinkInfo(first.id, first.type, first.prog_id, ifindex=first.u.tcx.ifindex,
                        attach_type=first.u.tcx.attach_type)
    ifindex = first.u.xdp_ifindex if first.type == LINK_TYPE_XDP else None
    return LinkInfo(first.id, first.type, first.prog_id, ifindex=ifindex)


def _perf_link_info(fd: int, first: _LinkInfo, name_buf: ctypes.Array[ctypes.c_char]
                    ) -> LinkInfo:
    ptype = first.u.perf_event.type
    if ptype in (BPF_PERF_EVENT_UPROBE, BPF_PERF_EVENT_URETPROBE):
        path_buf = ctypes.create_string_buffer(4096)
        info = _LinkInfo()
        info.u.perf_event.name, info.u.perf_event.name_len = _addr(path_buf), len(path_buf)
        _get_info(fd, info, "link")
        return LinkInfo(first.id, first.type, first.prog_id, perf_event_type=ptype,
                        file=_cstr(path_buf), offset=info.u.perf_event.offset)
    if ptype != BPF_PERF_EVENT_TRACEPOINT:
        return LinkInfo(first.id, first.type, first.prog_id, perf_event_type=ptype)
    info = _LinkInfo()
    info.u.perf_event.name, info.u.perf_event.name_len = _addr(name_buf), len(name_buf)
    _get_info(fd, info, "link")
    return LinkInfo(first.id, first.type, first.prog_id, tp_name=_cstr(name_buf),
                    perf_event_type=ptype)


def _uprobe_multi_info(fd: int, first: _LinkInfo) -> LinkInfo:
    """Path and first offset of a uprobe_multi link (loaderd makes them with one offset; a
    foreign one may have more: the count from the first call sizes the array)."""
    path_buf = ctypes.create_string_buffer(4096)
    offsets = (ctypes.c_uint64 * max(1, first.u.uprobe_multi.count))()
    info = _LinkInfo()
    um = info.u.uprobe_multi
    um.path, um.path_size = _addr(path_buf), len(path_buf)
    um.offsets, um.count = _addr(offsets), len(offsets)
    _get_info(fd, info, "link")
    ret = info.u.uprobe_multi.flags & BPF_F_UPROBE_MULTI_RETURN
    return LinkInfo(first.id, first.type, first.prog_id, file=_cstr(path_buf),
                    offset=offsets[0] if info.u.uprobe_multi.count else None,
                    perf_event_type=BPF_PERF_EVENT_URETPROBE if ret else BPF_PERF_EVENT_UPROBE)


def _cstr(buf: ctypes.Array[ctypes.c_char]) -> str:
    return buf.value.decode(errors="replace")


# --- links ------------------------------------------------------------------------------------

class _LinkCreateOpts(ctypes.Structure):
    """Prefix of libbpf 1.1's struct bpf_link_create_opts (sz tells libbpf how much we pass)."""

    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32),
                ("iter_info", ctypes.c_void_p), ("iter_info_len", ctypes.c_uint32),
                ("target_btf_id", ctypes.c_uint32), ("bpf_cookie", ctypes.c_uint64)]


class _LinkUpdateOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32),
                ("old_prog_fd", ctypes.c_uint32)]


def _attach_caps(attach_type: int) -> str:
    return CAPS_TRACING if attach_type == ATTACH_PERF_EVENT else CAPS_NET


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    """BPF_LINK_CREATE: target is a perf event fd (41), an ifindex (XDP, 37), ...; flags as
    the attach type wants them (XDP mode flags for XDP)."""
    opts = _LinkCreateOpts(sz=ctypes.sizeof(_LinkCreateOpts), flags=flags)
    ret = _call("bpf_link_create", prog_fd, target_fd, attach_type, ctypes.byref(opts))
    return _check(ret, "BPF_LINK_CREATE",
                  f"prog fd {prog_fd} -> target {target_fd} (attach type {attach_type})",
                  _attach_caps(attach_type))


class _LinkCreateMprogAttr(ctypes.Structure):
    """union bpf_attr's link_create with its tcx/cgroup part (the same layout in both;
    libbpf 1.1 predates both)."""

    _fields_ = [("prog_fd", ctypes.c_uint32), ("target", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("relative", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("expected_revision", ctypes.c_uint64)]


def _sys_bpf(cmd: int, attr: ctypes.Structure) -> int:
    """The raw bpf() syscall: its result, or -errno."""
    ctypes.set_errno(0)
    ret = int(_libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_long(cmd), ctypes.byref(attr),
                            ctypes.c_uint(ctypes.sizeof(attr))))
    return -ctypes.get_errno() if ret < 0 else ret


def mprog_link_create(prog_fd: int, target: int, attach_type: int, flags: int = 0,
                      relative: int = 0, expected_revision: int = 0) -> int:
    """BPF_LINK_CREATE on a multi-prog hook (`target`: a tcx ifindex, or a cgroup directory
    fd), placed by `flags` (BPF_F_BEFORE/AFTER, with BPF_F_LINK/BPF_F_ID saying what
    `relative` is); `expected_revision` (not 0) refuses with ESTALE if the hook changed since
    it was queried."""
    attr = _LinkCreateMprogAttr(prog_fd, target, attach_type, flags, relative, 0,
                                expected_revision)
    return _check(_sys_bpf(_BPF_LINK_CREATE, attr), "BPF_LINK_CREATE",
                  f"prog fd {prog_fd} -> target {target} "
                  f"({ATTACH_TYPE_NAMES.get(attach_type, attach_type)})", CAPS_NET)


ATTACH_TRACE_UPROBE_MULTI = 48  # model.UprobeAttach loads with it as expected_attach_type
BPF_F_UPROBE_MULTI_RETURN = 1


class _LinkCreateUprobeMultiAttr(ctypes.Structure):
    """union bpf_attr's link_create with its uprobe_multi part (kernel >= 6.6)."""

    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("path", ctypes.c_uint64), ("offsets", ctypes.c_uint64),
                ("ref_ctr_offsets", ctypes.c_uint64), ("cookies", ctypes.c_uint64),
                ("cnt", ctypes.c_uint32), ("multi_flags", ctypes.c_uint32),
                ("pid", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


def uprobe_multi_link_create(prog_fd: int, path: str, offset: int, *, retprobe: bool = False,
                             pid: int = 0) -> int:
    """A uprobe_multi link at file `offset` of `path` (the function's return with `retprobe`),
    in every process (pid 0) or one. Unlike a perf event on the uprobe PMU, whose event_init
    wants CAP_SYS_ADMIN (EACCES without it, measured on 6.18), this needs only the program's
    own CAP_BPF + CAP_PERFMON: what the hardened apply unit has."""
    raw = ctypes.c_char_p(os.fsencode(path))
    offsets = (ctypes.c_uint64 * 1)(offset)
    attr = _LinkCreateUprobeMultiAttr(
        prog_fd, 0, ATTACH_TRACE_UPROBE_MULTI, 0, ctypes.cast(raw, ctypes.c_void_p).value or 0,
        _addr(offsets), 0, 0, 1, BPF_F_UPROBE_MULTI_RETURN if retprobe else 0, pid)
    return _check(_sys_bpf(_BPF_LINK_CREATE, attr), "BPF_LINK_CREATE",
                  f"uprobe {path}+{offset:#x}", CAPS_TRACING)


class _QueryAttr(ctypes.Structure):
    """union bpf_attr's query (BPF_PROG_QUERY), with the multi-prog fields (kernel >= 6.6)."""

    _fields_ = [("target", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("prog_attach_flags", ctypes.c_uint64),
                ("link_ids", ctypes.c_uint64), ("link_attach_flags", ctypes.c_uint64),
                ("revision", ctypes.c_uint64)]


@dataclass(frozen=True)
class HookQuery:
    """The programs on one multi-prog hook, in the order they run (bpftool net's order)."""

    revision: int
    prog_ids: tuple[int, ...]
    link_ids: tuple[int, ...]  # 0 where a program is attached without a link


def prog_query(target: int, attach_type: int) -> HookQuery:
    """BPF_PROG_QUERY of a multi-prog hook (`target`: a tcx ifindex, or a cgroup directory fd)."""
    what = f"target {target} ({ATTACH_TYPE_NAMES.get(attach_type, attach_type)})"
    for _ in range(4):  # the count can grow between the two calls
        attr = _QueryAttr(target=target, attach_type=attach_type)
        _check(_sys_bpf(_BPF_PROG_QUERY, attr), "BPF_PROG_QUERY", what, CAPS_NET)
        n = attr.count
        if not n:
            return HookQuery(attr.revision, (), ())
        progs, links = (ctypes.c_uint32 * n)(), (ctypes.c_uint32 * n)()
        attr = _QueryAttr(target=target, attach_type=attach_type, prog_ids=_addr(progs),
                          count=n, link_ids=_addr(links))
        ret = _sys_bpf(_BPF_PROG_QUERY, attr)
        if ret == -errno.ENOSPC:
            continue
        _check(ret, "BPF_PROG_QUERY", what, CAPS_NET)
        got = min(n, attr.count)
        return HookQuery(attr.revision, tuple(progs[:got]), tuple(links[:got]))
    raise KernelError(Kind.KERNEL, "BPF_PROG_QUERY: the hook kept changing", Location(
        file=what), errno=errno.EAGAIN, op="BPF_PROG_QUERY")


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
    """Swap a link's program atomically; with `old_prog_fd`, only if that one is attached
    (EPERM otherwise: someone else changed it)."""
    opts = _LinkUpdateOpts(sz=ctypes.sizeof(_LinkUpdateOpts))
    if old_prog_fd is not None:
        opts.flags, opts.old_prog_fd = BPF_F_REPLACE, old_prog_fd
    ret = _call("bpf_link_update", link_fd, new_prog_fd, ctypes.byref(opts))
    _check(ret, "BPF_LINK_UPDATE", f"link fd {link_fd}",
           "the attached program is not old_prog_fd (changed meanwhile), or CAP_BPF missing"
           if old_prog_fd is not None else CAPS_BPF)


def link_detach(link_fd: int) -> None:
    """Detach now, even while the link is still pinned or held open elsewhere."""
    _check(_call("bpf_link_detach", link_fd), "BPF_LINK_DETACH", f"link fd {link_fd}")


def raw_tracepoint_open(name: str | None, prog_fd: int) -> int:
    """Attach a RAW_TRACEPOINT program; returns a link fd (pin it to outlive the process).
    name None: a tracing (fentry/fexit) or LSM program, at the BTF id it was loaded for."""
    ret = _call("bpf_raw_tracepoint_open", name.encode() if name else None, prog_fd)
    return _check(ret, "BPF_RAW_TRACEPOINT_OPEN", f"raw tracepoint {name or '(btf id)'}",
                  CAPS_TRACING)


def prog_type_supported(prog_type: int) -> bool:
    """libbpf's probe (a minimal load of that type; what `bpftool feature probe` reports)."""
    return _call("libbpf_probe_bpf_prog_type", prog_type, None) == 1


# --- tracepoints / perf -----------------------------------------------------------------------

_TP_NAME = re.compile(r"[A-Za-z0-9_]{1,128}")


def _tp_name(kind: str, value: str) -> str:
    if not _TP_NAME.fullmatch(value):
        raise LoaderdError(Kind.ATTACH, f"invalid tracepoint {kind} name", value=value,
                           allowed="letters, digits and '_' (at most 128)")
    return value


TRACEFS = "/sys/kernel/tracing"
TRACEFS_MAGIC = 0x74726163


def _fs_type(path: str) -> int | None:
    """statfs f_type of `path` (os.statvfs does not expose it), None when it cannot be read."""
    buf = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on x86_64
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return int.from_bytes(buf.raw[:8], "little", signed=False)


def tracefs_missing(tracefs: str = TRACEFS) -> LoaderdError | None:
    """An error when tracefs is not mounted at `tracefs`: tracepoint ids live only there (a
    missing id file then is no proof that the tracepoint does not exist)."""
    if _fs_type(tracefs) == TRACEFS_MAGIC:
        return None
    # The fix is no "allowed" value: it is said as `fix:` (as for a missing bpffs).
    return LoaderdError(Kind.ATTACH, f"tracefs is not mounted at {tracefs}: tracepoint "
                        f"programs cannot be attached; fix: mount it (`mount -t tracefs tracefs "
                        f"{tracefs}`; under systemd `systemctl start sys-kernel-tracing.mount`), "
                        "then apply again", Location(file=tracefs))


def tracepoint_id(category: str, event: str, tracefs: str = TRACEFS) -> int:
    """The perf config id of a tracepoint, from tracefs events/<category>/<event>/id."""
    path = os.path.join(tracefs, "events", _tp_name("category", category),
                        _tp_name("event", event), "id")
    try:
        with open(path, encoding="ascii") as fh:
            return int(fh.read().strip())
    except FileNotFoundError:
        missing = tracefs_missing(tracefs)
        if missing is not None:
            raise missing from None
        raise LoaderdError(Kind.ATTACH, "no such tracepoint", Location(file=path),
                           value=f"{category}:{event}",
                           allowed=f"an event listed under {tracefs}/events") from None
    except (OSError, ValueError) as exc:
        err = getattr(exc, "errno", None) or errno.EIO
        raise _fail("read tracepoint id", path, err, "needs read access to tracefs") from None


class _PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to config3 (PERF_ATTR_SIZE_VER8 = 136 bytes)."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64), ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32), ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64), ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16), ("_reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32), ("_reserved_3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64), ("config3", ctypes.c_uint64),
    ]


def perf_event_open_tracepoint(tp_id: int, cpu: int = 0) -> int:
    """A tracepoint perf event (pid -1, one CPU): the target of a BPF_PERF_EVENT link.

    The BPF program runs on every CPU regardless of `cpu`; the event is just the anchor.
    """
    attr = _PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=ctypes.sizeof(_PerfEventAttr),
                          config=tp_id, sample_period=1, sample_type=PERF_SAMPLE_RAW,
                          wakeup_events=1)
    ctypes.set_errno(0)
    ret = int(_libc.syscall(ctypes.c_long(_SYS_PERF_EVENT_OPEN), ctypes.byref(attr),
                            ctypes.c_int(-1), ctypes.c_int(cpu), ctypes.c_int(-1),
                            ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC)))
    if ret < 0:
        raise _fail("perf_event_open", f"tracepoint id {tp_id}", ctypes.get_errno(),
                    "needs CAP_PERFMON, and perf_event_open allowed by the unit's "
                    "SystemCallFilter= (it is in @debug)")
    return ret


def perf_event_open_software(config: int, cpu: int, *, frequency: int | None = None,
                             period: int | None = None) -> int:
    """A sampling software event (PERF_COUNT_SW_*) on one CPU, every process: the target of a
    BPF_PERF_EVENT link; the program runs at each sample."""
    attr = _PerfEventAttr(type=PERF_TYPE_SOFTWARE, size=ctypes.sizeof(_PerfEventAttr),
                          config=config, sample_period=frequency or period or 0,
                          flags=PERF_ATTR_FREQ if frequency else 0)
    ctypes.set_errno(0)
    ret = int(_libc.syscall(ctypes.c_long(_SYS_PERF_EVENT_OPEN), ctypes.byref(attr),
                            ctypes.c_int(-1), ctypes.c_int(cpu), ctypes.c_int(-1),
                            ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC)))
    if ret < 0:
        raise _fail("perf_event_open", f"software event {config} on cpu {cpu}",
                    ctypes.get_errno(), "needs CAP_PERFMON (a frequency above "
                    "kernel.perf_event_max_sample_rate is refused with EINVAL)")
    return ret


def max_sample_rate() -> int | None:
    """kernel.perf_event_max_sample_rate: the highest frequency a sampling event may ask for
    (the kernel lowers it itself when sampling takes too long); None when unreadable."""
    try:
        with open("/proc/sys/kernel/perf_event_max_sample_rate", encoding="ascii") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def online_cpus() -> list[int]:
    """The CPUs a per-CPU event can be opened on (/sys/devices/system/cpu/online)."""
    with open("/sys/devices/system/cpu/online", encoding="ascii") as fh:
        out: list[int] = []
        for part in fh.read().strip().split(","):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
        return out


def perf_event_open_probe(pmu_type: int, path: str, offset: int, config: int = 0,
                          pid: int = -1) -> int:
    """A uprobe (kprobe) perf event at file `offset` of `path` (at `offset` into the kernel
    function named `path`); config: the retprobe bit or 0. The target of a BPF_PERF_EVENT
    link. pid -1: every process (anchored on CPU 0; the program runs wherever the probe
    hits), else that process on any CPU."""
    raw = os.fsencode(path)
    attr = _PerfEventAttr(type=pmu_type, size=ctypes.sizeof(_PerfEventAttr), config=config,
                          config1=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0,
                          config2=offset)
    ctypes.set_errno(0)
    ret = int(_libc.syscall(ctypes.c_long(_SYS_PERF_EVENT_OPEN), ctypes.byref(attr),
                            ctypes.c_int(pid), ctypes.c_int(0 if pid == -1 else -1),
                            ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC)))
    if ret < 0:
        raise _fail("perf_event_open", f"probe {path}+{offset:#x}", ctypes.get_errno(),
                    "needs CAP_PERFMON (and read access to the binary)")
    return ret


PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_EVENT_IOC_ENABLE = 0x2400


def perf_event_open_output(cpu: int, wakeup_events: int = 1) -> int:
    """A software BPF_OUTPUT perf event on one CPU (pid -1), disabled until enabled: the
    target bpf_perf_event_output writes to, through a perf_event_array slot (BCC's
    open_perf_buffer makes the same one)."""
    attr = _PerfEventAttr(type=PERF_TYPE_SOFTWARE, size=ctypes.sizeof(_PerfEventAttr),
                          config=PERF_COUNT_SW_BPF_OUTPUT, sample_period=1,
                          sample_type=PERF_SAMPLE_RAW, wakeup_events=wakeup_events)
    ctypes.set_errno(0)
    ret = int(_libc.syscall(ctypes.c_long(_SYS_PERF_EVENT_OPEN), ctypes.byref(attr),
                            ctypes.c_int(-1), ctypes.c_int(cpu), ctypes.c_int(-1),
                            ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC)))
    if ret < 0:
        raise _fail("perf_event_open", f"BPF output event on CPU {cpu}", ctypes.get_errno(),
                    "needs CAP_PERFMON (a CPU-wide perf event), and perf_event_open allowed "
                    "by the unit's SystemCallFilter= (it is in @debug)")
    return ret


def perf_event_enable(fd: int) -> None:
    import fcntl

    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as exc:
        raise _fail("PERF_EVENT_IOC_ENABLE", f"perf event fd {fd}", exc.errno or errno.EIO,
                    "") from None


# --- xdp --------------------------------------------------------------------------------------

def ifindex(name: str) -> int:
    """Interface index by name, with an error that names the interface."""
    try:
        return socket.if_nametoindex(name)
    except (OSError, ValueError):
        raise LoaderdError(Kind.ATTACH, "no such network interface", value=name,
                           allowed="an interface listed by `ip link`") from None


def xdp_mode_flags(mode: str) -> int:
    """XDP_FLAGS_* for a spec's mode (model.XDP_MODES), or an error naming the modes."""
    try:
        return XDP_MODES[mode]
    except KeyError:
        raise LoaderdError(Kind.ATTACH, "unknown XDP mode", value=mode,
                           allowed=", ".join(XDP_MODES)) from None


# --- enumeration ------------------------------------------------------------------------------

def _ids(func: str, what: str) -> Iterator[int]:
    cur = ctypes.c_uint32(0)
    while True:
        nxt = ctypes.c_uint32(0)
        ret = _call(func, cur.value, ctypes.byref(nxt))
        if ret == -errno.ENOENT:
            return
        _check(ret, func.upper(), f"all {what}s", CAPS_BY_ID)
        cur = nxt
        yield nxt.value


def prog_ids() -> Iterator[int]:
    """Every program id in the system (CAP_SYS_ADMIN)."""
    return _ids("bpf_prog_get_next_id", "prog")


def map_ids() -> Iterator[int]:
    return _ids("bpf_map_get_next_id", "map")


def link_ids() -> Iterator[int]:
    return _ids("bpf_link_get_next_id", "link")


def _fd_by_id(func: str, what: str, obj_id: int) -> int:
    return _check(_call(func, obj_id), func.upper(), f"{what} id {obj_id}", CAPS_BY_ID)


def prog_fd_by_id(prog_id: int) -> int:
    return _fd_by_id("bpf_prog_get_fd_by_id", "prog", prog_id)


def map_fd_by_id(map_id: int) -> int:
    return _fd_by_id("bpf_map_get_fd_by_id", "map", map_id)


def link_fd_by_id(link_id: int) -> int:
    return _fd_by_id("bpf_link_get_fd_by_id", "link", link_id)




# enum bpf_attach_type: the cgroup hooks systemd attaches its own programs to.
ATTACH_TYPES: dict[str, int] = {
    "cgroup_inet_ingress": 0, "cgroup_inet_egress": 1, "cgroup_device": 6,
    "cgroup_inet4_bind": 8, "cgroup_inet6_bind": 9,
}
