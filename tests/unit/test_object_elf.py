"""Precompiled objects without the kernel: the ELF facts (helpers of a program and of its .text
subprograms, kfunc calls told from bpf-to-bpf calls by their relocation), refusals of broken
ELF, and `source: {object: ...}` in a spec (read, hashed, checked; fallback refused)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from loaderd.bpf import elf
from loaderd.config.spec import parse_spec
from loaderd.model import Limits


def insn(code: int, src: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, src << 4, 0, imm)


def build_elf(prog: bytes, text: bytes, relocs: list[tuple[int, int]],
              machine: int = elf.EM_BPF) -> bytes:
    """Sections: 0 null, 1 .shstrtab, 2 .text, 3 tp/x (program), 4 .symtab, 5 .strtab,
    6 .reltp/x. Symbols: 0 null, 1 'prog' (global func in 3), 2 'sub' (local func in 2),
    3 'bpf_kfunc' (undefined). relocs: (byte offset in tp/x, symbol index)."""
    shstr = b"\0.shstrtab\0.text\0tp/x\0.symtab\0.strtab\0.reltp/x\0"
    names = {n: shstr.index(n.encode() + b"\0") for n in
             (".shstrtab", ".text", "tp/x", ".symtab", ".strtab", ".reltp/x")}
    strtab = b"\0prog\0sub\0bpf_kfunc\0"
    sym = struct.Struct("<IBBHQQ")
    symtab = (sym.pack(0, 0, 0, 0, 0, 0) + sym.pack(1, 0x12, 0, 3, 0, len(prog))
              + sym.pack(6, 0x02, 0, 2, 0, len(text)) + sym.pack(10, 0x10, 0, 0, 0, 0))
    rel = b"".join(struct.pack("<QQ", off, s << 32 | 10) for off, s in relocs)
    bodies = [b"", shstr, text, prog, symtab, strtab, rel]
    out = bytearray(64)
    offsets = []
    for b in bodies:
        offsets.append(len(out))
        out += b
        out += b"\0" * (-len(out) % 8)
    shoff = len(out)
    shdr = struct.Struct("<IIQQQQIIQQ")
    specs = [(0, 0, 0, 0, 0), (names[".shstrtab"], 3, 0, 0, 0), (names[".text"], 1, 6, 0, 0),
             (names["tp/x"], 1, 6, 0, 0), (names[".symtab"], 2, 0, 5, 1),
             (names[".strtab"], 3, 0, 0, 0), (names[".reltp/x"], 9, 0, 4, 3)]
    for i, (name, typ, flags, link, info) in enumerate(specs):
        out += shdr.pack(name, typ, flags, 0, offsets[i] if i else 0, len(bodies[i]), link,
                         info, 8, 24 if typ == 2 else 16 if typ == 9 else 0)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    out[0:64] = ident + struct.pack("<HHIQQQIHHHHHH", 1, machine, 1, 0, 0, shoff, 0, 64, 0, 0,
                                    64, len(specs), 1)
    return bytes(out)


PROG = (insn(0x85, imm=14)  # get_current_pid_tgid
        + insn(0x85, src=1, imm=-1)  # call sub (relocated against .text's symbol)
        + insn(0x85, src=1, imm=-1)  # call bpf_kfunc (relocated against an undefined symbol)
        + insn(0x95))
TEXT = insn(0x85, imm=109) + insn(0x95)  # send_signal, in a subprogram


def test_program_facts_include_subprograms_and_kfuncs() -> None:
    obj = elf.parse(build_elf(PROG, TEXT, [(8, 2), (16, 3)]))
    assert obj.functions == {"prog": 3}
    f = obj.facts("prog")
    assert f.helper_ids == {14, 109}  # the subprogram's helper counts
    assert (f.bpf_calls, f.kfunc_calls) == (1, 1)
    with pytest.raises(elf.ELFError):
        obj.facts("sub")  # local: not a program


def test_an_extern_variable_address_is_refused() -> None:
    # `extern const void commit_creds __ksym; (u64)&commit_creds`: libbpf makes the ld_imm64 a
    # BPF_PSEUDO_BTF_ID at load (a kernel address in a socket filter's map, measured on 6.18).
    prog = insn(0x18) + insn(0) + insn(0x95)
    obj = elf.parse(build_elf(prog, TEXT, [(0, 3)]))
    with pytest.raises(elf.ELFError, match="insn 0 loads the address of extern symbol "
                       "'bpf_kfunc'"):
        obj.facts("prog")


@pytest.mark.parametrize("mangle, why", [
    (lambda b: b[:40], "not an ELF"),
    (lambda b: b[:4] + b"\x01" + b[5:], "64-bit"),
    (lambda b: b[:-64], "out of bounds"),
])
def test_broken_elf_is_refused(mangle: object, why: str) -> None:
    data = build_elf(PROG, TEXT, [])
    with pytest.raises(elf.ELFError, match=why):
        elf.parse(mangle(data))  # type: ignore[operator]


def test_names_are_bounded() -> None:
    # 70,000 symbols naming one 2 MiB string: 2 GiB of names before the bound (measured).
    data = b"A" * (2 << 20) + b"\0"
    with pytest.raises(elf.ELFError, match="a name longer than 1024 bytes"):
        elf._cstr(data, 0)
    assert elf._cstr(data, len(data) - 1025) == "A" * 1024
    with pytest.raises(elf.ELFError, match="unterminated"):
        elf._cstr(b"AAAA", 0)


def test_an_x86_object_is_refused() -> None:
    with pytest.raises(elf.ELFError, match="-target bpf"):
        elf.parse(build_elf(PROG, TEXT, [], machine=62))


SPEC = """loaderd: 1
source: {{object: {obj}}}
maps:
  - {{name: execs, type: hash, key: u32, value: {{bytes: 24}}, max_entries: 16}}
