"""observe.metrics: the text node_exporter's textfile collector reads, from a status report;
`promtool check metrics` (Debian's prometheus package) must find nothing to lint."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loaderd.observe import metrics
from loaderd.store import textfile
from loaderd.store.manifest import LastApply
from loaderd.store.statedir import Refusal


def _report(status: str = "committed", drift: list[str] | None = None) -> dict[str, Any]:
    prog = {"name": "count_exec", "type": "tracepoint", "facts": "kernel", "run_cnt": 7,
            "run_time_ns": 1500}
    return {"manifest": {"readable": True, "status": status},
            "specs": [{"spec": "exec_counter", "drift": drift or [], "degraded": False,
                       "programs": [prog, {"name": "b", "type": "tracepoint", "facts": "kernel"}],
                       "maps": [{"name": "m", "type": "hash", "entries": 9, "fill": 0.9},
                                {"name": "n", "facts": "none"}],
                       "links": [{"program": "count_exec", "type": "perf_event"}],
                       "signature": {"status": "verified"}}]}


def _parse(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_values_follow_the_report() -> None:
    last = LastApply(1000.0, 2, ("a", "b"), (), 1.25)
    text = metrics.render(metrics.samples(metrics.Inputs(
        _report(drift=["map pin missing: /x"]), last, None,
        (metrics.RingCount("exec_counter", "events", 10, 3, 5),), 2000.0)))
    got = _parse(text)
    assert got['loaderd_programs{spec="exec_counter",type="tracepoint"}'] == 2
    assert got['loaderd_maps{spec="exec_counter",type="hash"}'] == 1
    assert got['loaderd_maps{spec="exec_counter",type="unknown"}'] == 1
    assert got['loaderd_links{spec="exec_counter",type="perf_event"}'] == 1
    assert got['loaderd_spec_drift{spec="exec_counter"}'] == 1
    assert got['loaderd_spec_drift_differences{spec="exec_counter"}'] == 1
    assert got["loaderd_last_apply_success"] == 1
    assert got["loaderd_last_apply_duration_seconds"] == 1.25
    assert got["loaderd_last_apply_compiles"] == 2
    assert got["loaderd_kill_switch_pulled"] == 0
    assert got['loaderd_events_dropped_total{map="events",spec="exec_counter"}'] == 3
    assert got['loaderd_events_lost_total{map="events",spec="exec_counter"}'] == 5
    assert got['loaderd_map_fill_ratio{map="m",spec="exec_counter",type="hash"}'] == 0.9
    assert 'loaderd_map_fill_ratio{map="n"' not in text  # not read: no fill to report
    assert got['loaderd_program_runs_total{program="count_exec",spec="exec_counter",'
               'type="tracepoint"}'] == 7
    assert got['loaderd_program_run_time_seconds_total{program="count_exec",'
               'spec="exec_counter",type="tracepoint"}'] == 1.5e-06
    assert got['loaderd_spec_signature{spec="exec_counter",status="verified"}'] == 1
    assert 'program="b"' not in text  # the kernel counted nothing for it: no counter
    assert "loaderd_last_refusal_timestamp_seconds" not in text


def test_refusal_after_the_last_apply_and_the_kill_switch() -> None:
    got = _parse(metrics.render(metrics.samples(metrics.Inputs(
        _report(status="disabled"), LastApply(1000.0, 0, (), ()), Refusal(1001.0, 3, "x"),
        now=5.0))))
    assert got["loaderd_last_apply_success"] == 0
    assert got["loaderd_last_refusal_errors"] == 3
    assert got["loaderd_kill_switch_pulled"] == 1
    assert "loaderd_last_apply_duration_seconds" not in got
    # an older refusal record than the last apply that went through does not count
    older = _parse(metrics.render(metrics.samples(metrics.Inputs(
        _report(), LastApply(1000.0, 0, (), ()), Refusal(999.0, 1, "x")))))
    assert older["loaderd_last_apply_success"] == 1


def test_label_values_are_escaped() -> None:
    text = metrics.render([metrics.Sample("loaderd_specs", (("x", 'a"b\\c\nd'),), 1.0)])
    assert 'loaderd_specs{x="a\\"b\\\\c\\nd"} 1' in text
    with pytest.raises(ValueError):
        metrics.render([metrics.Sample("loaderd_nope", (), 1.0)])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="prometheus (promtool) missing")
def test_promtool_lints_nothing(tmp_path: Path) -> None:
    text = metrics.render(metrics.samples(metrics.Inputs(
        _report(), LastApply(1000.0, 2, (), (), 0.5), Refusal(1001.0, 3, "x"),
        (metrics.RingCount("exec_counter", "events", 10, 3, 5),), 2000.0)))
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                          capture_output=True)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout + proc.stderr)


def test_textfile_write_is_atomic_and_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        path = textfile.write(str(tmp_path), "loaderd.prom", "a 1\n")
        textfile.write(str(tmp_path), "loaderd.prom", "a 2\n")
    finally:
        os.umask(old)
    assert Path(path).read_text() == "a 2\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["loaderd.prom"]  # no temp file left
    with pytest.raises(ValueError):
        textfile.write(str(tmp_path), "../x.prom", "")
    os.symlink(tmp_path, tmp_path.parent / "link-dir")
    with pytest.raises(OSError):  # O_NOFOLLOW on the directory
        textfile.write(str(tmp_path.parent / "link-dir"), "loaderd.prom", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_textfile_write_never_blocks_on_a_planted_fifo_nor_writes_a_users_dir(
        tmp_path: Path) -> None:
    """The directory's parent is prometheus's on Debian: a swapped directory with a FIFO at the
    temp name must neither hang the resident nor be written."""
    os.mkfifo(tmp_path / f".loaderd.prom.{os.getpid()}.tmp")
    textfile.write(str(tmp_path), "loaderd.prom", "a 1\n")  # returns: the FIFO is replaced
    assert (tmp_path / "loaderd.prom").read_text() == "a 1\n"
    assert sorted(os.listdir(tmp_path)) == ["loaderd.prom"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PermissionError):
        textfile.write(str(theirs), "loaderd.prom", "a 1\n")
    assert os.listdir(theirs) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setuid)")
def test_grant_lets_that_user_alone_write() -> None:
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody").pw_uid
    with tempfile.TemporaryDirectory(dir="/tmp") as top:  # traversable (tmp_path is 0700)
        os.chmod(top, 0o755)
        _grant_and_write(Path(top) / "textfile", nobody)


def _grant_and_write(d: Path, nobody: int) -> None:
    d.mkdir(mode=0o755)
    assert textfile.grant(str(d), nobody) and not textfile.grant(str(d), nobody)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o775  # group bits show the ACL mask
    pid = os.fork()
    if pid == 0:  # the granted user writes through the ACL entry
        os.setuid(nobody)
        try:
            textfile.write(str(d), "loaderd.prom", "a 1\n")
            os._exit(0)
        except OSError:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    assert (d / "loaderd.prom").stat().st_uid == nobody
    os.chown(d, nobody, -1)
    with pytest.raises(PermissionError):  # only a root-owned directory
        textfile.grant(str(d), nobody)


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="prometheus (promtool) missing")
def test_alert_rules_check_and_name_only_metrics_loaderd_writes() -> None:
    import json
    import re

    rules = DEPLOY / "prometheus" / "loaderd.rules.yml"
    proc = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dashboard = json.loads((DEPLOY / "grafana" / "loaderd-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\bloaderd_[a-z_]+", rules.read_text() + "\n".join(exprs)))
    assert used and used <= set(metrics.FAMILIES), used - set(metrics.FAMILIES)
    for alert in ("LoaderdDrift", "LoaderdApplyRefused", "LoaderdKillSwitchPulled",
                  "LoaderdForeignProgram"):
        assert f"alert: {alert}" in rules.read_text()
