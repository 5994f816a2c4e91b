"""`status` exit codes: docs/operators.md's table, cli.common.STATUS_CODES (the --help text) and
status_code() agree (issue 17: an interrupted apply has its own code), and the interrupted
marker is read from the state directory as a killed apply leaves it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from loaderd.cli import common
from loaderd.store.statedir import APPLYING, State

REPO = Path(__file__).resolve().parents[2]
CODES = {name: getattr(common, name) for name in dir(common)
         if name.startswith("STATUS_") and isinstance(getattr(common, name), int)}


def _doc_rows() -> dict[int, str]:
    doc = (REPO / "docs" / "operators.md").read_text()
    table = doc.split("| exit | meaning |", 1)[1].split("\n\n", 1)[0]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (.*) \|$", table,
                                                            re.M)}


def test_docs_table_lists_every_code_once() -> None:
    rows = _doc_rows()
    assert sorted(rows) == sorted(CODES.values()), (rows, CODES)
    assert "interrupted" in rows[common.STATUS_INTERRUPTED]


def test_help_text_names_every_code() -> None:
    said = {int(n) for n in re.findall(r"(?:codes: |, )(\d+) ", common.STATUS_CODES)}
    assert said == set(CODES.values()), common.STATUS_CODES


def _report(**head: Any) -> dict[str, Any]:
    return {"manifest": {"status": "committed", **head}, "specs": []}


def test_interrupted_outranks_a_refusal_not_a_pending_commit_or_the_switch() -> None:
    refusal = {"at": 1.0, "errors": 1, "reason": "x"}
    assert common.status_code(_report(interrupted=2.0)) == common.STATUS_INTERRUPTED
    assert common.status_code(_report(interrupted=2.0, refused=refusal)) == \
        common.STATUS_INTERRUPTED
    assert common.status_code(_report(interrupted=2.0, status="pending")) == common.STATUS_DRIFT
    assert common.status_code(_report(interrupted=2.0, status="disabled")) == \
        common.STATUS_NOT_APPLIED
    assert common.status_code(_report(interrupted=None, refused=refusal)) == \
        common.STATUS_REFUSED


def test_marker_with_the_lock_free_is_interrupted_held_is_not(tmp_path: Path) -> None:
    st = State(str(tmp_path))
    assert st.interrupted() is None
    (tmp_path / APPLYING).write_text(json.dumps({"at": 1700000000.5, "pid": os.getpid()}))
    assert st.interrupted() == 1700000000.5
    with st.exclusive():  # an apply at work: its own marker is no interruption
        assert st.interrupted() is None
    st.clear_applying()
    assert st.interrupted() is None
