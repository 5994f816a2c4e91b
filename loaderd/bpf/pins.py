"""The bpffs layout and path confinement.

Live pins:    <root>/<spec>/{progs,maps,links}/<name>
Staging:      <root>/_staging/<txid>/<spec>/{progs,maps,links}/<name>

bpffs refuses any name containing '.' (EPERM from bpf_lookup: dots are reserved for the
kernel's own files), hence `_staging`; its leading '_' cannot collide with a spec name.

`PinLayout` builds these paths from names checked against a strict alphabet. The module-level
operations (ensure_dir, pin, get, remove_tree, rename, exchange, list_tree) take absolute,
normalized paths and walk them from `/` one component at a time with O_NOFOLLOW directory fds:
a symlink anywhere is refused, never followed; everything they create, pin, unlink or rename
must lie strictly below a bpffs mount, every directory from that mount down is checked to be
on bpffs, and pins are made and opened relative to the verified directory fd. So neither a
symlink nor a foreign mount can redirect an operation elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
from collections.abc import Iterator, Mapping

from loaderd.bpf import kernel
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import NAME_PATTERN
from loaderd.model import NAME_RE as NAME_RE  # spec, map and program names (the schema's `name`)

NAME_ALLOWED = NAME_PATTERN
TXID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
TXID_ALLOWED = "[a-z0-9][a-z0-9_-]{0,63}"
# Components below the bpffs mount that the generic operations accept (roots like
# `loaderd-test-1234`, `_staging`); user-supplied names go through NAME_RE via PinLayout.
_COMPONENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,254}")
STAGING = "_staging"
KINDS = ("progs", "maps", "links")
BPF_FS_MAGIC = 0xCAFE4A11

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The walk itself opens each level O_PATH: it needs only search (x) permission on ancestors, so
# /sys/fs/bpf can stay 0711 for a non-root loaderd; directories we list or chmod are reopened.
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int


class MissingPathError(LoaderdError):
    """A directory on the way does not exist (callers may read that as "nothing there")."""


def _err(message: str, path: str, value: object = None, allowed: str | None = None
         ) -> LoaderdError:
    return LoaderdError(Kind.PIN, message, Location(file=path), value=value, allowed=allowed)


def _os_err(op: str, path: str, exc: OSError) -> LoaderdError:
    code = exc.errno or errno.EIO
    return _err(f"{op} failed: {os.strerror(code)}", path, allowed=_HINTS.get(code))


# What an operator can do about the errors a pin root typically meets.
_HINTS = {
    errno.EROFS: "a writable bpffs (under systemd, ProtectKernelTunables= makes /sys/fs/bpf "
                 "read-only: the unit needs ReadWritePaths= for loaderd's bpffs_root)",
    errno.EACCES: "a directory the loading user may write (systemd mounts /sys/fs/bpf 0700: "
                  "loaderd-apply.service's ExecStartPre= makes it 0711 and gives the pin root "
                  "to the user: /usr/lib/loaderd/loaderd-host.tmpfiles)",
    errno.EPERM: "an owner or mode loaderd's user may change (root-owned pins: "
                 "systemd-tmpfiles --create /usr/lib/loaderd/loaderd-host.tmpfiles hands them to "
                 "the service user)",
}


def check_name(name: str, what: str = "name") -> str:
    """A spec, program or map name usable as one bpffs path component."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LoaderdError(Kind.PIN, f"invalid {what}", value=name, allowed=NAME_ALLOWED)
    return name


def check_txid(txid: str) -> str:
    if not isinstance(txid, str) or not TXID_RE.fullmatch(txid):
        raise LoaderdError(Kind.PIN, "invalid staging transaction id", value=txid,
                           allowed=TXID_ALLOWED)
    return txid


def fs_magic(fd: int) -> int:
    """statfs f_type of an open fd (os.statvfs does not expose it)."""
    buf = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on x86_64
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[:8], "little", signed=False)


