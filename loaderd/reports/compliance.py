"""`loaderctl compliance`: the security checklist as PASS/FAIL/WARN/SKIP results from facts.

Facts, not configuration: helpers are the ones recorded from each loaded program's bytecode,
re-checked against the policy in force now; freeze is read from the kernel (fdinfo of a
read-only fd on the pin); capabilities from the resident daemon's /proc status; hardening from
`systemd-analyze security` of the units the running systemd has loaded (drop-ins included), or
offline of the installed unit files when systemd is not reachable; audit events from the
journal's trusted fields (_UID, _SYSTEMD_UNIT, _COMM, _EXE: journald sets them, a client cannot).
A check that cannot see its facts SKIPs and says why. The verdict does not flatter: PASS only
when every high-severity check passed; otherwise FAIL (exit 1), WARN (exit 2) or SKIP (exit 3),
the worst high-severity status, in that order.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeAlias

from loaderd import privileges, sandbox
from loaderd.audit import log as audit
from loaderd.bpf import kernel, offsets
from loaderd.config.settings import DEFAULT_CONFIG
from loaderd.errors import LoaderdError
from loaderd.model import (
    MAP_FLAG_MASK,
    SignatureMode,
    SignatureStatus,
    kernel_map_flags,
    map_pin_mode,
)
from loaderd.observe.status import (
    MISSING,
    NO_PERMISSION,
    Recorded,
    View,
    applied_spec,
    map_facts,
    pin_facts,
    spec_report,
)
from loaderd.store.manifest import SpecRecord, Status

HIGH, MEDIUM = "high", "medium"
PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
# Every unit the package ships; loaderd-apply.service is the one that holds capabilities.
UNITS = ("loaderd.service", "loaderd-apply.service", "loaderd-audit.service")
# Measured (units/README.md): resident 0.3, apply 1.3, audit 0.8. systemd-analyze calls anything
# below 5.0 "OK", which a unit that lost half its sandbox still reaches (the apply unit without
# its SystemCallFilter= and device/kernel protections: 3.3), so the limit is ours, not its bands.
HARDENING_LIMIT = 2.0
SERVICE_USER = "loaderd"  # sysusers.d: the user every loaderd unit runs as
# Units whose processes write loaderd's audit events (_SYSTEMD_UNIT comes from the cgroup: only
# root can put a process there).
EVENT_UNITS = frozenset({"loaderd.service", "loaderd-apply.service", "loaderd-audit.service"})
JOURNAL_SCAN = 5000  # newest events with a loaderd MESSAGE_ID that check_journal reads
_JOURNAL_FIELDS = ("MESSAGE_ID", "MESSAGE", "_UID", "_PID", "_COMM", "_EXE", "_SYSTEMD_UNIT")
# What loaderd runs as: the `loaderd`/`loaderctl` scripts (comm = the script's name) or a Python
# interpreter (`python3 -m loaderd apply --child`; _EXE is the interpreter).
_LOADERD_PROGRAM = re.compile(r"(loaderd|loaderctl|python[0-9.]*|pypy[0-9.]*)")
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)")


@dataclass(frozen=True)
class Result:
    check: str
    severity: str
    status: str
    detail: str


class Skip(Exception):
    """A check cannot see its facts (permission, nothing to check)."""


Outcome = tuple[str, str]  # (status, detail)


def _specs(view: View) -> Mapping[str, SpecRecord]:
    if view.manifest is None:
        raise Skip(view.manifest_note or "no manifest")
    return view.manifest.specs


def _verdict(problems: Sequence[str], ok: str) -> Outcome:
    return (FAIL, "; ".join(problems)) if problems else (PASS, ok)


# --- checks -----------------------------------------------------------------------------------

def check_manifest(view: View) -> Outcome:
    if view.manifest is None:
        raise Skip(view.manifest_note or "no manifest")
    st = view.manifest.status
    if st is Status.PENDING:
        return FAIL, "a commit was interrupted (status pending): run `loaderd apply` to finish it"
    return PASS, f"status {st.value}, {len(view.manifest.specs)} specs"


def check_drift(view: View) -> Outcome:
    """The daemon's drift check where every pin opens; for a reader who may open only some
    (the kernel opens programs and links read-write only), status's partial check: drift in
    what it could open FAILs, the rest is a SKIP naming what it could not check."""
    problems, unchecked = [], []
    for name, entry in sorted(_specs(view).items()):
        report = spec_report(Recorded.of(entry))
        problems += [f"{name}: {d}" for d in report["drift"] or ()]
        unchecked += report["unchecked"]
    if problems or not unchecked:
        return _verdict(problems, "every pinned program, map and link matches the manifest")
    raise Skip(f"{len(unchecked)} pins cannot be opened by uid {os.getuid()} (programs and "
               "links open read-write only): no drift in what could be checked; run as root "
               "or the loaderd user for the full check")


def check_helpers(view: View) -> Outcome:
    pol = view.settings.policy
    problems, count = [], 0
    for name, entry in sorted(_specs(view).items()):
        for pname, p in sorted(entry.programs.items()):
            count += 1
            allowed = pol.helpers_for(p.type)  # the rule policy.check_calls applies
            refused = sorted(set(p.helpers) - allowed)
            if refused:
                problems.append(f"{name}/{pname} calls {', '.join(refused)}, not allowed by the "
                                "current policy")
    return _verdict(problems, f"{count} programs call only allowed helpers")


def _map_rows(view: View) -> Iterator[tuple[str, str, dict[str, Any], Any]]:
    """(spec, map, kernel facts, declared MapSpec or None) for every applied map."""
    for name, entry in sorted(_specs(view).items()):
        parsed, _why = applied_spec(view, name)
        decls = {m.name: m for m in parsed.maps} if parsed else {}
        for mname in sorted(entry.maps):
            path = os.path.join(entry.pin_dir, "maps", mname)
            facts, why = pin_facts(path, map_facts, rdonly=True)
            if facts is None:
                if why == NO_PERMISSION:
                    raise Skip(f"cannot open {path} read-only as uid {os.getuid()}")
                facts = {"missing": why or MISSING}
            yield name, mname, facts, decls.get(mname)


def check_map_limits(view: View) -> Outcome:
    limits = view.settings.policy.limits
    problems, n_maps = [], 0
    for name, mname, facts, decl in _map_rows(view):
        where = f"{name}/{mname}"
        n_maps += 1
        if "missing" in facts:
            problems.append(f"{where}: pin {facts['missing']}")
            continue
        if not 0 < facts["max_entries"] <= limits.max_entries:
            problems.append(f"{where}: max_entries {facts['max_entries']} outside "
                            f"1..{limits.max_entries}")
        if decl is None:
            problems.append(f"{where}: no applied spec to compare flags with")
            continue
        want = kernel_map_flags(decl.flags)
        if facts["flags"] & MAP_FLAG_MASK != want:
            problems.append(f"{where}: flags {facts['flags'] & MAP_FLAG_MASK:#x}, spec "
                            f"declares {want:#x}")
        if kernel.MAP_TYPES.get(facts["type"]) != decl.type.kind.kernel_id:
            problems.append(f"{where}: type {facts['type']}, spec declares {decl.type.value}")
        if not decl.type.kind.fixed and facts["max_entries"] != decl.max_entries:
            problems.append(f"{where}: max_entries {facts['max_entries']}, spec declares "
                            f"{decl.max_entries}")
    specs = _specs(view)
    n_progs = sum(len(e.programs) for e in specs.values())
    if n_progs > limits.max_programs:
        problems.append(f"{n_progs} programs, limit {limits.max_programs}")
    if n_maps > limits.max_maps:
        problems.append(f"{n_maps} maps, limit {limits.max_maps}")
    return _verdict(problems, f"{n_maps} maps within limits, with the flags their specs declare")


def check_frozen(view: View) -> Outcome:
    problems, frozen = [], 0
    for name, mname, facts, decl in _map_rows(view):
        if decl is None:
            problems.append(f"{name}/{mname}: no applied spec: cannot tell whether it must be "
                            "frozen")
        elif decl.freeze:
            if "missing" in facts:
                problems.append(f"{name}/{mname}: config map pin {facts['missing']}")
            elif not facts["frozen"]:
                problems.append(f"{name}/{mname}: spec says freeze: true but the kernel map "
                                f"id {facts['id']} is NOT frozen (writable from user space)")
            else:
                frozen += 1
    return _verdict(problems, f"{frozen} config maps frozen (kernel fact)")


def _journalctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["journalctl", "--no-pager", *args], capture_output=True, text=True,
                          timeout=30, check=False)


def message_id_matches() -> list[str]:
    return [f"MESSAGE_ID={e.message_id}" for e in audit.Event]


JournalRecord: TypeAlias = Mapping[str, Any]


def journal_records() -> list[JournalRecord] | str:
    """The newest JOURNAL_SCAN entries with a loaderd MESSAGE_ID (oldest first), with the
    fields check_journal judges; a string says why there are none to read."""
    if not audit.journal_available():
        return (f"no journald socket ({audit.JOURNAL_SOCKET}): audit events go to stderr "
                "JSON only")
    if shutil.which("journalctl") is None:
        return "journald socket present, but no journalctl to confirm events arrive"
    out = _journalctl("-o", "json", "-n", str(JOURNAL_SCAN),
                      "--output-fields=" + ",".join(_JOURNAL_FIELDS), *message_id_matches())
    if out.returncode != 0:
        return f"journalctl failed: {out.stderr.strip()[:200]}"
    records: list[JournalRecord] = []
    for line in out.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            return "journalctl output unreadable"
        if isinstance(rec, dict):
            records.append(rec)
    return records


def trusted_uids() -> set[int]:
    """root, and the loaderd service user if it exists."""
    uids = {0}
    with contextlib.suppress(KeyError):
        uids.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    return uids


def _field(rec: JournalRecord, name: str) -> str | None:
    value = rec.get(name)
    return value if isinstance(value, str) else None  # binary or repeated: not journald's own


def _origin(rec: JournalRecord, uids: set[int]) -> tuple[str, str]:
    """('loaderd' | 'unknown' | 'forged', who): who wrote this entry, from its trusted fields.
    'unknown': a loaderd unit or uid, but the process was gone before journald could read its
    _COMM/_EXE (a short-lived apply's last event)."""
    unit, uid = _field(rec, "_SYSTEMD_UNIT"), _field(rec, "_UID")
    comm, exe = _field(rec, "_COMM"), _field(rec, "_EXE")
    who = ", ".join(f"{k} {v}" for k, v in (("_UID", uid), ("_SYSTEMD_UNIT", unit),
                                            ("_COMM", comm), ("_EXE", exe),
                                            ("_PID", _field(rec, "_PID"))) if v is not None)
    ours = unit in EVENT_UNITS or (uid is not None and uid.isdigit() and int(uid) in uids)
    if not ours:
        return "forged", who or "no trusted fields"
    if comm is None and exe is None:
        return "unknown", who
    if (comm is not None and not _LOADERD_PROGRAM.fullmatch(comm)) or \
            (exe is not None and not _LOADERD_PROGRAM.fullmatch(os.path.basename(exe))):
        return "forged", who  # loaderd's uid or unit, but another program wrote it
    return "loaderd", who


def _when(rec: JournalRecord) -> str:
    usec = _field(rec, "__REALTIME_TIMESTAMP")
    if usec is None or not usec.isdigit():
        return "?"
    t = datetime.datetime.fromtimestamp(int(usec) / 1e6, datetime.UTC)
    return t.isoformat(timespec="seconds")


def check_journal(view: View, records: Iterable[JournalRecord] | None = None) -> Outcome:
    """PASS only on a fact: an event with a loaderd MESSAGE_ID that journald's trusted fields
    show loaderd itself wrote (a loaderd unit, or uid 0/loaderd running loaderd's program).
    Anyone may send a loaderd MESSAGE_ID to journald: entries from other uids, or from other
    programs, are reported as forged (FAIL). `records`: journal entries (JSON export fields);
    read from journalctl when not given."""
    if records is None:
        got = journal_records()
        if isinstance(got, str):
            return WARN, got
        records = got
    uids = trusted_uids()
    genuine: list[tuple[JournalRecord, str]] = []
    forged: list[str] = []
    unknown = 0
    for rec in records:
        origin, who = _origin(rec, uids)
        if origin == "loaderd":
            genuine.append((rec, who))
        elif origin == "unknown":
            unknown += 1
        else:
            forged.append(f"{_when(rec)} MESSAGE_ID {_field(rec, 'MESSAGE_ID')} from {who}: "
                          f"{(_field(rec, 'MESSAGE') or '')[:60]!r}")
    if forged:
        more = f" (+{len(forged) - 5} more)" if len(forged) > 5 else ""
        return FAIL, (f"{len(forged)} journal entries carry a loaderd MESSAGE_ID but were not "
                      f"written by loaderd (forged; loaderd runs as uid "
                      f"{'/'.join(map(str, sorted(uids)))} in {', '.join(sorted(EVENT_UNITS))}): "
                      + "; ".join(forged[:5]) + more)
    if genuine:
        rec, who = genuine[-1]
        return PASS, (f"{len(genuine)} events from loaderd itself, none forged; last "
                      f"{_when(rec)} ({who}): {(_field(rec, 'MESSAGE') or '')[:100]}")
    if unknown:
        return WARN, (f"{unknown} loaderd events from a loaderd uid or unit, but their process "
                      "had exited before journald read _COMM/_EXE: cannot confirm loaderd "
                      "wrote them")
    return WARN, ("journal socket present but no loaderd event is visible to uid "
                  f"{os.getuid()} (not applied yet, or no journal read access)")


def _loaderd_args(argv: list[str]) -> list[str] | None:
    """The arguments after the program if argv runs loaderd (directly or as python -m/script)."""
    if not argv:
        return None
    prog, rest = os.path.basename(argv[0]), argv[1:]
    if prog == "loaderd":
        return rest
    if not prog.startswith("python"):
        return None
    i = 0
    while i < len(rest) and rest[i].startswith("-") and rest[i] != "-m":
        i += 1  # interpreter flags such as -I
    if rest[i:i + 2] == ["-m", "loaderd"]:
        return rest[i + 2:]
    if i < len(rest) and os.path.basename(rest[i]) == "loaderd":
        return rest[i + 1:]
    return None


def _config_of(args: list[str]) -> str:
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return DEFAULT_CONFIG


def _argv(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def resident_pids(config: str | None) -> list[int]:
    """`loaderd run` processes using this config in our PID namespace (an instance with
    another config, or in a container, is not ours to judge)."""
    want = os.path.realpath(config or DEFAULT_CONFIG)
    our_ns = os.readlink("/proc/self/ns/pid")
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            argv = _argv(d)
            cwd = os.readlink(f"/proc/{d}/cwd")
            if os.readlink(f"/proc/{d}/ns/pid") != our_ns:
                continue
        except OSError:
            continue
        args = _loaderd_args(argv)
        if args is None or "run" not in args:
            continue
        if os.path.realpath(os.path.join(cwd, _config_of(args))) == want:
            pids.append(int(d))
    # A resident forks its apply child, which keeps the resident's argv: not a resident.
    return sorted(p for p in pids if _ppid(p) not in pids)


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])  # after "pid (comm) state"
    except (OSError, ValueError, IndexError):
        return None


