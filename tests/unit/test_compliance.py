"""Compliance checks that need no kernel: helper re-check against the current policy, pin modes
on a plain directory tree, the resident daemon's command line, unit scoring, report/exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loaderd import privileges
from loaderd.audit import log as audit
from loaderd.config.settings import DEFAULT_CONFIG
from loaderd.model import PinOwnership, Policy, ProgType, Settings
from loaderd.observe.status import View
from loaderd.reports import compliance
from loaderd.reports.compliance import FAIL, HIGH, MEDIUM, PASS, SKIP, WARN, Result
from loaderd.store.manifest import Calls, Manifest, ProgramRecord, SpecRecord, Status

REPO = Path(__file__).resolve().parents[2]


def view(tmp_path: Path, specs: dict[str, SpecRecord] | None = None, **settings: Any
         ) -> View:
    manifest = None if specs is None else Manifest(Status.COMMITTED, specs=specs)
    settings.setdefault("path", str(tmp_path / "loaderd.yaml"))  # no resident daemon uses it
    s = Settings(bpffs_root=str(tmp_path / "pins"), state_dir=str(tmp_path / "state"),
                 **settings)
    return View(s, manifest, None if specs is not None else "no manifest")


def prog(helpers: list[str], ptype: ProgType = ProgType.SOCKET_FILTER) -> ProgramRecord:
    return ProgramRecord(name="f", function="f", type=ptype, id=1, tag="0" * 16,
                         helpers=tuple(helpers), calls=Calls())


def record(name: str, programs: dict[str, ProgramRecord]) -> SpecRecord:
    return SpecRecord(name=name, file=f"/etc/loaderd/programs.d/{name}.yaml", sha256="0" * 64,
                      pin_dir=f"/sys/fs/bpf/loaderd/{name}", programs=programs, maps={})


def test_helpers_rechecked_against_the_current_policy(tmp_path: Path) -> None:
    specs = {"a": record("a", {"f": prog(["map_lookup_elem", "ktime_get_ns"])}),
             "b": record("b", {"g": prog(["trace_printk"])})}
    status, detail = compliance.check_helpers(view(tmp_path, specs))
    assert status == FAIL and detail.startswith("b/g calls trace_printk")
    allow = Policy(helpers=frozenset({"map_lookup_elem", "ktime_get_ns", "trace_printk"}))
    assert compliance.check_helpers(view(tmp_path, specs, policy=allow))[0] == PASS
    by_type = Policy(helpers=frozenset({"map_lookup_elem"}),
                     helpers_by_type={ProgType.SOCKET_FILTER: frozenset({"ktime_get_ns"})})
    status, detail = compliance.check_helpers(view(tmp_path, {"a": specs["a"]},
                                                   policy=by_type))
    assert status == PASS and "1 programs" in detail
    # A dangerous helper allowed only per type (not in helpers.allow) still fails.
    sneaky = Policy(helpers_by_type={ProgType.SOCKET_FILTER: frozenset({"trace_printk"})})
    assert compliance.check_helpers(view(tmp_path, {"b": specs["b"]}, policy=sneaky))[0] == FAIL


def test_checks_without_a_manifest_skip(tmp_path: Path) -> None:
    results = {r.check: r for r in compliance.run(view(tmp_path), unit_files=["/nonexistent"])}
    for name in ("manifest committed", "pinned objects match the manifest (no drift)",
                 "programs use only allowed helpers (current policy)",
                 "config maps (freeze: true) are frozen"):
        assert results[name].status == SKIP and results[name].detail == "no manifest"
    assert not compliance.high_failures(list(results.values()))


def test_pending_manifest_fails(tmp_path: Path) -> None:
    v = view(tmp_path, {})
    v.manifest = Manifest(Status.PENDING, txid="20261203t080000-000000000-abcdef")
    assert compliance.check_manifest(v)[0] == FAIL


def make_tree(tmp_path: Path) -> Path:
    root = tmp_path / "pins"
    for kind in ("progs", "maps"):
        (root / "s" / kind).mkdir(parents=True)
        pin = root / "s" / kind / "x"
        pin.write_text("")
        os.chmod(pin, 0o640)
    return root


def test_pin_modes_and_world_writable(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    v = view(tmp_path, {}, pins=PinOwnership(mode=0o640))
    assert compliance.check_pin_modes(v) == (PASS, "2 pins with mode 0640")
    assert compliance.check_pins_world_writable(v)[0] == PASS
    os.chmod(root / "s" / "maps" / "x", 0o602)
    os.chmod(root / "s" / "progs", 0o777)
    (root / "s" / "maps" / "link").symlink_to("/etc/passwd")
    status, detail = compliance.check_pins_world_writable(v)
    assert status == FAIL
    assert "s/maps/x: writable by other (mode 0602)" in detail
    assert "s/progs: writable by other (mode 0777)" in detail
    assert "s/maps/link: symlink in the pin tree" in detail
    status, detail = compliance.check_pin_modes(v)
    assert status == FAIL and "s/maps/x: mode 0602, configured 0640" in detail
    gid = os.getgid()
    other = next(g for g in (65534, 1, 2) if g != gid)
    os.chown(root / "s" / "progs" / "x", -1, other)
    import grp

    named = view(tmp_path, {}, pins=PinOwnership(mode=0o640, group=grp.getgrgid(gid).gr_name))
    status, detail = compliance.check_pin_modes(named)
    assert status == FAIL and f"s/progs/x: group {other}, configured" in detail
    missing = view(tmp_path, {}, pins=PinOwnership(group="no-such-group-here"))
    assert compliance.check_pin_modes(missing)[0] == FAIL


@pytest.mark.parametrize(("argv", "args"), [
    (["/usr/bin/python3", "-I", "/usr/bin/loaderd", "run", "--config", "/c"],
     ["run", "--config", "/c"]),
    (["/usr/bin/python3", "-m", "loaderd", "--config", "/c", "run"], ["--config", "/c", "run"]),
    (["/usr/bin/loaderd", "run"], ["run"]),
    (["timeout", "15", "/usr/bin/python3", "-m", "loaderd", "run"], None),
    (["/usr/bin/python3", "-m", "loaderd.cli.loaderctl", "status"], None),
    (["/usr/bin/python3", "/usr/bin/loaderctl", "run"], None),
    ([], None),
])
def test_resident_command_lines(argv: list[str], args: list[str] | None) -> None:
    assert compliance._loaderd_args(argv) == args


def test_config_of_command_line() -> None:
    assert compliance._config_of(["run", "--config", "/x.yaml"]) == "/x.yaml"
    assert compliance._config_of(["--config=/y.yaml", "run"]) == "/y.yaml"
    assert compliance._config_of(["run"]) == DEFAULT_CONFIG


def test_daemon_check_skips_without_a_resident(tmp_path: Path) -> None:
    v = view(tmp_path, {})
    with pytest.raises(compliance.Skip, match="no `loaderd run` process"):
        compliance.check_daemon_caps(v)


def test_journal_check_warns_without_journald(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "JOURNAL_SOCKET", str(tmp_path / "no-socket"))
    status, detail = compliance.check_journal(view(tmp_path, {}))
    assert status == WARN and "stderr JSON" in detail


DRIFT_ID = audit.Event.DRIFT.message_id


def entry(uid: str | None = "0", comm: str | None = "loaderd",
          exe: str | None = "/usr/bin/python3.11", unit: str | None = None,
          message: str = "counter: drift detected") -> dict[str, Any]:
    """One journal entry as `journalctl -o json` prints it (trusted fields set by journald)."""
    rec = {"__REALTIME_TIMESTAMP": "1767225600000000", "MESSAGE_ID": DRIFT_ID,
           "MESSAGE": message, "_PID": "4242", "_UID": uid, "_COMM": comm, "_EXE": exe,
           "_SYSTEMD_UNIT": unit}
    return {k: v for k, v in rec.items() if v is not None}


@pytest.mark.parametrize("rec", [
    entry(),  # `loaderd apply` run by root: comm is the script's name, exe the interpreter
    entry(uid="998", comm="python3", unit="loaderd-apply.service"),  # the apply's --child
    entry(uid="997", comm="loaderctl", unit="loaderd-audit.service"),
    entry(uid="998", comm="loaderd"),  # the loaderd service user, outside a unit
])
def test_journal_passes_on_events_loaderd_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                rec: dict[str, Any]) -> None:
    monkeypatch.setattr(compliance, "trusted_uids", lambda: {0, 998})
    status, detail = compliance.check_journal(view(tmp_path, {}), [rec])
    assert status == PASS, detail
    assert detail.startswith("1 events from loaderd itself, none forged; last "
                             "2026-01-01T00:00:00+00:00 (_UID ")
    assert detail.endswith(": counter: drift detected")


@pytest.mark.parametrize(("rec", "who"), [
    (entry(uid="1000", comm="python3"), "_UID 1000, _COMM python3"),  # any local user
    (entry(uid="1000", comm="loaderd", unit="user@1000.service"), "_UID 1000, _SYSTEMD_UNIT"),
    (entry(uid="0", comm="logger", exe="/usr/bin/logger"),
     "_UID 0, _COMM logger, _EXE /usr/bin/logger"),
    (entry(uid="998", comm="sh", exe="/usr/bin/dash"), "_UID 998, _COMM sh"),
    (entry(uid=None, comm=None, exe=None), "_PID 4242"),
])
def test_journal_fails_on_forged_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        rec: dict[str, Any], who: str) -> None:
    monkeypatch.setattr(compliance, "trusted_uids", lambda: {0, 998})
    genuine = entry(unit="loaderd.service", uid="998")
    status, detail = compliance.check_journal(view(tmp_path, {}), [genuine, rec])
    assert status == FAIL, detail
    assert detail.startswith("1 journal entries carry a loaderd MESSAGE_ID but were not written "
                             "by loaderd (forged; loaderd runs as uid 0/998 in ")
    assert f"2026-01-01T00:00:00+00:00 MESSAGE_ID {DRIFT_ID} from {who}" in detail
    results = {r.check: r for r in compliance.run(view(tmp_path, {}), unit_files=["/nonexistent"])}
    assert results["audit events reach the journal"].severity == HIGH


def test_journal_forgeries_are_listed_with_a_count(tmp_path: Path) -> None:
    forged = [entry(uid="1000", comm="python3", message=f"fake {i}") for i in range(8)]
    status, detail = compliance.check_journal(view(tmp_path, {}), forged)
    assert status == FAIL and detail.startswith("8 journal entries") and "(+3 more)" in detail
    assert "'fake 4'" in detail and "'fake 5'" not in detail


def test_journal_warns_without_proof(tmp_path: Path) -> None:
    status, detail = compliance.check_journal(view(tmp_path, {}), [])
    assert status == WARN and "no loaderd event is visible" in detail
    gone = entry(comm=None, exe=None)  # the process exited before journald read /proc
    status, detail = compliance.check_journal(view(tmp_path, {}), [gone])
    assert status == WARN and "cannot confirm loaderd wrote them" in detail


def test_journal_records_read_with_trusted_fields(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    socket = tmp_path / "socket"
    socket.write_text("")
    monkeypatch.setattr(audit, "JOURNAL_SOCKET", str(socket))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    seen: list[tuple[str, ...]] = []

    def journalctl(*args: str) -> subprocess.CompletedProcess[str]:
        seen.append(args)
        lines = [json.dumps(entry(uid="1000", comm="python3")), json.dumps(entry())]
        return subprocess.CompletedProcess(args, 0, "\n".join(lines) + "\n", "")

    monkeypatch.setattr(compliance, "_journalctl", journalctl)
    status, detail = compliance.check_journal(view(tmp_path, {}))
    assert status == FAIL and "from _UID 1000, _COMM python3" in detail
    (args,) = seen
    assert args[:4] == ("-o", "json", "-n", str(compliance.JOURNAL_SCAN))
    fields = args[4].removeprefix("--output-fields=").split(",")
    assert {"_UID", "_COMM", "_EXE", "_SYSTEMD_UNIT"} <= set(fields)
    assert f"MESSAGE_ID={DRIFT_ID}" in args


def test_trusted_uids_are_root_and_the_service_user(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    def getpwnam(name: str) -> Any:
        if name != "loaderd":
            raise KeyError(name)
        return pwd.struct_passwd(("loaderd", "x", 998, 998, "", "/", "/usr/sbin/nologin"))

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    assert compliance.trusted_uids() == {0, 998}
    monkeypatch.setattr(compliance, "SERVICE_USER", "nobody-here")
    assert compliance.trusted_uids() == {0}


SHIPPED_UNITS = ("loaderd.service", "loaderd-apply.service", "loaderd-audit.service")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="needs systemd-analyze")


def installed_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shipped units as the only installed ones, systemd (PID 1) not reachable."""
    unit_dir = tmp_path / "system"
    unit_dir.mkdir()
    for unit in SHIPPED_UNITS:
        shutil.copy(REPO / "units" / unit, unit_dir / unit)
    monkeypatch.setattr(compliance, "UNIT_DIRS", (str(unit_dir),))
    monkeypatch.setattr(compliance, "systemd_reachable",
                        lambda: (False, "System has not been booted with systemd"))
    return unit_dir


