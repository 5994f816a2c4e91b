"""The package's lifecycle as Debian users expect it, on a real systemd 252 (issue 12 item 10):
installing changes nothing host-wide (the grants come when the service starts), `apt remove`
stops and disables every unit and the timer and detaches loaderd's programs while its tools are
still there, `apt purge` also drops the state, and neither leaves the system degraded.

The tests run in file order on one systemd. tracefs is shared with the host (and with other
test runs), so this module's namespace gets its own stand-in: a tmpfs over /sys/kernel/tracing
with one event id file, modes as the kernel makes them. The specs used attach without tracefs
(XDP, raw tracepoint); bpffs is the namespace's own instance (0700, as systemd mounts it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sysd import Systemd

import loaderd
from loaderd.audit.log import Event

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
ROOT = "/sys/fs/bpf/loaderd"
TRACING = "/sys/kernel/tracing"
EVENT_ID = f"{TRACING}/events/sched/sched_switch/id"
SPECS = ("xdp_counter.yaml", "sched_switches.yaml")  # no tracefs needed to attach
UNITS = ("loaderd.service", "loaderd-apply.service", "loaderd-handover.socket",
         "loaderd-audit.service", "loaderd-audit.timer")
BPFFS_MOUNTED = "1700 root:root"  # mode=0700 as systemd mounts it; the kernel adds the sticky bit
APT = {"DEBIAN_FRONTEND": "noninteractive"}


def mode(sysd: Systemd, path: str) -> str:
    return sysd.run("stat", "-c", "%a %U:%G", path).stdout.strip()


def prog_ids(sysd: Systemd) -> list[int]:
    pins = sysd.run("find", ROOT, "-path", "*/progs/*", "-type", "f").stdout.split()
    return [json.loads(sysd.run("bpftool", "-j", "prog", "show", "pinned", p).stdout)["id"]
            for p in pins]


def gone(sysd: Systemd, ids: list[int], timeout: float = 10.0) -> list[int]:
    """The ids still loaded after timeout (freeing a program follows its last reference)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [i for i in ids if sysd.run("bpftool", "prog", "show", "id", str(i),
                                           check=False).returncode == 0]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def loaderd_units(sysd: Systemd) -> list[str]:
    """Every loaderd unit systemd still has loaded (active, failed or just referenced)."""
    out = sysd.systemctl("list-units", "--all", "--plain", "--no-legend", *UNITS).stdout
    return [line for line in out.splitlines() if line.strip()]


def not_degraded(sysd: Systemd) -> None:
    failed = sysd.systemctl("--failed", "--plain", "--no-legend").stdout.strip()
    assert failed == "", failed
    state = sysd.run("systemctl", "is-system-running", check=False).stdout.strip()
    assert state == "running", state


def enablement_links(sysd: Systemd) -> str:
    return sysd.run("find", "/etc/systemd/system", "-name", "loaderd.service", "-o", "-name",
                    "loaderd-a*").stdout.strip()


def kill_switch_events(sysd: Systemd, since: str) -> list[str]:
    return [str(e["MESSAGE"]) for e in sysd.journal_json(
        f"--since={since}", f"MESSAGE_ID={Event.KILL_SWITCH.message_id}")]


def now(sysd: Systemd) -> str:
    return sysd.run("date", "+@%s.%N").stdout.strip()


def start_with_specs(sysd: Systemd) -> list[int]:
    sysd.run("mkdir", "-p", "/etc/loaderd/programs.d")
    for name in SPECS:
        sysd.run("cp", f"/usr/share/doc/loaderd/examples/programs.d/{name}",
                 "/etc/loaderd/programs.d/")
    sysd.systemctl("enable", "--now", "loaderd.service", "loaderd-audit.timer", timeout=300)
    ids = prog_ids(sysd)
    assert len(ids) == len(SPECS), ids
    return ids


@pytest.fixture(scope="module")
def host(sysd: Systemd) -> Systemd:
    """The namespace with its own tracefs stand-in, before anything is installed, and without
    the host image's Docker policy-rc.d (exit 101: "start or stop no service"), which no
    Debian system has and which would keep the maintainer scripts from stopping anything."""
    sysd.run("rm", "-f", "/usr/sbin/policy-rc.d")  # the namespace's /usr overlay only
    sysd.sh(f"mount -t tmpfs -o mode=0700 loaderd-e2e-tracefs {TRACING}\n"
            f"mkdir -p {Path(EVENT_ID).parent}\n"
            f"echo 42 > {EVENT_ID}\n"
            f"chmod 0440 {EVENT_ID}")
    not_degraded(sysd)
    return sysd


