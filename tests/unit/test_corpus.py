"""The bad-input corpus: every case must be refused with the exact kind, field and line its
header promises; every good spec must load and pass the default policy.

Case headers (leading `# key: <json>` lines of tests/corpus/bad/<case>.yaml, or <case>.expect
when the .yaml is a symlink):
  expect   {kind, field, line, msg (substring), file (basename, optional)}
  target   "settings" to load the file as /etc/loaderd/loaderd.yaml instead of a spec
  limits   Limits overrides        settings  loaderd.yaml content (policy cases)
  calls    check_calls arguments   setup     {chmod: {name: "0664"}, chown: {name: uid},
                                              hardlink: {new name: existing name}}
  targets  true: also look the attach targets up as `check` does (tracefs, BTF, interfaces)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loaderd import policy
from loaderd.config.settings import load_settings
from loaderd.config.spec import load_spec
from loaderd.errors import Kind, LoaderdError
from loaderd.model import Limits, Settings

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
BAD, GOOD = CORPUS / "bad", CORPUS / "good"


def read_header(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        for raw in f:
            if not raw.startswith(b"# "):
                break
            key, _, value = raw[2:].decode("ascii").partition(": ")
            out[key] = json.loads(value)
    return out


def bad_cases() -> list[str]:
    names = {p.name.removesuffix(".yaml") for p in BAD.glob("*.yaml")}
    names |= {p.name.removesuffix(".expect") for p in BAD.glob("*.expect")}
    return sorted(names)


def stage(src: Path, case: str, dest: Path) -> Path:
    """Copy the case's files (symlinks kept) into a root-owned 0755 dir, mode 0644."""
    dest.mkdir(mode=0o755)
    os.chmod(dest, 0o755)
    for p in src.iterdir():
        if p.name == f"{case}.yaml" or (p.name.startswith(f"{case}.") and p.suffix != ".expect"):
            target = dest / p.name
            if p.is_symlink():
                os.symlink(os.readlink(p), target)
            else:
                shutil.copyfile(p, target)
                os.chmod(target, 0o644)
    return dest / f"{case}.yaml"


def apply_setup(folder: Path, setup: dict[str, Any]) -> None:
    for name, mode in setup.get("chmod", {}).items():
        os.chmod(folder / name, int(mode, 8))
    for name, uid in setup.get("chown", {}).items():
        os.chown(folder / name, uid, -1)
    for new, existing in setup.get("hardlink", {}).items():
        os.link(folder / existing, folder / new)


def settings_for(header: dict[str, Any], where: Path) -> Settings:
    if "settings" not in header:
        return Settings()
    where.mkdir(mode=0o755)
    path = where / "loaderd.yaml"
    path.write_text(json.dumps({"loaderd": 1, **header["settings"]}))
    os.chmod(path, 0o644)
    return load_settings(str(path))


def run_case(path: Path, header: dict[str, Any], tmp: Path) -> None:
    if header.get("target") == "settings":
        load_settings(str(path))
        return
    settings = settings_for(header, tmp / "etc")
    limits = replace(settings.policy.limits, **header.get("limits", {}))
    spec = load_spec(str(path), limits=limits, owner_uid=0)
    pol = replace(settings.policy, limits=limits)
    calls = header.get("calls")
    if calls:
        prog = next(p for p in spec.programs if p.name == calls["program"])
        policy.check_calls(spec, calls["program"], prog.type, set(calls["helpers"]),
                           calls.get("bpf_calls", 0), calls.get("kfuncs", 0),
                           calls.get("callx", 0), pol)
        return
    policy.check_spec(spec, pol)
    policy.check_set([spec], pol)
    if header.get("targets"):
        from loaderd.bpf import attach

        errors, _notes = attach.check_targets(spec)
        if errors:
            raise errors[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="trust cases chown files: needs root")
@pytest.mark.parametrize("case", bad_cases())
def test_bad_case_is_refused_precisely(case: str, tmp_path: Path) -> None:
    header_file = BAD / f"{case}.expect"
    header = read_header(header_file if header_file.exists() else BAD / f"{case}.yaml")
    expect = header["expect"]
    path = stage(BAD, case, tmp_path / "case")
    apply_setup(path.parent, header.get("setup", {}))
    with pytest.raises(LoaderdError) as info:
        run_case(path, header, tmp_path)
    err = info.value
    text = str(err)
    assert (err.kind, err.location.field, err.location.line) == (
        Kind(expect["kind"]), expect["field"], expect["line"]), text
    assert expect.get("msg", "") in text
    if "file" in expect:
        assert os.path.basename(err.location.file or "") == expect["file"], text
    assert "\n" not in text and "Traceback" not in text


def test_corpus_is_big_enough() -> None:
    assert len(bad_cases()) >= 70
    kinds = {read_header(BAD / f"{c}.yaml")["expect"]["kind"] for c in bad_cases()
             if (BAD / f"{c}.yaml").is_file() and not (BAD / f"{c}.yaml").is_symlink()}
    assert {"yaml", "schema", "semantic", "trust", "policy", "limit", "helper"} <= kinds


@pytest.mark.parametrize("case", sorted(p.stem for p in GOOD.glob("*.yaml")))
def test_good_case_loads(case: str, tmp_path: Path) -> None:
    path = stage(GOOD, case, tmp_path / "case")
    spec = load_spec(str(path), limits=Limits(), owner_uid=os.geteuid())
    policy.check_spec(spec, Settings().policy)
    policy.check_set([spec], Settings().policy)
    assert spec.programs and len(spec.sha256) == 64
