"""Attach programs through bpf_links, so an attachment lives as long as its pin.

| type           | how                                                  | link type  |
|----------------|------------------------------------------------------|------------|
| tracepoint     | own perf_event_open + LINK_CREATE(BPF_PERF_EVENT)   | perf_event |
| raw_tracepoint | BPF_RAW_TRACEPOINT_OPEN (returns a link fd)          | raw_tp     |
| xdp            | LINK_CREATE(BPF_XDP) on the ifindex, mode flags      | xdp        |
| tc             | LINK_CREATE(BPF_TCX_INGRESS/EGRESS) on the ifindex,  | tcx        |
|                | placed by BPF_F_BEFORE/AFTER (+ BPF_F_LINK anchor)   |            |
| cgroup_*       | LINK_CREATE(hook's attach type) on the cgroup2 dir fd | cgroup    |
|                | placed as tc is (the same mprog flags)               |            |
| uprobe         | LINK_CREATE(BPF_TRACE_UPROBE_MULTI): path, one file  | uprobe_multi |
|                | offset (the uprobe PMU's perf_event_open wants       |            |
|                | CAP_SYS_ADMIN; this only CAP_BPF + CAP_PERFMON)      |            |
| kprobe         | the same on the kprobe PMU (function name)           | perf_event |
| sk_lookup      | LINK_CREATE(BPF_SK_LOOKUP) on the netns fd           | netns      |
| perf_event     | a software perf event per online CPU, each with a    | perf_event |
|                | LINK_CREATE(BPF_PERF_EVENT): `<program>__cpu<N>`      |            |
| fentry, fexit, | BPF_RAW_TRACEPOINT_OPEN without a name: the BTF id   | tracing    |
| lsm            | the program was loaded for (BCC's name prefix)       |            |

Kernels without the kprobe PMU, BPF trampolines or the BPF LSM refuse those types up front
(`kernel_refusal`, from `check` and from the apply before anything compiles), in one sentence.
| socket_filter  | none: pinned program, consumers use SO_ATTACH_BPF    | -          |

A replaced XDP or tc program is swapped in place with BPF_LINK_UPDATE (an interface takes one
XDP link; a tcx link keeps its place in the hook's order; an update has no gap); everything
else gets a new link next to the old one, and the old link goes when its pin is removed at
commit.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from loaderd.bpf import btf, cgroup, kernel, uprobe
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import (
    Attach,
    BtfAttach,
    CgroupAttach,
    FentryAttach,
    FexitAttach,
    KprobeAttach,
    LinkTarget,
    LsmAttach,
    NoAttach,
    OrderedAttach,
    PerfEventAttach,
    ProgramSpec,
    RawTracepointAttach,
    SkLookupAttach,
    Spec,
    TcAttach,
    TracepointAttach,
    UprobeAttach,
    XdpAttach,
)

# Opens the pinned link of a loaderd program `(spec, program)` (an order's anchor); the
# caller knows where pins are (staging of this apply first, then live).
AnchorOpener = Callable[[str, str], int]


def target(program: ProgramSpec) -> LinkTarget | None:
    """What the program's link is made for; None: it is pinned only (NoAttach)."""
    a = program.attach
    return None if isinstance(a, NoAttach) else a


def create_link(program: ProgramSpec, prog_fd: int, anchors: AnchorOpener | None = None
                ) -> int | None:
    """A new link fd for the program (caller pins and closes it), or None for NoAttach."""
    a = program.attach
    if isinstance(a, NoAttach):
        return None
    return link_for(a, prog_fd, anchors)


def per_cpu_links(a: PerfEventAttach, prog_fd: int) -> list[tuple[int, int]]:
    """(cpu, link fd) for every online CPU: a sampling perf event belongs to one CPU. All or
    nothing: on a failure the links made so far are closed (never pinned)."""
    made: list[tuple[int, int]] = []
    try:
        for cpu in kernel.online_cpus():
            perf_fd = kernel.perf_event_open_software(a.config, cpu, frequency=a.frequency,
                                                      period=a.period)
            try:
                made.append((cpu, kernel.link_create(prog_fd, perf_fd,
                                                     kernel.ATTACH_PERF_EVENT)))
            finally:
                os.close(perf_fd)
    except BaseException:
        for _cpu, fd in made:
            os.close(fd)
        raise
    return made


