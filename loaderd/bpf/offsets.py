"""Kernel struct offsets: what the installed headers compile to against the running kernel's BTF.

BCC compiles `task->tgid` at the offset the headers in /lib/modules/<release>/build give. When
those headers are not the running kernel's (a custom, cloud or vendor kernel with a distribution's
generic headers linked in; measured here: Debian's 6.1 headers on 6.18, task_struct.tgid 2420 in
the headers and 1268 in BTF) every struct read loads, runs and returns garbage. The running
kernel's BTF is the truth. A representative set of members is measured both ways (the headers
side by a compile in a worker, stage/headers.py); the result is cached per kernel release,
headers path and mtime, and BTF size and mtime, in the state directory (`headers.json`), where
`status` and compliance read it without a compiler.

The cache is a measurement, not a trust anchor: it is re-measured whenever its key differs, it is
read with O_NOFOLLOW from a regular file of bounded size, and anything malformed is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field

from loaderd.bpf import btf

CACHE = "headers.json"
MAX_CACHE_BYTES = 64 * 1024
CACHE_VERSION = 1

# The representative members: the ones tracing programs read most (exitsnoop, execsnoop,
# runqlat, tcplife, tcpconnect ports). Whole (non-bitfield) members only: offsetof() cannot
# take a bitfield.
FIELDS: tuple[str, ...] = (
    "task_struct.pid", "task_struct.tgid", "task_struct.real_parent", "task_struct.comm",
    "task_struct.flags", "task_struct.mm", "task_struct.start_time",
    "cred.uid",
    "sock_common.skc_family", "sock_common.skc_dport", "sock_common.skc_num",
    "sock_common.skc_daddr", "sock_common.skc_rcv_saddr", "sock_common.skc_state",
    "sock.sk_protocol", "sock.sk_type",
    "tcp_sock.bytes_acked", "tcp_sock.bytes_received", "tcp_sock.srtt_us",
)
# Headers the probe includes to see every struct above (all under the allowed include roots).
PROBE_INCLUDES: tuple[str, ...] = ("linux/sched.h", "linux/cred.h", "net/sock.h", "linux/tcp.h")

# Structs whose layout is ABI (uapi contexts, wire headers) and that programs name all the time:
# never a header-mismatch risk. Everything else found in the running kernel's BTF is kernel
# internal and read at whatever offset the headers say.
STABLE_STRUCTS: frozenset[str] = frozenset({
    "__sk_buff", "xdp_md", "sk_msg_md", "sk_reuseport_md", "pt_regs", "bpf_sock",
    "bpf_sock_addr", "bpf_sock_ops", "bpf_sysctl", "bpf_sockopt", "bpf_raw_tracepoint_args",
    "bpf_perf_event_data", "bpf_sk_lookup", "bpf_cgroup_dev_ctx", "bpf_tcp_sock",
    "bpf_fib_lookup", "bpf_tunnel_key", "bpf_spin_lock", "bpf_timer", "bpf_sock_tuple",
    "ethhdr", "iphdr", "ipv6hdr", "tcphdr", "udphdr", "icmphdr", "icmp6hdr", "vlan_hdr",
    "arphdr", "in_addr", "in6_addr", "sockaddr", "sockaddr_in", "sockaddr_in6", "timespec64",
    "__kernel_timespec",
})


def release() -> str:
    return os.uname().release


def headers_dirs(rel: str | None = None) -> tuple[str, str]:
    """(build, source): what BCC compiles against (BCC_KERNEL_SOURCE, else /lib/modules)."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return env, env
    base = f"/lib/modules/{rel or release()}"
    return f"{base}/build", f"{base}/source"


def headers_version(build: str) -> str | None:
    """The release the headers were generated for (include/generated/utsrelease.h)."""
    try:
        with open(os.path.join(build, "include/generated/utsrelease.h"), encoding="ascii",
                  errors="replace") as f:
            text = f.read(512)
    except OSError:
        return None
    _, _, rest = text.partition('UTS_RELEASE "')
    return rest.partition('"')[0] or None


def _stamp(path: str) -> str:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return f"{path}:missing"
    return f"{real}:{st.st_mtime_ns}:{st.st_size}"


def cache_key(rel: str | None = None, btf_path: str = btf.VMLINUX_BTF) -> str:
    """Changes with the kernel release, the headers (path, mtime) and the BTF blob."""
    build, source = headers_dirs(rel)
    return "|".join((rel or release(), _stamp(build), _stamp(source), _stamp(btf_path),
                     ",".join(FIELDS), ",".join(PROBE_INCLUDES)))


@dataclass(frozen=True)
class Mismatch:
    field: str  # struct.member
    headers: int | None  # byte offset the headers compile to (None: not measured)
    kernel: int | None  # byte offset in the running kernel's BTF (None: no such member)

    def __str__(self) -> str:
        h = "?" if self.headers is None else str(self.headers)
        k = "absent" if self.kernel is None else str(self.kernel)
        return f"{self.field} at {h} in the headers, {k} in the running kernel"