class _Fd(contextlib.AbstractContextManager["_Fd"]):
    """An owned fd, closed on exit, so early raises never leak directory fds."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


# --- walking ----------------------------------------------------------------------------------

def _components(path: str) -> list[str]:
    if (not isinstance(path, str) or not path.startswith("/") or path.startswith("//")
            or os.path.normpath(path) != path):
        raise _err("pin path must be absolute and normalized (no '..', '.', '//')", str(path))
    return [c for c in path.split("/") if c]


def _open_child(parent: int, name: str, path: str, create_mode: int | None) -> int:
    """Open (optionally create) one directory below `parent`, never through a symlink."""
    try:
        return os.open(name, _WALK_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if create_mode is None:
            raise MissingPathError(Kind.PIN, "directory does not exist", Location(file=path),
                                   value=name) from None
    except OSError as exc:
        raise _not_dir(parent, name, path, exc) from None
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
        os.chmod(name, create_mode, dir_fd=parent)  # exact mode, whatever the umask
    except FileExistsError:
        pass  # lost a race: open what the winner made
    except OSError as exc:
        raise _os_err(f"create directory {name}", path, exc) from None
    return _open_child(parent, name, path, None)


def _reopen(path_fd: int, path: str) -> int:
    """A readable fd for a directory held as O_PATH (to list or chmod it)."""
    try:
        return os.open(".", _DIR_FLAGS, dir_fd=path_fd)
    except OSError as exc:
        raise _os_err("open", path, exc) from None


def _not_dir(parent: int, name: str, path: str, exc: OSError) -> LoaderdError:
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            return _err("refusing a symlink in a pin path", path, value=name)
    if exc.errno == errno.ENOTDIR:
        return _err("not a directory", path, value=name)
    return _os_err(f"open {name}", path, exc)


def _not_bpffs(path: str) -> LoaderdError:
    return _err("path is not below a bpffs mount", path,
                allowed="a directory on bpffs (mount -t bpf bpf /sys/fs/bpf)")


def _open_dir(path: str, create_mode: int | None = None, *, target: bool = True) -> int:
    """fd of directory `path`, walked from `/`. Once on bpffs, every level must stay on bpffs
    and have a safe name; directories are created (`create_mode`) only below the bpffs mount.
    With `target`, `path` itself must lie strictly below the mount (something we may change).
    """
    comps = _components(path)
    fd = os.open("/", _WALK_FLAGS)
    on_bpffs = False
    try:
        for comp in comps:
            on_bpffs = on_bpffs or fs_magic(fd) == BPF_FS_MAGIC
            if on_bpffs and not _COMPONENT_RE.fullmatch(comp):
                raise _err("invalid path component", path, value=comp)
            try:
                nxt = _open_child(fd, comp, path, create_mode if on_bpffs else None)
            except MissingPathError:
                if target and not on_bpffs:
                    raise _not_bpffs(path) from None
                raise
            os.close(fd)
            fd = nxt
            if on_bpffs and fs_magic(fd) != BPF_FS_MAGIC:
                raise _err("refusing a non-bpffs mount below a bpffs directory", path)
        if target and not on_bpffs:
            raise _not_bpffs(path)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_parent(path: str) -> tuple[_Fd, str]:
    """The verified parent directory of `path` and its last component."""
    comps = _components(path)
    if not comps:
        raise _err("refusing to operate on /", path)
    parent = _open_dir("/" + "/".join(comps[:-1]), target=False)
    fd = _Fd(parent)
    if fs_magic(parent) != BPF_FS_MAGIC or not _COMPONENT_RE.fullmatch(comps[-1]):
        fd.__exit__()
        raise _err("path is not a safe name below a bpffs mount", path, value=comps[-1])
    return fd, comps[-1]


# --- operations -------------------------------------------------------------------------------

def ensure_dir(path: str, mode: int = 0o755) -> None:
    """Create `path` and missing parents (below the bpffs mount) with `mode`; the last level
    gets `mode` even if it existed."""
    with _Fd(_open_dir(path, create_mode=mode)) as d, _Fd(_reopen(d.fd, path)) as rd:
        try:
            os.fchmod(rd.fd, mode)
        except OSError as exc:
            raise _os_err("chmod", path, exc) from None


def pin(fd: int, path: str, mode: int = 0o600, gid: int | None = None) -> None:
    """Pin `fd` at `path` (the parent must exist), then set the pin's mode and group (gid None
    or -1: unchanged) so readers can be granted access by group. A failure leaves no pin."""
    parent, name = _open_parent(path)
    with parent:
        kernel.obj_pin_at(fd, parent.fd, name, where=path)
        try:
            if gid is not None and gid >= 0:
                os.chown(name, -1, gid, dir_fd=parent.fd, follow_symlinks=False)
            os.chmod(name, mode, dir_fd=parent.fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=parent.fd)
            raise _os_err("chmod/chown of new pin", path, exc) from None


def get(path: str, *, rdonly: bool = False, wronly: bool = False) -> int:
    """Open a pin; a symlink or directory in its place is refused, not followed."""
    parent, name = _open_parent(path)
    with parent:
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            raise _err("no such pin", path) from None
        if not stat.S_ISREG(st.st_mode):
            raise _err("not a pin (symlink or directory)", path)
        return kernel.obj_get_at(parent.fd, name, rdonly=rdonly, wronly=wronly, where=path)


def exists(path: str) -> bool:
    """Whether `path` exists (as anything, symlinks not followed) on a safe walk."""
    try:
        parent, name = _open_parent(path)
    except MissingPathError:
        return False
    with parent:
        try:
            os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True


def remove_tree(path: str) -> None:
    """Unlink pins bottom-up, then the directories, without following symlinks or crossing
    mounts. Unlinking a link pin detaches the link when it held the last reference (the
    kernel does that asynchronously, after an RCU grace period). Missing path: no-op."""
    try:
        parent, name = _open_parent(path)
    except MissingPathError:
        return
    with parent:
        _remove_entry(parent.fd, name, path)


def _remove_entry(parent: int, name: str, path: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent)
            return
        with _Fd(os.open(name, _DIR_FLAGS, dir_fd=parent)) as sub:
            if os.fstat(sub.fd).st_dev != os.fstat(parent).st_dev:
                raise _err("refusing to remove across a mount point", path, value=name)
            for child in os.listdir(sub.fd):
                _remove_entry(sub.fd, child, f"{path}/{child}")
        os.rmdir(name, dir_fd=parent)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _os_err("remove", path, exc) from None


def rename(src: str, dst: str) -> None:
    """Move `src` to `dst`; refuses to replace an existing `dst` (RENAME_NOREPLACE)."""
    _renameat2(src, dst, _RENAME_NOREPLACE, "rename")


def exchange(a: str, b: str) -> None:
    """Swap two existing paths atomically (RENAME_EXCHANGE): a reader sees one or the other,
    never neither."""
    _renameat2(a, b, _RENAME_EXCHANGE, "exchange")


def _renameat2(src: str, dst: str, flags: int, op: str) -> None:
    sparent, sname = _open_parent(src)
    with sparent:
        dparent, dname = _open_parent(dst)
        with dparent:
            if os.fstat(sparent.fd).st_dev != os.fstat(dparent.fd).st_dev:
                raise _err(f"{op}: both paths must be on the same bpffs", src, value=dst)
            ctypes.set_errno(0)
            ret = _libc.renameat2(sparent.fd, os.fsencode(sname), dparent.fd,
                                  os.fsencode(dname), flags)
            if ret != 0:
                err = ctypes.get_errno()
                raise _err(f"{op} failed: {os.strerror(err)}", src, value=dst)


def list_tree(path: str) -> list[str]:
    """Every non-directory entry below `path` (pins, and symlinks as entries, not followed),
    relative to `path`, sorted. A missing path lists nothing."""
    try:
        fd = _open_dir(path)
    except MissingPathError:
        return []
    with _Fd(fd), _Fd(_reopen(fd, path)) as rd:
        return sorted(rel for _, _, rel, st in _entries(rd.fd) if not stat.S_ISDIR(st.st_mode))


def children(path: str) -> list[str]:
    """Names directly below directory `path` (a missing path has none)."""
    try:
        fd = _open_dir(path)
    except MissingPathError:
        return []
    with _Fd(fd), _Fd(_reopen(fd, path)) as rd:
        return sorted(os.listdir(rd.fd))


def chown_tree(path: str, uid: int) -> None:
    """Give `path` and everything below it (no symlink followed) to `uid`, groups unchanged.
    Used when root runs an apply for a service user: the pins must stay that user's."""
    with _Fd(_open_dir(path)) as d, _Fd(_reopen(d.fd, path)) as rd:
        os.chown(rd.fd, uid, -1)
        for fd, name, _, _ in _entries(rd.fd):
            os.chown(name, uid, -1, dir_fd=fd, follow_symlinks=False)