def test_install_changes_no_host_mode_until_the_service_starts(host: Systemd, deb: Path) -> None:
    sysd = host
    sysd.install_deb(deb)
    # Installed, nothing started or enabled, and nothing host-wide touched.
    for unit in ("loaderd.service", "loaderd-audit.timer"):
        assert sysd.systemctl("is-enabled", unit, check=False).stdout.strip() == "disabled"
        assert sysd.systemctl("is-active", unit, check=False).stdout.strip() == "inactive"
    assert mode(sysd, "/sys/fs/bpf") == BPFFS_MOUNTED
    assert sysd.run("test", "-e", ROOT, check=False).returncode == 1
    assert mode(sysd, TRACING) == "700 root:root"
    assert mode(sysd, EVENT_ID) == "440 root:root"
    # The tools say their version; man finds their pages.
    for tool in ("loaderd", "loaderctl"):
        assert sysd.run(tool, "--version").stdout == f"{tool} {loaderd.__version__}\n"
    for page in ("loaderd", "loaderctl", "loaderd.yaml", "loaderd-spec"):
        assert sysd.run("man", "-w", page).stdout.strip().endswith(".gz"), page
    # The package's own directories are there (tmpfiles.d at install).
    assert mode(sysd, "/var/lib/loaderd") == "751 loaderd:loaderd"
    assert mode(sysd, "/etc/loaderd/programs.d") == "755 root:root"
    # Starting the service is what grants them (loaderd-apply's ExecStartPre=).
    start_with_specs(sysd)
    assert mode(sysd, "/sys/fs/bpf") == "711 root:root"
    assert mode(sysd, ROOT) == "750 loaderd:loaderd-readers"
    assert mode(sysd, TRACING) == "710 root:loaderd"
    assert mode(sysd, EVENT_ID) == "440 root:loaderd"


def test_upgrade_restarts_and_keeps_programs_attached(host: Systemd, deb: Path) -> None:
    """Reinstalling (dpkg's upgrade path: prerm upgrade, postinst configure OLD) restarts the
    running service into the new code; the kill switch is for removal only, so the same
    programs stay attached (re-adopted, not reloaded)."""
    sysd = host
    ids = running(sysd, deb)
    before = sysd.show("loaderd.service", "ExecMainPID")["ExecMainPID"]
    sysd.install_deb(deb)
    sysd.wait_for("loaderd.service", "active")
    assert sysd.show("loaderd.service", "ExecMainPID")["ExecMainPID"] != before  # restarted
    assert sorted(prog_ids(sysd)) == sorted(ids)
    assert sysd.systemctl("is-enabled", "loaderd.service").stdout.strip() == "enabled"


def running(sysd: Systemd, deb: Path) -> list[int]:
    """Installed, started with the specs (each test stands alone): the programs' ids."""
    if sysd.run("dpkg-query", "-W", "-f", "${Status}", "loaderd",
                check=False).stdout != "install ok installed":
        sysd.install_deb(deb)
    if sysd.systemctl("is-active", "loaderd.service", check=False).stdout.strip() != "active":
        return start_with_specs(sysd)
    return prog_ids(sysd)


def test_remove_stops_disables_and_detaches(host: Systemd, deb: Path) -> None:
    sysd = host
    ids = running(sysd, deb)
    assert ids
    since = now(sysd)
    out = sysd.run("apt-get", "remove", "-y", "loaderd", env=APT, timeout=300)
    # Every unit and the timer: stopped, disabled, forgotten; nothing failed or degraded.
    assert loaderd_units(sysd) == []
    assert enablement_links(sysd) == ""
    not_degraded(sysd)
    # The kill switch ran, with the tools still installed; prerm advises no removed tool.
    assert gone(sysd, ids) == [], "programs still loaded after remove"
    assert sysd.run("ls", "-A", ROOT).stdout == ""
    assert kill_switch_events(sysd, since), "no kill switch event journaled"
    assert "loaderctl" not in out.stdout + out.stderr
    # Host-wide modes put back; the configuration stays (remove, not purge), and the state
    # says nothing is applied, not "disabled": a reinstall starts like a fresh one.
    assert mode(sysd, "/sys/fs/bpf") == BPFFS_MOUNTED
    assert mode(sysd, TRACING) == "700 root:root"
    assert mode(sysd, EVENT_ID) == "440 root:root"
    sysd.run("test", "-f", "/etc/loaderd/loaderd.yaml")
    manifest = json.loads(sysd.run("cat", "/var/lib/loaderd/manifest.json").stdout)
    assert manifest["status"] == "empty", manifest
    # Purging the removed package drops the state and the empty pin root.
    sysd.run("apt-get", "purge", "-y", "loaderd", env=APT, timeout=300)
    for path in ("/var/lib/loaderd", ROOT, "/etc/loaderd/loaderd.yaml"):
        assert sysd.run("test", "-e", path, check=False).returncode == 1, path
    not_degraded(sysd)


def test_purge_runs_the_kill_switch_before_the_tools_go(host: Systemd, deb: Path) -> None:
    sysd = host
    ids = running(sysd, deb)  # the specs are the operator's: a purge before left them in /etc
    since = now(sysd)
    out = sysd.run("apt-get", "purge", "-y", "loaderd", env=APT, timeout=300)
    assert gone(sysd, ids) == [], "programs still loaded after purge"
    assert kill_switch_events(sysd, since), "no kill switch event journaled"
    assert "loaderctl" not in out.stdout + out.stderr
    # no bytecode left behind (the operator's specs keep /etc/loaderd, as they should)
    left = [ln for ln in (out.stdout + out.stderr).splitlines() if "not empty so not removed" in ln]
    assert not [ln for ln in left if "dist-packages" in ln], left
    for path in ("/var/lib/loaderd", ROOT, "/usr/bin/loaderd", "/etc/loaderd/loaderd.yaml",
                 "/usr/lib/python3/dist-packages/loaderd",
                 "/var/lib/prometheus/node-exporter/loaderd.prom"):
        assert sysd.run("test", "-e", path, check=False).returncode == 1, path
    assert loaderd_units(sysd) == []
    assert enablement_links(sysd) == ""
    not_degraded(sysd)
    assert mode(sysd, "/sys/fs/bpf") == BPFFS_MOUNTED
    assert mode(sysd, TRACING) == "700 root:root"
