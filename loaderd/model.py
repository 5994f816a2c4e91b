"""Typed, immutable objects the rest of loaderd works on, and the facts of each type.

`spec` builds them from YAML (after schema and semantic checks); nothing else parses text.
Field names match the YAML keys documented in docs/spec-format.md.

Facts about a program or map type live on the type, in one table each (`PROG_KINDS`,
`MAP_KINDS`; read as `ProgType.XDP.kind`, `MapType.ARRAY.kind`): kernel ids, attach record,
capabilities, default helpers, per-CPU layout, freezability. The JSON schemas' enums are
checked against these tables by the unit tests (tests/unit/test_model.py).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from loaderd.errors import Kind, LoaderdError, Location
from loaderd.sanitize import Rules

# Spec, map and program names: pin names under bpffs and C identifiers (the schema's `name`).
NAME_PATTERN = "[a-z][a-z0-9_]{0,47}"
NAME_RE = re.compile(NAME_PATTERN)


class ProgType(enum.StrEnum):
    TRACEPOINT = "tracepoint"
    RAW_TRACEPOINT = "raw_tracepoint"
    XDP = "xdp"
    SOCKET_FILTER = "socket_filter"
    TC = "tc"  # the kernel's sched_cls, attached through tcx links
    CGROUP_SKB = "cgroup_skb"
    CGROUP_SOCK = "cgroup_sock"
    CGROUP_SOCK_ADDR = "cgroup_sock_addr"
    CGROUP_SYSCTL = "cgroup_sysctl"
    CGROUP_DEVICE = "cgroup_device"
    UPROBE = "uprobe"  # the kernel's kprobe type, on the uprobe PMU (retprobe: uretprobe)
    KPROBE = "kprobe"  # on the kprobe PMU (retprobe: kretprobe)
    SK_LOOKUP = "sk_lookup"
    PERF_EVENT = "perf_event"  # sampled software events, one perf event and link per CPU
    FENTRY = "fentry"  # the kernel's tracing type (BPF trampoline), BCC KFUNC_PROBE
    FEXIT = "fexit"  # tracing, BCC KRETFUNC_PROBE
    LSM = "lsm"  # BCC LSM_PROBE

    @property
    def kind(self) -> ProgKind:
        return PROG_KINDS[self]


class MapType(enum.StrEnum):
    HASH = "hash"
    ARRAY = "array"
    PERCPU_HASH = "percpu_hash"
    PERCPU_ARRAY = "percpu_array"
    LRU_HASH = "lru_hash"
    LRU_PERCPU_HASH = "lru_percpu_hash"
    RINGBUF = "ringbuf"
    PERF_EVENT_ARRAY = "perf_event_array"
    SOCKMAP = "sockmap"  # sockets by index (sk_lookup steering); userspace adds them by fd

    @property
    def kind(self) -> MapKind:
        return MAP_KINDS[self]


class MapFlag(enum.StrEnum):
    """Kernel BPF_F_* map flags, named without the prefix."""

    NO_PREALLOC = "NO_PREALLOC"  # 1 << 0
    RDONLY = "RDONLY"  # 1 << 3: syscall side may only read
    WRONLY = "WRONLY"  # 1 << 4: syscall side may only write
    RDONLY_PROG = "RDONLY_PROG"  # 1 << 7: programs may only read
    WRONLY_PROG = "WRONLY_PROG"  # 1 << 8: programs may only write


MAP_FLAG_BITS: dict[MapFlag, int] = {
    MapFlag.NO_PREALLOC: 1 << 0,
    MapFlag.RDONLY: 1 << 3,
    MapFlag.WRONLY: 1 << 4,
    MapFlag.RDONLY_PROG: 1 << 7,
    MapFlag.WRONLY_PROG: 1 << 8,
}

def cpu_list_count(text: str) -> int:
    """How many CPUs a kernel CPU list names ("0-3,8,10-11" -> 7)."""
    total = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


@functools.cache
def possible_cpus() -> int:
    """Possible CPUs (/sys/devices/system/cpu/possible): what the kernel sizes per-CPU map
    values by. Exact or an error (OSError, ValueError): never a guess."""
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as fh:
        return cpu_list_count(fh.read())


def percpu_slot(value_size: int) -> int:
    """One CPU's share of a per-CPU value on the syscall side: value_size rounded up to 8."""
    return (value_size + 7) // 8 * 8


@dataclass(frozen=True)
class MapKind:
    """What loaderd knows about one map type (a row of MAP_KINDS)."""

    kernel_id: int  # enum bpf_map_type
    bcc: str | None  # BCC's BPF_F_TABLE type; None: declared by its own macro (ringbuf, perf)
    percpu: bool = False  # the syscall side sees one 8-byte-aligned value slot per possible CPU
    array: bool = False  # indexed by u32 0..max_entries-1, every slot exists
    no_prealloc: bool = False  # accepts BPF_F_NO_PREALLOC (the kernel refuses it elsewhere)
    freezable: bool = False  # BPF_MAP_FREEZE leaves it usable (array and hash families)
    # The kernel fixes the layout (no key, value, flags or initial entries; it carries events
    # or socket references, not entries): bytes per max_entries unit, for the memory estimate.
    # None: a key/value map.
    fixed_entry_bytes: int | None = None

    @property
    def fixed(self) -> bool:
        return self.fixed_entry_bytes is not None

    def value_size(self, value_size: int, ncpus: int) -> int:
        """Bytes of one value as lookup/update see it from the syscall side."""
        return percpu_slot(value_size) * ncpus if self.percpu else value_size

    def memory(self, key_size: int, value_size: int, max_entries: int, ncpus: int) -> int:
        """Bytes a map may take: (key + value) * entries, values per CPU for per-CPU maps."""
        if self.fixed_entry_bytes is not None:
            return self.fixed_entry_bytes * max_entries
        return (key_size + self.value_size(value_size, ncpus)) * max_entries


