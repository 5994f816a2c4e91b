"""Facts read from eBPF bytecode before it reaches the kernel.

Decodes the raw instructions BCC will load (`dump_func`): helper calls (opcode 0x85, src_reg 0 ->
imm is the helper id), bpf-to-bpf calls (src 1), kfunc calls (src 2), indirect calls (0x8d) and
map references (ld_imm64 with src 1 = BPF_PSEUDO_MAP_FD, imm is the map fd BCC patched in).
Policy decisions use these facts, never what the spec or the C text claims.

Any other ld_imm64 kind is refused but a subprogram's address (src 4, BPF_PSEUDO_FUNC: a
callback, decoded with the rest): src 3 (BPF_PSEUDO_BTF_ID) gives the program a kernel symbol's
address and, for a typed variable, kernel memory to read without any helper (measured on 6.18:
`.byte` in inline asm put commit_creds' address into a socket filter's map, with only
map_update_elem called); src 5/6 name maps by index into an fd array loaderd never passes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

INSN = struct.Struct("<BBhi")  # code, dst|src<<4, off, imm
BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_CALLX = 0x8D  # BPF_JMP | BPF_CALL | BPF_X
BPF_LD_IMM64 = 0x18  # BPF_LD | BPF_DW | BPF_IMM: two slots
PSEUDO_MAP_FD, PSEUDO_MAP_VALUE, PSEUDO_BTF_ID, PSEUDO_FUNC = 1, 2, 3, 4
PSEUDO_CALL, PSEUDO_KFUNC_CALL = 1, 2


class BytecodeError(ValueError):
    pass


@dataclass(frozen=True)
class CallFacts:
    helper_ids: frozenset[int]
    bpf_calls: int
    kfunc_calls: int
    indirect_calls: int
    map_fds: frozenset[int]
    insn_count: int


def decode(insns: bytes) -> CallFacts:
    if len(insns) % INSN.size:
        raise BytecodeError(f"bytecode length {len(insns)} is not a multiple of 8")
    helpers: set[int] = set()
    map_fds: set[int] = set()
    calls = kfuncs = callx = 0
    count = len(insns) // INSN.size
    i = 0
    while i < count:
        code, regs, _off, imm = INSN.unpack_from(insns, i * INSN.size)
        src = regs >> 4
        if code == BPF_LD_IMM64:
            if src in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
                map_fds.add(imm)
            elif src == PSEUDO_BTF_ID:
                raise BytecodeError(f"insn {i} loads the address of a kernel symbol (ld_imm64 "
                                    "BPF_PSEUDO_BTF_ID): kernel addresses and memory are not "
                                    "for specs")
            elif src not in (0, PSEUDO_FUNC):
                raise BytecodeError(f"ld_imm64 with unknown src_reg {src} at insn {i}")
            i += 2  # the second slot holds the upper 32 bits, never an opcode
            continue
        if code == BPF_CALL:
            if src == 0:
                helpers.add(imm)
            elif src == PSEUDO_CALL:
                calls += 1
            elif src == PSEUDO_KFUNC_CALL:
                kfuncs += 1
            else:
                raise BytecodeError(f"call with unknown src_reg {src} at insn {i}")
        elif code == BPF_CALLX:
            callx += 1
        i += 1
    return CallFacts(frozenset(helpers), calls, kfuncs, callx, frozenset(map_fds), count)