def check_daemon_caps(view: View) -> Outcome:
    pids = resident_pids(view.settings.path)
    if not pids:
        raise Skip(f"no `loaderd run` process with config {view.settings.path or DEFAULT_CONFIG}")
    problems, starting, bounding = [], [], []
    for pid in pids:
        try:
            caps = privileges.read_state(pid)
        except OSError:
            continue  # exited meanwhile
        usable = caps.effective | caps.permitted | caps.inheritable | caps.ambient
        if (usable or caps.bounding) and _applying(pid):
            starting.append(pid)  # it drops everything once its `loaderd apply` child is done
        elif usable or not caps.no_new_privs:
            sets = ", ".join(f"{name} {'+'.join(privileges.names(mask))}" for name, mask in (
                ("effective", caps.effective), ("permitted", caps.permitted),
                ("inheritable", caps.inheritable), ("ambient", caps.ambient)) if mask)
            problems.append(f"pid {pid}: {sets or 'no capability'}, no_new_privs "
                            f"{int(caps.no_new_privs)}")
        elif caps.bounding:
            bounding.append(f"pid {pid}: bounding set {'+'.join(privileges.names(caps.bounding))}")
    if problems:
        return FAIL, "; ".join(problems)
    if starting:
        return WARN, (f"pids {', '.join(map(str, starting))} still applying (capabilities are "
                      "dropped after that): run the check again")
    if bounding:
        # Not usable: permitted is empty and no_new_privs stops exec from refilling it.
        return WARN, ("; ".join(bounding) + "; effective/permitted/inheritable/ambient empty, "
                      "no_new_privs set (the packaged two-unit setup runs the resident "
                      "with an empty bounding set)")
    return PASS, f"pids {', '.join(map(str, pids))}: every capability set empty, no_new_privs"


