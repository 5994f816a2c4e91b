"""Spec loading: the typed objects built, error collection, directory loading, the C source
text checks and the shipped JSON Schema itself."""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from loaderd.config import source as srccheck
from loaderd.config import spec as specmod
from loaderd.errors import Kind, LoaderdError
from loaderd.model import (
    CgroupSkbAttach,
    CType,
    Limits,
    MapEntry,
    MapFlag,
    MapType,
    NoAttach,
    ProgType,
    RawTracepointAttach,
    Settings,
    Spec,
    TracepointAttach,
    XdpAttach,
)

C_SOURCE = """#include <linux/sched.h>
int count(void *ctx) { return 0; }
int count_v2(void *ctx) { return 1; }
"""
SPEC = """\
loaderd: 1
name: demo
description: demo spec
source:
  file: demo.bpf.c
maps:
  - name: counts
    type: array
    key: u32
    value: u64
    max_entries: 4
    flags: [RDONLY_PROG]
    freeze: true
    initial:
      - {key: 1, value: 42}
  - name: blobs
    type: hash
    key: {bytes: 2}
    value: s8
    max_entries: 8
    preserve: true
    initial:
      - {key: "0aff", value: -5}
  - {name: events, type: ringbuf, max_entries: 8192}
programs:
  - name: count
    type: tracepoint
    attach: {tracepoint: "sched:sched_switch"}
    fallback: [count_v2]
  - name: raw
    type: raw_tracepoint
    attach: {raw_tracepoint: sys_enter}
  - name: pkt
    type: xdp
    attach: {xdp: {interface: lo}}
  - {name: sock, type: socket_filter}
"""


def write(folder: Path, name: str, text: str | bytes, mode: int = 0o644) -> Path:
    path = folder / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o755)
    return tmp_path


def load(path: Path) -> Spec:
    return specmod.load_spec(str(path), limits=Limits(), owner_uid=None)


def refused(path: Path, limits: Limits | None = None) -> LoaderdError:
    with pytest.raises(LoaderdError) as info:
        specmod.load_spec(str(path), limits=limits or Limits(), owner_uid=None)
    return info.value


def inline_spec(c_text: str, extra: str = "") -> str:
    body = textwrap.indent(c_text, "    ")
    return (f"loaderd: 1\nsource:\n  inline: |\n{body}programs:\n"
            f"  - {{name: count, type: socket_filter}}\n{extra}")


def test_builds_typed_objects(folder: Path) -> None:
    write(folder, "demo.bpf.c", C_SOURCE)
    path = write(folder, "x.yaml", SPEC)
    s = load(path)
    assert (s.name, s.description, s.path) == ("demo", "demo spec", str(path))
    assert s.source == C_SOURCE and s.source_path == str(folder / "demo.bpf.c")
    counts, blobs, events = s.maps
    assert (counts.type, counts.key, counts.value) == (MapType.ARRAY, CType("u32", 4),
                                                      CType("u64", 8))
    assert counts.flags == frozenset({MapFlag.RDONLY_PROG}) and counts.freeze
    assert counts.initial == (MapEntry(1, 42, 15),) and counts.line == 7
    assert blobs.key == CType(None, 2) and blobs.value.signed and blobs.preserve
    assert blobs.initial == (MapEntry(b"\x0a\xff", -5, 23),)
    assert (events.type, events.key.size, events.max_entries) == (MapType.RINGBUF, 0, 8192)
    count, raw, pkt, sock = s.programs
    assert count.attach == TracepointAttach("sched", "sched_switch")
    assert count.fallback == ("count_v2",) and count.type is ProgType.TRACEPOINT
    assert raw.attach == RawTracepointAttach("sys_enter")
    assert pkt.attach == XdpAttach("lo", "skb")
    assert sock.attach == NoAttach() and sock.line == 36
    assert s.line_of("maps", 1, "initial", 0, "value") == 23
    assert s.line_of("programs", 2, "nope") == 33


