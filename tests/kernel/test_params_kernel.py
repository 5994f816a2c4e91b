"""`params:` on the real kernel (issue 18 item 6): one C file, two specs with other option
values, each program built with its own (`#define`) and counting what its values say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, loaderd, make_conf

pytestmark = pytest.mark.kernel

C = """TRACEPOINT_PROBE(syscalls, sys_enter_exit_group) {
    if (args->error_code != EXIT_CODE)
        return 0;
    u32 k = 0;
    hits.increment(k, COUNT_BY);
    return 0;
}
"""

SPEC = """loaderd: 1
source: {file: exits.bpf.c}
params:
  EXIT_CODE: {type: int, value: '@CODE@', min: 0, max: 255}
  COUNT_BY: {type: int, value: '@BY@', min: 1, max: 100}
maps:
  - {name: hits, type: array, key: u32, value: u64, max_entries: 1}
programs:
  - {name: tracepoint__syscalls__sys_enter_exit_group, type: tracepoint,
     attach: {tracepoint: "syscalls:sys_enter_exit_group"}}
"""


def test_one_source_two_option_sets(tmp_path: Path, bpffs_root: str) -> None:
    conf = make_conf(tmp_path, bpffs_root, {
        "seven": SPEC.replace("'@CODE@'", "77").replace("'@BY@'", "1"),
        "nine": SPEC.replace("'@CODE@'", "79").replace("'@BY@'", "10")})
    (tmp_path / "specs" / "exits.bpf.c").write_text(C)
    loaderd("--config", str(conf), "apply")
    for code, times in ((77, 3), (79, 2)):
        for _ in range(times):
            subprocess.run(["/bin/sh", "-c", f"exit {code}"], check=False)

    def ctl(*args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "loaderd.cli.loaderctl", "--config",
                              str(conf), *args, "--json"], capture_output=True, text=True,
                             check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        return json.loads(out.stdout)

    def hits(spec: str) -> int:
        (entry,) = ctl("dump", f"{spec}/hits")["entries"]
        return int(entry["value"])

    assert hits("seven") == 3 and hits("nine") == 20
    # another value is another build: the spec's hash covers its params
    shas = {s["spec"]: s["sha256"] for s in ctl("status")["specs"]}
    assert shas["seven"] != shas["nine"]
