"""Uprobe targets: a trusted ELF binary, the file offset of a symbol in it, its identity.

The kernel's uprobe PMU takes a path and a file offset (config1, config2), so loaderd reads the
symbol from the ELF's .symtab or .dynsym itself and turns its address into a file offset by the
PT_LOAD segment that holds it. The binary must be a regular file (not a symlink), owned by root
(or `config_owner`) and writable by nobody else: a program attached to it runs with whatever
code is at that offset. Its inode and sha256 are recorded with the link, so drift notices a
binary replaced under the same path (the uprobe stays on the old inode).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from dataclasses import dataclass

from loaderd.errors import Kind, LoaderdError

PMU_DIRS = "/sys/bus/event_source/devices"
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_SHT_SYMTAB, _SHT_DYNSYM = 2, 11
_PT_LOAD = 1


@dataclass(frozen=True)
class Identity:
    ino: int
    sha256: str


def _bad(msg: str, path: str, allowed: str | None = None) -> LoaderdError:
    return LoaderdError(Kind.ATTACH, msg, value=path, allowed=allowed)


def _refuse_untrusted(path: str, st: os.stat_result, owners: frozenset[int], what: str) -> None:
    if st.st_uid not in owners:
        raise _bad(f"uprobe binary {path}: {what} is owned by uid {st.st_uid}", path,
                   "a binary owned by root (or config_owner) in directories owned by root")
    # a sticky directory (/tmp) lets only an entry's owner rename or remove it
    writable = st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & 0o1000)
    if writable:
        raise _bad(f"uprobe binary {path}: {what} is writable by group or others "
                   f"(mode {stat.S_IMODE(st.st_mode):04o})", path, "mode without g+w, o+w")


def open_trusted(path: str, owners: frozenset[int] = frozenset({0})) -> int:
    """An O_RDONLY fd of a binary a uprobe may be placed in, or the reason it may not.

    Opened once without following a final symlink; the checks are on that file (fstat) and on
    every directory of the path it really has (from /proc/self/fd), so a writable directory
    anywhere above cannot swap it; the symbol is read through the fd (`symbol_offset`)."""
    if not os.path.isabs(path):
        raise _bad("uprobe binary: not an absolute path", path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _bad(f"uprobe binary {path} is a symlink", path,
                       f"the file it points to: {os.path.realpath(path)}") from None
        hidden = _hidden_by_unit(path)
        if hidden:
            raise _bad(f"uprobe binary {path} is hidden from the apply by {hidden}", path,
                       "a binary the apply unit sees: under /usr/local or /opt") from None
        raise _bad(f"uprobe binary {path}: {exc.strerror}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _bad(f"uprobe binary {path} is not a regular file", path)
        _refuse_untrusted(path, st, owners, "the file")
        _refuse_untrusted_path(path, owners | {0})
        real = os.readlink(f"/proc/self/fd/{fd}")
        parent = os.path.dirname(real)
        while True:
            _refuse_untrusted(path, os.stat(parent), owners | {0}, f"directory {parent}")
            if parent == "/":
                break
            parent = os.path.dirname(parent)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _refuse_untrusted_path(path: str, owners: frozenset[int]) -> None:
    """The directories and symlinks of `path` as written: a symlinked directory in it (or a
    directory holding a symlink) that another user owns could point the path elsewhere after
    the check, whatever the directories of the file's real path are."""
    parent = os.path.dirname(os.path.normpath(path))
    while True:
        try:
            st = os.lstat(parent)
        except OSError as exc:  # swapped since the open
            raise _bad(f"uprobe binary {path}: {parent}: {exc.strerror}", path) from None
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in owners:
                raise _bad(f"uprobe binary {path}: symlink {parent} is owned by uid "
                           f"{st.st_uid}", path, "a path whose symlinks and directories "
                           "are root's (or config_owner's)")
        else:
            _refuse_untrusted(path, st, owners, f"directory {parent}")
        if parent == "/":
            break
        parent = os.path.dirname(parent)


def fd_path(fd: int) -> str:
    """The path the kernel resolves to the file open at `fd` (a uprobe_multi link is made by
    path: this one cannot be swapped between the check and the attach)."""
    return f"/proc/self/fd/{fd}"


def still_the_file(path: str, fd: int) -> None:
    """`path` names the file open at `fd` (not replaced since open_trusted checked it)."""
    now, then = os.stat(path), os.fstat(fd)
    if (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino):
        raise _bad(f"uprobe binary {path} was replaced while it was attached; apply again",
                   path)


