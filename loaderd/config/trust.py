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
    return LoaderdError(Kind.TRUST, message, Location(printable(path), field=field), value=value,
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
        raise _err(path, f"the path contains a control character "
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


def _owners(uids: frozenset[int]) -> str:
    return f"owned by uid {' or '.join(map(str, sorted(uids)))}"


def _check_owner_mode(path: str, st: os.stat_result, uids: frozenset[int], kind: str) -> None:
    allowed = f"{_owners(uids)}, not writable by group or other"
    if st.st_uid not in uids:
        raise _err(path, f"{kind} is owned by uid {st.st_uid}", allowed=allowed)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _err(path, f"{kind} is writable by group or other "
                   f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod go-w", allowed=allowed)


MAX_SYMLINKS = 40  # the kernel's own limit (ELOOP)


def walk_dir(path: str, *, uids: frozenset[int], last_uids: frozenset[int] | None = None,
             kind: str = "directory", allow_missing: bool = False,
             last_symlink_ok: bool = True) -> str:
    """Resolve directory `path` one component at a time from `/`, as the kernel does, and
    check what the walk passes through (sshd's StrictModes, symlinks included): every
    directory owned by one of `uids` (`last_uids` for the final one) and not writable by
    group or other, since whoever may write a directory can put their own entry in the
    place of the next component; every symlink followed owned by one of `uids`. A
    root-owned sticky directory above the final one (/tmp) is the one exception: others
    may add entries there but not rename or replace ours, which are checked in turn.
    `allow_missing`: the path may end in components not made yet; the last existing
    directory, where they will be made, may not be writable by others even if sticky (or
    someone else could make them first). `last_symlink_ok=False`: the path's own last
    component may not be a symlink. Returns the resolved path."""
    check_path_text(path)
    last = uids if last_uids is None else last_uids
    if not last_symlink_ok and os.path.islink(path):
        raise _err(path, f"{kind} is a symlink; name the directory itself",
                   value=printable(os.readlink(path)[:200]), allowed="a directory")
    pending = [p for p in os.path.abspath(path).split("/") if p]
    cur, hops = "/", 0
    _check_walked("/", os.lstat("/"), uids if pending else last, "parent directory",
                  sticky_ok=bool(pending))
    while pending:
        name = pending.pop(0)
        if name in (".", ".."):
            cur = os.path.dirname(cur) if name == ".." else cur
            continue
        nxt = os.path.join(cur, name)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            if allow_missing:  # made later, in `cur`: nobody else may add entries there
                _check_owner_mode(cur, os.lstat(cur), uids, "parent directory")
                return os.path.join(nxt, *pending)
            raise _err(path, f"cannot open {nxt}: No such file or directory") from None
        except OSError as exc:
            raise _err(path, f"cannot open {nxt}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise _err(path, "too many levels of symlinks")
            if st.st_uid not in uids:
                raise _err(nxt, f"symlink on the way to {printable(path)} is owned by uid "
                           f"{st.st_uid}", allowed=_owners(uids))
            target = os.readlink(nxt)
            cur = "/" if target.startswith("/") else cur
            pending = [p for p in target.split("/") if p] + pending
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _err(nxt, "not a directory", allowed="a directory")
        final = not pending
        _check_walked(nxt, st, last if final else uids,
                      kind if final else "parent directory", sticky_ok=not final)
        cur = nxt
    return cur


def _check_walked(path: str, st: os.stat_result, uids: frozenset[int], kind: str, *,
                  sticky_ok: bool) -> None:
    if sticky_ok and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
        return
    _check_owner_mode(path, st, uids, kind)


def check_file(path: str, *, owner_uid: int | None, root_dir: str) -> str:
    """Refuse `path` unless it is a regular file inside `root_dir` (also after following a
    symlink), it and every directory up to and including `root_dir` are trusted, and no
    directory on the way to `root_dir` (through symlinks too: `walk_dir`) can be changed by
    anyone else. Returns the resolved path to open."""
    check_path_text(os.path.abspath(path))
    link = os.path.abspath(path)
    if owner_uid is None:
        root = os.path.realpath(root_dir)
    else:
        uids = frozenset({0, owner_uid})
        root = walk_dir(root_dir, uids=uids)
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
    while _inside(directory, root) and directory != root:  # root itself: walk_dir did it
        _check_stat(directory, os.stat(directory), owner_uid, "directory")
        directory = os.path.dirname(directory)
    return real


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
