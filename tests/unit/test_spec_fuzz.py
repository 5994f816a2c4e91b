"""Property tests: whatever bytes a spec or settings file holds, loading ends in a Spec (or
Settings) or a one-line LoaderdError, never another exception.

LOADERD_FUZZ_EXAMPLES raises the example count (default 200 per property, for CI).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaderd.config.settings import load_settings
from loaderd.config.spec import parse_spec
from loaderd.errors import LoaderdError
from loaderd.model import Limits

FUZZ = settings(max_examples=int(os.environ.get("LOADERD_FUZZ_EXAMPLES", "200")),
                deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = Limits(max_spec_bytes=16 * 1024, max_source_bytes=16 * 1024)

VALID: dict[str, Any] = {
    "loaderd": 1,
    "name": "fuzz",
    "source": {"inline": "int count(void *ctx) { return 0; }\nint alt(void *c) { return 1; }\n"},
    "maps": [
        {"name": "counts", "type": "array", "key": "u32", "value": "u64", "max_entries": 4,
         "flags": ["RDONLY_PROG"], "freeze": True, "initial": [{"key": 0, "value": 1}]},
        {"name": "blobs", "type": "hash", "key": {"bytes": 2}, "value": "s16",
         "max_entries": 8, "initial": [{"key": "0a0b", "value": -3}]},
        {"name": "events", "type": "ringbuf", "max_entries": 4096},
    ],
    "programs": [
        {"name": "count", "type": "tracepoint", "attach": {"tracepoint": "sched:sched_switch"},
         "fallback": ["alt"]},
        {"name": "pkt", "type": "xdp", "attach": {"xdp": {"interface": "lo", "mode": "skb"}}},
        {"name": "sock", "type": "socket_filter", "attach": "none"},
    ],
}
SYNTAX = "&*!|>-:?[]{},#'\"\n\t %@`<=~\\"
TRAPS = ["BPF_TABLE_PINNED(", "extern ", '#include "x"\n', "##", "maps/", "\\\n", "/*", "*/",
         "//", '"', "'", "%:", 'R"(', "#include <linux/../x>\n", "\0", "\udcff"]

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True) | st.text(max_size=20) | st.sampled_from(
               ["u8", "s64", "array", "ringbuf", "xdp", "none", "RDONLY", "0a0b", "count"]))
trees = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=20)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        yield Path(d)


def outcome(folder: Path, data: bytes) -> None:
    path = folder / "case.yaml"
    path.write_bytes(data)
    spec, errors = parse_spec(str(path), limits=LIMITS, owner_uid=None)
    assert (spec is None) != (not errors)
    for err in errors:
        assert isinstance(err, LoaderdError)
        text = str(err)
        assert "\n" not in text and "Traceback" not in text


def dump(doc: Any, flow: bool | None) -> bytes:
    text: str = yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True,
                               sort_keys=False)
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(workdir: Path, data: bytes) -> None:
    outcome(workdir, data)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(SYNTAX) | st.characters(), max_size=400))
def test_yaml_like_text(workdir: Path, text: str) -> None:
    outcome(workdir, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(doc=trees, flow=st.sampled_from([None, True, False]))
def test_generated_yaml_documents(workdir: Path, doc: Any, flow: bool | None) -> None:
    outcome(workdir, dump(doc, flow))


def _containers(node: Any) -> list[Any]:
    """Every dict and list in `node`, depth first."""
    if not isinstance(node, dict | list):
        return []
    children = node.values() if isinstance(node, dict) else node
    return [node] + [c for child in children for c in _containers(child)]


def _mutate(doc: Any, steps: list[tuple[int, int, Any]]) -> Any:
    """Apply (where, how, value) edits: add, delete or replace at a picked container."""
    doc = copy.deepcopy(doc)
    for where, how, value in steps:
        spots = _containers(doc)
        node = spots[where % len(spots)]
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys or how == 0:
            if isinstance(node, dict):
                node[str(value)[:12]] = value
            else:
                node.append(value)
        elif how == 1:
            del node[keys[where % len(keys)]]
        else:
            node[keys[where % len(keys)]] = value
    return doc


@FUZZ
@given(steps=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 2), trees), max_size=4),
       flow=st.sampled_from([None, True, False]))
def test_mutated_valid_specs(workdir: Path, steps: list[tuple[int, int, Any]],
                             flow: bool | None) -> None:
    outcome(workdir, dump(_mutate(VALID, steps), flow))


@FUZZ
@given(pieces=st.lists(st.sampled_from(TRAPS) | st.text(max_size=10), max_size=12))
def test_hostile_inline_source(workdir: Path, pieces: list[str]) -> None:
    doc = copy.deepcopy(VALID)
    doc["source"]["inline"] += "".join(pieces)
    outcome(workdir, dump(doc, None))


def test_the_valid_spec_loads(workdir: Path) -> None:
    path = workdir / "valid.yaml"
    path.write_bytes(dump(VALID, None))
    spec, errors = parse_spec(str(path), limits=LIMITS, owner_uid=None)
    assert spec is not None and not errors


SETTINGS_DOCS: st.SearchStrategy[Any] = st.fixed_dictionaries(
    {"loaderd": st.just(1)},
    optional={"pins": trees, "policy": trees, "config_owner": trees, "programs_dir": trees})


@FUZZ
@given(doc=trees | SETTINGS_DOCS)
def test_settings_never_crash(workdir: Path, doc: Any) -> None:
    path = workdir / "loaderd.yaml"
    path.write_bytes(dump(doc, None))
    try:
        load_settings(str(path), owner_uid=None)
    except LoaderdError as err:
        assert "\n" not in str(err)


VALID_SETTINGS: dict[str, Any] = {
    "loaderd": 1, "programs_dir": "/etc/loaderd/programs.d", "config_owner": "root",
    "pins": {"mode": "0640", "group": "loaderd-readers"},
    "policy": {"program_types": ["xdp"], "map_types": ["array"], "map_flags": ["RDONLY"],
               "helpers": {"allow": ["map_lookup_elem", "sys_bpf"],
                           "by_type": {"xdp": ["xdp_adjust_head", "sys_bpf"]}},
               "calls": {"bpf_to_bpf": True, "kfunc": False},
               "limits": {"max_programs": 4, "max_entries": 16}},
}


@FUZZ
@given(steps=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 2), trees), max_size=4))
def test_mutated_settings_never_crash(workdir: Path, steps: list[tuple[int, int, Any]]) -> None:
    path = workdir / "loaderd.yaml"
    path.write_bytes(dump(_mutate(VALID_SETTINGS, steps), None))
    try:
        load_settings(str(path), owner_uid=None)
    except LoaderdError as err:
        assert "\n" not in str(err)
