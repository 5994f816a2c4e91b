"""A root run before the package: the service takes its programs over, reloading nothing.

An operator runs `loaderd apply` by hand as root with the package's paths (/var/lib/loaderd,
/sys/fs/bpf/loaderd) and no readers' group - as the README demo did before it got paths of its
own, which is how CI found this. Installing the .deb and starting the service must then give a
running service that adopts those programs - not a unit that fails because root's 0600 manifest
and pins are unreadable to the service user (what happened before tmpfiles.d handed them over).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from sysd import Systemd

from loaderd.audit.log import Event

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
ROOT = "/sys/fs/bpf/loaderd"

DEMO_CONF = """loaderd: 1
programs_dir: /run/e2e/host/src/configs/programs.d
bpffs_root: /sys/fs/bpf/loaderd
state_dir: /var/lib/loaderd
"""


def _stat(sysd: Systemd, path: str) -> list[str]:
    return sysd.run("stat", "-c", "%U:%G %a", path).stdout.split()


def _prog_ids(sysd: Systemd) -> dict[str, int]:
    """pin path -> prog id, for every program pinned under the root (bpftool, not loaderd)."""
    out: dict[str, int] = {}
    for pin in sysd.run("find", ROOT, "-path", "*/progs/*").stdout.split():
        info: dict[str, Any] = json.loads(sysd.run("bpftool", "-j", "prog", "show", "pinned",
                                                   pin).stdout)
        out[pin] = int(info["id"])
    return out


@pytest.fixture(scope="module")
def demo_then_package(sysd: Systemd, deb: Path) -> tuple[Systemd, dict[str, int]]:
    # The demo, as root, from a source tree (no package, no loaderd user yet).
    src = sysd.hostdir / "src"
    shutil.copytree(REPO / "loaderd", src / "loaderd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", src / "configs")
    (src / "demo.yaml").write_text(DEMO_CONF)
    sysd.run("env", "PYTHONPATH=/run/e2e/host/src", "/usr/bin/python3", "-m", "loaderd",
             "--config", "/run/e2e/host/src/demo.yaml", "apply", timeout=300)
    assert _stat(sysd, "/var/lib/loaderd/manifest.json") == ["root:root", "600"]
    before = _prog_ids(sysd)
    assert before, "the demo pinned nothing"
    # Then the package, the shipped examples (the same files) and the service.
    sysd.install_deb(deb)
    sysd.sh("cp /usr/share/doc/loaderd/examples/programs.d/* /etc/loaderd/programs.d/")
    sysd.systemctl("start", "loaderd.service", timeout=300)
    return sysd, before


def test_service_adopts_a_root_run_without_reloading(
        demo_then_package: tuple[Systemd, dict[str, int]]) -> None:
    sysd, before = demo_then_package
    props = sysd.show("loaderd.service", "ActiveState", "SubState")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    # The same kernel programs, still pinned where the demo put them: nothing was reloaded.
    assert _prog_ids(sysd) == before
    manifest = json.loads(sysd.run("cat", "/var/lib/loaderd/manifest.json").stdout)
    assert manifest["last_apply"]["compiles"] == 0
    assert sorted(manifest["last_apply"]["adopted"]) == sorted(manifest["specs"])


def test_root_state_is_handed_to_the_service_user(
        demo_then_package: tuple[Systemd, dict[str, int]]) -> None:
    sysd, before = demo_then_package
    assert _stat(sysd, "/var/lib/loaderd") == ["loaderd:loaderd", "751"]
    assert _stat(sysd, "/var/lib/loaderd/manifest.json") == ["loaderd:loaderd-readers", "640"]
    assert sysd.run("find", "/var/lib/loaderd", "!", "-user", "loaderd").stdout == ""
    # Pins: the service user's, with the shipped config's mode and readers' group (the demo's
    # were root:root 0600), and the pin root keeps the tmpfiles.d grant.
    assert _stat(sysd, ROOT) == ["loaderd:loaderd-readers", "750"]
    for pin in before:
        assert _stat(sysd, pin) == ["loaderd:loaderd-readers", "640"], pin
    # A decision, so an audit event: which pins were re-moded, journaled by the apply unit.
    mid = Event.PIN_WRITTEN.message_id
    msgs = [e["MESSAGE"] for e in sysd.journal_json("-u", "loaderd-apply.service",
                                                    f"MESSAGE_ID={mid}")]
    assert any(re.search(r"adopted pins given mode 0640", str(m)) for m in msgs), msgs


def test_readers_can_read_the_adopted_maps(
        demo_then_package: tuple[Systemd, dict[str, int]]) -> None:
    sysd, _ = demo_then_package
    sysd.run("useradd", "-M", "-G", "loaderd-readers", "e2e-reader")
    out = sysd.run("runuser", "-u", "e2e-reader", "--", "loaderctl", "dump",
                   "exec_counter/exec_count").stdout
    assert re.search(r"^0: \d+$", out, re.M), out


def test_kill_switch_holds_across_a_restart_until_enabled(
        demo_then_package: tuple[Systemd, dict[str, int]]) -> None:
    """`loaderd disable` is not undone by `systemctl restart` (or a reboot with the unit
    enabled): the apply unit refuses, the resident runs with nothing applied; `loaderd enable`
    and a reload bring the programs back."""
    sysd, _ = demo_then_package
    conf = "/etc/loaderd/loaderd.yaml"
    sysd.run("loaderd", "disable", "--config", conf)
    sysd.systemctl("restart", "loaderd.service", timeout=300)
    assert sysd.show("loaderd-apply.service", "Result")["Result"] == "exit-code"
    props = sysd.show("loaderd.service", "ActiveState", "StatusText")
    assert props["ActiveState"] == "active" and re.match(
        r"kill switch pulled at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: nothing applied until "
        r"`loaderd enable`", props["StatusText"]), props
    shown = sysd.run("loaderd", "status", "--config", conf, check=False)
    assert shown.returncode == 4 and "kill switch pulled" in shown.stdout, shown  # not applied
    assert sysd.run("ls", "-A", ROOT).stdout == ""  # the root stays (tmpfiles.d's), empty
    said = sysd.journalctl("-u", "loaderd-apply.service", "-n", "20").stdout
    assert "runs `loaderd enable`" in said, said
    assert "kill switch released" in sysd.run("loaderd", "enable", "--config", conf).stdout
    sysd.systemctl("reload", "loaderd.service", timeout=300)
    assert sysd.run("test", "-e", f"{ROOT}/exec_counter/links/count_exec").returncode == 0
