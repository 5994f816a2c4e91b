"""Do the installed headers compile kernel structs at the running kernel's offsets?

`measure()` compiles one probe with BCC itself (the same compiler, flags and headers every BCC
spec gets) whose only function stores `offsetof()` of bpf.offsets.FIELDS as tagged constants,
decodes them from the bytecode, and compares with the running kernel's BTF. Runs in a worker
(it imports bcc); the result is cached in the state directory (bpf.offsets).

`check()` is the verdict per spec: a spec whose C text names a kernel struct (one the running
kernel's BTF has, not an ABI-stable context or wire header) is refused when the headers are
known not to be the running kernel's, naming the spec file, the struct members and both offsets,
unless the settings accept the risk (`accept_header_mismatch: true`). Tracepoint `args->field`
reads are never flagged: their layout comes from tracefs, not from the headers.
"""

from __future__ import annotations

from loaderd.bpf import offsets
from loaderd.bpf.bytecode import BPF_LD_IMM64, INSN
from loaderd.config.source import struct_uses
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import Spec

MAGIC = 0x4C44  # "LD": tags the probe's constants
PROBE_FUNCTION = "loaderd_offsets"
BPF_MOV64_IMM = 0xB7
BPF_ST_MEM_DW = 0x7A


def probe_text() -> str:
    includes = "".join(f"#include <{h}>\n" for h in offsets.PROBE_INCLUDES)
    stores = "".join(
        f"    v = ((u64){MAGIC:#x} << 48) | ((u64){i} << 32) | "
        f"offsetof(struct {f.split('.')[0]}, {f.split('.')[1]});\n"
        for i, f in enumerate(offsets.FIELDS))
    return (f"{includes}int {PROBE_FUNCTION}(void *ctx)\n{{\n    volatile u64 v;\n{stores}"
            "    return 0;\n}\n")


def constants(code: bytes) -> list[int]:
    """Every immediate the instructions carry (64-bit ld_imm64 pairs whole)."""
    out: list[int] = []
    n = len(code) // INSN.size
    i = 0
    while i < n:
        op, _regs, _off, imm = INSN.unpack_from(code, i * INSN.size)
        if op == BPF_LD_IMM64 and i + 1 < n:
            hi = INSN.unpack_from(code, (i + 1) * INSN.size)[3]
            out.append((imm & 0xFFFFFFFF) | (hi & 0xFFFFFFFF) << 32)
            i += 2
            continue
        if op in (BPF_MOV64_IMM, BPF_ST_MEM_DW):
            out.append(imm & 0xFFFFFFFFFFFFFFFF)
        i += 1
    return out


def compiled_offsets() -> dict[str, int]:
    """offsetof() of every FIELDS member as BCC compiles it here. Imports bcc: workers only."""
    from loaderd.stage.compile import bcc_compile

    where = Location(offsets.headers_dirs()[0])
    b = bcc_compile(probe_text(), where)
    try:
        code = bytes(b.dump_func(PROBE_FUNCTION.encode()))
    finally:
        b.cleanup()
    found = offsets.decode_probe(constants(code), MAGIC)
    missing = [f for f in offsets.FIELDS if f not in found]
    if missing:
        raise LoaderdError(Kind.COMPILE, f"the headers probe lost members {missing}",
                           Location(offsets.headers_dirs()[0]))
    return found


def measure() -> offsets.HeaderFacts:
    """Both sides, now (a worker runs this: it compiles)."""
    key = offsets.cache_key()
    build, _source = offsets.headers_dirs()
    kernel = offsets.kernel_offsets()
    try:
        compiled, error = compiled_offsets(), None
    except LoaderdError as exc:
        first = (exc.detail or "").strip().splitlines()[:1]
        compiled, error = {}, exc.message + (f": {first[0][:200]}" if first else "")
    return offsets.HeaderFacts(key, offsets.release(), build, offsets.headers_version(build),
                               kernel, compiled, error)


def kernel_structs(spec: Spec, names: frozenset[str]) -> dict[str, int]:
    """The kernel-internal structs `spec`'s C text names: struct -> line in its file."""
    return {s: line for s, line in struct_uses(spec.source).items()
            if s in names and s not in offsets.STABLE_STRUCTS}


def _line(spec: Spec, line: int) -> str:
    """Where a line of the C text is, as the author reads it."""
    if spec.source_path:
        return f"{spec.source_path}:{line}"
    first = spec.line_of("source", "inline")  # a literal block starts on the next line
    return f"line {line + first}" if first else f"line {line} of source.inline"


def check(spec: Spec, facts: offsets.HeaderFacts, names: frozenset[str]) -> LoaderdError | None:
    """Refuse a spec that reads kernel structs at offsets the running kernel does not have."""
    touched = kernel_structs(spec, names)
    if not touched or facts.ok:
        return None
    hint = ("use a precompiled CO-RE object (source: {object: prog.bpf.o}), install the running "
            "kernel's headers, or accept the risk with `accept_header_mismatch: true` in "
            "loaderd.yaml")
    if facts.error is not None:
        first = min(touched, key=touched.__getitem__)
        return LoaderdError(
            Kind.POLICY, f"reads struct {first} ({_line(spec, touched[first])}), but the kernel "
            f"headers could not be checked against the running kernel {facts.release}: "
            f"{facts.error}", Location(spec.path, spec.line_of("source"), None, "source"),
            allowed=hint)
    measured = [(s, facts.for_struct(s)) for s in sorted(touched, key=touched.__getitem__)]
    direct = [(s, bad) for s, bad in measured if bad]
    hv = f" (generated for {facts.headers_version})" if facts.headers_version else ""
    if direct:
        s, bad = direct[0]
        what = "; ".join(str(m) for m in bad[:4])
        return LoaderdError(
            Kind.POLICY, f"reads struct {s} ({_line(spec, touched[s])}) compiled from kernel "
            f"headers {facts.headers}{hv} that are not the running kernel {facts.release}'s: "
            f"{what}", Location(spec.path, spec.line_of("source"), None, "source"), allowed=hint)
    s = min(touched, key=touched.__getitem__)
    what = "; ".join(str(m) for m in facts.mismatches[:2])
    return LoaderdError(
        Kind.POLICY, f"reads struct {s} ({_line(spec, touched[s])}) compiled from kernel headers "
        f"{facts.headers}{hv} that are not the running kernel {facts.release}'s (measured: "
        f"{what})", Location(spec.path, spec.line_of("source"), None, "source"), allowed=hint)