MAP_KINDS: Mapping[MapType, MapKind] = {
    MapType.HASH: MapKind(1, "hash", no_prealloc=True, freezable=True),
    MapType.ARRAY: MapKind(2, "array", array=True, freezable=True),
    MapType.PERCPU_HASH: MapKind(5, "percpu_hash", percpu=True, no_prealloc=True,
                                 freezable=True),
    MapType.PERCPU_ARRAY: MapKind(6, "percpu_array", percpu=True, array=True, freezable=True),
    MapType.LRU_HASH: MapKind(9, "lru_hash", freezable=True),
    MapType.LRU_PERCPU_HASH: MapKind(10, "lru_percpu_hash", percpu=True, freezable=True),
    MapType.RINGBUF: MapKind(27, None, fixed_entry_bytes=1),  # max_entries: the ring's bytes
    MapType.PERF_EVENT_ARRAY: MapKind(4, None, fixed_entry_bytes=8),  # u32 cpu -> u32 perf fd
    # u32 index -> socket: updated with a u64 fd, looked up (syscall side) as its u64 cookie.
    MapType.SOCKMAP: MapKind(15, "sockmap", fixed_entry_bytes=12),
}
MAP_TYPE_BY_ID: Mapping[int, MapType] = {k.kernel_id: t for t, k in MAP_KINDS.items()}


# Scalar C types a map key/value may be declared as, with (size, signed).
SCALAR_TYPES: dict[str, tuple[int, bool]] = {
    "u8": (1, False), "u16": (2, False), "u32": (4, False), "u64": (8, False),
    "s8": (1, True), "s16": (2, True), "s32": (4, True), "s64": (8, True),
}


class FieldKind(enum.StrEnum):
    """How a record field is shown and sanitized (layout.py decodes, sanitize.py applies)."""

    INT = "int"  # a scalar: a number
    HEX = "hex"  # opaque bytes: hex, never read as text (the default for bytesN)
    STRING = "string"  # a C string (charN default): text, scanned for addresses and secrets
    PATH = "path"  # a file name: a C string whose dotted parts are not addresses
    COMM = "comm"  # a task name: as PATH
    IPV4 = "ipv4"  # u32 or bytes4 in network order
    IPV6 = "ipv6"  # bytes16 in network order
    ENUM = "enum"  # a scalar shown by name: a BTF enum (`enum`) or an inline table (`table`)


# Which kinds a field type may take: scalars, byte blobs, C char arrays.
FIELD_KINDS: Mapping[str, frozenset[FieldKind]] = {
    "scalar": frozenset({FieldKind.INT, FieldKind.HEX, FieldKind.IPV4, FieldKind.ENUM}),
    "bytes": frozenset({FieldKind.HEX, FieldKind.IPV4, FieldKind.IPV6, FieldKind.STRING,
                        FieldKind.PATH, FieldKind.COMM}),
    "char": frozenset({FieldKind.STRING, FieldKind.PATH, FieldKind.COMM, FieldKind.HEX}),
}


@dataclass(frozen=True)
class Field:
    """One field of a struct layout (a map key/value or an event record), C-aligned."""

    name: str  # a leading `_` (`_pad`): padding, decoded but not shown
    offset: int
    size: int  # bytes of one element
    type: str  # a SCALAR_TYPES name, "bytes" or "char"
    kind: FieldKind
    count: int = 1  # an array of `count` scalars (`u32[4]`); 1: a single one
    enum: str | None = None  # a BTF enum type name, resolved where the record is read
    table: tuple[tuple[int, str], ...] = ()  # an inline enum: value -> label

    @property
    def total(self) -> int:
        return self.size * self.count

    @property
    def align(self) -> int:
        return self.size if self.type in SCALAR_TYPES else 1

    @property
    def hidden(self) -> bool:
        return self.name.startswith("_")


@dataclass(frozen=True)
class CType:
    """A key or value type: a scalar name (`u32`), an opaque byte blob of `size` bytes, or a
    struct of `fields` (C layout, `size` includes the tail padding)."""

    name: str | None  # scalar name from SCALAR_TYPES, or None for bytes / a struct
    size: int
    fields: tuple[Field, ...] = ()  # a struct's fields (name None)

    @property
    def signed(self) -> bool:
        return self.name is not None and SCALAR_TYPES[self.name][1]


class HistKind(enum.StrEnum):
    LOG2 = "log2"  # slot i counts values in [2^(i-1), 2^i - 1] (BCC's bpf_log2l; slot 0: 0)
    LINEAR = "linear"  # slot i counts values in [i*step, (i+1)*step - 1]


@dataclass(frozen=True)
class Histogram:
    """A map whose key is a slot and whose value is a count: shown like BCC's print_*_hist."""

    kind: HistKind
    unit: str = "value"  # the column header (usecs, nsecs, bytes...)
    step: int = 1  # linear bucket width


@dataclass(frozen=True)
class MapEntry:
    key: int | bytes
    value: int | bytes
    line: int | None = None  # where it was written, for errors at fill time


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: MapType
    key: CType
    value: CType
    max_entries: int
    flags: frozenset[MapFlag] = frozenset()
    freeze: bool = False
    preserve: bool = False  # keep contents when the spec's programs are replaced
    initial: tuple[MapEntry, ...] = ()
    events: str | None = None  # ringbuf/perf: record layout (layout.py text form)
    histogram: Histogram | None = None  # the key is a slot, the value a count
    line: int | None = None


# The map_flags bits a spec can declare (BPF_F_NO_PREALLOC .. BPF_F_WRONLY_PROG): the facts
# checks (stage, compliance) compare only these.
MAP_FLAG_MASK = 0x1FF


def kernel_map_flags(flags: frozenset[MapFlag]) -> int:
    """The map_flags the kernel keeps for a map created with `flags`: RDONLY/WRONLY bind to
    the creating fd only (bpf_map_flags_retain_permanent drops them)."""
    return sum(MAP_FLAG_BITS[f] for f in flags - {MapFlag.RDONLY, MapFlag.WRONLY})


def map_access(flags: frozenset[MapFlag]) -> str:
    """"rdonly", "wronly" or "" (read-write): what the syscall side may do with a map."""
    return "rdonly" if MapFlag.RDONLY in flags else "wronly" if MapFlag.WRONLY in flags else ""


def map_pin_mode(mode: int, access: str) -> int:
    """The pin mode of a map with `access`. The kernel keeps BPF_F_RDONLY/WRONLY only on the
    fd made at creation, so for a pinned map the restriction is the pin's mode: BPF_OBJ_GET
    checks it against the open flags (root's DAC override aside)."""
    if access == "rdonly":
        return mode & ~0o222
    if access == "wronly":
        return mode & ~0o444
    return mode


# --- attach records: a spec's `attach:` in, the manifest's target text out and back ----------

_TP_PART = re.compile(r"[A-Za-z0-9_]{1,64}")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")

# XDP attach modes as written in a spec -> XDP_FLAGS_* (uapi/linux/if_link.h).
XDP_MODES: Mapping[str, int] = {"skb": 1 << 1, "native": 1 << 2, "hw": 1 << 3}

