"""loaderd.bpf.kernel on the real kernel: pins, read-only fds, freeze, info structs against
bpftool, tracepoint/raw tracepoint/XDP links, enumeration."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loaderd.bpf import kernel, pins
from loaderd.errors import Kind, LoaderdError
from loaderd.model import XDP_MODES, MapType, ProgType

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: bpf(), bpffs pins and "
                       "perf_event_open on the real kernel"),
]

KEY0 = b"\0\0\0\0"

# Counts getpid() calls made by one process (so other processes' syscalls never interfere).
COUNT_GETPID = """
BPF_ARRAY(counts, u64, 1);
int f(void *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET) return 0;
    int zero = 0;
    u64 *v = counts.lookup(&zero);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
"""

XDP_TWO = """
int pass_a(struct xdp_md *ctx) { return XDP_PASS; }
int pass_b(struct xdp_md *ctx) { return XDP_PASS; }
"""


def bpftool(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def counter(map_fd: int) -> int:
    value = kernel.map_lookup(map_fd, KEY0, 8)
    assert value is not None
    return int.from_bytes(value, "little")


def getpid_delta(map_fd: int, calls: int = 5) -> int:
    before = counter(map_fd)
    for _ in range(calls):
        os.getpid()  # glibc does not cache getpid: each call is a syscall
    return counter(map_fd) - before


def wait_stopped(map_fd: int, timeout: float = 5.0) -> bool:
    """Detach after the last reference goes is asynchronous (RCU + workqueue): poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if getpid_delta(map_fd) == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def hash_map() -> Iterator[int]:
    fd = kernel.map_create(kernel.MAP_TYPES["hash"], 4, 8, 16, name="ldtest_hash")
    yield fd
    os.close(fd)


# --- pins and maps ----------------------------------------------------------------------------

def test_pin_and_get_roundtrip(bpffs_dir: str, hash_map: int) -> None:
    path = f"{bpffs_dir}/m"
    kernel.obj_pin(hash_map, path)
    shown = bpftool("map", "show", "pinned", path)
    assert shown["name"] == "ldtest_hash"
    fd = kernel.obj_get(path)
    try:
        assert kernel.map_info(fd).id == kernel.map_info(hash_map).id == shown["id"]
        kernel.map_update(fd, KEY0, b"A" * 8)
        assert kernel.map_lookup(hash_map, KEY0, 8) == b"A" * 8
    finally:
        os.close(fd)


def test_pin_existing_path_names_path_and_errno(bpffs_dir: str, hash_map: int) -> None:
    path = f"{bpffs_dir}/m"
    kernel.obj_pin(hash_map, path)
    with pytest.raises(kernel.KernelError) as exc:
        kernel.obj_pin(hash_map, path)
    assert exc.value.errno == errno.EEXIST and exc.value.kind is Kind.KERNEL
    assert path in str(exc.value) and "BPF_OBJ_PIN" in str(exc.value)
    assert os.strerror(errno.EEXIST) in str(exc.value)


def test_obj_get_missing_pin(bpffs_dir: str) -> None:
    with pytest.raises(kernel.KernelError) as exc:
        kernel.obj_get(f"{bpffs_dir}/nothing")
    assert exc.value.errno == errno.ENOENT


def test_map_element_ops(hash_map: int) -> None:
    keys = [i.to_bytes(4, "little") for i in range(3)]
    for i, key in enumerate(keys):
        kernel.map_update(hash_map, key, bytes([i]) * 8)
    assert sorted(kernel.map_keys(hash_map, 4)) == sorted(keys)
    assert kernel.map_lookup(hash_map, keys[1], 8) == b"\1" * 8
    assert kernel.map_delete(hash_map, keys[1]) is True
    assert kernel.map_delete(hash_map, keys[1]) is False
    assert kernel.map_lookup(hash_map, keys[1], 8) is None
    with pytest.raises(kernel.KernelError) as exc:
        kernel.map_update(hash_map, keys[0], b"x" * 8, kernel.BPF_NOEXIST)
    assert exc.value.errno == errno.EEXIST


