"""Audit trail: one structured event per decision.

Contract used across loaderd:  `audit.emit(Event.X, "human message", spec=..., prog_id=...)`.
Keyword fields are lowercase here and mapped to stable uppercase journal fields (see FIELD_NAMES);
unknown keys become LOADERD_<KEY>. With a journal socket, events go to journald with a
MESSAGE_ID per event kind (documented in the catalog); otherwise one JSON line per event on
stderr. `configure()` is called once per process by the CLI.
"""

from __future__ import annotations

import enum
import json
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any


class Event(enum.Enum):
    """Event kinds. Values are (MESSAGE_ID, syslog PRIORITY). IDs never change once shipped."""

    SPEC_ACCEPTED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a101", 6)
    SPEC_REFUSED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a102", 3)
    PROG_LOADED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a103", 6)
    MAP_CREATED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a104", 6)
    MAP_FROZEN = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a105", 6)
    PIN_WRITTEN = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a106", 7)
    ATTACHED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a107", 6)
    CAPS_DROPPED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a108", 6)
    RELOAD = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a109", 5)
    APPLY_FAILED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a10a", 3)
    APPLIED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a10b", 5)
    ADOPTED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a10c", 6)
    DETACHED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a10d", 4)
    ROLLBACK = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a10e", 4)
    KILL_SWITCH = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a10f", 2)
    DRIFT = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a110", 2)
    DEGRADED = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a111", 4)
    DAEMON = ("5b0d1c6f2d9e4c8a9a61e0f6b7c3a112", 6)

    @property
    def message_id(self) -> str:
        return self.value[0]

    @property
    def priority(self) -> int:
        return self.value[1]


FIELD_NAMES: dict[str, str] = {
    "spec": "LOADERD_SPEC",
    "spec_sha256": "LOADERD_SPEC_SHA256",
    "file": "LOADERD_FILE",
    "program": "LOADERD_PROGRAM",
    "map": "LOADERD_MAP",
    "prog_id": "BPF_PROG_ID",
    "prog_tag": "BPF_PROG_TAG",
    "prog_type": "BPF_PROG_TYPE",
    "map_id": "BPF_MAP_ID",
    "link_id": "BPF_LINK_ID",
    "pin": "BPF_PIN_PATH",
    "helpers": "BPF_HELPERS",
}

Sink = Callable[[Event, str, dict[str, Any]], None]
_sink: Sink | None = None


def journal_field(key: str) -> str:
    name = FIELD_NAMES.get(key) or "LOADERD_" + key.upper()
    # journald silently drops invalid names: keep to A-Z0-9_, <= 64 chars, no leading "_".
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name.upper()).lstrip("_")
    return name[:64]


def _stderr_sink(stream: IO[str]) -> Sink:
    def sink(event: Event, message: str, fields: dict[str, Any]) -> None:
        record = {"ts": round(time.time(), 6), "event": event.name.lower(),
                  "message_id": event.message_id, "priority": event.priority,
                  "message": message, "uid": os.getuid(), **fields}
        stream.write(json.dumps(record, default=str, sort_keys=True) + "\n")
        stream.flush()

    return sink


def _journal_sink() -> Sink:
    from systemd import journal

    def sink(event: Event, message: str, fields: dict[str, Any]) -> None:
        extra = {journal_field(k): _text(v) for k, v in fields.items() if v is not None}
        journal.send(message, MESSAGE_ID=event.message_id, PRIORITY=str(event.priority),
                     SYSLOG_IDENTIFIER="loaderd", LOADERD_EVENT=event.name.lower(),
                     LOADERD_UID=str(os.getuid()), **extra)

    return sink


def _text(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(v) for v in value)
    return str(value)


def journal_available() -> bool:
    return os.path.exists("/run/systemd/journal/socket")


def configure(*, journal: bool | None = None, stream: IO[str] | None = None) -> None:
    """Pick the sink once. `journal=None`: journald if its socket exists, else stderr JSON."""
    global _sink
    use_journal = journal_available() if journal is None else journal
    _sink = _journal_sink() if use_journal else _stderr_sink(stream or sys.stderr)


def emit(event: Event, message: str, **fields: Any) -> None:
    if _sink is None:
        configure()
    assert _sink is not None
    _sink(event, message, fields)
