"""`loaderd plan` files: exit codes, the freshness check of `apply --plan`, the file as
untrusted input, and the programs-directory hash (apply.preview)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loaderd.apply import preview
from loaderd.apply.preview import Hashes, Preview, SpecPlan, Step
from loaderd.errors import LoaderdError

H = Hashes("p" * 64, "s" * 64, "k" * 64)


def _plan(*actions: str, refused: tuple[str, ...] = ()) -> Preview:
    return Preview(tuple(SpecPlan(f"s{i}", a, "why", (Step("program", "x", "adopt"),))
                         for i, a in enumerate(actions)), H, actions.count("build"), "/d",
                   refused)


def test_exit_codes_follow_terraform() -> None:
    assert _plan("adopt", "adopt").exit_code == 0
    assert _plan("adopt", "build").exit_code == 2
    assert _plan("remove").exit_code == 2
    assert _plan("build", "refuse").exit_code == 1
    assert _plan(refused=("kill switch pulled",)).exit_code == 1


def test_round_trip_and_freshness(tmp_path: Path) -> None:
    p = _plan("adopt", "build", "remove")
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(preview.to_dict(p)))
    back = preview.read(str(f))
    assert back.hashes == H and back.decisions() == p.decisions() and back.compiles == 1
    assert preview.stale(back, H, p.decisions(), str(f)) is None
    for now, why in ((Hashes("x" * 64, H.settings, H.kernel), "programs directory"),
                     (Hashes(H.programs, "x" * 64, H.kernel), "settings"),
                     (Hashes(H.programs, H.settings, "x" * 64), "kernel state")):
        err = preview.stale(back, now, p.decisions(), str(f))
        assert err is not None and why in str(err) and "stale plan" in str(err)
    err = preview.stale(back, H, [("s0", "build"), ("s1", "build"), ("s2", "remove")], "f")
    assert err is not None and "decide differently" in str(err)
    refused = _plan("refuse")
    assert "refuses the apply" in str(preview.stale(refused, H, refused.decisions(), "f"))


@pytest.mark.parametrize("text", ["[]", "{}", '{"version": 2}', "not json",
                                  '{"version": 1, "hashes": {"programs": "a", "settings": "b",'
                                  ' "kernel": "c"}, "programs_dir": "/d", "compiles": 0,'
                                  ' "specs": [{"spec": "a", "action": "explode",'
                                  ' "reason": ""}]}',
                                  "[" * 30000 + "]" * 30000,
                                  '{"version": 1, "hashes": {"programs": "a", "settings": "b",'
                                  ' "kernel": "c"}, "programs_dir": "/d", "compiles": 1e999,'
                                  ' "specs": []}'])
def test_a_bad_plan_file_is_one_clear_error(tmp_path: Path, text: str) -> None:
    f = tmp_path / "plan.json"
    f.write_text(text)
    with pytest.raises(LoaderdError, match="not a loaderd plan") as e:
        preview.read(str(f))
    assert e.value.location.file == str(f)


def test_fifo_plan_is_refused_without_blocking(tmp_path: Path) -> None:
    f = tmp_path / "fifo"
    os.mkfifo(f)
    with pytest.raises(LoaderdError, match="not a regular file"):
        preview.read(str(f))


def test_tree_digest_sees_every_file_and_mode(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.c").write_text("y")
    first = preview.tree_digest(str(tmp_path))
    assert preview.tree_digest(str(tmp_path)) == first
    (tmp_path / "sub" / "b.c").write_text("z")
    second = preview.tree_digest(str(tmp_path))
    assert second != first
    os.chmod(tmp_path / "a.yaml", 0o666)
    assert preview.tree_digest(str(tmp_path)) != second
    (tmp_path / "a.yaml.sig").write_text("s")
    assert preview.tree_digest(str(tmp_path)) != second