# tcx hook directions -> enum bpf_attach_type (BPF_TCX_INGRESS, BPF_TCX_EGRESS).
TC_DIRECTIONS: Mapping[str, int] = {"ingress": 46, "egress": 47}
# A program's place among the programs on a multi-prog hook (the kernel's mprog API: tcx, and
# cgroup links on recent kernels, 6.18 here): `first` and `last` are where it goes when
# attached (a later `first` goes in front of it); `before` and `after` name another loaderd
# program, `<spec>/<program>`, attached to the same hook.
ORDERS = ("first", "last", "before", "after")
_ANCHOR = re.compile(f"({NAME_PATTERN})/({NAME_PATTERN})")


class _Target:
    """What every attach record says about itself, from PROG_KINDS (one table)."""

    @property
    def kind(self) -> ProgKind:
        return next(k for k in PROG_KINDS.values() if type(self) is k.attach)

    @property
    def exclusive(self) -> bool:
        """One link per target: a replacement swaps it with LINK_UPDATE."""
        return self.kind.exclusive

    @property
    def text(self) -> str:
        """The manifest's and status's spelling of the target."""
        return target_text(cast(Attach, self))

    @property
    def load_attach_type(self) -> int | None:
        """The expected_attach_type the program is loaded with (None: the kernel's default)."""
        return None


@dataclass(frozen=True)
class TracepointAttach(_Target):
    category: str
    event: str

    @classmethod
    def from_spec(cls, raw: Any) -> TracepointAttach:
        category, event = raw["tracepoint"].split(":")  # shape checked by the schema
        return cls(category, event)

    def body(self) -> str:
        return f"{self.category}:{self.event}"

    @classmethod
    def from_body(cls, text: str) -> TracepointAttach | None:
        cat, _, ev = text.partition(":")
        return cls(cat, ev) if _TP_PART.fullmatch(cat) and _TP_PART.fullmatch(ev) else None


@dataclass(frozen=True)
class RawTracepointAttach(_Target):
    name: str

    @classmethod
    def from_spec(cls, raw: Any) -> RawTracepointAttach:
        return cls(raw["raw_tracepoint"])

    def body(self) -> str:
        return self.name

    @classmethod
    def from_body(cls, text: str) -> RawTracepointAttach | None:
        return cls(text) if _TP_PART.fullmatch(text) else None


@dataclass(frozen=True)
class XdpAttach(_Target):
    interface: str
    mode: str = "skb"  # a key of XDP_MODES

    @classmethod
    def from_spec(cls, raw: Any) -> XdpAttach:
        return cls(raw["xdp"]["interface"], raw["xdp"].get("mode", "skb"))

    def body(self) -> str:
        return f"{self.interface}:{self.mode}"

    @classmethod
    def from_body(cls, text: str) -> XdpAttach | None:
        iface, _, mode = text.rpartition(":")
        return cls(iface, mode) if _IFNAME.fullmatch(iface) and mode in XDP_MODES else None


class OrderedAttach(_Target):
    """A target on a multi-prog hook (tcx, cgroup): `order` (one of ORDERS) and, for
    before/after, `anchor`, a loaderd program on the same hook (bpf/attach.py places it)."""

    order: str
    anchor: str | None
    KEY: ClassVar[str]  # the spec's `attach:` key (error paths name it)

    @property
    def anchor_parts(self) -> tuple[str, str] | None:
        """(spec, program) this one is ordered against, for before/after."""
        m = _ANCHOR.fullmatch(self.anchor or "")
        return (m.group(1), m.group(2)) if m else None

    @property
    def attach_type(self) -> int:
        """The hook's enum bpf_attach_type."""
        raise NotImplementedError

    @property
    def hook_where(self) -> str:
        """The hook, as a refusal names it ("eth0 ingress")."""
        raise NotImplementedError

    def order_text(self) -> str:
        return f"{self.order}={self.anchor}" if self.anchor else self.order


def _order_of(raw: Mapping[str, Any]) -> tuple[str, str | None]:
    """A spec's `order:` (shape checked by the schema) as (order, anchor)."""
    order = raw.get("order", "last")
    if isinstance(order, dict):  # {before: spec/prog} or {after: spec/prog}
        (rel, anchor), = order.items()
        return rel, anchor
    return order, None


def _order_from_text(text: str) -> tuple[str, str | None] | None:
    rel, _, anchor = text.partition("=")
    if rel not in ORDERS or (rel in ("before", "after")) != bool(_ANCHOR.fullmatch(anchor)):
        return None
    return rel, anchor or None


@dataclass(frozen=True)
class TcAttach(OrderedAttach):
    interface: str
    direction: str = "ingress"  # a key of TC_DIRECTIONS
    order: str = "last"  # one of ORDERS
    anchor: str | None = None  # before/after: "<spec>/<program>"
    KEY: ClassVar[str] = "tc"

    @classmethod
    def from_spec(cls, raw: Any) -> TcAttach:
        tc = raw["tc"]
        return cls(tc["interface"], tc.get("direction", "ingress"), *_order_of(tc))

    @property
    def attach_type(self) -> int:
        return TC_DIRECTIONS[self.direction]

    @property
    def hook_where(self) -> str:
        return f"{self.interface} {self.direction}"

    def body(self) -> str:
        return f"{self.interface}:{self.direction}:{self.order_text()}"

    @classmethod
    def from_body(cls, text: str) -> TcAttach | None:
        parts = text.rsplit(":", 2)
        if len(parts) != 3:
            return None
        iface, direction, order = parts
        placed = _order_from_text(order)
        if not (_IFNAME.fullmatch(iface) and direction in TC_DIRECTIONS and placed):
            return None
        return cls(iface, direction, *placed)


_CGROUP_PATH = re.compile(r"(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9_.@:/-]{1,255}")
_UNIT = re.compile(r"[A-Za-z0-9_.@:\\-]{1,255}\.(service|scope|slice)")


