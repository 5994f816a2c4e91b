"""Compliance checks that need no kernel: helper re-check against the current policy, pin modes
on a plain directory tree, the resident daemon's command line, unit scoring, report/exit."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from loaderd import audit, compliance, privileges
from loaderd.clikit import DEFAULT_CONFIG
from loaderd.compliance import FAIL, HIGH, MEDIUM, PASS, SKIP, WARN, Result
from loaderd.ctl import View
from loaderd.model import PinOwnership, Policy, ProgType, Settings

REPO = Path(__file__).resolve().parents[2]


def view(tmp_path: Path, specs: dict[str, Any] | None = None, **settings: Any) -> View:
    manifest = None if specs is None else {"status": "committed", "specs": specs}
    settings.setdefault("path", str(tmp_path / "loaderd.yaml"))  # no resident daemon uses it
    s = Settings(bpffs_root=str(tmp_path / "pins"), state_dir=str(tmp_path / "state"),
                 **settings)
    return View(s, manifest, None if specs is not None else "no manifest")


def prog(helpers: list[str], ptype: str = "socket_filter") -> dict[str, Any]:
    return {"id": 1, "tag": "00", "type": ptype, "helpers": helpers, "function": "f"}


def test_helpers_rechecked_against_the_current_policy(tmp_path: Path) -> None:
    specs = {"a": {"programs": {"f": prog(["map_lookup_elem", "ktime_get_ns"])}},
             "b": {"programs": {"g": prog(["trace_printk"])}}}
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
    assert v.manifest is not None
    v.manifest["status"] = "pending"
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
    (["/usr/bin/python3", "-m", "loaderd.ctl", "status"], None),
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


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_hardening_scores_unit_files(tmp_path: Path) -> None:
    v = view(tmp_path, {})
    shipped = [str(REPO / "units" / "loaderd.service"), str(REPO / "units" /
                                                           "loaderd-audit.service")]
    status, detail = compliance.check_hardening(v, shipped)
    assert status == PASS and "loaderd.service" in detail and "loaderd-audit.service" in detail
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    status, detail = compliance.check_hardening(v, [str(bare)])
    assert status == FAIL and "must be < 5.0" in detail


def test_report_and_exit_semantics() -> None:
    results = [Result("a", HIGH, PASS, "ok"), Result("b", MEDIUM, FAIL, "meh"),
               Result("c", HIGH, WARN, "hmm"), Result("d", HIGH, SKIP, "n/a")]
    assert compliance.high_failures(results) == []
    data = compliance.as_json(results)
    assert data["passed"] is True and data["counts"] == {PASS: 1, FAIL: 1, WARN: 1, SKIP: 1}
    results.append(Result("e", HIGH, FAIL, "bad"))
    assert [r.check for r in compliance.high_failures(results)] == ["e"]
    text = compliance.render(results)
    assert "[FAIL] e (high)" in text and text.endswith("result: FAIL (1 high-severity failures)")


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
