"""Allow-lists and limits: pure checks over typed specs, each raising one LoaderdError that
names what was refused, where, and what is allowed."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from loaderd import model
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import DANGEROUS_HELPERS, GATED_HELPERS, MapSpec, Policy, ProgType, Spec


def possible_cpus() -> int:
    """Possible CPUs for the memory limit estimate only: a fallback is fine here, unlike
    model.possible_cpus, which sizes per-CPU value buffers and must be exact."""
    try:
        return model.possible_cpus()
    except (OSError, ValueError):
        return os.cpu_count() or 1


def map_memory(m: MapSpec) -> int:
    """Bytes a map may take (model.MapKind.memory)."""
    return m.type.kind.memory(m.key.size, m.value.size, m.max_entries, possible_cpus())


def _names(items: Iterable[str]) -> str:
    return ", ".join(sorted(items))


def _loc(spec: Spec, *path: str | int) -> Location:
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return Location(spec.path, spec.line_of(*path), None, field)


def check_spec(spec: Spec, policy: Policy) -> None:
    """Program types, map types, map flags and per-map entries of one spec."""
    for i, p in enumerate(spec.programs):
        if p.type not in policy.program_types:
            raise LoaderdError(Kind.POLICY, "program type not allowed by policy",
                               _loc(spec, "programs", i, "type"), value=p.type.value,
                               allowed=_names(policy.program_types) or "none")
    for i, m in enumerate(spec.maps):
        if m.type not in policy.map_types:
            raise LoaderdError(Kind.POLICY, "map type not allowed by policy",
                               _loc(spec, "maps", i, "type"), value=m.type.value,
                               allowed=_names(policy.map_types) or "none")
        refused = m.flags - policy.map_flags
        if refused:
            raise LoaderdError(Kind.POLICY, f"map flag {_names(refused)} not allowed by policy",
                               _loc(spec, "maps", i, "flags"),
                               allowed=_names(policy.map_flags) or "none")
        limit = policy.limits.max_entries
        if m.max_entries > limit:
            raise LoaderdError(Kind.LIMIT, f"max_entries {m.max_entries} over the limit {limit}",
                               _loc(spec, "maps", i, "max_entries"), allowed=f"1..{limit}")


def _over(specs: Sequence[Spec], what: str, count: Iterable[int], limit: int,
          unit: str = "") -> None:
    total, crossed = 0, None
    for s, n in zip(specs, count, strict=True):
        total += n
        if crossed is None and total > limit:
            crossed = s
    if crossed is not None:
        across = f"{len(specs)} spec" + ("s" if len(specs) != 1 else "")
        raise LoaderdError(Kind.LIMIT, f"{total}{unit} declared across {across}, "
                           f"limit {limit}{unit}", Location(crossed.path, field=what))


def check_set(specs: Sequence[Spec], policy: Policy) -> None:
    """Limits across every spec applied together (the file that crosses a limit is named)."""
    limits = policy.limits
    _over(specs, "programs", (len(s.programs) for s in specs), limits.max_programs)
    _over(specs, "maps", (len(s.maps) for s in specs), limits.max_maps)
    _over(specs, "maps.memory", (sum(map_memory(m) for m in s.maps) for s in specs),
          limits.max_map_memory, " bytes")


def check_all(specs: Sequence[Spec], policy: Policy) -> list[LoaderdError]:
    """check_spec on each spec, then check_set; every error, not just the first."""
    errors: list[LoaderdError] = []
    for s in specs:
        try:
            check_spec(s, policy)
        except LoaderdError as exc:
            errors.append(exc)
    try:
        check_set(specs, policy)
    except LoaderdError as exc:
        errors.append(exc)
    return errors


def _program_index(spec: Spec, function: str) -> int | None:
    for i, p in enumerate(spec.programs):
        if function == p.name or function in p.fallback:
            return i
    return None


def check_calls(spec: Spec, program: str, ptype: ProgType, helpers: set[str], bpf_calls: int,
                kfuncs: int, callx: int, policy: Policy) -> None:
    """Calls decoded from `program`'s bytecode: helpers (bpf_func_id names without
    BPF_FUNC_), bpf-to-bpf calls, kfunc calls and indirect calls (callx)."""
    i = _program_index(spec, program)
    loc = _loc(spec, "programs", i) if i is not None else Location(spec.path, field="programs")
    who = f"program '{program}' ({ptype.value})"
    if callx:
        raise LoaderdError(Kind.HELPER, f"{who} makes {callx} indirect call(s) (callx); "
                           "never allowed", loc)
    allowed = policy.helpers_for(ptype)
    refused = helpers - allowed
    if refused:
        raise LoaderdError(Kind.HELPER, f"{who} calls helpers not allowed: {_names(refused)}"
                           + helper_hints(refused, ptype), loc,
                           allowed=_names(allowed) or "none")
    if kfuncs and not policy.allow_kfuncs:
        raise LoaderdError(Kind.HELPER, f"{who} makes {kfuncs} kfunc call(s); kfunc calls are "
                           "off (policy.calls.kfunc)", loc)
    if bpf_calls and not policy.allow_calls:
        raise LoaderdError(Kind.HELPER, f"{who} makes {bpf_calls} bpf-to-bpf call(s); they are "
                           "off (policy.calls.bpf_to_bpf)", loc)


def helper_hints(refused: Iterable[str], ptype: ProgType) -> str:
    """For each kind of refused helper, why and the loaderd.yaml setting that allows it."""
    dangerous = [h for h in sorted(refused) if h in DANGEROUS_HELPERS]
    gated: dict[str, list[str]] = {}
    for h in sorted(refused):
        if h in GATED_HELPERS and h not in DANGEROUS_HELPERS:
            gated.setdefault(GATED_HELPERS[h], []).append(h)
    other = [h for h in sorted(refused) if h not in DANGEROUS_HELPERS and h not in GATED_HELPERS]
    where = f"list it in loaderd.yaml under policy.helpers.by_type.{ptype}"
    out = ""
    if dangerous:
        out += (f"; {', '.join(dangerous)}: dangerous, must be allowed explicitly by the "
                "operator in loaderd.yaml (policy.helpers.allow)")
    for why, names in gated.items():
        out += (f"; {', '.join(names)}: {why}, off by default; to allow it for {ptype} "
                f"programs, {where}")
        reads = [n for n in names if n in ("probe_read", "probe_read_str")]
        if reads:
            # BCC writes these calls itself: the author never typed bpf_probe_read
            out += (f" ({ptype}: [{', '.join(reads)}]); the call may be BCC's own: it "
                    "rewrites a dereference of a kernel pointer (`p->field` on a struct "
                    "pointer, e.g. from bpf_get_current_task() or a raw tracepoint's args) into "
                    "bpf_probe_read; read the value from a tracepoint's `args->field` instead "
                    "where there is one")
    if other:
        out += f"; to allow {', '.join(other)} for {ptype} programs, {where}"
    return out
