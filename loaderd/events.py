"""Event pipeline: consume a pinned BPF ring buffer, decode records, rate-limit, sanitize.

The ring buffer is read the way libbpf's ring_buffer__consume does it, over mmap: page 0 is the
consumer position (mapped writable: consuming means advancing it, so the pin must be opened
read-write - root or the pin's owner), page 1 the producer position, then the data area mapped
twice back to back by the kernel so a record that wraps is still contiguous. Each record has an
8-byte header: length with BUSY (bit 31, still being written) and DISCARD (bit 30) flags, then
the sample, padded to 8 bytes. x86-64 only (like kernel.py): its ordering makes plain loads
acquire and plain stores release.

Records decode by a layout such as `pid:u32,uid:u32,comm:bytes16` (spec scalar names, or
bytesN); bytes past the layout come as `_rest`. Without a layout a record is `{"data": bytes}`.
A u32/s32 field the sanitizer treats as an address (`saddr`, `daddr`, `ip`, ...) is read in network
order, as the kernel stores iphdr/sockaddr addresses, into an IPv4Address.
Then the Sanitizer (uid pseudonymized, addresses masked, secrets redacted) unless raw. A token
bucket enforces `limits.max_event_rate`: records over it are consumed (the producer must never
stall) but not emitted, and counted.
"""

from __future__ import annotations

import ipaddress
import mmap
import os
import re
import select
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from loaderd import kernel
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import SCALAR_TYPES
from loaderd.sanitize import IP_FIELDS

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_PAGE = mmap.PAGESIZE
_FIELD = re.compile(r"([a-z_][a-z0-9_]{0,47}):(u8|u16|u32|u64|s8|s16|s32|s64|bytes(\d{1,4}))")


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int
    kind: str  # a SCALAR_TYPES name, or "bytes"


def parse_layout(text: str) -> tuple[Field, ...]:
    """`name:type,...` in C order with C alignment (scalars aligned to their size)."""
    fields: list[Field] = []
    offset = 0
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _FIELD.fullmatch(part)
        if m is None:
            raise LoaderdError(Kind.SEMANTIC, "bad event layout field", value=part,
                               allowed="name:u8|u16|u32|u64|s8|s16|s32|s64|bytesN, comma "
                               "separated, in the C struct's order")
        name, kind = m.group(1), m.group(2)
        if m.group(3):
            size, kind = int(m.group(3)), "bytes"
        else:
            size = SCALAR_TYPES[kind][0]
            offset = (offset + size - 1) // size * size
        if size == 0:
            raise LoaderdError(Kind.SEMANTIC, "bytes field of size 0", value=part)
        fields.append(Field(name, offset, size, kind))
        offset += size
    if not fields:
        raise LoaderdError(Kind.SEMANTIC, "empty event layout")
    return tuple(fields)


def decode(record: bytes, layout: tuple[Field, ...] | None,
           addresses: frozenset[str] = IP_FIELDS) -> dict[str, Any]:
    """A record's fields by `layout`; 4-byte scalars named in `addresses` become IPv4Address."""
    if layout is None:
        return {"data": record}
    out: dict[str, Any] = {}
    end = 0
    for f in layout:
        raw = record[f.offset:f.offset + f.size]
        if len(raw) < f.size:
            out["_short"] = True  # the record is smaller than the layout says
            break
        if f.kind == "bytes":
            out[f.name] = raw  # 16-byte addresses too: the sanitizer reads bytes in network order
        elif f.size == 4 and f.name.lower() in addresses:
            # network order: read little-endian, 10.1.2.3 would be masked as 3.2.1.0/24
            out[f.name] = ipaddress.IPv4Address(raw)
        else:
            out[f.name] = int.from_bytes(raw, "little", signed=SCALAR_TYPES[f.kind][1])
        end = f.offset + f.size
    if len(record) > end and "_short" not in out:
        out["_rest"] = record[end:]
    return out


class RateLimit:
    """Token bucket: `rate` events per second, bursts up to `rate`."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = rate, clock
        self.tokens = float(rate)
        self.last = clock()
        self.dropped = 0

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


class RingBuffer:
    """A consumer of one ring buffer map fd (the caller keeps ownership of the fd)."""

    def __init__(self, fd: int, where: str = "ring buffer") -> None:
        info = kernel.map_info(fd)
        if info.type != kernel.MAP_TYPES["ringbuf"]:
            raise LoaderdError(Kind.KERNEL, f"not a ring buffer but a {info.type_name} map "
                               "(perf event arrays are not supported)", Location(where))
        self.fd, self.size, self.mask = fd, info.max_entries, info.max_entries - 1
        try:
            self.cons = mmap.mmap(fd, _PAGE, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        except OSError as exc:
            raise LoaderdError(Kind.KERNEL, f"cannot map the consumer page: {exc.strerror}",
                               Location(where),
                               allowed="a read-write fd: root or the pin's owner") from None
        self.prod = mmap.mmap(fd, _PAGE + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=_PAGE)

    def close(self) -> None:
        self.cons.close()
        self.prod.close()

    def _u64(self, m: mmap.mmap, at: int) -> int:
        value: int = struct.unpack_from("<Q", m, at)[0]
        return value

    def consume(self, limit: int | None = None) -> Iterator[bytes]:
        """Complete records available now, in order (stops at one still being written), at
        most `limit` of them: under a flood the producer never lets `cons < prod` end, and the
        caller must get back to its watchdog and signals."""
        cons = self._u64(self.cons, 0)
        prod = self._u64(self.prod, 0)
        taken = 0
        while cons < prod and (limit is None or taken < limit):
            taken += 1
            at = _PAGE + (cons & self.mask)
            length: int = struct.unpack_from("<I", self.prod, at)[0]
            if length & _BUSY:
                break
            size = length & ~(_BUSY | _DISCARD)
            start = at + _HDR
            record = None if length & _DISCARD else bytes(self.prod[start:start + size])
            cons += (size + _HDR + 7) // 8 * 8
            struct.pack_into("<Q", self.cons, 0, cons)  # hand the space back to the producer
            if record is not None:
                yield record
            prod = self._u64(self.prod, 0)

    def wait(self, timeout: float) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.poll(int(timeout * 1000))


def stream(path: str, *, layout: tuple[Field, ...] | None, rate: int,
           sanitize: Callable[[Any], Any] | None, count: int | None = None,
           duration: float | None = None, poll: float = 0.2,
           addresses: frozenset[str] = IP_FIELDS) -> Iterator[dict[str, Any]]:
    """Decoded (and sanitized) events from the ring buffer pinned at `path`. A `_dropped`
    record reports events consumed over the rate limit since the previous report."""
    fd = kernel.obj_get(path)
    ring: RingBuffer | None = None
    try:
        ring = RingBuffer(fd, path)
        limit = RateLimit(rate)
        deadline = None if duration is None else time.monotonic() + duration
        emitted = reported = 0
        while count is None or emitted < count:
            for record in ring.consume():
                if not limit.allow():
                    continue
                event = decode(record, layout, addresses)
                yield sanitize(event) if sanitize else event
                emitted += 1
                if count is not None and emitted >= count:
                    break
            if limit.dropped > reported:
                yield {"_dropped": limit.dropped - reported, "rate_limit": rate}
                reported = limit.dropped
            if deadline is not None and time.monotonic() >= deadline:
                break
            ring.wait(poll)
    finally:
        if ring is not None:
            ring.close()
        os.close(fd)
