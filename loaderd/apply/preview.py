"""`loaderd plan`: what an apply would do, per spec and per object, without loading, pinning or
attaching anything; and the freshness check of `apply --plan FILE`.

The decisions are apply.plan's, from the same inputs the applier gathers (validated specs, the
manifest, drift facts read from bpffs and the kernel), so the prediction is the apply's own
first step. A plan file carries three hashes: the programs directory (every file's bytes), the
settings (with the signature key lists) and the kernel state (manifest and drift facts);
`apply --plan` recomputes them under the writers' lock and refuses if any differs, or if the
decisions it reaches differ from the plan's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from loaderd.apply import killswitch
from loaderd.apply import plan as planner
from loaderd.apply.commit import link_holds
from loaderd.bpf import attach, pins
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import Settings, Spec
from loaderd.store import manifest as manifest_mod
from loaderd.store import statedir
from loaderd.store.manifest import Manifest, SpecRecord, Status
from loaderd.store.statedir import Hold, State

VERSION = 1
MAX_PLAN_BYTES = 4 * 1024 * 1024
MAX_TREE_FILES = 10_000
# What a plan cannot know without compiling: said in every plan.
UNKNOWN = (
    "whether each built program compiles and passes the kernel verifier",
    "the helpers, bpf-to-bpf calls and kfuncs of built programs (checked on their bytecode)",
    "whether attach targets of built programs are free when the apply runs",
    "whether a built BCC program reads kernel structs at offsets the headers get wrong")


@dataclass(frozen=True)
class Step:
    """One object of one spec: kind program/map/link, what happens to it and why."""

    kind: str
    name: str
    action: str
    why: str = ""


@dataclass(frozen=True)
class SpecPlan:
    spec: str
    action: str  # apply.plan.Action values
    reason: str
    objects: tuple[Step, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Hashes:
    programs: str  # every file under the programs directory: names and bytes
    settings: str  # the settings file and its signature key lists
    kernel: str  # the manifest and the drift facts read from the kernel

    def changed(self, now: Hashes) -> list[str]:
        out = []
        if self.programs != now.programs:
            out.append("the programs directory changed since the plan")
        if self.settings != now.settings:
            out.append("the settings (or their signature key lists) changed since the plan")
        if self.kernel != now.kernel:
            out.append("the applied set or the kernel state (manifest, pins, links) changed "
                       "since the plan")
        return out


@dataclass(frozen=True)
class Preview:
    specs: tuple[SpecPlan, ...]
    hashes: Hashes
    compiles: int
    programs_dir: str
    refused: tuple[str, ...] = ()  # refusals not tied to one spec (kill switch, pending)
    held: str | None = None  # the generation a rollback holds: what the apply builds instead

    @property
    def is_refused(self) -> bool:
        return bool(self.refused) or any(s.action == planner.Action.REFUSE for s in self.specs)

    @property
    def changes(self) -> bool:
        return any(s.action != planner.Action.ADOPT for s in self.specs)

    @property
    def exit_code(self) -> int:
        """terraform plan -detailed-exitcode: 0 nothing to do, 2 changes pending, 1 refused."""
        return 1 if self.is_refused else 2 if self.changes else 0

    def names(self, action: str) -> list[str]:
        return sorted(s.spec for s in self.specs if s.action == action)

    def decisions(self) -> list[tuple[str, str]]:
        return sorted((s.spec, s.action) for s in self.specs)


# --- hashes --------------------------------------------------------------------------------

def tree_digest(directory: str) -> str:
    """The programs directory's digest (statedir.tree_digest), bounded for a plan."""
    return statedir.tree_digest(directory, MAX_TREE_FILES)


def hold_in_effect(state: State, settings: Settings, specs_dir: str | None
                   ) -> tuple[Hold | None, str | None]:
    """(the rollback hold an apply now honours, None) or (the hold, why the apply releases it)
    or (None, None) when there is none. Reads only: the applier releases, a plan just says."""
    hold = state.hold()
    if hold is None:
        return None, None
    with contextlib.suppress(LoaderdError):
        if state.manifest().status is Status.DISABLED:
            return None, None  # the kill switch refuses the apply; the hold waits for `enable`
    programs = settings.programs_dir
    if specs_dir is not None and os.path.realpath(specs_dir) != os.path.realpath(programs):
        return hold, f"an apply of {specs_dir} was asked for"
    if statedir.tree_digest(programs) != hold.programs_sha256:
        return hold, f"{programs} changed since"
    if hold.generation not in state.generations():
        return hold, f"generation {hold.generation} is no longer kept"
    return hold, None