@dataclass(frozen=True)
class CgroupAttach(OrderedAttach):
    """A cgroup hook: `path` below the cgroup2 mount, or the cgroup systemd gives `unit`.
    One subclass per program type (the manifest names the type by its record); HOOKS maps a
    hook name to its enum bpf_attach_type, also the program's expected_attach_type at load.
    The manifest's body adds `,<order>` when it is not `last` (`,` is in neither a path nor a
    unit name; records from before ordering read as `last`)."""

    hook: str
    path: str | None = None
    unit: str | None = None
    order: str = "last"  # one of ORDERS
    anchor: str | None = None  # before/after: "<spec>/<program>"
    HOOKS: ClassVar[Mapping[str, int]] = {}
    KEY: ClassVar[str] = "cgroup"

    @classmethod
    def from_spec(cls, raw: Any) -> CgroupAttach:
        cg = raw["cgroup"]
        return cls(cg.get("hook", next(iter(cls.HOOKS))), cg.get("path"), cg.get("unit"),
                   *_order_of(cg))

    @property
    def attach_type(self) -> int:
        return self.HOOKS[self.hook]

    @property
    def load_attach_type(self) -> int | None:
        return self.attach_type

    @property
    def where(self) -> str:
        return f"unit {self.unit}" if self.unit else f"cgroup {self.path}"

    @property
    def hook_where(self) -> str:
        return f"{self.where} {self.hook}"

    def body(self) -> str:
        at = f"unit={self.unit}" if self.unit else f"path={self.path}"
        return f"{self.hook}:{at}" + ("" if self.order == "last" else f",{self.order_text()}")

    @classmethod
    def from_body(cls, text: str) -> CgroupAttach | None:
        hook, _, rest = text.partition(":")
        rest, comma, order = rest.partition(",")
        placed = _order_from_text(order) if comma else ("last", None)
        key, _, value = rest.partition("=")
        if hook not in cls.HOOKS or placed is None or (comma and placed[0] == "last"):
            return None
        if key == "path" and _CGROUP_PATH.fullmatch(value):
            return cls(hook, value, None, *placed)
        if key == "unit" and _UNIT.fullmatch(value):
            return cls(hook, None, value, *placed)
        return None


# enum bpf_attach_type of each hook; the first is the default.
@dataclass(frozen=True)
class CgroupSkbAttach(CgroupAttach):
    HOOKS: ClassVar[Mapping[str, int]] = {"ingress": 0, "egress": 1}


@dataclass(frozen=True)
class CgroupSockAttach(CgroupAttach):
    HOOKS: ClassVar[Mapping[str, int]] = {"create": 2, "post_bind4": 12, "post_bind6": 13}


@dataclass(frozen=True)
class CgroupSockAddrAttach(CgroupAttach):
    HOOKS: ClassVar[Mapping[str, int]] = {"connect4": 10, "connect6": 11, "bind4": 8,
                                          "bind6": 9, "sendmsg4": 14, "sendmsg6": 15}


@dataclass(frozen=True)
class CgroupSysctlAttach(CgroupAttach):
    HOOKS: ClassVar[Mapping[str, int]] = {"sysctl": 18}


@dataclass(frozen=True)
class CgroupDeviceAttach(CgroupAttach):
    HOOKS: ClassVar[Mapping[str, int]] = {"device": 6}


_BINARY = re.compile(r"/[A-Za-z0-9_.+/-]{1,4095}")
_SYMBOL = re.compile(r"[A-Za-z_.][A-Za-z0-9_.$]{0,127}")


@dataclass(frozen=True)
class UprobeAttach(_Target):
    """A function entry (or return) in an ELF binary, by symbol or file offset; every process
    running it, or one pid."""

    binary: str
    symbol: str | None = None
    offset: int | None = None
    retprobe: bool = False
    pid: int | None = None

    @property
    def load_attach_type(self) -> int | None:
        return 48  # BPF_TRACE_UPROBE_MULTI: attached through a uprobe_multi link

    @classmethod
    def from_spec(cls, raw: Any) -> UprobeAttach:
        u = raw["uprobe"]
        return cls(u["binary"], u.get("symbol"), u.get("offset"), u.get("retprobe", False),
                   u.get("pid"))

    @property
    def where(self) -> str:
        at = self.symbol if self.symbol is not None else f"{self.offset:#x}"
        return f"{self.binary}:{at}"

    def body(self) -> str:
        at = f"sym={self.symbol}" if self.symbol is not None else f"off={self.offset:#x}"
        return (f"{self.binary}:{at}:{'return' if self.retprobe else 'entry'}:"
                f"pid={self.pid if self.pid is not None else 'all'}")

    @classmethod
    def from_body(cls, text: str) -> UprobeAttach | None:
        parts = text.rsplit(":", 3)
        if len(parts) != 4 or not _BINARY.fullmatch(parts[0]):
            return None
        binary, at, where, pid = parts
        kind, _, value = at.partition("=")
        if where not in ("entry", "return") or not pid.startswith("pid="):
            return None
        pid_text = pid[4:]
        if pid_text != "all" and not pid_text.isdigit():
            return None
        pid_value = None if pid_text == "all" else int(pid_text)
        ret = where == "return"
        if kind == "sym" and _SYMBOL.fullmatch(value):
            return cls(binary, value, None, ret, pid_value)
        if kind == "off" and re.fullmatch(r"0x[0-9a-f]{1,16}", value):
            return cls(binary, None, int(value, 16), ret, pid_value)
        return None


_NETNS = re.compile(r"[A-Za-z0-9_.-]{1,64}")
NETNS_DIR = "/run/netns"  # where `ip netns add` pins named network namespaces


@dataclass(frozen=True)
class SkLookupAttach(_Target):
    """A network namespace's socket lookup: a named one (`ip netns`), or None: the host's (the
    apply's own)."""

    netns: str | None = None
    ATTACH_TYPE: ClassVar[int] = 36  # BPF_SK_LOOKUP, also the expected attach type at load

    @classmethod
    def from_spec(cls, raw: Any) -> SkLookupAttach:
        return cls((raw["sk_lookup"] or {}).get("netns"))

    @property
    def load_attach_type(self) -> int | None:
        return self.ATTACH_TYPE

    @property
    def path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}" if self.netns else "/proc/self/ns/net"

    @property
    def where(self) -> str:
        return f"network namespace {self.netns}" if self.netns else "the host network namespace"

    def body(self) -> str:
        return f"netns={self.netns or '-'}"

    @classmethod
    def from_body(cls, text: str) -> SkLookupAttach | None:
        key, _, name = text.partition("=")
        if key != "netns":
            return None
        if name == "-":
            return cls()
        return cls(name) if _NETNS.fullmatch(name) and name not in (".", "..") else None


# Software perf events (PERF_TYPE_SOFTWARE configs, perf's names).
SOFTWARE_EVENTS: Mapping[str, int] = {
    "cpu-clock": 0, "task-clock": 1, "page-faults": 2, "context-switches": 3,
    "cpu-migrations": 4, "minor-faults": 5, "major-faults": 6, "alignment-faults": 7,
    "emulation-faults": 8}
