"""Audit trail: one structured event per decision.

Contract used across loaderd:  `audit.emit(Event.X, "human message", spec=..., prog_id=...)`.
Keyword fields are lowercase here and mapped to stable uppercase journal fields (see FIELD_NAMES);
unknown keys become LOADERD_<KEY>. With a journal socket, events go to journald with a
MESSAGE_ID per event kind (documented in loaderd/audit/catalog/loaderd.catalog); otherwise one JSON
line per event on stderr. `configure()` is called once per process by the CLI; `emit()` configures
on first use when nobody did.

Both sinks carry the same facts: kind, MESSAGE_ID, priority, message, the acting uid (and
login uid when a person is behind it, e.g. `sudo loaderctl disable`), the caller's code location
and the fields. The JSON sink is structlog's (PrintLogger, TimeStamper, JSONRenderer); the
journal entry is built here and sent with python-systemd's sendv, as structlog's chain only
sequenced this module's own processors there and cost a third of the event's client CPU.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import IO, Any, TextIO, cast

from loaderd.audit.spool import SPOOL, Backlog, Replayed, Spool, journal_reachable


class Event(enum.Enum):
    """Event kinds. Values are (MESSAGE_ID, syslog PRIORITY). IDs never change once shipped:
    SIEM rules and the journal catalog key on them (generated with `systemd-id128 new`)."""

    SPEC_ACCEPTED = ("c2159ca4f2fb48f7ba81dc555524bb3e", 6)
    SPEC_REFUSED = ("a7ccc86d976f465e8eed237bd53775e5", 3)
    PROG_LOADED = ("d66b4504e8ea4acba0fa4812f7016885", 6)
    MAP_CREATED = ("550d59846a4349838cba47aea9556cff", 6)
    MAP_FROZEN = ("9096d1a7cde84ba4bb1bb6fd6884c221", 6)
    PIN_WRITTEN = ("39c88e1af2fb49c1aa4260a358ef7ad2", 7)
    ATTACHED = ("930fbbaf8f824b9684b1763a0cc74ff8", 6)
    CAPS_DROPPED = ("5164c769386f4cb9851d7ad469b14dc2", 6)
    RELOAD = ("30d43e2442a7435392d12a1e8a0047dd", 5)
    APPLY_FAILED = ("678aba50ab8948adb8649fd32ab81b06", 3)
    APPLIED = ("563a089a472c4b84b1e25cf85121bb8b", 5)
    ADOPTED = ("b297708e7f9c45749afe10bd34d7bc8f", 6)
    DETACHED = ("8559f087547a4d60af0eb4151538f384", 4)
    ROLLBACK = ("3f3ea8a7b48a4beabb942e034c249f76", 4)
    KILL_SWITCH = ("25923749acc24a649159ff3f7c274fdb", 2)
    DRIFT = ("79007ec174e649d3af7c5c0ade4b6236", 2)
    DEGRADED = ("0b7a57629d204144a63b89f82508cee1", 4)
    DAEMON = ("537fd8df20854c7fb12cfe71dabd8006", 6)
    FOREIGN_LOAD = ("bf1c0e481b4144f3baeeab240e3bc892", 2)
    BPF_EVENT = ("ae4170c9644a4b758feac1c0faf6c4b1", 6)
    EVENTS_DROPPED = ("097238fbfadb44ee9490cee1a47a7794", 4)
    SETTINGS_CHANGED = ("cbf9bde5ac734fbea24737df54d57c3e", 5)
    PRIVILEGED_READ = ("cb4477063c014d02b2097081b049f5fd", 5)
    INTERNAL_ERROR = ("acef51f86e3c4200b4feecd38aed1623", 3)
    EVENTS_LOST = ("752292fea5c24542aab2bddc4e994655", 4)
    MAP_FILLING = ("cb2e232e1c5a4eaa86a17b144402c3b0", 4)

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

SYSLOG_IDENTIFIER = "loaderd"
# An operator's action (`loaderd disable`, `enable`, `rollback`, an apply by hand) runs as root
# outside any unit. `journalctl -u U` matches, besides the unit's own processes, entries with
# `_UID=0` and `OBJECT_SYSTEMD_UNIT=U` (systemd's add_matches_for_unit(), journalctl 252:
# journald sets _UID itself, so only root can be seen this way): naming loaderd.service there
# puts those actions in README's `journalctl -u loaderd -u loaderd-apply` view.
OPERATOR_UNIT = "loaderd.service"
_OPERATOR_UNIT = (OPERATOR_UNIT if os.geteuid() == 0 and not os.environ.get("INVOCATION_ID")
                  else None)
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# Keys of the stderr JSON record that belong to the event itself; a caller field with one of
# these names is renamed to field_<name> instead of overwriting it.
_RECORD_KEYS = frozenset({"ts", "event", "message_id", "priority", "message", "uid",
                          "login_uid", "code_file", "code_line", "code_func"})
_NO_LOGIN_UID = 4294967295  # (uid_t)-1: no login session behind this process

_lock = threading.Lock()
_logger: Any = None  # structlog BoundLogger, built on the first emit() after configure()
_configured = False  # configure() chose the sink (_journal, _fallback)
_fallback: IO[str] | None = None  # where journald sink failures still get written
_journal = False  # the sink configure() chose
_auto = True  # configure() chose the sink itself (journal=None)
_spool: Spool | None = None  # where journal entries go while journald is unreachable


Plain = str | int | bool | None | list[str | int | None]  # a sanitized record's values (emit_plain)


def sorted_json() -> Callable[[Any], str]:
    """`json.dumps(obj, sort_keys=True, default=str)` (the JSON sink renderer's call) for
    acyclic data, with the C encoder made once: JSONEncoder.encode makes a new one per call,
    half of its cost on an event's small dicts. The output is json's own, byte for byte; only
    the cycle check is off (decoded records hold no cycles)."""
    from json import encoder

    make = getattr(encoder, "c_make_encoder", None)  # None: an interpreter without _json
    if make is None:
        return json.JSONEncoder(sort_keys=True, default=str).encode
    chunks = make(None, str, encoder.encode_basestring_ascii, None, ": ", ", ", True, False,
                  True)
    return lambda obj: "".join(chunks(obj, 0))


_JSON = sorted_json()
# An event's (name, MESSAGE_ID, PRIORITY): three enum property reads were 5% of a record's cost
_FACTS = {e: (e.name.lower(), e.message_id, e.priority) for e in Event}


# The names come from the code and from layouts' field names (a bounded set); computing them
# was half of emit()'s own CPU for a journal entry.
@functools.lru_cache(maxsize=4096)
def journal_field(key: str) -> str:
    name = FIELD_NAMES.get(key) or "LOADERD_" + key.upper()
    # journald silently drops invalid names: keep to A-Z0-9_, <= 64 chars, no leading "_" or
    # digit (a leading "_" would also claim to be a trusted field).
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_"
                   for c in name.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "LOADERD_" + name
    return name[:64]


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()  # prog tags and raw keys: hex, never undecodable bytes
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(_text(v) for v in value)
    return str(value)


@functools.cache  # only the process itself could change it (loaderd never does); was 30% of emit()
def _login_uid() -> int | None:
    try:
        with open("/proc/self/loginuid") as f:
            uid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if uid == _NO_LOGIN_UID else uid


def _caller() -> tuple[str, int, str]:
    """Code location of whoever called emit(), for CODE_FILE/CODE_LINE/CODE_FUNC."""
    frame = sys._getframe(1)
    here = frame.f_code.co_filename
    while frame.f_back is not None and frame.f_code.co_filename == here:
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name


# -- processors (structlog): event_dict in, event_dict out -------------------------------------

def _add_identity(_logger: Any, _name: str, event_dict: MutableMapping[str, Any],
                  ) -> MutableMapping[str, Any]:
    event_dict["uid"] = os.getuid()
    login = _login_uid()
    if login is not None:
        event_dict["login_uid"] = login
    return event_dict


def _plain_values(_logger: Any, _name: str, event_dict: MutableMapping[str, Any],
                  ) -> MutableMapping[str, Any]:
    """JSON has no bytes: prog tags and raw keys become hex, as in the journal."""
    for key, value in event_dict.items():
        if isinstance(value, bytes | bytearray):
            event_dict[key] = bytes(value).hex()
    return event_dict


def _journal_entry(event: Event, message: str, record: Mapping[str, Any],
                   code: tuple[str, int, str]) -> dict[str, Any]:
    """The exact journald fields of one event, uppercase."""
    name, message_id, priority = _FACTS[event]
    entry: dict[str, Any] = {
        "MESSAGE": message, "MESSAGE_ID": message_id, "PRIORITY": str(priority),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER, "LOADERD_EVENT": name,
        "LOADERD_UID": str(os.getuid()), "CODE_FILE": code[0], "CODE_LINE": code[1],
        "CODE_FUNC": code[2]}
    login = _login_uid()
    if login is not None:
        entry["LOADERD_LOGIN_UID"] = str(login)
    if _OPERATOR_UNIT is not None:
        entry["OBJECT_SYSTEMD_UNIT"] = _OPERATOR_UNIT
    for key, value in record.items():
        if value is not None:
            entry.setdefault(journal_field(key), value if type(value) is str else _text(value))
    return entry


@functools.cache
def _systemd_journal() -> Any:
    from systemd import journal

    return journal


def _send(entry: Mapping[str, Any]) -> None:
    """One journald entry; while journald is unreachable, one line of the spool (audit.spool),
    which the resident replays later. `sendv` of the "FIELD=value" lines journal.send would
    make of the same fields (its per-field formatting was a tenth of an event's cost)."""
    journal = _systemd_journal()
    try:
        journal.sendv(*[f"{k}={v}" for k, v in entry.items()])
    except OSError as exc:
        if _spool is None or not _spool.append(entry, exc.strerror or str(exc)):
            raise


# structlog/__init__ imports structlog.dev, whose console renderer imports rich, colorama and
# better_exceptions when they are installed: 60-80 ms of every loaderd start (half of a restart
# apply) for tracebacks the audit trail never renders. They are hidden from that one import.
_DEV_EXTRAS = ("rich", "colorama", "better_exceptions")


def _import_structlog() -> Any:
    hidden = [m for m in _DEV_EXTRAS if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # `import m` raises ImportError
    try:
        import structlog
    finally:
        for m in hidden:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    return structlog


def _build(stream: IO[str]) -> Any:
    """The JSON sink: structlog's PrintLogger and JSONRenderer, the time stamp its own."""
    structlog = _import_structlog()
    return structlog.wrap_logger(
        structlog.PrintLogger(cast(TextIO, stream)),
        processors=[_add_identity, _plain_values,
                    structlog.processors.TimeStamper(fmt=None, key="ts"),
                    structlog.processors.JSONRenderer(sort_keys=True, default=str)],
        wrapper_class=structlog.BoundLogger,
        # bound once, not re-created by the lazy proxy on every event
        cache_logger_on_first_use=True)


def journal_available() -> bool:
    return os.path.exists(JOURNAL_SOCKET)


def configure(*, journal: bool | None = None, stream: IO[str] | None = None) -> None:
    """Pick the sink once. `journal=None`: journald if its socket exists, else stderr JSON.

    Uses its own structlog logger (wrap_logger), not the global structlog configuration, so
    nothing else in the process can reroute or reformat the audit trail by configuring structlog.
    The logger is built (and structlog imported) by the first event: a command that emits
    none (`status`, `plan`) never pays for it.
    """
    global _logger, _fallback, _journal, _auto, _configured
    use_journal = journal_available() if journal is None else journal
    with _lock:
        _journal = use_journal
        _auto = journal is None and stream is None
        _fallback = stream or sys.stderr
        _logger = None
        _configured = True


def _the_logger() -> Any:
    global _logger
    if not _configured and _logger is None:
        configure()
    with _lock:
        if _logger is None:
            _logger = _build(_fallback or sys.stderr)
        return _logger


def spool_in(state_dir: str) -> None:
    """Spool journal entries that journald does not take to <state_dir>/journal-spool.jsonl
    (the apply and the resident call it once they know their settings). A process that
    systemd connected to the journal (JOURNAL_STREAM) but that started while journald's
    socket was gone uses the journal sink anyway: its stderr leads to the same journald."""
    global _spool
    if not _configured:
        configure()
    with _lock:
        _spool = Spool(os.path.join(state_dir, SPOOL),
                       frozenset((e.message_id, str(e.priority)) for e in Event))
    if _auto and not _journal and os.environ.get("JOURNAL_STREAM"):
        configure(journal=True)


def backlog() -> Backlog | None:
    """The events spooled while journald was unreachable, not yet replayed."""
    return None if _spool is None else _spool.backlog()


def spool_dropped() -> int:
    """This process's events that neither journald nor the spool took (spool full)."""
    return 0 if _spool is None else _spool.dropped


def replay_spool() -> Replayed | None:
    """Send the spooled events to journald once it is reachable again (the resident's tick);
    None when there was nothing to send or journald is still unreachable."""
    if _spool is None or not _journal or (_spool.backlog() is None and not _spool.dropped):
        return None
    if not journal_reachable(JOURNAL_SOCKET):
        return None
    from systemd import journal

    return _spool.replay(journal.send)


def journaled() -> bool:
    """Events go to journald (the sink configure() chose)."""
    if not _configured and _logger is None:
        configure()
    return _journal


def debug(message: str, detail: str) -> None:
    """Internal detail (a traceback) for whoever debugs loaderd: a PRIORITY=7 journal entry,
    never part of an error shown to users. Without a journal there is no debug log: the
    CLI's --debug prints it instead."""
    if not _configured and _logger is None:
        configure()
    if not _journal:
        return
    from systemd import journal

    with contextlib.suppress(OSError):
        journal.send(MESSAGE=message, PRIORITY="7", SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
                     LOADERD_DEBUG=detail)


def new_error_id() -> str:
    """What a user is shown instead of an exception's text, and finds in the journal."""
    return secrets.token_hex(6)


def internal_error(error_id: str, exc_type: str, text: str, tb: str) -> None:
    """One INTERNAL_ERROR entry with LOADERD_ERROR_ID. The exception's text and traceback go
    only to the journal: without one, the JSON sink is the user's own stderr, so it gets the
    id and the exception type, never the text (rerun with --debug to see it)."""
    if not _configured and _logger is None:
        configure()
    if _journal:
        emit(Event.INTERNAL_ERROR, f"internal error {error_id}: {exc_type}", error_id=error_id,
             exception=exc_type, detail=text[:4000], traceback=tb[-16000:])
    else:
        emit(Event.INTERNAL_ERROR, f"internal error {error_id}: {exc_type}", error_id=error_id,
             exception=exc_type)


def emit(event: Event, message: str, **fields: Any) -> None:
    """Record one event. Never raises for a sink failure: the JSON line goes to stderr instead
    (which systemd also journals), because losing the daemon is worse than a degraded record."""
    _emit(event, message, fields, plain=False)


def emit_plain(event: Event, message: str, fields: Mapping[str, Plain]) -> None:
    """emit() of fields that are plain already (the event pump's sanitized records): the same
    journal entry or JSON line (tests/unit/test_event_records.py compares them), the JSON line
    without structlog's processor chain, which buys such fields nothing and was a third of
    the per-record cost."""
    _emit(event, message, fields, plain=True)


def _emit(event: Event, message: str, fields: Mapping[str, Any], *, plain: bool) -> None:
    if not _configured:
        configure()
    code = _caller()
    record = fields if _RECORD_KEYS.isdisjoint(fields) else {
        (f"field_{k}" if k in _RECORD_KEYS else k): v for k, v in fields.items()}
    try:
        if _journal:
            _send(_journal_entry(event, message, record, code))
        elif plain:
            _json_line(event, message, record, code)
        else:
            name, message_id, priority = _FACTS[event]
            _the_logger().msg(name, **record, message=message, message_id=message_id,
                              priority=priority, code_file=code[0], code_line=code[1],
                              code_func=code[2])
    except (OSError, UnicodeError) as exc:  # UnicodeError: a lone surrogate sendv refuses
        _sink_failed(event, message, record, code, exc)


def _json_line(event: Event, message: str, record: Mapping[str, Any],
               code: tuple[str, int, str]) -> None:
    """The JSON sink's line as structlog's chain (_build) renders it, for plain values."""
    name, message_id, priority = _FACTS[event]
    line = {**record, "message": message, "message_id": message_id, "priority": priority,
            "code_file": code[0], "code_line": code[1], "code_func": code[2], "event": name,
            "uid": os.getuid(), "ts": time.time()}
    login = _login_uid()
    if login is not None:
        line["login_uid"] = login
    text = _JSON(line) + "\n"
    stream = _fallback or sys.stderr
    with _lock:
        stream.write(text)
        stream.flush()


def _sink_failed(event: Event, message: str, record: Mapping[str, Any],
                 code: tuple[str, int, str], exc: OSError | UnicodeError) -> None:
    name, message_id, priority = _FACTS[event]
    stream = _fallback or sys.stderr
    line = {**record, "event": name, "message_id": message_id, "priority": priority,
            "message": message, "uid": os.getuid(), "sink_error": str(exc),
            "code_file": code[0], "code_line": code[1], "code_func": code[2]}
    with contextlib.suppress(OSError, ValueError):  # stderr may be journald's too
        stream.write(json.dumps(line, default=str, sort_keys=True) + "\n")
        stream.flush()