def test_rdonly_fd_refuses_update(bpffs_dir: str, hash_map: int) -> None:
    path = f"{bpffs_dir}/m"
    kernel.map_update(hash_map, KEY0, b"B" * 8)
    kernel.obj_pin(hash_map, path)
    ro = kernel.obj_get(path, rdonly=True)
    wo = kernel.obj_get(path, wronly=True)
    try:
        assert kernel.map_lookup(ro, KEY0, 8) == b"B" * 8
        with pytest.raises(kernel.KernelError) as exc:
            kernel.map_update(ro, KEY0, b"C" * 8)
        assert exc.value.errno == errno.EPERM
        assert "read-only" in str(exc.value)
        with pytest.raises(kernel.KernelError) as exc:
            kernel.map_lookup(wo, KEY0, 8)
        assert exc.value.errno == errno.EPERM
    finally:
        os.close(ro)
        os.close(wo)


def test_freeze(hash_map: int) -> None:
    kernel.map_update(hash_map, KEY0, b"D" * 8)
    assert kernel.map_is_frozen(hash_map) is False
    kernel.map_freeze(hash_map)
    assert kernel.map_is_frozen(hash_map) is True
    with pytest.raises(kernel.KernelError) as exc:
        kernel.map_update(hash_map, KEY0, b"E" * 8)
    assert exc.value.errno == errno.EPERM
    assert kernel.map_lookup(hash_map, KEY0, 8) == b"D" * 8


def test_map_info_matches_bpftool(bpffs_dir: str) -> None:
    fd = kernel.map_create(MapType.HASH.kind.kernel_id, 8, 16, 32,
                           flags=kernel.BPF_F_NO_PREALLOC, name="ldtest_info")
    try:
        kernel.obj_pin(fd, f"{bpffs_dir}/m")
        info, shown = kernel.map_info(fd), bpftool("map", "show", "pinned", f"{bpffs_dir}/m")
    finally:
        os.close(fd)
    assert (info.id, info.type_name, info.name) == (shown["id"], shown["type"], shown["name"])
    assert (info.key_size, info.value_size, info.max_entries, info.map_flags) == (
        shown["bytes_key"], shown["bytes_value"], shown["max_entries"], shown["flags"])
    assert info.map_flags == kernel.BPF_F_NO_PREALLOC


def test_rdonly_create_flag_binds_to_fd_not_map() -> None:
    """The kernel drops BPF_F_RDONLY/WRONLY from the map's flags: they restrict only the fd
    returned by the create call (bpf_map_flags_retain_permanent)."""
    fd = kernel.map_create(kernel.MAP_TYPES["array"], 4, 4, 1, flags=kernel.BPF_F_RDONLY)
    try:
        assert kernel.map_info(fd).map_flags == 0
        with pytest.raises(kernel.KernelError) as exc:
            kernel.map_update(fd, KEY0, KEY0)
        assert exc.value.errno == errno.EPERM
    finally:
        os.close(fd)


def test_model_type_tables() -> None:
    """The model's kernel ids agree with kernel.py's uapi name tables."""
    for mt in MapType:
        assert kernel.MAP_TYPES[mt.value] == mt.kind.kernel_id
    from tests.unit.test_model import KERNEL_NAME  # tc is sched_cls, uprobe kprobe, ...

    for pt in ProgType:
        assert kernel.PROG_TYPES[KERNEL_NAME.get(pt, pt.value)] == pt.kind.kernel_id
    assert kernel.PROG_TYPE_NAMES[5] == "tracepoint"


# --- programs, tracepoints --------------------------------------------------------------------