def test_sha256_covers_yaml_and_source(folder: Path) -> None:
    write(folder, "demo.bpf.c", C_SOURCE)
    path = write(folder, "x.yaml", SPEC)
    want = hashlib.sha256(SPEC.encode() + b"\0" + C_SOURCE.encode()).hexdigest()
    assert load(path).sha256 == want
    write(folder, "demo.bpf.c", C_SOURCE + "// changed\n")
    assert load(path).sha256 != want


def test_inline_source_and_default_name(folder: Path) -> None:
    text = inline_spec("int count(struct __sk_buff *s) { return 0; }\n")
    s = load(write(folder, "my_filter.yaml", text))
    assert s.name == "my_filter" and s.source_path is None
    assert s.source == "int count(struct __sk_buff *s) { return 0; }\n"
    assert s.sha256 == hashlib.sha256(text.encode() + b"\0" + s.source.encode()).hexdigest()


def test_invalid_file_stem_asks_for_a_name(folder: Path) -> None:
    err = refused(write(folder, "10-xdp.yaml", inline_spec("int count(void) {}\n")))
    assert err.kind is Kind.SEMANTIC and err.location.field == "name"
    assert "add a `name:` key" in err.message


def test_inline_source_errors_point_into_the_spec(folder: Path) -> None:
    text = inline_spec("int a;\n#include <linux/x.h>\n#include \"mine.h\"\nint count(void) {}\n")
    err = refused(write(folder, "x.yaml", text))
    assert (err.kind, err.location.line, err.location.field) == (Kind.POLICY, 6,
                                                                 "source.inline")


def test_source_file_errors_point_into_the_c_file(folder: Path) -> None:
    write(folder, "demo.bpf.c", C_SOURCE + "\nextern int b;\n")
    err = refused(write(folder, "x.yaml", SPEC))
    assert err.location.file == str(folder / "demo.bpf.c") and err.location.line == 5


