"""CI's slice of the fuzz runner (`python3 -m tests.fuzz`): a few thousand generated and mutated
inputs through every target end in a located LoaderdError or nothing, and the runner's oracle
does report a planted crash and a planted hang (so a clean slice means something)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _fuzz(*args: str) -> tuple[int, dict[str, Any]]:
    run = subprocess.run([sys.executable, "-m", "tests.fuzz", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    return run.returncode, json.loads(run.stdout)


def test_a_slice_finds_nothing() -> None:
    code, out = _fuzz("--count", "2500", "--seed", "17")
    assert out["groups"] == [] and code == 0
    assert out["inputs"] == 2500
    assert set(out["targets"]) == {"spec", "settings", "manifest", "events", "sanitize"}


def test_the_oracle_reports_a_planted_crash_and_hang() -> None:
    code, out = _fuzz("--count", "300", "--seed", "3", "--plant")
    assert code == 1
    found = {(g["target"], g["what"]) for g in out["groups"]}
    assert found == {("planted", "crash"), ("planted", "hang")}
