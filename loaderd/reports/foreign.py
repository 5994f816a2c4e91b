"""System-wide audit: BPF programs and maps loaderd did not load, and bursts of loads.

Enumerating every object (`BPF_PROG_GET_NEXT_ID`, `*_GET_FD_BY_ID`) needs CAP_SYS_ADMIN, so
this runs from a short-lived unit (loaderd-audit.service, on a timer), never in the daemon.
"Ours" means: an id in the manifest, an object pinned under loaderd's bpffs root (an apply in
progress has staged pins the manifest does not list yet), or a map one of those programs uses.

Each foreign program code (type, name, tag) and each burst is journaled once (priority 2),
when first seen: what was seen is kept in `<state_dir>/sysaudit.json`, so a timer run does not
re-alert on the copies of its cgroup programs systemd loads for every unit start. Bursts come
from the programs' load times: only programs still loaded are visible, so a load-and-unload
storm between two runs leaves no trace here.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Iterable
from typing import Any

from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import kernel
from loaderd.errors import Kind, LoaderdError, plural
from loaderd.observe.status import View, map_facts, prog_facts
from loaderd.store.manifest import Manifest
from loaderd.store.statedir import service_uid

BASELINE = "sysaudit.json"
FOREIGN_EVENT = Event.FOREIGN_LOAD

# systemd's own cgroup programs (systemd 252: bpf-firewall.c for IPAddressDeny=/IPAccounting=,
# bpf-devices.c for DevicePolicy=/DeviceAllow= and the PrivateDevices= it implies,
# bpf-socket-bind.c for SocketBindDeny=, restrict-ifaces.c for RestrictNetworkInterfaces=):
# (type, name) -> the hook systemd attaches it to. loaderd's own units set IPAddressDeny= and
# PrivateDevices=, so a clean install has these loaded for loaderd-audit.service itself.
# A name alone is a claim: a program counts as systemd's only if it is also created by uid 0
# and attached at that hook to the cgroup of a unit (scan(): BPF_PROG_QUERY on each cgroup).
SYSTEMD_PROGRAMS: dict[tuple[str, str], str] = {
    ("cgroup_skb", "sd_fw_ingress"): "cgroup_inet_ingress",
    ("cgroup_skb", "sd_fw_egress"): "cgroup_inet_egress",
    ("cgroup_device", "sd_devices"): "cgroup_device",
    ("cgroup_sock_addr", "sd_bind4"): "cgroup_inet4_bind",
    ("cgroup_sock_addr", "sd_bind6"): "cgroup_inet6_bind",
    ("cgroup_skb", "sd_restrictif_i"): "cgroup_inet_ingress",
    ("cgroup_skb", "sd_restrictif_e"): "cgroup_inet_egress",
}
UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".slice")


def _cgroup2_root() -> str | None:
    """Where this mount namespace has the cgroup2 hierarchy (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified on a hybrid host): the last cgroup2 mount listed, since a later
    mount covers an earlier one (a container's own /sys/fs/cgroup over the host's unified)."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                if parts[sep + 1] == "cgroup2" and os.path.isdir(parts[4]):
                    found = parts[4]
    except (OSError, ValueError, IndexError):
        pass
    return found


def _unit_attachments(notes: list[str]) -> dict[tuple[int, str], str]:
    """(program id, hook) -> the unit whose cgroup it is attached to, for the hooks systemd
    uses, over every unit cgroup (a read-only walk, no symlinks)."""
    root = _cgroup2_root()
    found: dict[tuple[int, str], str] = {}
    if root is None:
        return found
    hooks = sorted(set(SYSTEMD_PROGRAMS.values()))
    denied = 0
    for dirpath, _dirs, _files in os.walk(root):
        unit = os.path.basename(dirpath)
        if not unit.endswith(UNIT_SUFFIXES):
            continue
        try:
            fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for hook in hooks:
                try:
                    ids = kernel.prog_query(fd, kernel.ATTACH_TYPES[hook]).prog_ids
                except LoaderdError:
                    denied += 1
                    continue
                for pid in ids:
                    found[(pid, hook)] = unit
        finally:
            os.close(fd)
    if denied:
        notes.append(f"{plural(denied, 'cgroup query', 'cgroup queries')} refused "
                     "(BPF_PROG_QUERY needs CAP_NET_ADMIN or CAP_SYS_ADMIN): systemd's "
                     "programs there count as foreign")
    return found


