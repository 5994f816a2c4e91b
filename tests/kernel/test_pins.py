"""loaderd.bpf.pins on a real bpffs: layout, modes/owners, confinement (symlinks, foreign
filesystems, bad names), removal, rename and atomic exchange."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator

import pytest

from loaderd.bpf import kernel, pins
from loaderd.errors import Kind, LoaderdError
from tests.conftest import SYSTEM_PYTHON

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: bpf() and bpffs pins"),
]


@pytest.fixture
def layout(bpffs_dir: str) -> pins.PinLayout:
    return pins.PinLayout(f"{bpffs_dir}/root")


@pytest.fixture
def map_fd() -> Iterator[int]:
    fd = kernel.map_create(kernel.MAP_TYPES["array"], 4, 4, 1, name="ldtest_pins")
    yield fd
    os.close(fd)


def make_map(name: str) -> int:
    return kernel.map_create(kernel.MAP_TYPES["array"], 4, 4, 1, name=name)


def pin_new_map(path: str, name: str) -> int:
    """Pin a fresh map at `path`; returns its id."""
    fd = make_map(name)
    try:
        pins.pin(fd, path)
        return kernel.map_info(fd).id
    finally:
        os.close(fd)


def pinned_map_id(path: str) -> int:
    fd = pins.get(path, rdonly=True)
    try:
        return kernel.map_info(fd).id
    finally:
        os.close(fd)


# --- layout, modes, owners --------------------------------------------------------------------

def test_layout_create_pin_get(layout: pins.PinLayout, map_fd: int) -> None:
    layout.ensure_dir(layout.root, 0o711)
    maps = layout.kind_dir("net", "maps")
    layout.ensure_dir(maps, 0o750)
    assert stat.S_IMODE(os.stat(layout.root).st_mode) == 0o711
    assert stat.S_IMODE(os.stat(maps).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(layout.spec_dir("net")).st_mode) == 0o750
    path = layout.map_path("net", "counts")
    nogroup = 65534
    layout.pin(map_fd, path, 0o640, nogroup)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == nogroup and st.st_uid == 0
    assert pinned_map_id(path) == kernel.map_info(map_fd).id
    assert layout.list_tree(layout.root) == ["net/maps/counts"]
    assert layout.exists(path) and not layout.exists(layout.prog_path("net", "nope"))


def test_pin_mode_ignores_umask(layout: pins.PinLayout, map_fd: int) -> None:
    layout.ensure_dir(layout.root)
    old = os.umask(0o077)
    try:
        layout.pin(map_fd, f"{layout.root}/m", 0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(f"{layout.root}/m").st_mode) == 0o644


def test_conform_pins_sets_mode_and_group_of_pins_only(layout: pins.PinLayout,
                                                       map_fd: int) -> None:
    """Adopted pins from a root run (0600, group root) get the configured mode and group;
    directories and pins already right are left alone; a symlink is not followed."""
    layout.ensure_dir(layout.kind_dir("net", "maps"), 0o755)
    old, ok = layout.map_path("net", "old"), layout.map_path("net", "ok")
    nogroup = 65534
    layout.pin(map_fd, old, 0o600)
    layout.pin(map_fd, ok, 0o640, nogroup)
    os.symlink("/etc/passwd", f"{layout.kind_dir('net', 'maps')}/link")
    changed = layout.conform_pins(layout.spec_dir("net"), 0o640, nogroup)
    assert changed == ["maps/old"]
    st = os.stat(old)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, nogroup)
    assert stat.S_IMODE(os.stat(layout.kind_dir("net", "maps")).st_mode) == 0o755
    assert os.stat("/etc/passwd").st_gid == 0
    assert layout.conform_pins(layout.spec_dir("net"), 0o640, nogroup) == []
    # Per-pin exceptions (RDONLY maps lose their write bits).
    assert layout.conform_pins(layout.spec_dir("net"), 0o640, nogroup,
                               {"maps/ok": 0o440}) == ["maps/ok"]
    assert stat.S_IMODE(os.stat(ok).st_mode) == 0o440
    # No group configured: the mode alone.
    assert sorted(layout.conform_pins(layout.spec_dir("net"), 0o600, -1)) == ["maps/ok",
                                                                              "maps/old"]
    st = os.stat(ok)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, nogroup)


def test_pin_over_existing_refused(layout: pins.PinLayout, map_fd: int) -> None:
    layout.ensure_dir(layout.root)
    layout.pin(map_fd, f"{layout.root}/m")
    with pytest.raises(kernel.KernelError) as exc:
        layout.pin(map_fd, f"{layout.root}/m")
    assert exc.value.errno == errno.EEXIST


def test_pin_needs_existing_parent(layout: pins.PinLayout, map_fd: int) -> None:
    with pytest.raises(LoaderdError, match="does not exist"):
        layout.pin(map_fd, layout.map_path("net", "m"))


def test_get_rdonly_from_pin(layout: pins.PinLayout, map_fd: int) -> None:
    layout.ensure_dir(layout.root)
    layout.pin(map_fd, f"{layout.root}/m")
    ro = layout.get(f"{layout.root}/m", rdonly=True)
    try:
        with pytest.raises(kernel.KernelError) as exc:
            kernel.map_update(ro, b"\0" * 4, b"\1" * 4)
        assert exc.value.errno == errno.EPERM
    finally:
        os.close(ro)


# --- confinement ------------------------------------------------------------------------------

def test_symlinked_directory_inside_root_refused(layout: pins.PinLayout, bpffs_dir: str,
                                                 map_fd: int) -> None:
    elsewhere = f"{bpffs_dir}/elsewhere"
    os.mkdir(elsewhere)
    layout.ensure_dir(layout.root)
    os.symlink(elsewhere, layout.spec_dir("net"))  # bpffs supports symlinks
    for op in (lambda: layout.ensure_dir(layout.kind_dir("net", "maps")),
               lambda: layout.pin(map_fd, f"{layout.spec_dir('net')}/m"),
               lambda: layout.list_tree(layout.spec_dir("net"))):
        with pytest.raises(LoaderdError, match="symlink") as exc:
            op()
        assert exc.value.kind is Kind.PIN
    assert os.listdir(elsewhere) == []


def test_symlink_in_place_of_pin_not_followed(layout: pins.PinLayout, bpffs_dir: str,
                                              map_fd: int) -> None:
    target = f"{bpffs_dir}/target"
    kernel.obj_pin(map_fd, target)
    layout.ensure_dir(layout.root)
    os.symlink(target, f"{layout.root}/m")
    with pytest.raises(LoaderdError, match="not a pin"):
        layout.get(f"{layout.root}/m")
    assert layout.list_tree(layout.root) == ["m"]
    layout.remove_tree(layout.root)  # unlinks the symlink, leaves its target
    assert os.path.exists(target) and not os.path.lexists(layout.root)


def test_remove_tree_does_not_follow_symlinked_dirs(layout: pins.PinLayout,
                                                    bpffs_dir: str) -> None:
    outside = f"{bpffs_dir}/outside"
    os.mkdir(outside)
    pin_new_map(f"{outside}/keep", "keep")
    layout.ensure_dir(layout.kind_dir("net", "maps"))
    pin_new_map(layout.map_path("net", "gone"), "gone")
    os.symlink(outside, f"{layout.spec_dir('net')}/progs")
    layout.remove_tree(layout.root)
    assert not os.path.lexists(layout.root)
    assert os.listdir(outside) == ["keep"]


def test_root_symlink_refused(bpffs_dir: str) -> None:
    real = f"{bpffs_dir}/real"
    os.mkdir(real)
    os.symlink(real, f"{bpffs_dir}/link")
    layout = pins.PinLayout(f"{bpffs_dir}/link")
    with pytest.raises(LoaderdError, match="symlink"):
        layout.check()
    with pytest.raises(LoaderdError, match="symlink"):
        pins.ensure_dir(layout.spec_dir("net"))


def test_root_not_on_bpffs_refused(map_fd: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        layout = pins.PinLayout(tmp)
        with pytest.raises(LoaderdError, match="bpf"):
            layout.check()
        with pytest.raises(LoaderdError, match="not below a bpffs mount"):
            layout.ensure_dir(layout.spec_dir("net"))
        with pytest.raises(LoaderdError, match="bpffs"):
            layout.pin(map_fd, f"{tmp}/m")
        assert os.listdir(tmp) == []


def test_bpffs_mount_point_itself_is_not_a_target() -> None:
    with pytest.raises(LoaderdError, match="not below a bpffs mount"):
        pins.ensure_dir("/sys/fs/bpf")
    with pytest.raises(LoaderdError):
        pins.remove_tree("/sys/fs/bpf")
    assert os.path.isdir("/sys/fs/bpf")


def test_foreign_mount_below_root_refused(layout: pins.PinLayout) -> None:
    layout.ensure_dir(layout.spec_dir("net"))
    mnt = layout.spec_dir("net")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt], check=True)
    try:
        with pytest.raises(LoaderdError, match="non-bpffs"):
            layout.ensure_dir(layout.kind_dir("net", "maps"))
        with pytest.raises(LoaderdError, match="mount"):
            layout.remove_tree(layout.root)
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_bad_paths_refused(layout: pins.PinLayout, map_fd: int) -> None:
    layout.ensure_dir(layout.root)
    for path in (f"{layout.root}/../x", f"{layout.root}//x", f"{layout.root}/x/", "relative/x",
                 "/"):
        with pytest.raises(LoaderdError) as exc:
            pins.pin(map_fd, path)
        assert exc.value.kind is Kind.PIN
    with pytest.raises(LoaderdError, match="outside"):
        layout.pin(map_fd, "/sys/fs/bpf/other/m")


def test_bpffs_refuses_dotted_names(bpffs_dir: str) -> None:
    """Why staging is `_staging`, not `.staging`: bpffs reserves names containing '.'."""
    with pytest.raises(PermissionError):
        os.mkdir(f"{bpffs_dir}/.staging")
    with pytest.raises(PermissionError):
        os.mkdir(f"{bpffs_dir}/a.b")


# --- removal, rename, exchange ----------------------------------------------------------------

def test_remove_tree_missing_is_noop(layout: pins.PinLayout) -> None:
    layout.remove_tree(layout.spec_dir("nothing"))
    layout.remove_tree(layout.root)
    assert layout.list_tree(layout.root) == []


def test_rename_noreplace(layout: pins.PinLayout) -> None:
    a, b = layout.spec_dir("aaa"), layout.spec_dir("bbb")
    layout.ensure_dir(a)
    layout.ensure_dir(b)
    with pytest.raises(LoaderdError, match=os.strerror(errno.EEXIST)):
        layout.rename(a, b)
    layout.remove_tree(b)
    layout.rename(a, b)
    assert os.path.isdir(b) and not os.path.exists(a)


def test_exchange_swaps_directories_atomically(layout: pins.PinLayout) -> None:
    a, b = layout.spec_dir("aaa"), layout.spec_dir("bbb")
    layout.ensure_dir(a)
    layout.ensure_dir(b)
    id_a, id_b = pin_new_map(f"{a}/m", "in_a"), pin_new_map(f"{b}/m", "in_b")
    missing: list[int] = []
    stop = threading.Event()

    def reader() -> None:  # `a/m` must exist at every instant of every swap
        while not stop.is_set():
            if not os.path.exists(f"{a}/m"):
                missing.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(201):
            layout.exchange(a, b)
    finally:
        stop.set()
        thread.join()
    assert missing == []
    assert (pinned_map_id(f"{a}/m"), pinned_map_id(f"{b}/m")) == (id_b, id_a)


def test_exchange_needs_both(layout: pins.PinLayout) -> None:
    layout.ensure_dir(layout.spec_dir("aaa"))
    with pytest.raises(LoaderdError, match=os.strerror(errno.ENOENT)):
        layout.exchange(layout.spec_dir("aaa"), layout.spec_dir("bbb"))


def test_staging_publish(layout: pins.PinLayout) -> None:
    staged = layout.staging("tx-1")
    layout.ensure_dir(staged.kind_dir("net", "maps"))
    first = pin_new_map(staged.map_path("net", "m"), "first")
    assert layout.publish("tx-1", "net") is False
    layout.ensure_dir(staged.kind_dir("net", "maps"))
    second = pin_new_map(staged.map_path("net", "m"), "second")
    assert layout.publish("tx-1", "net") is True
    assert pinned_map_id(layout.map_path("net", "m")) == second
    assert pinned_map_id(staged.map_path("net", "m")) == first  # old version, to drop
    layout.remove_tree(layout.staging_root)
    assert layout.list_tree(layout.root) == ["net/maps/m"]


# --- unprivileged readers -----------------------------------------------------------------------

NOBODY = 65534
READER = """
import errno, sys
from loaderd.bpf import kernel
path = sys.argv[1]
fd = kernel.obj_get(path, rdonly=True)
print("rdonly", kernel.map_lookup(fd, b"\\0" * 4, 4).hex())
try:
    kernel.obj_get(path)