def _applying(pid: int) -> bool:
    """Whether `pid` has a `loaderd apply` child (start-up or reload in progress)."""
    children: list[str] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += f.read().split()
    except OSError:
        return False
    for child in children:
        try:
            args = _loaderd_args(_argv(child))
        except OSError:
            continue
        # `loaderd apply --child`, or the resident's own fork running it (same argv as the
        # resident: a resident forks nothing else)
        if args is not None and ("apply" in args or "run" in args):
            return True
    return False


def _installed(unit: str) -> str | None:
    for d in UNIT_DIRS:
        path = os.path.join(d, unit)
        if os.path.isfile(path):
            return path
    return None


def _run(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)


def _first_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0][:160] if lines else f"exit status {out.returncode}"


def systemd_reachable() -> tuple[bool, str]:
    """Whether a running systemd (PID 1) answers `systemctl show`; else why not."""
    if shutil.which("systemctl") is None:
        return False, "no systemctl"
    out = _run(["systemctl", "show", "--property=Version"], timeout=30)
    if out.returncode != 0 or not out.stdout.startswith("Version="):
        return False, _first_line(out)
    return True, out.stdout.strip()


def _loaded(unit: str) -> tuple[dict[str, str] | None, str]:
    """The running systemd's LoadState/FragmentPath/DropInPaths of unit, if it is loaded."""
    out = _run(["systemctl", "show", "--property=LoadState,FragmentPath,DropInPaths", unit],
               timeout=30)
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if out.returncode != 0:
        return None, _first_line(out)
    if props.get("LoadState") != "loaded":
        return None, f"LoadState={props.get('LoadState', '?')}"
    return props, ""


