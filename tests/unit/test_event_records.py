"""The event pump's fast path against the reference it replaces, byte for byte over a large
seeded corpus: runtime.records.Records (one unpack, a cleaner per field) against
`Sanitizer(decode(...))`, and audit.emit_plain against audit.emit for both sinks (the JSON
line and the journal entry), failures included. The real kernel's events run through the same
code in tests/e2e (ring and perf buffer tests)."""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest

from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.errors import LoaderdError
from loaderd.layout import parse_layout
from loaderd.model import Field
from loaderd.runtime.eventpump import EventPump
from loaderd.runtime.records import Records
from loaderd.sanitize import Rules, Sanitizer
from tests.unit.test_sanitize_fast import KEY, corpus

LAYOUTS = [
    "pid:u32,uid:u32,comm:char16:comm,note:char32,saddr:u32",  # bench/'s
    "ids:u32[4],state:u8:enum={0=RUNNING;1=SLEEPING;2=STOPPED},_pad:u8[3],daddr:u32:ipv4,"
    "d6:bytes16:ipv6,path:char24:path,blob:bytes8:hex,sig:s32:enum=signals,ts:u64,ip:u32,"
    "addr:bytes4:ipv4,s8v:s8,s16v:s16,s64v:s64,u16v:u16,neg:s16[3]",
    "password:char16,token:u64,user:char8:comm,email:char20:string,peer:u32,note:char40,"
    "raw:bytes6,gone:u32:enum=missing",
    "a:u8,b:u64,c:u8,d:u32",  # alignment gaps
    "_lead:u32,pid:u32,_tail:u16",  # hidden first and last
]
RULES = [
    Rules(), Rules(secrets_in_text=False), Rules(ipv4_prefix=0, ipv6_prefix=128),
    Rules(ipv4_prefix=13, ipv6_prefix=61),
    Rules.from_mapping({"keep": ["pid", "comm", "ids", "state", "_rest", "note", "d6",
                                 "password", "b"]}),
    Rules.from_mapping({"drop": ["note", "ids", "blob", "a"],
                        "redact": ["comm", "ids", "state", "d6", "neg", "_rest"],
                        "pseudonymize": ["saddr", "ip", "path", "blob", "sig", "ts", "addr",
                                         "raw", "gone"],
                        "ip_fields": ["note", "d6", "ids", "blob", "peer", "comm", "state",
                                      "email", "d"]}),
    Rules.from_mapping({"pseudonymize": ["ids", "comm", "note", "state", "d6", "daddr",
                                         "_rest", "neg"],
                        "ip_fields": ["pid", "ts", "path", "c", "raw", "s16v"]}),
    Rules.from_mapping({"keep": ["x", "y", "saddr", "ip", "note"], "drop": ["y"],
                        "redact": ["ip"], "pseudonymize": ["x"], "ip_fields": ["note", "x"],
                        "ipv4_prefix": 8, "secrets_in_text": False}),
]
# BTF-style enums (EventPump reads them from /sys/kernel/btf/vmlinux): a label is text too
ENUMS = {"signals": {9: "SIGKILL", 15: "SIGTERM", 2: "password=hunter2 10.1.2.3", -1: "NEG"}}


def records(layout: tuple[Field, ...], n: int, seed: int) -> Iterator[bytes]:
    """`n` varied records: texts from the sanitizer corpus in the strings, small values in the
    enums, random bytes elsewhere; one in ten cut short, one in ten with bytes past the end."""
    rng = random.Random(seed)
    texts = corpus(n // 4 + 50, seed=seed)
    end = layout[-1].offset + layout[-1].total
    for _ in range(n):
        buf = bytearray(rng.getrandbits(8) for _ in range(end))
        for f in layout:
            if f.type == "char":
                text = rng.choice(texts).encode("utf-8", "surrogatepass")
                if rng.random() < 0.1:
                    text = bytes([0xff, 0xc3]) + text  # not UTF-8
                raw = text[:f.total] if rng.random() < 0.1 else text[:f.total - 1] + b"\0"
                buf[f.offset:f.offset + len(raw)] = raw
            elif f.kind == "enum" and rng.random() < 0.8:
                v = rng.choice([0, 1, 2, 9, 15, -1, 2**(8 * f.size - 1) - 1])
                buf[f.offset:f.offset + f.size] = (v % 2**(8 * f.size)).to_bytes(f.size, "little")
        cut = rng.random()
        if cut < 0.1:
            yield bytes(buf[:rng.randrange(end)])
        elif cut < 0.2:
            yield bytes(buf) + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 9)))
        else:
            yield bytes(buf)


