"""Safe YAML: what is refused, and that every key/item keeps its line and column."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from loaderd.config import yamlsafe
from loaderd.config.yamlsafe import Marks
from loaderd.errors import Kind, LoaderdError

LOADERS = [yaml.SafeLoader] + ([yaml.CSafeLoader] if yaml.__with_libyaml__ else [])
DEFAULT_LOADER = yamlsafe._Loader


@pytest.fixture(params=LOADERS, ids=lambda c: c.__name__, autouse=True)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Every test runs on libyaml and on PyYAML's pure-Python parser."""
    monkeypatch.setattr(yamlsafe, "_Loader", request.param)
    yield request.param


def load(text: str | bytes, max_bytes: int = 1 << 16, **kw: Any) -> tuple[Any, Marks]:
    data = text.encode() if isinstance(text, str) else text
    return yamlsafe.load(data, file="t.yaml", max_bytes=max_bytes, **kw)


def refused(text: str | bytes, **kw: Any) -> LoaderdError:
    with pytest.raises(LoaderdError) as info:
        load(text, **kw)
    assert info.value.kind is Kind.YAML
    assert info.value.location.file == "t.yaml"
    return info.value


def test_prefers_libyaml_when_built_with_it() -> None:
    assert DEFAULT_LOADER is (yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader)


def test_marks_for_keys_items_and_values() -> None:
    data, marks = load("a: 1\nlist:\n  - x\n  - {k: v, m: [1, 2]}\ntext: |\n  one\n  two\n")
    assert data == {"a": 1, "list": ["x", {"k": "v", "m": [1, 2]}], "text": "one\ntwo\n"}
    assert marks.keys[("a",)] == (1, 1)
    assert marks.values[("a",)] == (1, 4)
    assert marks.keys[("list",)] == (2, 1)
    assert marks.values[("list",)] == (3, 3)
    assert marks.keys[("list", 0)] == (3, 5)
    assert marks.keys[("list", 1)] == (4, 5)
    assert marks.keys[("list", 1, "k")] == (4, 6)
    assert marks.keys[("list", 1, "m", 1)] == (4, 19)
    assert marks.values[()] == (1, 1)
    assert marks.literal == {("text",)}


def test_at_falls_back_to_the_nearest_written_ancestor() -> None:
    _, marks = load("maps:\n  - name: x\n")
    assert marks.at(("maps", 0, "max_entries")) == (2, 5)
    assert marks.at(("nothing",)) == (1, 1)
    assert Marks().at(("x",)) is None


def test_field_name() -> None:
    assert yamlsafe.field_name(("maps", 0, "max_entries")) == "maps[0].max_entries"
    assert yamlsafe.field_name((3, "a")) == "[3].a"
    assert yamlsafe.field_name(()) == ""


def test_field_name_quotes_hostile_keys() -> None:
    assert yamlsafe.field_name(("a", "x\nERROR: forged")) == "a['x\\nERROR: forged']"
    err = refused("'\x1b[2J': 1\n'\x1b[2J': 2\n")
    assert "\x1b" not in str(err) and "\n" not in str(err)


def test_scalars_resolve_by_the_yaml_1_2_core_schema() -> None:
    data, _ = load("i: 0x10\no: 0o17\nb: true\nB: FALSE\nk: ~\nnu: Null\nf: 1.5\ne: 1e3\n"
                   "g: -.5\nh: 2.\ninf: -.Inf\nq: '7'\nd: 2024-01-01\nv: =\nz: 0\ns: +3\n"
                   "u: 'on'\nw: \"010\"\nt: Yes please\nx:\n")
    assert data == {"i": 16, "o": 15, "b": True, "B": False, "k": None, "nu": None, "f": 1.5,
                    "e": 1000.0, "g": -0.5, "h": 2.0, "inf": float("-inf"), "q": "7",
                    "d": "2024-01-01", "v": "=", "z": 0, "s": 3, "u": "on", "w": "010",
                    "t": "Yes please", "x": None}
    assert math.isnan(load("nan: .NaN\n")[0]["nan"])


@pytest.mark.parametrize("text, hint", [
    ("010", "leading zero (octal in YAML 1.1, decimal in YAML 1.2): write 0o10 (octal) or 10 "
            "(decimal), or quote it"),
    ("-007", "write -0o07 (octal) or -7 (decimal)"),
    ("09", "write 9 (decimal), or quote it"),
    ("1:30", "base-60 number in YAML 1.1 (90) and a string in YAML 1.2: quote it"),
    ("190:20:30.15", "base-60 number in YAML 1.1"),
    ("on", "boolean in YAML 1.1 and a string in YAML 1.2: write true or false, or quote it"),
    ("Off", "boolean in YAML 1.1"), ("YES", "boolean in YAML 1.1"), ("n", "boolean"),
    ("y", "boolean"),
    ("1_000", "write it without '_' (1000), or quote it"),
    ("1_0.5", "without '_' (10.5)"),
    ("0b11", "binary in YAML 1.1 only: write 3 or 0x3, or quote it"),
    ("-0x1", "is -1 in YAML 1.1 but '-0x1' in YAML 1.2"),
    ("+0x10", "is 16 in YAML 1.1"),
])
def test_yaml_1_1_only_spellings_are_refused_with_the_1_2_spelling(text: str,
                                                                   hint: str) -> None:
    err = refused(f"a: 1\nlist:\n  - {text}\n")
    assert hint in err.message and (err.location.line, err.location.column) == (3, 5)
    assert err.location.field == "list[0]"
    err = refused(f"{text}: 1\n")  # as a key too
    assert hint in err.message and err.location.line == 1


