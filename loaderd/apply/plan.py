"""What an apply will do, decided without touching anything: a pure function.

specs (parsed, policy-checked) + the manifest (typed records) + kernel facts gathered by the
caller (how each candidate's pins differ from its record; which spec directories exist) +
today's policy in; per spec one decision out: adopt (unchanged and intact), build (new, changed
or drifted: why), remove (no longer in /etc), or refuse (why). Unit tests drive it with fake
facts; the applier gathers the real ones and carries the decisions out.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loaderd import policy as policy_rules
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import Policy, Spec
from loaderd.store.manifest import Manifest, SpecRecord


class Action(enum.StrEnum):
    ADOPT = "adopt"
    BUILD = "build"
    REMOVE = "remove"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Facts:
    """What the kernel and bpffs say, gathered by the caller before planning."""

    # per spec whose sha256 matches its record: how its pins differ ([] = intact)
    differences: Mapping[str, Sequence[str]]
    # spec directories present under the pin root
    present: frozenset[str]


@dataclass(frozen=True)
class Decision:
    spec: str
    action: Action
    reason: str
    error: LoaderdError | None = None  # REFUSE only


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]

    def _names(self, action: Action) -> list[str]:
        return [d.spec for d in self.decisions if d.action is action]

    @property
    def adopt(self) -> list[str]:
        return self._names(Action.ADOPT)

    @property
    def build(self) -> list[str]:
        return self._names(Action.BUILD)

    @property
    def remove(self) -> list[str]:
        return sorted(self._names(Action.REMOVE))

    @property
    def errors(self) -> list[LoaderdError]:
        return [d.error for d in self.decisions if d.error is not None]


def with_signatures(current: Manifest, specs: Sequence[Spec]) -> Manifest:
    """Records of unchanged specs carry today's signature check (a re-signed spec, a rotated
    key: status shows who signed what is applied now, without a rebuild)."""
    facts = {s.name: s.signature for s in specs}
    return dataclasses.replace(current, specs={
        n: dataclasses.replace(r, signature=facts[n]) if n in facts else r
        for n, r in current.specs.items()})


def candidates(specs: Sequence[Spec], current: Manifest) -> list[SpecRecord]:
    """The records whose pins the caller must check (unchanged specs: adopt if intact)."""
    return [current.specs[s.name] for s in specs
            if s.name in current.specs and current.specs[s.name].sha256 == s.sha256]


def unrecorded_calls(record: SpecRecord) -> list[str]:
    """A record from before call counts were recorded: rebuild, so that the policy is checked
    on bytecode facts again rather than trusted."""
    return [f"program {n}: no call facts recorded" for n, p in record.programs.items()
            if p.calls is None]


def recheck_calls(spec: Spec, record: SpecRecord, policy: Policy) -> None:
    """Adopted programs against today's policy, from the call facts decoded at load time
    (bound to the running program by the tag the drift check verified)."""
    for p in record.programs.values():
        assert p.calls is not None  # unrecorded_calls() sent those to BUILD
        try:
            policy_rules.check_calls(spec, p.function, p.type, set(p.helpers),
                                     p.calls.bpf_to_bpf, p.calls.kfunc, p.calls.callx, policy)
        except LoaderdError as exc:
            raise dataclasses.replace(exc, message=(
                f"{exc.message} (running as prog id {p.id}, loaded under an earlier "
                "policy; the applied set is left as it is)")) from None


def plan(specs: Sequence[Spec], current: Manifest, facts: Facts, policy: Policy,
         pin_dir: Mapping[str, str] | None = None) -> Plan:
    """One decision per spec, then one REMOVE per recorded spec no longer in /etc.
    pin_dir: spec name -> its pin directory (for the refusal's text)."""
    decisions: list[Decision] = []
    for s in specs:
        record = current.specs.get(s.name)
        if record is None:
            if s.name in facts.present:
                where = (pin_dir or {}).get(s.name, s.name)
                decisions.append(Decision(s.name, Action.REFUSE, "foreign pins", LoaderdError(
                    Kind.PIN, f"{where} exists but loaderd's manifest does not know it; "
                    "refusing to replace pins it did not create (remove them, or `loaderd "
                    "disable`)", Location(s.path, field="name"))))
            else:
                decisions.append(Decision(s.name, Action.BUILD, "new"))
            continue
        if record.sha256 != s.sha256:
            decisions.append(Decision(s.name, Action.BUILD, "changed"))
            continue
        diffs = list(facts.differences.get(s.name, ())) or unrecorded_calls(record)
        if diffs:
            decisions.append(Decision(s.name, Action.BUILD, "drift: " + "; ".join(diffs)))
            continue
        try:
            recheck_calls(s, record, policy)
        except LoaderdError as exc:
            decisions.append(Decision(s.name, Action.REFUSE, "policy", exc.with_file(s.path)))
            continue
        decisions.append(Decision(s.name, Action.ADOPT, "unchanged and intact"))
    names = {s.name for s in specs}
    decisions += [Decision(n, Action.REMOVE, "no longer in the programs directory")
                  for n in sorted(set(current.specs) - names)]
    return Plan(tuple(decisions))
