"""The manifest is untrusted input: typed records, one located error for anything off."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from loaderd.errors import Kind, LoaderdError
from loaderd.model import ProgType, TracepointAttach, XdpAttach
from loaderd.store import manifest
from loaderd.store.statedir import State

ROOT = "/sys/fs/bpf/loaderd"
GOOD: dict[str, Any] = {
    "version": 1, "status": "committed", "txid": "20261203t071100-123456789-abcdef",
    "written_at": 1.5, "removed": [],
    "last_apply": {"at": 2.0, "compiles": 1, "built": ["counter"], "adopted": []},
    "specs": {"counter": {
        "name": "counter", "file": "/etc/loaderd/programs.d/counter.yaml",
        "sha256": "a" * 64, "pin_dir": f"{ROOT}/counter",
        "programs": {"count": {"name": "count", "function": "count", "type": "tracepoint",
                               "id": 7, "tag": "0123456789abcdef", "helpers": ["ktime_get_ns"],
                               "degraded": None,
                               "calls": {"bpf_to_bpf": 0, "kfunc": 0, "callx": 0}},
                     "xdp": {"name": "xdp", "function": "xdp", "type": "xdp", "id": 8,
                             "tag": "0123456789abcdef", "helpers": [], "degraded": None}},
        "maps": {"counts": {"name": "counts", "id": 3, "frozen": False, "access": ""}},
        "links": {"count": {"target": "tracepoint:sched:sched_process_exec", "id": 9},
                  "xdp": {"target": "xdp:eth0:skb", "id": 10, "ifindex": 2}},
        "sources": ["/etc/loaderd/programs.d/counter.bpf.c"],
        "txid": "20261203t071100-123456789-abcdef", "deferred_links": [],
        "events": {}}},
}


def _parse(doc: Any) -> manifest.Manifest:
    return manifest.parse(json.dumps(doc).encode(), "/var/lib/loaderd/manifest.json", ROOT)


def test_a_good_manifest_becomes_typed_records_and_round_trips() -> None:
    m = _parse(GOOD)
    assert m.status is manifest.Status.COMMITTED
    spec = m.specs["counter"]
    assert spec.programs["count"].type is ProgType.TRACEPOINT
    assert spec.programs["xdp"].calls is None  # loaded before call facts: adopt rebuilds
    assert spec.links["count"].target == TracepointAttach("sched", "sched_process_exec")
    assert spec.links["xdp"].target == XdpAttach("eth0", "skb")
    assert spec.links["xdp"].ifindex == 2
    again = _parse(manifest.to_dict(m))
    assert again == m


def _bad(path: list[str | int], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


SPEC = ["specs", "counter"]
CASES = [
    (["status"], "half-done", "status"),
    (["status"], 1, "status"),
    (["txid"], "../../etc", "txid"),
    (["removed"], ["../x"], "removed[0]"),
    ([*SPEC, "pin_dir"], "/etc/cron.d/counter", "specs.counter.pin_dir"),
    ([*SPEC, "pin_dir"], f"{ROOT}/../counter", "specs.counter.pin_dir"),
    ([*SPEC, "pin_dir"], f"{ROOT}/other", "specs.counter.pin_dir"),
    ([*SPEC, "pin_dir"], 5, "specs.counter.pin_dir"),
    ([*SPEC, "txid"], "x/../../y", "specs.counter.txid"),
    ([*SPEC, "sha256"], "zz", "specs.counter.sha256"),
    ([*SPEC, "file"], "relative.yaml", "specs.counter.file"),
    ([*SPEC, "programs", "count", "id"], "7", "specs.counter.programs.count.id"),
    ([*SPEC, "programs", "count", "id"], True, "specs.counter.programs.count.id"),
    ([*SPEC, "programs", "count", "type"], "lsm_magic", "specs.counter.programs.count.type"),
    ([*SPEC, "programs", "count", "function"], "a/b", "specs.counter.programs.count.function"),
    ([*SPEC, "programs", "count", "helpers"], "all", "specs.counter.programs.count.helpers"),
    ([*SPEC, "maps", "counts", "frozen"], "yes", "specs.counter.maps.counts.frozen"),
    ([*SPEC, "maps", "counts", "access"], "rw", "specs.counter.maps.counts.access"),
    ([*SPEC, "links", "count", "target"], "xdp:eth0", "specs.counter.links.count.target"),
    ([*SPEC, "links", "count", "target"], "tracepoint:a/b:c",
     "specs.counter.links.count.target"),
    ([*SPEC, "links", "count", "id"], -1, "specs.counter.links.count.id"),
    ([*SPEC, "programs"], [], "specs.counter.programs"),
    (["specs"], {"../evil": GOOD["specs"]["counter"]}, "specs: key"),
    ([*SPEC, "deferred_links"], ["ghost"], "specs.counter.links"),
]


@pytest.mark.parametrize(("path", "value", "field"), CASES,
                         ids=[c[2] + "=" + repr(c[1])[:20] for c in CASES])
def test_each_malformed_field_is_one_located_error(path: list[str | int], value: Any,
                                                   field: str) -> None:
    with pytest.raises(LoaderdError) as exc:
        _parse(_bad(path, value))
    assert exc.value.kind is Kind.STATE
    assert exc.value.location.file == "/var/lib/loaderd/manifest.json"
    assert exc.value.location.field == field


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"\xff\xfe", b"[" * 100000, b"null"])
def test_garbage_is_a_located_error_not_an_internal_one(data: bytes) -> None:
    with pytest.raises(LoaderdError) as exc:
        manifest.parse(data, "/m.json", ROOT)
    assert exc.value.kind is Kind.STATE and exc.value.location.file == "/m.json"


def test_a_fifo_in_place_of_the_manifest_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    os.mkfifo(path)
    result: list[BaseException | None] = []

    def read() -> None:
        try:
            manifest.read(str(path), ROOT)
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    assert result, "reading a FIFO manifest hung"
    assert isinstance(result[0], LoaderdError) and "not a regular file" in str(result[0])


def test_a_symlinked_manifest_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(LoaderdError, match="symlink"):
        State(str(tmp_path), pin_root=ROOT).manifest()


def test_an_oversized_manifest_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with open(path, "wb") as f:
        f.truncate(manifest.MAX_BYTES + 1)
    with pytest.raises(LoaderdError, match="bytes"):
        manifest.read(str(path), ROOT)


def test_a_manifest_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(GOOD))
    os.chown(path, 65534, 65534)
    with pytest.raises(LoaderdError, match="owned by uid 65534"):
        manifest.read(str(path), ROOT)


def test_state_load_gives_the_validated_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(GOOD))
    state = State(str(tmp_path), pin_root=ROOT)
    assert state.manifest().specs["counter"].maps["counts"].id == 3
    assert state.manifest().specs["counter"].links["xdp"].target.text == "xdp:eth0:skb"
    other = State(str(tmp_path), pin_root="/sys/fs/bpf/elsewhere")
    with pytest.raises(LoaderdError, match="pin_dir"):
        other.manifest()
