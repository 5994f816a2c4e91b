"""uprobe and cgroup `unit:` targets applied by the packaged, hardened loaderd-apply.service under
a real systemd 252 (issue 13): it runs as the unprivileged user loaderd with ProtectHome=yes,
ProtectSystem=strict, ProtectControlGroups=yes and no D-Bus (this namespace runs no
dbus-daemon; hosts without one are common). A uprobe binary under /home is refused in one
sentence that names the path and the unit setting hiding it, and nothing is applied; binaries
under /usr/local and /opt are counted exactly; `unit:` is resolved to the unit's cgroup from
what systemd leaves in the file system (`systemctl show` as the loaderd user fails without a
bus), and a process in the unit is refused its connect while one outside is not.

/home and /opt are fresh tmpfs mounts inside the namespace (its mounts are private): nothing
lands on the host's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sysd import Systemd

from tests.kernel.test_uprobe import C_SOURCE  # the same gcc-built test binary

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python")
APPLY = "loaderd-apply.service"
PROGRAMS = "/etc/loaderd/programs.d"
ROOT = "/sys/fs/bpf/loaderd"
PORT = 47
BINARIES = {"local": "/usr/local/lib/ldtest/ldtick", "opt": "/opt/ldtest/ldtick",
            "home": "/home/ops/bin/ldtick"}


SPEC = f"""loaderd: 1
source:
  inline: |
    int on_local(struct pt_regs *ctx) {{
        u32 k = 0; u64 *v = calls.lookup(&k);
        if (v) __sync_fetch_and_add(v, 1);
        return 0;
    }}
    int on_opt(struct pt_regs *ctx) {{
        u32 k = 1; u64 *v = calls.lookup(&k);
        if (v) __sync_fetch_and_add(v, 1);
        return 0;
    }}
    int no_port(struct bpf_sock_addr *ctx) {{
        return ctx->user_port == bpf_htons({PORT}) ? 0 : 1;
    }}
maps:
  - {{name: calls, type: array, key: u32, value: u64, max_entries: 2}}
programs:
  - {{name: on_local, type: uprobe,
     attach: {{uprobe: {{binary: {BINARIES['local']}, symbol: ldtest_tick}}}}}}
  - {{name: on_opt, type: uprobe,
     attach: {{uprobe: {{binary: {BINARIES['opt']}, symbol: ldtest_tick}}}}}}
  - {{name: no_port, type: cgroup_sock_addr,
     attach: {{cgroup: {{unit: ldweb.service, hook: connect4}}}}}}
"""
HOME_SPEC = """loaderd: 1
source:
  inline: |
    int on_home(struct pt_regs *ctx) { return 0; }
programs:
  - {name: on_home, type: uprobe,
     attach: {uprobe: {binary: /home/ops/bin/ldtick, symbol: ldtest_tick}}}
"""
DIAL = (f"import errno, socket\ntry:\n socket.create_connection(('127.0.0.1', {PORT}), 2)\n"
        " print('ok')\nexcept OSError as e:\n print(errno.errorcode[e.errno])\n")
READ = """import os, sys
from loaderd.bpf import kernel
fd = kernel.obj_get(sys.argv[1], rdonly=True)
print([int.from_bytes(kernel.map_lookup(fd, k.to_bytes(4, "little"), 8) or b"", "little")
       for k in range(2)])