except kernel.KernelError as exc:
    print("rw", exc.errno, exc)
try:
    list(kernel.prog_ids())
except kernel.KernelError as exc:
    print("ids", exc.errno, exc)
"""


def run_as_nobody(script: str, code: str, *args: str) -> str:
    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    env = dict(os.environ, PYTHONPATH=code)  # a copy the unprivileged user can read
    out = subprocess.run([SYSTEM_PYTHON, "-c", script, *args], env=env, preexec_fn=drop,
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout


def test_group_readable_pin_opens_rdonly_for_unprivileged_reader(
        layout: pins.PinLayout, bpffs_dir: str, map_fd: int, shared_code: str) -> None:
    """The pin's mode/group is what grants a reader access: a 0640 pin in group nogroup opens
    read-only for that group, read-write is refused, and enumeration names CAP_SYS_ADMIN."""
    os.chmod(bpffs_dir, 0o711)
    layout.ensure_dir(layout.root, 0o711)
    kernel.map_update(map_fd, b"\0" * 4, b"\x2a\0\0\0")
    layout.pin(map_fd, f"{layout.root}/m", 0o640, NOBODY)
    lines = run_as_nobody(READER, shared_code, f"{layout.root}/m").splitlines()
    assert lines[0] == "rdonly 2a000000"
    assert lines[1].startswith(f"rw {errno.EACCES} ") and "mode or owner" in lines[1]
    assert lines[2].startswith(f"ids {errno.EPERM} ") and "CAP_SYS_ADMIN" in lines[2]
