"""The .deb itself, as packaging/build-deb.sh builds it from debian/ (issue 12 item 11):
lintian-clean (no error, no warning), reproducible (a second build is bit-identical), with the
man pages, completion and catalog where Debian looks for them, once."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _contents(deb: Path) -> list[str]:
    out = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                         check=True).stdout
    listing = subprocess.run(["tar", "-t"], input=out, capture_output=True, check=True).stdout
    return [p.removeprefix(".") for p in listing.decode().splitlines()]


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_lintian_reports_no_error_and_no_warning(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (scripts/setup-host.sh installs it for tests)")
    proc = subprocess.run(["lintian", "--allow-root", "--fail-on", "error,warning",
                           "--display-level", ">=warning", str(deb)],
                          capture_output=True, text=True, timeout=600)
    tags = [ln for ln in proc.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert proc.returncode == 0 and tags == [], proc.stdout + proc.stderr
    # No override hides a tag: anything lintian says would be fixed instead.
    assert not any("lintian-overrides" in p for p in _contents(deb))


def test_two_builds_are_bit_identical(deb: Path, tmp_path: Path) -> None:
    proc = subprocess.run([str(REPO / "packaging" / "build-deb.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    again = Path(proc.stdout.strip().splitlines()[-1])
    assert again.name == deb.name
    assert hashlib.sha256(again.read_bytes()).hexdigest() == \
        hashlib.sha256(deb.read_bytes()).hexdigest()


def test_package_metadata(deb: Path) -> None:
    assert _field(deb, "Architecture") == "all"
    maint = _field(deb, "Maintainer")
    assert "localhost" not in maint and ".invalid" not in maint, maint
    depends = _field(deb, "Depends")
    assert "python3:any" in depends and "python3-bpfcc" in depends
    # Headers: what Debian (linux-headers-amd64) or Ubuntu (linux-headers-generic) provides;
    # needed only for BCC specs, so recommended.
    assert "linux-headers" not in depends
    assert _field(deb, "Recommends").startswith("linux-headers-amd64 | linux-headers-generic")


def test_files_where_debian_looks_for_them(deb: Path) -> None:
    files = _contents(deb)
    for want in ("/usr/share/man/man8/loaderd.8.gz", "/usr/share/man/man8/loaderctl.8.gz",
                 "/usr/share/man/man5/loaderd.yaml.5.gz", "/usr/share/man/man5/loaderd-spec.5.gz",
                 "/usr/share/bash-completion/completions/loaderd",
                 "/usr/share/bash-completion/completions/loaderctl",
                 "/usr/share/doc/loaderd/copyright", "/usr/share/doc/loaderd/changelog.gz",
                 "/usr/lib/sysusers.d/loaderd.conf", "/usr/lib/tmpfiles.d/loaderd.conf",
                 "/usr/lib/loaderd/loaderd-host.tmpfiles",
                 "/lib/systemd/system/loaderd.service", "/lib/systemd/system/loaderd-audit.timer"):
        assert want in files, want
    # The journal catalog ships once (not also as Python package data).
    assert [f for f in files if f.endswith(".catalog")] == \
        ["/usr/lib/systemd/catalog/loaderd.catalog"]
    # The host-wide grants are not in tmpfiles.d (applied at install and boot).
    assert not any("/sys/" in f for f in files)