"""


@pytest.fixture(scope="module")
def hardened(sysd: Systemd, deb: Path) -> Systemd:
    sysd.install_deb(deb)
    for d in ("/home", "/opt"):
        sysd.run("mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", d)
    sysd.write("/run/ldtest/tick.c", C_SOURCE)
    for path in BINARIES.values():
        sysd.run("install", "-d", "-m", "0755", str(Path(path).parent))
        sysd.run("gcc", "-O1", "-o", path, "/run/ldtest/tick.c")
        sysd.run("chmod", "0755", path)
    sysd.write("/run/ldtest/dial.py", DIAL)
    sysd.write("/run/ldtest/read.py", READ)
    sysd.run("systemd-run", "--unit=ldweb.service", "--property=Type=exec", "/bin/sleep",
             "900")
    sysd.wait_for("ldweb.service")
    return sysd


def apply_unit(sysd: Systemd) -> tuple[str, str]:
    """Run the apply unit once: (Result, what it said in the journal)."""
    since = sysd.run("date", "+@%s.%N").stdout.strip()
    sysd.systemctl("reset-failed", APPLY, check=False)
    sysd.systemctl("start", APPLY, check=False, timeout=300)
    said = sysd.journalctl("-u", APPLY, f"--since={since}", "-o", "cat", check=False).stdout
    return sysd.show(APPLY, "Result")["Result"], said


def calls(sysd: Systemd) -> list[int]:
    out = sysd.run(PY, "/run/ldtest/read.py", f"{ROOT}/targets/maps/calls",
                   env={"PYTHONPATH": str(REPO)})
    return list(json.loads(out.stdout))


def dial_from(sysd: Systemd, cgroup: str | None) -> str:
    join = f"echo $$ > /sys/fs/cgroup{cgroup}/cgroup.procs; " if cgroup else ""
    return sysd.sh(f"{join}exec python3 /run/ldtest/dial.py").stdout.strip()


def test_a_binary_under_home_is_refused_naming_the_path_and_protect_home(
        hardened: Systemd) -> None:
    sysd = hardened
    sysd.write(f"{PROGRAMS}/targets.yaml", SPEC)
    sysd.write(f"{PROGRAMS}/home.yaml", HOME_SPEC)
    result, said = apply_unit(sysd)
    assert result == "exit-code", said
    want = (f"uprobe binary {BINARIES['home']} is hidden from the apply by {APPLY}'s "
            "ProtectHome=yes (/home is inaccessible to it)\n")
    # located at the attach line (7), as `loaderd check` locates it
    assert f"{PROGRAMS}/home.yaml:7: programs[0].attach: " in said and want in said, said
    assert "Permission denied" not in said and "Traceback" not in said
    left = sysd.run("find", ROOT, "-mindepth", "1", "-not", "-path", f"{ROOT}/_staging",
                    check=False).stdout.split()
    assert left == [], left  # nothing applied, nothing staged left behind


def test_binaries_under_usr_local_and_opt_and_a_unit_cgroup_work(hardened: Systemd) -> None:
    sysd = hardened
    sysd.run("rm", "-f", f"{PROGRAMS}/home.yaml")
    result, said = apply_unit(sysd)
    assert result == "success", said
    sysd.run(BINARIES["local"], "5")
    sysd.run(BINARIES["opt"], "3")
    sysd.run(BINARIES["home"], "9")  # not probed: counts nowhere
    assert calls(sysd) == [5, 3]

    cg = sysd.show("ldweb.service", "ControlGroup")["ControlGroup"]
    ino = int(sysd.run("stat", "-c", "%i", f"/sys/fs/cgroup{cg}").stdout)
    link = json.loads(sysd.run("bpftool", "-j", "link", "show", "pinned",
                               f"{ROOT}/targets/links/no_port").stdout)
    assert link["cgroup_id"] == ino  # exactly the unit's cgroup, found without D-Bus
    assert dial_from(sysd, cg) == "EPERM"  # a process of the unit: refused
    assert dial_from(sysd, None) == "ECONNREFUSED"  # outside it: the kernel's answer

    # The resolution the apply unit used: systemctl as its user has no bus to ask here.
    asked = sysd.run("setpriv", "--reuid=loaderd", "--regid=loaderd", "--clear-groups",
                     "systemctl", "show", "-p", "ControlGroup", "--value", "ldweb.service",
                     check=False)
    assert asked.returncode != 0 and "bus" in asked.stderr, asked
    sysd.run("loaderd", "disable")
    sysd.systemctl("stop", "ldweb.service", check=False)