def conform_pins(path: str, mode: int, gid: int | None,
                 modes: Mapping[str, int] | None = None) -> list[str]:
    """Give every pin below `path` the configured mode (`modes`: exceptions by path relative to
    `path`, e.g. {"maps/cfg": 0o440}) and group (gid None or -1: group unchanged), e.g. pins
    adopted from a root run that had no readers' group. Returns the pins changed, relative."""
    changed: list[str] = []
    try:
        with _Fd(_open_dir(path)) as d, _Fd(_reopen(d.fd, path)) as rd:
            for fd, name, rel, st in _entries(rd.fd):
                if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
                    continue
                want_mode = (modes or {}).get(rel, mode)
                want_gid = st.st_gid if gid is None or gid < 0 else gid
                if stat.S_IMODE(st.st_mode) == want_mode and st.st_gid == want_gid:
                    continue
                os.chown(name, -1, want_gid, dir_fd=fd, follow_symlinks=False)
                os.chmod(name, want_mode, dir_fd=fd)
                changed.append(rel)
    except OSError as exc:
        raise _os_err("chmod/chown of adopted pins", path, exc) from None
    return changed


def _entries(fd: int, prefix: str = "") -> Iterator[tuple[int, str, str, os.stat_result]]:
    """(directory fd, name, path relative to the start, lstat) of everything below `fd`,
    parents before children; no symlink followed."""
    for name in os.listdir(fd):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        yield fd, name, prefix + name, st
        if stat.S_ISDIR(st.st_mode):
            with _Fd(os.open(name, _DIR_FLAGS, dir_fd=fd)) as sub:
                yield from _entries(sub.fd, f"{prefix}{name}/")