# A perf_event program has one link per CPU, pinned and recorded as `<program>__cpu<N>`.
PERF_LINK_SEP = "__cpu"
_PER_CPU_LINK = re.compile(f"({NAME_PATTERN}){PERF_LINK_SEP}([0-9]{{1,4}})")


def link_program(key: str) -> str:
    """The program a link key belongs to (a per-CPU link's key names its CPU too)."""
    m = _PER_CPU_LINK.fullmatch(key)
    return m.group(1) if m else key


@dataclass(frozen=True)
class PerfEventAttach(_Target):
    """A software event sampled on every online CPU, `frequency` times a second or every
    `period` events."""

    event: str
    frequency: int | None = None
    period: int | None = None

    @classmethod
    def from_spec(cls, raw: Any) -> PerfEventAttach:
        p = raw["perf_event"]
        return cls(p["event"], p.get("frequency"), p.get("period"))

    @property
    def config(self) -> int:
        return SOFTWARE_EVENTS[self.event]

    def body(self) -> str:
        rate = f"freq={self.frequency}" if self.frequency is not None else f"period={self.period}"
        return f"{self.event}:{rate}"

    @classmethod
    def from_body(cls, text: str) -> PerfEventAttach | None:
        event, _, rate = text.partition(":")
        key, _, value = rate.partition("=")
        if event not in SOFTWARE_EVENTS or not value.isdigit() or not 0 < int(value) < 1 << 63:
            return None
        if key == "freq":
            return cls(event, frequency=int(value))
        return cls(event, period=int(value)) if key == "period" else None


_KSYM = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")


@dataclass(frozen=True)
class KprobeAttach(_Target):
    function: str
    retprobe: bool = False

    @classmethod
    def from_spec(cls, raw: Any) -> KprobeAttach:
        return cls(raw["kprobe"]["function"], raw["kprobe"].get("retprobe", False))

    def body(self) -> str:
        return f"{self.function}:{'return' if self.retprobe else 'entry'}"

    @classmethod
    def from_body(cls, text: str) -> KprobeAttach | None:
        fn, _, where = text.partition(":")
        if not _KSYM.fullmatch(fn) or where not in ("entry", "return"):
            return None
        return cls(fn, where == "return")


@dataclass(frozen=True)
class BtfAttach(_Target):
    """A kernel function (fentry/fexit) or LSM hook the program is bound to at load by its BTF
    id. BCC finds the id from the C function's name (`PREFIX` + target: what its
    KFUNC_PROBE/KRETFUNC_PROBE/LSM_PROBE macros name it), so the name must say the target."""

    function: str
    KEY: ClassVar[str] = ""
    PREFIX: ClassVar[str] = ""

    @classmethod
    def from_spec(cls, raw: Any) -> BtfAttach:
        return cls(raw[cls.KEY])

    @property
    def bcc_name(self) -> str:
        return self.PREFIX + self.function

    def body(self) -> str:
        return self.function

    @classmethod
    def from_body(cls, text: str) -> BtfAttach | None:
        return cls(text) if _KSYM.fullmatch(text) else None


@dataclass(frozen=True)
class FentryAttach(BtfAttach):
    KEY: ClassVar[str] = "fentry"
    PREFIX: ClassVar[str] = "kfunc__"


@dataclass(frozen=True)
class FexitAttach(BtfAttach):
    KEY: ClassVar[str] = "fexit"
    PREFIX: ClassVar[str] = "kretfunc__"


@dataclass(frozen=True)
class LsmAttach(BtfAttach):
    KEY: ClassVar[str] = "lsm"
    PREFIX: ClassVar[str] = "lsm__"


@dataclass(frozen=True)
class NoAttach(_Target):
    """Loaded and pinned only (socket filters: consumers attach with SO_ATTACH_BPF)."""

    @classmethod
    def from_spec(cls, raw: Any) -> NoAttach:
        return cls()

    def body(self) -> str:
        raise ValueError("a program that is not attached has no target")

    @classmethod
    def from_body(cls, text: str) -> NoAttach | None:
        return None


# What a link is made for.
LinkTarget = (TracepointAttach | RawTracepointAttach | XdpAttach | TcAttach | CgroupAttach
              | UprobeAttach | KprobeAttach | BtfAttach | SkLookupAttach | PerfEventAttach)
Attach = LinkTarget | NoAttach


def target_text(a: Attach) -> str:
    """An attach target as the manifest and status spell it: `<program type>:<body>`."""
    for ptype, kind in PROG_KINDS.items():
        if type(a) is kind.attach and not isinstance(a, NoAttach):
            return f"{ptype}:{a.body()}"
    raise ValueError(f"no target text for {a!r}")


def parse_target(text: str) -> LinkTarget:
    """The inverse of target_text; ValueError for anything else."""
    prefix, _, body = text.partition(":")
    if prefix in PROG_KINDS:
        parsed = PROG_KINDS[ProgType(prefix)].attach.from_body(body)
        if parsed is not None and not isinstance(parsed, NoAttach):
            return parsed
    raise ValueError(f"not an attach target: {text[:80]!r}")


# --- helpers and program types ---------------------------------------------------------------
# Helper names are `enum bpf_func_id` members without the BPF_FUNC_ prefix.

# Every program type's defaults: maps, clocks, randomness, the CPU id, event output.
COMMON_HELPERS: frozenset[str] = frozenset({
    "map_lookup_elem", "map_update_elem", "map_delete_elem",
    "ktime_get_ns", "ktime_get_boot_ns", "get_smp_processor_id", "get_prandom_u32",
    "ringbuf_output", "ringbuf_reserve", "ringbuf_submit", "ringbuf_discard",
    "perf_event_output",
})
_CURRENT_TASK = frozenset({"get_current_pid_tgid", "get_current_uid_gid", "get_current_comm"})
_CGROUP_CAPS = frozenset({"CAP_BPF", "CAP_NET_ADMIN"})
# Reading a packet and its socket (tc and cgroup_skb).
_SKB_HELPERS = frozenset({"skb_load_bytes", "get_socket_cookie", "get_cgroup_classid",
                          "skb_cgroup_id"})

