"""`loaderd plan` on the real kernel: its prediction matches the following `apply --plan`
exactly on a set with every kind of change (new, changed, drifted, removed, adopted, an XDP
link replaced in place), plan itself changes nothing, and a stale plan is refused with its
reason."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import loaderd, make_conf
from tests.kernel.test_lifecycle import COUNTER, XDP, prog_tag
from tests.kernel.test_pipeline import bpftool

pytestmark = pytest.mark.kernel
SOCKET = """loaderd: 1
source:
  inline: |
    int keep(struct __sk_buff *skb) {{ return {n}; }}
maps:
  - {{name: m, type: array, key: u32, value: u64, max_entries: 1}}
programs:
  - {{name: keep, type: socket_filter}}
"""


def _plan(conf: Path, out: Path | None = None) -> tuple[int, dict[str, Any]]:
    args = ["--config", str(conf), "plan", "--json"] + (["--out", str(out)] if out else [])
    got = loaderd(*args, check=False)
    assert got.returncode in (0, 1, 2), got.stderr
    return got.returncode, json.loads(got.stdout)


def _by_action(p: dict[str, Any], action: str) -> list[str]:
    return sorted(s["spec"] for s in p["specs"] if s["action"] == action)


def _applied(stdout: str) -> dict[str, Any]:
    m = re.search(r"built (.*?); adopted (.*?); removed (.*?); compiles (\d+)", stdout)
    assert m, stdout

    def names(text: str) -> list[str]:  # "a, b" or "none" (cli.common.apply_summary)
        return [] if text == "none" else sorted(text.split(", "))
    return {"build": names(m.group(1)), "adopt": names(m.group(2)),
            "remove": names(m.group(3)), "compiles": int(m.group(4))}


def test_plan_matches_the_apply_and_a_stale_plan_is_refused(
        tmp_path: Path, bpffs_root: str, dummy_iface: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {
        "steady": SOCKET.format(n=0), "changed": SOCKET.format(n=0),
        "drifted": SOCKET.format(n=0), "gone": SOCKET.format(n=0),
        "xdp": XDP.format(step=1, iface=dummy_iface)})
    specs = tmp_path / "specs"
    loaderd("--config", str(conf), "apply")
    rc, p = _plan(conf)
    assert rc == 0 and _by_action(p, "adopt") == ["changed", "drifted", "gone", "steady",
                                                   "xdp"]
    assert p["compiles"] == 0

    # Every kind of change at once.
    (specs / "new.yaml").write_text(COUNTER.format(step=1))
    (specs / "changed.yaml").write_text(SOCKET.format(n=1))
    (specs / "gone.yaml").unlink()
    (specs / "xdp.yaml").write_text(XDP.format(step=7, iface=dummy_iface))
    os.unlink(f"{bpffs_root}/drifted/maps/m")  # someone removed a pin
    link_before = bpftool("link", "show", "pinned", f"{bpffs_root}/xdp/links/xdp_count")
    tags = {n: prog_tag(f"{bpffs_root}/{n}/progs/keep")[1] for n in ("steady", "changed")}
    plan_file = tmp_path / "plan.json"
    rc, p = _plan(conf, plan_file)
    assert rc == 2, p
    reasons = {s["spec"]: s["reason"] for s in p["specs"]}
    assert reasons["new"] == "new" and reasons["changed"] == "changed"
    assert reasons["drifted"].startswith("drift: ") and "maps/m" in reasons["drifted"]
    assert reasons["steady"] == "unchanged and intact"
    objects = {s["spec"]: {(o["kind"], o["name"]): o["action"] for o in s["objects"]}
               for s in p["specs"]}
    assert objects["xdp"][("link", "xdp_count")] == "replace in place (link update)"
    assert objects["new"][("link", "count_exec")] == "attach"
    assert objects["gone"] == {("program", "keep"): "unpin", ("map", "m"): "unpin"}
    assert p["unknown_without_compiling"]  # says what it could not know
    # Plan changed nothing: the drifted pin is still missing, the old programs still run.
    assert not os.path.exists(f"{bpffs_root}/drifted/maps/m")
    assert os.path.exists(f"{bpffs_root}/gone")
    assert prog_tag(f"{bpffs_root}/changed/progs/keep")[1] == tags["changed"]
    text = loaderd("--config", str(conf), "plan", check=False)
    assert text.returncode == 2 and "xdp: BUILD (changed)" in text.stdout
    assert "link xdp_count: replace in place (link update)" in text.stdout
    assert "result: changes pending (exit 2)" in text.stdout

    out = loaderd("--config", str(conf), "apply", "--plan", str(plan_file))
    done = _applied(out.stdout)
    assert done == {"build": _by_action(p, "build"), "adopt": _by_action(p, "adopt"),
                    "remove": _by_action(p, "remove"), "compiles": p["compiles"]}, (done, p)
    assert done["build"] == ["changed", "drifted", "new", "xdp"] and done["compiles"] == 4
    link_after = bpftool("link", "show", "pinned", f"{bpffs_root}/xdp/links/xdp_count")
    assert link_after["id"] == link_before["id"]  # type: ignore[index]  # updated in place
    assert prog_tag(f"{bpffs_root}/steady/progs/keep")[1] == tags["steady"]
    assert not os.path.exists(f"{bpffs_root}/gone")
    rc, p = _plan(conf)
    assert rc == 0, p  # nothing left to do

    # A plan made, then /etc changes: refused with the reason, nothing applied.
    rc, p = _plan(conf, plan_file)
    (specs / "steady.yaml").write_text(SOCKET.format(n=2))
    stale = loaderd("--config", str(conf), "apply", "--plan", str(plan_file), check=False)
    assert stale.returncode == 1
    assert "stale plan: the programs directory changed since the plan" in stale.stderr
    assert prog_tag(f"{bpffs_root}/steady/progs/keep")[1] == tags["steady"]
    # ... the kernel state changes (a pin removed): refused too.
    rc, p = _plan(conf, plan_file)
    assert rc == 2
    os.unlink(f"{bpffs_root}/drifted/maps/m")
    stale = loaderd("--config", str(conf), "apply", "--plan", str(plan_file), check=False)
    assert stale.returncode == 1 and "the applied set or the kernel state" in stale.stderr
    # ... the settings change: refused too.
    rc, p = _plan(conf, plan_file)
    conf.write_text(conf.read_text() + "accept_header_mismatch: false\n")
    stale = loaderd("--config", str(conf), "apply", "--plan", str(plan_file), check=False)
    assert stale.returncode == 1 and "the settings" in stale.stderr

    # A refused spec: plan exits 1 and names it; apply --plan of it is refused.
    (specs / "bad.yaml").write_text("loaderd: 1\nsource: {inline: 'x'}\nprograms: []\n")
    rc, p = _plan(conf, plan_file)
    assert rc == 1 and _by_action(p, "refuse") == ["bad"], p
    refused = loaderd("--config", str(conf), "apply", "--plan", str(plan_file), check=False)
    assert refused.returncode == 1
    loaderd("--config", str(conf), "disable")
