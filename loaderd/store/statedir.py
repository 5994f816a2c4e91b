"""The manifest of what is applied, and the generations kept for rollback.

`<state_dir>/manifest.json` is the single source of truth for adopt-on-restart, crash recovery
and drift detection. It is written atomically (temp file, fsync, rename, fsync dir), so a crash
leaves either the old or the new manifest. `status: pending` marks a commit in progress: recovery
rolls it forward. Each committed apply copies its spec files into `generations/<txid>/` so a
rollback re-applies exactly what was running before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import NAME_RE
from loaderd.store import manifest as records
from loaderd.store.manifest import Manifest

MANIFEST = "manifest.json"
LOCK = "lock"  # flock()ed by whoever changes pins or the manifest (apply, rollback, disable)
GENERATIONS = "generations"
# The last refused apply (what /etc says is not what is applied): written by a refused apply,
# removed by the next one that goes through. The resident puts it in STATUS=, status reports it.
REFUSED = "refused.json"
SETTINGS_SEEN = "settings.json"  # the settings the last apply saw (sha256, summary)
SETTINGS_SEEN_MAX_BYTES = 256 * 1024
REFUSED_MAX_BYTES = 4096
# A rollback that holds: which generation, since when, and the content hash of programs_dir at
# that moment. Applies re-apply that generation (not /etc) until /etc changes or it is released.
HOLD = "rollback.json"
# Written by an apply or rollback when it takes the lock, removed when it ends (committed or
# refused). Still there with the lock free: that apply was killed (SIGKILL, MemoryMax=, a
# crash) before it finished; the resident says so instead of a plain "N specs applied".
APPLYING = "applying.json"
REASON_MAX = 300
KEEP_GENERATIONS = 5
# The resident's event counters (records read, dropped over the rate limit, lost by the
# kernel, stale backlog) since it started: written by the resident (no capability), read by
# `loaderd status` as untrusted input.
EVENTS = "events.json"
EVENTS_MAX_BYTES = 64 * 1024
EVENTS_MAX_MAPS = 256


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: on a filesystem that fills up, write() writes
    what fits and returns the count, and only the next call fails with ENOSPC. A single
    unchecked write left a truncated file, renamed over the manifest as if whole."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def no_space(exc: OSError, path: str, what: str) -> LoaderdError:
    """A write in the state dir failed (ENOSPC, EDQUOT, EIO): the path and the errno, said."""
    name = errno.errorcode.get(exc.errno or 0, "error")
    return LoaderdError(Kind.STATE, f"cannot write {what}: {exc.strerror or exc} ({name})",
                        Location(path), allowed="free space on the state directory's "
                        "filesystem (df " + os.path.dirname(path) + "), then apply again")


def _write_atomic(path: str, data: bytes, gid: int = -1, uid: int = -1) -> None:
    """Whole or not at all: the temp file is removed when any step fails, and the old file
    stays (a LoaderdError naming the path and errno)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
        try:
            os.fchmod(fd, 0o640 if gid >= 0 else 0o600)  # readers' group may read it
            if gid >= 0 or uid >= 0:
                os.fchown(fd, uid, gid)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
            raise
        raise no_space(exc, path, os.path.basename(path)) from None
    dfd = os.open(os.path.dirname(path) or ".", os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def service_uid(state_dir: str) -> int:
    """The state dir's owner when root acts for a service user (e.g. `loaderd rollback` run by
    an operator while the units run as `loaderd`): what root writes must stay that user's, or
    the service could no longer replace it. -1: no ownership change."""
    if os.geteuid() != 0:
        return -1
    try:
        uid = os.stat(state_dir).st_uid
    except FileNotFoundError:
        return -1
    return uid if uid != 0 else -1


@dataclasses.dataclass(frozen=True)
class Refusal:
    at: float  # time.time() of the refusal
    errors: int
    reason: str  # the first error, one line, at most REASON_MAX characters

    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at))

    def sentence(self) -> str:
        more = f" (and {self.errors - 1} more)" if self.errors > 1 else ""
        return f"last apply REFUSED at {self.when()}: {self.reason}{more}"


@dataclasses.dataclass(frozen=True)
class Hold:
    generation: str  # the txid whose files are applied instead of programs_dir
    at: float  # time.time() of the rollback
    programs_sha256: str  # tree_digest(programs_dir) when it was rolled back

    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at))

    def sentence(self, etc_changed: bool | None) -> str:
        """For status and STATUS=: which generation, since when, whether /etc moved on since,
        and how to get out of it."""
        etc = {None: "", True: "; programs_dir changed since: the next apply releases it",
               False: "; programs_dir differs (unchanged since)"}[etc_changed]
        return (f"rolled back to generation {self.generation} since {self.when()}{etc}; "
                "release with `loaderd rollback --release`")


