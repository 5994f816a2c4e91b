"""Perf events handed from the privileged apply to the capability-free resident.

A perf_event_array is read through one CPU-wide BPF_OUTPUT perf event per CPU, and opening
those needs CAP_PERFMON, which the packaged resident (`loaderd run --no-apply`, empty bounding
set) never has. So loaderd-apply.service opens them after every apply and sends them, with
SCM_RIGHTS, in one datagram to `<state_dir>/handover.sock`. systemd holds that socket
(loaderd-handover.socket, passed to loaderd.service), so a datagram sent while the resident is
not yet running (every start: the apply runs first) waits in the socket for it. Reading them
needs no capability: the resident mmaps each event, writes it into its CPU's map slot with its
own map fd (the kernel clears a slot when the map file that wrote it is closed, so the slots
must be the long-lived reader's) and enables it.

Why not systemd's fd store: FDSTORE=1 is attributed by the sender's pid (kernel-checked
SCM_CREDENTIALS; faking another pid needs CAP_SYS_ADMIN), so the apply unit cannot put fds into
loaderd.service's store, and a store only reaches a service when it (re)starts, while a perf
buffer added by a reload must be read at once.

The resident trusts nothing in a datagram it did not check: the sender's uid (kernel-verified
credentials: root or the resident's own user), the header's exact shape, one fd per CPU named,
every fd a perf event (/proc/self/fd) and the map id equal to that of the pin it reads. Every
fd of a refused datagram is closed.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from loaderd.bpf import kernel
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import NAME_RE

SOCKET = "handover.sock"  # in the state directory
MAGIC = "loaderd-perf-handover/1"
MAX_FDS = 253  # SCM_MAX_FD: the kernel's limit of fds in one message
MAX_HEADER = 64 * 1024
MAX_CPU = 8192


@dataclass(frozen=True)
class PerfEvents:
    """One perf_event_array's per-CPU BPF_OUTPUT events (fds owned by whoever holds this)."""

    spec: str
    map: str
    map_id: int
    events: tuple[tuple[int, int], ...]  # (cpu, perf event fd)

    def close(self) -> None:
        for _cpu, fd in self.events:
            with contextlib.suppress(OSError):
                os.close(fd)


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET)


def open_events(spec: str, map_name: str, map_fd: int, where: str) -> PerfEvents:
    """The sender's side (needs CAP_PERFMON): one disabled BPF_OUTPUT event per online CPU
    that has a slot in the map. The receiver enables them once they are in the slots."""
    info = kernel.map_info(map_fd)
    if info.type != kernel.MAP_TYPES["perf_event_array"]:
        raise LoaderdError(Kind.KERNEL, f"not a perf event array but a {info.type_name} map",
                           Location(where))
    opened: list[tuple[int, int]] = []
    try:
        for cpu in kernel.online_cpus():
            if cpu < info.max_entries:
                opened.append((cpu, kernel.perf_event_open_output(cpu)))
    except LoaderdError as exc:
        PerfEvents(spec, map_name, info.id, tuple(opened)).close()
        exc.location = Location(where)
        raise
    return PerfEvents(spec, map_name, info.id, tuple(opened))


def send(path: str, items: Iterable[PerfEvents]) -> int:
    """Send `items` to the socket at `path` (a datagram per MAX_FDS fds), never blocking: a
    socket nobody drains refuses with EAGAIN. Returns the datagrams sent; the caller closes
    its fds afterwards (the datagram holds its own references)."""
    batches: list[list[PerfEvents]] = [[]]
    for item in items:
        if len(item.events) > MAX_FDS:
            raise LoaderdError(Kind.KERNEL, f"{len(item.events)} CPUs: more perf events than "
                               f"one message carries ({MAX_FDS})", Location(path))
        if sum(len(i.events) for i in batches[-1]) + len(item.events) > MAX_FDS:
            batches.append([])
        batches[-1].append(item)
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        for batch in batches:
            if not batch:
                continue
            header = json.dumps({"magic": MAGIC, "maps": [
                {"spec": i.spec, "map": i.map, "map_id": i.map_id,
                 "cpus": [cpu for cpu, _fd in i.events]} for i in batch]}).encode()
            fds = array.array("i", [fd for i in batch for _cpu, fd in i.events])
            try:
                sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
                              socket.MSG_DONTWAIT, path)
            except OSError as exc:
                why = {11: "nobody drains it (queue full)", 111: "nobody listens on it",
                       2: "it does not exist"}.get(exc.errno or 0, exc.strerror or str(exc))
                raise LoaderdError(Kind.STATE, f"cannot hand perf events to the resident: "
                                   f"{why}", Location(path)) from None
            sent += 1
    return sent