def _systemds(programs: list[dict[str, Any]], attached: dict[tuple[int, str], str]
              ) -> list[dict[str, Any]]:
    """systemd's own programs among `programs`: systemd's name and type, created by uid 0,
    and attached at that hook to a unit's cgroup - or the same code (type, name, tag) as one
    that is: systemd keeps a unit's programs loaded after its cgroup is gone (a finished
    RemainAfterExit= oneshot) and loads the next copy before it frees the last (measured on
    systemd 252: unattached sd_fw_*/sd_devices copies between unit starts)."""
    candidates = [p for p in programs
                  if (p["type"], p["name"]) in SYSTEMD_PROGRAMS and p["uid"] == 0]
    units: dict[int, str] = {}
    for p in candidates:
        unit = attached.get((p["id"], SYSTEMD_PROGRAMS[(p["type"], p["name"])]))
        if unit is not None:
            units[p["id"]] = unit
    attached_code = {_code_print(p): units[p["id"]] for p in candidates if p["id"] in units}
    out = []
    for p in candidates:
        unit = units.get(p["id"])
        if unit is None and _code_print(p) in attached_code:
            unit = f"(not attached; the code on {attached_code[_code_print(p)]})"
        if unit is not None:
            out.append({"id": p["id"], "type": p["type"], "name": p["name"], "tag": p["tag"],
                        "unit": unit})
    return out


def _ids_from_manifest(m: Manifest | None) -> tuple[set[int], set[int], set[int]]:
    progs: set[int] = set()
    maps: set[int] = set()
    links: set[int] = set()
    for entry in (m.specs.values() if m else ()):
        progs |= {p.id for p in entry.programs.values()}
        maps |= {x.id for x in entry.maps.values()}
        links |= {lk.id for lk in entry.links.values()}
    return progs, maps, links


def _pinned_ids(root: str) -> tuple[set[int], set[int]]:
    """Program and map ids pinned under loaderd's root (read-only walk, no symlinks)."""
    progs: set[int] = set()
    maps: set[int] = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            kind = os.path.basename(dirpath)
            try:
                fd = kernel.obj_get(path, rdonly=kind == "maps")
            except LoaderdError:
                continue
            try:
                if kind == "progs":
                    progs.add(kernel.prog_info(fd).id)
                elif kind == "maps":
                    maps.add(kernel.map_info(fd).id)
                elif kind == "links":
                    progs.add(kernel.link_info(fd).prog_id)
            except LoaderdError:
                pass
            finally:
                os.close(fd)
    return progs, maps


def _programs() -> list[dict[str, Any]]:

    out = []
    for pid in kernel.prog_ids():
        try:
            fd = kernel.prog_fd_by_id(pid)
        except LoaderdError:
            continue  # unloaded between NEXT_ID and GET_FD_BY_ID
        try:
            out.append(prog_facts(fd))
        finally:
            os.close(fd)
    return out


def _maps() -> list[dict[str, Any]]:

    out = []
    for mid in kernel.map_ids():
        try:
            fd = kernel.map_fd_by_id(mid)
        except LoaderdError:
            continue
        try:
            out.append(map_facts(fd))
        finally:
            os.close(fd)
    return out


def bursts(programs: Iterable[dict[str, Any]], threshold: int, window: float
           ) -> list[dict[str, Any]]:
    """Runs of loads where more than `threshold` fall within `window` seconds of each other.

    Every program inside some over-threshold window is marked; marked programs closer than
    `window` to the previous one form one burst.
    """
    loads = sorted((float(p["loaded_at"]), int(p["id"])) for p in programs)
    marked = [False] * len(loads)
    lo = 0
    for hi in range(len(loads)):
        while loads[hi][0] - loads[lo][0] > window:
            lo += 1
        if hi - lo + 1 > threshold:
            for i in range(lo, hi + 1):
                marked[i] = True
    out: list[dict[str, Any]] = []
    for (at, pid), hit in zip(loads, marked, strict=True):
        if not hit:
            continue
        if out and at - out[-1]["last"] <= window:
            out[-1]["last"] = at
            out[-1]["prog_ids"].append(pid)
        else:
            out.append({"first": at, "last": at, "prog_ids": [pid]})
    for b in out:
        b["count"] = len(b["prog_ids"])
    return out


def _baseline_path(state_dir: str) -> str:
    return os.path.join(state_dir, BASELINE)


MAX_BASELINE_BYTES = 4 * 1024 * 1024