def test_hard_linked_source_is_refused_and_never_echoed(folder: Path, tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("extern root:TOPSECRET:19000::::::\n")
    os.chmod(secret, 0o600)
    os.link(secret, folder / "demo.bpf.c")
    spec, errors = specmod.parse_spec(str(write(folder, "x.yaml", SPEC)), limits=Limits(),
                                      owner_uid=0)
    assert spec is None and len(errors) == 1
    assert errors[0].kind is Kind.TRUST and "hard links" in str(errors[0])
    assert errors[0].location.field == "source.file" and errors[0].location.line == 5
    assert all("TOPSECRET" not in f"{e} {e.detail}" for e in errors)


FLOOD = ("loaderd: 1\nsource: {inline: \"int f(void *c) { return 0; }\"}\n"
         "programs: [{name: f, type: socket_filter}]\nmaps:\n" + "- 1\n" * 20000)


def test_an_error_flood_is_capped_per_file_and_counted(folder: Path) -> None:
    from loaderd.errors import MAX_PER_FILE, count

    assert 60_000 < len(FLOOD) < 90_000
    spec, errors = specmod.parse_spec(str(write(folder, "flood.yaml", FLOOD)), limits=Limits(),
                                      owner_uid=None)
    assert spec is None and len(errors) == MAX_PER_FILE + 1
    assert errors[-1].more == 20001 - MAX_PER_FILE and count(errors) == 20001
    assert str(errors[-1]).endswith("and 19981 more errors in this file (fix the ones above "
                                    "first)")
    assert errors[-1].location.file == str(folder / "flood.yaml")


def test_cap_per_file_keeps_each_files_first_errors_in_order() -> None:
    from loaderd.errors import Location, cap_per_file, count

    errs = [LoaderdError(Kind.SCHEMA, f"e{i}", Location(f, i)) for f in ("a", "b")
            for i in range(5)] + [LoaderdError(Kind.SCHEMA, "c", Location("c"))]
    capped = cap_per_file(errs, limit=2)
    assert [(e.location.file, e.message, e.more) for e in capped] == [
        ("a", "e0", 0), ("a", "e1", 0), ("a", "and 3 more errors in this file (fix the ones "
                                         "above first)", 3),
        ("b", "e0", 0), ("b", "e1", 0), ("b", capped[5].message, 3), ("c", "c", 0)]
    assert count(capped) == count(errs) == 11
    assert cap_per_file(capped, limit=2) == capped  # capping twice changes nothing
    assert "1 more error in" in cap_per_file(errs[:3], limit=2)[-1].message


def test_check_prints_at_most_21_lines_for_a_flood(folder: Path) -> None:
    from tests.conftest import loaderd

    write(folder, "flood.yaml", FLOOD)
    out = loaderd("check", "--no-kernel", "--dir", str(folder), check=False)
    lines = out.stderr.splitlines()
    assert out.returncode == 1 and len(lines) == 21, out.stderr[-2000:]
    assert "and 19981 more errors" in lines[-1] and "0 specs, 20001 errors" in out.stdout


def test_all_errors_of_a_file_are_collected(folder: Path) -> None:
    text = SPEC.replace("value: 42", "value: -1").replace("value: -5", "value: 200")
    write(folder, "demo.bpf.c", "int count(void *c) { return 0; }\nextern int x;\n")
    path = write(folder, "x.yaml", text.replace("[count_v2]", "[nothere]"))
    spec, errors = specmod.parse_spec(str(path), limits=Limits(), owner_uid=None)
    assert spec is None
    assert [(e.kind, e.location.field) for e in errors] == [
        (Kind.SEMANTIC, "maps[0].initial[0].value"),
        (Kind.SEMANTIC, "maps[1].initial[0].value"),
        (Kind.SEMANTIC, "programs[0].fallback[0]"),
        (Kind.POLICY, None),
    ]
    assert refused(path).location.field == "maps[0].initial[0].value"


def test_schema_errors_are_all_reported_sorted(folder: Path) -> None:
    path = write(folder, "x.yaml", "loaderd: 2\nsource: {}\nprograms: []\nextra: 1\n")
    _, errors = specmod.parse_spec(str(path), limits=Limits(), owner_uid=None)
    assert [(e.location.line, e.location.field) for e in errors] == [
        (1, "loaderd"), (2, "source"), (3, "programs"), (4, "extra")]


def test_source_size_limits(folder: Path) -> None:
    big = inline_spec("int count(void) { return 0; }\n" + "// pad\n" * 20)
    err = refused(write(folder, "x.yaml", big), Limits(max_source_bytes=64))
    assert err.kind is Kind.LIMIT and err.location.field == "source.inline"


def test_source_must_be_utf8_without_nul(folder: Path) -> None:
    write(folder, "demo.bpf.c", b"int count(void *c) {}\n\0\n")
    err = refused(write(folder, "x.yaml", SPEC))
    assert "NUL" in err.message and err.location.line == 2


def test_ownership_is_checked_by_default(folder: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    path = write(folder, "x.yaml", inline_spec("int count(void) {}\n"))
    os.chown(path, 4242, -1)
    with pytest.raises(LoaderdError) as info:
        specmod.load_spec(str(path), limits=Limits())
    assert info.value.kind is Kind.TRUST
    assert load(path).name == "x"  # owner_uid=None: `loaderd check` by an author


def test_load_dir_in_name_order_collecting_every_error(folder: Path) -> None:
    ok = inline_spec("int count(void) {}\n")
    write(folder, "20-b.yaml", ok.replace("loaderd: 1\n", "loaderd: 1\nname: b\n"))
    write(folder, "10-a.yaml", ok.replace("loaderd: 1\n", "loaderd: 1\nname: a\n"))
    write(folder, "30-bad.yaml", "loaderd: 1\n")
    write(folder, "40-dup.yaml", ok.replace("loaderd: 1\n", "loaderd: 1\nname: a\n"))
    write(folder, "50-worse.yaml", "a: !!python/name:os.system\n")
    write(folder, ".hidden.yaml", "junk")
    write(folder, "notes.txt", "junk")
    write(folder, "backup.yaml~", "junk")
    specs, errors = specmod.load_dir(str(folder), Settings(), check_owner=False)
    assert [s.name for s in specs] == ["a", "b"]
    assert [(os.path.basename(e.location.file or ""), e.kind) for e in errors] == [
        ("30-bad.yaml", Kind.SCHEMA), ("30-bad.yaml", Kind.SCHEMA),
        ("40-dup.yaml", Kind.SEMANTIC), ("50-worse.yaml", Kind.YAML)]
    assert "already used by" in errors[2].message and errors[2].location.line == 2


def test_load_dir_trusts_against_the_directory(folder: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root-owned files")
    write(folder, "a.yaml", inline_spec("int count(void) {}\n"), mode=0o664)
    specs, errors = specmod.load_dir(str(folder), Settings())
    assert not specs and errors[0].kind is Kind.TRUST
    specs, errors = specmod.load_dir(str(folder), Settings(), check_owner=False)
    assert [s.name for s in specs] == ["a"] and not errors


def test_load_dir_refuses_unsafe_file_names(folder: Path) -> None:
    write(folder, "a\nforged: line.yaml", inline_spec("int count(void) {}\n"))
    specs, errors = specmod.load_dir(str(folder), Settings(), check_owner=False)
    assert not specs and errors[0].kind is Kind.TRUST and "\n" not in str(errors[0])


def test_hostile_keys_stay_on_one_line(folder: Path) -> None:
    path = write(folder, "x.yaml", 'loaderd: 1\n"a\\nfake: error": 1\n')
    _, errors = specmod.parse_spec(str(path), limits=Limits(), owner_uid=None)
    assert all("\n" not in str(e) for e in errors)
    assert "['a\\nfake: error']" in [e.location.field for e in errors]


def test_load_dir_missing_directory(folder: Path) -> None:
    specs, errors = specmod.load_dir(str(folder / "nope"), Settings())
    assert specs == [] and errors[0].kind is Kind.TRUST


def test_shipped_examples_load() -> None:
    examples = Path(__file__).resolve().parents[2] / "configs" / "programs.d"
    if not examples.is_dir():
        pytest.skip("no examples")
    specs, errors = specmod.load_dir(str(examples), Settings(), check_owner=False)
    assert not errors and specs


def test_schema_files_are_valid_2020_12() -> None:
    for name in ("spec.schema.json", "settings.schema.json"):
        text = resources.files("loaderd.config").joinpath("schemas", name).read_text("utf-8")
        jsonschema.Draft202012Validator.check_schema(json.loads(text))


def test_every_object_in_the_schemas_is_closed() -> None:
    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, where
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    for name in ("spec.schema.json", "settings.schema.json"):
        text = resources.files("loaderd.config").joinpath("schemas", name).read_text("utf-8")
        walk(json.loads(text), name)


# --- C source text checks ------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "// BPF_TABLE_PINNED(...) in a line comment\n",
    "/* extern, section, maps/, #include \"x\" */\n",
    'const char *s = "/*"; int count(void) { return 0; } // */\n',
    "#include <linux/sched.h>\n#include <uapi/linux/bpf.h>\n#include <net/sock.h>\n"
    "#include <bcc/proto.h>\n#include <asm/page.h>\n",
    "#include   <linux/if_ether.h>   // trailing comment\n",
    "int external_count; int sectional;\n",
    "#pragma unroll\n",
    "#include <linux/sched.h>\r\nint a;\r\n",  # CRLF line endings
    "// a comment \\\r\n#include \"x.h\"\n",  # spliced into the comment, for clang too
    "int a;\f\vint b;\n",
])
def test_source_checks_allow(code: str) -> None:
    assert srccheck.check_source(code, file="f.c") == []


@pytest.mark.parametrize("code, line", [
    ("int a;\nBPF_TABLE_PIN\\\nNED(x);\n", 2),
    ("/* a\n b */ extern int x;\n", 2),
    ("int a; /* ok */ BPF_TABLE_SHARED(x);\n", 1),
    ('char *s = "//"; BPF_TABLE_PUBLIC(x);\n', 1),
    ("#  include \"x.h\"\n", 1),
    ("#include <linux/../../x.h>\n", 1),
    ("#include <linux//x.h>\n", 1),
    ("#include <linux/x.h> junk\n", 1),
    ("x\n%:define A\n", 2),
    ("char c = '\"'; extern int y;\n", 1),
    ('int x = 1; char *r = R"x()x";\n', 1),
    ("int s __attribute__((__section__(\"m\")));\n", 1),
    ("int s BCC_SEC(\"m\");\n", 1),
    ("int a;\r#include \"x.h\"\n", 1),
    ("int a;\n// comment\rBPF_TABLE_PINNED(x);\n", 2),
    ("int a;\n\f#include \"x.h\"\n", 2),
    ("\v#include </etc/shadow>\n", 1),
    ("#\f\vinclude \"x.h\"\n", 1),
    ("int a;\n#\\ \t\ninclude \"x.h\"\n", 2),
    ("BPF_TABLE_PIN\\ \r\nNED(x);\n", 1),
    ("int a;\r\n#include \"x.h\"\r\n", 2),
])
def test_source_checks_refuse(code: str, line: int) -> None:
    errors = srccheck.check_source(code, file="f.c", first_line=1)
    assert errors and errors[0].location.line == line and errors[0].kind is Kind.POLICY


def test_source_checks_stop_after_max_errors() -> None:
    errors = srccheck.check_source("extern int x;\n" * 100, file="f.c")
    assert len(errors) == srccheck.MAX_ERRORS


def test_lone_cr_is_located_and_reported_alone() -> None:
    errors = srccheck.check_source("int a;\nint b;\rextern int c;\n", file="f.c", first_line=3)
    assert [(e.location.line, e.location.column) for e in errors] == [(4, 7)]
    assert "lone carriage return" in str(errors[0]) and "\r" not in str(errors[0])


# Each hides a directive from a check that only knows LF and [ \t]; clang (the same major
# version BCC links) must really take it as a directive, and the check must refuse it.
HIDDEN_DIRECTIVES = [
    b"int a;\r#include \"/nonexistent/loaderd-probe.h\"\n",
    b"// comment\r#include \"/nonexistent/loaderd-probe.h\"\n",
    b"char *s = \"x\r#include \"/nonexistent/loaderd-probe.h\"\n",
    b"int a;\n\f#include \"/nonexistent/loaderd-probe.h\"\n",
    b"int a;\n\v#include \"/nonexistent/loaderd-probe.h\"\n",
    b"#\f\vinclude \"/nonexistent/loaderd-probe.h\"\n",
    b"# \\ \ninclude \"/nonexistent/loaderd-probe.h\"\n",
    b"/* c */ # include \"/nonexistent/loaderd-probe.h\"\r\n",
]


@pytest.mark.skipif(not os.path.exists("/usr/bin/clang"), reason="needs clang")
@pytest.mark.parametrize("code", HIDDEN_DIRECTIVES)
def test_check_sees_the_directives_clang_sees(code: bytes) -> None:
    import subprocess

    out = subprocess.run(["/usr/bin/clang", "-E", "-x", "c", "-"], input=code,
                         capture_output=True, timeout=60, check=False)
    assert b"loaderd-probe.h' file not found" in out.stderr  # clang takes it as #include
    assert srccheck.check_source(code.decode(), file="f.c")


@pytest.mark.skipif(not os.path.exists("/usr/bin/clang"), reason="needs clang")
def test_crlf_backslash_continues_a_line_comment_for_clang() -> None:
    import subprocess

    code = b"// a \\\r\n#include \"/nonexistent/loaderd-probe.h\"\nint x;\n"
    out = subprocess.run(["/usr/bin/clang", "-E", "-x", "c", "-"], input=code,
                         capture_output=True, timeout=60, check=False)
    assert out.returncode == 0 and srccheck.check_source(code.decode(), file="f.c") == []


def test_control_character_in_the_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "a\nb"
    folder.mkdir(mode=0o755)
    path = write(folder, "demo.yaml", SPEC)
    write(folder, "demo.bpf.c", C_SOURCE)
    err = refused(path)
    assert err.kind is Kind.TRUST and "control character" in str(err)
    assert "\n" not in str(err) and "a\\x0ab" in str(err)


def test_control_character_in_the_source_path_is_refused(folder: Path) -> None:
    sub = folder / "x\ny"
    sub.mkdir(mode=0o755)
    write(sub, "demo.bpf.c", C_SOURCE)
    os.symlink("x\ny/demo.bpf.c", folder / "demo.bpf.c")
    err = refused(write(folder, "demo.yaml", SPEC))
    assert err.kind is Kind.TRUST and "control character" in str(err) and "\n" not in str(err)
    assert err.location.field == "source.file" and err.location.line == 5


def test_line_directive_keeps_a_path_on_one_line() -> None:
    from loaderd.stage.compile import _c_string

    assert _c_string('/a\nb"\\c') == '/a\\012b\\"\\\\c'


def test_function_names() -> None:
    code = "static int helper(int a) { return a; }\nint main_prog(void *ctx)\n{\n}\n" \
           "// int commented(void) {}\nint declared(void);\n"
    assert {"helper", "main_prog"} <= srccheck.function_names(code)
    assert "commented" not in srccheck.function_names(code)
    assert "declared" not in srccheck.function_names(code)


@pytest.mark.parametrize("mtype", list(MapType))
def test_freeze_only_where_the_map_stays_usable(folder: Path, mtype: MapType) -> None:
    fixed = mtype.kind.fixed  # ringbuf, perf_event_array, sockmap
    kv = "" if fixed else "    key: u32\n    value: u64\n"
    size = 4096 if mtype is MapType.RINGBUF else 4
    text = inline_spec("int count(void *ctx) { return 0; }\n",
                       f"maps:\n  - name: m\n    type: {mtype.value}\n{kv}"
                       f"    max_entries: {size}\n    freeze: true\n")
    spec, errors = specmod.parse_spec(str(write(folder, "x.yaml", text)), limits=Limits(),
                                      owner_uid=None)
    if fixed:
        assert [(e.kind, e.location.field) for e in errors] == [(Kind.SEMANTIC, "maps[0].freeze")]
        assert f"a {mtype.value} map cannot be frozen" in str(errors[0])
    else:
        assert errors == [] and spec is not None and spec.maps[0].freeze


CGROUP_ORDERED = """loaderd: 1
source:
  inline: |
    int a(struct __sk_buff *skb) { return 1; }
    int b(struct __sk_buff *skb) { return 1; }
programs:
  - {name: b, type: cgroup_skb, attach: {cgroup: {path: x, hook: egress, order: {after: s/a}}}}
  - {name: a, type: cgroup_skb, attach: {cgroup: {path: x, hook: egress, order: first}}}
"""


def test_cgroup_order_reads_and_an_own_anchor_must_be_written_before(folder: Path) -> None:
    err = refused(write(folder, "s.yaml", CGROUP_ORDERED))
    assert "s/a: a cgroup program of this spec written before this one" in str(err)
    assert "programs[0].attach.cgroup.order.after" in str(err)
    lines = CGROUP_ORDERED.splitlines()
    fixed = "\n".join([*lines[:6], lines[7], lines[6]]) + "\n"
    spec = load(write(folder, "s.yaml", fixed))
    a, b = (p.attach for p in spec.programs)
    assert isinstance(a, CgroupSkbAttach) and isinstance(b, CgroupSkbAttach)
    assert (a.order, a.anchor, b.order, b.anchor) == ("first", None, "after", "s/a")
    assert b.text == "cgroup_skb:egress:path=x,after=s/a"
