"""Fixtures for the systemd end-to-end tests: a built .deb, a booted systemd in its own
namespaces, and the package installed there with dpkg exactly as an operator would."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sysd import Systemd

REPO = Path(__file__).resolve().parents[2]
TRACEFS = "/sys/kernel/tracing"


def _need_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("systemd tests need root (namespaces, mounts, bpf()); run them as root")
    for tool in ("unshare", "nsenter", "dpkg-deb", "dpkg", "bpftool"):
        if shutil.which(tool) is None:
            pytest.fail(f"systemd tests need {tool} on PATH")
    if not os.access("/lib/systemd/systemd", os.X_OK):
        pytest.fail("systemd tests need /lib/systemd/systemd (Debian package 'systemd')")


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built by the same script a release would use."""
    _need_host()
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run([str(REPO / "packaging" / "build-deb.sh"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"build-deb.sh failed:\n{proc.stderr}"
    return Path(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class _Mode:
    mode: int
    uid: int
    gid: int


def _tracefs_modes() -> dict[str, _Mode]:
    """tracefs is the one piece of host state the apply unit's host grants
    (/usr/lib/loaderd/loaderd-host.tmpfiles) touch (it is shared with the namespace), and the
    package's removal puts back: remember it to put it back."""
    paths = [TRACEFS, *glob.glob(f"{TRACEFS}/events/*/*/id"),
             *glob.glob(f"{TRACEFS}/events/*/*/format")]
    out: dict[str, _Mode] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out[p] = _Mode(st.st_mode & 0o7777, st.st_uid, st.st_gid)
    return out


def _restore(modes: dict[str, _Mode]) -> None:
    for p, m in modes.items():
        try:
            os.chown(p, m.uid, m.gid)
            os.chmod(p, m.mode)
        except OSError:
            pass  # an event that went away with its module


@pytest.fixture(scope="module")
def sysd() -> Iterator[Systemd]:
    _need_host()
    saved = _tracefs_modes()
    inst = Systemd(f"t{os.getpid()}")
    try:
        inst.boot()
        yield inst
    finally:
        inst.shutdown()
        _restore(saved)


@pytest.fixture(scope="module")
def installed(sysd: Systemd, deb: Path) -> Systemd:
    """`dpkg -i` the package, then put the shipped example specs in place as an operator would."""
    sysd.install_deb(deb)
    sysd.sh("cp /usr/share/doc/loaderd/examples/programs.d/* /etc/loaderd/programs.d/")
    return sysd
