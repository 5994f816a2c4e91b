"""StrictModes-style file trust: who owns a config file and its directories, who can write
them, and whether a path or symlink leaves the directory it must stay in.

Checks are made on the resolved path with lstat, then the file is opened with O_NOFOLLOW and
the *opened* fd is fstat-ed again, so the bytes returned are the bytes that were checked.
"""

from __future__ import annotations

import os
import re
import stat

from loaderd.errors import Kind, LoaderdError, Location

_TRUSTED_UIDS_NOTE = "owned by uid {uid} or root, not writable by group or other"


def _err(path: str, message: str, *, value: object = None, allowed: str | None = None,
         field: str | None = None) -> LoaderdError:
    return LoaderdError(Kind.TRUST, message, Location(path, field=field), value=value,
                        allowed=allowed)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(path: str) -> str:
    """`path` with control characters escaped (\\x0a), safe on one line of output."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path)


def check_path_text(path: str) -> None:
    """A newline or other control character in a trusted path breaks every line-based
    consumer of it (clang's `#line`, journal fields, error lines): refuse it."""
    m = _CONTROL.search(path)
    if m is not None:
        raise _err(printable(path), f"the path contains a control character "
                   f"(\\x{ord(m.group()):02x}); rename the file or directory",
                   allowed="printable characters")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_stat(path: str, st: os.stat_result, owner_uid: int | None, kind: str) -> None:
    """Owner and mode rules for one file or directory (skipped when owner_uid is None)."""
    if owner_uid is None:
        return
    allowed = _TRUSTED_UIDS_NOTE.format(uid=owner_uid)
    if st.st_uid not in (owner_uid, 0):
        raise _err(path, f"{kind} is owned by uid {st.st_uid}", allowed=allowed)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _err(path, f"{kind} is writable by group or other "
                   f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod go-w", allowed=allowed)


def _check_links(path: str, st: os.stat_result) -> None:
    """A second name for the same inode lets whoever made it show this file's bytes under a
    trusted name (a hard link to a root-only file passes every owner and mode check), so a
    config file has exactly one. Checked even when ownership is not (non-root `check`)."""
    if st.st_nlink != 1:
        raise _err(path, f"file has {st.st_nlink} hard links; copy it instead of linking it "
                   "(its content is not read)", allowed="one link (st_nlink == 1)")


def _check_ancestor(path: str, st: os.stat_result, owner_uid: int | None) -> None:
    """A directory above `root_dir`, as sshd's StrictModes walks them: whoever may write it
    could rename the path below it away and put their own in its place. A root-owned sticky
    directory (/tmp) is the exception: the entry below it is checked in turn (root's or the
    owner's), and the sticky bit keeps others from renaming or removing what is not theirs."""
    if owner_uid is None:
        return
    if st.st_mode & stat.S_ISVTX and st.st_uid == 0:
        return
    _check_stat(path, st, owner_uid, "parent directory")


def check_file(path: str, *, owner_uid: int | None, root_dir: str) -> str:
    """Refuse `path` unless it is a regular file inside `root_dir` (also after following a
    symlink), it and every directory up to and including `root_dir` are trusted, and no
    directory above that can be changed by anyone else. Returns the resolved path to open."""
    check_path_text(os.path.abspath(path))
    root = os.path.realpath(root_dir)
    link = os.path.abspath(path)
    if not _inside(link, os.path.abspath(root_dir)) and not _inside(link, root):
        raise _err(path, "file is outside the directory it must be in", allowed=root)
    try:
        real = os.path.realpath(link, strict=True)
        st = os.lstat(real)
    except OSError as exc:
        raise _err(path, f"cannot open: {exc.strerror or exc}") from None
    if not _inside(real, root):
        what = "symlink points" if os.path.islink(link) else "path resolves"
        raise _err(path, f"{what} outside {root}", value=real)
    check_path_text(real)
    if not stat.S_ISREG(st.st_mode):
        raise _err(path, "not a regular file", allowed="regular files")
    _check_links(real, st)
    _check_stat(real, st, owner_uid, "file")
    directory = os.path.dirname(real)
    while True:
        dst = os.stat(directory)
        if _inside(directory, root):
            _check_stat(directory, dst, owner_uid, "directory")
        else:
            _check_ancestor(directory, dst, owner_uid)
        if directory == "/":
            return real
        directory = os.path.dirname(directory)


def check_relative(ref: str, base_dir: str) -> str:
    """Resolve `source.file`-style reference `ref` against `base_dir`; refuse absolute paths
    and anything that leaves `base_dir` lexically or through a symlink."""
    field = "source.file"
    if "\0" in ref:
        raise _err(ref, "path contains a NUL byte", field=field)
    if os.path.isabs(ref):
        raise _err(ref, "absolute paths are not allowed", value=ref, field=field,
                   allowed="a path relative to the spec's directory")
    base = os.path.realpath(base_dir)
    joined = os.path.normpath(os.path.join(base, ref))
    if not _inside(joined, base) or joined == base:
        raise _err(ref, "path leaves the spec's directory", value=ref, field=field,
                   allowed="a path relative to the spec's directory")
    real = os.path.realpath(joined)
    if not _inside(real, base):
        raise _err(ref, "symlink points outside the spec's directory", value=real,
                   field=field)
    return real


def read_file(path: str, *, owner_uid: int | None, root_dir: str, max_bytes: int) -> bytes:
    """check_file, then read at most max_bytes + 1 bytes (so callers can see "too big")
    from the same inode that was checked."""
    real = check_file(path, owner_uid=owner_uid, root_dir=root_dir)
    before = os.lstat(real)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise _err(path, f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise _err(path, "file changed while it was being checked")
        if not stat.S_ISREG(st.st_mode):
            raise _err(path, "not a regular file", allowed="regular files")
        _check_links(real, st)
        _check_stat(real, st, owner_uid, "file")
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
