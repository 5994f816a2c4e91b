"""Read a pinned perf_event_array map (BCC's BPF_PERF_OUTPUT) the way BCC's open_perf_buffer
does, without bcc: one software BPF_OUTPUT perf event per online CPU, its ring mmap'd, its fd
written into the map slot of that CPU (bpf_perf_event_output writes to the current CPU's slot).

Opening CPU-wide perf events needs CAP_PERFMON: a resident with capabilities (`loaderd run`)
opens them before it drops them; the packaged one is handed the events by loaderd-apply
(bpf.handover) and only maps, slots and enables them, which needs no capability. Either way a
reader keeps them for as long as the map is the same. The slots hold the events only while
the map fd that wrote them is open (the kernel clears them when it closes), so a reader owns
its map fd for its whole life.

Each ring is a perf_event_mmap_page (data_head, data_tail, data_offset, data_size) and a data
area of 2^n pages; records are perf_event_header {u32 type; u16 misc; u16 size} then the body:
PERF_RECORD_SAMPLE carries {u32 size; raw bytes} (padded by the kernel so the record is 8-byte
aligned), PERF_RECORD_LOST {u64 id; u64 lost}: samples the kernel dropped because the ring was
full. x86-64 (like kernel.py): plain loads acquire, plain stores release.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from loaderd.bpf import kernel
from loaderd.errors import Kind, LoaderdError, Location

_PAGE = mmap.PAGESIZE
PAGES = 8  # data pages per CPU (BCC's page_cnt default): 32 KiB
_RECORD_LOST = 2
_RECORD_SAMPLE = 9
_HEAD, _TAIL, _DATA_OFFSET, _DATA_SIZE = 1024, 1032, 1040, 1048


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> list[int]:
    with open(path, encoding="ascii") as fh:
        text = fh.read().strip()
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


@dataclass
class _Cpu:
    cpu: int
    fd: int
    ring: mmap.mmap
    offset: int  # data area, from the mmap page
    size: int


class PerfBuffer:
    """Per-CPU perf rings behind one perf_event_array map fd (the caller keeps the map fd
    open for as long as this reads, and closes it after close())."""

    def __init__(self, map_fd: int, where: str = "perf buffer", pages: int = PAGES,
                 events: Sequence[tuple[int, int]] | None = None) -> None:
        """events: (cpu, perf event fd) pairs opened by someone with CAP_PERFMON (taken over:
        closed by close(), or here on failure); None: open them here."""
        info = kernel.map_info(map_fd)
        if info.type != kernel.MAP_TYPES["perf_event_array"]:
            raise LoaderdError(Kind.KERNEL, f"not a perf event array but a {info.type_name} "
                               "map", Location(where))
        self.map_fd = map_fd
        self.where = where
        self.lost = 0  # samples the kernel could not write (ring full), since opened
        self.cpus: list[_Cpu] = []
        handed = list(events or ())
        try:
            if events is None:
                for cpu in online_cpus():
                    if cpu >= info.max_entries:
                        continue  # BCC sizes the array by CPU count; a slot per online CPU
                    self._open(cpu, pages, self._new_event(cpu))
            while handed:
                cpu, fd = handed.pop(0)
                if cpu >= info.max_entries:
                    os.close(fd)
                    raise LoaderdError(Kind.KERNEL, f"a perf event for CPU {cpu}: the map has "
                                       f"{info.max_entries} slots", Location(where))
                self._open(cpu, pages, fd)
        except BaseException:
            for _cpu, fd in handed:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.close()
            raise

    def _new_event(self, cpu: int) -> int:
        try:
            return kernel.perf_event_open_output(cpu)
        except LoaderdError as exc:
            exc.location = Location(self.where)
            raise

    def _open(self, cpu: int, pages: int, fd: int) -> None:
        """Map the ring of event `fd` (owned from here on), put it in CPU `cpu`'s slot, enable
        it."""
        try:
            ring = mmap.mmap(fd, (pages + 1) * _PAGE, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise LoaderdError(Kind.KERNEL, f"cannot map the perf ring of CPU {cpu}: "
                               f"{exc.strerror}", Location(self.where),
                               allowed="locked memory for perf (perf_event_mlock_kb)") from None
        offset, size = struct.unpack_from("<QQ", ring, _DATA_OFFSET)
        self.cpus.append(_Cpu(cpu, fd, ring, int(offset) or _PAGE, int(size) or pages * _PAGE))
        # The kernel's check of a handed fd: map_update refuses anything but a perf event.
        kernel.map_update(self.map_fd, struct.pack("<I", cpu), struct.pack("<I", fd))
        kernel.perf_event_enable(fd)

    def fds(self) -> list[int]:
        return [c.fd for c in self.cpus]

    def close(self) -> None:
        for c in self.cpus:
            with contextlib.suppress(LoaderdError, OSError):
                kernel.map_delete(self.map_fd, struct.pack("<I", c.cpu))
            c.ring.close()
            with contextlib.suppress(OSError):
                os.close(c.fd)
        self.cpus = []

    @staticmethod
    def _read(c: _Cpu, pos: int, n: int) -> bytes:
        at = pos % c.size
        end = at + n
        base = c.offset
        if end <= c.size:
            return c.ring[base + at:base + end]
        return c.ring[base + at:base + c.size] + c.ring[base:base + end - c.size]

    def consume(self, limit: int | None = None) -> Iterator[bytes]:
        """Samples available now, CPU by CPU, at most `limit` in all; LOST records add to
        `lost`."""
        taken = 0
        for c in self.cpus:
            head = struct.unpack_from("<Q", c.ring, _HEAD)[0]
            tail = struct.unpack_from("<Q", c.ring, _TAIL)[0]
            while tail < head and (limit is None or taken < limit):
                rtype, _misc, size = struct.unpack("<IHH", self._read(c, tail, 8))
                if size < 8:  # corrupt: never loop on it
                    tail = head
                    break
                if rtype == _RECORD_SAMPLE:
                    raw = self._read(c, tail + 8, size - 8)
                    n = struct.unpack_from("<I", raw, 0)[0]
                    sample = raw[4:4 + n]
                    tail += size
                    struct.pack_into("<Q", c.ring, _TAIL, tail)
                    taken += 1
                    yield sample
                    continue
                if rtype == _RECORD_LOST:
                    self.lost += struct.unpack("<Q", self._read(c, tail + 16, 8))[0]
                tail += size
            struct.pack_into("<Q", c.ring, _TAIL, tail)  # hand the space back

    def wait(self, timeout: float) -> None:
        poller = select.poll()
        for fd in self.fds():
            poller.register(fd, select.POLLIN)
        poller.poll(int(timeout * 1000))


def trim_padding(record: bytes, layout_end: int) -> bytes:
    """A perf sample is padded by the kernel to 8-byte alignment: the zeros past the layout's
    end are not the program's."""
    extra = record[layout_end:]
    if 0 < len(extra) < 8 and not extra.strip(b"\0"):
        return record[:layout_end]
    return record