def _load_baseline(state_dir: str, notes: list[str] | None = None) -> dict[str, set[str]]:
    """What earlier runs saw. The state dir is the service user's: opened without following a
    symlink or blocking on a FIFO (measured: a FIFO hung the audit for good), a regular file
    of bounded size; anything else counts as no baseline (every finding is new: fail loud)."""
    empty: dict[str, set[str]] = {"foreign_programs": set(), "burst_programs": set()}
    path = _baseline_path(state_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return empty
    except OSError as exc:
        return _no_baseline(empty, notes, path, exc.strerror or str(exc))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BASELINE_BYTES:
            return _no_baseline(empty, notes, path, "not a regular file of at most "
                                f"{MAX_BASELINE_BYTES} bytes")
        raw = os.read(fd, MAX_BASELINE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
        return {k: {str(v) for v in data.get(k, [])} for k in empty}
    except (ValueError, AttributeError, TypeError, RecursionError) as exc:
        return _no_baseline(empty, notes, path, f"malformed ({type(exc).__name__})")


def _no_baseline(empty: dict[str, set[str]], notes: list[str] | None, path: str,
                 why: str) -> dict[str, set[str]]:
    if notes is not None:
        notes.append(f"baseline {path} refused ({why}): every foreign program and burst is "
                     "reported as new; it is replaced by this run's")
    return empty


def _save_baseline(state_dir: str, seen: dict[str, set[str]]) -> str | None:
    """0600, owned by the state dir's owner (the service user) whoever runs this: a root
    `loaderctl audit-system` left it root's, and loaderd-audit.service (user loaderd) could
    then not read it and re-reported every foreign program as new."""
    path = _baseline_path(state_dir)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        owner = service_uid(state_dir)
        if owner >= 0:
            try:
                os.fchown(fd, owner, -1)
            except OSError:
                os.close(fd)
                raise
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"written_at": time.time(), **{k: sorted(v) for k, v in seen.items()}},
                      f)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return f"baseline not saved ({path}: {exc.strerror}): every run reports all as new"
    return None


def _code_print(p: dict[str, Any]) -> str:
    """What a foreign program *is*: the same code (tag) under the same name and type is not
    new. systemd loads fresh copies of its cgroup programs (sd_devices, sd_fw_*) for every unit
    start, including this audit's own: alerting per id would alert on every run."""
    return f"{p['type']}:{p['name']}:{p['tag']}"


def _load_print(p: dict[str, Any]) -> str:
    return f"{p['id']}:{p['tag']}"  # one load (ids are recycled eventually; id+tag is not)


def scan(manifest: Manifest | None, bpffs_root: str,
         notes: list[str] | None = None) -> dict[str, Any]:
    """Every program and map, split into loaderd's, systemd's own cgroup programs (and their
    maps) and foreign (CAP_SYS_ADMIN)."""
    try:
        programs = _programs()
        maps = _maps()
    except kernel.KernelError as exc:
        raise LoaderdError(Kind.CAPABILITY, f"cannot enumerate BPF objects: {exc.message}",
                           allowed="run as root or with CAP_SYS_ADMIN (loaderd-audit.service)"
                           ) from None
    m_progs, m_maps, _links = _ids_from_manifest(manifest)
    pin_progs, pin_maps = _pinned_ids(bpffs_root)
    ours = m_progs | pin_progs
    our_maps = m_maps | pin_maps
    for p in programs:
        if p["id"] in ours:
            our_maps |= set(p["map_ids"])
    others = [p for p in programs if p["id"] not in ours]
    systemd = _systemds(others, _unit_attachments(notes if notes is not None else []))
    theirs = {p["id"] for p in systemd}
    for p in others:
        if p["id"] in theirs:
            our_maps |= set(p["map_ids"])  # its firewall/accounting maps are systemd's too
    foreign_progs = [p for p in others if p["id"] not in theirs]
    foreign_maps = [m for m in maps if m["id"] not in our_maps]
    return {"programs": len(programs), "maps": len(maps), "loaderd_programs": sorted(ours),
            "systemd_programs": systemd, "foreign_programs": foreign_progs,
            "foreign_maps": foreign_maps, "all_programs": programs}


