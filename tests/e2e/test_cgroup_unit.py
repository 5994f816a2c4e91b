"""cgroup programs on a systemd unit, under a real systemd (PID 1 of its own namespaces, its own
cgroup2 tree): `unit:` is resolved to the unit's cgroup through systemd, a process in that unit
is refused its connect while one outside is not, and when the unit stops the kernel detaches
the link (drift says so) and check refuses the stopped unit in one sentence."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sysd import Systemd

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python")
BASE = "/run/ldcg"  # a root-owned 0755 tmpfs inside: passes the trust walk
ROOT = "/sys/fs/bpf/ldcg"
PORT = 47
SPEC = f"""loaderd: 1
source:
  inline: |
    int no_port(struct bpf_sock_addr *ctx) {{
        return ctx->user_port == bpf_htons({PORT}) ? 0 : 1;
    }}
programs:
  - {{name: no_port, type: cgroup_sock_addr,
     attach: {{cgroup: {{unit: ldweb.service, hook: connect4}}}}}}
"""
DIAL = (f"import errno, socket\ntry:\n socket.create_connection(('127.0.0.1', {PORT}), 2)\n"
        " print('ok')\nexcept OSError as e:\n print(errno.errorcode[e.errno])\n")


def loaderd(sysd: Systemd, *args: str, check: bool = True) -> str:
    out = sysd.run(PY, "-m", "loaderd", "--config", f"{BASE}/loaderd.yaml", *args,
                   check=check, timeout=300, env={"PYTHONPATH": str(REPO)})
    return out.stdout + out.stderr


def dial_from(sysd: Systemd, cgroup: str | None) -> str:
    join = f"echo $$ > /sys/fs/cgroup{cgroup}/cgroup.procs; " if cgroup else ""
    return sysd.sh(f"{join}exec python3 {BASE}/dial.py").stdout.strip()


def test_unit_cgroup_through_systemd(sysd: Systemd) -> None:
    sysd.run("systemd-run", "--unit=ldweb.service", "--property=Type=exec", "/bin/sleep",
             "600")
    sysd.wait_for("ldweb.service")
    sysd.write(f"{BASE}/specs/guard.yaml", SPEC)
    sysd.write(f"{BASE}/dial.py", DIAL)
    sysd.write(f"{BASE}/loaderd.yaml", f"loaderd: 1\nprograms_dir: {BASE}/specs\n"
               f"bpffs_root: {ROOT}\nstate_dir: {BASE}/state\n")
    sysd.run("chmod", "0755", BASE, f"{BASE}/specs")
    try:
        assert "compiles 1" in loaderd(sysd, "apply")
        cg = sysd.show("ldweb.service", "ControlGroup")["ControlGroup"]
        assert cg.endswith("/ldweb.service")
        ino = int(sysd.run("stat", "-c", "%i", f"/sys/fs/cgroup{cg}").stdout)
        link = json.loads(sysd.run("bpftool", "-j", "link", "show", "pinned",
                                   f"{ROOT}/guard/links/no_port").stdout)
        assert link["cgroup_id"] == ino  # attached to exactly the unit's cgroup
        assert dial_from(sysd, cg) == "EPERM"  # a process of the unit: refused
        assert dial_from(sysd, None) == "ECONNREFUSED"  # outside it: the kernel's answer

        sysd.systemctl("stop", "ldweb.service")
        gone = "detached from unit ldweb.service (the cgroup went away)"
        deadline = time.monotonic() + 30  # the kernel releases a removed cgroup later
        while gone not in (status := loaderd(sysd, "status", check=False)):
            assert time.monotonic() < deadline, status
            time.sleep(1)
        check = loaderd(sysd, "check", check=False)
        assert "unit ldweb.service is not running" in check, check
        assert "loaderd does not defer the attach: start the unit, then apply" in check
    finally:
        loaderd(sysd, "disable", check=False)
        sysd.systemctl("stop", "ldweb.service", check=False)
