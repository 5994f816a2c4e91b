"""Command-line surfaces: the global flags work before or after the command name, and the
kill switch has its release on both CLIs."""

from __future__ import annotations

import pytest

from loaderd.cli import loaderctl as ctl
from loaderd.cli import loaderd as cli


@pytest.mark.parametrize("make", [cli.parser, ctl.parser])
@pytest.mark.parametrize("argv", [["--debug", "status"], ["status", "--debug"]])
def test_debug_before_or_after_the_command(make: object, argv: list[str]) -> None:
    args = make().parse_args(argv)  # type: ignore[operator]
    assert args.debug is True and args.command == "status"


@pytest.mark.parametrize("make", [cli.parser, ctl.parser])
def test_debug_defaults_off_and_config_is_accepted_after_the_command(make: object) -> None:
    args = make().parse_args(["status", "--config", "/x.yaml"])  # type: ignore[operator]
    assert args.debug is False and args.config == "/x.yaml"


@pytest.mark.parametrize("make", [cli.parser, ctl.parser])
def test_disable_has_its_enable(make: object) -> None:
    for command in ("disable", "enable", "rollback"):
        assert make().parse_args([command]).command == command  # type: ignore[operator]


def test_check_takes_jobs() -> None:
    assert cli.parser().parse_args(["check", "--jobs", "3"]).jobs == 3


# --- exit codes when the reader goes away (`loaderd check | head -1`) -----------------------

def _closed_pipe_run(argv: list[str], *, close_stderr: bool) -> int:
    """Run the real CLI with stdout (and stderr) on a pipe whose reader is already gone."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "loaderd", *argv], stdout=write,
                              stderr=write if close_stderr else subprocess.DEVNULL,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120,
                              check=False).returncode
    finally:
        os.close(write)


@pytest.fixture
def spec_dirs(tmp_path: pytest.TempPathFactory) -> tuple[str, str]:
    import os
    import shutil
    from pathlib import Path

    from tests.conftest import EXAMPLES
    from tests.unit.test_spec import FLOOD

    base = Path(str(tmp_path))
    os.chmod(base, 0o755)
    shutil.copytree(EXAMPLES, base / "ok")
    (base / "bad").mkdir(mode=0o755)
    (base / "bad" / "flood.yaml").write_text(FLOOD)  # 20,001 errors: plenty to write
    return str(base / "ok"), str(base / "bad")


@pytest.mark.parametrize("close_stderr", [False, True])
def test_a_refusal_is_never_turned_into_0_by_a_closed_pipe(spec_dirs: tuple[str, str],
                                                           close_stderr: bool) -> None:
    ok, bad = spec_dirs
    assert _closed_pipe_run(["check", "--no-kernel", "--dir", bad],
                            close_stderr=close_stderr) == 1
    # A success whose output was lost is not a clean 0 either (a shell's SIGPIPE status).
    assert _closed_pipe_run(["check", "--no-kernel", "--dir", ok],
                            close_stderr=close_stderr) == 141


def test_pipe_guard_drops_output_after_the_reader_left() -> None:
    from loaderd.cli.common import PipeGuard

    class Gone:
        def __init__(self) -> None:
            self.calls = 0

        def write(self, text: str) -> int:
            self.calls += 1
            raise BrokenPipeError

        def flush(self) -> None:
            raise BrokenPipeError

        def fileno(self) -> int:
            raise ValueError("no fd")  # _break must not fail on it

    inner = Gone()
    guard = PipeGuard(inner)
    assert guard.write("x\n") == 2 and guard.broken
    guard.write("more\n")
    guard.flush()
    assert inner.calls == 1


# --- priorities of what systemd journals from stderr ------------------------------------------

@pytest.mark.parametrize("journal", [True, False])
def test_an_unaudited_error_is_journaled_at_err(tmp_path: object, journal: bool) -> None:
    """A settings error (nothing else journals it) goes to stderr with systemd's `<3>` level
    prefix when stderr is the journal stream (JOURNAL_STREAM names it), so `journalctl -p err`
    shows it; anywhere else the line is plain."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    d = Path(str(tmp_path))
    conf = d / "loaderd.yaml"
    conf.write_text("loaderd: 1\nno_such_key: 1\n")
    err = d / "stderr"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        proc = subprocess.run([sys.executable, "-m", "loaderd", "--config", str(conf),
                               "status"], stdout=subprocess.DEVNULL, stderr=f, env=env,
                              timeout=60)
    first = err.read_text().splitlines()[0]
    assert proc.returncode != 0
    assert first.startswith(("<3>error: " if journal else "error: ") + f"{conf}:2:1"), first


@pytest.mark.parametrize("make_bad", ["fifo", "garbage", "absent"])
def test_status_fails_on_a_refused_manifest_not_on_an_absent_one(tmp_path: object,
                                                                 make_bad: str) -> None:
    # The service user can write the state dir: a manifest it broke is "state unknown", which
    # a monitor must see as a failure (was exit 0: "drift unknown (no manifest)").
    import dataclasses
    import os
    from pathlib import Path

    from loaderd.cli.common import status_failed
    from loaderd.model import Settings
    from loaderd.observe.status import View, read_manifest, status

    state = Path(str(tmp_path)) / "state"
    state.mkdir()
    path = state / "manifest.json"
    if make_bad == "fifo":
        os.mkfifo(path)
    elif make_bad == "garbage":
        path.write_text("[" * 100000)
    settings = dataclasses.replace(Settings(), state_dir=str(state),
                                   bpffs_root=str(Path(str(tmp_path)) / "no-pins"))
    report = status(View(settings, *read_manifest(settings)))
    assert report["manifest"]["manifest_refused"] is (make_bad != "absent")
    assert status_failed(report) is (make_bad != "absent")


# --- the entry points leave with os._exit (no interpreter finalization) ----------------------

def _entry(argv: list[str], out_path: str) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    # Block-buffered output, as under systemd (PYTHONUNBUFFERED would hide a missing flush).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open(out_path, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "loaderd", *argv], stdout=out,
                            stderr=subprocess.STDOUT, env=dict(env, PYTHONPATH=str(REPO)),
                            timeout=120, check=False).returncode
    with open(out_path) as f:
        return rc, f.read()


def test_the_entry_point_flushes_everything_before_it_leaves(
        spec_dirs: tuple[str, str], tmp_path: pytest.TempPathFactory) -> None:
    """Buffered output is flushed before os._exit: the errors and the verdict line reach a file
    (not a tty: block-buffered, all of it still in the buffer at the end), and the exit codes
    are main()'s and argparse's."""
    from loaderd import __version__

    _ok, bad = spec_dirs
    out = f"{tmp_path}/out"
    rc, text = _entry(["check", "--no-kernel", "--dir", bad], out)
    assert rc == 1 and text.startswith("error: ") and "and 19981 more errors" in text, text
    assert text.endswith("\n0 specs, 20001 errors\n"), text[-300:]
    assert _entry(["--version"], out) == (0, f"loaderd {__version__}\n")
    rc, text = _entry(["no-such-command"], out)
    assert rc == 2 and "invalid choice" in text
