"""A rollback holds (issue 12 item 6), on the real kernel: after `loaderd rollback` every later
apply (what `systemctl reload` and a restart run) re-applies the rolled-back generation, not
programs_dir, until programs_dir changes (its content hash) or `loaderd rollback --release`;
status and the audit trail say which. Also: an adopt-only apply does not rewrite the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import loaderd
from tests.kernel.test_lifecycle import COUNTER, counter_conf, prog_tag

pytestmark = pytest.mark.kernel
__all__ = ["counter_conf"]  # the fixture, imported for its use below


def events(proc: Any, kind: str) -> list[dict[str, Any]]:
    """The audit events (JSON lines on stderr without a journal socket) of one kind."""
    out = []
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            if e["event"] == kind:
                out.append(e)
    return out


def status(conf: Path) -> tuple[int, dict[str, Any], str]:
    text = loaderd("--config", str(conf), "status", check=False)
    js = loaderd("--config", str(conf), "status", "--json", check=False)
    return text.returncode, json.loads(js.stdout), text.stdout


def two_versions(conf: Path, bpffs_root: str) -> tuple[str, str, Path]:
    """v1 (step 1) then v2 (step 100) applied: (tag v1, tag v2, the spec file)."""
    spec = conf.parent / "specs" / "counter.yaml"
    loaderd("--config", str(conf), "apply")
    prog = f"{bpffs_root}/counter/progs/count_exec"
    v1 = prog_tag(prog)[1]
    spec.write_text(COUNTER.format(step=100))
    loaderd("--config", str(conf), "apply")
    v2 = prog_tag(prog)[1]
    assert v1 != v2
    return v1, v2, spec


def test_rollback_holds_across_applies_until_programs_dir_changes(
        counter_conf: Path, bpffs_root: str) -> None:
    conf = counter_conf
    prog = f"{bpffs_root}/counter/progs/count_exec"
    v1, v2, spec = two_versions(conf, bpffs_root)
    out = loaderd("--config", str(conf), "rollback")
    assert "held across reloads and restarts" in out.stdout, out.stdout
    assert prog_tag(prog)[1] == v1
    # What a reload or a restart runs: before, this re-applied programs_dir (v2) silently.
    again = loaderd("--config", str(conf), "apply")
    assert prog_tag(prog)[1] == v1, again.stdout + again.stderr
    held = events(again, "rollback")
    assert len(held) == 1 and held[0]["message"].startswith("rollback held: applying generation")
    rc, js, text = status(conf)
    assert rc == 0
    assert js["manifest"]["rollback"]["programs_dir_changed"] is False
    assert "rolled back to generation " in text and "`loaderd rollback --release`" in text, text
    # The operator changes /etc: the hold ends, said, and /etc is what gets applied.
    spec.write_text(COUNTER.format(step=7))
    _, js, text = status(conf)
    assert js["manifest"]["rollback"]["programs_dir_changed"] is True
    assert "programs_dir changed since: the next apply releases it" in text, text
    changed = loaderd("--config", str(conf), "apply")
    v3 = prog_tag(prog)[1]
    assert v3 not in (v1, v2)
    released = events(changed, "rollback")
    assert len(released) == 1 and "released: " in released[0]["message"], released
    assert f"{conf.parent / 'specs'} changed since" in released[0]["message"]
    assert status(conf)[1]["manifest"]["rollback"] is None
    loaderd("--config", str(conf), "apply")
    assert prog_tag(prog)[1] == v3  # no hold any more


def test_release_applies_programs_dir_again(counter_conf: Path, bpffs_root: str) -> None:
    conf = counter_conf
    prog = f"{bpffs_root}/counter/progs/count_exec"
    v1, v2, _spec = two_versions(conf, bpffs_root)
    loaderd("--config", str(conf), "rollback")
    assert prog_tag(prog)[1] == v1
    out = loaderd("--config", str(conf), "rollback", "--release")
    assert "released" in out.stdout and prog_tag(prog)[1] == v2, out.stdout
    assert status(conf)[1]["manifest"]["rollback"] is None
    nothing = loaderd("--config", str(conf), "rollback", "--release")
    assert "no rollback is held" in nothing.stdout


def test_a_refused_rollback_holds_nothing(counter_conf: Path, bpffs_root: str) -> None:
    conf = counter_conf
    two_versions(conf, bpffs_root)
    # The policy of the day refuses the old generation (tracepoint programs no longer
    # allowed): the rollback is refused and nothing is held.
    conf.write_text(conf.read_text() + "policy:\n  program_types: [xdp]\n")
    out = loaderd("--config", str(conf), "rollback", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert any("not held" in e["message"] for e in events(out, "rollback")), out.stderr
    assert not os.path.exists(conf.parent / "state" / "rollback.json")


def test_an_apply_that_changes_nothing_does_not_rewrite_the_manifest(
        counter_conf: Path) -> None:
    loaderd("--config", str(counter_conf), "apply")
    manifest = counter_conf.parent / "state" / "manifest.json"
    before = os.stat(manifest)
    out = loaderd("--config", str(counter_conf), "apply")
    assert "compiles 0" in out.stdout
    after = os.stat(manifest)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert events(out, "spec_accepted") == []  # unchanged specs are adopted, not "accepted"
    assert len(events(out, "adopted")) == 1
    assert "1 spec unchanged" in events(out, "adopted")[0]["message"]


def test_the_kill_switch_wins_over_a_held_rollback(counter_conf: Path, bpffs_root: str) -> None:
    conf = counter_conf
    prog = f"{bpffs_root}/counter/progs/count_exec"
    v1, _v2, _spec = two_versions(conf, bpffs_root)
    loaderd("--config", str(conf), "rollback")
    loaderd("--config", str(conf), "disable")
    refused = loaderd("--config", str(conf), "apply", check=False)
    assert refused.returncode == 1 and "kill switch pulled" in refused.stderr
    assert events(refused, "rollback") == []  # nothing is applied, held or not
    loaderd("--config", str(conf), "enable")
    loaderd("--config", str(conf), "apply")
    assert prog_tag(prog)[1] == v1  # the hold outlived the switch: /etc did not change


def test_plan_predicts_the_held_generation_and_apply_plan_agrees(
        counter_conf: Path, bpffs_root: str, tmp_path: Path) -> None:
    """While a rollback holds, `loaderd plan` plans what the apply builds (the held generation,
    nothing to do), and `apply --plan` accepts that plan; a change to /etc after it makes the
    plan stale (the apply would release the hold and build /etc)."""
    conf = counter_conf
    prog = f"{bpffs_root}/counter/progs/count_exec"
    v1, _v2, spec = two_versions(conf, bpffs_root)
    loaderd("--config", str(conf), "rollback")
    plan_file = tmp_path / "plan.json"
    out = loaderd("--config", str(conf), "plan", "--out", str(plan_file), check=False)
    assert out.returncode == 0, out.stdout + out.stderr  # held generation applied: nothing to do
    assert "rollback held: the apply builds generation" in out.stdout, out.stdout
    assert json.loads(plan_file.read_text())["held_generation"]
    ok = loaderd("--config", str(conf), "apply", "--plan", str(plan_file), check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert prog_tag(prog)[1] == v1
    spec.write_text(COUNTER.format(step=9))
    stale = loaderd("--config", str(conf), "apply", "--plan", str(plan_file), check=False)
    assert stale.returncode != 0 and "stale plan" in stale.stdout + stale.stderr
    assert prog_tag(prog)[1] == v1
    assert not events(stale, "rollback") and status(conf)[1]["manifest"]["rollback"], \
        "a stale plan released the hold"  # "nothing was changed" means the hold too
