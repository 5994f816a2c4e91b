"""Measure each hardening choice of the two units against a real load.

Boots a private systemd (tests/e2e/sysd.py), installs the .deb, copies the example specs in, and
for every variant below overrides one unit (the privileged loaderd-apply.service or the resident
loaderd.service) in /etc/systemd/system, wipes pins and state (so every start really compiles,
loads, pins and attaches), starts loaderd.service (which pulls the apply in) and records what
happened. "works" = the apply succeeded and the resident is active. The table it prints is the
evidence in units/README.md.

    /usr/bin/python3 tests/e2e/measure_hardening.py [--deb PATH] [--only NAME...]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sysd import Systemd

REPO = Path(__file__).resolve().parents[2]
UNIT = "loaderd.service"  # the resident
APPLY = "loaderd-apply.service"  # the privileged oneshot
RESET = ("systemctl stop loaderd.service loaderd-apply.service;"
         " systemctl reset-failed loaderd.service loaderd-apply.service;"
         " rm -f /etc/systemd/system/loaderd.service /etc/systemd/system/loaderd-apply.service;"
         " rm -rf /sys/fs/bpf/loaderd/* /var/lib/loaderd/*; chmod 0700 /sys/fs/bpf;"
         " systemd-tmpfiles --create loaderd.conf")


def drop(*prefixes: str) -> Callable[[str], str]:
    def edit(unit: str) -> str:
        return "".join(line for line in unit.splitlines(keepends=True)
                       if not line.startswith(prefixes))
    return edit


def sub(old: str, new: str) -> Callable[[str], str]:
    def edit(unit: str) -> str:
        assert old in unit, old
        return unit.replace(old, new)
    return edit


def add(*lines: str) -> Callable[[str], str]:
    return sub("[Service]\n", "[Service]\n" + "".join(f"{ln}\n" for ln in lines))


def chain(*edits: Callable[[str], str]) -> Callable[[str], str]:
    def edit(unit: str) -> str:
        for e in edits:
            unit = e(unit)
        return unit
    return edit


# The resident's STATUS= changes only after it handled the SIGHUP of the second ExecReload=.
RELOAD_CHECK = ("systemctl reload loaderd; echo reload rc=$?; sleep 1;"
                " systemctl show -p StatusText loaderd")
CAPS_CHECK = ("P=$(systemctl show -p MainPID --value loaderd);"
              " grep -E 'Cap(Eff|Bnd)|NoNewPrivs' /proc/$P/status | tr '\\n' ' '")
# The resident's drift check opens every pin (BPF_OBJ_GET) and asks for its info; with a 1 s
# interval, two seconds of journal show whether that works under the variant.
DRIFT_FAST = sub("--config /etc/loaderd/loaderd.yaml\n",
                 "--config /etc/loaderd/loaderd.yaml --drift-interval 1\n")
DRIFT_CHECK = ("sleep 2.5; J='journalctl -o cat --no-pager"
               " _SYSTEMD_INVOCATION_ID='$(systemctl show -p InvocationID --value loaderd);"
               " echo 'drift events:'; $J | grep -ci 'drift' || true;"
               " $J | grep -i -m1 'drift' || true")
XDP_ON_LO = ("echo 'XDP programs on lo of the namespace loaderd runs in:';"
             " bpftool -j net show dev lo | python3 -c"
             " 'import json,sys; print(json.load(sys.stdin)[0][\"xdp\"])'")
HEADERS = drop("BindReadOnlyPaths=", "Environment=BCC_KERNEL_SOURCE")
NO_PRE = drop("ExecStartPre=")


@dataclass
class Variant:
    name: str
    what: str
    edit: Callable[[str], str] = field(default=lambda u: u)
    prep: str = ""  # shell, after the reset, before start
    check: str = ""  # shell, after start; its output is evidence
    unit: str = APPLY  # the unit the edit overrides


def variants(src: str, build: str) -> list[Variant]:
    return [
        Variant("baseline", "the packaged units", check=CAPS_CHECK),
        Variant("pkm-no-headers", "ProtectKernelModules=yes, no header binds", HEADERS),
        Variant("no-pkm-no-headers", "ProtectKernelModules=no, no header binds",
                chain(HEADERS, sub("ProtectKernelModules=yes", "ProtectKernelModules=no"))),
        Variant("ksrc-common", f"BCC_KERNEL_SOURCE={src} alone",
                chain(HEADERS, add(f"Environment=BCC_KERNEL_SOURCE={src}"))),
        Variant("ksrc-build", f"BCC_KERNEL_SOURCE={build} alone",
                chain(HEADERS, add(f"Environment=BCC_KERNEL_SOURCE={build}"))),
        Variant("rw-same-path", "ReadWritePaths=/sys/fs/bpf (ProtectKernelTunables' own path)",
                sub("ReadWritePaths=/sys/fs/bpf/loaderd", "ReadWritePaths=/sys/fs/bpf")),
        Variant("no-rw", "no ReadWritePaths=", drop("ReadWritePaths=")),
        Variant("rw-missing", "pin root missing at start, no ExecStartPre=", NO_PRE,
                prep="rmdir /sys/fs/bpf/loaderd"),
        Variant("tracefs-default", "tracefs left 0700/0440 root, no ExecStartPre=", NO_PRE,
                prep=("T=/sys/kernel/tracing; chown root:root $T $T/events/*/*/id;"
                      " chmod 0700 $T; chmod 0440 $T/events/*/*/id")),
        Variant("bpffs-0700", "bpffs root left 0700 (as systemd mounts it), no ExecStartPre=",
                NO_PRE, prep="chmod 0700 /sys/fs/bpf"),
        Variant("bpffs-0711", "bpffs root 0711 (traverse only), no ExecStartPre=",
                NO_PRE, prep="chown root:root /sys/fs/bpf; chmod 0711 /sys/fs/bpf"),
        Variant("mdwe-off", "MemoryDenyWriteExecute=no (for comparison)",
                sub("MemoryDenyWriteExecute=yes", "MemoryDenyWriteExecute=no")),
        Variant("private-users", "PrivateUsers=yes", add("PrivateUsers=yes")),
        Variant("private-network", "PrivateNetwork=yes (XDP example attaches to lo)",
                add("PrivateNetwork=yes"), check=XDP_ON_LO),
        Variant("baseline-xdp", "packaged unit: XDP on the host lo", check=XDP_ON_LO),
        Variant("no-perfmon", "no CAP_PERFMON",
                sub("CAP_BPF CAP_PERFMON CAP_NET_ADMIN\nAmbientCapabilities=CAP_BPF CAP_PERFMON",
                    "CAP_BPF CAP_NET_ADMIN\nAmbientCapabilities=CAP_BPF")),
        Variant("no-net-admin", "no CAP_NET_ADMIN", chain(
            sub("CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
                "CapabilityBoundingSet=CAP_BPF CAP_PERFMON"),
            sub("AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
                "AmbientCapabilities=CAP_BPF CAP_PERFMON"))),
        Variant("syscalls-service-only",
                "SystemCallFilter=@system-service (no bpf, perf_event_open)",
                sub("SystemCallFilter=@system-service bpf perf_event_open",
                    "SystemCallFilter=@system-service")),
        Variant("syscalls-no-perf", "SystemCallFilter=@system-service bpf (no perf_event_open)",
                sub("SystemCallFilter=@system-service bpf perf_event_open",
                    "SystemCallFilter=@system-service bpf")),
        Variant("syscalls-deny-privileged", "plus SystemCallFilter=~@privileged",
                sub("SystemCallFilter=~@resources", "SystemCallFilter=~@resources\n"
                    "SystemCallFilter=~@privileged")),
        # The resident, loaderd.service.
        Variant("resident-reload", "resident: packaged, then a reload", check=RELOAD_CHECK,
                unit=UNIT),
        Variant("resident-drift", "resident: packaged, drift check every 1 s", DRIFT_FAST,
                check=DRIFT_CHECK, unit=UNIT),
        Variant("resident-no-bpf", "resident: SystemCallFilter=@system-service (no bpf)",
                chain(DRIFT_FAST, sub("SystemCallFilter=@system-service bpf",
                                      "SystemCallFilter=@system-service")),
                check=DRIFT_CHECK, unit=UNIT),
        Variant("resident-deny-privileged", "resident: plus SystemCallFilter=~@privileged",
                chain(DRIFT_FAST, sub("SystemCallFilter=~@resources", "SystemCallFilter=~@resources"
                                      "\nSystemCallFilter=~@privileged")),
                check=DRIFT_CHECK, unit=UNIT),
    ]


def first_problem(sysd: Systemd, cursor: str) -> str:
    """The first error loaderd printed (with its indented detail line: compiler or errno
    text), else the first error line of the unit (e.g. systemd's namespace setup failure)."""
    msgs = [str(e.get("MESSAGE", "")) for e in
            sysd.journal_json("-u", APPLY, "-u", UNIT, f"--after-cursor={cursor}")]
    for i, msg in enumerate(msgs):
        if msg.startswith("error:"):
            detail = []
            for nxt in msgs[i + 1:i + 4]:
                if not nxt.startswith((" ", "\t")):
                    break
                detail.append(nxt.strip())
            return msg + (f" [{' / '.join(detail)}]" if detail else "")
    pats = re.compile(r"error|denied|not permitted|failed|read-only|missing|status=", re.I)
    noise = ("Failed to start", "Failed with result", "Job for")
    return next((m for m in msgs if pats.search(m) and not m.startswith(noise)), "")


def measure(sysd: Systemd, base: dict[str, str], v: Variant) -> tuple[str, str]:
    unit = v.edit(base[v.unit]) + "\n[Service]\nRestart=no\n"
    sysd.run("sh", "-c", RESET, check=False)
    left = sysd.run("sh", "-c", "ls -A /sys/fs/bpf/loaderd /var/lib/loaderd").stdout.split()
    assert not [x for x in left if not x.endswith(":")], f"reset left {left}"
    sysd.write(f"/etc/systemd/system/{v.unit}", unit)
    sysd.systemctl("daemon-reload")
    if v.prep:
        sysd.sh(v.prep)
    cursor = sysd.run("sh", "-c", "journalctl -n 0 --show-cursor | tail -1").stdout
    cursor = cursor.split("cursor: ", 1)[-1].strip()
    start = sysd.systemctl("start", UNIT, check=False, timeout=300)
    state = sysd.show(UNIT, "ActiveState")["ActiveState"]
    applied = sysd.show(APPLY, "Result")["Result"]
    ok = start.returncode == 0 and state == "active" and applied == "success"
    result = "works" if ok else "FAILS"
    evidence = first_problem(sysd, cursor) if result == "FAILS" else ""
    if v.check:
        evidence = (evidence + " " + sysd.sh(v.check, check=False).stdout.strip()).strip()
    return result, " ".join(evidence.split())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deb")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    deb = args.deb or subprocess.run(
        [str(REPO / "packaging/build-deb.sh"), "/tmp/loaderd-measure-deb"], check=True,
        capture_output=True, text=True).stdout.strip()
    rel = os.uname().release
    src = os.path.realpath(f"/lib/modules/{rel}/source")
    build = os.path.realpath(f"/lib/modules/{rel}/build")
    saved = {p: os.stat(p) for p in ["/sys/kernel/tracing",
                                     *glob.glob("/sys/kernel/tracing/events/*/*/id")]}
    sysd = Systemd(f"measure{os.getpid()}")
    rows = []
    try:
        sysd.boot()
        sysd.install_deb(deb)
        sysd.sh("cp /usr/share/doc/loaderd/examples/programs.d/* /etc/loaderd/programs.d/")
        base = {u: sysd.run("cat", f"/usr/lib/systemd/system/{u}").stdout for u in (UNIT, APPLY)}
        for v in variants(src, build):
            if args.only and v.name not in args.only:
                continue
            result, evidence = measure(sysd, base, v)
            rows.append((v.name, v.what, result, evidence))
            print(f"{v.name:26s} {result:6s} {evidence}", file=sys.stderr, flush=True)
    finally:
        sysd.shutdown()
        for p, st in saved.items():
            try:
                os.chown(p, st.st_uid, st.st_gid)
                os.chmod(p, st.st_mode & 0o7777)
            except OSError:
                pass
    print("| variant | result | evidence (first error, or check output) |")
    print("|---|---|---|")
    for _name, what, result, evidence in rows:
        print(f"| {what} | {result} | `{evidence.replace('|', '/')}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
