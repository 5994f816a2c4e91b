"""A spec's precompiled CO-RE object (`source: {object: prog.bpf.o}`) into kernel objects.

The same rules as for BCC, from the object's own facts, all before the kernel sees anything:
the spec's programs are in the object with the declared type (others are not loaded); the
helper/kfunc/call policy on the instructions (every executable section the program can reach,
decoded from the ELF, and libbpf's own view of the program); the object's maps are exactly the
spec's, with the declared type, flags, key/value size and entries, and none asks libbpf to pin
it or is an internal (global variable) map. Then libbpf relocates (CO-RE field offsets against the
running kernel's BTF), creates the maps and loads the programs; the kernel's map facts are
checked again as for BCC. No bcc, no clang, no headers.
"""

from __future__ import annotations

from loaderd import policy
from loaderd.bpf import elf, kernel
from loaderd.bpf.bpfobject import BPFObjectFile, ObjMap
from loaderd.bpf.btf import helper_names
from loaderd.bpf.bytecode import BytecodeError, CallFacts, decode
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import MAP_FLAG_BITS, MAP_FLAG_MASK, MapType, Policy, Spec
from loaderd.stage.compile import (
    captured_fd2,
    first_reason,
    redact_addresses,
)

_LIBBPF_NOISE = ("libbpf: elf: skipping unrecognized data section",)


def _where(spec: Spec) -> Location:
    return Location(spec.path, spec.line_of("source", "object"), None, "source.object")


def _prog_loc(spec: Spec, i: int) -> Location:
    return Location(spec.path, spec.programs[i].line, None, f"programs[{i}]")


def _merge(a: CallFacts, b: CallFacts) -> CallFacts:
    return CallFacts(a.helper_ids | b.helper_ids, max(a.bpf_calls, b.bpf_calls),
                     max(a.kfunc_calls, b.kfunc_calls),
                     max(a.indirect_calls, b.indirect_calls), frozenset(),
                     max(a.insn_count, b.insn_count))


def check_programs(spec: Spec, obj: BPFObjectFile) -> dict[str, int]:
    """Spec program -> index into obj.programs(); everything else is not loaded."""
    progs = obj.programs()
    index = {p.name: i for i, p in enumerate(progs)}
    if len(index) != len(progs):  # a crafted symbol table: one name would go unchecked, loaded
        name = next(p.name for i, p in enumerate(progs) if index[p.name] != i)
        sections = ", ".join(p.section for p in progs if p.name == name)
        raise LoaderdError(Kind.SEMANTIC, f"the object has more than one program named "
                           f"'{name}' (sections {sections}): program names must be unique",
                           _where(spec))
    for i, prog in enumerate(spec.programs):
        if prog.name not in index:
            raise LoaderdError(Kind.SEMANTIC, f"program '{prog.name}' is not in the object",
                               _prog_loc(spec, i),
                               allowed=", ".join(sorted(index)) or "none (no program sections)")
        got = progs[index[prog.name]]
        if got.type != prog.type.kind.kernel_id:
            raise LoaderdError(Kind.SEMANTIC, f"program '{prog.name}' is in section "
                               f"'{got.section}' (program type {got.type}), but the spec says "
                               f"{prog.type.value} (type {prog.type.kind.kernel_id})",
                               _prog_loc(spec, i))
    wanted = {p.name for p in spec.programs}
    for p in progs:
        BPFObjectFile.set_autoload(p, p.name in wanted)
    return {p.name: index[p.name] for p in spec.programs}


def check_calls(spec: Spec, parsed: elf.BPFObject, obj: BPFObjectFile, pol: Policy
                ) -> dict[str, tuple[list[str], dict[str, int]]]:
    """Per program: helper names and call counts, after the policy allowed them."""
    table = helper_names()
    progs = obj.programs()
    by_name = {p.name: p for p in progs}
    out: dict[str, tuple[list[str], dict[str, int]]] = {}
    for i, prog in enumerate(spec.programs):
        where = _prog_loc(spec, i)
        try:
            facts = _merge(parsed.facts(prog.name), decode(obj.insns(by_name[prog.name])))
        except (elf.ELFError, BytecodeError) as exc:
            raise LoaderdError(Kind.HELPER, f"cannot decode the instructions of "
                               f"'{prog.name}': {exc}", where) from None
        unknown = sorted(h for h in facts.helper_ids if h not in table)
        if unknown:
            raise LoaderdError(Kind.HELPER, f"program '{prog.name}' calls helper ids {unknown}"
                               " this kernel does not define", where)
        helpers = {table[h] for h in facts.helper_ids}
        policy.check_calls(spec, prog.name, prog.type, helpers, facts.bpf_calls,
                           facts.kfunc_calls, facts.indirect_calls, pol)
        out[prog.name] = (sorted(helpers), {"bpf_to_bpf": facts.bpf_calls,
                                            "kfunc": facts.kfunc_calls,
                                            "callx": facts.indirect_calls})
    return out