def check_bpffs_dir(path: str) -> None:
    """Refuse `path` unless it is an existing directory on bpffs reached without symlinks."""
    with _Fd(_open_dir(path, target=False)) as d:
        if fs_magic(d.fd) != BPF_FS_MAGIC:
            raise _err("not on a bpf filesystem", path,
                       allowed="a directory on bpffs (mount -t bpf bpf /sys/fs/bpf)")


def bpffs_missing(root: str) -> tuple[str, str] | None:
    """(mount point, sentence) when no bpffs holds the pin root: the root, or (missing) its
    nearest existing ancestor, is on another filesystem (bpffs unmounted under a running
    loaderd, or never mounted). None when it is on bpffs, or only the root itself is missing
    (a first apply makes it). Looked at through O_PATH: a reader may only traverse."""
    where = os.path.abspath(root)
    while True:
        try:
            fd = os.open(where, os.O_PATH | os.O_CLOEXEC)
            break
        except FileNotFoundError:
            if where == "/":
                return None
            where = os.path.dirname(where)
        except OSError:
            return None  # not ours to see (EACCES): drift and the apply say what they meet
    try:
        if fs_magic(fd) == BPF_FS_MAGIC:
            return None
    except OSError:
        return None
    finally:
        os.close(fd)
    return where, (f"no bpf filesystem is mounted at {where} (the pin root {root} "
                   f"{'is not on one' if where == os.path.abspath(root) else 'is below it'}"
                   "): every pin there is gone")


def bpffs_fix(where: str) -> str:
    """What an operator does about bpffs_missing()."""
    # mode=0700 as systemd mounts it: a bare mount is 1777 (anyone may create under it)
    # until the apply's tmpfiles makes it 0711.
    return (f"mount it (`mount -t bpf -o mode=0700 bpf {where}`), then `systemctl restart "
            "loaderd` (the apply loads every spec again; a restart also gives the resident "
            "back its read-only view)")