def test_prog_info_matches_bpftool(bcc_compile: Callable[[str], Any]) -> None:
    bpf = bcc_compile(COUNT_GETPID.replace("TARGET", str(os.getpid())))
    from bcc import BPF

    fn = bpf.load_func(b"f", BPF.TRACEPOINT)
    info = kernel.prog_info(fn.fd)
    shown = bpftool("prog", "show", "id", str(info.id))
    assert (info.id, info.type_name, info.name, info.tag) == (
        shown["id"], shown["type"], shown["name"], shown["tag"])
    assert (info.xlated_len, info.jited_len, info.created_by_uid) == (
        shown["bytes_xlated"], shown["bytes_jited"], shown["uid"])
    assert list(info.map_ids) == shown["map_ids"] == [kernel.map_info(bpf[b"counts"].get_fd()).id]
    assert info.btf_id == shown.get("btf_id", 0)
    assert info.gpl_compatible == shown["gpl_compatible"]
    xlated = kernel.prog_xlated(fn.fd)
    assert len(xlated) == info.xlated_len and len(xlated) % 8 == 0


def test_tracepoint_link_outlives_loader_until_unpinned(bpffs_dir: str) -> None:
    """A separate process loads, attaches via perf_event_open + BPF_PERF_EVENT link, pins the
    link and the map, and exits: the program keeps counting until the link pin goes."""
    script = f"""
import sys
from bcc import BPF
from loaderd.bpf import kernel
class NoAuto(BPF):
    def _trace_autoload(self): pass
b = NoAuto(text={COUNT_GETPID.replace("TARGET", str(os.getpid())).encode()!r},
           allow_rlimit=False)
fn = b.load_func(b"f", BPF.TRACEPOINT)
perf = kernel.perf_event_open_tracepoint(kernel.tracepoint_id("syscalls", "sys_enter_getpid"))
link = kernel.link_create(fn.fd, perf, kernel.ATTACH_PERF_EVENT)
kernel.obj_pin(link, sys.argv[1] + "/link")
kernel.obj_pin(b[b"counts"].get_fd(), sys.argv[1] + "/counts")
print(kernel.link_info(link).id)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script, bpffs_dir], check=True, env=env,
                         capture_output=True, text=True, timeout=120)
    link_id = int(out.stdout.split()[-1])
    counts = kernel.obj_get(f"{bpffs_dir}/counts", rdonly=True)
    link = kernel.obj_get(f"{bpffs_dir}/link")
    try:
        info = kernel.link_info(link)
        assert (info.id, info.type_name, info.tp_name) == (link_id, "perf_event",
                                                           "sys_enter_getpid")
    finally:
        os.close(link)  # from here on only the pin holds the link
    assert getpid_delta(counts) == 5
    pins.remove_tree(f"{bpffs_dir}/link")
    try:
        assert wait_stopped(counts), "program still runs after its link pin was removed"
        assert link_id not in set(kernel.link_ids())
    finally:
        os.close(counts)


def test_tracepoint_names_are_validated() -> None:
    for cat, ev in (("..", "x"), ("syscalls", "../../x"), ("a/b", "c"), ("", "x"),
                    ("syscalls", "sys enter")):
        with pytest.raises(LoaderdError) as exc:
            kernel.tracepoint_id(cat, ev)
        assert exc.value.kind is Kind.ATTACH
    with pytest.raises(LoaderdError, match="no such tracepoint"):
        kernel.tracepoint_id("syscalls", "sys_enter_nonexistent_xyz")
    assert kernel.tracepoint_id("syscalls", "sys_enter_getpid") > 0


def test_raw_tracepoint_open(bcc_compile: Callable[[str], Any]) -> None:
    from bcc import BPF

    bpf = bcc_compile(COUNT_GETPID.replace("TARGET", str(os.getpid())))
    fn = bpf.load_func(b"f", BPF.RAW_TRACEPOINT)
    counts = bpf[b"counts"].get_fd()
    link = kernel.raw_tracepoint_open("sys_enter", fn.fd)  # every syscall of this process
    try:
        info = kernel.link_info(link)
        assert (info.type_name, info.tp_name, info.prog_id) == (
            "raw_tracepoint", "sys_enter", kernel.prog_info(fn.fd).id)
        assert getpid_delta(counts) >= 5
    finally:
        os.close(link)
    assert wait_stopped(counts)


def test_perf_event_open_bad_id_is_kernel_error() -> None:
    with pytest.raises(kernel.KernelError) as exc:
        kernel.perf_event_open_tracepoint(0x7FFFFFFF)
    assert exc.value.errno in (errno.ENOENT, errno.EINVAL)
    assert "perf_event_open" in str(exc.value)


# --- xdp --------------------------------------------------------------------------------------

def xdp_prog_id(ifname: str) -> int | None:
    out = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", ifname], check=True,
                         capture_output=True, text=True)
    xdp = json.loads(out.stdout)[0].get("xdp")
    return None if xdp is None else int(xdp["prog"]["id"])


def test_xdp_link_update_swaps_atomically(bcc_compile: Callable[[str], Any], veth: str,
                                          bpffs_dir: str) -> None:
    from bcc import BPF

    bpf = bcc_compile(XDP_TWO)
    prog_a, prog_b = bpf.load_func(b"pass_a", BPF.XDP), bpf.load_func(b"pass_b", BPF.XDP)
    id_a, id_b = kernel.prog_info(prog_a.fd).id, kernel.prog_info(prog_b.fd).id
    idx = kernel.ifindex(veth)
    link = kernel.link_create(prog_a.fd, idx, kernel.ATTACH_XDP, XDP_MODES["skb"])
    try:
        kernel.obj_pin(link, f"{bpffs_dir}/xdp")
        info = kernel.link_info(link)
        assert (info.type_name, info.ifindex, info.prog_id) == ("xdp", idx, id_a)
        assert bpftool("link", "show", "id", str(info.id))["prog_id"] == id_a
        assert xdp_prog_id(veth) == id_a
        kernel.link_update(link, prog_b.fd, old_prog_fd=prog_a.fd)
        assert kernel.link_info(link).prog_id == id_b and xdp_prog_id(veth) == id_b
        with pytest.raises(kernel.KernelError) as exc:  # a stale expectation is refused
            kernel.link_update(link, prog_a.fd, old_prog_fd=prog_a.fd)
        assert exc.value.errno == errno.EPERM
        assert xdp_prog_id(veth) == id_b
        kernel.link_detach(link)  # detaches although still pinned
        assert xdp_prog_id(veth) is None
    finally:
        os.close(link)


def test_xdp_link_second_attach_is_busy(bcc_compile: Callable[[str], Any], veth: str) -> None:
    from bcc import BPF

    prog = bcc_compile(XDP_TWO).load_func(b"pass_a", BPF.XDP)
    idx = kernel.ifindex(veth)
    link = kernel.link_create(prog.fd, idx, kernel.ATTACH_XDP, XDP_MODES["skb"])
    try:
        with pytest.raises(kernel.KernelError) as exc:
            kernel.link_create(prog.fd, idx, kernel.ATTACH_XDP, XDP_MODES["skb"])
        assert exc.value.errno == errno.EBUSY
    finally:
        os.close(link)


def test_ifindex_unknown_interface() -> None:
    with pytest.raises(LoaderdError, match="no such network interface"):
        kernel.ifindex("nonexistent0")
    assert kernel.ifindex("lo") == 1
    assert kernel.xdp_mode_flags("native") == 4  # XDP_FLAGS_DRV_MODE
    with pytest.raises(LoaderdError):
        kernel.xdp_mode_flags("turbo")


# --- enumeration ------------------------------------------------------------------------------

def test_enumeration_and_fd_by_id(hash_map: int) -> None:
    map_id = kernel.map_info(hash_map).id
    assert map_id in set(kernel.map_ids())
    fd = kernel.map_fd_by_id(map_id)
    try:
        assert kernel.map_info(fd).name == "ldtest_hash"
    finally:
        os.close(fd)
    with pytest.raises(kernel.KernelError) as exc:
        kernel.prog_fd_by_id(0x7FFFFFF0)
    assert exc.value.errno == errno.ENOENT
    assert all(isinstance(i, int) for i in kernel.prog_ids())