def kernel_digest(current: Manifest, facts: planner.Facts) -> str:
    d = manifest_mod.to_dict(current)
    d.pop("written_at", None)
    d.pop("last_apply", None)
    for spec in d.get("specs", {}).values():
        spec.pop("signature", None)  # today's check, not kernel state
    body = {"manifest": d, "differences": {k: list(v) for k, v in
                                           sorted(facts.differences.items())},
            "present": sorted(facts.present)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def settings_digest(settings: Settings) -> str:
    return settings.sha256 or hashlib.sha256(b"built-in settings").hexdigest()


# --- per object ----------------------------------------------------------------------------

def _objects(layout: pins.PinLayout, s: Spec | None, old: SpecRecord | None,
             action: str) -> tuple[Step, ...]:
    steps: list[Step] = []
    if action == planner.Action.REMOVE and old is not None:
        steps += [Step("link", n, "detach") for n in sorted(old.links)]
        steps += [Step("program", n, "unpin") for n in sorted(old.programs)]
        steps += [Step("map", n, "unpin") for n in sorted(old.maps)]
        return tuple(steps)
    if s is None:
        return ()
    if action == planner.Action.ADOPT:
        steps += [Step("program", p.name, "adopt") for p in s.programs]
        steps += [Step("map", m.name, "adopt") for m in s.maps]
        steps += [Step("link", p.name, "adopt") for p in s.programs
                  if attach.target(p) is not None]
        return tuple(steps)
    if action != planner.Action.BUILD:
        return ()
    how = "load (precompiled object)" if s.is_object else "compile and load"
    for p in s.programs:
        was = old.programs.get(p.name) if old else None
        steps.append(Step("program", p.name, how, f"replaces prog id {was.id}" if was else ""))
    for m in s.maps:
        was_map = old.maps.get(m.name) if old else None
        if was_map is not None and m.preserve:
            steps.append(Step("map", m.name, "create", f"entries carried over from map id "
                              f"{was_map.id} (preserve)"))
        else:
            steps.append(Step("map", m.name, "create",
                              f"replaces map id {was_map.id}" if was_map else ""))
    for p in s.programs:
        tgt = attach.target(p)
        if tgt is None:
            continue
        old_link = old.links.get(p.name) if old else None
        if tgt.exclusive and old_link is not None and old_link.target == tgt and link_holds(
                layout, layout.link_path(s.name, p.name), tgt):
            steps.append(Step("link", p.name, "replace in place (link update)",
                              f"link id {old_link.id} on {tgt.text}"))
        else:
            steps.append(Step("link", p.name, "attach", tgt.text + (
                f" (link id {old_link.id} detached at commit)" if old_link else "")))
    if old is not None:
        steps += [Step("link", n, "detach", "no longer in the spec")
                  for n in sorted(set(old.links) - {p.name for p in s.programs
                                                    if attach.target(p) is not None})]
    return tuple(steps)


class Gatherer(Protocol):
    """What make() needs of the applier (apply.applier.Applier), without importing it."""

    state: State
    layout: pins.PinLayout

    def facts(self, specs: list[Spec], current: Manifest) -> planner.Facts: ...


Validate = Callable[[Settings, str], tuple[list[Spec], list[LoaderdError]]]


def make(settings: Settings, app: Gatherer, validate: Validate,
         specs_dir: str | None = None) -> Preview:
    """The plan of an apply now. Reads the programs directory, the manifest and the kernel;
    changes nothing and journals nothing."""
    directory = specs_dir or settings.programs_dir
    hold, released = hold_in_effect(app.state, settings, specs_dir)
    held = hold.generation if hold is not None and released is None else None
    if held is not None:  # the apply builds the held generation, with its owner's trust
        directory = app.state.generation_dir(held)
        settings = dataclasses.replace(settings,
                                       config_owner_uid=os.stat(directory).st_uid)
    current = app.state.manifest()
    refused: list[str] = []
    if current.status is Status.PENDING:
        refused.append(f"commit {current.txid} is pending: the next apply rolls it forward "
                       "first; run `loaderd apply`, then plan")
    try:
        killswitch.check_enabled(app.state, current)
    except LoaderdError as exc:
        refused.append(str(exc))
    specs, errors = validate(settings, directory)
    programs_hash = tree_digest(directory) if os.path.isdir(directory) else ""
    steps: list[SpecPlan] = []
    if errors:
        by_file: dict[str, list[LoaderdError]] = {}
        for e in errors:
            by_file.setdefault(e.location.file or directory, []).append(e)
        steps = [SpecPlan(os.path.basename(f).removesuffix(".yaml"), planner.Action.REFUSE,
                          "invalid", error=str(errs[0])) for f, errs in sorted(by_file.items())]
        facts = planner.Facts({}, frozenset())
        hashes = Hashes(programs_hash, settings_digest(settings), kernel_digest(current, facts))
        return Preview(tuple(steps), hashes, 0, specs_dir or settings.programs_dir,
                       tuple(refused), held)
    current = planner.with_signatures(current, specs)
    facts = app.facts(specs, current)
    decided = planner.plan(specs, current, facts, settings.policy,
                           {s.name: app.layout.spec_dir(s.name) for s in specs})
    spec_of = {s.name: s for s in specs}
    for d in decided.decisions:
        steps.append(SpecPlan(d.spec, d.action.value, d.reason, _objects(
            app.layout, spec_of.get(d.spec), current.specs.get(d.spec), d.action.value),
            str(d.error) if d.error else None))
    hashes = Hashes(programs_hash, settings_digest(settings), kernel_digest(current, facts))
    return Preview(tuple(steps), hashes, len(decided.build), specs_dir or settings.programs_dir,
                   tuple(refused), held)


# --- the plan file -------------------------------------------------------------------------

def to_dict(p: Preview) -> dict[str, Any]:
    return {"version": VERSION, "programs_dir": p.programs_dir,
            "hashes": dataclasses.asdict(p.hashes), "compiles": p.compiles,
            "exit_code": p.exit_code, "refused": list(p.refused), "held_generation": p.held,
            "specs": [{"spec": s.spec, "action": s.action, "reason": s.reason,
                       "error": s.error, "objects": [dataclasses.asdict(o) for o in s.objects]}
                      for s in p.specs],
            "unknown_without_compiling": list(UNKNOWN)}


def _bad(path: str, what: str) -> LoaderdError:
    return LoaderdError(Kind.STATE, f"not a loaderd plan: {what}", Location(path),
                        allowed="the JSON `loaderd plan --json` (or --out) wrote")


def read(path: str) -> Preview:
    """A plan file (operator input: bounded, typed, every field checked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LoaderdError(Kind.STATE, f"cannot open the plan: {exc.strerror}",
                           Location(path)) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _bad(path, "not a regular file")
        raw = f.read(MAX_PLAN_BYTES + 1)
    if len(raw) > MAX_PLAN_BYTES:
        raise _bad(path, "too large")
    try:
        d = json.loads(raw)
        if d.get("version") != VERSION:
            raise _bad(path, f"version {d.get('version')!r}")
        h = d["hashes"]
        hashes = Hashes(str(h["programs"]), str(h["settings"]), str(h["kernel"]))
        actions = {a.value for a in planner.Action}
        specs = []
        for s in d["specs"]:
            if s["action"] not in actions or not isinstance(s["spec"], str):
                raise _bad(path, f"unknown action {str(s.get('action'))[:40]!r}")
            specs.append(SpecPlan(s["spec"], s["action"], str(s["reason"]),
                                  error=s.get("error")))
        held = d.get("held_generation")
        return Preview(tuple(specs), hashes, int(d["compiles"]), str(d["programs_dir"]),
                       tuple(str(r) for r in d.get("refused", [])),
                       None if held is None else str(held))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
            RecursionError) as exc:  # 1e999 compiles, [[[...]]] nesting: not a plan
        raise _bad(path, f"{type(exc).__name__}: {str(exc)[:80]}") from None


def checker(saved: Preview, where: str, settings: Settings
            ) -> Callable[[str, Manifest, planner.Facts, planner.Plan], LoaderdError | None]:
    """The applier's `expect`: run under the writers' lock, after its own planning."""
    def check(specs_dir: str, current: Manifest, facts: planner.Facts,
              decided: planner.Plan) -> LoaderdError | None:
        now = Hashes(tree_digest(specs_dir), settings_digest(settings),
                     kernel_digest(current, facts))
        return stale(saved, now, [(d.spec, d.action.value) for d in decided.decisions], where)
    return check


def stale(saved: Preview, now: Hashes, decisions: Sequence[tuple[str, str]],
          where: str) -> LoaderdError | None:
    """Why `apply --plan` must refuse (None: the plan still holds exactly)."""
    if saved.is_refused:
        return LoaderdError(Kind.STATE, "the plan refuses the apply; fix what it says, then "
                            "plan again", Location(where))
    reasons = saved.hashes.changed(now)
    if not reasons and sorted(decisions) != saved.decisions():
        reasons = ["the apply would decide differently than the plan"]
    if reasons:
        return LoaderdError(Kind.STATE, "stale plan: " + "; ".join(reasons) + "; nothing was "
                            "changed: run `loaderd plan` again", Location(where))
    return None


def render(p: Preview) -> str:
    lines = []
    for r in p.refused:
        lines.append(f"REFUSED: {r}")
    if p.held is not None:
        lines.append(f"rollback held: the apply builds generation {p.held}, not {p.programs_dir} "
                     "(unchanged since the rollback); `loaderd rollback --release` to apply it")
    for s in p.specs:
        head = f"{s.spec}: {s.action.upper()} ({s.reason})"
        lines.append(head)
        if s.error:
            lines.append(f"    {s.error}")
        for o in s.objects:
            lines.append(f"    {o.kind} {o.name}: {o.action}" + (f" ({o.why})" if o.why else ""))
    counts = {a.value: len(p.names(a.value)) for a in planner.Action}
    lines.append(f"plan: {counts['build']} to build, {counts['adopt']} to adopt, "
                 f"{counts['remove']} to remove, {counts['refuse']} refused; "
                 f"compiles {p.compiles}")
    lines.append("not known without compiling: " + "; ".join(UNKNOWN))
    verdict = {0: "nothing to do", 2: "changes pending", 1: "REFUSED"}[p.exit_code]
    lines.append(f"result: {verdict} (exit {p.exit_code})")
    return "\n".join(lines)
