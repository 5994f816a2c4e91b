"""Build one spec's kernel objects in the staging area, in two halves.

`build` (in a short-lived, confined compile worker: see stage.pool and stage.confine): compile
-> map facts match the spec -> helper/call facts pass policy -> verifier load (with fallback
variants). Its result is facts plus the objects' fds, which the worker passes to its parent.
`finish` (in the parent, unconfined): pin programs and maps under staging -> fill maps ->
freeze. The compile worker can reach no pin: only trusted code writes bpffs.
Nothing here touches the committed pins except reading a `preserve:` map's old contents.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from loaderd import faults, policy
from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import kernel, pins
from loaderd.bpf.btf import helper_names
from loaderd.bpf.bytecode import BytecodeError, decode
from loaderd.errors import Kind, LoaderdError, Location, plural
from loaderd.model import (
    MAP_FLAG_MASK,
    CType,
    MapSpec,
    PinOwnership,
    Policy,
    Spec,
    kernel_map_flags,
    map_access,
    map_pin_mode,
    percpu_slot,
)
from loaderd.stage.compile import Module
from loaderd.stage.objload import ObjectBuild


@dataclass
class StagedProgram:
    name: str
    function: str  # the C function actually loaded (differs when a fallback was used)
    type: str
    id: int
    tag: str
    helpers: list[str]
    degraded: str | None = None
    # Counts decoded from the bytecode with the helpers: an adopt re-checks both against the
    # policy of the day (the tag, verified on adopt, ties them to the running program).
    calls: dict[str, int] = field(default_factory=dict)


@dataclass
class StagedMap:
    name: str
    id: int
    frozen: bool
    access: str = ""  # model.map_access: "rdonly"/"wronly" maps are pinned without w/r bits


@dataclass
class StagedSpec:
    name: str
    file: str
    sha256: str
    programs: dict[str, StagedProgram] = field(default_factory=dict)
    maps: dict[str, StagedMap] = field(default_factory=dict)
    object_sha256: str | None = None  # source.object: the ELF that was loaded
    warnings: str | None = None  # clang's warnings of a compile that succeeded


def encode(ctype: CType, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.to_bytes(ctype.size, "little", signed=ctype.signed)


def _value_bytes(m: MapSpec, value: int | bytes, ncpus: int) -> bytes:
    raw = encode(m.value, value)
    if m.type.kind.percpu:  # the syscall side reads/writes one 8-byte-aligned slot per CPU
        return raw.ljust(percpu_slot(len(raw)), b"\0") * ncpus
    return raw


def _map_loc(spec: Spec, index: int, m: MapSpec) -> Location:
    return Location(spec.path, m.line, None, f"maps[{index}]")


def check_map_facts(spec: Spec, tables: dict[str, int]) -> dict[str, int]:
    """Every declared map exists with the declared shape; no undeclared map exists."""
    declared = {m.name for m in spec.maps}
    undeclared = sorted(set(tables) - declared)
    if undeclared:  # every one at once: the author fixes them in one edit
        names = ", ".join(f"'{n}'" for n in undeclared)
        raise LoaderdError(Kind.SEMANTIC, f"source defines map{'s' * (len(undeclared) > 1)} "
                           f"{names} that the spec does not declare; declare each under maps: "
                           "(name, type, key, value, max_entries) and remove its definition "
                           "from the C text", Location(spec.path, field="maps"))
    fds: dict[str, int] = {}
    for i, m in enumerate(spec.maps):
        if m.name not in tables:
            raise LoaderdError(Kind.SEMANTIC, f"map '{m.name}' is declared but not in the "
                               "compiled object", _map_loc(spec, i, m))
        info = kernel.map_info(tables[m.name])
        want: tuple[int, ...] = (m.type.kind.kernel_id, kernel_map_flags(m.flags))
        got: tuple[int, ...] = (info.type, info.map_flags & MAP_FLAG_MASK)
        if not m.type.kind.fixed:
            want += (m.key.size, m.value.size, m.max_entries)
            got += (info.key_size, info.value_size, info.max_entries)
        if want != got:
            raise LoaderdError(Kind.SEMANTIC, f"map '{m.name}' in the kernel does not match "
                               f"its declaration (type, flags, sizes): {got} != {want}",
                               _map_loc(spec, i, m))
        fds[m.name] = tables[m.name]
    return fds


def check_calls(spec: Spec, function: str, prog_index: int, module: Module, pol: Policy,
                map_fds: set[int]) -> tuple[list[str], dict[str, int]]:
    """Helper names and call counts decoded from the bytecode, after policy allowed them."""
    prog = spec.programs[prog_index]
    where = Location(spec.path, prog.line, None, f"programs[{prog_index}]")
    try:
        facts = decode(module.bytecode(function))
    except BytecodeError as exc:
        raise LoaderdError(Kind.HELPER, f"cannot decode bytecode of '{function}': {exc}",
                           where) from None
    table = helper_names()
    unknown = sorted(i for i in facts.helper_ids if i not in table)
    if unknown:
        raise LoaderdError(Kind.HELPER, f"program '{function}' calls helper ids {unknown} this "
                           "kernel does not define", where)
    helpers = {table[i] for i in facts.helper_ids}
    policy.check_calls(spec, function, prog.type, helpers, facts.bpf_calls, facts.kfunc_calls,
                       facts.indirect_calls, pol)
    if facts.map_fds - map_fds:
        raise LoaderdError(Kind.SEMANTIC, f"program '{function}' references maps that are not "
                           "declared in the spec", where)
    return sorted(helpers), {"bpf_to_bpf": facts.bpf_calls, "kfunc": facts.kfunc_calls,
                             "callx": facts.indirect_calls}


def _load_program(spec: Spec, index: int, module: Module, pol: Policy,
                  map_fds: set[int]) -> tuple[int, str, tuple[list[str], dict[str, int]],
                                              str | None]:
    """Try the program, then its fallbacks. Returns (fd, function, (helpers, call counts),
    degraded reason)."""
    prog = spec.programs[index]
    where = f"programs[{index}]"
    candidates = [prog.name, *prog.fallback]
    known = set(module.functions())
    first_error: LoaderdError | None = None
    for function in candidates:
        if function not in known:
            raise LoaderdError(Kind.SEMANTIC, f"function '{function}' is not in the source",
                               Location(spec.path, prog.line, None, where),
                               allowed=", ".join(sorted(known)))
        try:
            calls = check_calls(spec, function, index, module, pol, map_fds)
            fd = module.load(function, prog.type, field=where, line=prog.line,
                             attach_type=prog.attach.load_attach_type)
        except LoaderdError as exc:
            if exc.kind not in (Kind.POLICY, Kind.HELPER, Kind.VERIFIER):
                raise
            first_error = first_error or exc
            continue
        degraded = None if function == prog.name else f"{prog.name}: {first_error}"
        return fd, function, calls, degraded
    assert first_error is not None
    raise first_error


def all_refused(refused: list[tuple[str, LoaderdError]]) -> LoaderdError:
    """One error for every refused program of a spec: the first located as it was, the others
    named with their reasons (the verifier logs joined in the detail)."""
    first = refused[0][1]
    if len(refused) == 1:
        return first
    rest = "; ".join(f"program '{name}' ({exc.location.field}): {exc.message}"
                     for name, exc in refused[1:])
    detail = "\n\n".join(f"--- {name}\n{exc.detail}" for name, exc in refused if exc.detail)
    return LoaderdError(first.kind, f"{first.message}; {len(refused) - 1} more refused: {rest}",
                        first.location, value=first.value, allowed=first.allowed,
                        detail=detail[:60000] or None)


def _fill(m: MapSpec, fd: int, layout: pins.PinLayout, old_pin: str, spec: str) -> None:
    ncpus = kernel.possible_cpus()
    if m.preserve and layout.exists(old_pin):
        old = layout.get(old_pin, rdonly=True)
        try:
            info = kernel.map_info(old)
            if (info.key_size, info.value_size) == (m.key.size, m.value.size):
                vsize = m.type.kind.value_size(m.value.size, ncpus)
                for key in kernel.map_keys(old, m.key.size):
                    val = kernel.map_lookup(old, key, vsize)
                    if val is not None:
                        kernel.map_update(fd, key, val)
                return
            # Never silently: the operator asked for these contents to be kept.
            audit.emit(Event.DEGRADED, f"{spec}/{m.name}: preserve not possible, key/value "
                       f"size changed ({info.key_size}/{info.value_size} -> "
                       f"{m.key.size}/{m.value.size}); the old contents are dropped and "
                       "`initial` is used", spec=spec, map=m.name, old_map_id=info.id)
        finally:
            os.close(old)
    for entry in m.initial:
        kernel.map_update(fd, encode(m.key, entry.key), _value_bytes(m, entry.value, ncpus))


@dataclass
class Built:
    """What a compile worker hands back: facts, and the fds of the objects it created (the
    programs loaded, the maps BCC made), by name."""

    staged: StagedSpec
    prog_fds: dict[str, int]
    map_fds: dict[str, int]

    def fds(self) -> list[int]:
        return [*self.prog_fds.values(), *self.map_fds.values()]


def build(spec: Spec, pol: Policy) -> tuple[Built, Callable[[], None]]:
    """Compile (BCC) or open (a CO-RE object through libbpf), check the facts, load every
    program. The fds in Built belong to the returned closer (or, once passed to another
    process, to that process): call it when done."""
    staged = StagedSpec(spec.name, spec.path, spec.sha256, object_sha256=spec.object_sha256)
    return (_build_object if spec.is_object else _build_bcc)(spec, pol, staged)


def _build_bcc(spec: Spec, pol: Policy, staged: StagedSpec
               ) -> tuple[Built, Callable[[], None]]:
    module = Module(spec)
    staged.warnings = module.warnings
    try:
        map_fds = check_map_facts(spec, module.tables())
        prog_fds: dict[str, int] = {}
        refused: list[tuple[str, LoaderdError]] = []
        for i, prog in enumerate(spec.programs):
            try:
                fd, function, (helpers, calls), degraded = _load_program(
                    spec, i, module, pol, set(map_fds.values()))
            except LoaderdError as exc:
                if exc.kind not in (Kind.POLICY, Kind.HELPER, Kind.VERIFIER, Kind.SEMANTIC):
                    raise
                refused.append((prog.name, exc))  # go on: every refused program in one run
                continue
            prog_fds[prog.name] = fd
            _record(staged, prog.name, prog.type.value, fd, function, helpers, calls, degraded)
        if refused:
            raise all_refused(refused)  # the module's close (below) releases the loaded ones
    except BaseException:
        module.close()
        raise
    return Built(staged, prog_fds, map_fds), module.close


def _build_object(spec: Spec, pol: Policy, staged: StagedSpec
                  ) -> tuple[Built, Callable[[], None]]:
    obj = ObjectBuild(spec, pol)
    try:
        map_fds = check_map_facts(spec, obj.tables)
        for prog in spec.programs:
            helpers, calls = obj.calls[prog.name]
            _record(staged, prog.name, prog.type.value, obj.prog_fds[prog.name], prog.name,
                    helpers, calls, None)
    except BaseException:
        obj.close()
        raise
    return Built(staged, obj.prog_fds, map_fds), obj.close


def _record(staged: StagedSpec, name: str, ptype: str, fd: int, function: str,
            helpers: list[str], calls: dict[str, int], degraded: str | None) -> None:
    info = kernel.prog_info(fd)
    staged.programs[name] = StagedProgram(name, function, ptype, info.id, info.tag, helpers,
                                          degraded, calls)


def verify_built(spec: Spec, built: Built) -> None:
    """The parent's own look at what a worker handed back, from the kernel: maps as declared,
    programs of the declared type with the ids the worker reported, using only those maps."""
    check_map_facts(spec, built.map_fds)
    map_ids = {kernel.map_info(fd).id for fd in built.map_fds.values()}
    for i, prog in enumerate(spec.programs):
        info = kernel.prog_info(built.prog_fds[prog.name])
        got = built.staged.programs[prog.name]
        if (info.id, info.type, info.tag) != (got.id, prog.type.kind.kernel_id, got.tag) \
                or not set(info.map_ids) <= map_ids:
            raise LoaderdError(Kind.KERNEL, f"the compile worker handed back a program that "
                               f"is not '{prog.name}' as loaded and checked",
                               Location(spec.path, prog.line, None, f"programs[{i}]"))


def finish(spec: Spec, built: Built, root: str, txid: str, owner: PinOwnership, *,
           pin: bool = True) -> StagedSpec:
    """Audit the loads; with pin, pin every object under `<root>/.staging/<txid>/<spec>`, fill
    and freeze the maps. The caller keeps (and closes) the fds in `built`."""
    staged = built.staged
    for prog in spec.programs:
        p = staged.programs[prog.name]
        audit.emit(Event.PROG_LOADED, f"{spec.name}/{prog.name}: loaded '{p.function}' "
                   f"(id {p.id}, tag {p.tag})", spec=spec.name, program=prog.name,
                   prog_id=p.id, prog_tag=p.tag, prog_type=prog.type.value,
                   helpers=p.helpers, spec_sha256=spec.sha256, file=spec.path)
        if p.degraded:
            audit.emit(Event.DEGRADED, f"{spec.name}/{prog.name}: fallback '{p.function}' "
                       f"used: {p.degraded}", spec=spec.name, program=prog.name,
                       reason=p.degraded)
    if not pin:
        return staged
    faults.point("after_load")
    layout = pins.PinLayout(root)
    gid = owner.gid
    staging = layout.staging(txid)
    for kind in ("progs", "maps", "links"):
        staging.ensure_dir(staging.kind_dir(spec.name, kind), 0o755)
    for prog in spec.programs:
        staging.pin(built.prog_fds[prog.name], staging.prog_path(spec.name, prog.name),
                    owner.mode, gid)
    for m in spec.maps:
        fd = built.map_fds[m.name]
        _fill(m, fd, layout, layout.map_path(spec.name, m.name), spec.name)
        if m.freeze:
            kernel.map_freeze(fd)
            audit.emit(Event.MAP_FROZEN, f"{spec.name}/{m.name}: frozen", spec=spec.name,
                       map=m.name, map_id=kernel.map_info(fd).id)
        access = map_access(m.flags)
        staging.pin(fd, staging.map_path(spec.name, m.name),
                    map_pin_mode(owner.mode, access), gid)
        map_id = kernel.map_info(fd).id
        staged.maps[m.name] = StagedMap(m.name, map_id, kernel.map_is_frozen(fd), access)
        audit.emit(Event.MAP_CREATED, f"{spec.name}/{m.name}: {m.type.value} map id "
                   f"{map_id}, {plural(m.max_entries, 'entry', 'entries')}", spec=spec.name,
                   map=m.name, map_id=map_id, frozen=staged.maps[m.name].frozen)
    faults.point("after_pin")
    return staged

