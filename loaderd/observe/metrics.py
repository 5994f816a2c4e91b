"""Prometheus text-format metrics for node_exporter's textfile collector: pure rendering.

Input is the one status report (`observe.status.status`, the same facts `loaderctl status
--json` prints), the last apply as the manifest and the refusal record tell it, and the
resident's event counters. Program run counters appear when the report has them (the kernel
counts only while kernel.bpf_stats_enabled=1; the resident cannot read that sysctl itself:
ProcSubset=pid hides /proc/sys). Output is the text of loaderd.prom;
`store.textfile` writes it atomically. Nothing here opens a file.

Every family is documented in docs/fleet.md. Label values are the report's own (spec, program,
map names are safe names; kernel type names). Counters come from the kernel (run_cnt,
run_time_ns) or from the resident (event records since it started): Prometheus' rate()
handles their resets.

Signatures (hook): a spec row of the report that carries `"signature": {"status": "<word>"}`
(or a plain string) becomes `loaderd_spec_signature{spec,status} 1`; rows without one emit
nothing, so the family appears once signed specs exist.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loaderd.store.manifest import LastApply, Status
from loaderd.store.statedir import EventCount, Refusal

FILE_NAME = "loaderd.prom"  # the resident's
AUDIT_FILE_NAME = "loaderd-audit.prom"  # loaderd-audit.service's (it alone sees every program)


# One event map's counters since the resident started (the same record the resident writes
# for `loaderd status`).
RingCount = EventCount


@dataclass(frozen=True)
class Inputs:
    report: Mapping[str, Any]  # observe.status.status()
    last_apply: LastApply | None
    refusal: Refusal | None
    rings: tuple[RingCount, ...] = ()
    now: float = 0.0


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


# name -> (type, help). Order here is the order in the file.
FAMILIES: dict[str, tuple[str, str]] = {
    "loaderd_metrics_timestamp_seconds": ("gauge", "When loaderd wrote this file (Unix time)."),
    "loaderd_manifest_readable": ("gauge", "1 if the manifest could be read and trusted."),
    "loaderd_kill_switch_pulled": ("gauge", "1 while the kill switch is pulled (loaderd "
                                   "disable): nothing is loaded until loaderd enable."),
    "loaderd_commit_pending": ("gauge", "1 if a commit was interrupted (the next apply rolls "
                               "it forward)."),
    "loaderd_specs": ("gauge", "Specs applied."),
    "loaderd_programs": ("gauge", "Programs applied, per spec and program type."),
    "loaderd_maps": ("gauge", "Maps applied, per spec and map type."),
    "loaderd_links": ("gauge", "Links applied, per spec and link type."),
    "loaderd_spec_drift": ("gauge", "1 if the spec's pinned objects differ from the manifest."),
    "loaderd_spec_drift_differences": ("gauge", "Differences found by the drift check."),
    "loaderd_spec_degraded": ("gauge", "1 if a program of the spec was loaded degraded."),
    "loaderd_spec_signature": ("gauge", "Signature status of the applied spec (1 per spec)."),
    "loaderd_last_apply_success": ("gauge", "1 if the last apply went through, 0 if it was "
                                   "refused (the set before it stays applied)."),
    "loaderd_last_apply_timestamp_seconds": ("gauge", "When the last apply that went through "
                                             "finished (Unix time)."),
    "loaderd_last_apply_duration_seconds": ("gauge", "How long the last apply that went "
                                            "through took."),
    "loaderd_last_apply_compiles": ("gauge", "Specs the last apply compiled (0: all adopted)."),
    "loaderd_last_refusal_timestamp_seconds": ("gauge", "When the refused apply was refused "
                                               "(present only while it is the last apply)."),
    "loaderd_last_refusal_errors": ("gauge", "Errors in the refused apply."),
    "loaderd_events_read_total": ("counter", "Ring buffer records read by the resident."),
    "loaderd_events_dropped_total": ("counter", "Ring buffer records over the rate limit "
                                     "(read, not journaled)."),
    "loaderd_events_lost_total": ("counter", "Perf buffer samples the kernel lost (its "
                                  "per-CPU ring was full when the program wrote)."),
    "loaderd_events_backlog_total": ("counter", "Ring buffer records already waiting when "
                                     "the resident's reader attached (written while nobody "
                                     "read it; journaled marked backlog)."),
    "loaderd_map_fill_ratio": ("gauge", "Entries over max_entries of a hash map (unread bytes "
                               "over size for a ring buffer); a full hash refuses new keys."),
    "loaderd_program_runs_total": ("counter", "Program runs the kernel counted (run_cnt)."),
    "loaderd_program_run_time_seconds_total": ("counter", "Program run time the kernel "
                                               "counted (run_time_ns)."),
    # loaderd-audit.prom
    "loaderd_audit_timestamp_seconds": ("gauge", "When the system-wide BPF audit last ran."),
    "loaderd_foreign_programs": ("gauge", "BPF programs on the host loaderd did not load."),
    "loaderd_foreign_programs_new": ("gauge", "Foreign programs not in the audit baseline "
                                     "(new since the last run)."),
    "loaderd_load_bursts": ("gauge", "Bursts of BPF program loads the audit found."),
}


def _s(name: str, value: float, **labels: str) -> Sample:
    return Sample(name, tuple(sorted(labels.items())), float(value))


def _signature(spec: Mapping[str, Any]) -> str | None:
    sig = spec.get("signature")
    if isinstance(sig, Mapping):
        sig = sig.get("status")
    return sig if isinstance(sig, str) and sig else None


def _objects(name: str, spec: str, rows: Iterable[Mapping[str, Any]]) -> list[Sample]:
    by_type = Counter(str(r.get("type") or "unknown") for r in rows)
    return [_s(name, n, spec=spec, type=t) for t, n in sorted(by_type.items())]


def samples(inp: Inputs) -> list[Sample]:
    report = inp.report
    head = report["manifest"]
    out = [_s("loaderd_metrics_timestamp_seconds", inp.now),
           _s("loaderd_manifest_readable", bool(head.get("readable"))),
           _s("loaderd_kill_switch_pulled", head.get("status") == Status.DISABLED.value),
           _s("loaderd_commit_pending", head.get("status") == Status.PENDING.value),
           _s("loaderd_specs", len(report["specs"]))]
    for spec in report["specs"]:
        name = spec["spec"]
        out += _objects("loaderd_programs", name, spec["programs"])
        out += _objects("loaderd_maps", name, spec["maps"])
        out += _objects("loaderd_links", name, spec["links"])
        if spec["drift"] is not None:  # None: no manifest to compare against
            out.append(_s("loaderd_spec_drift", bool(spec["drift"]), spec=name))
            out.append(_s("loaderd_spec_drift_differences", len(spec["drift"]), spec=name))
        out.append(_s("loaderd_spec_degraded", bool(spec["degraded"]), spec=name))
        sig = _signature(spec)
        if sig is not None:
            out.append(_s("loaderd_spec_signature", 1, spec=name, status=sig))
        for m in spec["maps"]:
            if "fill" in m:
                out.append(_s("loaderd_map_fill_ratio", m["fill"], spec=name,
                              map=str(m.get("name")), type=str(m.get("type"))))
        for p in spec["programs"]:
            if "run_cnt" in p:
                labels = {"spec": name, "program": p["name"], "type": str(p.get("type"))}
                out.append(_s("loaderd_program_runs_total", p["run_cnt"], **labels))
                out.append(_s("loaderd_program_run_time_seconds_total",
                              p["run_time_ns"] / 1e9, **labels))
    refusal, last = inp.refusal, inp.last_apply
    refused = refusal is not None and (last is None or refusal.at >= last.at)
    if refusal is not None or last is not None:
        out.append(_s("loaderd_last_apply_success", not refused))
    if last is not None:
        out.append(_s("loaderd_last_apply_timestamp_seconds", last.at))
        if last.duration is not None:
            out.append(_s("loaderd_last_apply_duration_seconds", last.duration))
        out.append(_s("loaderd_last_apply_compiles", last.compiles))
    if refused and refusal is not None:
        out.append(_s("loaderd_last_refusal_timestamp_seconds", refusal.at))
        out.append(_s("loaderd_last_refusal_errors", refusal.errors))
    for r in inp.rings:
        out.append(_s("loaderd_events_read_total", r.read, spec=r.spec, map=r.map))
        out.append(_s("loaderd_events_dropped_total", r.dropped, spec=r.spec, map=r.map))
        out.append(_s("loaderd_events_lost_total", r.lost, spec=r.spec, map=r.map))
        out.append(_s("loaderd_events_backlog_total", r.backlog, spec=r.spec, map=r.map))
    return out


def audit_samples(foreign: int, new: int, bursts: int, now: float) -> list[Sample]:
    """loaderctl audit-system's findings (loaderd-audit.prom)."""
    return [_s("loaderd_audit_timestamp_seconds", now), _s("loaderd_foreign_programs", foreign),
            _s("loaderd_foreign_programs_new", new), _s("loaderd_load_bursts", bursts)]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 2 ** 53 else repr(v)


def render(found: Iterable[Sample]) -> str:
    """Prometheus text exposition format 0.0.4 (what the textfile collector parses): one
    HELP/TYPE block per family that has samples, families in FAMILIES order."""
    by_name: dict[str, list[Sample]] = {}
    for s in found:
        if s.name not in FAMILIES:
            raise ValueError(f"undeclared metric {s.name}")
        by_name.setdefault(s.name, []).append(s)
    lines = []
    for name, (kind, text) in FAMILIES.items():
        if name not in by_name:
            continue
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for s in by_name[name]:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
            lines.append(f"{name}{{{labels}}} {_number(s.value)}" if labels
                         else f"{name} {_number(s.value)}")
    return "\n".join(lines) + "\n"