def test_quoted_spellings_are_strings() -> None:
    data, _ = load("a: '010'\nb: \"1:30\"\nc: 'on'\nd: '1_000'\n")
    assert data == {"a": "010", "b": "1:30", "c": "on", "d": "1_000"}


def test_empty_input_is_none() -> None:
    assert load("") == (None, Marks())
    assert load("# only a comment\n")[0] is None


@pytest.mark.parametrize("text", [
    "a: !!python/object/apply:os.system ['id']",
    "a: !!python/name:os.system",
    "a: !!str 1",
    "a: !custom 1",
    "a: ! 1",
    "!!map {a: 1}",
    "a: !!binary aGk=",
    "%TAG !e! tag:example.com,2000:\n---\na: !e!x 1",
])
def test_explicit_tags_are_refused(text: str) -> None:
    assert "explicit tags" in refused(text).message


def test_tag_error_names_the_field() -> None:
    err = refused("x: 1\nmaps:\n  - {m: !!int '3'}\n")
    assert (err.location.line, err.location.column, err.location.field) == (3, 9, "maps[0].m")


@pytest.mark.parametrize("text", [
    "a: &x 1\nb: *x\n",
    "a: &x 1\n",
    "a: &x [1]\n",
    "lol: &l [a, a]\nlol2: [*l, *l]\n",
])
def test_anchors_and_aliases_are_refused(text: str) -> None:
    assert "anchors and aliases" in refused(text).message


def test_billion_laughs_is_refused_before_expansion() -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi",
                                                                      strict=True)]
    err = refused("\n".join(lines))
    assert err.location.line == 1


def test_duplicate_keys_name_both_lines() -> None:
    err = refused("a: 1\nb:\n  c: 1\n  c: 2\n")
    assert (err.location.line, err.location.field) == (4, "b.c")
    assert "first at line 3" in err.message


def test_duplicate_keys_compare_values_not_spelling() -> None:
    assert "duplicate key" in refused("a: 1\n'a': 2\n").message


def test_merge_keys_are_refused() -> None:
    assert "merge keys" in refused("a:\n  <<: {b: 1}\n").message


@pytest.mark.parametrize("text", ["1: a\n", "true: a\n", "~: a\n", "1.5: a\n", "0o7: a\n"])
def test_non_string_keys_are_refused(text: str) -> None:
    assert "keys must be strings" in refused(text).message


@pytest.mark.parametrize("text", ["? [a]\n: 1\n", "? {a: 1}\n: 1\n", "[a]: 1\n"])
def test_complex_keys_are_refused(text: str) -> None:
    assert "plain scalars" in refused(text).message


def test_one_document_only() -> None:
    err = refused("a: 1\n---\nb: 2\n")
    assert err.location.line == 2
    assert load("---\na: 1\n...\n")[0] == {"a": 1}


def test_depth_limit_is_exact() -> None:
    ok = "a: " + "[" * 31 + "]" * 31
    assert load(ok, max_depth=32)[0] is not None
    err = refused("a: " + "[" * 32 + "]" * 32, max_depth=32)
    assert "deeper than 32" in err.message


def test_very_deep_input_does_not_recurse() -> None:
    assert "deeper" in refused("[" * 100_000, max_bytes=1 << 20).message


def test_size_limit_is_exact() -> None:
    text = "a: " + "x" * 97  # 100 bytes
    assert load(text, max_bytes=100)[0] == {"a": "x" * 97}
    err = refused(text + "x", max_bytes=100)
    assert "larger than 100 bytes" in err.message and err.value == 101


def test_non_utf8_is_located() -> None:
    err = refused(b"a: 1\nb: caf\xe9\n")
    assert (err.location.line, err.location.column) == (2, 7)
    assert "UTF-8" in err.message


def test_utf16_is_refused() -> None:
    assert "UTF-8" in refused(b"\xff\xfe" + "a: 1\n".encode("utf-16-le")).message


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\ufffe"])
def test_control_characters_are_located(char: str) -> None:
    err = refused(f"a: ééé\nb: x{char}\n")
    assert (err.location.line, err.location.column) == (2, 5)


def test_huge_integers_are_a_yaml_error() -> None:
    err = refused("a: " + "9" * 5000)
    assert err.location.field == "a" and "too long" in err.message


def test_syntax_errors_are_located() -> None:
    err = refused("a: [1, 2\nb: 3\n")
    assert err.location.line is not None and err.message.startswith("invalid YAML")