# Off for every type by default, with the reason a refusal gives; the operator turns one on for
# a type in loaderd.yaml (policy.helpers.by_type.<type>), or for all with policy.helpers.allow.
GATED_HELPERS: Mapping[str, str] = {
    "probe_read_kernel": "reads arbitrary kernel memory",
    "probe_read_kernel_str": "reads arbitrary kernel memory",
    "probe_read": "reads arbitrary kernel or user memory",
    "probe_read_str": "reads arbitrary kernel or user memory",
    "tail_call": "jumps into another program, outside the bytecode checked here",
    "probe_read_user": "reads the memory of the process it runs in",
    "probe_read_user_str": "reads the memory of the process it runs in",
}

# Never allowed unless the operator's policy lists them explicitly in `helpers.allow`:
# they write user memory, change control flow, signal processes or spam the trace pipe.
DANGEROUS_HELPERS: frozenset[str] = frozenset({
    "probe_write_user", "override_return", "send_signal", "send_signal_thread",
    "trace_printk", "trace_vprintk", "sys_bpf", "copy_from_user_task",
})


@dataclass(frozen=True)
class ProgKind:
    """What loaderd knows about one program type (a row of PROG_KINDS)."""

    kernel_id: int  # enum bpf_prog_type (BCC's load_func takes the same number)
    attach: type[Attach]  # the record a spec's `attach:` becomes (bpf/attach.py attaches it)
    caps: frozenset[str]  # to load and attach it, on kernels with CAP_BPF (>= 5.8)
    helpers: frozenset[str]  # allowed by default (policy.helpers.allow replaces, by_type adds)
    # A replacement swaps the program behind the old link (BPF_LINK_UPDATE) instead of making a
    # new one: XDP takes one link per interface; a tcx link keeps its place in the hook's order.
    exclusive: bool = False


PROG_KINDS: Mapping[ProgType, ProgKind] = {
    ProgType.TRACEPOINT: ProgKind(
        5, TracepointAttach, frozenset({"CAP_BPF", "CAP_PERFMON"}),
        COMMON_HELPERS | _CURRENT_TASK),
    ProgType.RAW_TRACEPOINT: ProgKind(
        17, RawTracepointAttach, frozenset({"CAP_BPF", "CAP_PERFMON"}),
        COMMON_HELPERS | _CURRENT_TASK),
    ProgType.XDP: ProgKind(
        6, XdpAttach, frozenset({"CAP_BPF", "CAP_NET_ADMIN"}),
        COMMON_HELPERS | {"redirect", "xdp_adjust_head", "xdp_adjust_tail"}, exclusive=True),
    ProgType.SOCKET_FILTER: ProgKind(
        1, NoAttach, frozenset({"CAP_BPF"}),
        COMMON_HELPERS | {"skb_load_bytes", "get_socket_cookie"}),
    ProgType.TC: ProgKind(
        3, TcAttach, frozenset({"CAP_BPF", "CAP_NET_ADMIN"}),
        COMMON_HELPERS | _SKB_HELPERS | {"redirect", "skb_store_bytes", "skb_change_head",
                                         "skb_change_tail", "l3_csum_replace",
                                         "l4_csum_replace", "csum_diff"},
        exclusive=True),
    # cgroup links: many per hook, run in `order:` (as tc); a replacement swaps the program
    # behind its link (BPF_LINK_UPDATE), so it keeps its place. bpf_prog_load wants
    # CAP_NET_ADMIN for every cgroup type (is_net_admin_prog_type).
    ProgType.CGROUP_SKB: ProgKind(
        8, CgroupSkbAttach, _CGROUP_CAPS, COMMON_HELPERS | _SKB_HELPERS, exclusive=True),
    ProgType.CGROUP_SOCK: ProgKind(
        9, CgroupSockAttach, _CGROUP_CAPS,
        COMMON_HELPERS | _CURRENT_TASK | {"get_socket_cookie", "get_current_cgroup_id"},
        exclusive=True),
    ProgType.CGROUP_SOCK_ADDR: ProgKind(
        18, CgroupSockAddrAttach, _CGROUP_CAPS,
        COMMON_HELPERS | _CURRENT_TASK | {"get_socket_cookie", "get_current_cgroup_id",
                                          "bind"},
        exclusive=True),
    ProgType.CGROUP_SYSCTL: ProgKind(
        23, CgroupSysctlAttach, _CGROUP_CAPS,
        COMMON_HELPERS | _CURRENT_TASK | {"sysctl_get_name", "sysctl_get_current_value",
                                          "sysctl_get_new_value", "strtol", "strtoul",
                                          "get_current_cgroup_id"}, exclusive=True),
    ProgType.CGROUP_DEVICE: ProgKind(
        15, CgroupDeviceAttach, _CGROUP_CAPS,
        COMMON_HELPERS | _CURRENT_TASK | {"get_current_cgroup_id"}, exclusive=True),
    ProgType.UPROBE: ProgKind(
        2, UprobeAttach, frozenset({"CAP_BPF", "CAP_PERFMON"}),
        COMMON_HELPERS | _CURRENT_TASK | {"get_current_cgroup_id"}),
    # Steers a connection or datagram to a socket from a sockmap (sk_assign) before the
    # kernel's own lookup; many per netns, run in attach order; updated in place.
    ProgType.SK_LOOKUP: ProgKind(
        30, SkLookupAttach, frozenset({"CAP_BPF", "CAP_NET_ADMIN"}),
        COMMON_HELPERS | {"sk_assign", "sk_release"}, exclusive=True),
    ProgType.PERF_EVENT: ProgKind(
        7, PerfEventAttach, frozenset({"CAP_BPF", "CAP_PERFMON"}),
        COMMON_HELPERS | _CURRENT_TASK | {"get_current_cgroup_id", "perf_prog_read_value"}),
    # Kernel-function types: in schema and policy everywhere; attachable where the kernel
    # has them (bpf/attach.py probes: this project's 6.18 test kernel has none of them).
    ProgType.KPROBE: ProgKind(
        2, KprobeAttach, frozenset({"CAP_BPF", "CAP_PERFMON"}),
        COMMON_HELPERS | _CURRENT_TASK | {"get_current_cgroup_id"}),
    ProgType.FENTRY: ProgKind(
        26, FentryAttach, frozenset({"CAP_BPF", "CAP_PERFMON"}),
        COMMON_HELPERS | _CURRENT_TASK | {"get_current_cgroup_id"}),
    ProgType.FEXIT: ProgKind(
        26, FexitAttach, frozenset({"CAP_BPF", "CAP_PERFMON"}),
        COMMON_HELPERS | _CURRENT_TASK | {"get_current_cgroup_id"}),
    ProgType.LSM: ProgKind(
        29, LsmAttach, frozenset({"CAP_BPF", "CAP_PERFMON"}),  # is_perfmon_prog_type
        COMMON_HELPERS | _CURRENT_TASK | {"get_current_cgroup_id"}),
}
# The first type of each kernel id (uprobe and kprobe programs are both BPF_PROG_TYPE_KPROBE).
PROG_TYPE_BY_ID: Mapping[int, ProgType] = {
    k.kernel_id: t for t, k in reversed(list(PROG_KINDS.items()))}