# systemd's ProtectHome=yes (and InaccessiblePaths=) mounts this directory of its own over what
# it hides; mountinfo shows it as the mount's root.
_INACCESSIBLE = "/systemd/inaccessible/dir"
_PROTECT_HOME = ("/home", "/root", "/run/user")


def _hidden_by_unit(path: str, mountinfo: str = "/proc/self/mountinfo",
                    cgroup: str = "/proc/self/cgroup") -> str | None:
    """Which unit setting makes `path` inaccessible to this process ("loaderd-apply.service's
    ProtectHome=yes (/home is inaccessible)"), from mountinfo and /proc/self/cgroup; None
    when no systemd inaccessible mount covers it."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    point = None
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4 and fields[3] == _INACCESSIBLE:
            at = fields[4].replace("\\040", " ")
            if path == at or path.startswith(at.rstrip("/") + "/"):
                point = at
    if point is None:
        return None
    try:
        with open(cgroup, encoding="utf-8", errors="replace") as fh:
            unit = fh.read().strip().splitlines()[-1].rpartition("/")[2]
    except (OSError, IndexError):
        unit = ""
    who = f"{unit}'s" if unit.endswith(".service") else "its unit's"
    setting = "ProtectHome=yes" if point in _PROTECT_HOME else f"InaccessiblePaths={point}"
    return f"{who} {setting} ({point} is inaccessible to it)"


def identity(path: str) -> Identity:
    """Inode and sha256 of the binary (opened without following a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return Identity(os.fstat(fd).st_ino, h.hexdigest())
    finally:
        os.close(fd)


def check_offset(path: str, fd: int, offset: int) -> int:
    """`offset` if it is inside the file (the kernel accepts any offset below 2**63 and the
    uprobe then never fires, or fires in the middle of an instruction)."""
    size = os.fstat(fd).st_size
    if not 0 <= offset < size:
        raise _bad(f"uprobe offset {offset:#x} is outside {path} ({size} bytes)", str(offset),
                   f"0..{size - 1:#x}: a function's file offset (nm/readelf), or use symbol:")
    return offset


def symbol_offset(path: str, symbol: str, fd: int | None = None) -> int:
    """File offset of function `symbol` in the ELF64 little-endian binary at `path` (read
    through `fd` when given: the file that was checked)."""
    if fd is None:
        with open(path, "rb") as fh:
            data = fh.read()
    else:
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read()
    try:
        return _symbol_offset(data, path, symbol)
    except (struct.error, IndexError, ValueError):  # truncated or inconsistent headers
        raise _bad(f"uprobe binary {path} is not a well-formed ELF file (its headers point "
                   "past its end)", path, "an ELF executable or shared object") from None


def _symbol_offset(data: bytes, path: str, symbol: str) -> int:
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise _bad(f"uprobe binary {path} is not a 64-bit little-endian ELF file", path)
    (phoff, shoff) = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    want = symbol.encode()
    addr = None
    for sh in sections:
        if sh[1] not in (_SHT_SYMTAB, _SHT_DYNSYM) or not sh[9]:
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], sh[9]):
            name, info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", data, off)
            if info & 0xF not in (_STT_FUNC, _STT_GNU_IFUNC) or not shndx or not value:
                continue
            start = strtab[4] + name
            if data[start:data.index(b"\0", start)] == want:
                addr = value
                break
        if addr is not None:
            break
    if addr is None:
        raise _bad(f"no function {symbol} in {path} (.symtab/.dynsym)", symbol,
                   "a function symbol of the binary (nm -D / nm), or give offset:")
    for i in range(phnum):
        ptype, _flags, p_off, vaddr, _pa, filesz = struct.unpack_from("<IIQQQQ", data,
                                                                      phoff + i * phentsize)
        if ptype == _PT_LOAD and vaddr <= addr < vaddr + filesz:
            return int(addr - vaddr + p_off)
    raise _bad(f"{symbol} in {path}: address {addr:#x} is in no loaded segment", symbol)


def pmu(name: str = "uprobe") -> tuple[int, int]:
    """(perf type of the uprobe or kprobe PMU, the config bit that makes it a return probe)."""
    where = f"{PMU_DIRS}/{name}"
    try:
        with open(f"{where}/type", encoding="ascii") as fh:
            ptype = int(fh.read())
        with open(f"{where}/format/retprobe", encoding="ascii") as fh:
            bit = int(fh.read().strip().partition(":")[2])
    except (OSError, ValueError):
        raise LoaderdError(Kind.ATTACH, f"this kernel has no {name} PMU ({where} is missing): "
                           f"{name} programs cannot attach here",
                           allowed=f"a kernel with CONFIG_{name.upper()}_EVENTS") from None
    return ptype, bit
