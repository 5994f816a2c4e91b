"""The resident's checks of a perf event handover (bpf.handover.receive) over a real unix
datagram socket pair with real SCM_RIGHTS/SCM_CREDENTIALS: a wrong sender uid, a header of
another shape, an fd count that does not match, an fd that is not a perf event: refused, and
every fd it carried closed. (A real handover, perf events included: tests/kernel/
test_perf_handover.py.)"""

from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaderd.bpf import handover
from loaderd.errors import LoaderdError


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    rx.setblocking(False)
    yield rx, tx
    rx.close()
    tx.close()


def header(**over: object) -> bytes:
    entry: dict[str, object] = {"spec": "exitsnoop", "map": "exits", "map_id": 7, "cpus": [0]}
    entry.update(over)
    return json.dumps({"magic": handover.MAGIC, "maps": [entry]}).encode()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def send(tx: socket.socket, data: bytes, nfds: int = 1) -> None:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    try:
        tx.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize(("data", "nfds", "why"), [
    (header(), 1, "not a perf event"),
    (header(), 2, "2 fds for 1 CPUs named"),
    (header(cpus=[0, 0]), 2, "distinct CPU numbers"),
    (header(cpus=[True]), 1, "distinct CPU numbers"),
    (header(map_id=0), 1, "map id out of range"),
    (header(spec="../etc"), 1, "not loaderd's"),
    (header(extra=1), 1, "another shape"),
    (b'{"magic": "loaderd-perf-handover/1", "maps": []}', 1, "no maps"),
    (b"[1, 2]", 1, "not a loaderd handover"),
    (b"\xff\xfe", 1, "not a loaderd handover"),
])
def test_refused_and_fds_closed(pair: tuple[socket.socket, socket.socket], data: bytes,
                                nfds: int, why: str) -> None:
    rx, tx = pair
    before = open_fds()
    send(tx, data, nfds)
    got = handover.receive(rx, frozenset({os.geteuid()}))
    assert got.items == () and len(got.refused) == 1 and why in got.refused[0], got.refused
    assert open_fds() == before


def test_sender_uid_must_be_an_owner(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair
    before = open_fds()
    send(tx, header())
    got = handover.receive(rx, frozenset({os.geteuid() + 4242}))
    assert got.items == () and f"sent by uid {os.geteuid()}" in got.refused[0]
    assert open_fds() == before


def test_nothing_waiting_is_nothing(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, _tx = pair
    assert handover.receive(rx, frozenset({0})) == handover.Received((), ())


def test_send_says_why_nobody_listens(tmp_path: Path) -> None:
    path = os.path.join(str(tmp_path), "handover.sock")
    with pytest.raises(LoaderdError, match="does not exist"):
        handover.send(path, [handover.PerfEvents("a", "b", 1, ((0, 0),))])