def test_hardening_is_high_severity() -> None:
    severity = {name: sev for name, sev, _check in compliance.checks(None)}
    assert severity["unit hardening (systemd-analyze security)"] == HIGH


@needs_analyze
def test_hardening_scores_every_installed_unit_offline(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    unit_dir = installed_units(tmp_path, monkeypatch)
    status, detail = compliance.check_hardening(view(tmp_path, {}), None)
    assert status == PASS, detail
    assert detail.startswith("systemd not reachable (System has not been booted with systemd): "
                             "installed unit files analyzed offline (drop-ins not applied)")
    for unit in SHIPPED_UNITS:  # the apply unit, the only one holding capabilities, included
        assert f"{unit_dir / unit} " in detail
    assert detail.endswith("(each <= 2.0)")
    (unit_dir / "loaderd-audit.service").unlink()
    status, detail = compliance.check_hardening(view(tmp_path, {}), None)
    assert status == WARN and detail.startswith("not installed: loaderd-audit.service;")


@needs_analyze
def test_hardening_fails_above_two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The apply unit without its syscall filter and device/kernel protections is still "OK"
    (3.3, below systemd's 5.0 MEDIUM) but far from its measured 1.3: a HIGH failure."""
    unit_dir = installed_units(tmp_path, monkeypatch)
    apply_unit = unit_dir / "loaderd-apply.service"
    drop = ("SystemCallFilter=", "PrivateDevices=", "ProtectKernelModules=", "ProtectKernelLogs=")
    apply_unit.write_text("".join(line for line in apply_unit.read_text().splitlines(True)
                                  if not line.startswith(drop)))
    status, detail = compliance.check_hardening(view(tmp_path, {}), None)
    assert status == FAIL
    assert detail.startswith(f"{apply_unit}: exposure 3.3 OK, must be <= 2.0 [")
    assert "loaderd.service 0.3 SAFE" in detail
    results = {r.check: r for r in compliance.run(view(tmp_path, {}))}
    assert results["unit hardening (systemd-analyze security)"] in \
        compliance.high_failures(list(results.values()))
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    status, detail = compliance.check_hardening(view(tmp_path, {}), [str(bare)])
    assert status == FAIL and "must be <= 2.0" in detail
    assert "given unit files analyzed offline (drop-ins not applied)" in detail


@needs_analyze
def test_hardening_scores_given_unit_files(tmp_path: Path) -> None:
    shipped = [str(REPO / "units" / unit) for unit in SHIPPED_UNITS]
    status, detail = compliance.check_hardening(view(tmp_path, {}), shipped)
    assert status == PASS, detail
    assert "loaderd-apply.service 1.3 OK" in detail and "loaderd-audit.service 0.8" in detail


def test_hardening_prefers_the_loaded_units(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With systemd reachable, the loaded unit (drop-ins included) is scored, not the file; a
    unit systemd has not loaded falls back to its installed file, analyzed offline."""
    unit_dir = installed_units(tmp_path, monkeypatch)
    monkeypatch.setattr(compliance, "systemd_reachable", lambda: (True, "Version=252"))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    dropin = "/etc/systemd/system/loaderd-apply.service.d/x.conf"
    calls: list[list[str]] = []

    def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        unit = argv[-1]
        if argv[0] == "systemctl":
            state = "not-found" if unit == "loaderd-audit.service" else "loaded"
            out = (f"LoadState={state}\nFragmentPath=/usr/lib/systemd/system/{unit}\n"
                   f"DropInPaths={dropin if unit == 'loaderd-apply.service' else ''}\n")
            return subprocess.CompletedProcess(argv, 0, out, "")
        name = os.path.basename(unit)
        score = {"loaderd.service": "0.3 SAFE", "loaderd-apply.service": "2.4 OK"}.get(name,
                                                                                   "0.8 SAFE")
        return subprocess.CompletedProcess(
            argv, 0, f"→ Overall exposure level for {name}: {score} 😀\n", "")

    monkeypatch.setattr(compliance, "_run", run)
    status, detail = compliance.check_hardening(view(tmp_path, {}), None)
    analyzed = [c[2:] for c in calls if c[0] == "systemd-analyze"]
    assert analyzed == [["loaderd.service"], ["loaderd-apply.service"],
                        ["--offline=true", str(unit_dir / "loaderd-audit.service")]]
    assert status == FAIL
    assert detail.startswith("loaderd-apply.service: exposure 2.4 OK, must be <= 2.0 "
                             "[scored by the running systemd (loaded units, drop-ins applied): "
                             "loaderd.service 0.3 SAFE; "
                             f"loaderd-apply.service 2.4 OK (+ {dropin}); ")
    assert "audit.service 0.8 SAFE (not loaded (LoadState=not-found): file analyzed offline)" \
        in detail


def test_report_and_exit_semantics() -> None:
    results = [Result("a", HIGH, PASS, "ok"), Result("b", MEDIUM, FAIL, "meh"),
               Result("c", HIGH, WARN, "hmm"), Result("d", HIGH, SKIP, "n/a")]
    assert compliance.high_failures(results) == []
    data = compliance.as_json(results)
    # A WARN or SKIP on a high check is not a PASS: the verdict and exit code say which.
    assert data["passed"] is False and data["verdict"] == WARN
    assert data["counts"] == {PASS: 1, FAIL: 1, WARN: 1, SKIP: 1}
    assert data["high_not_passed"] == [{"check": "c", "status": WARN},
                                       {"check": "d", "status": SKIP}]
    assert compliance.exit_code(results) == 2
    assert compliance.render(results).endswith(
        "result: WARN (0 high-severity failures; WARN: c; SKIP: d)")
    assert compliance.exit_code([r for r in results if r.check != "c"]) == 3
    assert compliance.verdict(results[:2]) == PASS  # a medium FAIL does not hold it back
    assert compliance.exit_code(results[:2]) == 0
    results.append(Result("e", HIGH, FAIL, "bad"))
    assert [r.check for r in compliance.high_failures(results)] == ["e"]
    text = compliance.render(results)
    assert "[FAIL] e (high)" in text
    assert text.endswith("result: FAIL (1 high-severity failures; WARN: c; SKIP: d)")
    assert compliance.exit_code(results) == 1


def caps(eff: int = 0, bnd: int = 0, nnp: bool = True) -> privileges.CapState:
    return privileges.CapState(effective=eff, permitted=eff, inheritable=0, bounding=bnd,
                               ambient=0, no_new_privs=nnp)


@pytest.mark.parametrize(("state", "applying", "status", "text"), [
    (caps(), False, PASS, "every capability set empty"),
    (caps(bnd=1 << 39), False, WARN, "bounding set CAP_BPF; effective/permitted"),
    (caps(eff=1 << 39 | 1 << 38), False, FAIL, "effective CAP_PERFMON+CAP_BPF"),
    (caps(nnp=False), False, FAIL, "no capability, no_new_privs 0"),
    (caps(eff=1 << 39), True, WARN, "still applying"),
])
def test_daemon_caps_verdicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              state: privileges.CapState, applying: bool, status: str,
                              text: str) -> None:
    monkeypatch.setattr(compliance, "resident_pids", lambda _config: [4242])
    monkeypatch.setattr(privileges, "read_state", lambda _pid: state)
    monkeypatch.setattr(compliance, "_applying", lambda _pid: applying)
    got, detail = compliance.check_daemon_caps(view(tmp_path, {}))
    assert got == status and text in detail


def test_units_sharing_the_state_dir_agree_on_its_mode() -> None:
    """systemd sets a StateDirectory= to the starting unit's StateDirectoryMode=: one unit with
    0750 would lock the readers group out of manifest.json (they only traverse: 0751)."""
    modes = {}
    for unit in SHIPPED_UNITS:
        lines = (REPO / "units" / unit).read_text().splitlines()
        assert "StateDirectory=loaderd" in lines, unit
        (mode,) = [line.split("=", 1)[1] for line in lines
                   if line.startswith("StateDirectoryMode=")]
        modes[unit] = mode
    assert modes == dict.fromkeys(SHIPPED_UNITS, "0751")


def test_a_residents_forked_apply_child_is_seen_as_applying(tmp_path: Path) -> None:
    """`loaderd run` forks its apply child, which keeps the resident's argv: real processes
    (a script named loaderd that forks) show one resident, applying, not two residents."""
    import subprocess
    import sys
    import time

    conf = tmp_path / "loaderd.yaml"
    conf.write_text("loaderd: 1\n")
    script = tmp_path / "loaderd"
    script.write_text("import os, sys, time\nif os.fork() == 0:\n    time.sleep(60)\n"
                      "    os._exit(0)\nprint('forked', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script), "--config", str(conf), "run"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "forked\n"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not compliance._applying(proc.pid):
            time.sleep(0.05)  # the child's argv is in place once it runs
        assert compliance.resident_pids(str(conf)) == [proc.pid]
        assert compliance._applying(proc.pid)
    finally:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(c) for c in f.read().split()]
        for child in children:
            os.kill(child, 9)
        proc.kill()
        proc.wait()
