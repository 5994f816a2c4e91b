"""Kernel struct offsets: the BTF member walker on a hand-built blob and the running kernel's,
which structs a C text reads, the probe's constants, and the verdict per spec (fake facts)."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import pytest

from loaderd.bpf import btf, offsets
from loaderd.bpf.bytecode import INSN
from loaderd.config.settings import load_settings
from loaderd.config.source import struct_uses
from loaderd.model import NoAttach, ProgramSpec, ProgType, Settings, Spec
from loaderd.observe.status import View
from loaderd.reports import compliance
from loaderd.stage import headers, pool


class BlobBuilder:
    """A minimal BTF blob: types are appended in id order (1, 2, ...)."""

    def __init__(self) -> None:
        self.types = b""
        self.strings = b"\0"

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def int_(self, name: str, size: int) -> None:
        self.types += struct.pack("<III", self.s(name), 1 << 24, size) + struct.pack(
            "<I", size * 8)

    def typedef(self, name: str, ref: int) -> None:
        self.types += struct.pack("<III", self.s(name), 8 << 24, ref)

    def struct(self, name: str, size: int, members: list[tuple[str, int, int, int]],
               kind: int = 4) -> None:
        """members: (name, type id, bit offset, bitfield size); kind_flag set if any bitfield"""
        kflag = any(m[3] for m in members)
        self.types += struct.pack("<III", self.s(name),
                                  kind << 24 | kflag << 31 | len(members), size)
        for mname, tid, bits, bsize in members:
            off = (bsize << 24 | bits) if kflag else bits
            self.types += struct.pack("<III", self.s(mname), tid, off)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", btf.BTF_MAGIC, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def sample() -> bytes:
    b = BlobBuilder()
    b.int_("int", 4)  # 1
    # 2: anonymous union { int a; int b; }
    b.struct("", 4, [("a", 1, 0, 0), ("b", 1, 0, 0)], kind=5)
    b.typedef("u_t", 2)  # 3: typedef of the anonymous union (resolved through)
    # 4: anonymous struct { int x; union {a; b}; } with the union at bit 32
    b.struct("", 8, [("x", 1, 0, 0), ("", 3, 32, 0)])
    # 5: struct task { int pid; <anon struct at byte 8>; int flags:3 at bit 128; int tgid }
    b.struct("task", 24, [("pid", 1, 0, 0), ("", 4, 64, 0), ("flags", 1, 128, 3),
                          ("tgid", 1, 160, 0)])
    b.struct("task", 0, [])  # 6: an empty duplicate: the one with members wins
    return b.blob()


def test_members_flatten_anonymous_nesting_with_bit_offsets() -> None:
    got = btf.field_offsets(sample(), ["task.pid", "task.x", "task.a", "task.b", "task.flags",
                                       "task.tgid", "task.nope", "nostruct.pid"])
    assert got["task.pid"] == btf.Member(0, 0, 0)
    assert got["task.x"] == btf.Member(8, 64, 0)
    assert got["task.a"] == got["task.b"] == btf.Member(12, 96, 0)
    assert got["task.flags"] == btf.Member(16, 128, 3)
    assert got["task.tgid"] == btf.Member(20, 160, 0)
    assert got["task.nope"] is None and got["nostruct.pid"] is None


def test_truncated_or_foreign_blobs_are_refused() -> None:
    blob = sample()
    with pytest.raises(btf.BTFError):
        btf.Types(blob[:-5])
    with pytest.raises(btf.BTFError):
        btf.Types(b"\0" * 32)


@pytest.mark.skipif(not os.path.exists(btf.VMLINUX_BTF), reason="this kernel has no BTF")
def test_the_running_kernels_task_struct() -> None:
    found = offsets.kernel_offsets()
    assert all(found[f] is not None for f in ("task_struct.pid", "task_struct.tgid",
                                              "task_struct.comm", "sock_common.skc_dport"))
    assert found["task_struct.tgid"] == found["task_struct.pid"] + 4  # type: ignore[operator]
    assert "task_struct" in offsets.kernel_struct_names()


def test_struct_uses_ignore_comments_and_own_structs() -> None:
    text = ("// struct task_struct in a comment\n"
            "struct data_t { u32 pid; };\n"
            "int f(struct bpf_raw_tracepoint_args *ctx) {\n"
            "  struct data_t d = {};\n"
            "  /* struct sock */ struct task_struct *t = (void *)0;\n"
            "  return 0; }\n")
    assert struct_uses(text) == {"bpf_raw_tracepoint_args": 3, "task_struct": 5}
    assert struct_uses("u64 t = bpf_get_current_task();\n") == {"task_struct": 1}
    # BCC's tracepoint args come from tracefs: no struct named
    assert struct_uses("TRACEPOINT_PROBE(sched, sched_process_exec) { return args->pid; }") == {}


def test_probe_constants_decode_in_any_order_and_form() -> None:
    tag = headers.MAGIC << 48
    v0, v1 = tag | 1268, tag | 1 << 32 | 1264
    code = (INSN.pack(0x18, 1, 0, v1 & 0xFFFFFFFF) + INSN.pack(0, 0, 0, v1 >> 32)
            + INSN.pack(0x18, 1, 0, v0 & 0xFFFFFFFF) + INSN.pack(0, 0, 0, v0 >> 32)
            + INSN.pack(0xB7, 0, 0, 7) + INSN.pack(0x95, 0, 0, 0))
    got = offsets.decode_probe(headers.constants(code), headers.MAGIC)
    assert got == {offsets.FIELDS[0]: 1268, offsets.FIELDS[1]: 1264}
    assert "offsetof(struct task_struct, tgid)" in headers.probe_text()


def facts(**compiled: int) -> offsets.HeaderFacts:
    kernel: dict[str, int | None] = {f: 100 + i for i, f in enumerate(offsets.FIELDS)}
    got = {f: v for f, v in kernel.items() if v is not None}
    got.update({k.replace("__", "."): v for k, v in compiled.items()})
    return offsets.HeaderFacts("k", "6.18.0", "/lib/modules/6.18.0/build", "6.1.0-57-amd64",
                               kernel, got)


def spec(text: str, path: str = "/etc/loaderd/programs.d/p.yaml") -> Spec:
    return Spec(name="p", path=path, source=text, source_path=None, maps=(),
                programs=(ProgramSpec("f", ProgType.TRACEPOINT, NoAttach()),), sha256="0",
                marks={("source", "inline"): (4, 3), ("source",): (3, 1)})


NAMES = frozenset({"task_struct", "sock", "sock_common", "mm_struct", "bpf_raw_tracepoint_args"})
READS_TGID = ("int f(void *ctx) {\n  struct task_struct *t = (void *)bpf_get_current_task();\n"
              "  u32 tgid = 0;\n  bpf_probe_read_kernel(&tgid, 4, &t->tgid);\n  return 0; }\n")


def test_a_struct_read_at_wrong_offsets_is_refused_naming_file_member_and_both() -> None:
    tgid = 100 + offsets.FIELDS.index("task_struct.tgid")
    err = headers.check(spec(READS_TGID), facts(task_struct__tgid=2420), NAMES)
    assert err is not None
    text = str(err)
    assert text.startswith("/etc/loaderd/programs.d/p.yaml:3: source: reads struct "
                           "task_struct (line 6)")
    assert f"task_struct.tgid at 2420 in the headers, {tgid} in the running kernel" in text
    assert "6.1.0-57-amd64" in text and "accept_header_mismatch" in (err.allowed or "")


def test_verdicts_that_pass() -> None:
    bad = facts(task_struct__tgid=2420)
    assert headers.check(spec(READS_TGID), facts(), NAMES) is None  # headers match
    tp = "int f(struct bpf_raw_tracepoint_args *ctx) { return ctx->args[0] != 0; }"
    assert headers.check(spec(tp), bad, NAMES) is None  # an ABI context struct
    assert headers.check(spec("TRACEPOINT_PROBE(a, b) { return args->pid; }"), bad,
                         NAMES) is None
    assert headers.check(spec("struct mine *m;"), bad, NAMES) is None  # not the kernel's


def test_an_unmeasured_kernel_struct_is_refused_when_the_headers_differ() -> None:
    err = headers.check(spec("int f(struct mm_struct *mm) { return 0; }"),
                        facts(task_struct__tgid=2420), NAMES)
    assert err is not None and "reads struct mm_struct" in str(err)
    assert "measured: task_struct.tgid at 2420" in str(err)
    broken = dataclasses.replace(facts(), compiled={}, error="the headers probe does not "
                                 "compile")
    err = headers.check(spec(READS_TGID), broken, NAMES)
    assert err is not None and "could not be checked" in str(err)


def test_the_setting_accepts_the_risk(tmp_path: Path) -> None:
    bad = facts(task_struct__tgid=2420)
    readers = [spec(READS_TGID)]
    assert len(pool.header_verdicts(readers, bad, NAMES, Settings())) == 1
    assert pool.header_verdicts(readers, bad, NAMES,
                                Settings(accept_header_mismatch=True)) == []
    conf = tmp_path / "loaderd.yaml"
    conf.write_text("loaderd: 1\naccept_header_mismatch: true\n")
    assert load_settings(str(conf), owner_uid=None).accept_header_mismatch is True
    assert Settings().accept_header_mismatch is False


def test_cache_round_trip_key_and_malformed(tmp_path: Path) -> None:
    f = dataclasses.replace(facts(task_struct__tgid=2420), key=offsets.cache_key())
    assert offsets.save_cached(str(tmp_path), f)
    assert offsets.load_cached(str(tmp_path)) == f
    assert offsets.load_cached(str(tmp_path), key="other") is None
    (tmp_path / offsets.CACHE).write_text('{"version": 1, "key": 3}')
    assert offsets.load_cached(str(tmp_path)) is None
    (tmp_path / offsets.CACHE).unlink()
    os.symlink("/etc/passwd", tmp_path / offsets.CACHE)
    assert offsets.load_cached(str(tmp_path)) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns the cache: needs root")
def test_a_cache_another_user_wrote_is_not_trusted(tmp_path: Path) -> None:
    # The service user may write the state dir: its "headers match" must not pass root's check.
    f = dataclasses.replace(facts(task_struct__tgid=2420), key=offsets.cache_key())
    assert offsets.save_cached(str(tmp_path), f)
    path = tmp_path / offsets.CACHE
    os.chown(path, 65534, -1)
    assert offsets.load_cached(str(tmp_path)) is None
    os.chown(path, 0, -1)
    assert offsets.load_cached(str(tmp_path)) == f
    os.link(path, tmp_path / "second")
    assert offsets.load_cached(str(tmp_path)) is None


def test_compliance_says_mismatch_and_fails_it_when_accepted(tmp_path: Path) -> None:
    f = dataclasses.replace(facts(task_struct__tgid=2420), key=offsets.cache_key())
    offsets.save_cached(str(tmp_path), f)

    def check(accept: bool = False) -> tuple[str, str]:
        return compliance.check_headers(View(Settings(state_dir=str(tmp_path),
                                                      accept_header_mismatch=accept), None))

    status, detail = check()
    assert status == compliance.WARN and "task_struct.tgid at 2420" in detail
    assert check(accept=True)[0] == compliance.FAIL
    same = {k: v for k, v in f.kernel.items() if v is not None}
    offsets.save_cached(str(tmp_path), dataclasses.replace(f, compiled=same))
    assert check()[0] == compliance.PASS


def test_without_a_measurement_the_headers_release_is_compared(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    build = tmp_path / "build"
    (build / "include/generated").mkdir(parents=True)
    (build / "include/generated/utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-57-amd64"\n')
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(build))
    state, sentence = offsets.describe(str(tmp_path))
    assert state == "version-mismatch" and "generated for 6.1.0-57-amd64, not the running" \
        in sentence
    assert compliance.check_headers(View(Settings(state_dir=str(tmp_path)), None))[0] == \
        compliance.WARN
    monkeypatch.setattr(offsets, "release", lambda: "6.1.0-57-amd64")
    assert offsets.describe(str(tmp_path))[0] == "unmeasured"
    assert compliance.check_headers(View(Settings(state_dir=str(tmp_path)), None))[0] == \
        compliance.PASS


def test_a_cache_someone_else_wrote_is_not_believed(tmp_path: Path) -> None:
    """The resident's user can write the state dir: a root apply must not take its "match"."""
    if os.geteuid() != 0:
        pytest.skip("chowns a file: needs root")
    f = dataclasses.replace(facts(task_struct__tgid=2420), key=offsets.cache_key())
    assert offsets.save_cached(str(tmp_path), f)
    os.chown(tmp_path / offsets.CACHE, 65534, 65534)
    assert offsets.load_cached(str(tmp_path)) is None  # re-measured instead
    os.chown(tmp_path / offsets.CACHE, 0, 0)
    os.link(tmp_path / offsets.CACHE, tmp_path / "other")
    assert offsets.load_cached(str(tmp_path)) is None  # a hard link: not ours alone
