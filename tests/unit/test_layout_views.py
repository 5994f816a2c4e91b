"""Typed views (issue 18 items 2-3): one layout language for the schema, the daemon and the
CLI; fields shown and sanitized by their declared kind, never by guessing."""

from __future__ import annotations

import ipaddress
import os
import struct
from pathlib import Path

import pytest

from loaderd import layout
from loaderd.cli.render import render_histogram
from loaderd.config.spec import parse_spec
from loaderd.errors import LoaderdError
from loaderd.model import FieldKind, HistKind, Histogram, Limits
from loaderd.observe.dump import histogram
from loaderd.sanitize import Key, Name, Opaque, Sanitizer
from loaderd.stage.compile import c_type

KEY = Key(b"k" * 32, "test")


def test_bytes_are_never_a_c_string_by_guessing() -> None:
    # syscount's {count: u64, total_ns: u64} value declared {bytes: 16}: count 59 (';'), then
    # NULs: shown as what it is, not as the text ";" that loses total_ns.
    value = struct.pack("<QQ", 59, 123456)
    san = Sanitizer(KEY)
    assert san({"value": Opaque(value)}) == {"value": value.hex()}
    assert san(layout.decode(b"\t\0\0\0", layout.parse_layout("key:bytes4"))) == {
        "key": "09000000"}


def test_a_path_is_not_scanned_for_addresses_but_a_string_is() -> None:
    rec = b"/tmp/x/10.1.2.3.log".ljust(32, b"\0") + b"from 10.1.2.3 ok".ljust(32, b"\0")
    fields = layout.parse_layout("file:char32:path,note:char32")
    out = Sanitizer(KEY)(layout.decode(rec, fields))
    assert out == {"file": "/tmp/x/10.1.2.3.log", "note": "from 10.1.2.0/24 ok"}
    # a secret in a path is still redacted: only the address scan is skipped
    rec = b"/run/password=hunter2".ljust(32, b"\0") + bytes(32)
    assert "hunter2" not in str(Sanitizer(KEY)(layout.decode(rec, fields)))


def test_layout_computes_c_padding_arrays_and_struct_size() -> None:
    fields = layout.parse_layout("a:u8,b:u64,c:u16[3],comm:char16:comm,_pad:u8,d:u32")
    assert [(f.name, f.offset, f.total) for f in fields] == [
        ("a", 0, 1), ("b", 8, 8), ("c", 16, 6), ("comm", 22, 16), ("_pad", 38, 1),
        ("d", 40, 4)]
    assert layout.struct_ctype(fields).size == 48  # rounded up to u64, as C does
    rec = bytes([7]) + bytes(7) + struct.pack("<QHHH", 9, 1, 2, 3) + b"bash".ljust(16, b"\0") \
        + b"\xff\0" + struct.pack("<I", 5) + bytes(4)
    assert layout.decode(rec, fields) == {"a": 7, "b": 9, "c": [1, 2, 3], "comm": Name("bash"),
                                          "d": 5, "_rest": Opaque(bytes(4))}
    # the text form round-trips (what the manifest keeps)
    assert layout.parse_layout(layout.layout_text(fields)) == fields


def test_enums_inline_and_btf_and_address_kinds() -> None:
    fields = layout.parse_layout("sig:s32:enum={1=HUP;9=KILL},state:u8:enum=tcp_state,"
                                 "src:u32:ipv4,dst:bytes16:ipv6")
    assert fields[0].kind is FieldKind.ENUM and fields[1].enum == "tcp_state"
    rec = struct.pack("<iB", 9, 1) + bytes(3) + bytes([10, 1, 2, 3]) + \
        ipaddress.IPv6Address("2001:db8::1").packed
    out = layout.decode(rec, fields, enums={"tcp_state": {1: "TCP_ESTABLISHED"}})
    assert out["sig"] == "KILL" and out["state"] == "TCP_ESTABLISHED"
    assert Sanitizer(KEY)(out) == {"sig": "KILL", "state": "TCP_ESTABLISHED",
                                   "src": "10.1.2.0/24", "dst": "2001:db8::/48"}
    assert layout.decode(struct.pack("<iB", 3, 7) + bytes(23), fields)["sig"] == 3  # unknown
    listed = layout.parse_fields([{"name": "sig", "type": "s32", "enum": {"HUP": 1, "KILL": 9}},
                                  {"name": "state", "type": "u8", "enum": "tcp_state"},
                                  {"name": "src", "type": "u32", "kind": "ipv4"},
                                  {"name": "dst", "type": "bytes16", "kind": "ipv6"}])
    assert listed == fields


@pytest.mark.parametrize("bad", ["pid:u33", "pid", "Pid:u32", "x:bytes0", "", "a:u32:ipv6",
                                 "a:u64:ipv4", "a:char4:ipv4", "a:u32[2]:enum=x", "a:u8,a:u8",
                                 "a:u32:nope", "int:u32", "a:u8,struct:u8", "__x:u8",
                                 "u64:u64"])