def check_maps(spec: Spec, maps: list[ObjMap]) -> None:
    """The object's maps, as libbpf will create them, are exactly the spec's."""
    declared = {m.name: (i, m) for i, m in enumerate(spec.maps)}
    where = Location(spec.path, spec.line_of("maps"), None, "maps")
    for m in maps:
        if m.internal:
            raise LoaderdError(Kind.SEMANTIC, f"the object has global variables (map "
                               f"'{m.name}'): not supported; declare a map in the spec (and "
                               "fill it with `initial:`) instead", _where(spec))
        if m.pin_path is not None:
            raise LoaderdError(Kind.SEMANTIC, f"map '{m.name}' asks libbpf to pin it "
                               f"({m.pin_path}): loaderd pins every map itself; drop `pinning` "
                               "from its definition", _where(spec))
        if m.name not in declared:
            raise LoaderdError(Kind.SEMANTIC, f"the object defines map '{m.name}' that the "
                               "spec does not declare; declare it under maps:", where)
    have = {m.name: m for m in maps}
    if len(have) != len(maps):  # a crafted symbol table: libbpf would create both
        name = next(n for n in have if sum(m.name == n for m in maps) > 1)
        raise LoaderdError(Kind.SEMANTIC, f"the object defines more than one map named "
                           f"'{name}': map names must be unique", _where(spec))
    for name, (i, d) in declared.items():
        loc = Location(spec.path, d.line, None, f"maps[{i}]")
        if name not in have:
            raise LoaderdError(Kind.SEMANTIC, f"map '{name}' is declared but not in the "
                               "object", loc, allowed=", ".join(sorted(have)) or "none")
        m = have[name]
        want: tuple[int, ...] = (d.type.kind.kernel_id, sum(MAP_FLAG_BITS[f] for f in d.flags))
        got: tuple[int, ...] = (m.type, m.map_flags & MAP_FLAG_MASK)
        if d.type is MapType.RINGBUF:
            want, got = (*want, d.max_entries), (*got, m.max_entries)
        elif d.type is not MapType.PERF_EVENT_ARRAY:
            want += (d.key.size, d.value.size, d.max_entries)
            got += (m.key_size, m.value_size, m.max_entries)
        if want != got:
            raise LoaderdError(Kind.SEMANTIC, f"map '{name}' in the object does not match its "
                               f"declaration (type, flags, key/value size, entries): {got} != "
                               f"{want}", loc)


def _libbpf_log(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(_LIBBPF_NOISE)]
    return redact_addresses("\n".join(lines[-120:]))


class ObjectBuild:
    """The loaded object: program and map fds (owned by it until close())."""

    def __init__(self, spec: Spec, pol: Policy) -> None:
        if not spec.is_object:
            raise ValueError("not an object spec")
        where = _where(spec)
        try:
            parsed = elf.parse(spec.source_bytes)
        except elf.ELFError as exc:
            raise LoaderdError(Kind.SEMANTIC, f"{spec.source_path}: {exc}", where) from None
        with captured_fd2() as diag:
            try:
                self.obj = BPFObjectFile(spec.source_bytes, spec.name, where)
                err = None
            except LoaderdError as exc:
                err = exc
        if err is not None:
            err.detail = _libbpf_log(diag[0]) or None
            raise err
        try:
            self._build(spec, pol, parsed)
        except BaseException:
            self.obj.close()
            raise

    def _build(self, spec: Spec, pol: Policy, parsed: elf.BPFObject) -> None:
        check_programs(spec, self.obj)
        self.calls = check_calls(spec, parsed, self.obj, pol)
        check_maps(spec, self.obj.maps())
        with captured_fd2() as log:
            try:
                self.obj.load()
                err = None
            except kernel.KernelError as exc:
                err = exc
        if err is not None:
            text = log[0]
            verifier = "-- BEGIN PROG LOAD LOG --" in text
            reason = first_reason(text.split("-- END PROG LOAD LOG --")[0]) if verifier else ""
            raise LoaderdError(
                Kind.VERIFIER if verifier else Kind.KERNEL,
                f"kernel refused the object: {reason or err.message}", _where(spec),
                detail=_libbpf_log(text) or None) from None
        progs = {p.name: p for p in self.obj.programs()}
        self.prog_fds = {p.name: BPFObjectFile.prog_fd(progs[p.name]) for p in spec.programs}
        self.tables = {m.name: BPFObjectFile.map_fd(m) for m in self.obj.maps()}

    def close(self) -> None:
        self.obj.close()
