"""Journal the events of ring buffers whose spec declares `events: {layout: ...}`.

Runs inside the resident daemon (no capabilities: it opens the pins it owns). Every record is
decoded by the declared layout, sanitized (IPs masked, ids pseudonymized with the daemon's HMAC
key, secrets redacted) and journaled as one BPF_EVENT. Records over `limits.max_event_rate` are
consumed, so the producer never stalls, and counted: an EVENTS_DROPPED event reports them.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

from loaderd import sanitize
from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import btf, kernel
from loaderd.errors import LoaderdError
from loaderd.layout import Field, decode, enum_names, parse_layout
from loaderd.model import Settings
from loaderd.runtime import ringbuf
from loaderd.store.manifest import Manifest

# Records taken from one ring per pump(): a flood (or a producer faster than the journal) must
# not keep the daemon from its watchdog ping and signals; the next loop turn takes the rest.
MAX_PER_PUMP = 4096


@dataclass
class _Ring:
    spec: str
    map: str
    fd: int
    ring: ringbuf.RingBuffer
    layout: tuple[Field, ...]
    limit: ringbuf.RateLimit
    reported: int = 0


class EventPump:
    def __init__(self, settings: Settings) -> None:
        self.rate = settings.policy.limits.max_event_rate
        self.clean = sanitize.Sanitizer(sanitize.load_key(settings.state_dir), settings.sanitize)
        self.rings: list[_Ring] = []
        self.enums: dict[str, dict[int, str]] = {}

    def sync(self, manifest: Manifest) -> None:
        """(Re)open the rings the applied specs declare; after a reload the maps may be new.
        Rate limits carry over: a reload must not grant a fresh burst."""
        limits = {(r.spec, r.map): (r.limit, r.reported) for r in self.rings}
        self.close()
        for name, record in manifest.specs.items():
            for mname, layout in record.events.items():
                path = os.path.join(record.pin_dir, "maps", mname)
                fd = -1
                try:
                    fd = kernel.obj_get(path)
                    ring = ringbuf.RingBuffer(fd, path)
                except LoaderdError as exc:
                    if fd >= 0:
                        os.close(fd)
                    audit.emit(Event.DAEMON, f"{name}/{mname}: cannot read events: {exc}",
                               spec=name, map=mname)
                    continue
                limit, reported = limits.get((name, mname), (ringbuf.RateLimit(self.rate), 0))
                fields = parse_layout(layout)
                self._enums(fields)
                self.rings.append(_Ring(name, mname, fd, ring, fields, limit, reported))

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
        """Ring fds to poll: readable when records are waiting."""
        return [r.fd for r in self.rings]

    def pump(self) -> int:
        """Journal what is available now; returns the number of events journaled."""
        sent = 0
        for r in self.rings:
            for record in r.ring.consume(MAX_PER_PUMP):
                if not r.limit.allow():
                    continue
                self.journal(r.spec, r.map, record, r.layout)
                sent += 1
            if r.limit.dropped > r.reported:
                audit.emit(Event.EVENTS_DROPPED, f"{r.spec}/{r.map}: "
                           f"{r.limit.dropped - r.reported} events over the rate limit of "
                           f"{self.rate}/s were not journaled", spec=r.spec, map=r.map,
                           dropped=r.limit.dropped - r.reported, rate_limit=self.rate)
                r.reported = r.limit.dropped
        return sent

    def journal(self, spec: str, map_name: str, record: bytes,
                layout: tuple[Field, ...]) -> None:
        """One record: decoded by its layout, sanitized, journaled (bench/ times this)."""
        # The address fields the settings name are read in network order too (sanitize.ip_fields).
        fields = self.clean(decode(record, layout, self.clean.rules.ip_fields, self.enums))
        audit.emit(Event.BPF_EVENT, f"{spec}/{map_name}: "
                   + json.dumps(fields, default=str, sort_keys=True), spec=spec,
                   map=map_name, **{f"event_{k.lstrip('_')}": v for k, v in fields.items()})

    def close(self) -> None:
        for r in self.rings:
            r.ring.close()
            with contextlib.suppress(OSError):
                os.close(r.fd)
        self.rings = []
