"""Typed, immutable objects the rest of loaderd works on.

`spec` builds them from YAML (after schema and semantic checks); nothing else parses text.
Field names match the YAML keys documented in docs/spec-format.md.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from loaderd.errors import Kind, LoaderdError, Location
from loaderd.sanitize import Rules


class ProgType(enum.StrEnum):
    TRACEPOINT = "tracepoint"
    RAW_TRACEPOINT = "raw_tracepoint"
    XDP = "xdp"
    SOCKET_FILTER = "socket_filter"


class MapType(enum.StrEnum):
    HASH = "hash"
    ARRAY = "array"
    PERCPU_HASH = "percpu_hash"
    PERCPU_ARRAY = "percpu_array"
    LRU_HASH = "lru_hash"
    LRU_PERCPU_HASH = "lru_percpu_hash"
    RINGBUF = "ringbuf"
    PERF_EVENT_ARRAY = "perf_event_array"


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

# Scalar C types a map key/value may be declared as, with (size, signed).
SCALAR_TYPES: dict[str, tuple[int, bool]] = {
    "u8": (1, False), "u16": (2, False), "u32": (4, False), "u64": (8, False),
    "s8": (1, True), "s16": (2, True), "s32": (4, True), "s64": (8, True),
}


@dataclass(frozen=True)
class CType:
    """A key or value type: a scalar name (`u32`) or an opaque byte blob of `size` bytes."""

    name: str | None  # scalar name from SCALAR_TYPES, or None for bytes
    size: int

    @property
    def signed(self) -> bool:
        return self.name is not None and SCALAR_TYPES[self.name][1]


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
    events: str | None = None  # ringbuf only: record layout; the daemon journals its events
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


@dataclass(frozen=True)
class TracepointAttach:
    category: str
    event: str


@dataclass(frozen=True)
class RawTracepointAttach:
    name: str


@dataclass(frozen=True)
class XdpAttach:
    interface: str
    mode: str = "skb"  # skb | native | hw


@dataclass(frozen=True)
class NoAttach:
    """Loaded and pinned only (socket filters: consumers attach with SO_ATTACH_BPF)."""


Attach = TracepointAttach | RawTracepointAttach | XdpAttach | NoAttach


@dataclass(frozen=True)
class ProgramSpec:
    name: str  # the C function name, also the pin name
    type: ProgType
    attach: Attach
    fallback: tuple[str, ...] = ()  # other C functions tried in order if this one is refused
    line: int | None = None


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
    # `source.object`: a precompiled BPF ELF (CO-RE) in source_bytes, loaded through libbpf
    # instead of compiled by BCC (source is then ""); its sha256 goes into the record.
    object_sha256: str | None = None

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


# Helpers allowed for every program type unless the policy file says otherwise. Names are
# `enum bpf_func_id` members without the BPF_FUNC_ prefix.
DEFAULT_HELPERS: frozenset[str] = frozenset({
    "map_lookup_elem", "map_update_elem", "map_delete_elem",
    "ktime_get_ns", "ktime_get_boot_ns", "get_smp_processor_id", "get_prandom_u32",
    "get_current_pid_tgid", "get_current_uid_gid", "get_current_comm",
    "ringbuf_output", "ringbuf_reserve", "ringbuf_submit", "ringbuf_discard",
    "perf_event_output", "probe_read_kernel", "probe_read_kernel_str",
    "tail_call", "redirect", "xdp_adjust_head", "xdp_adjust_tail",
    "skb_load_bytes", "get_socket_cookie",
})

# Never allowed unless the operator's policy lists them explicitly in `helpers.allow`:
# they write user memory, change control flow, signal processes or spam the trace pipe.
DANGEROUS_HELPERS: frozenset[str] = frozenset({
    "probe_write_user", "override_return", "send_signal", "send_signal_thread",
    "trace_printk", "trace_vprintk", "sys_bpf", "copy_from_user_task",
})


@dataclass(frozen=True)
class Policy:
    program_types: frozenset[ProgType] = frozenset(ProgType)
    map_types: frozenset[MapType] = frozenset(MapType)
    map_flags: frozenset[MapFlag] = frozenset(MapFlag)
    helpers: frozenset[str] = DEFAULT_HELPERS  # allowed for every type
    helpers_by_type: dict[ProgType, frozenset[str]] = field(default_factory=dict)  # extra per type
    allow_calls: bool = True  # bpf-to-bpf calls (src_reg 1)
    allow_kfuncs: bool = False  # kfunc calls (src_reg 2)
    limits: Limits = Limits()

    def helpers_for(self, ptype: ProgType) -> frozenset[str]:
        return self.helpers | self.helpers_by_type.get(ptype, frozenset())


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
class Settings:
    """Daemon settings (`/etc/loaderd/loaderd.yaml`)."""

    programs_dir: str = "/etc/loaderd/programs.d"
    bpffs_root: str = "/sys/fs/bpf/loaderd"
    state_dir: str = "/var/lib/loaderd"
    config_owner_uid: int = 0  # config/source files must be owned by this uid (StrictModes)
    pins: PinOwnership = PinOwnership()
    policy: Policy = Policy()
    sanitize: Rules = field(default_factory=Rules)  # daemon events, loaderctl events/dump
    # BCC programs that read kernel structs are refused when the installed headers compile
    # other offsets than the running kernel's BTF has; true loads them anyway (said in the
    # journal, check and status): their struct reads return the wrong bytes.
    accept_header_mismatch: bool = False
    path: str | None = None  # the file it came from
