"""The schema validation cache (config.schema): a document listed in the state dir's
validated.json skips jsonschema (not even imported); anything else, or a cache file loaderd
would not have written, runs every check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaderd import __version__
from loaderd.config import schema
from loaderd.config.settings import SCHEMA, load_settings
from loaderd.config.yamlsafe import Marks
from loaderd.errors import LoaderdError

REPO = Path(__file__).resolve().parents[2]
BAD = {"loaderd": 1, "state_dirr": "/x"}  # a typo: the schema refuses it


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    os.chmod(tmp_path, 0o755)
    d = tmp_path / "state"
    d.mkdir(mode=0o750)
    yield d
    schema.use_cache(None)
    schema._cache.passed.clear()


def forge(state: Path, keys: list[str | None], mode: int = 0o600) -> Path:
    path = state / schema.CACHE_FILE
    path.write_text(json.dumps({"loaderd": __version__, "keys": keys}))
    os.chmod(path, mode)
    return path


def errors(data: object) -> list[LoaderdError]:
    return schema.validate(data, SCHEMA, marks=Marks(), file="x.yaml")


def test_key_keeps_every_type_apart() -> None:
    values = [{"a": 1}, {"a": 1.0}, {"a": True}, {"a": "1"}, {"a": None}, {"a": [1]},
              {1: "a"}, {"1": "a"}, {"a": "b", "c": "d"}, {"a": "b\0c", "": "d"}, {"ab": ""}]
    keys = [schema.cache_key(v, SCHEMA) for v in values]
    assert None not in keys and len(set(keys)) == len(keys)
    assert schema.cache_key({"a": 1}, SCHEMA) != schema.cache_key({"a": 1}, "spec.schema.json")
    assert schema.cache_key({"a": b"x"}, SCHEMA) is None  # not YAML data: never cached
    assert schema.cache_key({"a": 1}, SCHEMA) == schema.cache_key({"a": 1}, SCHEMA)


def test_a_listed_document_skips_the_schema_and_others_run_it(state: Path) -> None:
    assert errors(BAD)  # no cache in use: checked
    forge(state, [schema.cache_key(BAD, SCHEMA)])
    schema.use_cache(str(state))
    assert errors(BAD) == []  # listed (only loaderd writes the file): known to pass
    other = {**BAD, "programs_dir": "/y"}
    assert errors(other)  # a miss runs every check


@pytest.mark.parametrize("how", ["group-writable", "other-owner", "service-user", "symlink",
                                 "fifo",
                                 "other-version", "bad-key", "not-json"])
def test_a_cache_file_loaderd_did_not_write_is_a_miss(state: Path, how: str) -> None:
    key = schema.cache_key(BAD, SCHEMA)
    path = forge(state, [key], mode=0o620 if how == "group-writable" else 0o600)
    if how == "other-owner":
        os.chown(path, 12345, -1)
    elif how == "service-user":  # the state dir's owner (the resident) can compute any key
        os.chown(state, 65534, -1)
        os.chown(path, 65534, -1)
    elif how == "symlink":
        real = state.parent / "elsewhere.json"
        path.rename(real)
        path.symlink_to(real)
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path, 0o600)
    elif how == "other-version":
        path.write_text(json.dumps({"loaderd": "0.0.0-old", "keys": [key]}))
    elif how == "bad-key":
        forge(state, [key, "not hex"])
    elif how == "not-json":
        path.write_text("{")
    schema.use_cache(str(state))
    assert errors(BAD)


def test_apply_saves_what_passed_and_the_next_start_does_not_import_jsonschema(
        state: Path) -> None:
    conf = state.parent / "loaderd.yaml"
    conf.write_text(f"loaderd: 1\nstate_dir: {state}\nprograms_dir: {state.parent}/specs\n")
    os.chmod(conf, 0o644)
    first = load_settings(str(conf))
    schema.save_cache(str(state))
    cache = state / schema.CACHE_FILE
    st = cache.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == state.stat().st_uid
    assert len(json.loads(cache.read_text())["keys"]) == 1
    probe = ("import sys, json; from loaderd.config.settings import load_settings; "
             f"s = load_settings({str(conf)!r}); "
             "print(json.dumps(['jsonschema' in sys.modules, s.state_dir, s.programs_dir]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)})
    assert json.loads(out.stdout) == [False, first.state_dir, first.programs_dir]
    # The same file with a typo: a miss, refused with the schema's located error as always.
    conf.write_text(conf.read_text() + "programs_dri: /z\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode != 0 and "unknown key 'programs_dri'" in out.stderr
