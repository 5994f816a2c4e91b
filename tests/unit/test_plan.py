"""plan() decides adopt / build / remove / refuse from specs, manifest and facts: no root."""

from __future__ import annotations

from loaderd.apply.plan import Action, Facts, plan
from loaderd.errors import Kind
from loaderd.model import NoAttach, Policy, ProgramSpec, ProgType, Spec
from loaderd.store.manifest import Calls, Manifest, ProgramRecord, SpecRecord

ROOT = "/sys/fs/bpf/loaderd"
NO_CALLS = Calls()
DEFAULT_POLICY = Policy()


def _spec(name: str, sha: str = "a" * 64) -> Spec:
    return Spec(name=name, path=f"/etc/loaderd/programs.d/{name}.yaml", source="",
                source_path=None, maps=(), sha256=sha,
                programs=(ProgramSpec("f", ProgType.SOCKET_FILTER, NoAttach()),))


def _record(name: str, sha: str = "a" * 64, helpers: tuple[str, ...] = ("map_lookup_elem",),
            calls: Calls | None = NO_CALLS) -> SpecRecord:
    prog = ProgramRecord("f", "f", ProgType.SOCKET_FILTER, 5, "0" * 16, helpers, calls)
    return SpecRecord(name, f"/etc/loaderd/programs.d/{name}.yaml", sha, f"{ROOT}/{name}",
                      {"f": prog}, {})


def _decide(specs: list[Spec], records: list[SpecRecord], *, diffs: dict[str, list[str]]
            | None = None, present: set[str] | None = None, policy: Policy = DEFAULT_POLICY
            ) -> dict[str, tuple[Action, str]]:
    current = Manifest(specs={r.name: r for r in records})
    facts = Facts(diffs or {}, frozenset(present if present is not None
                                         else {r.name for r in records}))
    return {d.spec: (d.action, d.reason) for d in plan(specs, current, facts, policy).decisions}


def test_unchanged_and_intact_is_adopted() -> None:
    assert _decide([_spec("a")], [_record("a")]) == {"a": (Action.ADOPT, "unchanged and intact")}


def test_new_changed_and_drifted_are_built_with_why() -> None:
    got = _decide([_spec("new"), _spec("chg", "b" * 64), _spec("drf")],
                  [_record("chg"), _record("drf")],
                  diffs={"drf": ["program pin missing: x"]})
    assert got == {"new": (Action.BUILD, "new"), "chg": (Action.BUILD, "changed"),
                   "drf": (Action.BUILD, "drift: program pin missing: x")}


def test_a_record_without_call_facts_is_rebuilt_not_trusted() -> None:
    got = _decide([_spec("a")], [_record("a", calls=None)])
    assert got["a"][0] is Action.BUILD and "no call facts" in got["a"][1]


def test_removed_from_etc_is_removed() -> None:
    assert _decide([], [_record("gone")]) == {
        "gone": (Action.REMOVE, "no longer in the programs directory")}


def test_foreign_pins_in_a_spec_dir_are_refused() -> None:
    current = Manifest()
    decided = plan([_spec("a")], current, Facts({}, frozenset({"a"})), Policy(),
                   {"a": f"{ROOT}/a"})
    assert decided.adopt == [] and decided.build == []
    (err,) = decided.errors
    assert err.kind is Kind.PIN and f"{ROOT}/a exists" in err.message


def test_a_tightened_policy_refuses_an_adopt() -> None:
    strict = Policy(helpers=frozenset({"ktime_get_ns"}))
    current = Manifest(specs={"a": _record("a")})
    decided = plan([_spec("a")], current, Facts({}, frozenset({"a"})), strict)
    (err,) = decided.errors
    assert "map_lookup_elem" in err.message and "prog id 5" in err.message
    assert err.location.file == "/etc/loaderd/programs.d/a.yaml"