def test_bad_layouts_refused(bad: str) -> None:
    with pytest.raises(LoaderdError):
        layout.parse_layout(bad)


def test_generated_c_types_are_named_and_laid_out_as_declared() -> None:
    ct = layout.struct_ctype(layout.parse_layout("pid:u32,ts:u64,comm:char16,_pad:u8,_pad:u8"))
    decl, name = c_type("counts", "key", ct)
    assert name == "loaderd_counts_key_t"
    assert decl == ("typedef struct loaderd_counts_key { u32 pid; u64 ts; char comm[16]; "
                    "u8 _pad; u8 _pad4; } loaderd_counts_key_t;\n")


SPEC = """loaderd: 1
source:
  inline: |
    int f(void *ctx) { return 0; }
maps:
  - name: counts
    type: hash
    key: {struct: "pid:u32,_pad:u32,ts:u64"}
    value: {struct: [{name: count, type: u64}, {name: comm, type: char16, kind: comm}]}
    max_entries: 64
  - name: dist
    type: array
    key: u32
    value: u64
    max_entries: 64
    histogram: {kind: log2, unit: usecs}
  - name: evs
    type: ringbuf
    max_entries: 4096
    events: {layout: "_pad:u32,pid:u32,file:char64:path"}
programs:
  - {name: f, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


def _spec(tmp_path: Path, text: str) -> tuple[object, list[LoaderdError]]:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    os.chmod(tmp_path, 0o755)
    return parse_spec(str(p), limits=Limits(), owner_uid=None)


def test_schema_accepts_struct_views_histograms_and_pad_names(tmp_path: Path) -> None:
    spec, errors = _spec(tmp_path, SPEC)
    assert not errors, [str(e) for e in errors]
    counts, dist, evs = spec.maps  # type: ignore[attr-defined]
    assert counts.key.size == 16 and [f.name for f in counts.key.fields] == ["pid", "_pad", "ts"]
    assert counts.value.size == 24 and counts.value.fields[1].kind is FieldKind.COMM
    assert dist.histogram == Histogram(HistKind.LOG2, "usecs")
    assert evs.events == "_pad:u32,pid:u32,file:char64:path"


def test_layout_errors_name_the_field_and_line(tmp_path: Path) -> None:
    _, errors = _spec(tmp_path, SPEC.replace('"pid:u32,_pad:u32,ts:u64"', '"pid:u32:ipv6"'))
    assert errors and errors[0].location.field == "maps[0].key.struct"
    assert errors[0].location.line == 8
    _, errors = _spec(tmp_path, SPEC.replace("    value: u64\n    max_entries: 64\n    hist",
                                             "    value: {bytes: 8}\n    max_entries: 64\n"
                                             "    hist"))
    assert errors and "histogram" in str(errors[0]) and "scalars" in str(errors[0])


def test_log2_histogram_renders_like_bcc_print_log2_hist() -> None:
    # slot i counts [2^(i-1), 2^i - 1]; BCC prints every slot from 1 up to the highest
    # non-empty one, 40 stars for the largest count.
    entries = [{"key": i, "value": v} for i, v in enumerate([0, 1, 0, 4, 8, 2] + [0] * 58)]
    h = histogram(Histogram(HistKind.LOG2, "usecs"), entries)
    assert [(b["low"], b["high"], b["count"]) for b in h["buckets"]] == [
        (0, 1, 1), (2, 3, 0), (4, 7, 4), (8, 15, 8), (16, 31, 2)]
    assert render_histogram(h) == [
        "     usecs               : count     distribution",
        "         0 -> 1          : 1        |*****                                   |",
        "         2 -> 3          : 0        |                                        |",
        "         4 -> 7          : 4        |********************                    |",
        "         8 -> 15         : 8        |****************************************|",
        "        16 -> 31         : 2        |**********                              |"]
    # a key past slot 64 is no u64's log2 (a hostile map): not a bucket, not a crash
    hostile = histogram(Histogram(HistKind.LOG2, "usecs"), [*entries, {"key": 20000, "value": 1}])
    assert hostile["buckets"] == h["buckets"]
    assert render_histogram(hostile) == render_histogram(h)
    lin = histogram(Histogram(HistKind.LINEAR, "ms", 10), [{"key": 0, "values": [1, 2]},
                                                           {"key": 2, "values": [3, 0]}])
    assert [(b["low"], b["count"]) for b in lin["buckets"]] == [(0, 3), (10, 0), (20, 3)]
    assert render_histogram(lin)[0] == "     ms            : count     distribution"


def test_schema_layout_pattern_is_the_parsers() -> None:
    import json

    from loaderd.config import schema as schemacheck

    path = Path(schemacheck.__file__).parent / "schemas" / "spec.schema.json"
    defs = json.loads(path.read_text())["$defs"]
    assert defs["layout"]["then"]["pattern"] == layout.LAYOUT_PATTERN