def _score(argv: Sequence[str]) -> tuple[float, str] | str:
    out = _run(["systemd-analyze", "security", *argv])
    m = _EXPOSURE.search(out.stdout)
    if m is None:
        return f"no score ({(out.stderr or out.stdout).strip()[:200]})"
    return float(m.group(1)), m.group(2)


def check_hardening(view: View, files: Sequence[str] | None) -> Outcome:
    """Every unit scores <= HARDENING_LIMIT. Given files are analyzed offline as they are;
    otherwise the units the running systemd has loaded (with their drop-ins), falling back to
    offline analysis of the installed unit file (drop-ins not applied) when systemd is not
    reachable or has not loaded it. The detail says which."""
    if shutil.which("systemd-analyze") is None:
        raise Skip("systemd-analyze not installed")
    # (unit, systemd-analyze arguments, how it was scored)
    targets: list[tuple[str, list[str], str]] = []
    missing: list[str] = []
    if files:
        how = "given unit files analyzed offline (drop-ins not applied)"
        targets = [(f, ["--offline=true", f], "") for f in files if os.path.isfile(f)]
        missing = [f for f in files if not os.path.isfile(f)]
        if not targets:
            raise Skip(f"no such unit file: {', '.join(missing)}")
    else:
        live, why = systemd_reachable()
        how = ("scored by the running systemd (loaded units, drop-ins applied)" if live else
               f"systemd not reachable ({why}): installed unit files analyzed offline "
               "(drop-ins not applied)")
        for unit in UNITS:
            props, not_loaded = _loaded(unit) if live else (None, "")
            path = _installed(unit)
            if props is not None:
                dropins = props.get("DropInPaths", "").split()
                targets.append((unit, [unit], f"+ {', '.join(dropins)}" if dropins else ""))
            elif path is not None:
                targets.append((path, ["--offline=true", path],
                                f"not loaded ({not_loaded}): file analyzed offline"
                                if live else ""))
            else:
                missing.append(unit)
        if not targets:
            raise Skip(f"none of {', '.join(UNITS)} is loaded or installed in "
                       f"{', '.join(UNIT_DIRS)} (pass --unit-file); {how}")
    problems, scores = [], []
    for name, argv, note in targets:
        got = _score(argv)
        if isinstance(got, str):
            problems.append(f"{name}: {got}")
            continue
        score, level = got
        scores.append(f"{name} {score} {level}" + (f" ({note})" if note else ""))
        if score > HARDENING_LIMIT:
            problems.append(f"{name}: exposure {score} {level}, must be <= {HARDENING_LIMIT}")
    detail = f"{how}: {'; '.join(scores) or 'no score'}"
    if problems:
        return FAIL, "; ".join(problems) + f" [{detail}]"
    if missing:
        return WARN, f"not installed: {', '.join(missing)}; {detail}"
    return PASS, f"{detail} (each <= {HARDENING_LIMIT})"