def check_bpffs_mounted(root: str) -> None:
    """Refuse an apply, before it changes anything, when no bpffs holds the pin root."""
    missing = bpffs_missing(root)
    if missing is not None:
        # The fix is no "allowed" value: said as `fix:`, as drift and status say it.
        raise _err(f"{missing[1]}; fix: {bpffs_fix(missing[0])}", root)


# --- layout -----------------------------------------------------------------------------------

class PinLayout:
    """Pin paths under one root, built only from names in the strict alphabet."""

    def __init__(self, root: str) -> None:
        comps = _components(root)
        if not comps:
            raise _err("bpffs root must not be /", root)
        self.root = root

    @property
    def staging_root(self) -> str:
        return os.path.join(self.root, STAGING)

    def staging_dir(self, txid: str) -> str:
        return os.path.join(self.staging_root, check_txid(txid))

    def staging(self, txid: str) -> PinLayout:
        """The same layout rooted at <root>/_staging/<txid>."""
        return PinLayout(self.staging_dir(txid))

    def spec_dir(self, spec: str) -> str:
        return os.path.join(self.root, check_name(spec, "spec name"))

    def staging_spec(self, txid: str, spec: str) -> str:
        return os.path.join(self.staging_dir(txid), check_name(spec, "spec name"))

    def join(self, base: str, *names: str) -> str:
        """`base` (a path under the root) joined with checked names, e.g. join(d, "maps", m)."""
        _components(self._confine(base))
        return os.path.join(base, *(check_name(n) for n in names))

    def kind_dir(self, spec: str, kind: str) -> str:
        if kind not in KINDS:
            raise LoaderdError(Kind.PIN, "invalid pin kind", value=kind, allowed=", ".join(KINDS))
        return os.path.join(self.spec_dir(spec), kind)

    def prog_path(self, spec: str, name: str) -> str:
        return os.path.join(self.kind_dir(spec, "progs"), check_name(name, "program name"))

    def map_path(self, spec: str, name: str) -> str:
        return os.path.join(self.kind_dir(spec, "maps"), check_name(name, "map name"))

    def link_path(self, spec: str, name: str) -> str:
        return os.path.join(self.kind_dir(spec, "links"), check_name(name, "link name"))

    def contains(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")

    def _confine(self, path: str) -> str:
        if not self.contains(path):
            raise _err("path is outside the bpffs root", path, allowed=f"under {self.root}")
        return path

    # The module-level operations, additionally confined to this root.
    def ensure_dir(self, path: str, mode: int = 0o755) -> None:
        ensure_dir(self._confine(path), mode)

    def pin(self, fd: int, path: str, mode: int = 0o600, gid: int | None = None) -> None:
        pin(fd, self._confine(path), mode, gid)

    def get(self, path: str, *, rdonly: bool = False, wronly: bool = False) -> int:
        return get(self._confine(path), rdonly=rdonly, wronly=wronly)

    def exists(self, path: str) -> bool:
        return exists(self._confine(path))

    def remove_tree(self, path: str) -> None:
        remove_tree(self._confine(path))

    def rename(self, src: str, dst: str) -> None:
        rename(self._confine(src), self._confine(dst))

    def exchange(self, a: str, b: str) -> None:
        exchange(self._confine(a), self._confine(b))

    def list_tree(self, path: str) -> list[str]:
        return list_tree(self._confine(path))

    def children(self, path: str) -> list[str]:
        return children(self._confine(path))

    def conform_pins(self, path: str, mode: int, gid: int | None,
                     modes: Mapping[str, int] | None = None) -> list[str]:
        return conform_pins(self._confine(path), mode, gid, modes)

    def check(self) -> None:
        """Refuse a root that is missing, reached through a symlink or not on bpffs."""
        check_bpffs_dir(self.root)

    def publish(self, txid: str, spec: str) -> bool:
        """Make the staged <spec> live: exchange with the live directory if there is one (the
        old one lands in staging), else move it in. True if something was replaced."""
        staged, live = self.staging_spec(txid, spec), self.spec_dir(spec)
        if exists(live):
            exchange(staged, live)
            return True
        rename(staged, live)
        return False
