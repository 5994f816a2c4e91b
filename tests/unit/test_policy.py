"""Policy: allow-lists, per-spec and whole-set limits, and decoded call checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from loaderd import policy
from loaderd.errors import Kind, LoaderdError
from loaderd.model import (
    DANGEROUS_HELPERS,
    CType,
    Limits,
    MapFlag,
    MapSpec,
    MapType,
    NoAttach,
    Policy,
    ProgramSpec,
    ProgType,
    Spec,
)

U32, U64 = CType("u32", 4), CType("u64", 8)


def make_map(name: str = "m", mtype: MapType = MapType.ARRAY, entries: int = 4,
             flags: frozenset[MapFlag] = frozenset(), key: CType = U32,
             value: CType = U64) -> MapSpec:
    return MapSpec(name, mtype, key, value, entries, flags=flags, line=7)


def make_spec(name: str = "s", maps: int = 0, programs: int = 1,
              ptype: ProgType = ProgType.SOCKET_FILTER, **map_kw: object) -> Spec:
    return Spec(
        name=name, path=f"/etc/loaderd/programs.d/{name}.yaml", source="", source_path=None,
        maps=tuple(make_map(f"m{i}", **map_kw) for i in range(maps)),  # type: ignore[arg-type]
        programs=tuple(ProgramSpec(f"p{i}", ptype, NoAttach(), fallback=(f"p{i}_v2",),
                                   line=20 + 4 * i) for i in range(programs)),
        sha256="0" * 64,
        marks={("programs", 0): (20, 5), ("programs", 0, "type"): (21, 5),
               ("maps", 0): (7, 5), ("maps", 0, "type"): (8, 5), ("maps", 0, "flags"): (9, 5),
               ("maps", 0, "max_entries"): (10, 5)})


def refusal(fn: Callable[..., None], *args: object) -> LoaderdError:
    with pytest.raises(LoaderdError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return info.value


def test_default_policy_accepts_a_plain_spec() -> None:
    s = make_spec(maps=2)
    policy.check_spec(s, Policy())
    policy.check_set([s], Policy())
    assert policy.check_all([s], Policy()) == []


def test_program_type_not_allowed() -> None:
    pol = Policy(program_types=frozenset({ProgType.XDP, ProgType.TRACEPOINT}))
    err = refusal(policy.check_spec, make_spec(), pol)
    assert (err.kind, err.location.field, err.location.line) == (Kind.POLICY,
                                                                 "programs[0].type", 21)
    assert err.value == "socket_filter" and err.allowed == "tracepoint, xdp"


def test_map_type_flag_and_entries() -> None:
    err = refusal(policy.check_spec, make_spec(maps=1), Policy(map_types=frozenset()))
    assert (err.location.field, err.location.line, err.allowed) == ("maps[0].type", 8, "none")
    flagged = make_spec(maps=1, flags=frozenset({MapFlag.WRONLY, MapFlag.NO_PREALLOC}))
    err = refusal(policy.check_spec, flagged, Policy(map_flags=frozenset({MapFlag.RDONLY})))
    assert err.location.field == "maps[0].flags" and "NO_PREALLOC, WRONLY" in err.message
    big = make_spec(maps=1, entries=70000)
    err = refusal(policy.check_spec, big, Policy())
    assert (err.kind, err.location.field, err.location.line) == (Kind.LIMIT,
                                                                 "maps[0].max_entries", 10)
    assert "max_entries 70000 over the limit 65536" in err.message


def test_set_limits_name_the_spec_that_crosses() -> None:
    specs = [make_spec("a", maps=30), make_spec("b", maps=30), make_spec("c", maps=10)]
    err = refusal(policy.check_set, specs, Policy())
    assert err.kind is Kind.LIMIT
    assert str(err) == ("/etc/loaderd/programs.d/c.yaml: maps: 70 declared across 3 specs, "
                        "limit 64")
    progs = [make_spec("a", programs=2), make_spec("b", programs=2)]
    err = refusal(policy.check_set, progs, Policy(limits=Limits(max_programs=3)))
    assert "4 declared across 2 specs, limit 3" in err.message
    assert err.location.file is not None and err.location.file.endswith("b.yaml")


def test_set_memory_limit() -> None:
    s = make_spec(maps=2, entries=1000)  # 2 * 1000 * (4 + 8)
    policy.check_set([s], Policy(limits=Limits(max_map_memory=24000)))
    err = refusal(policy.check_set, [s], Policy(limits=Limits(max_map_memory=23999)))
    assert err.location.field == "maps.memory" and "24000 bytes declared" in err.message


def test_map_memory() -> None:
    assert policy.map_memory(make_map(entries=10)) == 120
    cpus = policy.possible_cpus()
    assert cpus >= 1
    per_cpu = make_map(mtype=MapType.PERCPU_ARRAY, entries=10, value=CType("u32", 4))
    assert policy.map_memory(per_cpu) == (4 + 8 * cpus) * 10
    ring = make_map(mtype=MapType.RINGBUF, entries=4096, key=CType(None, 0),
                    value=CType(None, 0))
    assert policy.map_memory(ring) == 4096


def test_check_all_collects() -> None:
    specs = [make_spec("a", maps=1, entries=10**6), make_spec("b", maps=1, entries=10**6)]
    errors = policy.check_all(specs, Policy(limits=Limits(max_map_memory=1)))
    assert [e.kind for e in errors] == [Kind.LIMIT, Kind.LIMIT, Kind.LIMIT]


# --- decoded calls ---------------------------------------------------------------------------

def calls(helpers: set[str], pol: Policy, bpf: int = 0, kf: int = 0, callx: int = 0,
          function: str = "p0", ptype: ProgType = ProgType.SOCKET_FILTER) -> None:
    policy.check_calls(make_spec(), function, ptype, helpers, bpf, kf, callx, pol)


def test_allowed_helpers_pass() -> None:
    calls({"map_lookup_elem", "ktime_get_ns"}, Policy())
    calls(set(), Policy())


def test_refused_helpers_are_all_named_sorted() -> None:
    with pytest.raises(LoaderdError) as info:
        calls({"zzz_helper", "probe_read_user", "map_lookup_elem"}, Policy())
    err = info.value
    assert err.kind is Kind.HELPER
    assert "program 'p0' (socket_filter) calls helpers not allowed: probe_read_user, " \
           "zzz_helper" in err.message
    assert (err.location.file, err.location.field, err.location.line) == (
        "/etc/loaderd/programs.d/s.yaml", "programs[0]", 20)
    assert err.allowed == ", ".join(sorted(ProgType.SOCKET_FILTER.kind.helpers))


@pytest.mark.parametrize("helper", sorted(DANGEROUS_HELPERS))
def test_dangerous_helpers_need_the_operator(helper: str) -> None:
    with pytest.raises(LoaderdError) as info:
        calls({helper}, Policy())
    assert "dangerous, must be allowed explicitly by the operator in loaderd.yaml" in \
        info.value.message
    calls({helper}, Policy(helpers=ProgType.SOCKET_FILTER.kind.helpers | {helper}))


def test_dangerous_helper_in_by_type_only_is_still_refused() -> None:
    pol = Policy(helpers_by_type={ProgType.SOCKET_FILTER: frozenset({"send_signal"})})
    with pytest.raises(LoaderdError) as info:
        calls({"send_signal"}, pol)
    assert "dangerous" in info.value.message


def test_by_type_helpers_apply_to_that_type_only() -> None:
    pol = Policy(helpers_by_type={ProgType.XDP: frozenset({"xdp_adjust_meta"})})
    calls({"xdp_adjust_meta"}, pol, ptype=ProgType.XDP)
    with pytest.raises(LoaderdError):
        calls({"xdp_adjust_meta"}, pol, ptype=ProgType.TRACEPOINT)


def test_kfuncs_and_bpf_calls_follow_the_policy() -> None:
    with pytest.raises(LoaderdError, match="kfunc"):
        calls(set(), Policy(), kf=1)
    calls(set(), Policy(allow_kfuncs=True), kf=3)
    calls(set(), Policy(), bpf=2)
    with pytest.raises(LoaderdError, match="bpf-to-bpf"):
        calls(set(), Policy(allow_calls=False), bpf=2)


def test_callx_is_never_allowed() -> None:
    lenient = dataclasses.replace(Policy(), allow_calls=True, allow_kfuncs=True)
    with pytest.raises(LoaderdError, match="callx"):
        calls(set(), lenient, callx=1)


def test_fallback_functions_locate_their_program() -> None:
    with pytest.raises(LoaderdError) as info:
        calls({"sys_bpf"}, Policy(), function="p0_v2")
    assert info.value.location.field == "programs[0]"
    assert "program 'p0_v2'" in info.value.message
    with pytest.raises(LoaderdError) as info:
        calls({"sys_bpf"}, Policy(), function="elsewhere")
    assert info.value.location.field == "programs"


# --- helper defaults per program type -----------------------------------------------------

def refused_helpers(helpers: set[str], pol: Policy, ptype: ProgType) -> LoaderdError:
    with pytest.raises(LoaderdError) as info:
        calls(helpers, pol, ptype=ptype)
    return info.value


@pytest.mark.parametrize("helper", ["probe_read_kernel", "probe_read_kernel_str", "tail_call"])
@pytest.mark.parametrize("ptype", list(ProgType))
def test_kernel_memory_reads_and_tail_calls_are_off_by_default(helper: str,
                                                               ptype: ProgType) -> None:
    err = refused_helpers({helper, "map_lookup_elem"}, Policy(), ptype)
    assert err.kind is Kind.HELPER
    assert err.location.file == "/etc/loaderd/programs.d/s.yaml"
    assert f"program 'p0' ({ptype}) calls helpers not allowed: {helper};" in err.message
    assert "off by default" in err.message
    assert f"policy.helpers.by_type.{ptype}" in err.message
    assert helper not in (err.allowed or "")


def test_a_gated_helper_is_allowed_for_the_type_the_settings_name_only() -> None:
    pol = Policy(helpers_by_type={ProgType.TRACEPOINT: frozenset({"probe_read_kernel"})})
    calls({"probe_read_kernel", "get_current_pid_tgid"}, pol, ptype=ProgType.TRACEPOINT)
    err = refused_helpers({"probe_read_kernel"}, pol, ProgType.RAW_TRACEPOINT)
    assert "reads arbitrary kernel memory" in err.message
    assert "policy.helpers.by_type.raw_tracepoint" in err.message
    # tail_call stays off for the tracepoint even so
    refused_helpers({"tail_call"}, pol, ProgType.TRACEPOINT)


@pytest.mark.parametrize("helper, owner", [
    ("redirect", ProgType.XDP), ("xdp_adjust_head", ProgType.XDP),
    ("xdp_adjust_tail", ProgType.XDP), ("skb_load_bytes", ProgType.SOCKET_FILTER),
    ("get_socket_cookie", ProgType.SOCKET_FILTER),
    ("get_current_comm", ProgType.TRACEPOINT), ("get_current_comm", ProgType.RAW_TRACEPOINT),
])
def test_type_specific_helpers_are_defaults_of_their_type_only(helper: str,
                                                               owner: ProgType) -> None:
    calls({helper}, Policy(), ptype=owner)
    for other in set(ProgType) - {t for t in ProgType if helper in t.kind.helpers}:
        err = refused_helpers({helper}, Policy(), other)
        assert (f"to allow {helper} for {other} programs, list it in loaderd.yaml under "
                f"policy.helpers.by_type.{other}") in err.message


def test_helpers_allow_replaces_every_type_s_defaults() -> None:
    pol = Policy(helpers=frozenset({"map_lookup_elem"}))
    calls({"map_lookup_elem"}, pol, ptype=ProgType.XDP)
    refused_helpers({"redirect"}, pol, ProgType.XDP)
    pol = Policy(helpers=frozenset({"map_lookup_elem", "tail_call"}))  # the operator, for all
    for ptype in ProgType:
        calls({"tail_call"}, pol, ptype=ptype)


def test_refusal_names_every_kind_of_helper_with_its_setting() -> None:
    err = refused_helpers({"send_signal", "probe_read_kernel", "tail_call", "redirect"},
                          Policy(), ProgType.TRACEPOINT)
    assert "not allowed: probe_read_kernel, redirect, send_signal, tail_call;" in err.message
    assert "send_signal: dangerous" in err.message and "(policy.helpers.allow)" in err.message
    assert "probe_read_kernel: reads arbitrary kernel memory, off by default" in err.message
    assert "tail_call: jumps into another program" in err.message
    assert "to allow redirect for tracepoint programs" in err.message
