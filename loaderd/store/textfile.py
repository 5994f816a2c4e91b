"""Atomic files for node_exporter's textfile collector (`--collector.textfile.directory`).

The collector reads every `*.prom` in its directory whenever it is scraped, so a half-written
file would be served (or fail the whole collector): write a temp file whose name does not end
in `.prom`, fsync it, rename it over the target, fsync the directory. The directory is opened
once with O_DIRECTORY|O_NOFOLLOW and everything happens relative to that fd, so a symlink swapped
in for the file or the directory is never followed. Mode 0644: node_exporter runs as another
user (`prometheus` on Debian) and the writers' UMask=0077 would hide the file from it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct

MODE = 0o644
_ACL = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def write(directory: str, name: str, text: str) -> str:
    """Replace `directory/name` with `text`; returns the path. Raises OSError."""
    if "/" in name or not name.endswith(".prom"):
        raise ValueError(f"not a textfile collector file name: {name!r}")
    tmp = f".{name}.{os.getpid()}.tmp"  # ignored by the collector: no .prom suffix
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # The directory's parent is another user's on Debian (prometheus): it may have been
        # swapped for one they own, with a FIFO planted at our temp name (a plain open would
        # block the resident before READY). Only a root-owned directory, only a new regular
        # file: a leftover is removed first, O_EXCL refuses anything put back meanwhile.
        if os.fstat(dfd).st_uid != 0:
            raise PermissionError(errno.EPERM, "not owned by root: not written", directory)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, MODE, dir_fd=dfd)
        try:
            os.fchmod(fd, MODE)
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return os.path.join(directory, name)



def grant(directory: str, uid: int) -> bool:
    """Add a POSIX ACL entry u:<uid>:rwx to `directory` (the package's postinst, as root), so
    the unprivileged writer may replace its own file there; mode, owner and the other entries
    stay. Done on an fd opened O_NOFOLLOW and only for a root-owned directory: on Debian its
    parent belongs to the `prometheus` user, who could put a symlink or a directory of their
    own in its place (systemd-tmpfiles refuses an `a+` line there as an "unsafe path
    transition" for that reason). True when an entry was added."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or not stat.S_ISDIR(st.st_mode):
            raise PermissionError(errno.EPERM, "not a root-owned directory", directory)
        try:
            raw = os.getxattr(fd, _ACL)
            entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i)
                       for i in range((len(raw) - 4) // 8)]
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            mode = st.st_mode
            entries = [(_USER_OBJ, (mode >> 6) & 7, 0xFFFFFFFF), (_GROUP_OBJ, (mode >> 3) & 7,
                       0xFFFFFFFF), (_OTHER, mode & 7, 0xFFFFFFFF)]
        if any(tag == _USER and qid == uid and perm & 7 == 7 for tag, perm, qid in entries):
            return False
        entries = [e for e in entries if not (e[0] == _USER and e[2] == uid) and e[0] != _MASK]
        entries.append((_USER, 7, uid))
        group_obj = next(perm for tag, perm, _ in entries if tag == _GROUP_OBJ)
        named = [perm for tag, perm, _ in entries if tag in (_USER, _GROUP)]
        mask = group_obj
        for perm in named:
            mask |= perm
        entries.append((_MASK, mask, 0xFFFFFFFF))
        entries.sort(key=lambda e: (e[0], e[2]))
        os.setxattr(fd, _ACL, struct.pack("<I", _ACL_VERSION)
                    + b"".join(struct.pack("<HHI", *e) for e in entries))
        return True
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """`python3 -m loaderd.store.textfile grant DIR USER` (postinst)."""
    import pwd

    if len(argv) != 3 or argv[0] != "grant":
        print("usage: python3 -m loaderd.store.textfile grant DIR USER")
        return 2
    added = grant(argv[1], pwd.getpwnam(argv[2]).pw_uid)
    print(f"{argv[1]}: {'granted' if added else 'already grants'} {argv[2]} write (ACL)")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
