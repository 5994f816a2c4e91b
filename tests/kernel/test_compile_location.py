"""A compile error names the line the author edits (real BCC/clang): the refusal's one line is
located at clang's first error in the spec's own file (`inline: |` lines are the YAML's lines,
`source.file` lines the C file's), with clang's message, so `journalctl -p err` and
`systemctl status` show file:line:col and why, not only "C source does not compile"."""

from __future__ import annotations

from pathlib import Path

import pytest

from loaderd.config.spec import parse_spec
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import Limits
from loaderd.stage.compile import bcc_compile, inline_indent, render

pytestmark = pytest.mark.kernel

INLINE = """loaderd: 1
description: the C starts on line 5
source:
  inline: |
    int f(void *ctx)
    {
        return undefined_symbol;
    }
programs:
  - {name: f, type: tracepoint, attach: {tracepoint: "sched:sched_process_exec"}}
"""


def _compile_error(path: Path) -> LoaderdError:
    spec, errors = parse_spec(str(path), limits=Limits(), owner_uid=None)
    assert spec is not None, errors
    with pytest.raises(LoaderdError) as exc:
        bcc_compile(render(spec), Location(spec.source_path or spec.path, field="source"),
                    inline_indent(spec))
    assert exc.value.kind is Kind.COMPILE
    return exc.value


def test_inline_compile_error_points_at_the_yaml_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(INLINE)
    err = _compile_error(path)
    line = INLINE.splitlines().index("        return undefined_symbol;") + 1
    assert (err.location.file, err.location.line) == (str(path), line), str(err)
    assert err.location.column == 16
    assert "undeclared identifier 'undefined_symbol'" in str(err)
    assert f"{path}:{line}:12: error" in (err.detail or "")  # clang's own text, unchanged


def test_file_compile_error_points_at_the_c_line(tmp_path: Path) -> None:
    (tmp_path / "bad.bpf.c").write_text("int f(void *ctx)\n{\n    return 1 +;\n}\n")
    path = tmp_path / "bad.yaml"
    path.write_text(INLINE.split("source:")[0] + "source:\n  file: bad.bpf.c\nprograms:"
                    + INLINE.split("programs:")[1])
    err = _compile_error(path)
    assert (err.location.file, err.location.line) == (str(tmp_path / "bad.bpf.c"), 3), str(err)
    assert "expected expression" in str(err)
