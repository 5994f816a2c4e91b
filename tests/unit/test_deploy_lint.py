"""deploy/ansible is ansible-lint clean (production profile), as the issue asks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ANSIBLE = Path(__file__).resolve().parents[2] / "deploy" / "ansible"


@pytest.mark.skipif(shutil.which("ansible-lint") is None, reason="ansible-lint missing")
def test_role_and_playbook_are_lint_clean() -> None:
    proc = subprocess.run(["ansible-lint", "--nocolor", "site.yml", "roles/loaderd"],
                          cwd=ANSIBLE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
