"""Audit events: stable ids, valid journal field names, a catalog entry per kind, JSON sink."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from loaderd.audit import log as audit
from loaderd.audit.log import Event

CATALOG = Path(audit.__file__).parent / "catalog" / "loaderd.catalog"


def test_every_event_has_a_unique_id_and_a_catalog_entry() -> None:
    ids = [e.message_id for e in Event]
    assert len(set(ids)) == len(ids)
    text = CATALOG.read_text()
    for e in Event:
        assert re.fullmatch(r"[0-9a-f]{32}", e.message_id)
        assert f"-- {e.message_id}\n" in text, e.name
        assert 0 <= e.priority <= 7


def test_journal_field_names_are_ones_journald_keeps() -> None:
    for key in ["spec", "prog_id", "prog_tag", "map_id", "x" * 100, "_leading", "we-ird.key"]:
        name = audit.journal_field(key)
        assert re.fullmatch(r"[A-Z0-9][A-Z0-9_]{0,63}", name), name
    assert audit.journal_field("prog_id") == "BPF_PROG_ID"
    assert audit.journal_field("spec") == "LOADERD_SPEC"


def test_stderr_sink_writes_one_json_object_per_event() -> None:
    buf = io.StringIO()
    audit.configure(journal=False, stream=buf)
    try:
        audit.emit(Event.PROG_LOADED, "x/y: loaded", spec="x", prog_id=7, prog_tag="ab" * 8)
        audit.emit(Event.DRIFT, "x: drift", spec="x", diffs=["a", "b"])
    finally:
        audit.configure()
    lines = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert [ln["message_id"] for ln in lines] == [Event.PROG_LOADED.message_id,
                                                 Event.DRIFT.message_id]
    assert lines[0]["prog_id"] == 7 and lines[0]["spec"] == "x"
    assert lines[1]["priority"] == 2


def test_debug_detail_goes_to_the_journal_only_at_priority_7(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracebacks never reach users' error text; with a journal they are kept at debug
    priority (no MESSAGE_ID: not an audit event); without one there is no debug log."""
    from systemd import journal

    sent: list[dict[str, str]] = []
    monkeypatch.setattr(journal, "send", lambda **kw: sent.append(kw))
    try:
        audit.configure(journal=False, stream=io.StringIO())
        audit.debug("internal error: KeyError", "Traceback (most recent call last): ...")
        assert sent == []
        audit.configure(journal=True)
        audit.debug("internal error: KeyError", "Traceback (most recent call last): ...")
    finally:
        audit.configure(journal=False, stream=io.StringIO())
    assert sent == [{"MESSAGE": "internal error: KeyError", "PRIORITY": "7",
                     "SYSLOG_IDENTIFIER": "loaderd",
                     "LOADERD_DEBUG": "Traceback (most recent call last): ..."}]