def listening(path: str) -> bool:
    """A socket is bound at `path` (the resident's, or systemd's for it)."""
    try:
        return stat.S_ISSOCK(os.stat(path, follow_symlinks=False).st_mode)
    except OSError:
        return False


def bind(path: str) -> socket.socket:
    """The resident's own socket when systemd passed none (`loaderd run` outside the units):
    mode 0600, credentials on (set before any datagram can arrive: the kernel attaches the
    sender's only if the receiver asks for them when it is sent)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                         | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path, follow_symlinks=False).st_mode):
                os.unlink(path)  # a socket a previous resident left
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
    except OSError:
        sock.close()
        raise
    return sock


def adopt(fd: int) -> socket.socket:
    """The socket systemd passed (LISTEN_FDS): must be an AF_UNIX datagram socket."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_DGRAM:
        sock.detach()
        raise ValueError("not an AF_UNIX datagram socket")
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return sock


def _is_perf_event(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[perf_event]"
    except OSError:
        return False


def _parse(header: bytes, nfds: int) -> list[tuple[str, str, int, list[int]]]:
    """The header's maps, or ValueError: exact keys, loaderd's names, one fd per CPU named."""
    try:
        d = json.loads(header)
    except ValueError:
        raise ValueError("not a loaderd handover header (not JSON)") from None
    if not isinstance(d, dict) or set(d) != {"magic", "maps"} or d["magic"] != MAGIC:
        raise ValueError("not a loaderd handover header")
    maps = d["maps"]
    if not isinstance(maps, list) or not maps:
        raise ValueError("no maps")
    out = []
    for m in maps:
        if not isinstance(m, dict) or set(m) != {"spec", "map", "map_id", "cpus"}:
            raise ValueError("a map entry of another shape")
        spec, name, map_id, cpus = m["spec"], m["map"], m["map_id"], m["cpus"]
        if not (isinstance(spec, str) and NAME_RE.fullmatch(spec) and isinstance(name, str)
                and NAME_RE.fullmatch(name)):
            raise ValueError("a spec or map name that is not loaderd's")
        if type(map_id) is not int or not 0 < map_id < 1 << 32:
            raise ValueError("a map id out of range")
        if (not isinstance(cpus, list) or not cpus or len(set(cpus)) != len(cpus)
                or any(type(c) is not int or not 0 <= c < MAX_CPU for c in cpus)):
            raise ValueError("a CPU list that is not distinct CPU numbers")
        out.append((spec, name, map_id, cpus))
    if sum(len(m[3]) for m in out) != nfds:
        raise ValueError(f"{nfds} fds for {sum(len(m[3]) for m in out)} CPUs named")
    return out


@dataclass(frozen=True)
class Received:
    items: tuple[PerfEvents, ...]
    refused: tuple[str, ...]  # why a datagram was dropped (its fds closed)


def receive(sock: socket.socket, owners: frozenset[int]) -> Received:
    """Every datagram waiting now. owners: the uids a sender may have (kernel-verified)."""
    items: list[PerfEvents] = []
    refused: list[str] = []
    creds_size = struct.calcsize("iII")
    while True:
        try:
            data, anc, flags, _addr = sock.recvmsg(
                MAX_HEADER, socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(creds_size))
        except (BlockingIOError, InterruptedError):
            break
        fds: list[int] = []
        uid: int | None = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % 4])
                fds += list(got)
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                _pid, uid, _gid = struct.unpack("iII", payload[:creds_size])
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("truncated (too long or too many fds)")
            if uid is None or uid not in owners:
                raise ValueError(f"sent by uid {uid}, not by root or the resident's user")
            parsed = _parse(data, len(fds))
            if not all(_is_perf_event(fd) for fd in fds):
                raise ValueError("an fd that is not a perf event")
        except (ValueError, TypeError, RecursionError) as exc:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            refused.append(str(exc) if isinstance(exc, ValueError) else "not JSON")
            continue
        at = 0
        for spec, name, map_id, cpus in parsed:
            items.append(PerfEvents(spec, name, map_id, tuple(zip(cpus, fds[at:at + len(cpus)],
                                                                  strict=True))))
            at += len(cpus)
    return Received(tuple(items), tuple(refused))