def link_for(a: LinkTarget, prog_fd: int, anchors: AnchorOpener | None = None) -> int:
    """A new link fd for `prog_fd` on the target `a` (also for a recorded target: commit
    recovery has the manifest, not the spec)."""
    if isinstance(a, PerfEventAttach):
        raise AssertionError("perf_event programs have a link per CPU: per_cpu_links")
    if isinstance(a, TcAttach):
        return _mprog_link(a, prog_fd, kernel.ifindex(a.interface), anchors)
    if isinstance(a, CgroupAttach):
        cg_fd = cgroup.open_cgroup(cgroup.resolve(a))
        try:
            return _mprog_link(a, prog_fd, cg_fd, anchors)
        finally:
            os.close(cg_fd)  # the link holds the cgroup
    if isinstance(a, UprobeAttach):
        bin_fd = uprobe.open_trusted(a.binary)
        try:
            # By path (link info shows the file's real one): the fd's, so that the file
            # attached is the file checked; then the spec's path must still name it.
            link_fd = kernel.uprobe_multi_link_create(prog_fd, uprobe.fd_path(bin_fd),
                                                      _uprobe_offset(a, bin_fd),
                                                      retprobe=a.retprobe, pid=a.pid or 0)
            try:
                uprobe.still_the_file(a.binary, bin_fd)
            except BaseException:
                os.close(link_fd)
                raise
            return link_fd
        finally:
            os.close(bin_fd)
    if isinstance(a, KprobeAttach):
        pmu_type, retbit = uprobe.pmu("kprobe")
        perf_fd = kernel.perf_event_open_probe(pmu_type, a.function, 0,
                                               1 << retbit if a.retprobe else 0)
        try:
            return kernel.link_create(prog_fd, perf_fd, kernel.ATTACH_PERF_EVENT)
        finally:
            os.close(perf_fd)
    if isinstance(a, BtfAttach):
        return kernel.raw_tracepoint_open(None, prog_fd)
    if isinstance(a, SkLookupAttach):
        ns_fd = _open_netns(a)
        try:
            return kernel.link_create(prog_fd, ns_fd, a.ATTACH_TYPE)
        finally:
            os.close(ns_fd)  # the link holds the namespace
    if isinstance(a, TracepointAttach):
        perf_fd = kernel.perf_event_open_tracepoint(kernel.tracepoint_id(a.category, a.event))
        try:
            return kernel.link_create(prog_fd, perf_fd, kernel.ATTACH_PERF_EVENT)
        finally:
            os.close(perf_fd)  # the link holds its own reference to the perf event
    if isinstance(a, RawTracepointAttach):
        return kernel.raw_tracepoint_open(a.name, prog_fd)
    if isinstance(a, XdpAttach):
        return kernel.link_create(prog_fd, kernel.ifindex(a.interface), kernel.ATTACH_XDP,
                                  kernel.xdp_mode_flags(a.mode))
    raise AssertionError(f"unhandled attach {a!r}")