@dataclass(frozen=True)
class ProgramSpec:
    name: str  # the C function name, also the pin name
    type: ProgType
    attach: Attach
    fallback: tuple[str, ...] = ()  # other C functions tried in order if this one is refused
    line: int | None = None


class ParamType(enum.StrEnum):
    INT = "int"
    BOOL = "bool"
    STRING = "string"  # one of the declared `enum` values


@dataclass(frozen=True)
class Param:
    """A spec `params:` entry: a typed, validated value the C code reads as a macro."""

    name: str  # [A-Z][A-Z0-9_]{0,31}: the macro name
    type: ParamType
    value: int | bool | str

    @property
    def c_value(self) -> str:
        """The macro body: an integer, 1/0, or a C string literal (the schema restricts a
        string to [A-Za-z0-9_.:/+-], so nothing in it needs escaping)."""
        if self.type is ParamType.BOOL:
            return "1" if self.value else "0"
        if self.type is ParamType.STRING:
            return f'"{self.value}"'
        return str(self.value)


@dataclass(frozen=True)
class Spec:
    name: str  # pin directory name under the bpffs root
    path: str  # the file it came from (for errors)
    source: str  # the C text (inline, or read from `source.file`)
    source_path: str | None  # the C file, when not inline
    maps: tuple[MapSpec, ...]
    programs: tuple[ProgramSpec, ...]
    sha256: str  # of the YAML bytes + C source bytes: identity for adopt/drift
    description: str = ""
    # (line, column) of each YAML key/item by field path, e.g. ("maps", 0, "flags"), so later
    # stages can point at the exact line; not part of identity (sha256 is).
    marks: Mapping[tuple[str | int, ...], tuple[int, int]] = field(
        default_factory=dict, compare=False, repr=False)
    # The exact bytes that were parsed (sha256 covers them): what a rollback generation keeps,
    # so a file edited while an apply commits can never be saved as the applied version.
    yaml_bytes: bytes = field(default=b"", compare=False, repr=False)
    source_bytes: bytes = field(default=b"", compare=False, repr=False)
    source_ref: str | None = None  # `source.file`/`.object` as written (relative to the spec)
    # The line of `source` in the file clang's diagnostics should name (source_path, or the
    # spec for a literal `inline: |` block, whose C starts below the key): the `#line` render()
    # writes, so a compile error points at the line the author edits.
    source_line: int = field(default=1, compare=False)
    # `source.object`: a precompiled BPF ELF (CO-RE) in source_bytes, loaded through libbpf
    # instead of compiled by BCC (source is then ""); its sha256 goes into the record.
    object_sha256: str | None = None
    # The detached `<spec>.yaml.sig` as read (a rollback generation keeps it) and what its
    # check found; not part of identity: re-signing an unchanged spec rebuilds nothing.
    signature_bytes: bytes | None = field(default=None, compare=False, repr=False)
    signature: SignatureFacts | None = field(default=None, compare=False)
    # `params:` (in the YAML, so in sha256): `#define NAME value` ahead of the source
    params: tuple[Param, ...] = ()

    @property
    def is_object(self) -> bool:
        return self.object_sha256 is not None

    def line_of(self, *path: str | int) -> int | None:
        """Line of the field at `path`, or of its nearest written ancestor."""
        for end in range(len(path), -1, -1):
            mark = self.marks.get(path[:end])
            if mark is not None:
                return mark[0]
        return None


@dataclass(frozen=True)
class Limits:
    max_programs: int = 64  # across all specs
    max_maps: int = 64  # across all specs
    max_entries: int = 65536  # per map
    max_map_memory: int = 64 * 1024 * 1024  # bytes, key+value * entries, across all specs
    max_spec_bytes: int = 256 * 1024  # YAML file size
    max_source_bytes: int = 512 * 1024  # C source size
    max_object_bytes: int = 4 * 1024 * 1024  # precompiled BPF object size
    max_event_rate: int = 1000  # events/s journaled from an event map


@dataclass(frozen=True)
class Policy:
    program_types: frozenset[ProgType] = frozenset(ProgType)
    map_types: frozenset[MapType] = frozenset(MapType)
    map_flags: frozenset[MapFlag] = frozenset(MapFlag)
    # policy.helpers.allow: replaces every type's default helpers (ProgKind.helpers) when set;
    # the only place a dangerous helper can be allowed.
    helpers: frozenset[str] | None = None
    # policy.helpers.by_type: added to one type's helpers (how GATED_HELPERS are enabled).
    helpers_by_type: dict[ProgType, frozenset[str]] = field(default_factory=dict)
    allow_calls: bool = True  # bpf-to-bpf calls (src_reg 1)
    allow_kfuncs: bool = False  # kfunc calls (src_reg 2)
    limits: Limits = Limits()

    def helpers_for(self, ptype: ProgType) -> frozenset[str]:
        """What a program of `ptype` may call: the type's defaults (or helpers.allow) plus
        by_type's extras, less every dangerous helper that helpers.allow does not name."""
        allow = self.helpers if self.helpers is not None else frozenset()
        base = ptype.kind.helpers if self.helpers is None else self.helpers
        return (base | self.helpers_by_type.get(ptype, frozenset())) - (
            DANGEROUS_HELPERS - allow)


@dataclass(frozen=True)
class PinOwnership:
    mode: int = 0o600  # pins' file mode
    group: str | None = None  # group name that may read pins (e.g. loaderd-readers)
    # Where `group` was set (loaderd.yaml line): the group is resolved only when pins are made,
    # since `loaderd check` may run before the package's sysusers.d created it.
    where: Location | None = field(default=None, compare=False)

    @property
    def gid(self) -> int:
        """The group's id, or -1 (leave unchanged) when no group is configured."""
        if self.group is None:
            return -1
        import grp

        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise LoaderdError(Kind.SEMANTIC, "no such group", self.where or Location(
                field="pins.group"), value=self.group, allowed="an existing group (the "
                "package's sysusers.d creates loaderd-readers)") from None