CASES = [(li, ri) for li in range(len(LAYOUTS)) for ri in range(len(RULES))]


@pytest.mark.parametrize(("li", "ri"), CASES, ids=[f"layout{li}-rules{ri}" for li, ri in CASES])
def test_records_are_byte_identical_to_decode_then_sanitize(li: int, ri: int) -> None:
    layout = parse_layout(LAYOUTS[li])
    rec = Records(layout, Sanitizer(KEY, RULES[ri]), ENUMS)
    for record in records(layout, 1500, seed=li * 100 + ri):
        got, ref = rec(record), rec.reference(record)
        assert list(got.items()) == list(ref.items()), record.hex()  # order, keys, values
        assert json.dumps(got, default=str, sort_keys=True) == \
            json.dumps(ref, default=str, sort_keys=True), record.hex()  # types too


NAMES = ["pid", "uid", "saddr", "daddr", "ip", "addr", "password", "token", "user", "email",
         "comm", "note", "path", "payload", "raw_payload", "secret", "x", "y", "state", "_pad",
         "_gap", "cookie", "login_uid", "api-key"]
TYPES = ["u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "u32[3]", "u8[5]", "s16[2]",
         "bytes4", "bytes16", "bytes7", "char8", "char16", "char33"]
KINDS = ["", "", "hex", "ipv4", "ipv6", "string", "path", "comm", "int", "enum=signals",
         "enum=missing", "enum={0=A;1=B;9=K}"]


def random_layouts(n: int, seed: int) -> Iterator[tuple[Field, ...]]:
    """Layouts parse_layout accepts, drawn at random (names the rules single out included)."""
    rng = random.Random(seed)
    made = 0
    while made < n:
        names = rng.sample(NAMES, rng.randint(1, 7))
        text = ",".join(f"{name.replace('-', '_')}:{rng.choice(TYPES)}"
                        + (f":{k}" if (k := rng.choice(KINDS)) else "") for name in names)
        try:
            layout = parse_layout(text)
        except LoaderdError:
            continue
        made += 1
        yield layout


def test_random_layouts_and_rules_give_the_reference_output() -> None:
    """Every field type x kind x rule the layout language allows, at random: 400 layouts,
    40 records each, under a random one of the rule sets."""
    rng = random.Random(16)
    for i, layout in enumerate(random_layouts(400, seed=16)):
        rec = Records(layout, Sanitizer(KEY, rng.choice(RULES)), ENUMS)
        for record in records(layout, 40, seed=i):
            got, ref = rec(record), rec.reference(record)
            assert list(got.items()) == list(ref.items()), (layout, record.hex())
            assert json.dumps(got, default=str, sort_keys=True) == \
                json.dumps(ref, default=str, sort_keys=True)


def test_the_corpus_reaches_every_rule_and_kind() -> None:
    """What the comparison above covers: every cleaner kind is taken and each rule changes
    values (a corpus that never redacted or masked would compare nothing)."""
    seen: set[str] = set()
    outputs: list[str] = []
    for li, ri in CASES:
        layout = parse_layout(LAYOUTS[li])
        rec = Records(layout, Sanitizer(KEY, RULES[ri]), ENUMS)
        seen |= {getattr(c, "__qualname__", "?").split(".")[-1] for _, c, _ in rec.plan}
        for record in records(layout, 200, seed=li):
            outputs.append(json.dumps(rec(record), default=str))
    text = "\n".join(outputs)
    for marker in ("[REDACTED]", "anon:", "/24", "/13", "/0\"", "/61", "SIGKILL", "RUNNING",
                   '"_short": true', '"_rest": "', "\\ufffd"):
        assert marker in text, marker
    assert {"reference", "<lambda>", "decoded", "label"} <= seen, seen


