"""`loaderd check FILE` (issue 15): one spec file on its own, as Ansible's `validate:` runs it
on a temp copy with another name in another directory; `--as DEST` checks it as installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, REPO


def _check(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loaderd", "check", "--no-kernel", *argv],
                          capture_output=True, text=True, env=dict(os.environ,
                          PYTHONPATH=str(REPO)), timeout=120, check=False)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    os.chmod(tmp_path, 0o755)
    live, tmp = tmp_path / "programs.d", tmp_path / "ansible-tmp"
    live.mkdir(mode=0o755)
    tmp.mkdir(mode=0o755)
    for f in ("exec_counter.yaml", "exec_counter.bpf.c"):
        shutil.copy(Path(EXAMPLES) / f, live / f)
    return live, tmp


def test_temp_copy_checked_as_its_destination(dirs: tuple[Path, Path]) -> None:
    live, tmp = dirs
    text = (live / "exec_counter.yaml").read_text().replace("name: exec_counter\n", "")
    (tmp / "source").write_text(text)  # Ansible's temp name, no `name:` key in it
    # On its own its relative C file is not beside it: located at source.file.
    alone = _check(str(tmp / "source"))
    assert alone.returncode == 1
    assert f"{tmp}/source:" in alone.stderr and "source.file" in alone.stderr
    dest = live / "exec_counter.yaml"
    ok = _check("--as", str(dest), str(tmp / "source"))
    assert ok.returncode == 0, ok.stderr
    assert f"checking {tmp}/source as {dest}" in ok.stdout and "1 spec, 0 errors" in ok.stdout


def test_errors_are_located_in_the_checked_file(dirs: tuple[Path, Path]) -> None:
    live, tmp = dirs
    (tmp / "bad").write_text("loaderd: 1\nsource: {inline: 'int x;'}\nprograms:\n"
                             "  - name: x\n    type: nope\n")
    out = _check("--as", str(live / "bad.yaml"), str(tmp / "bad"))
    assert out.returncode == 1
    assert f"error: {tmp}/bad:5:5: programs[0].type: unknown value (got 'nope')" in out.stderr


def test_usage_errors_exit_2(dirs: tuple[Path, Path]) -> None:
    live, _tmp = dirs
    assert _check("--as", "x.yaml", "a", "b").returncode == 2
    assert _check("--dir", str(live), str(live / "exec_counter.yaml")).returncode == 2
