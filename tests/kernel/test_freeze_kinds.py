"""Why freeze is refused outside the array and hash families (real kernel): a frozen ring
buffer's consumer position can no longer be mapped writable, so the ring cannot be consumed;
a frozen array or hash stays readable by lookups."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from loaderd.bpf import kernel

pytestmark = pytest.mark.kernel
RINGBUF, ARRAY, HASH = 27, 2, 1


def test_a_frozen_ringbuf_cannot_be_consumed() -> None:
    page = mmap.PAGESIZE
    fd = kernel.map_create(RINGBUF, 0, 0, 4 * page)
    try:
        consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=0)
        consumer.close()  # writable before the freeze: that is how a consumer advances
        kernel.map_freeze(fd)
        with pytest.raises(OSError) as info:
            mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        assert info.value.errno == errno.EPERM
    finally:
        os.close(fd)


@pytest.mark.parametrize("map_type", [ARRAY, HASH])
def test_a_frozen_array_or_hash_stays_readable(map_type: int) -> None:
    fd = kernel.map_create(map_type, 4, 8, 4)
    try:
        kernel.map_update(fd, b"\1\0\0\0", b"\7" + b"\0" * 7)
        kernel.map_freeze(fd)
        assert kernel.map_lookup(fd, b"\1\0\0\0", 8) == b"\7" + b"\0" * 7
        with pytest.raises(kernel.KernelError):
            kernel.map_update(fd, b"\1\0\0\0", b"\0" * 8)
    finally:
        os.close(fd)


def test_a_frozen_perf_event_array_takes_no_perf_event() -> None:
    fd = kernel.map_create(4, 4, 4, 1)  # PERF_EVENT_ARRAY
    perf = kernel.perf_event_open_tracepoint(kernel.tracepoint_id("sched", "sched_switch"))
    try:
        kernel.map_freeze(fd)
        with pytest.raises(kernel.KernelError) as info:
            kernel.map_update(fd, b"\0" * 4, perf.to_bytes(4, "little"))
        assert info.value.errno == errno.EPERM
    finally:
        os.close(perf)
        os.close(fd)
