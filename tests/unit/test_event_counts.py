"""The resident's event counters file (state_dir/events.json) as `loaderd status` reads it:
untrusted input, so only a plain file owned by root or the state dir's owner, not group or
world writable, bounded and of exactly the shape written counts; anything else is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from loaderd.store.statedir import EVENTS, EventCount, EventCounts, State, read_event_counts

GOOD = EventCounts(1_700_000_000.5, 4242, (EventCount("exitsnoop", "exits", 10, 2, 3, 4),))


def owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def test_round_trip(tmp_path: Path) -> None:
    st = State(str(tmp_path))
    st.save_event_counts(GOOD)
    assert st.event_counts() == GOOD
    assert os.stat(st.events_path).st_mode & 0o777 == 0o600


def good() -> dict[str, Any]:
    return {"at": GOOD.at, "pid": GOOD.pid, "maps": [
        {"spec": "exitsnoop", "map": "exits", "read": 10, "dropped": 2, "lost": 3,
         "backlog": 4}]}


def _with(**over: Any) -> dict[str, Any]:
    d = good()
    d.update(over)
    return d


def _map(**over: Any) -> dict[str, Any]:
    d = good()
    d["maps"][0].update(over)
    return d


@pytest.mark.parametrize("doc", [
    _with(at=float("inf")), _with(at=-1), _with(pid=0), _with(pid=True), _with(extra=1),
    _with(maps={"a": 1}), _with(maps=[good()["maps"][0]] * 257),
    _map(read=-1), _map(lost=1.5), _map(dropped=True), _map(backlog="4"), _map(spec="../x"),
    _map(map=""), _map(extra=0), [1],
])
def test_wrong_shapes_read_as_absent(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / EVENTS
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o600)
    assert read_event_counts(str(path), owners()) is None


def test_untrusted_files_read_as_absent(tmp_path: Path) -> None:
    path = tmp_path / EVENTS
    path.write_text(json.dumps(good()))
    os.chmod(path, 0o600)
    assert read_event_counts(str(path), owners()) == GOOD
    assert read_event_counts(str(path), frozenset({os.geteuid() + 4242})) is None  # owner
    os.chmod(path, 0o620)  # group-writable: anyone in it could write the counters
    assert read_event_counts(str(path), owners()) is None
    os.chmod(path, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    assert read_event_counts(str(link), owners()) is None  # no symlink followed
    big = tmp_path / "big.json"
    big.write_text(json.dumps(good()) + " " * 70_000)
    os.chmod(big, 0o600)
    assert read_event_counts(str(big), owners()) is None
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo, 0o600)
    assert read_event_counts(str(fifo), owners()) is None  # and no hang
    assert read_event_counts(str(tmp_path / "absent.json"), owners()) is None