@dataclass(frozen=True)
class HeaderFacts:
    key: str
    release: str  # the running kernel
    headers: str  # the build directory BCC compiles against
    headers_version: str | None  # what the headers were generated for
    kernel: dict[str, int | None]  # struct.member -> BTF byte offset
    compiled: dict[str, int] = field(default_factory=dict)  # struct.member -> headers offset
    error: str | None = None  # the probe did not compile: no headers offsets known

    @property
    def mismatches(self) -> list[Mismatch]:
        if self.error is not None:
            return []
        return [Mismatch(f, self.compiled.get(f), self.kernel.get(f)) for f in FIELDS
                if self.compiled.get(f) != self.kernel.get(f)]

    @property
    def ok(self) -> bool:
        """Every measured member sits where the running kernel has it."""
        return self.error is None and not self.mismatches

    def for_struct(self, name: str) -> list[Mismatch]:
        return [m for m in self.mismatches if m.field.split(".")[0] == name]

    def summary(self) -> str:
        """One sentence for status, compliance and setup."""
        hv = f" (generated for {self.headers_version})" if self.headers_version else ""
        if self.error is not None:
            return (f"kernel headers {self.headers}{hv} could not be measured against kernel "
                    f"{self.release}: {self.error}")
        if self.ok:
            return (f"kernel headers {self.headers}{hv} match kernel {self.release}'s BTF "
                    f"({len(FIELDS)} struct members compared)")
        bad = self.mismatches
        shown = "; ".join(str(m) for m in bad[:3])
        return (f"kernel headers {self.headers}{hv} are not kernel {self.release}'s: "
                f"{len(bad)} of {len(FIELDS)} struct members differ ({shown}): BCC programs "
                "that read kernel structs read the wrong bytes")


def kernel_offsets(btf_path: str = btf.VMLINUX_BTF) -> dict[str, int | None]:
    with open(btf_path, "rb") as f:
        found = btf.field_offsets(f.read(), FIELDS)
    return {k: (None if m is None or m.bitfield else m.offset) for k, m in found.items()}


@dataclass
class _Lazy:
    path: str = btf.VMLINUX_BTF
    names: frozenset[str] | None = None


_STRUCT_NAMES = _Lazy()


def kernel_struct_names(btf_path: str = btf.VMLINUX_BTF) -> frozenset[str]:
    """Every named struct and union of the running kernel (cached per process)."""
    if _STRUCT_NAMES.names is None or _STRUCT_NAMES.path != btf_path:
        with open(btf_path, "rb") as f:
            _STRUCT_NAMES.names = frozenset(btf.Types(f.read()).structs)
        _STRUCT_NAMES.path = btf_path
    return _STRUCT_NAMES.names


def decode_probe(values: list[int], magic: int) -> dict[str, int]:
    """Offsets from the probe's 64-bit constants: (magic << 48) | (index << 32) | offset,
    in any order (the compiler may reorder or re-form the stores)."""
    out: dict[str, int] = {}
    for v in values:
        if (v >> 48) & 0xFFFF == magic:
            i = (v >> 32) & 0xFFFF
            if i < len(FIELDS):
                out[FIELDS[i]] = v & 0xFFFFFFFF
    return out


def load_cached(state_dir: str, key: str | None = None) -> HeaderFacts | None:
    """The cached measurement if it is for `key` (default: this host now), else None."""
    path = os.path.join(state_dir, CACHE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        # Only our own (or root's) measurement: a root apply must not take a verdict that the
        # unprivileged resident, which can write the state dir, left there.
        if (not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CACHE_BYTES
                or st.st_uid not in (0, os.geteuid()) or st.st_nlink != 1):
            return None
        # Written by root or by this user, never by another (measured: the service user's
        # forged "compiled == kernel" made root's apply accept a BCC spec reading task_struct
        # at 6.1 offsets on 6.18, and status say "match"). Under systemd the apply and the
        # resident share the loaderd uid: there the cache stays as trusted as the state dir.
        if st.st_uid not in (0, os.geteuid()) or st.st_nlink != 1:
            return None
        raw = os.read(fd, MAX_CACHE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
        if data.pop("version", None) != CACHE_VERSION:
            return None
        facts = HeaderFacts(**data)
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in facts.compiled.values())
        if not (isinstance(facts.key, str) and isinstance(facts.kernel, dict) and ints):
            return None
    except (ValueError, TypeError):
        return None
    if facts.key != (key or cache_key()):
        return None
    return facts


def save_cached(state_dir: str, facts: HeaderFacts) -> bool:
    """Write the cache atomically; False (nothing written) where the state dir is not ours."""
    path = os.path.join(state_dir, CACHE)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except OSError:
        return False
    try:
        try:
            data = memoryview(json.dumps({"version": CACHE_VERSION, **asdict(facts)},
                                         sort_keys=True).encode())
            while data:  # a short write (disk full) is retried, then fails: never truncated
                data = data[os.write(fd, data):]
            os.fchmod(fd, 0o644)  # facts about the host, readable by status as any user
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:  # ENOSPC and the like: a cache not written is measured again next time
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    return True


def describe(state_dir: str) -> tuple[str, str]:
    """("match" | "mismatch" | "version-mismatch" | "unmeasured" | "unknown", one sentence)
    for status and compliance: the cached measurement, else what the headers' version says."""
    facts = load_cached(state_dir)
    if facts is not None:
        if facts.error is not None:
            return "unknown", facts.summary()
        return ("match" if facts.ok else "mismatch"), facts.summary()
    rel = release()
    build, _ = headers_dirs(rel)
    version = headers_version(build)
    if version is None:
        return "unknown", f"no kernel headers at {build} (BCC programs cannot compile)"
    later = ("their struct offsets are measured against BTF when a BCC spec reads kernel "
             "structs, and the verdict is kept for status")
    if version != rel:
        return "version-mismatch", (f"kernel headers {build} were generated for {version}, "
                                    f"not the running {rel}: BCC struct reads are suspect; "
                                    f"{later}")
    return "unmeasured", f"kernel headers {build} were generated for {rel}; {later}"
