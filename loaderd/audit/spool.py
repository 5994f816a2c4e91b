"""Where audit events go while journald is unreachable, and how they reach it afterwards.

journald stopped (or its sockets gone) made `journal.send` fail, and the fallback, stderr, is a
stream *to journald* under systemd: the events of an apply or of the resident were lost. Now a
failed send appends the entry's exact journal fields as one JSON line to
`<state_dir>/journal-spool.jsonl` (the state dir is the one place both units may write): whole
lines only (flock, every byte written, fsync; a short write is cut back), bounded
(MAX_BYTES: further events are counted as dropped), never through a symlink, a FIFO or a hard
link. The resident replays the file once journald accepts a connection again, each entry marked
LOADERD_REPLAYED=1 with LOADERD_SPOOLED_AT (when it happened), and says the backlog in STATUS=
meanwhile.

Replay renames the file first, so writers that come later start a new one; a writer that
opened the old name before the rename sees, once it holds the lock, that the name is no longer
its file and opens it again. A replay cut short (journald gone again) puts the rest back; one
killed mid-way leaves `.replaying`, replayed first next time (at least once, never lost).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any

SPOOL = "journal-spool.jsonl"
MAX_BYTES = 4 * 1024 * 1024  # about 4,000 events: a journald outage is not a log store
LINE_MAX = 64 * 1024  # one entry (a traceback is capped at 16 KiB by emit)
REPLAYED = "LOADERD_REPLAYED"
SPOOLED_AT = "LOADERD_SPOOLED_AT"  # microseconds since the epoch, as journald's timestamps
SPOOL_ERROR = "LOADERD_SPOOL_ERROR"  # why journal.send failed
# Who spooled it: the replay comes from the resident (its _PID, _SYSTEMD_UNIT), these say
# which process and unit (loaderd-apply.service) the event was its.
SPOOLED_PID = "LOADERD_SPOOLED_PID"
SPOOLED_UNIT = "LOADERD_SPOOLED_UNIT"


@dataclasses.dataclass(frozen=True)
class Backlog:
    """What the spool holds: for STATUS= and `status`."""
    path: str
    events: int
    since: float  # time.time() of the oldest spooled event

    def sentence(self, dropped: int = 0) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        more = f" ({dropped} more dropped: spool full)" if dropped else ""
        return (f"journald unreachable since {when}: {self.events} "
                f"event{'s' if self.events != 1 else ''} in {self.path}{more}")


@dataclasses.dataclass(frozen=True)
class Replayed:
    events: int
    since: float
    until: float
    skipped: int  # lines that were not an entry of ours (torn, foreign, oversized)
    left: int  # put back: journald went away again during the replay
    dropped: int  # this process's events that found the spool full (counted since)


def _usec() -> str:
    return str(time.time_ns() // 1000)


def _unit() -> str:
    """This process's systemd unit (its cgroup's last component), "" outside one."""
    try:
        with open("/proc/self/cgroup") as f:
            name = f.read().strip().splitlines()[-1].rpartition("/")[2]
    except (OSError, IndexError):
        return ""
    return name if name.endswith((".service", ".scope")) else ""


def journal_reachable(path: str) -> bool:
    """journald is bound to its socket (a connect, no message): the test before a replay."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _owner_of(directory: str) -> int:
    """Root writing for the service user (an operator's `loaderd disable`): the spool stays
    the state dir owner's, or the resident could neither read nor remove it."""
    if os.geteuid() != 0:
        return -1
    try:
        uid = os.stat(directory).st_uid
    except OSError:
        return -1
    return uid if uid != 0 else -1


def _trusted(st: os.stat_result, directory: str) -> bool:
    """A plain file of root's, ours or the state dir owner's, writable by nobody else."""
    try:
        owner = os.stat(directory).st_uid
    except OSError:
        owner = 0
    return (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and not st.st_mode & 0o022
            and st.st_uid in (0, os.geteuid(), owner))


def _entry(line: bytes) -> dict[str, Any] | None:
    """One spooled line back as journal fields, or None when it is not one of ours (the file
    is state: untrusted like the manifest)."""
    if len(line) > LINE_MAX:
        return None
    try:
        d = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get("MESSAGE"), str):
        return None
    out: dict[str, Any] = {}
    for k, v in d.items():
        if not (isinstance(k, str) and k and k.isascii() and k[0].isalpha()
                and all(c.isupper() or c.isdigit() or c == "_" for c in k) and len(k) <= 64):
            return None
        if isinstance(v, bool) or not isinstance(v, str | int):
            return None
        out[k] = v
    return out


