"""Shared fixtures. Kernel tests run as root on the real kernel, each in its own bpffs root and
state dir, and remove their pins afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "configs" / "programs.d"


# Debian's interpreter, for processes run as unprivileged test users (a venv inside the checkout
# may not be readable by them).
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="session")
def shared_code() -> Iterator[str]:
    """A copy of the loaderd package that unprivileged test users can read: the checkout may
    live under a 0700 home directory (CI clones wherever it likes). Use as their PYTHONPATH."""
    d = Path(tempfile.mkdtemp(prefix="loaderd-code-"))
    shutil.copytree(REPO / "loaderd", d / "loaderd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for p in [d, *d.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def bpffs_root() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (bpf(), bpffs); run the README's test command as root")
    if not os.path.ismount("/sys/fs/bpf"):
        pytest.fail("bpffs is not mounted: scripts/setup-host.sh mounts it")
    root = f"/sys/fs/bpf/ldtest_{uuid.uuid4().hex[:10]}"
    yield root
    from loaderd.bpf.pins import PinLayout

    PinLayout(root).remove_tree(root)


@pytest.fixture
def dummy_iface() -> Iterator[str]:
    """A private interface for XDP: lo takes one XDP program host-wide (EBUSY for a second)."""
    name = f"ldd{uuid.uuid4().hex[:8]}"  # a veth end (this kernel has no dummy driver)
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"],
                   check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    yield name
    subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.fixture
def specs_dir(tmp_path: Path, dummy_iface: str) -> Path:
    """A private copy of the shipped examples (root-owned, 0644: passes the trust checks), with
    the XDP example moved from lo to a private dummy interface."""
    d = tmp_path / "programs.d"
    shutil.copytree(EXAMPLES, d)
    os.chmod(tmp_path, 0o755)
    xdp = d / "xdp_counter.yaml"
    xdp.write_text(xdp.read_text().replace("interface: lo", f"interface: {dummy_iface}"))
    return d


def no_staging_leftovers(root: str) -> bool:
    from loaderd.bpf.pins import PinLayout

    staging = PinLayout(root).staging_root
    return not os.path.exists(staging) or not os.listdir(staging)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """The kernel releases unpinned links/programs asynchronously: poll, don't sleep blindly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


class Drained:
    """A child's output pipe read as it comes, the way journald reads a service's: a reader
    that lets the pipe fill (64 KiB) blocks the child's writes, and a blocked daemon stops
    reading its rings (CI once saw the tail samples of a perf flood lost that way)."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.append(line)

    def text(self, timeout: float = 60) -> str:
        """All of it, once the child closed the pipe (it exited)."""
        self._thread.join(timeout)
        return "".join(self.lines)


def write_settings(tmp_path: Path, bpffs_root: str, specs: Path, extra: str = "") -> Path:
    state = tmp_path / "state"
    conf = tmp_path / "loaderd.yaml"
    # No metrics file in the host's node_exporter directory (the default when it exists).
    metrics = "" if "metrics_dir" in extra else "metrics_dir: null\n"
    conf.write_text(f"loaderd: 1\nprograms_dir: {specs}\nbpffs_root: {bpffs_root}\n"
                    f"state_dir: {state}\n{metrics}{extra}")
    return conf


def make_conf(base: Path, bpffs_root: str, specs: dict[str, str], extra: str = "") -> Path:
    """Settings plus a programs dir under `base` holding `specs` (name -> YAML text); `base`
    made 0755 so the trust checks and unprivileged readers can walk it."""
    os.chmod(base, 0o755)
    d = base / "specs"
    d.mkdir(exist_ok=True)
    for name, text in specs.items():
        (d / f"{name}.yaml").write_text(text)
    return write_settings(base, bpffs_root, d, extra)


@pytest.fixture
def config(tmp_path: Path, bpffs_root: str, specs_dir: Path) -> Path:
    return write_settings(tmp_path, bpffs_root, specs_dir)


def loaderd(*args: str, check: bool = True, timeout: float = 300,
            **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a fresh interpreter, as an operator would."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "loaderd", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(f"loaderd {' '.join(args)} failed ({proc.returncode}):\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc  # type: ignore[no-any-return]
