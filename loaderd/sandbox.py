"""Kernel-enforced confinement of a process: Landlock (path-based access control, no privileges
needed), no_new_privs and resource limits. A small ctypes wrapper of the three syscalls.

Landlock confines the calling thread and everything it starts afterwards, for good: once
`confine()` returned, no open() outside the allowed trees succeeds, whatever the process does,
root included. Already-open file descriptors are not affected (close what the confined code must
not use before confining). ABI versions add access rights; a ruleset may only name the rights
the running kernel knows, so the handled masks are chosen per ABI:

    ABI 1 (5.13)  13 filesystem rights (execute, read/write files, read dirs, remove, make_*)
    ABI 2 (5.19)  + REFER (link/rename across directories)
    ABI 3 (6.2)   + TRUNCATE
    ABI 4 (6.7)   + TCP bind/connect (network rights)
    ABI 5 (6.10)  + IOCTL_DEV
    ABI 6 (6.12)  + scopes: abstract unix sockets, signals to processes outside the domain
    ABI 7 (6.15)  audit logging flags (no new rights)

Everything a ruleset handles is denied unless a rule allows it beneath some path; what it does
not handle (e.g. REFER on ABI 1) is not governed by Landlock at all. A kernel without Landlock
(ENOSYS: not built; EOPNOTSUPP: built but not enabled at boot) is reported, not raised: the
callers decide whether that is degraded or fatal.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import resource
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass

# syscall numbers: the same on every architecture that has Landlock (asm-generic table), x86_64
# included.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

# LANDLOCK_ACCESS_FS_*
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8  # also what BPF_OBJ_PIN needs: a pin is made through the mknod hook
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
# LANDLOCK_ACCESS_NET_* (ABI 4) and LANDLOCK_SCOPE_* (ABI 6)
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

_FS_V1 = (1 << 13) - 1
# Rights that make sense on a file (not a directory): a rule on a file may hold only these.
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

# What callers grant. READ: open files for reading, list directories (no execve: nothing the
# confined code runs needs to start a program). WRITE: a private scratch tree: create, write,
# remove regular files, directories and symlinks; never device nodes, FIFOs or sockets (a block
# device node made in a writable dir would read the raw disk).
READ = READ_FILE | READ_DIR
WRITE = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM
         | REFER | TRUNCATE)


def handled_fs(abi: int) -> int:
    """Every filesystem right the kernel of this ABI knows (all are handled: deny by default)."""
    if abi < 1:
        return 0
    mask = _FS_V1
    if abi >= 2:
        mask |= REFER
    if abi >= 3:
        mask |= TRUNCATE
    if abi >= 5:
        mask |= IOCTL_DEV
    return mask


def handled_net(abi: int) -> int:
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def scoped(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


def ruleset_attr(abi: int) -> bytes:
    """struct landlock_ruleset_attr, as long as this ABI knows it (the kernel refuses unknown
    trailing fields that are non-zero, and older kernels a longer struct)."""
    if abi >= 6:
        return struct.pack("=QQQ", handled_fs(abi), handled_net(abi), scoped(abi))
    if abi >= 4:
        return struct.pack("=QQ", handled_fs(abi), handled_net(abi))
    return struct.pack("=Q", handled_fs(abi))


def rule_access(abi: int, wanted: int, *, is_dir: bool) -> int:
    """A rule's allowed_access: what is wanted, limited to what the ABI handles (the kernel
    refuses a right it does not handle) and, for a file, to file rights."""
    mask = wanted & handled_fs(abi)
    return mask if is_dir else mask & FILE_RIGHTS


def path_beneath_attr(access: int, fd: int) -> bytes:
    """struct landlock_path_beneath_attr (packed: u64 allowed_access, s32 parent_fd)."""
    return struct.pack("=Qi", access, fd)


@dataclass(frozen=True)
class Support:
    """What the running kernel offers. abi 0: no Landlock, `reason` says why."""

    abi: int
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.abi > 0

    def describe(self) -> str:
        if self.available:
            return f"Landlock ABI {self.abi}"
        return f"no Landlock ({self.reason})"


class SandboxError(Exception):
    """Confinement was asked for and could not be set up (not: the kernel lacks Landlock)."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(nr: int, *args: object) -> int:
    ret = int(_libc.syscall(ctypes.c_long(nr), *args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


_UNAVAILABLE = {
    errno.ENOSYS: "the kernel was built without Landlock (CONFIG_SECURITY_LANDLOCK)",
    errno.EOPNOTSUPP: "Landlock is built in but not enabled at boot (add landlock to lsm=)",
    errno.EPERM: "the Landlock system calls are denied by a seccomp filter (a unit's "
                 "SystemCallFilter= must list landlock_create_ruleset landlock_add_rule "
                 "landlock_restrict_self)",
}


@functools.lru_cache(maxsize=1)
def probe() -> Support:
    """The running kernel's Landlock ABI version (landlock_create_ruleset with the VERSION
    flag), or why there is none."""
    if platform.machine() not in ("x86_64", "aarch64", "riscv64", "loongarch64"):
        return Support(0, f"no Landlock syscall numbers known for {platform.machine()}")
    try:
        return Support(_syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                                ctypes.c_uint32(CREATE_RULESET_VERSION)))
    except OSError as exc:
        return Support(0, _UNAVAILABLE.get(exc.errno or 0, f"landlock_create_ruleset: "
                                           f"{exc.strerror}"))


def no_new_privs() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS): required by landlock_restrict_self without CAP_SYS_ADMIN,
    and no setuid program started later can gain privileges."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


@dataclass(frozen=True)
class Rule:
    path: str
    access: int  # READ or WRITE (or any LANDLOCK_ACCESS_FS_* mask)


