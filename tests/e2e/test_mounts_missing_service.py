"""bpffs unmounted under a running loaderd, bpffs missing at its start, tracefs missing at an
apply (issue 17), on a real systemd 252. The namespace's bpffs is the only one at /sys/fs/bpf
(sysd.py; checked again here: unmounting it must never show the host's), and its mounts are
made shared as on a booted host, so that an unmount reaches the units' namespaces. The host's
bpffs and tracefs are never touched.

Before: the resident said only "DRIFT in 5: ..." (every pin of every spec missing) and a
reload failed in ExecStartPre= (tmpfiles: "Failed to create directory") with nothing in
STATUS=. Now one sentence names the mount point, in STATUS=, the journal and `loaderd status`;
the apply refuses with it and the fix; mount + reload (or restart) restores the set.
"""

from __future__ import annotations

import os
import re

import pytest
from sysd import Systemd
from test_operator import APPLY, N_EXAMPLES, UNIT, status_rc, status_text

pytestmark = pytest.mark.systemd

BPFFS = "/sys/fs/bpf"
GONE = (r"no bpf filesystem is mounted at /sys/fs/bpf \(the pin root /sys/fs/bpf/loaderd is "
        r"below it\): every pin there is gone")
DROPIN = "/etc/systemd/system/loaderd.service.d/drift.conf"
APPLIED = f"{N_EXAMPLES} specs applied"


def host_bpffs_dev() -> int:
    return os.stat(BPFFS).st_dev


def mounted(sysd: Systemd) -> bool:
    return sysd.run("mountpoint", "-q", BPFFS, check=False).returncode == 0


def unmount(sysd: Systemd) -> None:
    assert int(sysd.run("stat", "-c", "%d", BPFFS).stdout) != host_bpffs_dev()
    sysd.run("umount", "-l", BPFFS)
    assert not mounted(sysd)  # an empty directory on sysfs, as on a host without bpffs


def mount(sysd: Systemd) -> None:
    sysd.run("mount", "-t", "bpf", "-o", "mode=0700", "bpf", BPFFS)


def resident_view(sysd: Systemd) -> str:
    pid = sysd.show(UNIT, "MainPID")["MainPID"]
    return next((line for line in sysd.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines()
                 if line.split()[4] == BPFFS), "")


def test_setup(installed: Systemd) -> None:
    sysd = installed
    # One layer, the namespace's own (sysd.py unmounted the host's copy below it).
    assert int(sysd.run("stat", "-c", "%d", BPFFS).stdout) != host_bpffs_dev()
    assert len(sysd.run("findmnt", "-n", "-o", "SOURCE", BPFFS).stdout.split()) == 1
    sysd.run("mount", "--make-rshared", "/")  # as systemd does on a host (not in containers)
    # The drift tick every 2 s (30 s as shipped) keeps the test short.
    sysd.write(DROPIN, "[Service]\nExecStart=\nExecStart=/usr/bin/loaderd run --no-apply "
               "--config /etc/loaderd/loaderd.yaml --drift-interval 2\n")
    sysd.systemctl("daemon-reload")
    sysd.systemctl("enable", "--now", UNIT, timeout=300)
    assert status_text(sysd, f"^{APPLIED}") == APPLIED


def test_bpffs_unmounted_under_the_running_resident(installed: Systemd) -> None:
    sysd = installed
    txid = sysd.run("loaderd", "status").stdout.split("txid ")[1].split(",")[0]
    unmount(sysd)
    assert resident_view(sysd) == ""  # the unmount reached the resident's namespace
    text = status_text(sysd, GONE)
    assert re.fullmatch(f"{APPLIED}; DRIFT in {N_EXAMPLES}: [a-z_, ]+: {GONE} \\(see journal\\)",
                        text), text
    said = sysd.journalctl("-u", UNIT, "-o", "cat", "LOADERD_EVENT=drift").stdout
    assert re.search(f"{GONE}; fix: mount it \\(`mount -t bpf -o mode=0700 bpf /sys/fs/bpf`"
                     "\\), then `systemctl restart loaderd`", said), said
    assert said.count("no bpf filesystem") == 1, said  # once, not per spec or per tick
    rc, out = status_rc(sysd)
    assert rc == 1 and re.search(GONE, out), out

    # A reload meets it: refused with the sentence, nothing made on sysfs, manifest kept.
    assert sysd.systemctl("reload", UNIT, check=False, timeout=300).returncode != 0
    text = status_text(sysd, "REFUSED")
    assert re.search(f"last apply REFUSED at [-\\d: ]+: /sys/fs/bpf/loaderd: {GONE}", text), text
    assert sysd.run("ls", "-A", BPFFS).stdout == ""
    assert f"txid {txid}," in sysd.run("loaderd", "status", check=False).stdout

    # Recovery as docs/operators.md says: mount it, then reload (or restart).
    mount(sysd)
    sysd.systemctl("reset-failed", APPLY, check=False)
    sysd.systemctl("reload", UNIT, timeout=300)
    want = f"{APPLIED} (reloaded)"
    assert status_text(sysd, f"^{re.escape(want)}$") == want
    assert status_rc(sysd)[0] == 0
    assert sysd.run("bpftool", "prog", "show", "pinned",
                    f"{BPFFS}/loaderd/exec_counter/progs/count_exec").returncode == 0
    # The remount reached the resident read-write; a restart gives it its read-only view back.
    sysd.systemctl("restart", UNIT, timeout=300)
    assert " ro," in resident_view(sysd), resident_view(sysd)
    assert status_text(sysd, f"^{APPLIED}$") == APPLIED


def test_bpffs_missing_when_loaderd_starts(installed: Systemd) -> None:
    sysd = installed
    sysd.systemctl("stop", UNIT)
    unmount(sysd)
    sysd.systemctl("start", UNIT, timeout=300)  # Wants=: the resident starts anyway
    assert sysd.show(APPLY, "Result")["Result"] == "exit-code"
    text = status_text(sysd, GONE + ".*REFUSED|REFUSED.*" + GONE)
    assert "last apply REFUSED at " in text and f"DRIFT in {N_EXAMPLES}" in text, text
    assert re.search(GONE, text), text
    mount(sysd)
    sysd.systemctl("reset-failed", APPLY, check=False)
    sysd.systemctl("restart", UNIT, timeout=300)
    assert status_text(sysd, f"^{APPLIED}$") == APPLIED
    assert status_rc(sysd)[0] == 0


def test_tracefs_missing_at_an_apply_is_mounted_by_systemd(installed: Systemd) -> None:
    """loaderd-apply.service's RequiresMountsFor=/sys/kernel/tracing starts
    sys-kernel-tracing.mount: under systemd an unmounted tracefs is mounted again before the
    apply (by hand, `loaderd apply` refuses: tests/kernel/test_mounts_missing.py)."""
    sysd = installed
    sysd.sh("sed -i 's/__sync_fetch_and_add(seen, [0-9]*);/__sync_fetch_and_add(seen, 9);/' "
            "/etc/loaderd/programs.d/udp_filter.yaml")
    sysd.run("umount", "/sys/kernel/tracing")
    assert sysd.run("mountpoint", "-q", "/sys/kernel/tracing", check=False).returncode != 0
    assert os.path.ismount("/sys/kernel/tracing")  # the host's stays
    sysd.systemctl("reload", UNIT, timeout=300)
    assert sysd.run("mountpoint", "-q", "/sys/kernel/tracing", check=False).returncode == 0
    want = f"{APPLIED} (reloaded)"
    assert status_text(sysd, f"^{re.escape(want)}$") == want
