"""`loaderctl compliance`: the security checklist as PASS/FAIL/WARN/SKIP results from facts.

Facts, not configuration: helpers are the ones recorded from each loaded program's bytecode,
re-checked against the policy in force now; freeze is read from the kernel (fdinfo of a
read-only fd on the pin); capabilities from the resident daemon's /proc status; hardening from
`systemd-analyze security --offline=true`. A check that cannot see its facts SKIPs and says why.
A high-severity FAIL makes the exit code non-zero.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loaderd import audit, kernel, privileges, verify
from loaderd.clikit import DEFAULT_CONFIG
from loaderd.ctl import (
    MISSING,
    NO_PERMISSION,
    View,
    applied_spec,
    map_facts,
    pin_facts,
)
from loaderd.errors import LoaderdError
from loaderd.model import DANGEROUS_HELPERS, MAP_FLAG_BITS, MapType, ProgType

HIGH, MEDIUM, LOW = "high", "medium", "low"
PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
UNITS = ("loaderd.service", "loaderd-audit.service")
HARDENING_LIMIT = 5.0  # systemd-analyze: below 5.0 is "OK" or "SAFE", from 5.0 "MEDIUM"
_MAP_FLAG_MASK = 0x1FF  # the BPF_F_* bits a spec can declare (as stage.check_map_facts)
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


def _specs(view: View) -> dict[str, Any]:
    if view.manifest is None:
        raise Skip(view.manifest_note or "no manifest")
    specs: dict[str, Any] = view.manifest.get("specs", {})
    return specs


def _verdict(problems: Sequence[str], ok: str) -> Outcome:
    return (FAIL, "; ".join(problems)) if problems else (PASS, ok)


# --- checks -----------------------------------------------------------------------------------

def check_manifest(view: View) -> Outcome:
    if view.manifest is None:
        raise Skip(view.manifest_note or "no manifest")
    st = view.manifest.get("status")
    if st == "pending":
        return FAIL, "a commit was interrupted (status pending): run `loaderd apply` to finish it"
    return PASS, f"status {st}, {len(view.manifest.get('specs', {}))} specs"


def check_drift(view: View) -> Outcome:
    problems = []
    for name, entry in sorted(_specs(view).items()):
        problems += [f"{name}: {d}" for d in verify.differences(entry)]
    return _verdict(problems, "every pinned program, map and link matches the manifest")


def check_helpers(view: View) -> Outcome:
    pol = view.settings.policy
    problems, count = [], 0
    for name, entry in sorted(_specs(view).items()):
        for pname, p in sorted(entry.get("programs", {}).items()):
            count += 1
            ptype = ProgType(p["type"])
            # same rule as policy.check_calls: a dangerous helper only if named in allow itself
            allowed = pol.helpers_for(ptype) - (DANGEROUS_HELPERS - pol.helpers)
            refused = sorted(set(p.get("helpers", [])) - allowed)
            if refused:
                problems.append(f"{name}/{pname} calls {', '.join(refused)}, not allowed by the "
                                "current policy")
    return _verdict(problems, f"{count} programs call only allowed helpers")


def _map_rows(view: View) -> Iterator[tuple[str, str, dict[str, Any], Any]]:
    """(spec, map, kernel facts, declared MapSpec or None) for every applied map."""
    for name, entry in sorted(_specs(view).items()):
        parsed, _why = applied_spec(view, name)
        decls = {m.name: m for m in parsed.maps} if parsed else {}
        for mname in sorted(entry.get("maps", {})):
            path = os.path.join(entry["pin_dir"], "maps", mname)
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
        want = sum(MAP_FLAG_BITS[f] for f in decl.flags)
        if facts["flags"] & _MAP_FLAG_MASK != want:
            problems.append(f"{where}: flags {facts['flags'] & _MAP_FLAG_MASK:#x}, spec "
                            f"declares {want:#x}")
        if kernel.MAP_TYPES.get(facts["type"]) != kernel.MODEL_MAP_TYPES[decl.type]:
            problems.append(f"{where}: type {facts['type']}, spec declares {decl.type.value}")
        if decl.type not in (MapType.RINGBUF, MapType.PERF_EVENT_ARRAY) and \
                facts["max_entries"] != decl.max_entries:
            problems.append(f"{where}: max_entries {facts['max_entries']}, spec declares "
                            f"{decl.max_entries}")
    specs = _specs(view)
    n_progs = sum(len(e.get("programs", {})) for e in specs.values())
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


def check_journal(view: View) -> Outcome:
    if not audit.journal_available():
        return WARN, (f"no journald socket ({audit.JOURNAL_SOCKET}): audit events go to stderr "
                      "JSON only")
    if shutil.which("journalctl") is None:
        return WARN, "journald socket present, but no journalctl to confirm events arrive"
    out = _journalctl("-o", "json", "-n", "1", *message_id_matches())
    line = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
    if not line:
        return WARN, ("journal socket present but no loaderd event is visible to uid "
                      f"{os.getuid()} (not applied yet, or no journal read access)")
    try:
        last = json.loads(line[0])
    except ValueError:
        return WARN, "journalctl output unreadable"
    return PASS, f"last loaderd event in the journal: {last.get('MESSAGE', '')[:100]}"


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
    return sorted(pids)


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
        if args is not None and "apply" in args:
            return True
    return False


def unit_files(given: Sequence[str] | None) -> list[str]:
    if given:
        return list(given)
    found = []
    for unit in UNITS:
        for d in UNIT_DIRS:
            path = os.path.join(d, unit)
            if os.path.isfile(path):
                found.append(path)
                break
    return found


def check_hardening(view: View, files: Sequence[str] | None) -> Outcome:
    if shutil.which("systemd-analyze") is None:
        raise Skip("systemd-analyze not installed")
    paths = unit_files(files)
    if not paths:
        raise Skip("no loaderd unit file installed (pass --unit-file)")
    problems, scores = [], []
    for path in paths:
        out = subprocess.run(["systemd-analyze", "security", "--offline=true", path],
                             capture_output=True, text=True, timeout=60, check=False)
        m = _EXPOSURE.search(out.stdout)
        if m is None:
            problems.append(f"{path}: no score ({(out.stderr or out.stdout).strip()[:200]})")
            continue
        score = float(m.group(1))
        scores.append(f"{os.path.basename(path)} {score} {m.group(2)}")
        if score >= HARDENING_LIMIT:
            problems.append(f"{path}: exposure {score} {m.group(2)} (must be < "
                            f"{HARDENING_LIMIT})")
    return _verdict(problems, "; ".join(scores))


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
    except KeyError:
        return FAIL, f"configured pin group '{view.settings.pins.group}' does not exist"
    problems, n = [], 0
    for path, st in _pin_entries(root):
        if not stat.S_ISREG(st.st_mode):
            continue
        n += 1
        mode = stat.S_IMODE(st.st_mode)
        if mode != want_mode:
            problems.append(f"{path}: mode {mode:04o}, configured {want_mode:04o}")
        if want_gid >= 0 and st.st_gid != want_gid:
            problems.append(f"{path}: group {st.st_gid}, configured "
                            f"{view.settings.pins.group} ({want_gid})")
    return _verdict(problems, f"{n} pins with mode {want_mode:04o}"
                    + (f", group {view.settings.pins.group}" if want_gid >= 0 else ""))


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
        ("unit hardening (systemd-analyze security)", MEDIUM,
         lambda v: check_hardening(v, unit_files_given)),
        ("no pin or pin directory writable by other", HIGH, check_pins_world_writable),
        ("pins have the configured mode and group", MEDIUM, check_pin_modes),
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


def as_json(results: Sequence[Result]) -> dict[str, Any]:
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, WARN, SKIP)}
    return {"passed": not high_failures(results), "counts": counts,
            "results": [asdict(r) for r in results]}


def render(results: Sequence[Result]) -> str:
    lines = ["=== loaderd compliance report ==="]
    for r in results:
        lines.append(f"[{r.status}] {r.check} ({r.severity})")
        lines.append(f"       {r.detail}")
    bad = high_failures(results)
    lines.append(f"result: {'FAIL' if bad else 'PASS'} ({len(bad)} high-severity failures)")
    return "\n".join(lines)
