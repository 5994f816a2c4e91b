"""Man pages, bash completion and --version come from the parsers and schemas themselves
(loaderd.cli.docgen): every subcommand, option and schema field is in the pages, the pages
render without a groff warning, the completion completes, and the version is one."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import loaderd
from loaderd.cli import docgen
from loaderd.cli import loaderctl as loaderctl_cli
from loaderd.cli import loaderd as loaderd_cli

REPO = Path(__file__).resolve().parents[2]
PARSERS = {"loaderd.8": loaderd_cli.parser, "loaderctl.8": loaderctl_cli.parser}
SCHEMAS = {"loaderd.yaml.5": docgen.SETTINGS_SCHEMA, "loaderd-spec.5": docgen.SPEC_SCHEMA}


def plain(roff: str) -> str:
    """The page's words: font escapes dropped, \\- as -, break points removed."""
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-").replace("\\:", "") \
        .replace("\\e", "\\").replace("\\&", "")


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return docgen.pages()


def _every_option(p: argparse.ArgumentParser) -> set[str]:
    out = {s for a in p._actions for s in a.option_strings if a.help != argparse.SUPPRESS}
    for c in docgen.commands(p):
        out |= {f for o in c.options for f in o.flags}
    return out


@pytest.mark.parametrize("page", sorted(PARSERS))
def test_every_subcommand_and_option_is_in_the_page(pages: dict[str, str], page: str) -> None:
    p = PARSERS[page]()
    text = plain(pages[page])
    cmds = docgen.commands(p)
    assert len(cmds) >= 5
    for c in cmds:
        assert re.search(rf"^\.SS {re.escape(p.prog)} {re.escape(c.name)}\b", text, re.M), c.name
        section = text.split(f".SS {p.prog} {c.name}", 1)[1].split(".SS ", 1)[0]
        for o in c.options:
            for flag in o.flags:
                assert flag in section, f"{c.name} {flag}"
            if not o.flags:
                assert o.positional_name in section, f"{c.name} {o.positional_name}"
            for choice in o.choices:
                assert choice in section, f"{c.name} {choice}"
    for flag in _every_option(p):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag
    # A hidden option stays hidden (apply --child is the resident's, not the operator's).
    assert "--child" not in text


def test_an_option_added_to_a_parser_appears_in_the_page() -> None:
    """The generator reads the parser it is given: nothing is listed by hand."""
    p = loaderctl_cli.parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["dump"].add_argument("--brand-new-flag", help="a flag no page lists")
    text = plain(docgen.cli_page(p, "x"))
    assert "--brand-new-flag" in text and "a flag no page lists" in text


@pytest.mark.parametrize("page", sorted(SCHEMAS))
def test_every_schema_field_is_in_the_page(pages: dict[str, str], page: str) -> None:
    schema = docgen.load_schema(SCHEMAS[page])
    text = plain(pages[page])
    heads = re.findall(r"^\.TP\n(\S+)", text, re.M)
    components = {part for h in heads for part in re.split(r"[.\[\]*]+", h) if part}
    names = docgen.property_names(schema)
    assert len(names) >= 8
    assert names <= components, sorted(names - components)
    # Required fields say so (the spec's top-level ones, the settings' format version).
    for key in schema.get("required", ()):
        assert re.search(rf"^\.TP\n{re.escape(key)} \(required\)$", text, re.M), key


def test_enum_values_and_descriptions_come_from_the_schema(pages: dict[str, str]) -> None:
    text = plain(pages["loaderd-spec.5"])
    spec = docgen.load_schema(docgen.SPEC_SCHEMA)
    map_types = spec["$defs"]["map"]["properties"]["type"]["enum"]
    line = next(ln for ln in text.splitlines()
                if "one of:" in ln and "percpu_hash" in ln)
    assert all(t in line for t in map_types), line
    assert spec["properties"]["source"]["properties"]["file"]["description"] in text


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed")
@pytest.mark.parametrize("page", sorted([*PARSERS, *SCHEMAS]))
def test_page_renders_without_groff_warnings(pages: dict[str, str], page: str,
                                             tmp_path: Path) -> None:
    f = tmp_path / page
    f.write_text(pages[page])
    # What lintian's groff-message check runs.
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(f)],
                          capture_output=True, text=True,
                          env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    shown = subprocess.run(["man", "-l", str(f)], capture_output=True, text=True,
                           env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin",
                                "MANPAGER": "cat"}).stdout
    assert "NAME" in shown and "SEE ALSO" in shown


def test_page_date_is_the_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert '"2023-11-14"' in docgen.pages()["loaderd.8"].splitlines()[0]


def test_roff_escapes() -> None:
    assert docgen.esc(".starts a request") == "\\&.starts a request"
    assert docgen.esc("a\\b") == "a\\eb"
    assert "\\:" in docgen.esc("x" * 20 + "|" + "y" * 20)
    assert docgen.esc("run `loaderd enable`, then") == "run \\fBloaderd enable\\fR, then"


def test_pages_carry_no_markdown_or_argparse_escapes(pages: dict[str, str]) -> None:
    for name, text in pages.items():
        assert "`" not in text and "%%" not in text, name


def _complete(script: str, *words: str) -> list[str]:
    cmd = (f"{script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)}); "
           f"COMP_CWORD={len(words) - 1}; _{words[0]}; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", cmd], capture_output=True,
                          text=True, check=True)
    return proc.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_completes_from_the_parsers() -> None:
    ctl = docgen.completions()["loaderctl"]
    d = docgen.completions()["loaderd"]
    assert _complete(ctl, "loaderctl", "du") == ["dump"]
    assert "audit-system" in _complete(ctl, "loaderctl", "")
    assert set(_complete(ctl, "loaderctl", "dump", "--")) >= {"--raw", "--ip", "--json"}
    assert _complete(ctl, "loaderctl", "dump", "--ip", "") == ["key", "value"]
    # A value of a global option is not taken for the command.
    assert "--no-kernel" in _complete(d, "loaderd", "--config", "x.yaml", "check", "--no")
    assert set(_complete(d, "loaderd", "--")) >= {"--config", "--debug", "--version"}
    assert _complete(d, "loaderd", "rollb") == ["rollback"]


@pytest.mark.parametrize("main", [loaderd_cli.main, loaderctl_cli.main])
def test_version_flag(main: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert callable(main)
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.split()
    assert out[1] == loaderd.__version__ and out[0] in ("loaderd", "loaderctl")


def test_version_is_defined_once() -> None:
    """pyproject.toml reads loaderd.__version__; debian/changelog must say the same (a native
    package: the Debian version is the upstream one)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "loaderd.__version__"}
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    m = re.match(r"loaderd \(([^)]+)\) ", first)
    assert m and m.group(1) == loaderd.__version__, first


def test_docgen_writes_the_files_debian_rules_installs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "loaderd.cli.docgen", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wanted = [ln.strip() for name in ("loaderd.manpages", "loaderd.install")
              for ln in (REPO / "debian" / name).read_text().splitlines()
              if ln.startswith("debian/generated/")]
    assert len(wanted) == 6
    for w in wanted:
        rel = w.split()[0].removeprefix("debian/generated/")
        assert (tmp_path / rel).is_file(), rel