def run(view: View, *, burst: int, window: float, baseline: bool = True) -> dict[str, Any]:
    """Scan, mark what is new since the last run, journal new findings, save the baseline."""
    if burst < 1 or window <= 0:
        raise LoaderdError(Kind.SEMANTIC, "burst must be >= 1 and window > 0",
                           value=(burst, window))
    notes = list(view.notes)
    report = scan(view.manifest, view.settings.bpffs_root, notes)
    if view.manifest is None:
        notes.append(view.manifest_note or "no manifest: only pinned objects count as loaderd's")
    seen = (_load_baseline(view.settings.state_dir, notes) if baseline
            else {"foreign_programs": set(), "burst_programs": set()})
    new = []
    for p in report["foreign_programs"]:
        p["new"] = _code_print(p) not in seen["foreign_programs"]
        if p["new"]:
            new.append(p)
            audit.emit(FOREIGN_EVENT, f"foreign BPF program id {p['id']} ({p['type']} "
                       f"'{p['name']}', tag {p['tag']}) loaded by uid {p['uid']} at "
                       f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(p['loaded_at']))}; "
                       "loaderd did not load it", audit="foreign_program", prog_id=p["id"],
                       prog_tag=p["tag"], prog_type=p["type"], prog_name=p["name"],
                       created_by_uid=p["uid"], loaded_at=p["loaded_at"])
    # systemd loads its programs in bursts of its own (every unit start at boot): not a burst
    # of anyone else's loads.
    systemds = {p["id"] for p in report["systemd_programs"]}
    everything = [p for p in report.pop("all_programs") if p["id"] not in systemds]
    prints = {p["id"]: _load_print(p) for p in everything}
    found = bursts(everything, burst, window)
    in_bursts: set[str] = set()
    for b in found:
        members = {prints[i] for i in b["prog_ids"]}
        in_bursts |= members
        b["new"] = bool(members - seen["burst_programs"])  # alert once per burst
        if b["new"]:
            audit.emit(FOREIGN_EVENT, "burst of BPF program loads: "
                       f"{plural(b['count'], 'program')} "
                       f"loaded within {b['last'] - b['first']:.1f}s (threshold: more than "
                       f"{burst} in {window:g}s)", audit="load_burst", count=b["count"],
                       prog_ids=b["prog_ids"], window=window, threshold=burst)
    if baseline:
        note = _save_baseline(view.settings.state_dir, {
            "foreign_programs": seen["foreign_programs"]
            | {_code_print(p) for p in report["foreign_programs"]},
            "burst_programs": in_bursts})
        if note:
            notes.append(note)
    new_bursts = [b for b in found if b["new"]]
    report.update(bursts=found, new_foreign_programs=[p["id"] for p in new],
                  threshold={"burst": burst, "window": window}, notes=notes,
                  findings=bool(new or new_bursts))
    audit.emit(Event.DAEMON, f"system audit: {plural(report['programs'], 'program')}, "
               f"{plural(report['maps'], 'map')}; systemd's own: "
               f"{plural(len(report['systemd_programs']), 'program')}; foreign: "
               f"{plural(len(report['foreign_programs']), 'program')} ({len(new)} new), "
               f"{plural(len(report['foreign_maps']), 'map')}; "
               f"{plural(len(found), 'load burst')} ({len(new_bursts)} new)", audit="system",
               foreign=len(report["foreign_programs"]), new=len(new), bursts=len(found))
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['programs']} programs, {report['maps']} maps; loaderd owns "
             f"{len(report['loaderd_programs'])} programs"]
    sd = report["systemd_programs"]
    units = sorted({p["unit"] for p in sd if not p["unit"].startswith("(")})
    lines.append(f"systemd's own cgroup programs: {len(sd)}" + (
        f" (attached to {', '.join(units[:5])}{', ...' if len(units) > 5 else ''})"
        if units else ""))
    fp = report["foreign_programs"]
    lines.append(f"foreign programs: {len(fp)} ({len(report['new_foreign_programs'])} new)")
    for p in fp:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["loaded_at"]))
        lines.append(f"  {'NEW ' if p['new'] else '    '}id {p['id']:<6} {p['type']:<16} "
                     f"{p['name'] or '-':<16} tag {p['tag']} uid {p['uid']} loaded {when}")
    lines.append(f"foreign maps: {len(report['foreign_maps'])}")
    for m in report["foreign_maps"]:
        lines.append(f"      id {m['id']:<6} {m['type']:<16} {m['name'] or '-'}")
    th = report["threshold"]
    lines.append(f"load bursts (more than {th['burst']} in {th['window']:g}s): "
                 f"{len(report['bursts'])}")
    for b in report["bursts"]:
        first, last = (time.strftime("%H:%M:%S", time.localtime(b[k])) for k in ("first", "last"))
        lines.append(f"  {'NEW ' if b['new'] else '    '}{b['count']} loads {first}..{last}: "
                     f"ids {', '.join(map(str, b['prog_ids']))}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
