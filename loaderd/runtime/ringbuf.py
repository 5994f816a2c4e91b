"""Event pipeline: consume a pinned BPF ring buffer, decode records, rate-limit, sanitize.

The ring buffer is read the way libbpf's ring_buffer__consume does it, over mmap: page 0 is the
consumer position (mapped writable: consuming means advancing it, so the pin must be opened
read-write - root or the pin's owner), page 1 the producer position, then the data area mapped
twice back to back by the kernel so a record that wraps is still contiguous. Each record has an
8-byte header: length with BUSY (bit 31, still being written) and DISCARD (bit 30) flags, then
the sample, padded to 8 bytes. x86-64 only (like kernel.py): its ordering makes plain loads
acquire and plain stores release.

Records decode by their layout (loaderd.layout), then the Sanitizer (uid pseudonymized,
addresses masked, secrets redacted) unless raw. A token
bucket enforces `limits.max_event_rate`: records over it are consumed (the producer must never
stall) but not emitted, and counted.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from loaderd.bpf import kernel
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.layout import Field, decode, layout_end
from loaderd.runtime import perfbuf
from loaderd.sanitize import IP_FIELDS

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_PAGE = mmap.PAGESIZE


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
            raise LoaderdError(Kind.KERNEL, f"not a ring buffer but a {info.type_name} map",
                               Location(where))
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
        # Stale backlog: what was already written when this reader attached (nobody read the
        # ring before, or a reader was down). The kernel keeps no loss count for ring buffers:
        # a full ring drops new records silently, so the backlog is all that can be said.
        cons, self._backlog_end = self._u64(self.cons, 0), self._u64(self.prod, 0)
        self.backlog_bytes = max(0, self._backlog_end - cons)
        self.backlog = 0  # records taken (or skipped) from that backlog
        self.last_was_backlog = False  # the record consume() yielded last was one of them

    def full_at_attach(self, record_size: int) -> bool:
        """No room for one more record of `record_size` bytes when the reader attached: the
        kernel dropped whatever came after the ring filled, uncounted."""
        need = _HDR + (max(record_size, 1) + 7) // 8 * 8
        return self.size - self.backlog_bytes < need

    def skip_backlog(self, skip: bool = True) -> int:
        """The number of records in the stale backlog; with `skip`, consumed without being
        returned (a viewer starting now)."""
        cons = self._u64(self.cons, 0)
        n = 0
        while cons < self._backlog_end:
            length: int = struct.unpack_from("<I", self.prod, _PAGE + (cons & self.mask))[0]
            if length & _BUSY:
                break
            if not length & _DISCARD:
                n += 1
            cons += ((length & ~(_BUSY | _DISCARD)) + _HDR + 7) // 8 * 8
        if skip:
            struct.pack_into("<Q", self.cons, 0, cons)
            self.backlog += n
        return n

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
            self.last_was_backlog = cons < self._backlog_end
            if record is not None and self.last_was_backlog:
                self.backlog += 1
            cons += (size + _HDR + 7) // 8 * 8
            struct.pack_into("<Q", self.cons, 0, cons)  # hand the space back to the producer
            if record is not None:
                yield record
            prod = self._u64(self.prod, 0)

    def wait(self, timeout: float) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.poll(int(timeout * 1000))


def open_reader(fd: int, path: str) -> RingBuffer | perfbuf.PerfBuffer:
    """The reader for an event map fd: a ring buffer, or per-CPU perf rings (CAP_PERFMON)."""
    if kernel.map_info(fd).type == kernel.MAP_TYPES["perf_event_array"]:
        return perfbuf.PerfBuffer(fd, path)
    return RingBuffer(fd, path)


def stream(path: str, *, layout: tuple[Field, ...] | None, rate: int,
           sanitize: Callable[[Any], Any] | None, count: int | None = None,
           duration: float | None = None, poll: float = 0.2,
           addresses: frozenset[str] = IP_FIELDS,
           enums: Mapping[str, Mapping[int, str]] | None = None,
           backlog: bool = False) -> Iterator[dict[str, Any]]:
    """Decoded (and sanitized) events from the ring buffer or perf event array pinned at
    `path`. A `_dropped` record reports events consumed over the rate limit since the previous
    report; a `_lost` record samples the kernel lost (a perf ring was full). A ring buffer's
    stale backlog (written before this reader attached) is skipped unless `backlog`, and said
    first either way: `{"_backlog": N, "skipped": bool, "full": bool}` (full: the ring had no
    room left, so records after it filled were dropped by the kernel, uncounted)."""
    fd = kernel.obj_get(path)
    reader: RingBuffer | perfbuf.PerfBuffer | None = None
    end = layout_end(layout)
    try:
        reader = open_reader(fd, path)
        perf = isinstance(reader, perfbuf.PerfBuffer)
        if isinstance(reader, RingBuffer) and reader.backlog_bytes:
            full = reader.full_at_attach(end)
            yield {"_backlog": reader.skip_backlog(skip=not backlog), "skipped": not backlog,
                   "full": full}
        limit = RateLimit(rate)
        deadline = None if duration is None else time.monotonic() + duration
        emitted = reported = lost = 0
        while count is None or emitted < count:
            for record in reader.consume():
                if not limit.allow():
                    continue
                if perf and end:
                    record = perfbuf.trim_padding(record, end)
                event = decode(record, layout, addresses, enums)
                yield sanitize(event) if sanitize else event
                emitted += 1
                if count is not None and emitted >= count:
                    break
            if limit.dropped > reported:
                yield {"_dropped": limit.dropped - reported, "rate_limit": rate}
                reported = limit.dropped
            if isinstance(reader, perfbuf.PerfBuffer) and reader.lost > lost:
                yield {"_lost": reader.lost - lost}
                lost = reader.lost
            if deadline is not None and time.monotonic() >= deadline:
                break
            reader.wait(poll)
    finally:
        if reader is not None:
            reader.close()
        os.close(fd)
