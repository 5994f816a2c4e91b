"""The state directory's filesystem full (a small tmpfs as state_dir), with every amount of free
space from none to enough, during an apply (the pending and committed manifests, the generation
copy) and a rollback: the apply refuses or completes; the manifest is never truncated; a
refusal leaves the previous set attached and verified and names the path and ENOSPC (issue 17).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaderd.errors import LoaderdError
from loaderd.store import manifest as manifest_mod
from loaderd.store.statedir import State
from tests.conftest import loaderd, make_conf, no_staging_leftovers
from tests.kernel.test_lifecycle import COUNTER, prog_tag

pytestmark = pytest.mark.kernel

PAGE = 4096


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0750", "loaderd-full",
                    str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)


def fill(state: Path, free_pages: int) -> None:
    """Leave exactly `free_pages` pages free on the tmpfs (tmpfs counts whole pages)."""
    filler = state / "filler"
    filler.unlink(missing_ok=True)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, max(0, os.stat(filler).st_size - free_pages * PAGE))
    st = os.statvfs(state)
    assert st.f_bavail == free_pages, (st.f_bavail, free_pages)


def manifest_of(state: Path) -> manifest_mod.Manifest:
    m = manifest_mod.read(str(state / "manifest.json"))  # parses, or raises: never truncated
    assert m is not None
    return m


def outcome(conf: Path, state: Path, bpffs_root: str, before: tuple[str | None, str],
            proc: subprocess.CompletedProcess[str]) -> str:
    """Refused (old set attached, verified, ENOSPC and the path said) or completed; checked
    while the disk is still full (status must work then too)."""
    m = manifest_of(state)
    tag = prog_tag(f"{bpffs_root}/counter/progs/count_exec")[1]
    out = proc.stdout + proc.stderr
    assert "internal error" not in out and "Traceback" not in out, out
    assert no_staging_leftovers(bpffs_root)
    status = loaderd("--config", str(conf), "status", check=False)
    if proc.returncode == 0:
        assert m.status is manifest_mod.Status.COMMITTED, m
        assert m.txid != before[0] and tag != before[1]
        assert status.returncode == 0, status.stdout + status.stderr
        return "completed"
    assert "No space left on device" in out and str(state) in out, out
    if m.status is manifest_mod.Status.PENDING:  # past the commit point: rolled forward next
        assert status.returncode == 1, status.stdout + status.stderr
        return "pending"
    assert (m.txid, tag) == before, "a refusal changed what is applied"
    # verified: no drift; 3 if the refusal record could be written, 0 if not (disk full)
    assert status.returncode in (0, 3), status.stdout + status.stderr
    return "refused"


# A spec of three pages (the generation copy needs them) whose manifest takes one.
PADDING = "".join(f"# padding line {i:04d} {'x' * 80}\n" for i in range(120))


def test_apply_and_rollback_with_the_state_disk_full(tmp_path: Path, bpffs_root: str,
                                                     small_state: Path) -> None:
    conf = make_conf(tmp_path, bpffs_root, {"counter": PADDING + COUNTER.format(step=1)})
    spec = tmp_path / "specs" / "counter.yaml"
    prog = f"{bpffs_root}/counter/progs/count_exec"
    gens = small_state / "generations"
    loaderd("--config", str(conf), "apply")
    seen: dict[str, list[int]] = {}
    # 0 pages: the pending manifest cannot be written (refused, staging discarded); 2: the
    # manifest fits, the generation copy does not (committed, no generation, no partial
    # one); 6: all of it fits.
    for step, free in enumerate([0, 2, 6], start=2):
        before = (manifest_of(small_state).txid, prog_tag(prog)[1])
        fill(small_state, free)
        spec.write_text(PADDING + COUNTER.format(step=step))
        proc = loaderd("--config", str(conf), "apply", check=False)
        got = outcome(conf, small_state, bpffs_root, before, proc)
        seen.setdefault(got, []).append(free)
        txid = manifest_of(small_state).txid
        assert txid is not None
        kept = (gens / txid).is_dir()
        if got == "completed" and kept:  # a generation is whole or absent
            assert (gens / txid / "counter.yaml").read_text() == spec.read_text()
        if free == 2:
            assert got == "completed" and not kept, proc.stdout + proc.stderr
            said = [e for e in proc.stderr.splitlines() if '"degraded"' in e]  # journaled
            assert said and "generation" in said[0] and "(ENOSPC)" in said[0], proc.stderr
        assert not [p for p in small_state.rglob("*.tmp.*")], "temp files left behind"
        (small_state / "filler").unlink()
        if got != "completed":
            loaderd("--config", str(conf), "apply")  # room again: builds it now
        assert loaderd("--config", str(conf), "status", check=False).returncode == 0
    assert seen == {"refused": [0], "completed": [2, 6]}, seen
    # A rollback is an apply of the generation before: refused the same way, set unchanged.
    before = (manifest_of(small_state).txid, prog_tag(prog)[1])
    fill(small_state, 0)
    proc = loaderd("--config", str(conf), "rollback", check=False)
    assert outcome(conf, small_state, bpffs_root, before, proc) == "refused"
    (small_state / "filler").unlink()
    loaderd("--config", str(conf), "disable")


def test_a_short_write_never_truncates_the_manifest(tmp_path: Path) -> None:
    """write() on a filling filesystem writes what fits and returns the count: one unchecked
    call renamed a truncated manifest over the good one (measured: 16384 of 20000 bytes)."""
    state = tmp_path / "st"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "loaderd-short", str(state)],
                   check=True)
    try:
        st = State(str(state))
        good = st.save(manifest_mod.EMPTY)
        fill(state, 3)
        huge = dataclasses.replace(good, removed=tuple(f"spec{i:05d}" for i in range(3000)))
        with pytest.raises(LoaderdError) as err:
            st.save(huge)
        assert err.value.location.file == str(state / "manifest.json")
        assert "No space left on device (ENOSPC)" in str(err.value)
        assert manifest_of(state).removed == ()  # the old one, whole
        assert sorted(p.name for p in state.iterdir()) == ["filler", "generations",
                                                            "manifest.json"]
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)
