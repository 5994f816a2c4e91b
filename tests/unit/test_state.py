"""Manifest and generations: atomic writes, modes, and the exact applied bytes kept."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from loaderd.apply.applier import generation_files
from loaderd.config.spec import load_dir
from loaderd.errors import LoaderdError
from loaderd.model import Settings
from loaderd.store.manifest import Manifest, Status
from loaderd.store.statedir import State

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "programs.d"


def test_generation_keeps_the_bytes_that_were_parsed(tmp_path: Path) -> None:
    d = tmp_path / "programs.d"
    shutil.copytree(EXAMPLES, d)
    specs, errors = load_dir(str(d), Settings(), check_owner=False)
    assert not errors
    applied = {p.name: p.read_bytes() for p in d.iterdir()}
    (d / "exec_counter.bpf.c").write_text("/* edited after parsing */")  # must not leak in
    files = generation_files(specs)
    assert files == {name: applied[name] for name in files}
    assert set(files) == set(applied)  # every spec and the one C file

    state = State(str(tmp_path / "state"))
    state.save_generation("tx1", files)
    gen = Path(state.generation_dir("tx1"))
    assert (gen / "exec_counter.bpf.c").read_bytes() == applied["exec_counter.bpf.c"]
    assert stat.S_IMODE(gen.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in gen.iterdir())


def test_manifest_is_written_atomically_and_group_readable_only_with_a_group(
        tmp_path: Path) -> None:
    private = State(str(tmp_path / "a"))
    private.save(Manifest(Status.COMMITTED))
    assert stat.S_IMODE(os.stat(private.manifest_path).st_mode) == 0o600
    shared = State(str(tmp_path / "b"), gid=os.getgid())
    shared.save(Manifest(Status.COMMITTED))
    assert stat.S_IMODE(os.stat(shared.manifest_path).st_mode) == 0o640
    assert shared.manifest().status is Status.COMMITTED
    assert not [p for p in os.listdir(tmp_path / "b") if ".tmp." in p]


def test_one_writer_at_a_time_and_readers_see_it(tmp_path: Path) -> None:
    """A second writer waits for the first (and gives up naming its pid); the daemon's
    non-blocking shared hold reports a writer at work instead of waiting."""
    import subprocess
    import sys
    import time

    from loaderd.errors import Kind, LoaderdError

    st = State(str(tmp_path))
    with st.quiet() as quiet:
        assert quiet  # nobody ever applied: no lock file yet
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from loaderd.store.statedir import State\n"
         "with State(sys.argv[1]).exclusive():\n print('held', flush=True); time.sleep(30)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with st.quiet() as quiet:
            assert not quiet
        waits: list[str] = []
        start = time.monotonic()
        with pytest.raises(LoaderdError) as exc, st.exclusive(timeout=0.5, waiting=waits.append):
            pass
        assert time.monotonic() - start >= 0.5
        assert exc.value.kind is Kind.STATE and f"pid {holder.pid}" in str(exc.value)
        assert waits == [f"waiting for loaderd pid {holder.pid} to finish"]
    finally:
        holder.kill()
        holder.wait()
    with st.exclusive(timeout=5), st.quiet() as quiet:  # the holder died: lock went with it
        assert not quiet
    with st.quiet() as quiet:
        assert quiet


def test_lock_must_be_a_plain_singly_linked_file(tmp_path: Path) -> None:
    """Root truncates and chowns the lock: a planted FIFO must not hang it, a hard link must
    not hand some other file over."""
    from loaderd.errors import Kind, LoaderdError

    st = State(str(tmp_path))
    os.mkfifo(tmp_path / "lock")
    with pytest.raises(LoaderdError) as exc, st.exclusive(timeout=1):
        pass
    assert exc.value.kind is Kind.STATE and "not a plain file" in exc.value.message
    os.unlink(tmp_path / "lock")
    other = tmp_path / "other"
    other.write_text("precious\n")
    os.link(other, tmp_path / "lock")
    with pytest.raises(LoaderdError), st.exclusive(timeout=1):
        pass
    assert other.read_text() == "precious\n"  # not truncated


def test_readers_create_nothing(tmp_path: Path) -> None:
    state = State(str(tmp_path / "state"))
    assert state.manifest().status is Status.EMPTY and state.generations() == []
    assert not (tmp_path / "state").exists()  # only a writer makes the directory


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    for i in range(8):
        (victim / f"d{i}").mkdir(parents=True)
        (victim / f"d{i}" / "f").write_text("important\n")
    return victim


def test_a_symlinked_generations_dir_is_refused_and_its_target_untouched(
        tmp_path: Path) -> None:
    # The service user owns the state dir: `generations -> /etc` made root's apply write the
    # copies there and prune (rmtree) every directory of /etc but the last 5 (measured).
    state = State(str(tmp_path / "state"))
    state.save_generation("20260101t000000-000000000-000000", {"a.yaml": b"x"})
    victim = _victim(tmp_path)
    gens = Path(state.dir) / "generations"
    gens.rename(tmp_path / "old")
    gens.symlink_to(victim)
    with pytest.raises(LoaderdError, match="a symlink is refused"):
        state.generations()
    with pytest.raises(LoaderdError, match="a symlink is refused"):
        state.save_generation("20260101t000001-000000000-000000", {"a.yaml": b"x"})
    assert sorted(p.name for p in victim.iterdir()) == [f"d{i}" for i in range(8)]


def test_generation_entries_that_are_symlinks_are_neither_listed_nor_pruned(
        tmp_path: Path) -> None:
    state = State(str(tmp_path / "state"))
    state.save_generation("20260101t000000-000000000-000000", {"a.yaml": b"x"})
    victim = _victim(tmp_path)
    gens = Path(state.dir) / "generations"
    for i in range(3):  # oldest names: the first to be pruned
        (gens / f"20250101t00000{i}-000000000-000000").symlink_to(victim)
    (gens / "not-a-txid").mkdir()
    for i in range(1, 8):
        state.save_generation(f"20260101t00000{i}-000000000-000000", {"sub/a.c": b"y"})
    assert state.generations() == [f"20260101t00000{i}-000000000-000000" for i in range(3, 8)]
    assert sorted(p.name for p in victim.iterdir()) == [f"d{i}" for i in range(8)]
    assert (gens / "not-a-txid").is_dir()
    assert (gens / "20260101t000007-000000000-000000" / "sub" / "a.c").read_bytes() == b"y"


def test_the_audit_baseline_is_untrusted_state(tmp_path: Path) -> None:
    # Was open() + json.load: a FIFO hung `loaderctl audit-system` for good (measured).
    from loaderd.reports import foreign

    path = tmp_path / foreign.BASELINE
    good = '{"foreign_programs": ["tracing:x:00"], "burst_programs": []}'
    path.write_text(good)
    assert foreign._load_baseline(str(tmp_path))["foreign_programs"] == {"tracing:x:00"}
    path.unlink()
    assert foreign._load_baseline(str(tmp_path)) == {"foreign_programs": set(),
                                                     "burst_programs": set()}
    for make in (lambda: os.mkfifo(path), lambda: path.symlink_to("/dev/zero"),
                 lambda: path.write_text("[" * 100000), lambda: path.write_text("[1]"),
                 lambda: path.write_bytes(b" " * (foreign.MAX_BASELINE_BYTES + 1))):
        make()
        notes: list[str] = []
        assert foreign._load_baseline(str(tmp_path), notes)["foreign_programs"] == set()
        assert len(notes) == 1 and "refused" in notes[0], notes
        path.unlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_a_hold_or_generation_another_user_wrote_is_not_loaderds(tmp_path: Path) -> None:
    """rollback.json decides what the next apply loads (with capabilities): one planted by
    another user, or pointing at a generation another user made, is ignored (attacker seat)."""
    from loaderd.store.statedir import Hold

    state = State(str(tmp_path / "state"))
    gen = "20261203t150000-000000000-abcdef"
    state.save_hold(Hold(gen, 1796300000.0, "0" * 64))
    assert state.hold() is not None
    os.chown(state.hold_path, 65534, 65534)  # the same record, another owner
    assert state.hold() is None
    gdir = tmp_path / "state" / "generations" / gen
    gdir.mkdir(parents=True)
    assert state.generations() == [gen]
    os.chown(gdir, 65534, 65534)
    assert state.generations() == []
    # hostile contents: nesting, infinite or absurd times, a summary of other types
    for text in ("[" * 3000 + "]" * 3000,
                 f'{{"generation": "{gen}", "at": 1e999, "programs_sha256": "x"}}',
                 f'{{"generation": "{gen}", "at": -5, "programs_sha256": "x"}}'):
        Path(state.hold_path).write_text(text)
        os.chown(state.hold_path, 0, 0)
        assert state.hold() is None, text
    seen = tmp_path / "state" / "settings.json"
    for text in ("[" * 3000 + "]" * 3000, '{"sha256": "x", "summary": {"zz": [1]}}'):
        seen.write_text(text)
        assert state.settings_seen() is None, text
