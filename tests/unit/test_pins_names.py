"""Pin names and paths: the strict alphabet and confinement, checked before any filesystem
access (no kernel, no root needed)."""

from __future__ import annotations

import pytest

from loaderd.bpf import pins
from loaderd.errors import Kind, LoaderdError

ROOT = "/sys/fs/bpf/loaderd"


@pytest.mark.parametrize("name", ["a", "net", "count_3", "x" * 48, "a_b_c"])
def test_good_names(name: str) -> None:
    assert pins.check_name(name) == name


@pytest.mark.parametrize("name", [
    "", ".", "..", "../x", "/", "a/b", "Net", "UPPER", "1abc", "_x", "a-b", "a.b", "a b",
    "x" * 49, "caf\u00e9", "a\0b", "a\n",
])
def test_bad_names(name: str) -> None:
    with pytest.raises(LoaderdError) as exc:
        pins.check_name(name, "map name")
    assert exc.value.kind is Kind.PIN
    assert "map name" in str(exc.value) and repr(name) in str(exc.value)
    assert pins.NAME_ALLOWED in str(exc.value)


def test_layout_paths() -> None:
    layout = pins.PinLayout(ROOT)
    assert layout.spec_dir("net") == f"{ROOT}/net"
    assert layout.prog_path("net", "count") == f"{ROOT}/net/progs/count"
    assert layout.map_path("net", "hits") == f"{ROOT}/net/maps/hits"
    assert layout.link_path("net", "count") == f"{ROOT}/net/links/count"
    assert layout.staging_root == f"{ROOT}/_staging"
    assert layout.staging_dir("tx-1") == f"{ROOT}/_staging/tx-1"
    assert layout.staging_spec("tx-1", "net") == f"{ROOT}/_staging/tx-1/net"
    assert layout.staging("tx-1").map_path("net", "m") == f"{ROOT}/_staging/tx-1/net/maps/m"
    assert layout.join(layout.spec_dir("net"), "maps", "m") == f"{ROOT}/net/maps/m"


def test_staging_cannot_collide_with_a_spec() -> None:
    with pytest.raises(LoaderdError):
        pins.check_name(pins.STAGING)


@pytest.mark.parametrize("call", [
    lambda lay: lay.spec_dir(".."),
    lambda lay: lay.prog_path("net", "../../etc"),
    lambda lay: lay.map_path("Net", "m"),
    lambda lay: lay.kind_dir("net", "other"),
    lambda lay: lay.link_path("net", "x" * 49),
    lambda lay: lay.staging_dir("../x"),
    lambda lay: lay.staging_dir("TX"),
    lambda lay: lay.join(ROOT, ".."),
    lambda lay: lay.join("/sys/fs/bpf/other", "m"),
    lambda lay: lay.join(ROOT + "x", "m"),
    lambda lay: lay.join(ROOT + "/net/../..", "m"),
])
def test_layout_refuses(call: object) -> None:
    with pytest.raises(LoaderdError) as exc:
        call(pins.PinLayout(ROOT))  # type: ignore[operator]
    assert exc.value.kind is Kind.PIN


@pytest.mark.parametrize("root", ["", "/", "relative", "/sys/fs/bpf/../x", "/sys//fs/bpf",
                                  "/sys/fs/bpf/x/", "//sys/fs/bpf"])
def test_bad_roots(root: str) -> None:
    with pytest.raises(LoaderdError) as exc:
        pins.PinLayout(root)
    assert exc.value.kind is Kind.PIN


@pytest.mark.parametrize("path", ["/sys/fs/bpf/other/m", "/sys/fs/bpf/loaderdx/m", "/etc/x"])
def test_operations_confined_to_root(path: str) -> None:
    layout = pins.PinLayout(ROOT)
    with pytest.raises(LoaderdError, match="outside"):
        layout.remove_tree(path)
    with pytest.raises(LoaderdError, match="outside"):
        layout.exchange(f"{ROOT}/a", path)
