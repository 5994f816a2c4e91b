"""README's "Using it as a service" block, executed as written (issue 12, "Must show").

The block is read from README.md at run time (never copied here): each command line runs as
root in a real systemd 252 (tests/e2e/sysd.py), through /bin/sh, in a working directory that
holds `./dist` (built by packaging/build-deb.sh, as the block's first line says) and a real
`my-prog.yaml`. After each command the test asserts what an operator sees: the exit code,
`systemctl status`/STATUS=, `journalctl` (the README's own command), `loaderd status`. Every
command of the block needs a check here: a README line without one fails the test.

Also on this clean install: the audit unit's first run does not report systemd's own cgroup
programs as foreign, and its baseline stays the service user's after a root run.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sysd import Systemd

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
UNIT = "loaderd.service"
APPLY = "loaderd-apply.service"
PROGRAMS = "/etc/loaderd/programs.d"
PIN = "/sys/fs/bpf/loaderd/my_prog/progs/count_exec"

MY_PROG = """# README's my-prog.yaml: count execs
loaderd: 1
name: my_prog
source:
  inline: |
    int count_exec(void *ctx) {
        u32 k = 0; u64 *v = execs.lookup(&k);
        if (v) __sync_fetch_and_add(v, STEP);
        return 0;
    }
maps:
  - {name: execs, type: array, key: u32, value: u64, max_entries: 1, preserve: true}
