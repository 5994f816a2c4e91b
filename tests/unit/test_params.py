"""`params:` (issue 18 item 6): typed, validated, turned into macros ahead of the C source,
part of the hashed content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loaderd.config.spec import parse_spec
from loaderd.model import Limits, Param, ParamType
from loaderd.stage.compile import render

SPEC = """loaderd: 1
source:
  inline: |
    int f(void *ctx) { return MIN_US > 0 && PER_PID; }
params:
  MIN_US: {type: int, value: VALUE, min: 0, max: 1000000}
  PER_PID: {type: bool, value: true}
  MODE: {type: string, value: failed, enum: [all, failed]}
programs:
  - {name: f, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


def _parse(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    p = tmp_path / "s.yaml"
    p.write_text(text)
    os.chmod(tmp_path, 0o755)
    return parse_spec(str(p), limits=Limits(), owner_uid=None)


def test_params_become_defines_and_are_hashed(tmp_path: Path) -> None:
    spec, errors = _parse(tmp_path, SPEC.replace("VALUE", "250"))
    assert not errors and spec is not None
    assert spec.params == (Param("MIN_US", ParamType.INT, 250),
                           Param("PER_PID", ParamType.BOOL, True),
                           Param("MODE", ParamType.STRING, "failed"))
    text = render(spec)
    assert text.startswith('#define MIN_US 250\n#define PER_PID 1\n#define MODE "failed"\n')
    other, _ = _parse(tmp_path, SPEC.replace("VALUE", "251"))
    assert other is not None and other.sha256 != spec.sha256  # another option set: rebuilt


@pytest.mark.parametrize("edit, field", [
    (("VALUE", "2000000"), "params.MIN_US.value"),
    (("VALUE", "-1"), "params.MIN_US.value"),
    (("VALUE", '"x"'), "params.MIN_US.value"),
    (("value: true", "value: 1"), "params.PER_PID.value"),
    (("value: failed", "value: some"), "params.MODE.value"),
    (("value: failed, enum: [all, failed]", "value: failed"), "params.MODE"),
    (("PER_PID: {type: bool, value: true}", "PER_PID: {type: bool, value: true, min: 1}"),
     "params.PER_PID.min"),
    (("MIN_US:", "BPF_X:"), "params.BPF_X"),
])
def test_bad_params_refused_at_the_field(tmp_path: Path, edit: tuple[str, str],
                                         field: str) -> None:
    text = SPEC.replace(*edit).replace("VALUE", "5")
    spec, errors = _parse(tmp_path, text)
    assert spec is None and errors, text
    assert errors[0].location.field == field, str(errors[0])


def test_param_names_are_macro_names(tmp_path: Path) -> None:
    _, errors = _parse(tmp_path, SPEC.replace("MIN_US:", "min_us:").replace("VALUE", "5"))
    assert errors and errors[0].kind.value == "schema"


def test_param_name_with_a_trailing_newline_is_not_the_name(tmp_path: Path) -> None:
    # Python's `$` matches before a final newline; the schema's key patterns end at the end.
    _, errors = _parse(tmp_path, SPEC.replace("MIN_US:", '"MIN_US\\n":').replace("VALUE", "5"))
    assert errors and errors[0].kind.value == "schema"
    assert "names matching" in str(errors[0]), str(errors[0])