def _pin_entries(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every directory and pin below root (lstat: a symlink is reported, not followed)."""
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            try:
                yield path, os.lstat(path)
            except FileNotFoundError:
                continue


def check_pins_world_writable(view: View) -> Outcome:
    root = view.settings.bpffs_root
    if not os.path.isdir(root):
        raise Skip(f"{root} does not exist")
    problems = []
    for path, st in [(root, os.lstat(root)), *_pin_entries(root)]:
        if stat.S_ISLNK(st.st_mode):
            problems.append(f"{path}: symlink in the pin tree")
        elif st.st_mode & stat.S_IWOTH:
            problems.append(f"{path}: writable by other (mode {stat.S_IMODE(st.st_mode):04o})")
    return _verdict(problems, f"nothing under {root} is writable by other")


def check_pin_modes(view: View) -> Outcome:
    root = view.settings.bpffs_root
    if not os.path.isdir(root):
        raise Skip(f"{root} does not exist")
    want_mode = view.settings.pins.mode
    try:
        want_gid = view.settings.pins.gid
    except (KeyError, LoaderdError):  # model raises LoaderdError for an unknown group now
        return FAIL, f"configured pin group '{view.settings.pins.group}' does not exist"
    # RDONLY/WRONLY maps' pins lose their write/read bits (model.map_pin_mode).
    recorded = view.manifest.specs.values() if view.manifest else ()
    special = {os.path.join(e.pin_dir, "maps", n): map_pin_mode(want_mode, m.access)
               for e in recorded for n, m in e.maps.items()}
    problems, n = [], 0
    for path, st in _pin_entries(root):
        if not stat.S_ISREG(st.st_mode):
            continue
        n += 1
        mode, want = stat.S_IMODE(st.st_mode), special.get(path, want_mode)
        if mode != want:
            problems.append(f"{path}: mode {mode:04o}, configured {want:04o}")
        if want_gid >= 0 and st.st_gid != want_gid:
            problems.append(f"{path}: group {st.st_gid}, configured "
                            f"{view.settings.pins.group} ({want_gid})")
    return _verdict(problems, f"{n} pins with mode {want_mode:04o}"
                    + (f", group {view.settings.pins.group}" if want_gid >= 0 else ""))


def check_compile_sandbox(view: View) -> Outcome:
    """Compile workers confine themselves with Landlock where the kernel has it: say when it
    does not (this kernel, or the installed apply unit's seccomp filter denies it)."""
    support = sandbox.probe()
    lim = view.settings.compile
    if not support.available:
        what = ("compile.require_landlock refuses every compile" if lim.require_landlock else
                "compile workers run unconfined: text checks, the seccomp bpf() filter and "
                "resource limits only")
        return WARN, f"DEGRADED: {support.describe()}; {what}"
    unit = _installed("loaderd-apply.service")
    if unit:
        with open(unit, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if "SystemCallFilter=" in text and "landlock_restrict_self" not in text:
            return WARN, (f"DEGRADED: {support.describe()} here, but {unit} does not allow the "
                          "Landlock system calls: compiles under it run unconfined")
    return PASS, (f"{support.describe()}: each compile worker reads only kernel headers and "
                  "library code, writes only its private temp dir, cannot pin; limits "
                  f"{lim.memory_mb} MiB, {lim.cpu_seconds} s CPU, {lim.timeout_seconds} s")


def check_headers(view: View) -> Outcome:
    """BCC compiles struct offsets from the installed headers; the running kernel's BTF is the
    truth (bpf.offsets measures both; the cache is what the last apply or check saw)."""
    state, sentence = offsets.describe(view.settings.state_dir)
    if state == "match":
        return PASS, sentence
    if state == "mismatch":
        if view.settings.accept_header_mismatch:
            return FAIL, (f"{sentence}; accept_header_mismatch: true loads them anyway: their "
                          "struct reads are wrong (use CO-RE objects: source: {object: ...})")
        return WARN, (f"{sentence}; such specs are refused (accept_header_mismatch is false): "
                      "use CO-RE objects (source: {object: ...}) for struct reads")
    if state == "unmeasured":  # the headers' release is the running kernel's
        return PASS, sentence
    return WARN, sentence


def check_signatures(view: View) -> Outcome:
    """Who signed what is applied (the signature facts recorded at apply), and the mode."""
    mode = view.settings.signatures.mode
    specs = _specs(view)
    if not specs:
        raise Skip("no spec applied")
    signed, unsigned = [], []
    for name, r in sorted(specs.items()):
        f = r.signature
        if f is not None and f.status is SignatureStatus.VERIFIED:
            signed.append(f"{name}: {f.principal} {f.fingerprint}")
        else:
            unsigned.append(name + ("" if f is None else f" ({f.status.value})"))
    if unsigned:
        return WARN, (f"signatures.mode {mode.value}; not signed by an allowed signer: "
                      f"{', '.join(unsigned)}" + (f"; signed: {'; '.join(signed)}" if signed
                                                  else ""))
    if mode is not SignatureMode.ENFORCE:
        return WARN, (f"every applied spec is signed ({'; '.join(signed)}), but "
                      f"signatures.mode is {mode.value}: an unsigned spec would load")
    return PASS, f"signatures.mode enforce; {'; '.join(signed)}"


# --- running ----------------------------------------------------------------------------------

def checks(unit_files_given: Sequence[str] | None
           ) -> list[tuple[str, str, Callable[[View], Outcome]]]:
    return [
        ("manifest committed", HIGH, check_manifest),
        ("pinned objects match the manifest (no drift)", HIGH, check_drift),
        ("programs use only allowed helpers (current policy)", HIGH, check_helpers),
        ("maps have limits and their declared flags", MEDIUM, check_map_limits),
        ("config maps (freeze: true) are frozen", HIGH, check_frozen),
        ("audit events reach the journal", HIGH, check_journal),
        ("resident daemon holds no capabilities", HIGH, check_daemon_caps),
        ("unit hardening (systemd-analyze security)", HIGH,
         lambda v: check_hardening(v, unit_files_given)),
        ("no pin or pin directory writable by other", HIGH, check_pins_world_writable),
        ("pins have the configured mode and group", MEDIUM, check_pin_modes),
        ("compile workers are confined by the kernel (Landlock)", MEDIUM,
         check_compile_sandbox),
        ("kernel headers compile the running kernel's struct offsets", MEDIUM, check_headers),
        ("applied specs are signed (signatures.mode enforce)", MEDIUM, check_signatures),
    ]


def run(view: View, unit_files: Sequence[str] | None = None) -> list[Result]:
    results = []
    for name, severity, check in checks(unit_files):
        try:
            status, detail = check(view)
        except Skip as why:
            status, detail = SKIP, str(why)
        except (LoaderdError, OSError, subprocess.SubprocessError) as exc:
            status, detail = FAIL, f"check could not run: {exc}"
        results.append(Result(name, severity, status, detail))
    return results


def high_failures(results: Sequence[Result]) -> list[Result]:
    return [r for r in results if r.status == FAIL and r.severity == HIGH]


VERDICT_EXIT = {PASS: 0, FAIL: 1, WARN: 2, SKIP: 3}


def not_passed(results: Sequence[Result]) -> list[Result]:
    """High-severity checks that did not PASS: each one keeps the verdict from PASS."""
    return [r for r in results if r.severity == HIGH and r.status != PASS]


def verdict(results: Sequence[Result]) -> str:
    got = {r.status for r in not_passed(results)}
    return next((s for s in (FAIL, WARN, SKIP) if s in got), PASS)


def exit_code(results: Sequence[Result]) -> int:
    return VERDICT_EXIT[verdict(results)]


def as_json(results: Sequence[Result]) -> dict[str, Any]:
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, WARN, SKIP)}
    return {"verdict": verdict(results), "passed": verdict(results) == PASS,
            "high_not_passed": [{"check": r.check, "status": r.status}
                                for r in not_passed(results)],
            "counts": counts, "results": [asdict(r) for r in results]}


def render(results: Sequence[Result]) -> str:
    lines = ["=== loaderd compliance report ==="]
    for r in results:
        lines.append(f"[{r.status}] {r.check} ({r.severity})")
        lines.append(f"       {r.detail}")
    bad, short = high_failures(results), not_passed(results)
    others = [r for r in short if r.status != FAIL]
    why = "".join(f"; {r.status}: {r.check}" for r in others)
    lines.append(f"result: {verdict(results)} ({len(bad)} high-severity failures{why})")
    return "\n".join(lines)