def _open_netns(a: SkLookupAttach) -> int:
    try:
        return os.open(a.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LoaderdError(Kind.ATTACH, f"no {a.where} ({a.path}: {exc.strerror})",
                           value=a.netns, allowed="a name `ip netns list` shows (under "
                           "/run/netns), or no netns: for the host's") from None


def _uprobe_offset(a: UprobeAttach, bin_fd: int) -> int:
    """The file offset in the binary open_trusted opened: as given (inside the file) or the
    symbol's."""
    if a.offset is not None:
        return uprobe.check_offset(a.binary, bin_fd, a.offset)
    assert a.symbol is not None  # the schema wants one of symbol, offset
    return uprobe.symbol_offset(a.binary, a.symbol, bin_fd)


_PLACE = {"first": kernel.BPF_F_BEFORE, "last": 0, "before": kernel.BPF_F_BEFORE,
          "after": kernel.BPF_F_AFTER}


def _mprog_link(a: OrderedAttach, prog_fd: int, hook: int, anchors: AnchorOpener | None
                ) -> int:
    """A link on a multi-prog hook (`hook`: the tcx ifindex or the cgroup fd). first:
    BPF_F_BEFORE naming nothing (in front of the whole chain); last: appended; before/after:
    BPF_F_LINK with the anchor's link fd, so the kernel places it relative to exactly that
    attachment and refuses (ENOENT) if it is not on this hook."""
    flags, rel_fd = _PLACE[a.order], -1
    parts = a.anchor_parts
    if parts is not None:
        if anchors is None:
            raise LoaderdError(Kind.ATTACH, f"order {a.order}: {a.anchor}: no pins to look the "
                               "anchor up in")
        rel_fd = anchors(*parts)
        flags |= kernel.BPF_F_LINK
    try:
        return kernel.mprog_link_create(prog_fd, hook, a.attach_type, flags, max(rel_fd, 0))
    except kernel.KernelError as exc:
        if parts is not None and exc.errno == errno.ENOENT:
            raise LoaderdError(Kind.ATTACH, f"order {a.order}: {a.anchor} is not attached to "
                               f"{a.hook_where}", value=a.anchor,
                               allowed=f"a loaderd {a.KEY} program on {a.hook_where}") from None
        if flags and exc.errno == errno.EINVAL and isinstance(a, CgroupAttach):
            raise LoaderdError(Kind.ATTACH, f"order {a.order}: this kernel cannot order "
                               "programs on a cgroup hook (its cgroup links take no "
                               "BPF_F_BEFORE/BPF_F_AFTER: EINVAL)", value=a.order_text(),
                               allowed="no order (attach order)") from None
        raise
    finally:
        if rel_fd >= 0:
            os.close(rel_fd)


_BTF = "/sys/kernel/btf/vmlinux"
_LSM_LIST = "/sys/kernel/security/lsm"


def kernel_refusal(a: Attach) -> str | None:
    """Why this kernel cannot run a program with this attach, found by probing it (None: it
    can, as far as a probe tells): the kprobe PMU, the highest sampling frequency, kernel BTF
    and a tracing/LSM program load (libbpf's probe, what bpftool reports), the active LSM
    list."""
    if isinstance(a, KprobeAttach):
        try:
            uprobe.pmu("kprobe")
        except LoaderdError as exc:
            return exc.message
    if isinstance(a, PerfEventAttach) and a.frequency is not None:
        top = kernel.max_sample_rate()
        if top is not None and a.frequency > top:
            return (f"frequency {a.frequency} is above this kernel's perf_event_max_sample_rate "
                    f"({top}), which perf_event_open refuses: ask for 1..{top} or raise "
                    "kernel.perf_event_max_sample_rate (sysctl)")
    if isinstance(a, FentryAttach | FexitAttach | LsmAttach):
        what = "lsm" if isinstance(a, LsmAttach) else "fentry/fexit"
        if not os.path.exists(_BTF):
            return f"this kernel has no BTF ({_BTF}): {what} programs cannot load here"
        ptype = a.kind.kernel_id
        if not kernel.prog_type_supported(ptype):
            return (f"this kernel cannot load {what} programs (a probe load of "
                    f"{kernel.PROG_TYPE_NAMES[ptype]} programs fails, as bpftool feature "
                    "probe reports)")
    if isinstance(a, LsmAttach):
        try:
            with open(_LSM_LIST, encoding="ascii") as fh:
                active = fh.read().strip().split(",")
        except OSError:
            return None  # securityfs not mounted: the load/attach says it
        if "bpf" not in active:
            return (f"the BPF LSM is not active ({_LSM_LIST}: {','.join(active)}): boot with "
                    "bpf in lsm=")
    return None


def support_errors(spec: Spec) -> list[LoaderdError]:
    """`kernel_refusal` for every program of `spec`, located at its type; tracefs not
    mounted, located at the first tracepoint's attach (before any compile: BCC reads event
    formats there too, and the attach its ids)."""
    out = []
    tracefs_said = False
    for i, prog in enumerate(spec.programs):
        why = kernel_refusal(prog.attach)
        if why:
            out.append(LoaderdError(Kind.ATTACH, f"{prog.name}: {why}", Location(
                spec.path, spec.line_of("programs", i, "type"), None, f"programs[{i}].type"),
                value=prog.type.value))
        elif isinstance(prog.attach, TracepointAttach) and not tracefs_said:
            missing = kernel.tracefs_missing()
            if missing is not None:
                tracefs_said = True
                out.append(LoaderdError(Kind.ATTACH, f"{prog.name}: {missing.message}",
                                        Location(spec.path, spec.line_of("programs", i,
                                                                         "attach"),
                                                 None, f"programs[{i}].attach"),
                                        allowed=missing.allowed))
    return out


def resolve(program: ProgramSpec) -> str | None:
    """Look the program's target up as `create_link` does, attaching nothing: the tracepoint's
    id in tracefs, the raw tracepoint among those the kernel's BTF lists (what
    BPF_RAW_TRACEPOINT_OPEN looks the name up in), the interface's index and the XDP mode.
    Raises what the attach would (Kind.ATTACH); returns a note when it could not tell."""
    a = program.attach
    why = kernel_refusal(a)
    if why:
        raise LoaderdError(Kind.ATTACH, why, value=program.type.value)
    if isinstance(a, TracepointAttach):
        kernel.tracepoint_id(a.category, a.event)
    elif isinstance(a, RawTracepointAttach):
        known = btf.raw_tracepoints()
        if known is None:
            return f"raw tracepoint {a.name} not checked: no kernel BTF"
        if a.name not in known:
            raise LoaderdError(Kind.ATTACH, "no such raw tracepoint", value=a.name,
                               allowed="a tracepoint name of the running kernel (a "
                               "btf_trace_<name> type in /sys/kernel/btf; e.g. sched_switch)")
    elif isinstance(a, XdpAttach):
        kernel.ifindex(a.interface)
        kernel.xdp_mode_flags(a.mode)
    elif isinstance(a, TcAttach):
        kernel.ifindex(a.interface)
    elif isinstance(a, CgroupAttach):
        cgroup.resolve(a)
    elif isinstance(a, SkLookupAttach):
        os.close(_open_netns(a))
    elif isinstance(a, UprobeAttach):
        bin_fd = uprobe.open_trusted(a.binary)
        try:
            _uprobe_offset(a, bin_fd)
        finally:
            os.close(bin_fd)
        if a.pid is not None and not os.path.isdir(f"/proc/{a.pid}"):
            raise LoaderdError(Kind.ATTACH, f"no process {a.pid} (uprobe pid:)", value=a.pid)
    return None


def check_targets(spec: Spec) -> tuple[list[LoaderdError], list[str]]:
    """`resolve` for every program of `spec`: (errors located at the spec's attach lines,
    notes)."""
    errors: list[LoaderdError] = []
    notes: list[str] = []
    for i, prog in enumerate(spec.programs):
        field = f"programs[{i}].attach"
        try:
            note = resolve(prog)
        except LoaderdError as exc:
            where = f" ({exc.location.file})" if exc.location.file else ""
            errors.append(LoaderdError(
                exc.kind, f"{prog.name}: attach target: {exc.message}{where}",
                Location(spec.path, spec.line_of("programs", i, "attach"), None, field),
                value=exc.value, allowed=exc.allowed))
            continue
        if note:
            notes.append(f"{spec.name}/{prog.name}: {note}")
    return errors, notes


def target_difference(info: kernel.LinkInfo, tgt: LinkTarget, ifindex: int | None = None, *,
                      by_name: bool = False) -> str | None:
    """How a link's kernel facts disagree with the target it was made for (None: they agree).
    An XDP or tcx link outlives its interface (ifindex 0 then) and does not follow a recreated one.
    `ifindex`: the one recorded at attach. `by_name` looks the interface up again: only in
    the host's network namespace (the apply), never in the resident's private one."""
    if isinstance(tgt, CgroupAttach):
        return _cgroup_difference(info, tgt, by_name=by_name)
    if isinstance(tgt, SkLookupAttach):
        if not info.netns_ino:
            return f"detached from {tgt.where} (the namespace went away)"
        if by_name:
            try:
                now = os.stat(tgt.path).st_ino
            except OSError:
                return f"{tgt.where} is gone"
            if now != info.netns_ino:
                return f"attached to netns inode {info.netns_ino}, not {tgt.where} ({now})"
        return None
    if isinstance(tgt, UprobeAttach):
        kind = kernel.BPF_PERF_EVENT_URETPROBE if tgt.retprobe else kernel.BPF_PERF_EVENT_UPROBE
        if info.perf_event_type is not None and info.perf_event_type != kind:
            return (f"a {kernel.PERF_EVENT_TYPE_NAMES.get(info.perf_event_type)} link, not "
                    f"{kernel.PERF_EVENT_TYPE_NAMES[kind]}")
        return None
    if isinstance(tgt, TcAttach) and info.attach_type is not None \
            and info.attach_type != tgt.attach_type:
        return (f"attached as {kernel.ATTACH_TYPE_NAMES.get(info.attach_type)}, not "
                f"tcx_{tgt.direction}")
    if isinstance(tgt, XdpAttach | TcAttach):
        iface = tgt.interface
        if not info.ifindex:
            return f"detached from {iface} (the interface went away)"
        if ifindex is not None and info.ifindex != ifindex:
            return f"attached to ifindex {info.ifindex}, not {ifindex} ({iface})"
        if not by_name:
            return None
        try:
            now = kernel.ifindex(iface)
        except LoaderdError:
            return f"interface {iface} is gone"
        if info.ifindex != now:
            return f"attached to ifindex {info.ifindex}, but {iface} is now ifindex {now}"
        return None
    if isinstance(tgt, PerfEventAttach):
        if info.perf_event_type is not None and info.perf_event_type != 6:  # BPF_PERF_EVENT_EVENT
            return f"a {kernel.PERF_EVENT_TYPE_NAMES.get(info.perf_event_type)} link, not event"
        return None
    if isinstance(tgt, KprobeAttach | BtfAttach):
        return None  # the kernel reports no more than the program (checked by the caller)
    want = tgt.name if isinstance(tgt, RawTracepointAttach) else tgt.event
    if info.tp_name is not None and info.tp_name != want:
        return f"attached to {info.tp_name}, not {want}"
    return None


def _cgroup_difference(info: kernel.LinkInfo, tgt: CgroupAttach, *, by_name: bool
                       ) -> str | None:
    """A cgroup link is detached by the kernel when its cgroup goes away (cgroup_id 0 then),
    and does not follow a cgroup made again under the same name (a restarted unit's)."""
    if info.attach_type is not None and info.attach_type != tgt.attach_type:
        return (f"attached as {kernel.ATTACH_TYPE_NAMES.get(info.attach_type)}, not "
                f"{kernel.ATTACH_TYPE_NAMES.get(tgt.attach_type)}")
    if not info.cgroup_id:
        return f"detached from {tgt.where} (the cgroup went away)"
    if not by_name:
        return None
    try:
        now = cgroup.cgroup_id(cgroup.resolve(tgt))
    except (LoaderdError, OSError):
        return f"{tgt.where} is gone"
    if now != info.cgroup_id:
        return (f"attached to cgroup id {info.cgroup_id}, but {tgt.where} is now cgroup id "
                f"{now} (made again)")
    return None


def binary_difference(tgt: UprobeAttach, ino: int, sha256: str | None, *, hashed: bool
                      ) -> str | None:
    """How the binary at a uprobe's path differs from the one it was attached to: another
    inode (replaced: the uprobe stays on the old file) or, when `hashed`, other bytes."""
    try:
        st = os.stat(tgt.binary)
    except OSError as exc:
        return f"binary {tgt.binary} is gone ({exc.strerror})"
    if st.st_ino != ino:
        return (f"binary {tgt.binary} was replaced (inode {ino} -> {st.st_ino}); the uprobe "
                "is on the old file")
    if hashed and sha256 is not None:
        try:
            now = uprobe.identity(tgt.binary).sha256
        except OSError as exc:
            return f"binary {tgt.binary}: cannot read ({exc.strerror})"
        if now != sha256:
            return f"binary {tgt.binary} changed in place (sha256 {sha256[:12]} -> {now[:12]})"
    return None


def update_link(link_pin: str, new_prog_fd: int) -> int:
    """Swap the program behind an existing pinned link; returns the link id."""
    fd = kernel.obj_get(link_pin)
    try:
        kernel.link_update(fd, new_prog_fd)
        return kernel.link_info(fd).id
    finally:
        os.close(fd)


__all__ = ["AnchorOpener", "LoaderdError", "binary_difference", "check_targets",
           "create_link", "kernel_refusal", "link_for", "per_cpu_links", "resolve",
           "support_errors", "target", "target_difference", "update_link"]