def test_a_wrong_cleaner_is_caught() -> None:
    """The comparison fails when one field's fast cleaner differs from the reference."""
    layout = parse_layout(LAYOUTS[0])
    rec = Records(layout, Sanitizer(KEY, Rules()), ENUMS)
    rec.plan = [(n, (lambda v: v) if n == "saddr" else c, i) for n, c, i in rec.plan]
    assert any(rec(r) != rec.reference(r) for r in records(layout, 50, seed=1))


# -- emit_plain vs emit -----------------------------------------------------------------------

FIELD_SETS: list[dict[str, Any]] = [
    {"spec": "web", "map": "events", "event_pid": 7, "event_comm": "sshd"},
    {"spec": "web", "map": "events", "backlog": True, "event_note": "ünï \"q\" \\ \n\t\0",
     "event_ids": [1, 2, 3], "event_none": None, "event_neg": -5, "event_big": 2**64 - 1},
    # keys of the record itself are renamed field_<key>, in both (emit's own parameters,
    # `event` and `message`, cannot be passed to it)
    {"spec": "x", "uid": 0, "ts": 1, "code_line": 1, "code_func": "f", "login_uid": 5,
     "priority": 0, "message_id": "0" * 32},
    {"spec": "x", "map": "m", "event_labels": ["a", None, 3], "event_empty": "",
     "event_x" * 8: "long key", "we-ird.key": "v", "event_f": False},
]
_TS = re.compile(r'"ts": [0-9.e+-]+')
_LINE = re.compile(r'"code_line": \d+')


def _both(fields: dict[str, Any]) -> None:
    message = "web/events: " + json.dumps(fields, default=str, sort_keys=True)
    audit.emit(Event.BPF_EVENT, message, **fields)
    audit.emit_plain(Event.BPF_EVENT, message, fields)


@pytest.fixture
def restore_audit() -> Iterator[None]:
    yield
    audit.configure()


@pytest.mark.usefixtures("restore_audit")
@pytest.mark.parametrize("fields", FIELD_SETS, ids=range(len(FIELD_SETS)))
def test_emit_plain_writes_the_json_line_emit_writes(fields: dict[str, Any]) -> None:
    buf = io.StringIO()
    audit.configure(journal=False, stream=buf)
    _both(fields)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    a, b = (_LINE.sub('"code_line": 0', _TS.sub('"ts": 0', ln)) for ln in lines)
    assert a == b
    assert abs(json.loads(lines[0])["ts"] - json.loads(lines[1])["ts"]) < 5