@dataclass(frozen=True)
class CompileLimits:
    """What one compile worker may use (settings `compile:`). Measured on the shipped examples:
    VmPeak 0.29 GB, 0.4 s CPU, 0.5 s wall per compile; the defaults leave a wide margin."""

    memory_mb: int = 2048  # RLIMIT_AS of the worker (address space, MiB)
    cpu_seconds: int = 60  # RLIMIT_CPU of the worker
    timeout_seconds: int = 120  # wall clock, enforced by the parent (SIGKILL)
    require_landlock: bool = False  # refuse to compile where the kernel lacks Landlock


class SignatureMode(enum.StrEnum):
    """settings `signatures.mode`: what an unsigned spec gets. A present signature that does not
    verify refuses the spec in every mode."""

    ENFORCE = "enforce"  # unsigned refused; every source/object file must be sha256-pinned
    PERMISSIVE = "permissive"  # unsigned admitted, journaled as unsigned
    OFF = "off"  # unsigned admitted silently


class SignatureStatus(enum.StrEnum):
    VERIFIED = "verified"  # good signature by a key allowed_signers lists for loaderd-spec
    UNSIGNED = "unsigned"  # no <spec>.yaml.sig (permissive/off only)
    # mode off without allowed_signers: the signature is intact, but nobody says whose key
    # may sign, so no principal is claimed
    UNCHECKED_SIGNER = "unchecked-signer"


@dataclass(frozen=True)
class AllowedSigner:
    """One line of an allowed_signers file (ssh-keygen(1) ALLOWED SIGNERS)."""

    principals: tuple[str, ...]  # patterns, as written
    key: bytes  # the public key blob (SSH wire format)
    namespaces: tuple[str, ...] | None  # patterns; None: any namespace
    valid_after: float | None = None  # epoch seconds
    valid_before: float | None = None
    line: int = 0


@dataclass(frozen=True)
class SignaturePolicy:
    """settings `signatures:`; the two files are read (trust-checked) with the settings."""

    mode: SignatureMode = SignatureMode.OFF
    allowed_signers: str | None = None
    revoked_keys: str | None = None
    signers: tuple[AllowedSigner, ...] = ()
    revoked: frozenset[bytes] = frozenset()  # public key blobs
    files_sha256: str = ""  # of the two files' bytes: a changed key list is a settings change

    @property
    def requires_pins(self) -> bool:
        return self.mode is SignatureMode.ENFORCE


@dataclass(frozen=True)
class SignatureFacts:
    """What the signature check found for one spec: journaled, recorded, shown by status."""

    status: SignatureStatus
    principal: str | None = None  # the allowed_signers principals of the key, comma-joined
    fingerprint: str | None = None  # SHA256:... as `ssh-keygen -l` prints it
    key_type: str | None = None
    namespace: str | None = None
    signed_sha256: str | None = None  # sha256 of the exact YAML bytes the signature covers
    counter: int | None = None  # FIDO keys: the authenticator's signature counter


@dataclass(frozen=True)
class Settings:
    """Daemon settings (`/etc/loaderd/loaderd.yaml`)."""

    programs_dir: str = "/etc/loaderd/programs.d"
    bpffs_root: str = "/sys/fs/bpf/loaderd"
    state_dir: str = "/var/lib/loaderd"
    config_owner_uid: int = 0  # config/source files must be owned by this uid (StrictModes)
    pins: PinOwnership = PinOwnership()
    policy: Policy = Policy()
    sanitize: Rules = field(default_factory=Rules)  # daemon events, loaderctl events/dump
    compile: CompileLimits = CompileLimits()
    # BCC programs that read kernel structs are refused when the installed headers compile
    # other offsets than the running kernel's BTF has; true loads them anyway (said in the
    # journal, check and status): their struct reads return the wrong bytes.
    accept_header_mismatch: bool = False
    signatures: SignaturePolicy = SignaturePolicy()
    # node_exporter's textfile collector directory (Debian's default): the resident writes
    # loaderd.prom there when the directory exists; None: no metrics file.
    metrics_dir: str | None = "/var/lib/prometheus/node-exporter"
    path: str | None = None  # the file it came from
    sha256: str = ""  # of the file and its signatures files ("": the built-in defaults)

    def summary(self) -> dict[str, str | list[str]]:
        """What a change of settings is journaled as (SETTINGS_CHANGED): policy lists, limits,
        pin modes, signature mode and key lists; flat keys, lists sorted."""
        pol, sig = self.policy, self.signatures
        out: dict[str, str | list[str]] = {
            "programs_dir": self.programs_dir, "bpffs_root": self.bpffs_root,
            "state_dir": self.state_dir,
            "policy.program_types": sorted(t.value for t in pol.program_types),
            "policy.map_types": sorted(t.value for t in pol.map_types),
            "policy.map_flags": sorted(f.value for f in pol.map_flags),
            "policy.helpers.allow": "per-type defaults" if pol.helpers is None
            else sorted(pol.helpers),
            "policy.calls.bpf_to_bpf": str(pol.allow_calls),
            "policy.calls.kfunc": str(pol.allow_kfuncs),
            "pins.mode": f"{self.pins.mode:04o}", "pins.group": str(self.pins.group),
            "signatures.mode": sig.mode.value,
            "signatures.allowed_signers": f"{sig.allowed_signers} ({len(sig.signers)} keys)",
            "signatures.revoked_keys": f"{sig.revoked_keys} ({len(sig.revoked)} keys)",
            "signatures.key_lists_sha256": sig.files_sha256,
            "accept_header_mismatch": str(self.accept_header_mismatch)}
        for t, names in sorted(pol.helpers_by_type.items()):
            out[f"policy.helpers.by_type.{t.value}"] = sorted(names)
        for name in Limits.__dataclass_fields__:
            out[f"policy.limits.{name}"] = str(getattr(pol.limits, name))
        for name in CompileLimits.__dataclass_fields__:
            out[f"compile.{name}"] = str(getattr(self.compile, name))
        return out


def settings_changes(old: Mapping[str, Any], new: Mapping[str, str | list[str]]) -> list[str]:
    """One line per changed key: `key: +added -removed` for lists, `key: old -> new` else."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            plus = [f"+{x}" for x in b if x not in a]
            minus = [f"-{x}" for x in a if x not in b]
            lines.append(f"{key}: {' '.join(plus + minus)}")
        else:
            def show(v: Any) -> str:
                return "(unset)" if v is None else ",".join(v) if isinstance(v, list) else str(v)
            lines.append(f"{key}: {show(a)} -> {show(b)}")
    return lines
