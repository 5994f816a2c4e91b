"""Bytecode facts: helper ids, calls and map references decoded from raw instructions."""

from __future__ import annotations

import struct

import pytest

from loaderd.bpf.btf import BTFError, enum_values, helper_names
from loaderd.bpf.bytecode import BytecodeError, decode


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def test_helper_calls_bpf_calls_kfuncs_callx_and_map_fds() -> None:
    prog = b"".join([
        insn(0x18, 1, 1, imm=7), insn(0, imm=0),  # ld_imm64 r1 = map fd 7 (two slots)
        insn(0x85, imm=1),  # call map_lookup_elem
        insn(0x85, imm=6),  # call trace_printk
        insn(0x85, src=1, imm=3),  # bpf-to-bpf call
        insn(0x85, src=2, imm=1234),  # kfunc
        insn(0x8D),  # callx
        insn(0x95),  # exit
    ])
    facts = decode(prog)
    assert facts.helper_ids == {1, 6}
    assert (facts.bpf_calls, facts.kfunc_calls, facts.indirect_calls) == (1, 1, 1)
    assert facts.map_fds == {7}
    assert facts.insn_count == 8


def test_ld_imm64_second_slot_is_never_read_as_an_opcode() -> None:
    # The upper half of a 64-bit immediate may look like a call; it must not count.
    prog = insn(0x18, 1, 0, imm=1) + insn(0x85, imm=36) + insn(0x95)
    assert decode(prog).helper_ids == frozenset()


def test_truncated_bytecode_is_refused() -> None:
    with pytest.raises(BytecodeError):
        decode(b"\x85" * 9)


def test_unknown_call_src_is_refused() -> None:
    with pytest.raises(BytecodeError):
        decode(insn(0x85, src=3, imm=1))


def test_helper_names_come_from_the_running_kernel_btf() -> None:
    names = helper_names()
    assert names[1] == "map_lookup_elem"
    assert names[36] == "probe_write_user"
    assert "unspec" not in names.values()


def test_btf_parser_rejects_non_btf() -> None:
    with pytest.raises(BTFError):
        enum_values(b"\0" * 64, "bpf_func_id")


def test_a_kernel_symbol_address_is_refused() -> None:
    # ld_imm64 BPF_PSEUDO_BTF_ID (src 3): `.byte` in BCC inline asm loaded commit_creds'
    # address into a socket filter that called only map_update_elem (6.18, measured).
    with pytest.raises(BytecodeError, match="kernel symbol"):
        decode(insn(0x18, 0, 3, imm=70767) + insn(0) + insn(0x95))


@pytest.mark.parametrize("src", [5, 6, 7, 15])
def test_unknown_ld_imm64_kinds_are_refused(src: int) -> None:
    with pytest.raises(BytecodeError, match=f"unknown src_reg {src}"):
        decode(insn(0x18, 0, src, imm=1) + insn(0) + insn(0x95))


def test_a_callback_address_is_a_subprogram_not_a_refusal() -> None:
    facts = decode(insn(0x18, 2, 4, imm=2) + insn(0) + insn(0x95) + insn(0x95))
    assert facts.insn_count == 4 and facts.map_fds == frozenset()