@pytest.mark.usefixtures("restore_audit")
@pytest.mark.parametrize("fields", FIELD_SETS, ids=range(len(FIELD_SETS)))
def test_the_journal_entry_holds_the_json_lines_facts(
        fields: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sinks carry the same facts: the entry emit and emit_plain send (the same lines)
    against the JSON line structlog renders, field by field; and the lines are the ones
    python-systemd's journal.send makes of the same fields."""
    from systemd import journal

    sent: list[tuple[str, ...]] = []
    monkeypatch.setattr(journal, "sendv", lambda *lines: sent.append(lines))
    audit.configure(journal=True)
    _both(fields)
    assert len(sent) == 2
    a, b = ([re.sub(r"^CODE_LINE=\d+$", "CODE_LINE=0", ln) for ln in e] for e in sent)
    assert a == b
    entry = dict(ln.split("=", 1) for ln in sent[0])
    assert entry["CODE_FUNC"] == "_both"

    buf = io.StringIO()
    audit.configure(journal=False, stream=buf)
    audit.emit(Event.BPF_EVENT, "web/events: x", **fields)
    line = json.loads(buf.getvalue())
    assert entry["MESSAGE_ID"] == line.pop("message_id")
    assert entry["PRIORITY"] == str(line.pop("priority"))
    assert entry["LOADERD_EVENT"] == line.pop("event")
    assert entry["LOADERD_UID"] == str(line.pop("uid"))
    assert entry["CODE_FILE"] == line.pop("code_file")
    if "login_uid" in line:
        assert entry["LOADERD_LOGIN_UID"] == str(line.pop("login_uid"))
    for key in ("ts", "message", "code_line", "code_func"):
        del line[key]
    for key, value in line.items():
        if value is not None:
            assert entry[audit.journal_field(key)] == audit._text(value), key
        else:
            assert audit.journal_field(key) not in entry

    by_send: list[tuple[str, ...]] = []
    monkeypatch.setattr(journal, "sendv", lambda *lines: by_send.append(lines))
    journal.send(**{k: int(v) if k == "CODE_LINE" else v for k, v in entry.items()})
    assert sorted(by_send[0]) == sorted(sent[0])


@pytest.mark.usefixtures("restore_audit")
def test_emit_plain_falls_back_as_emit_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """journald refusing the entry (no spool): the fallback JSON line, the same from both."""
    from systemd import journal

    def refuse(*_lines: Any) -> None:
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(journal, "sendv", refuse)
    buf = io.StringIO()
    audit.configure(journal=True, stream=buf)
    _both(FIELD_SETS[1])
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "sink_error" in json.loads(lines[0])
    a, b = (_LINE.sub('"code_line": 0', ln) for ln in lines)
    assert a == b


@pytest.mark.usefixtures("restore_audit")
def test_the_pump_journals_what_the_reference_would(tmp_path: Any) -> None:
    """EventPump.journal (Records + emit_plain) against decode + sanitize + emit, whole lines,
    over varied records of bench/'s layout and a wide one."""
    from loaderd.model import Settings

    pump = EventPump(Settings(state_dir=str(tmp_path)))
    for text in LAYOUTS[:2]:
        layout = parse_layout(text)
        rec = Records(layout, pump.clean, ENUMS)
        for record in records(layout, 300, seed=3):
            buf = io.StringIO()
            audit.configure(journal=False, stream=buf)
            pump.journal("web", "events", record, rec, backlog=record[0] & 1 == 1)
            ref = rec.reference(record)
            message = "web/events: " + json.dumps(ref, default=str, sort_keys=True)
            audit.emit(Event.BPF_EVENT, message, spec="web", map="events",
                       **({"backlog": True} if record[0] & 1 else {}),
                       **{f"event_{k.lstrip('_')}": v for k, v in ref.items()})
            got, want = (json.loads(ln) for ln in buf.getvalue().splitlines())
            for line in (got, want):
                del line["ts"], line["code_line"], line["code_func"], line["code_file"]
            assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def test_odd_enum_labels_and_a_none_pseudonym_give_the_reference_output() -> None:
    """Labels that are not str (only a caller's own enums could hold them) and a label of None
    under pseudonymize: the reference's _value decides, as for any other value."""
    enums: Any = {"odd": {3: b"bytes", 1: None, 2: 2.5, 4: "10.1.2.3 token=x"}}
    for rules in (Rules(), Rules.from_mapping({"pseudonymize": ["st"]})):
        rec = Records(parse_layout("st:u8:enum=odd"), Sanitizer(KEY, rules), enums)
        for raw in (b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"):
            assert list(rec(raw).items()) == list(rec.reference(raw).items()), (rules, raw)


def test_a_field_named_rest_keeps_its_journal_field() -> None:
    """`rest` and the trailing bytes (`_rest`) are two journal fields, not one overwritten."""
    rec = Records(parse_layout("rest:u32"), Sanitizer(KEY, Rules()), ENUMS)
    keys = rec.journal_keys(rec(bytes.fromhex("2a000000dead")))
    assert keys == {"event_rest": 42, "event__rest": "dead"}
    assert audit.journal_field("event__rest") == "LOADERD_EVENT__REST"


@pytest.mark.usefixtures("restore_audit")
def test_a_value_journald_cannot_encode_falls_back_to_json(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone surrogate (sendv encodes strict UTF-8) is a sink failure, not an exception out
    of emit: the event is written as the fallback JSON line."""
    from systemd import journal

    def strict(*lines: str) -> None:
        for line in lines:
            line.encode("utf-8")
    monkeypatch.setattr(journal, "sendv", strict)
    buf = io.StringIO()
    audit.configure(journal=True, stream=buf)
    audit.emit(Event.BPF_EVENT, "web/events: x", spec="web", event_note="a\udcffb")
    audit.emit_plain(Event.BPF_EVENT, "web/events: x", {"spec": "web", "event_note": "a\udcffb"})
    lines = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert len(lines) == 2 and all(ln["event_note"] == "a\udcffb" for ln in lines)
    assert all("sink_error" in ln for ln in lines)