def tree_digest(root: str, max_files: int | None = None) -> str:
    """sha256 over every entry under `root`: relative name, kind, owner and mode (trust facts
    are inputs too), a file's bytes, a symlink's text (never followed). What "the operator
    changed /etc" means for a rollback hold and for a plan's freshness. An unreadable or
    missing directory has its own digest (so it counts as a change); more than `max_files`
    entries is a LIMIT error."""
    h = hashlib.sha256()
    count = 0
    try:
        for dirpath, dirs, files in os.walk(root, onerror=None, followlinks=False):
            dirs.sort()
            h.update(f"d\0{os.path.relpath(dirpath, root)}\0".encode(errors="surrogateescape"))
            for name in sorted(files + [d for d in dirs
                                        if os.path.islink(os.path.join(dirpath, d))]):
                count += 1
                if max_files is not None and count > max_files:
                    raise LoaderdError(Kind.LIMIT, "too many files", Location(root),
                                       allowed=f"<= {max_files}")
                path = os.path.join(dirpath, name)
                h.update(f"f\0{os.path.relpath(path, root)}\0".encode(errors="surrogateescape"))
                with contextlib.suppress(OSError):
                    _hash_entry(h, path)
    except OSError as exc:
        h.update(f"error\0{exc.errno}".encode())
    return h.hexdigest()


def _hash_entry(h: Any, path: str) -> None:
    st = os.lstat(path)
    h.update(f"{st.st_uid}:{st.st_mode:o}\0".encode())
    if stat.S_ISLNK(st.st_mode):
        h.update(b"l\0" + os.readlink(path).encode(errors="surrogateescape"))
        return
    if not stat.S_ISREG(st.st_mode):
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 16):  # in chunks: a huge file costs time, not memory
            h.update(chunk)
    finally:
        os.close(fd)


def _sane_time(at: Any) -> bool:
    """A Unix time a record of ours can carry (finite, after 1970, before year 5138)."""
    return (isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at)
            and 0 <= at < 1e11)


