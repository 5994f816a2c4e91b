"""Journal the events of ring buffers and perf event arrays whose spec declares
`events: {layout: ...}`.

Runs inside the resident daemon (no capabilities: it opens the pins it owns). Every record is
decoded by the declared layout, sanitized (IPs masked, ids pseudonymized with the daemon's HMAC
key, secrets redacted) and journaled as one BPF_EVENT. Records over `limits.max_event_rate` are
consumed, so the producer never stalls, and counted: an EVENTS_DROPPED event reports them.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

from loaderd import sanitize
from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import btf, handover, kernel
from loaderd.errors import Kind, LoaderdError, Location, plural
from loaderd.layout import Field, enum_names, layout_end, parse_layout
from loaderd.model import Settings
from loaderd.observe.metrics import RingCount
from loaderd.runtime import perfbuf, ringbuf
from loaderd.runtime.records import Records
from loaderd.store.manifest import Manifest

# Records taken from one ring per pump(): a flood (or a producer faster than the journal) must
# not keep the daemon from its watchdog ping and signals; the next loop turn takes the rest.
MAX_PER_PUMP = 4096
# A record's fields in its message: json.dumps(fields, default=str, sort_keys=True)
_MESSAGE = audit.sorted_json()


@dataclass
class _Ring:
    spec: str
    map: str
    fd: int
    map_id: int
    reader: ringbuf.RingBuffer | perfbuf.PerfBuffer
    records: Records  # the layout's records -> sanitized fields
    limit: ringbuf.RateLimit
    reported: int = 0
    read: int = 0  # records consumed (journaled + dropped by the rate limit)
    lost_reported: int = 0

    @property
    def end(self) -> int:
        """Where the layout ends (perf samples carry the kernel's alignment padding)."""
        return self.records.end if isinstance(
            self.reader, perfbuf.PerfBuffer) else 0


_PERF_NO_CAPS = ("a perf_event_array is read through CPU-wide perf events, which need "
                 "CAP_PERFMON to open: loaderd-apply hands them to the resident after every "
                 "apply (through loaderd-handover.socket); none has arrived for this map yet")
MAX_PENDING = 256  # handed-over maps kept for a manifest not re-read yet


class EventPump:
    def __init__(self, settings: Settings, handover_sock: socket.socket | None = None) -> None:
        self.rate = settings.policy.limits.max_event_rate
        self.clean = sanitize.Sanitizer(sanitize.load_key(settings.state_dir), settings.sanitize)
        self.rings: list[_Ring] = []
        self.enums: dict[str, dict[int, str]] = {}
        self.sock = handover_sock
        # The uids a handover may come from (kernel-verified): root, and the resident's user
        # (the apply unit runs as it).
        self.owners = frozenset({0, os.geteuid()})
        self.pending: dict[tuple[str, str], handover.PerfEvents] = {}
        self.unread: dict[tuple[str, str], str] = {}  # event maps without a reader: why
        self.manifest: Manifest | None = None
        self.changed = False  # a counter other than `read` moved since the daemon last looked

    def _receive(self) -> bool:
        """Take the perf events loaderd-apply handed over; True when any arrived."""
        if self.sock is None:
            return False
        got = handover.receive(self.sock, self.owners)
        for why in got.refused:
            audit.emit(Event.DEGRADED, f"perf event handover refused: {why} (its fds closed)",
                       reason="perf handover refused")
        for item in got.items:
            old = self.pending.pop((item.spec, item.map), None)
            if old is not None:
                old.close()
            self.pending[(item.spec, item.map)] = item
        while len(self.pending) > MAX_PENDING:
            self.pending.pop(next(iter(self.pending))).close()
        return bool(got.items)

    def _perf_reader(self, name: str, mname: str, fd: int, map_id: int, path: str
                     ) -> perfbuf.PerfBuffer:
        """Per-CPU rings of a perf_event_array: from events handed over for this very map,
        else opened here (only with CAP_PERFMON: `loaderd run` before its drop)."""
        item = self.pending.pop((name, mname), None)
        if item is not None and item.map_id == map_id:
            return perfbuf.PerfBuffer(fd, path, events=item.events)
        if item is not None:
            item.close()  # for a map replaced since: stale
        try:
            return perfbuf.PerfBuffer(fd, path)
        except LoaderdError as exc:
            if "CAP_PERFMON" in str(exc) or "EACCES" in str(exc) or "EPERM" in str(exc):
                raise LoaderdError(Kind.CAPABILITY, _PERF_NO_CAPS, Location(path)) from None
            raise

    def sync(self, manifest: Manifest) -> None:
        """(Re)open the event maps the applied specs declare; after a reload the maps may be
        new. A map that is still the same (its id) keeps its reader (and its position). Rate
        limits carry over: a reload must not grant a fresh burst."""
        self.manifest = manifest
        self._receive()
        old = {(r.spec, r.map): r for r in self.rings}
        self.rings = []
        for name, record in manifest.specs.items():
            for mname, layout in record.events.items():
                path = os.path.join(record.pin_dir, "maps", mname)
                fd = -1
                try:
                    fd = kernel.obj_get(path)
                    info = kernel.map_info(fd)
                    applied = record.maps.get(mname)
                    if applied is not None and applied.id != info.id:
                        # a pin swapped behind the manifest: not the map loaderd applied
                        raise LoaderdError(Kind.STATE, f"the pinned map is id {info.id}, not "
                                           f"the applied map id {applied.id} (drift: the next "
                                           "apply rebuilds it)", Location(path))
                    prev = old.get((name, mname))
                    if prev is not None and prev.map_id == info.id:
                        os.close(fd)
                        del old[(name, mname)]
                        prev.records = self._records(parse_layout(layout))
                        self.rings.append(prev)
                        stale = self.pending.pop((name, mname), None)
                        if stale is not None:
                            stale.close()  # read already, through the events it was given
                        continue
                    if info.type == kernel.MAP_TYPES["perf_event_array"]:
                        reader: ringbuf.RingBuffer | perfbuf.PerfBuffer = self._perf_reader(
                            name, mname, fd, info.id, path)
                    else:
                        reader = ringbuf.RingBuffer(fd, path)
                except LoaderdError as exc:
                    if fd >= 0:
                        os.close(fd)
                    key = (name, mname)
                    if key not in self.unread or self.unread[key] != str(exc):
                        audit.emit(Event.DAEMON, f"{name}/{mname}: cannot read events: {exc}",
                                   spec=name, map=mname)
                    self.unread[key] = str(exc)
                    continue
                self.unread.pop((name, mname), None)
                if isinstance(reader, ringbuf.RingBuffer) and reader.backlog_bytes:
                    self._say_backlog(name, mname, reader, parse_layout(layout))
                prev = old.get((name, mname))
                limit, reported, read = (prev.limit, prev.reported, prev.read) if prev else (
                    ringbuf.RateLimit(self.rate), 0, 0)
                self.rings.append(_Ring(name, mname, fd, info.id, reader,
                                        self._records(parse_layout(layout)), limit,
                                        reported, read))
        for r in old.values():
            self._close(r)
        wanted = {(n, m) for n, rec in manifest.specs.items() for m in rec.events}
        self.unread = {k: v for k, v in self.unread.items() if k in wanted}

    def _say_backlog(self, spec: str, map_name: str, reader: ringbuf.RingBuffer,
                     layout: tuple[Field, ...]) -> None:
        """A ring buffer whose reader just attached already holds records (nobody read it,
        or the resident was down): journaled as they are, each marked `backlog`, after this
        line; a full ring also lost records, which the kernel does not count."""
        n = reader.skip_backlog(skip=False)
        if reader.full_at_attach(layout_end(layout)):
            audit.emit(Event.EVENTS_LOST, f"{spec}/{map_name}: the ring buffer was full when "
                       f"its reader attached ({plural(n, 'record')}, {reader.backlog_bytes} "
                       "bytes, written while nobody read it, follow marked backlog): records "
                       "written after it filled were dropped by the kernel, which keeps no count "
                       "for ring buffers", spec=spec, map=map_name, backlog=n, full=True)
        else:
            audit.emit(Event.DAEMON, f"{spec}/{map_name}: {plural(n, 'record')} "
                       f"({reader.backlog_bytes} bytes) waiting in the ring buffer when its "
                       "reader attached, "
                       "written while nobody read it; they follow, marked backlog",
                       spec=spec, map=map_name, backlog=n, full=False)
        self.changed = True

    def _records(self, fields: tuple[Field, ...]) -> Records:
        self._enums(fields)
        return Records(fields, self.clean, self.enums)

    def _enums(self, fields: tuple[Field, ...]) -> None:
        """BTF enums the layout names, read once (the kernel's enums do not change)."""
        wanted = enum_names(fields) - set(self.enums)
        if wanted:
            found, missing = btf.enum_labels(wanted)
            self.enums.update(found)
            for name in missing:
                self.enums[name] = {}
                audit.emit(Event.DAEMON, f"enum {name} is not in the kernel's BTF: its "
                           "event fields are journaled as numbers")

    def fds(self) -> list[int]:
        """Fds to poll: readable when records are waiting (a ring's map fd, a perf buffer's
        per-CPU event fds, the handover socket)."""
        return [fd for r in self.rings for fd in (
            r.reader.fds() if isinstance(r.reader, perfbuf.PerfBuffer) else [r.fd])] + (
            [self.sock.fileno()] if self.sock is not None else [])

    def pump(self) -> int:
        """Journal what is available now; returns the number of events journaled. Perf events
        handed over for a map of the applied set are put to use at once (a reload's new perf
        buffer is read without a restart)."""
        if self._receive() and self.manifest is not None and any(
                key in self.unread or key in {(r.spec, r.map) for r in self.rings}
                for key in self.pending):
            self.sync(self.manifest)
        sent = 0
        for r in self.rings:
            end = r.end
            for record in r.reader.consume(MAX_PER_PUMP):
                r.read += 1
                if not r.limit.allow():
                    continue
                if end:
                    record = perfbuf.trim_padding(record, end)
                self.journal(r.spec, r.map, record, r.records, backlog=isinstance(
                    r.reader, ringbuf.RingBuffer) and r.reader.last_was_backlog)
                sent += 1
            lost = r.reader.lost if isinstance(r.reader, perfbuf.PerfBuffer) else 0
            if lost > r.lost_reported:
                audit.emit(Event.EVENTS_LOST, f"{r.spec}/{r.map}: the kernel lost "
                           f"{lost - r.lost_reported} samples (a per-CPU perf ring was full; "
                           f"{lost} since opened)", spec=r.spec, map=r.map,
                           lost=lost - r.lost_reported, lost_total=lost)
                r.lost_reported = lost
                self.changed = True
            if r.limit.dropped > r.reported:
                audit.emit(Event.EVENTS_DROPPED, f"{r.spec}/{r.map}: "
                           f"{r.limit.dropped - r.reported} events over the rate limit of "
                           f"{self.rate}/s were not journaled", spec=r.spec, map=r.map,
                           dropped=r.limit.dropped - r.reported, rate_limit=self.rate)
                r.reported = r.limit.dropped
                self.changed = True
        return sent

    def counts(self) -> tuple[RingCount, ...]:
        """Records read, dropped and lost per event map since the resident started (metrics)."""
        return tuple(RingCount(r.spec, r.map, r.read, r.limit.dropped, r.lost_reported,
                               r.reader.backlog if isinstance(r.reader, ringbuf.RingBuffer)
                               else 0) for r in self.rings)

    @staticmethod
    def journal(spec: str, map_name: str, record: bytes, records: Records,
                backlog: bool = False) -> None:
        """One record: decoded by its layout, sanitized, journaled (bench/ times this)."""
        fields = records(record)
        audit.emit_plain(Event.BPF_EVENT, f"{spec}/{map_name}: " + _MESSAGE(fields), {
            "spec": spec, "map": map_name, **({"backlog": True} if backlog else {}),
            **records.journal_keys(fields)})

    def counters(self) -> dict[str, dict[str, int]]:
        """Per event map (`spec/map`): events over the rate limit, samples the kernel lost."""
        return {f"{r.spec}/{r.map}": {"dropped": r.limit.dropped, "lost": r.lost_reported}
                for r in self.rings}

    @staticmethod
    def _close(r: _Ring) -> None:
        r.reader.close()
        with contextlib.suppress(OSError):
            os.close(r.fd)

    def close(self) -> None:
        for r in self.rings:
            self._close(r)
        self.rings = []
        for item in self.pending.values():
            item.close()
        self.pending = {}