def confine(rules: Iterable[Rule], support: Support | None = None) -> list[str]:
    """Restrict this thread (and every process it starts) to `rules`; everything else on the
    filesystem is denied, as are TCP bind/connect (ABI >= 4), abstract unix sockets and
    signals outside the domain (ABI >= 6). Paths that do not exist are skipped and returned
    (nothing can be opened there anyway). Raises SandboxError if Landlock is unavailable or
    refuses the ruleset."""
    support = support or probe()
    if not support.available:
        raise SandboxError(support.describe())
    abi = support.abi
    attr = ruleset_attr(abi)
    try:
        ruleset = _syscall(SYS_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)),
                           ctypes.c_uint32(0))
    except OSError as exc:
        raise SandboxError(f"landlock_create_ruleset: {exc.strerror}") from None
    skipped: list[str] = []
    try:
        for rule in rules:
            try:
                fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
            except (FileNotFoundError, PermissionError):  # nothing can be read there anyway
                skipped.append(rule.path)  # (e.g. /lib/modules under ProtectKernelModules=)
                continue
            except OSError as exc:
                raise SandboxError(f"{rule.path}: {exc.strerror}") from None
            try:
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                access = rule_access(abi, rule.access, is_dir=is_dir)
                if not access:
                    continue
                beneath = path_beneath_attr(access, fd)
                _syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH),
                         beneath, ctypes.c_uint32(0))
            except OSError as exc:
                raise SandboxError(f"landlock_add_rule {rule.path}: {exc.strerror}") from None
            finally:
                os.close(fd)
        no_new_privs()
        try:
            _syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
        except OSError as exc:
            raise SandboxError(f"landlock_restrict_self: {exc.strerror}") from None
    finally:
        os.close(ruleset)
    return skipped


# --- seccomp: bpf() commands a confined compile must not issue ------------------------------
# Landlock governs opening files, and BPF_OBJ_PIN (a mknod on bpffs), but not BPF_OBJ_GET: that
# takes a path and never opens a file (measured on 6.18: a confined worker still opened an
# existing pin through BCC's BPF_TABLE_PINNED). A seccomp filter refuses these commands by
# number, whatever the path, and works without Landlock too.
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7, "riscv64": 0xC00000F3,
              "loongarch64": 0xC0000102}
BPF_OBJ_PIN, BPF_OBJ_GET = 6, 7
# Pins by path, objects by id (other programs' maps), and every attach: a compile loads,
# it never attaches (the parent does, from what the spec says).
DENIED_BPF_COMMANDS = (
    BPF_OBJ_PIN, BPF_OBJ_GET, 8, 9,  # PROG_ATTACH, PROG_DETACH
    13, 14, 30,  # PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, LINK_GET_FD_BY_ID
    17, 28, 29, 34,  # RAW_TRACEPOINT_OPEN, LINK_CREATE, LINK_UPDATE, LINK_DETACH
)
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
X32_SYSCALL_BIT = 0x40000000


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def bpf_command_filter(commands: Iterable[int], machine: str | None = None) -> bytes:
    """Classic-BPF seccomp program: bpf(cmd, ...) with cmd in `commands` fails with EPERM;
    every other system call (and every other bpf command) is allowed. The x32 ABI on x86_64
    gets EPERM for bpf() too (its numbers carry X32_SYSCALL_BIT)."""
    machine = machine or platform.machine()
    cmds = list(dict.fromkeys(commands))
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    prog = [_insn(_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
            _insn(_JEQ_K, 1, 0, AUDIT_ARCH[machine]),
            _insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # a foreign ABI: not ours to judge
            _insn(_LD_W_ABS, 0, 0, 0)]  # seccomp_data.nr
    # nr == bpf: go on to the command; nr == x32 bpf: deny; else allow.
    prog += [_insn(_JEQ_K, 3, 0, SYS_BPF[machine]),
             _insn(_JEQ_K, 1, 0, SYS_BPF[machine] | X32_SYSCALL_BIT),
             _insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW),
             _insn(_RET_K, 0, 0, deny),
             _insn(_LD_W_ABS, 0, 0, 16)]  # seccomp_data.args[0], low 32 bits (the command)
    for i, cmd in enumerate(cmds):
        # match: jump to the deny at the end; else fall through to the next comparison
        prog.append(_insn(_JEQ_K, len(cmds) - i, 0, cmd))
    prog += [_insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW), _insn(_RET_K, 0, 0, deny)]
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def deny_bpf_commands(commands: Iterable[int] = DENIED_BPF_COMMANDS) -> None:
    """Install the filter on this thread (inherited by children). Needs no_new_privs first."""
    if platform.machine() not in SYS_BPF:
        raise SandboxError(f"no bpf() syscall number known for {platform.machine()}")
    prog = bpf_command_filter(commands)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))
    if _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER),
                   ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


@dataclass(frozen=True)
class Limits:
    """Resource limits for a confined process: address space (bytes) and CPU time (seconds)."""

    address_space: int
    cpu_seconds: int


def set_limits(limits: Limits) -> None:
    """RLIMIT_AS (allocation beyond it fails: LLVM reports out of memory and aborts) and
    RLIMIT_CPU (SIGXCPU at the soft limit, SIGKILL one second later). Only ever lowered."""
    for res, value in ((resource.RLIMIT_AS, limits.address_space),
                       (resource.RLIMIT_CPU, limits.cpu_seconds)):
        _soft, hard = resource.getrlimit(res)
        extra = 1 if res == resource.RLIMIT_CPU else 0
        new_hard = value + extra if hard == resource.RLIM_INFINITY else min(hard, value + extra)
        resource.setrlimit(res, (min(value, new_hard), new_hard))
