"""Fixtures for the kernel/pins tests: a private bpffs directory per test, BCC compilation
with auto-attach disabled, and throwaway veth pairs."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

NOT_ROOT = "needs root: bpf(), bpffs pins and perf_event_open on the real kernel"


@pytest.fixture
def bpffs_dir() -> Iterator[str]:
    """A fresh directory on bpffs, removed (pins and all) afterwards."""
    path = f"/sys/fs/bpf/loaderd-test-{uuid.uuid4().hex[:12]}"
    os.mkdir(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # symlink-safe; unlinking pins drops them


@pytest.fixture
def bcc_compile() -> Iterator[Callable[[str], Any]]:
    """Compile BCC C text without auto-attaching anything; every object is cleaned up."""
    from bcc import BPF

    class NoAutoBPF(BPF):  # type: ignore[misc]
        def _trace_autoload(self) -> None:
            pass  # nothing attaches unless the test does it

    made: list[Any] = []

    def compile_text(text: str) -> Any:
        obj = NoAutoBPF(text=text.encode(), allow_rlimit=False)  # bcc wants bytes
        made.append(obj)
        return obj

    yield compile_text
    for obj in made:
        obj.cleanup()


@pytest.fixture
def veth() -> Iterator[str]:
    """A veth pair with a unique name on the host, up, deleted afterwards. Yields one end."""
    name = f"lxd{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"],
                   check=True)
    try:
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)
