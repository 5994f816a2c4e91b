"""Facts read from a BPF ELF object (clang -target bpf) before libbpf or the kernel sees it.

Only what the policy needs: the executable sections' instructions, decoded by `bytecode`, with
calls re-classified by their relocations (in an object, a bpf-to-bpf call and a kfunc call both
carry src_reg 1 and a relocation; the kfunc's names an undefined, `__ksym` symbol), and which
functions live in which section. A program may call subprograms in `.text`, so its facts are its
own section's plus `.text`'s: an over-approximation that never misses a helper.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from loaderd.bpf.bytecode import BPF_CALL, BPF_LD_IMM64, INSN, BytecodeError, CallFacts, decode

EM_BPF = 247
SHT_SYMTAB, SHT_REL = 2, 9
SHF_EXECINSTR = 0x4
STT_FUNC = 2
SUBPROGS = ".text"


class ELFError(ValueError):
    pass


@dataclass(frozen=True)
class Section:
    name: str
    data: bytes
    flags: int


@dataclass
class BPFObject:
    sections: dict[int, Section] = field(default_factory=dict)
    # section index -> {instruction index of a call: the symbol it is relocated against is
    # undefined (an extern __ksym: a kfunc)}
    kfunc_calls: dict[int, set[int]] = field(default_factory=dict)
    functions: dict[str, int] = field(default_factory=dict)  # global FUNC symbol -> section
    # section index -> {instruction index: extern symbol name} of ld_imm64s relocated against an
    # undefined symbol: an `extern ... __ksym` variable (libbpf loads it as BPF_PSEUDO_BTF_ID, a
    # kernel address; bytecode refuses that kind) or a `__kconfig` one
    extern_loads: dict[int, dict[int, str]] = field(default_factory=dict)

    def executable(self) -> dict[int, Section]:
        return {i: s for i, s in self.sections.items() if s.flags & SHF_EXECINSTR and s.data}

    def facts(self, function: str) -> CallFacts:
        """Calls of `function`'s section plus the subprogram section."""
        if function not in self.functions:
            raise ELFError(f"no function {function!r} in the object")
        own = self.functions[function]
        parts = [own] + [i for i, s in self.executable().items()
                         if s.name == SUBPROGS and i != own]
        helpers: set[int] = set()
        calls = kfuncs = callx = count = 0
        for i in parts:
            sec = self.sections[i]
            try:
                f = decode(sec.data)
            except BytecodeError as exc:
                raise ELFError(f"section {sec.name}: {exc}") from None
            externs = self.extern_loads.get(i, {})
            if externs:
                at, name = min(externs.items())
                raise ELFError(f"section {sec.name}: insn {at} loads the address of extern "
                               f"symbol '{name}' (a __ksym or __kconfig variable): kernel "
                               "addresses and memory are not for specs")
            k = len(self.kfunc_calls.get(i, ()))
            helpers |= f.helper_ids
            calls += f.bpf_calls - k
            kfuncs += f.kfunc_calls + k
            callx += f.indirect_calls
            count += f.insn_count
        return CallFacts(frozenset(helpers), calls, kfuncs, callx, frozenset(), count)


MAX_NAME = 1024  # symbol and section names (the kernel's KSYM_NAME_LEN is 512)


def _cstr(data: bytes, off: int) -> str:
    """A NUL-terminated name of at most MAX_NAME bytes: 70,000 symbols naming one 2 MiB string
    in a 3.7 MB object made this parse use 2 GiB (measured) before the bound."""
    end = data.find(b"\0", off, off + MAX_NAME + 1)
    if end < 0:
        raise ELFError("unterminated string" if data.find(b"\0", off) < 0 else
                       f"a name longer than {MAX_NAME} bytes")
    return data[off:end].decode("utf-8", "replace")


def parse(data: bytes) -> BPFObject:
    """A little-endian ELF64 relocatable object for EM_BPF, or ELFError."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise ELFError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ELFError("not a little-endian 64-bit ELF object")
    (_type, machine, _v, _entry, _phoff, shoff, _flags, _ehsize, _phes, _phnum, shentsize,
     shnum, shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
    if machine != EM_BPF:
        raise ELFError(f"ELF machine {machine} is not BPF ({EM_BPF}): build with clang "
                       "-target bpf")
    if shentsize != 64 or shoff + shnum * 64 > len(data) or shstrndx >= shnum:
        raise ELFError("section header table out of bounds")
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + 64 * i) for i in range(shnum)]

    def body(h: tuple[int, ...]) -> bytes:
        off, size = h[4], h[5]
        if h[1] == 8:  # SHT_NOBITS
            return b""
        if off + size > len(data):
            raise ELFError("section out of bounds")
        return data[off:off + size]

    names = body(headers[shstrndx])
    obj = BPFObject()
    for i, h in enumerate(headers):
        obj.sections[i] = Section(_cstr(names, h[0]), body(h), h[2])
    symtab = [(i, h) for i, h in enumerate(headers) if h[1] == SHT_SYMTAB]
    syms: list[tuple[str, int, int]] = []  # (name, info, shndx)
    if symtab:
        _i, h = symtab[0]
        if not 0 <= h[6] < shnum:
            raise ELFError("symbol table names no string table")
        strs = body(headers[h[6]])
        raw = body(h)
        for off in range(0, len(raw) - len(raw) % 24, 24):
            name, info, _other, shndx, _value, _size = struct.unpack_from("<IBBHQQ", raw, off)
            syms.append((_cstr(strs, name), info, shndx))
            if info & 0xF == STT_FUNC and info >> 4 == 1 and 0 < shndx < shnum:  # GLOBAL
                obj.functions[_cstr(strs, name)] = shndx
    for h in headers:
        if h[1] != SHT_REL or not 0 < h[7] < shnum:
            continue
        target = obj.sections[h[7]]
        if not target.flags & SHF_EXECINSTR:
            continue
        raw = body(h)
        for off in range(0, len(raw) - len(raw) % 16, 16):
            r_off, r_info = struct.unpack_from("<QQ", raw, off)
            sym = r_info >> 32
            if not 0 < sym < len(syms) or syms[sym][2] != 0 or r_off + 8 > len(target.data):
                continue
            if r_off % INSN.size:
                continue
            if target.data[r_off] == BPF_CALL:
                obj.kfunc_calls.setdefault(h[7], set()).add(r_off // INSN.size)
            elif target.data[r_off] == BPF_LD_IMM64:
                obj.extern_loads.setdefault(h[7], {})[r_off // INSN.size] = syms[sym][0]
    return obj
