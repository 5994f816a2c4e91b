"""The type tables (model.MAP_KINDS, model.PROG_KINDS): their facts written out once more here,
by hand, and the shipped JSON schemas' enums checked against the tables, so a type added to
one and not the other fails here."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest

from loaderd import model, privileges
from loaderd.bpf import kernel
from loaderd.model import (
    COMMON_HELPERS,
    DANGEROUS_HELPERS,
    GATED_HELPERS,
    MAP_KINDS,
    MAP_TYPE_BY_ID,
    NAME_PATTERN,
    PROG_KINDS,
    PROG_TYPE_BY_ID,
    XDP_MODES,
    MapFlag,
    MapType,
    NoAttach,
    ProgType,
    RawTracepointAttach,
    TcAttach,
    TracepointAttach,
    XdpAttach,
)


def _schema(name: str) -> Any:
    text = resources.files("loaderd.config").joinpath("schemas", name).read_text("utf-8")
    return json.loads(text)


# --- map types ------------------------------------------------------------------------------

# map type: (kernel id, bcc table, percpu, array, no_prealloc, freezable, fixed)
MAP_FACTS = {
    MapType.HASH: (1, "hash", False, False, True, True, False),
    MapType.ARRAY: (2, "array", False, True, False, True, False),
    MapType.PERCPU_HASH: (5, "percpu_hash", True, False, True, True, False),
    MapType.PERCPU_ARRAY: (6, "percpu_array", True, True, False, True, False),
    MapType.LRU_HASH: (9, "lru_hash", False, False, False, True, False),
    MapType.LRU_PERCPU_HASH: (10, "lru_percpu_hash", True, False, False, True, False),
    MapType.RINGBUF: (27, None, False, False, False, False, True),
    MapType.PERF_EVENT_ARRAY: (4, None, False, False, False, False, True),
    MapType.SOCKMAP: (15, "sockmap", False, False, False, False, True),
}


@pytest.mark.parametrize("mtype", list(MapType))
def test_map_kind_facts(mtype: MapType) -> None:
    k = mtype.kind
    assert (k.kernel_id, k.bcc, k.percpu, k.array, k.no_prealloc, k.freezable, k.fixed) == \
        MAP_FACTS[mtype]
    assert kernel.MAP_TYPES[mtype.value] == k.kernel_id  # the uapi name table agrees
    assert MAP_TYPE_BY_ID[k.kernel_id] is mtype


def test_every_map_type_has_one_row() -> None:
    assert set(MAP_KINDS) == set(MapType) == set(MAP_FACTS)
    assert len(MAP_TYPE_BY_ID) == len(MapType)


def test_per_cpu_value_size_and_memory() -> None:
    assert [model.percpu_slot(n) for n in (1, 4, 8, 9, 16)] == [8, 8, 8, 16, 16]
    assert MapType.PERCPU_ARRAY.kind.value_size(4, 3) == 24
    assert MapType.LRU_PERCPU_HASH.kind.value_size(12, 2) == 32
    assert MapType.ARRAY.kind.value_size(4, 3) == 4
    assert MapType.HASH.kind.memory(4, 8, 10, 64) == 120
    assert MapType.PERCPU_HASH.kind.memory(4, 4, 10, 2) == (4 + 16) * 10
    assert MapType.RINGBUF.kind.memory(0, 0, 4096, 8) == 4096
    assert MapType.PERF_EVENT_ARRAY.kind.memory(0, 0, 4, 8) == 32


@pytest.mark.parametrize("text, n", [("0", 1), ("0-3", 4), ("0-3,8,10-11\n", 7), ("5", 1)])
def test_cpu_list_count(text: str, n: int) -> None:
    assert model.cpu_list_count(text) == n


def test_possible_cpus_is_the_kernel_s() -> None:
    with open("/sys/devices/system/cpu/possible") as f:
        assert model.possible_cpus() == model.cpu_list_count(f.read()) >= 1
    assert kernel.possible_cpus is model.possible_cpus  # one implementation


# --- program types --------------------------------------------------------------------------

# program type: (kernel id, attach record, caps on >= 5.8, exclusive)
PROG_FACTS = {
    ProgType.TRACEPOINT: (5, TracepointAttach, {"CAP_BPF", "CAP_PERFMON"}, False),
    ProgType.RAW_TRACEPOINT: (17, RawTracepointAttach, {"CAP_BPF", "CAP_PERFMON"}, False),
    ProgType.XDP: (6, XdpAttach, {"CAP_BPF", "CAP_NET_ADMIN"}, True),
    ProgType.SOCKET_FILTER: (1, NoAttach, {"CAP_BPF"}, False),
    ProgType.TC: (3, TcAttach, {"CAP_BPF", "CAP_NET_ADMIN"}, True),
    ProgType.CGROUP_SKB: (8, model.CgroupSkbAttach, {"CAP_BPF", "CAP_NET_ADMIN"}, True),
    ProgType.CGROUP_SOCK: (9, model.CgroupSockAttach, {"CAP_BPF", "CAP_NET_ADMIN"}, True),
    ProgType.CGROUP_SOCK_ADDR: (18, model.CgroupSockAddrAttach, {"CAP_BPF", "CAP_NET_ADMIN"},
                                True),
    ProgType.CGROUP_SYSCTL: (23, model.CgroupSysctlAttach, {"CAP_BPF", "CAP_NET_ADMIN"}, True),
    ProgType.CGROUP_DEVICE: (15, model.CgroupDeviceAttach, {"CAP_BPF", "CAP_NET_ADMIN"}, True),
    ProgType.UPROBE: (2, model.UprobeAttach, {"CAP_BPF", "CAP_PERFMON"}, False),
    ProgType.KPROBE: (2, model.KprobeAttach, {"CAP_BPF", "CAP_PERFMON"}, False),
    ProgType.SK_LOOKUP: (30, model.SkLookupAttach, {"CAP_BPF", "CAP_NET_ADMIN"}, True),
    ProgType.PERF_EVENT: (7, model.PerfEventAttach, {"CAP_BPF", "CAP_PERFMON"}, False),
    ProgType.FENTRY: (26, model.FentryAttach, {"CAP_BPF", "CAP_PERFMON"}, False),
    ProgType.FEXIT: (26, model.FexitAttach, {"CAP_BPF", "CAP_PERFMON"}, False),
    ProgType.LSM: (29, model.LsmAttach, {"CAP_BPF", "CAP_PERFMON"}, False),
}
# Spec type names that are not the kernel's (bpftool's) name of the program type.
KERNEL_NAME = {ProgType.TC: "sched_cls", ProgType.UPROBE: "kprobe", ProgType.FENTRY: "tracing",
               ProgType.FEXIT: "tracing"}


@pytest.mark.parametrize("ptype", list(ProgType))
def test_prog_kind_facts(ptype: ProgType) -> None:
    k = ptype.kind
    assert (k.kernel_id, k.attach, set(k.caps), k.exclusive) == PROG_FACTS[ptype]
    assert kernel.PROG_TYPES[KERNEL_NAME.get(ptype, ptype.value)] == k.kernel_id
    # kernel id -> the first type of that id (uprobe and kprobe share BPF_PROG_TYPE_KPROBE)
    assert PROG_TYPE_BY_ID[k.kernel_id] is next(t for t in ProgType
                                                if t.kind.kernel_id == k.kernel_id)
    assert privileges.required_caps(ptype, (6, 1)) == k.caps
    assert "CAP_SYS_ADMIN" in privileges.required_caps(ptype, (5, 4))


def test_every_prog_type_has_one_row() -> None:
    assert set(PROG_KINDS) == set(ProgType) == set(PROG_FACTS)
    linked = [k.attach for k in PROG_KINDS.values() if k.attach is not NoAttach]
    assert len(linked) == len(set(linked))  # an attach record names its type in the manifest


def test_default_helpers_per_type() -> None:
    for ptype in ProgType:
        helpers = ptype.kind.helpers
        assert helpers >= COMMON_HELPERS
        assert not helpers & DANGEROUS_HELPERS, ptype
        assert not helpers & set(GATED_HELPERS), ptype  # kernel memory, tail_call: opt-in
    assert {"probe_read_kernel", "probe_read_kernel_str", "tail_call"} <= set(GATED_HELPERS)
    only = {"redirect": {ProgType.XDP, ProgType.TC}, "xdp_adjust_head": {ProgType.XDP},
            "xdp_adjust_tail": {ProgType.XDP}, "skb_store_bytes": {ProgType.TC},
            "skb_load_bytes": {ProgType.SOCKET_FILTER, ProgType.TC, ProgType.CGROUP_SKB},
            "sysctl_get_new_value": {ProgType.CGROUP_SYSCTL},
            "bind": {ProgType.CGROUP_SOCK_ADDR}}
    for helper, owners in only.items():
        assert {t for t in ProgType if helper in t.kind.helpers} == owners, helper
    # The current task means something where a task acts: tracing, and cgroup hooks that run
    # in the acting process's context (not cgroup_skb: a packet may be another's).
    tasked = {ProgType.TRACEPOINT, ProgType.RAW_TRACEPOINT, ProgType.CGROUP_SOCK,
              ProgType.CGROUP_SOCK_ADDR, ProgType.CGROUP_SYSCTL, ProgType.CGROUP_DEVICE,
              ProgType.UPROBE, ProgType.KPROBE, ProgType.FENTRY, ProgType.FEXIT, ProgType.LSM,
              ProgType.PERF_EVENT}
    assert {t for t in ProgType if "get_current_pid_tgid" in t.kind.helpers} == tasked


@pytest.mark.parametrize("target, record", [
    ("tracepoint:sched:sched_switch", TracepointAttach("sched", "sched_switch")),
    ("raw_tracepoint:sched_switch", RawTracepointAttach("sched_switch")),
    ("xdp:eth0:skb", XdpAttach("eth0", "skb")),
    ("xdp:ve.th:1@x:native", XdpAttach("ve.th:1@x", "native")),
    ("tc:eth0:ingress:last", TcAttach("eth0", "ingress", "last")),
    ("tc:ve:1:egress:first", TcAttach("ve:1", "egress", "first")),
    ("tc:eth0:ingress:before=web/count", TcAttach("eth0", "ingress", "before", "web/count")),
    ("cgroup_skb:egress:path=system.slice/web.service",
     model.CgroupSkbAttach("egress", path="system.slice/web.service")),
    ("cgroup_sock_addr:connect6:unit=web@1.service",
     model.CgroupSockAddrAttach("connect6", unit="web@1.service")),
    ("cgroup_device:device:path=/a:b", model.CgroupDeviceAttach("device", path="/a:b")),
    ("cgroup_skb:ingress:path=a:first", model.CgroupSkbAttach("ingress", path="a:first")),
    ("cgroup_skb:ingress:path=a,first", model.CgroupSkbAttach("ingress", "a", None, "first")),
    ("cgroup_sock_addr:connect4:unit=w.service,after=web/deny",
     model.CgroupSockAddrAttach("connect4", None, "w.service", "after", "web/deny")),
    ("uprobe:/usr/bin/app:sym=handle:entry:pid=all", model.UprobeAttach("/usr/bin/app", "handle")),
    ("uprobe:/lib/libc.so.6:off=0x1f00:return:pid=42",
     model.UprobeAttach("/lib/libc.so.6", None, 0x1F00, True, 42)),
    ("kprobe:do_sys_openat2:return", model.KprobeAttach("do_sys_openat2", True)),
    ("fentry:do_unlinkat", model.FentryAttach("do_unlinkat")),
    ("fexit:vfs_read.isra.0", model.FexitAttach("vfs_read.isra.0")),
    ("lsm:file_open", model.LsmAttach("file_open")),
    ("sk_lookup:netns=-", model.SkLookupAttach()),
    ("sk_lookup:netns=blue", model.SkLookupAttach("blue")),
    ("perf_event:cpu-clock:freq=99", model.PerfEventAttach("cpu-clock", frequency=99)),
    ("perf_event:page-faults:period=1000", model.PerfEventAttach("page-faults", period=1000)),
])
def test_attach_target_text_round_trips(target: str, record: model.Attach) -> None:
    assert model.parse_target(target) == record
    assert model.target_text(record) == target


@pytest.mark.parametrize("bad", ["", "xdp", "xdp:eth0:turbo", "tracepoint:sched", "kprobe:x",
                                 "socket_filter:", "raw_tracepoint:a/b", "tracepoint:a:b:c",
                                 "tc:eth0:ingress", "tc:eth0:up:first", "tc:eth0:ingress:before",
                                 "tc:eth0:ingress:first=a/b", "tc:eth0:ingress:after=a",
                                 "cgroup_skb:connect4:path=a", "cgroup_skb:ingress:path=../a",
                                 "cgroup_skb:ingress:path=a/./b", "cgroup_sysctl:sysctl:unit=x",
                                 "cgroup_device:device", "cgroup_sock:create:cwd=a",
                                 "cgroup_skb:ingress:path=a,last", "cgroup_skb:ingress:path=a,",
                                 "cgroup_skb:ingress:path=a,before", "cgroup_skb:egress:path=a,x",
                                 "cgroup_skb:ingress:path=a,first=b/c",
                                 "uprobe:bin:sym=a:entry:pid=all", "uprobe:/b:sym=a:entry",
                                 "uprobe:/b:off=12:entry:pid=all", "uprobe:/b:sym=a:exit:pid=1",
                                 "uprobe:/b:sym=a:entry:pid=x", "kprobe:f", "kprobe:f:exit",
                                 "fentry:a:b", "lsm:", "fexit:1x", "sk_lookup:", "sk_lookup:ns=a",
                                 "sk_lookup:netns=..", "sk_lookup:netns=a/b",
                                 "perf_event:cycles:freq=1", "perf_event:cpu-clock:freq=0",
                                 "perf_event:cpu-clock:rate=5", "perf_event:cpu-clock"])
def test_attach_target_parse_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        model.parse_target(bad)


def test_no_attach_has_no_target_text() -> None:
    with pytest.raises(ValueError):
        model.target_text(NoAttach())


# --- the schemas agree with the tables ------------------------------------------------------

def test_spec_schema_enums_are_the_tables() -> None:
    defs = _schema("spec.schema.json")["$defs"]
    assert defs["map"]["properties"]["type"]["enum"] == [t.value for t in MapType]
    assert defs["map"]["if"]["properties"]["type"]["enum"] == [
        t.value for t in MapType if t.kind.fixed]
    assert defs["program"]["properties"]["type"]["enum"] == [t.value for t in ProgType]
    assert defs["map"]["properties"]["flags"]["items"]["enum"] == [f.value for f in MapFlag]
    assert defs["attach_xdp"]["properties"]["xdp"]["properties"]["mode"]["enum"] == \
        list(XDP_MODES)
    assert defs["name"]["pattern"] == f"^{NAME_PATTERN}$"
    # every program type says what its `attach:` looks like
    shaped = [rule["if"]["properties"]["type"]["const"] for rule in defs["program"]["allOf"]]
    assert shaped == [t.value for t in ProgType]


def test_settings_schema_enums_are_the_tables() -> None:
    schema = _schema("settings.schema.json")
    policy = schema["properties"]["policy"]["properties"]
    assert schema["$defs"]["prog_type"]["enum"] == [t.value for t in ProgType]
    assert list(policy["helpers"]["properties"]["by_type"]["properties"]) == [
        t.value for t in ProgType]
    assert policy["map_types"]["items"]["enum"] == [t.value for t in MapType]
    assert policy["map_flags"]["items"]["enum"] == [f.value for f in MapFlag]


def test_per_cpu_link_keys_name_their_program() -> None:
    assert model.link_program("on_sample__cpu0") == "on_sample"
    assert model.link_program("on_sample__cpu17") == "on_sample"
    assert model.link_program("on_sample") == "on_sample"
    assert model.link_program("a__cpux") == "a__cpux"