class Spool:
    def __init__(self, path: str, known: frozenset[tuple[str, str]] | None = None) -> None:
        """known: the (MESSAGE_ID, PRIORITY) pairs loaderd's events have; a line with another
        is not replayed (whoever can write the state dir must not launder an alert's id or
        priority into the journal under loaderd's name). None: any (counting only)."""
        self.path = path
        self.known = known
        self.replaying = path + ".replaying"
        self.unit = _unit()
        self.dropped = 0  # this process's events that did not fit (or could not be written)
        self._ident: tuple[tuple[int, int, int], ...] | None = None
        self._backlog: Backlog | None = None

    # -- writers (any loaderd process) --------------------------------------------------------

    def append(self, fields: Mapping[str, Any], why: str) -> bool:
        """One entry, whole or not at all; False (counted in dropped) when it could not be."""
        record = {**fields, SPOOLED_AT: _usec(), SPOOL_ERROR: why,
                  SPOOLED_PID: str(os.getpid()), SPOOLED_UNIT: self.unit}
        line = json.dumps(record, sort_keys=True, default=str).encode() + b"\n"
        if len(line) > LINE_MAX or not self._write(line):
            self.dropped += 1
            return False
        return True

    def _write(self, data: bytes) -> bool:
        for _ in range(4):  # a replay renamed the file under us: a new one is opened
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            except OSError:
                return False
            try:
                st = os.fstat(fd)
                if not _trusted(st, os.path.dirname(self.path)):
                    return False
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    now = os.stat(self.path, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    continue
                size = os.fstat(fd).st_size
                if size + len(data) > MAX_BYTES:
                    return False
                if st.st_uid == 0 and (owner := _owner_of(os.path.dirname(self.path))) >= 0:
                    os.fchown(fd, owner, -1)
                try:
                    view = memoryview(data)
                    while view:  # write() writes what fits; only the next call says ENOSPC
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)  # never a torn line
                    return False
                return True
            except OSError:
                return False
            finally:
                os.close(fd)
        return False

    # -- the resident -----------------------------------------------------------------------

    def backlog(self) -> Backlog | None:
        """The spooled events (both files), read again only when they changed."""
        idents = []
        for p in (self.replaying, self.path):
            try:
                st = os.stat(p, follow_symlinks=False)
                idents.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                pass
        if not idents:
            self._ident, self._backlog = None, None
            return None
        ident = tuple(idents)
        if ident == self._ident:
            return self._backlog
        events, since = 0, None
        for p in (self.replaying, self.path):
            for entry in self._read(p)[0]:
                events += 1
                at = int(entry.get(SPOOLED_AT, 0) or 0) / 1e6
                since = at if since is None else min(since, at)
        self._ident = ident
        self._backlog = None if not events else Backlog(self.path, events, since or 0.0)
        return self._backlog

    def _read(self, path: str, lock: bool = False) -> tuple[list[dict[str, Any]], int]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return [], 0
        try:
            if not _trusted(os.fstat(fd), os.path.dirname(path)):
                return [], 0
            if lock:  # a writer that opened it before the rename finishes its line first
                fcntl.flock(fd, fcntl.LOCK_EX)
            data = b""
            while len(data) <= MAX_BYTES + LINE_MAX and (chunk := os.read(fd, 1 << 16)):
                data += chunk
        except OSError:
            return [], 0
        finally:
            os.close(fd)
        entries, skipped = [], 0
        for line in data.splitlines():
            entry = _entry(line)
            if entry is not None and (not str(entry.get(SPOOLED_AT, "")).isdigit() or (
                    self.known is not None and (str(entry.get("MESSAGE_ID")),
                                                str(entry.get("PRIORITY"))) not in self.known)):
                entry = None  # not a line append() wrote for one of loaderd's events
            if entry is None:
                skipped += 1
            else:
                entries.append(entry)
        return entries, skipped

    def replay(self, send: Callable[..., None]) -> Replayed | None:
        """Send every spooled entry (journald must be reachable: journal_reachable()), marked
        as replayed; None when there was nothing to send."""
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(os.lstat(self.replaying).st_mode):
                # not one we renamed (a planted directory or link would stop every replay
                # for good): set aside under a name of its own, kept for whoever looks
                os.rename(self.replaying, f"{self.replaying}.refused.{time.time_ns()}")
        if not os.path.lexists(self.replaying):
            try:
                os.rename(self.path, self.replaying)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    return None
        entries, skipped = self._read(self.replaying, lock=True)
        sent, since, until = 0, None, None
        for i, entry in enumerate(entries):
            at = int(entry.get(SPOOLED_AT, 0) or 0) / 1e6
            try:
                send(**{**entry, REPLAYED: "1"})
            except OSError:
                for rest in entries[i:]:  # journald went away again: keep them
                    self._write(json.dumps(rest, sort_keys=True).encode() + b"\n")
                break
            sent += 1
            since = at if since is None else min(since, at)
            until = at if until is None else max(until, at)
        with contextlib.suppress(OSError):
            os.unlink(self.replaying)
        self._ident = None
        dropped, self.dropped = self.dropped, 0
        if not sent and not skipped and not dropped:
            return None
        return Replayed(sent, since or 0.0, until or 0.0, skipped, len(entries) - sent, dropped)