programs:
  - name: record_exec
    type: tracepoint
    attach: {{tracepoint: "sched:sched_process_exec"}}{extra}
"""


def write(tmp_path: Path, data: bytes, extra: str = "", obj: str = "p.bpf.o") -> str:
    os.chmod(tmp_path, 0o755)
    (tmp_path / obj).write_bytes(data)
    spec = tmp_path / "p.yaml"
    spec.write_text(SPEC.format(obj=obj, extra=extra))
    return str(spec)


def test_object_spec_is_read_and_hashed(tmp_path: Path) -> None:
    data = build_elf(PROG, TEXT, [])
    spec, errors = parse_spec(write(tmp_path, data), limits=Limits(), owner_uid=None)
    assert not errors and spec is not None
    assert spec.is_object and spec.source == "" and spec.source_bytes == data
    assert spec.object_sha256 == hashlib.sha256(data).hexdigest()
    assert spec.source_ref == "p.bpf.o"
    assert spec.source_path == str(tmp_path / "p.bpf.o")


def test_object_spec_refusals(tmp_path: Path) -> None:
    data = build_elf(PROG, TEXT, [])
    _s, errors = parse_spec(write(tmp_path, b"int main() {}"), limits=Limits(), owner_uid=None)
    assert "source.object is not an ELF object" in str(errors[0])
    _s, errors = parse_spec(write(tmp_path, data), limits=Limits(max_object_bytes=64),
                            owner_uid=None)
    assert "source object is too large" in str(errors[0])
    _s, errors = parse_spec(write(tmp_path, data, "\n    fallback: [other]"), limits=Limits(),
                            owner_uid=None)
    assert "fallback is for C sources" in str(errors[0])
    assert "programs[0].fallback" in str(errors[0])
    _s, errors = parse_spec(write(tmp_path, data, obj="../p.bpf.o"), limits=Limits(),
                            owner_uid=None)
    assert errors  # may not leave the spec's directory
