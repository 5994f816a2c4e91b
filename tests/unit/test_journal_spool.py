"""The journal spool (audit.spool): events journald did not take are kept whole, bounded, never
through a planted file, and replayed once, marked. The real journald outage is
tests/e2e/test_journald_down.py."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from loaderd.audit import log as audit
from loaderd.audit import spool
from loaderd.audit.log import Event


def _fields(n: int) -> dict[str, Any]:
    return {"MESSAGE": f"event {n}", "MESSAGE_ID": Event.DAEMON.message_id, "PRIORITY": "6",
            "CODE_LINE": n, "LOADERD_EVENT": "daemon"}


def test_append_backlog_replay(tmp_path: Path) -> None:
    sp = spool.Spool(str(tmp_path / spool.SPOOL))
    assert sp.backlog() is None and sp.replay(lambda **kw: None) is None
    for n in range(3):
        assert sp.append(_fields(n), "Connection refused")
    assert oct(os.stat(sp.path).st_mode & 0o777) == "0o600"
    back = sp.backlog()
    assert back is not None and back.events == 3 and back.path == sp.path
    assert "journald unreachable since " in back.sentence() and "3 events in " in back.sentence()
    sent: list[dict[str, Any]] = []
    done = sp.replay(lambda **kw: sent.append(kw))
    assert done is not None and (done.events, done.skipped, done.left) == (3, 0, 0)
    assert [s["MESSAGE"] for s in sent] == ["event 0", "event 1", "event 2"]
    assert all(s[spool.REPLAYED] == "1" and s[spool.SPOOL_ERROR] == "Connection refused"
               and int(s[spool.SPOOLED_AT]) > 0 and s["CODE_LINE"] == n
               for n, s in enumerate(sent))
    assert not os.path.exists(sp.path) and not os.path.exists(sp.replaying)
    assert sp.backlog() is None and sp.replay(lambda **kw: None) is None  # never twice


def test_replay_cut_short_keeps_the_rest(tmp_path: Path) -> None:
    sp = spool.Spool(str(tmp_path / spool.SPOOL))
    for n in range(4):
        sp.append(_fields(n), "x")
    sent: list[str] = []

    def flaky(**kw: Any) -> None:
        if len(sent) == 2:
            raise ConnectionRefusedError(111, "Connection refused")
        sent.append(kw["MESSAGE"])

    done = sp.replay(flaky)
    assert done is not None and (done.events, done.left) == (2, 2)
    back = sp.backlog()
    assert back is not None and back.events == 2
    rest: list[str] = []
    sp.replay(lambda **kw: rest.append(kw["MESSAGE"]))
    assert sent + rest == ["event 0", "event 1", "event 2", "event 3"]


def test_a_replay_killed_midway_is_finished_first(tmp_path: Path) -> None:
    sp = spool.Spool(str(tmp_path / spool.SPOOL))
    sp.append(_fields(0), "x")
    os.rename(sp.path, sp.replaying)  # as a replay killed after its rename leaves it
    sp.append(_fields(1), "x")
    back = sp.backlog()
    assert back is not None and back.events == 2
    got: list[str] = []
    sp.replay(lambda **kw: got.append(kw["MESSAGE"]))
    sp.replay(lambda **kw: got.append(kw["MESSAGE"]))
    assert got == ["event 0", "event 1"] and sp.backlog() is None


def test_bounded_and_whole_lines_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "MAX_BYTES", 1000)
    sp = spool.Spool(str(tmp_path / spool.SPOOL))
    n = 0
    while sp.append(_fields(n), "x"):
        n += 1
    assert 2 <= n < 10 and sp.dropped == 1
    assert os.path.getsize(sp.path) <= 1000
    assert not sp.append({**_fields(0), "MESSAGE": "y" * spool.LINE_MAX}, "x")
    assert sp.dropped == 2
    with open(sp.path, "ab") as f:  # a torn line and a foreign one are skipped, said
        f.write(b'{"MESSAGE": "a", "_PID": "1"}\n{"MESS')
    got: list[str] = []
    done = sp.replay(lambda **kw: got.append(kw["MESSAGE"]))
    assert done is not None and done.events == n and done.skipped == 2 and done.dropped == 2


def test_never_through_a_symlink_fifo_or_hard_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    path = tmp_path / spool.SPOOL
    path.symlink_to(target)
    assert not spool.Spool(str(path)).append(_fields(0), "x")
    path.unlink()
    os.mkfifo(path)
    assert not spool.Spool(str(path)).append(_fields(0), "x")  # O_NONBLOCK: no hang either
    path.unlink()
    os.link(target, path)
    assert not spool.Spool(str(path)).append(_fields(0), "x")
    assert target.read_text() == ""


def test_emit_spools_what_journald_refuses(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from systemd import journal

    def down(*_lines: Any) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(journal, "sendv", down)
    monkeypatch.setattr(audit, "JOURNAL_SOCKET", str(tmp_path / "no-journald"))
    stderr = io.StringIO()
    try:
        audit.configure(journal=True, stream=stderr)
        audit.spool_in(str(tmp_path))
        audit.emit(Event.APPLIED, "applied 1 spec", spec="x", prog_id=7)
        back = audit.backlog()
        assert back is not None and back.events == 1
        assert stderr.getvalue() == ""  # stderr is journald's too under systemd: not there
        line = json.loads((tmp_path / spool.SPOOL).read_text())
        assert line["MESSAGE"] == "applied 1 spec" and line["BPF_PROG_ID"] == "7"
        assert line["MESSAGE_ID"] == Event.APPLIED.message_id
        assert audit.replay_spool() is None  # journald not reachable: kept
        assert audit.backlog() is not None
    finally:
        audit._spool = None
        audit.configure()


def test_journal_reachable_is_a_connect(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "sock")
    assert not spool.journal_reachable(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    try:
        assert spool.journal_reachable(path)
    finally:
        s.close()
    assert not spool.journal_reachable(path)  # bound by nobody: refused, as journald stopped


def test_replay_sends_only_lines_append_wrote_for_loaderds_events(tmp_path: Path) -> None:
    """The service user can write the spool: a line with an id or priority no loaderd event
    has, or without the spool's own time, is not laundered into the journal (attacker seat)."""
    known = frozenset({(Event.DAEMON.message_id, "6")})
    sp = spool.Spool(str(tmp_path / spool.SPOOL), known)
    assert sp.append(_fields(1), "Connection refused")
    with open(sp.path, "a") as fh:
        fh.write(json.dumps({**_fields(2), "PRIORITY": "2", spool.SPOOLED_AT: "1"}) + "\n")
        fh.write(json.dumps({**_fields(3), "MESSAGE_ID": "0" * 32, spool.SPOOLED_AT: "1"}) + "\n")
        fh.write(json.dumps(_fields(4)) + "\n")  # no LOADERD_SPOOLED_AT
    sent: list[dict[str, Any]] = []
    done = sp.replay(lambda **kw: sent.append(kw))
    assert [e["MESSAGE"] for e in sent] == ["event 1"]
    assert done is not None


def test_a_planted_replaying_directory_does_not_stop_replay(tmp_path: Path) -> None:
    sp = spool.Spool(str(tmp_path / spool.SPOOL))
    os.mkdir(sp.replaying)  # planted by whoever can write the state dir (attacker seat)
    assert sp.append(_fields(1), "Connection refused")
    sent: list[dict[str, Any]] = []
    done = sp.replay(lambda **kw: sent.append(kw))
    assert done is not None and [e["MESSAGE"] for e in sent] == ["event 1"]
    assert [p.name.split(".refused.")[0] for p in tmp_path.iterdir()
            if ".refused." in p.name] == [os.path.basename(sp.replaying)]