programs:
  - {name: count_exec, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


def readme_block() -> list[str]:
    """The command lines of README's service block (comment-only lines left out)."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Using it as a service\n+```sh\n(.*?)^```", text, re.S | re.M)
    assert m, "README.md has no 'Using it as a service' sh block"
    return [line for line in m.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def command(line: str) -> str:
    """The command without its comment (only for choosing the check; the line runs whole)."""
    return line.split(" #", 1)[0].strip()


class Operator:
    def __init__(self, sysd: Systemd, cwd: str) -> None:
        self.sysd = sysd
        self.cwd = cwd
        self.tags: dict[str, str] = {}

    def sh(self, line: str) -> subprocess.CompletedProcess[str]:
        return self.sysd.run("/bin/sh", "-c", f"cd {self.cwd} && {line}", check=False,
                             timeout=600, env={"DEBIAN_FRONTEND": "noninteractive"})

    def status_text(self, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.sysd.show(UNIT, "StatusText")["StatusText"]
            if re.search(pattern, text) or time.monotonic() > deadline:
                return text
            time.sleep(0.2)

    def tag(self) -> str:
        out = self.sysd.run("bpftool", "-j", "prog", "show", "pinned", PIN).stdout
        return str(json.loads(out)["tag"])

    def journal(self) -> str:
        """README's journal command, as an operator reads it."""
        self.sysd.run("journalctl", "--sync", check=False)
        line = next(c for c in readme_block() if command(c).startswith("journalctl"))
        out = self.sh(f"{command(line)} --no-pager -o cat")
        assert out.returncode == 0, out.stderr
        return out.stdout

    def loaderd_status(self) -> tuple[int, str]:
        out = self.sysd.run("loaderd", "status", check=False)
        return out.returncode, out.stdout + out.stderr

    def root_owned(self) -> list[str]:
        """Files under the pin root and state dir a root process left behind."""
        out = self.sysd.run("find", "/sys/fs/bpf/loaderd", "/var/lib/loaderd", "-uid", "0")
        return out.stdout.split()


def check_apt(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert op.sysd.show(UNIT, "LoadState")["LoadState"] == "loaded"
    assert op.loaderd_status()[0] == 4  # nothing applied
    # What the next line copies: written by the operator in the working directory.
    op.sysd.write(f"{op.cwd}/my-prog.yaml", MY_PROG.replace("STEP", "1"))


def check_cp(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr
    assert op.sysd.run("test", "-f", f"{PROGRAMS}/my-prog.yaml", check=False).returncode == 0


def check_enable(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr
    assert op.sysd.show(UNIT, "ActiveState")["ActiveState"] == "active"
    assert op.sysd.show(APPLY, "Result")["Result"] == "success"
    assert op.status_text("^1 spec applied") == "1 spec applied"
    shown = op.sysd.systemctl("status", UNIT, check=False).stdout
    assert "active (running)" in shown and 'Status: "1 spec applied"' in shown, shown
    op.tags["v1"] = op.tag()
    # The operator edits the spec: what the reload is for.
    op.sysd.sh(f"sed -i 's/add(v, 1)/add(v, 2)/' {PROGRAMS}/my-prog.yaml")


def check_reload(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr
    assert op.status_text(r"\(reloaded\)") == "1 spec applied (reloaded)"
    op.tags["v2"] = op.tag()
    assert op.tags["v2"] != op.tags["v1"]


def check_journal(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr
    said = out.stdout
    assert "my_prog/count_exec: loaded 'count_exec'" in said, said
    assert said.count("my_prog/count_exec: attached to") == 2, said  # enable, then reload
    # One line per fact: each apply result once (not also as the CLI's stdout summary), no
    # Python reprs, counts in the right plural, no spec_accepted for an unchanged spec.
    assert len(re.findall(r"loaderd\[\d+\]: applied 1 spec \(txid ", said)) == 2, said
    assert "; compiles 1" not in said, said  # the CLI's stdout summary, journaled again
    for noise in ("['", "txid None", "1 specs", "1 entries", "1 programs", "1 maps"):
        assert noise not in said, (noise, said)
    assert said.count("my_prog: spec accepted (1 program, 1 map)") == 2, said


def check_status(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^my_prog: ok", out.stdout, re.M), out.stdout


def check_check(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: my_prog/count_exec: verifier accepted 'count_exec'" in out.stdout, out.stdout
    assert "1 spec, 0 errors" in out.stdout, out.stdout


def check_rollback(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"applying through {APPLY}" in out.stdout, out.stdout
    assert op.tag() == op.tags["v1"]
    # The hardened unit did the privileged work, not this root CLI.
    found = op.sysd.journal_json("-u", APPLY, "LOADERD_EVENT=rollback")
    assert any(str(e["MESSAGE"]).startswith("rollback held: applying generation")
               and e["_SYSTEMD_UNIT"] == APPLY for e in found), [e["MESSAGE"] for e in found]
    assert op.root_owned() == [], op.root_owned()
    held = op.status_text("rolled back to generation")
    assert re.search(r"^1 spec applied \(reloaded\); rolled back to generation \S+ since "
                     r"[-\d: ]+; programs_dir differs \(unchanged since\); release with "
                     r"`loaderd rollback --release`$", held), held
    # It holds across a reload and a restart: both re-run the apply unit.
    op.sysd.systemctl("reload", UNIT, timeout=300)
    assert op.tag() == op.tags["v1"]
    op.sysd.systemctl("restart", UNIT, timeout=300)
    assert op.tag() == op.tags["v1"]
    rc, text = op.loaderd_status()
    assert rc == 0 and "rolled back to generation" in text, text
    assert op.root_owned() == [], op.root_owned()
    assert "rollback to generation" in op.journal()  # the operator's request, in README's view


def check_release(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert op.tag() == op.tags["v2"]
    text = op.status_text("^1 spec applied \\(reloaded\\)$")
    assert text == "1 spec applied (reloaded)", text
    assert "released by the operator" in op.journal()
    assert op.root_owned() == [], op.root_owned()


def check_disable(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert op.status_text("^kill switch pulled").startswith("kill switch pulled at ")
    assert op.loaderd_status()[0] == 4
    assert op.sysd.run("test", "-e", PIN, check=False).returncode != 0
    # Run by root outside the units: README's journal command shows it all the same.
    assert "kill switch: removed every pin and link loaderd made" in op.journal()


def check_enable_cli(op: Operator, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kill switch released: applies are allowed again" in op.journal()
    op.sysd.systemctl("reload", UNIT, timeout=300)  # the block's comment: then reload
    assert op.status_text("^1 spec applied") == "1 spec applied (reloaded)"
    assert op.loaderd_status()[0] == 0


CHECKS: dict[str, Callable[[Operator, subprocess.CompletedProcess[str]], None]] = {
    "apt install ./dist/loaderd_*.deb": check_apt,
    "cp my-prog.yaml /etc/loaderd/programs.d/": check_cp,
    "systemctl enable --now loaderd": check_enable,
    "systemctl reload loaderd": check_reload,
    "journalctl -u loaderd -u loaderd-apply": check_journal,
    "loaderd status": check_status,
    "loaderd check": check_check,
    "loaderd rollback": check_rollback,
    "loaderd rollback --release": check_release,
    "loaderd disable": check_disable,
    "loaderd enable": check_enable_cli,
}


def test_readme_service_block_as_written(sysd: Systemd) -> None:
    lines = readme_block()
    assert [command(c) for c in lines] == list(CHECKS), "README block changed: update CHECKS"
    work = sysd.hostdir / "operator"  # the operator's working directory, at `cwd` inside
    dist = work / "dist"
    dist.mkdir(parents=True)
    built = subprocess.run([str(REPO / "packaging" / "build-deb.sh"), str(dist)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    op = Operator(sysd, "/run/e2e/host/operator")
    for line in lines:
        out = op.sh(line)
        CHECKS[command(line)](op, out)


def test_clean_install_audit_knows_systemds_programs(sysd: Systemd) -> None:
    """After the block (loaderd's units set IPAddressDeny= and PrivateDevices=, so systemd
    has its cgroup programs loaded for them): a root run first, then the audit unit."""
    root = sysd.run("loaderctl", "audit-system", "--json", check=False)
    report = json.loads(root.stdout)
    names = {p["name"] for p in report["systemd_programs"]}
    assert names & {"sd_fw_ingress", "sd_fw_egress", "sd_devices"}, report["systemd_programs"]
    assert not [p for p in report["foreign_programs"] if p["name"].startswith("sd_")
                and p["uid"] == 0 and p["new"]], report["foreign_programs"]
    owner = sysd.run("stat", "-c", "%U %a", "/var/lib/loaderd/sysaudit.json").stdout.split()
    assert owner == ["loaderd", "600"], owner
    sysd.systemctl("start", "loaderd-audit.service", check=False, timeout=120)
    said = sysd.journalctl("-u", "loaderd-audit.service", "-o", "cat").stdout
    assert "baseline" not in said or "refused" not in said, said  # it read the root run's
    found = [line for line in said.splitlines() if line.startswith("foreign BPF program")]
    # The kernel is shared with the host: programs other processes loaded there may be
    # foreign; none of systemd's (sd_*) is, and on a clean host the run passes.
    assert not [f for f in found if "'sd_" in f], found
    if not found:
        assert sysd.show("loaderd-audit.service", "Result")["Result"] == "success"