def _read_record(path: str, owners: frozenset[int] | None = None,
                 max_bytes: int = REFUSED_MAX_BYTES) -> Any:
    """A small JSON record loaderd wrote, read as untrusted input: a plain file (no symlink, no
    FIFO), bounded, owned by `owners` and not group/other-writable when given; None when absent
    or not such a file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return None
        if owners is not None and (st.st_uid not in owners or st.st_mode & 0o022):
            return None
        return json.loads(os.read(fd, max_bytes + 1))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)


def read_hold(path: str, owners: frozenset[int]) -> Hold | None:
    """The hold record (untrusted input, like the refusal record); None when absent or not a
    record loaderd wrote. It decides what the next apply loads, so only a file owned by
    `owners` (root, the state dir's service user) counts."""
    d = _read_record(path, owners)
    try:
        gen, at, digest = d["generation"], d["at"], d["programs_sha256"]
    except (KeyError, TypeError, IndexError):
        return None
    if not (isinstance(gen, str) and records.TXID.fullmatch(gen)
            and _sane_time(at) and isinstance(digest, str)):
        return None
    return Hold(gen, float(at), digest)


@dataclasses.dataclass(frozen=True)
class EventCount:
    """One event map's records since the resident started."""

    spec: str
    map: str
    read: int
    dropped: int  # over limits.max_event_rate: consumed, not journaled
    lost: int = 0  # samples the kernel lost (a perf_event_array's per-CPU ring was full)
    backlog: int = 0  # records already waiting in a ring buffer when its reader attached


@dataclasses.dataclass(frozen=True)
class EventCounts:
    at: float  # time.time() of the write
    pid: int  # the resident that wrote it
    maps: tuple[EventCount, ...]


_COUNT_FIELDS = ("read", "dropped", "lost", "backlog")


def _count(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 63


def read_event_counts(path: str, owners: frozenset[int]) -> EventCounts | None:
    """The resident's counters file (untrusted: a plain file owned by `owners`, not group or
    world writable, bounded, of exactly the shape written); None when absent or not one."""
    d = _read_record(path, owners, EVENTS_MAX_BYTES)
    try:
        if not isinstance(d, dict) or set(d) != {"at", "pid", "maps"}:
            return None
        at, pid, maps = d["at"], d["pid"], d["maps"]
        if (not _sane_time(at) or type(pid) is not int or not 0 < pid < 1 << 22
                or not isinstance(maps, list) or len(maps) > EVENTS_MAX_MAPS):
            return None
        out = []
        for m in maps:
            if (not isinstance(m, dict) or set(m) != {"spec", "map", *_COUNT_FIELDS}
                    or not all(isinstance(m[k], str) and NAME_RE.fullmatch(m[k])
                               for k in ("spec", "map"))
                    or not all(_count(m[k]) for k in _COUNT_FIELDS)):
                return None
            out.append(EventCount(m["spec"], m["map"], *(m[k] for k in _COUNT_FIELDS)))
        return EventCounts(float(at), pid, tuple(out))
    except (KeyError, TypeError):
        return None


def one_line(text: str, limit: int = REASON_MAX) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def read_refusal(path: str) -> Refusal | None:
    """The refusal record (untrusted input: a plain file, bounded, typed); None when absent or
    not a record loaderd wrote (a status line is no place for a parse error)."""
    d = _read_record(path)
    try:
        at, errors, reason = d["at"], d["errors"], d["reason"]
    except (KeyError, TypeError, IndexError):
        return None
    if not (_sane_time(at) and isinstance(errors, int) and isinstance(reason, str)):
        return None
    return Refusal(float(at), errors, one_line(reason))


class State:
    def __init__(self, state_dir: str, gid: int = -1, pin_root: str | None = None) -> None:
        """gid: the pin readers' group (settings.pins), which may read the manifest so that
        `loaderctl status` works for them without privileges; -1 keeps it private."""
        self.dir = state_dir
        self.pin_root = pin_root  # every spec's pin_dir must be <pin_root>/<spec>
        self.gid = gid
        self.uid = service_uid(state_dir)

    def _ensure_dirs(self) -> None:
        """Made by the first writer, not by readers (status as a non-root user)."""
        try:
            if not os.path.isdir(self.dir):
                os.makedirs(self.dir, mode=0o750)
            # Generations hold copies of the spec files: private to loaderd.
            os.makedirs(os.path.join(self.dir, GENERATIONS), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise LoaderdError(Kind.STATE, f"cannot create the state directory: "
                               f"{exc.strerror}", Location(exc.filename or self.dir),
                               allowed="run as root or as the service user (the state "
                               "directory's owner)") from None

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.dir, MANIFEST)

    def manifest(self) -> Manifest:
        """The manifest as typed, validated records (untrusted input: see store.manifest)."""
        return records.read(self.manifest_path, self.pin_root) or records.EMPTY

    def save(self, m: Manifest) -> Manifest:
        """Write `m` atomically, stamped with the time; returns what was written."""
        self._ensure_dirs()
        m = dataclasses.replace(m, written_at=time.time())
        _write_atomic(self.manifest_path,
                      json.dumps(records.to_dict(m), indent=1, sort_keys=True).encode(),
                      self.gid, self.uid)
        return m

    def manifest_misfit(self) -> str | None:
        """Why the manifest file is not as save() writes it (owner, group, mode: e.g. root's
        0600 from an apply by hand before the package), or None when it is (or is absent)."""
        try:
            st = os.stat(self.manifest_path, follow_symlinks=False)
        except OSError:
            return None
        want_mode = 0o640 if self.gid >= 0 else 0o600
        want_uid = self.uid if self.uid >= 0 else os.geteuid()
        if (stat.S_IMODE(st.st_mode) == want_mode and st.st_uid == want_uid
                and (self.gid < 0 or st.st_gid == self.gid)):
            return None
        return (f"it was uid {st.st_uid} gid {st.st_gid} mode "
                f"{stat.S_IMODE(st.st_mode):04o}, not uid {want_uid}"
                + (f" gid {self.gid}" if self.gid >= 0 else "") + f" mode {want_mode:04o}")

    @property
    def refused_path(self) -> str:
        return os.path.join(self.dir, REFUSED)

    def refusal(self) -> Refusal | None:
        return read_refusal(self.refused_path)

    def save_refusal(self, errors: int, reason: str) -> None:
        """Best effort: the refusal is journaled whatever happens here."""
        record = {"at": time.time(), "errors": errors, "reason": one_line(reason)}
        with contextlib.suppress(OSError, LoaderdError):
            self._ensure_dirs()
            _write_atomic(self.refused_path, json.dumps(record, sort_keys=True).encode(),
                          self.gid, self.uid)

    def settings_seen(self) -> tuple[str, dict[str, Any]] | None:
        """(sha256, summary) of the settings the last apply saw; None when absent or not a
        record loaderd wrote (untrusted: it only feeds the change summary, never a decision)."""
        path = os.path.join(self.dir, SETTINGS_SEEN)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            d = json.loads(os.read(fd, SETTINGS_SEEN_MAX_BYTES + 1))
            sha, summary = d["sha256"], d["summary"]
            if not isinstance(sha, str) or not isinstance(summary, dict) or not all(
                    isinstance(v, str) or (isinstance(v, list)
                                           and all(isinstance(x, str) for x in v))
                    for v in summary.values()):
                return None
            return sha, summary
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        finally:
            os.close(fd)

    def save_settings_seen(self, sha256: str, summary: Mapping[str, Any]) -> None:
        """Best effort: the change is journaled whatever happens here."""
        with contextlib.suppress(OSError, LoaderdError):
            self._ensure_dirs()
            _write_atomic(os.path.join(self.dir, SETTINGS_SEEN), json.dumps(
                {"sha256": sha256, "summary": summary}, sort_keys=True).encode(),
                self.gid, self.uid)

    @property
    def events_path(self) -> str:
        return os.path.join(self.dir, EVENTS)

    def save_event_counts(self, counts: EventCounts) -> None:
        """Atomically, readable by the pin readers' group like the manifest (loaderctl
        status); raises LoaderdError (ENOSPC...) for the caller to say once."""
        _write_atomic(self.events_path, json.dumps(
            {"at": counts.at, "pid": counts.pid,
             "maps": [dataclasses.asdict(m) for m in counts.maps[:EVENTS_MAX_MAPS]]},
            sort_keys=True).encode(), self.gid, self.uid)

    def event_counts(self) -> EventCounts | None:
        return read_event_counts(self.events_path, self.owners)

    def clear_refusal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.refused_path)

    @property
    def hold_path(self) -> str:
        return os.path.join(self.dir, HOLD)

    def hold(self) -> Hold | None:
        return read_hold(self.hold_path, self.owners)

    @property
    def owners(self) -> frozenset[int]:
        """Who may own the state loaderd acts on: root and the state dir's service user."""
        return frozenset({0, self.uid}) if self.uid >= 0 else frozenset({0, os.geteuid()})

    def save_hold(self, hold: Hold) -> None:
        """Owned by the service user whoever writes it (the apply unit reads it as that user)."""
        self._ensure_dirs()
        _write_atomic(self.hold_path, json.dumps(dataclasses.asdict(hold), sort_keys=True
                                                 ).encode(), self.gid, self.uid)

    def clear_hold(self) -> bool:
        try:
            os.unlink(self.hold_path)
            return True
        except FileNotFoundError:
            return False

    @property
    def applying_path(self) -> str:
        return os.path.join(self.dir, APPLYING)

    def mark_applying(self) -> None:
        """Best effort (a full disk refuses the apply later, and says so)."""
        record = {"at": time.time(), "pid": os.getpid()}
        with contextlib.suppress(OSError, LoaderdError):
            _write_atomic(self.applying_path, json.dumps(record).encode(), self.gid, self.uid)

    def clear_applying(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.applying_path)

    def interrupted(self) -> float | None:
        """When an apply that did not finish started (its marker is left and nobody holds the
        lock), else None."""
        try:
            fd = os.open(self.applying_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > REFUSED_MAX_BYTES:
                return None
            at = json.loads(os.read(fd, REFUSED_MAX_BYTES + 1)).get("at")
        except (OSError, ValueError, AttributeError, RecursionError):
            return None
        finally:
            os.close(fd)
        if not _sane_time(at):
            return None
        with self.quiet() as quiet:
            return float(at) if quiet else None

    # One writer at a time: an operator's `loaderd apply` during `systemctl reload` would
    # otherwise delete the other's staging pins (recovery clears staging) or its manifest.
    @contextlib.contextmanager
    def exclusive(self, timeout: float = 300.0,
                  waiting: Callable[[str], None] | None = None) -> Iterator[None]:
        self._ensure_dirs()
        path = os.path.join(self.dir, LOCK)
        try:  # O_NONBLOCK: a FIFO planted as the lock must not hang the open
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            raise LoaderdError(Kind.STATE, f"cannot open the state lock: {exc.strerror}",
                               Location(path), allowed="run as root or as the service user "
                               "(the state directory's owner)") from None
        try:
            st = os.fstat(fd)
            # Root truncates and chowns this file: only a plain, singly linked one (a hard link
            # to some other file would hand that file over).
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise LoaderdError(Kind.STATE, "the state lock is not a plain file",
                                   Location(path), allowed="remove it; loaderd recreates it")
            if self.uid >= 0:
                os.fchown(fd, self.uid, -1)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    if time.monotonic() > deadline:
                        raise LoaderdError(Kind.STATE, f"another loaderd (pid {holder}) is "
                                           f"changing the applied set; gave up after "
                                           f"{timeout:.0f} s", Location(path)) from None
                    if waiting:
                        waiting(f"waiting for loaderd pid {holder} to finish")
                        waiting = None
                    time.sleep(0.1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def quiet(self) -> Iterator[bool]:
        """A shared hold on the lock for a reader (the daemon's drift check): yields False,
        without waiting, while a writer is at work (pins half-swapped are not drift)."""
        try:
            fd = os.open(os.path.join(self.dir, LOCK),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:  # no lock file (nobody applied yet) or unreadable: check anyway
            yield True
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # Generations: copies of the applied spec files, newest last.
    def generation_dir(self, txid: str) -> str:
        return os.path.join(self.dir, GENERATIONS, txid)

    def _generations_fd(self, *, create: bool) -> int | None:
        """An fd of <state_dir>/generations, a real directory (never through a symlink: the
        service user can replace it, and pruning through one removed every directory of the
        target, measured with `generations -> /root/victimdir`); None if absent and not
        `create`. Everything below it is reached relative to this fd, never by path."""
        if create:
            self._ensure_dirs()
        path = os.path.join(self.dir, GENERATIONS)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as exc:
            raise LoaderdError(Kind.STATE, f"the generations directory is not a directory "
                               f"({exc.strerror}): a symlink is refused", Location(path),
                               allowed="remove it; loaderd recreates it") from None
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid(), self.uid) or st.st_mode & 0o022:
            os.close(fd)
            raise LoaderdError(Kind.STATE, "the generations directory is not loaderd's (owner "
                               f"uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
                               Location(path), allowed="remove it; loaderd recreates it")
        return fd

    def save_generation(self, txid: str, files: dict[str, bytes]) -> None:
        """files: relative name -> the exact bytes that were applied."""
        gfd = self._generations_fd(create=True)
        assert gfd is not None
        made: list[int] = []
        try:
            try:
                self._copy_generation(gfd, txid, files, made)
            except OSError as exc:
                # A partial copy is no generation: a rollback to it would apply half a set.
                shutil.rmtree(txid, dir_fd=gfd, ignore_errors=True)
                raise no_space(exc, self.generation_dir(txid), f"generation {txid}") from None
            for old in _txids(gfd)[:-KEEP_GENERATIONS]:
                # fd-based: a symlink swapped in for a generation is refused, not followed
                shutil.rmtree(old, dir_fd=gfd, ignore_errors=True)
        finally:
            for fd in [*made, gfd]:
                os.close(fd)

    def _copy_generation(self, gfd: int, txid: str, files: dict[str, bytes], made: list[int]
                         ) -> None:
        """The generation's files, each written whole; raises OSError (the caller cleans)."""
        made.append(_mkdir_at(gfd, txid))
        for rel, data in files.items():
            *dirs, name = rel.split("/")
            dfd = os.dup(made[0])
            try:
                for part in dirs:
                    sub = _mkdir_at(dfd, part)
                    made.append(os.dup(sub))
                    os.close(dfd)
                    dfd = sub
                _write_at(dfd, name, data, self.uid)
            finally:
                os.close(dfd)
        if self.uid >= 0:
            for fd in made:
                os.fchown(fd, self.uid, -1)

    def generations(self) -> list[str]:
        """Generation txids, oldest first: real directories with loaderd's txid names only,
        owned by root or the service user (a rollback trusts the specs in it as theirs)."""
        gfd = self._generations_fd(create=False)
        if gfd is None:
            return []
        try:
            return _txids(gfd, self.owners)
        finally:
            os.close(gfd)


def _txids(gfd: int, owners: frozenset[int] | None = None) -> list[str]:
    out = []
    for name in os.listdir(gfd):
        if records.TXID.fullmatch(name):
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=gfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and (owners is None or st.st_uid in owners):
                    out.append(name)
    return sorted(out)  # txids sort by time


def _mkdir_at(dfd: int, name: str) -> int:
    """An fd of directory `name` in `dfd` (made 0700 if missing), never through a symlink."""
    if name in ("", ".", "..") or "/" in name:
        raise ValueError(f"not a plain name: {name!r}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=dfd)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=dfd)


def _write_at(dfd: int, name: str, data: bytes, uid: int) -> None:
    """`name` in `dfd` atomically, mode 0600 (temp file, fsync, rename), no symlink followed."""
    tmp = f"{name}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dfd)
    try:
        os.fchmod(fd, 0o600)
        if uid >= 0:
            os.fchown(fd, uid, -1)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
