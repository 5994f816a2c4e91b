"""Cgroup targets: a path below the cgroup2 mount, or a systemd unit's cgroup.

The cgroup2 mount is read from /proc/self/mountinfo (hybrid hosts mount it at
/sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup). A unit is resolved when the apply
runs, by what systemd leaves in the file system: its current invocation id
(/run/systemd/units/invocation:<unit>, root's) and the one root-owned cgroup directory named
after the unit, below the slices, whose `user.invocation_id` xattr is that id. No D-Bus: the
hardened apply unit runs as an unprivileged user, and `systemctl show` without a bus (a host
with no dbus-daemon) fails for anyone but root. Where that finds nothing (a hybrid host, where
systemd keeps its xattrs on its own v1 hierarchy), `systemctl show -p ControlGroup` is asked.
A unit that is not running has no cgroup, and the apply refuses it (no deferred attach); when
systemd recreates the cgroup (a restart of the unit) the old link is detached by the kernel,
drift says so, and the next apply attaches anew.
"""

from __future__ import annotations

import os
import subprocess

from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import CgroupAttach

SYSTEMD_RUNNING = "/run/systemd/system"  # sd_booted(3)
SYSTEMD_UNITS = "/run/systemd/units"  # invocation:<unit> -> the unit's current invocation id
_NOT_RUNNING = "loaderd does not defer the attach: start the unit, then apply"


def _visible(point: str, dev: str) -> bool:
    """The mount at `point` is the one mountinfo lists with `dev` (major:minor), not one
    hidden under a later mount on a parent (a container's fresh /sys/fs/cgroup)."""
    try:
        st = os.stat(point)
    except OSError:
        return False
    major, _, minor = dev.partition(":")
    return (os.major(st.st_dev), os.minor(st.st_dev)) == (int(major), int(minor))


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo", *, check_visible: bool = True
                  ) -> str:
    """Where cgroup2 is mounted (the first visible cgroup2 mount), or an error saying it is
    not."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                left, sep, right = line.partition(" - ")
                fields = left.split(" ")
                if not sep or right.split(" ", 1)[0] != "cgroup2" or len(fields) < 5:
                    continue
                point = fields[4].replace("\\040", " ")
                if not check_visible or _visible(point, fields[2]):
                    return point
    except OSError as exc:
        raise LoaderdError(Kind.ATTACH, f"cannot read {mountinfo}: {exc.strerror}") from None
    raise LoaderdError(Kind.ATTACH, "cgroup2 is not mounted (no cgroup2 line in "
                       f"{mountinfo})", allowed="mount -t cgroup2 none /sys/fs/cgroup/unified")


def unit_cgroup(unit: str) -> str:
    """The cgroup systemd runs `unit` in, relative to the cgroup2 mount."""
    if not os.path.isdir(SYSTEMD_RUNNING):
        raise LoaderdError(Kind.ATTACH, f"systemd is not running (no {SYSTEMD_RUNNING}): "
                           f"unit {unit} cannot be resolved to its cgroup", value=unit,
                           allowed="cgroup: {path: ...} below the cgroup2 mount")
    link = os.path.join(SYSTEMD_UNITS, f"invocation:{unit}")
    try:
        invocation = os.readlink(link) if os.lstat(link).st_uid == 0 else None
    except OSError:
        raise LoaderdError(Kind.ATTACH, f"unit {unit} is not running (systemd lists no "
                           f"invocation of it in {SYSTEMD_UNITS}); {_NOT_RUNNING}", value=unit,
                           allowed="a running unit (systemctl status)") from None
    mount = cgroup2_mount()
    found = _invocation_cgroup(mount, unit, invocation) if invocation else None
    if found is not None:
        return "/" + os.path.relpath(found, mount)
    return _systemctl_cgroup(unit)


def _invocation_cgroup(mount: str, unit: str, invocation: str) -> str | None:
    """The one root-owned directory named `unit` below the slices whose user.invocation_id is
    `invocation`. Directories not owned by root are a delegated subtree's (its owner could name
    one after any unit and set the xattr): never walked into, never taken."""
    hits: list[str] = []
    todo = [mount]
    while todo:
        try:
            entries = list(os.scandir(todo.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if not e.is_dir(follow_symlinks=False) or e.stat(follow_symlinks=False).st_uid:
                    continue
            except OSError:
                continue
            if e.name == unit and _xattr_id(e.path) == invocation:
                hits.append(e.path)
            if e.name.endswith(".slice"):
                todo.append(e.path)
    return hits[0] if len(hits) == 1 else None


def _xattr_id(path: str) -> str | None:
    try:
        raw = os.getxattr(path, "user.invocation_id", follow_symlinks=False)
    except OSError:
        return None
    return raw.hex() if len(raw) == 16 else raw.decode("ascii", "replace")


def _systemctl_cgroup(unit: str) -> str:
    try:
        out = subprocess.run(["systemctl", "show", "--property=ControlGroup", "--value", "--",
                              unit], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LoaderdError(Kind.ATTACH, f"cannot ask systemd for unit {unit}'s cgroup: {exc}",
                           value=unit) from None
    path = out.stdout.strip()
    if out.returncode != 0 or not path:
        why = out.stderr.strip()[:200] or "it has no cgroup"
        raise LoaderdError(Kind.ATTACH, f"unit {unit} is not running ({why}); {_NOT_RUNNING}",
                           value=unit, allowed="a running unit (systemctl status)")
    return path


def resolve(a: CgroupAttach) -> str:
    """The cgroup directory a link for `a` attaches to (it must exist)."""
    mount = cgroup2_mount()
    rel = unit_cgroup(a.unit) if a.unit else a.path or ""
    path = os.path.normpath(os.path.join(mount, rel.lstrip("/")))
    if path != mount and not path.startswith(mount.rstrip("/") + "/"):
        raise LoaderdError(Kind.ATTACH, f"{a.where}: {path} is not below the cgroup2 mount "
                           f"{mount}", value=rel)
    if not os.path.isfile(os.path.join(path, "cgroup.procs")):
        raise LoaderdError(Kind.ATTACH, f"no such cgroup: {path}", value=a.unit or a.path,
                           allowed=f"a directory below the cgroup2 mount {mount}")
    return path


def open_cgroup(path: str) -> int:
    """An fd of the cgroup directory (what BPF_LINK_CREATE takes as target_fd)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise LoaderdError(Kind.ATTACH, f"cannot open cgroup {path}: {exc.strerror}",
                           Location(file=path)) from None


def cgroup_id(path: str) -> int:
    """The kernel's id of a cgroup2 directory: its inode number (what link info reports)."""
    return os.stat(path).st_ino
