"""What `loaderd` and `loaderctl` share: the settings lookup, the global flags, error output
(one line per error, detail indented, never a traceback unless --debug) and the operator
actions both expose (kill switch, rollback)."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from loaderd import __version__
from loaderd.config.settings import DEFAULT_CONFIG, load_default
from loaderd.errors import LoaderdError, count, names, plural
from loaderd.model import Settings

load_settings = load_default
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer killed by a closed pipe


class PipeGuard:
    """A text stream that survives its reader going away (`loaderd check | head -1`): the
    first BrokenPipeError points the fd at /dev/null and later output is dropped, so the
    command still finishes its work (an apply is never cut short by a closed pipe) and still
    returns its own verdict; `run` then turns a success into SIGPIPE_EXIT, never into 0."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.broken = False

    def _break(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.inner.fileno())
            os.close(null)

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return int(self.inner.write(text))
            except BrokenPipeError:
                self._break()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.inner.flush()
            except BrokenPipeError:
                self._break()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self.inner, name)


def guard_stdio() -> None:
    """Wrap stdout and stderr in PipeGuards (before anything, the audit sink included, binds
    to them)."""
    if not isinstance(sys.stdout, PipeGuard):
        sys.stdout = PipeGuard(sys.stdout)
    if not isinstance(sys.stderr, PipeGuard):
        sys.stderr = PipeGuard(sys.stderr)


def pipe_broke() -> bool:
    return any(isinstance(s, PipeGuard) and s.broken for s in (sys.stdout, sys.stderr))


def exit_now(main: Callable[[], int]) -> NoReturn:
    """The console entry points: run `main`, flush, and leave without interpreter
    finalization (module teardown and the GC of every object: ~15% of an unchanged restart's
    apply); by then every file it wrote is closed or synced, and no child or thread is left."""
    try:
        code = main()
    except SystemExit as exc:  # argparse (--help, --version, a usage error) already printed
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(SIGPIPE_EXIT if code == 0 and pipe_broke() else code)


def add_global_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.environ.get("LOADERD_CONFIG"),
                   help=f"daemon settings file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    # The one version: loaderd.__version__ (pyproject.toml reads it; debian/changelog is
    # checked against it by tests/unit/test_docgen.py).
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_command(sub: Any, name: str, func: Callable[[argparse.Namespace], int],
                text: str) -> argparse.ArgumentParser:
    """A subcommand that also takes the global flags after its name (`status --debug`)."""
    sp: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    sp.set_defaults(func=func)
    sp.add_argument("--config", default=argparse.SUPPRESS, help="same as the global --config")
    sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help="same as the global --debug")
    return sp


def _is_journal(stream: Any) -> bool:
    """systemd connected `stream` to the journal (JOURNAL_STREAM names its device:inode)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def stderr_is_journal() -> bool:
    return _is_journal(sys.stderr)


def stdout_is_journal() -> bool:
    return _is_journal(sys.stdout)


def print_error(e: LoaderdError, journal_priority: int | None = None) -> None:
    """journal_priority: for an error no audit event records (a settings or state problem
    before anything starts), the headline goes to the journal at that priority (the `<N>`
    prefix systemd's SyslogLevelPrefix= reads), so `journalctl -p err` shows it."""
    prefix = f"<{journal_priority}>" if journal_priority is not None and stderr_is_journal() \
        else ""
    print(f"{prefix}error: {e}", file=sys.stderr)
    if e.detail:
        for line in e.detail.splitlines():
            print(f"    {line}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Call the subcommand; map every failure to an exit code and a short message."""
    try:
        code = int(args.func(args))
        # Its output did not all reach the reader: never a silent success.
        return SIGPIPE_EXIT if code == 0 and pipe_broke() else code
    except LoaderdError as e:
        print_error(e, journal_priority=3)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # a stream PipeGuard does not cover: the verdict is unknown
        return SIGPIPE_EXIT
    except Exception as e:  # never a traceback, nor the exception's text, unless asked
        from loaderd.audit import log as audit

        error_id = audit.new_error_id()
        with contextlib.suppress(Exception):  # the id is shown even if the journal is not up
            audit.internal_error(error_id, type(e).__name__, str(e), traceback.format_exc())
        if args.debug:
            traceback.print_exc()
        print(f"internal error {error_id}: see `journalctl LOADERD_ERROR_ID={error_id}` "
              "(rerun with --debug for details)", file=sys.stderr)
        return 1


# `status` exit codes, for monitoring (the same for root, the service user and readers).
STATUS_OK = 0  # every spec as applied (a reader's partial view included: it says so)
STATUS_DRIFT = 1  # drift, or a commit left pending
STATUS_REFUSED = 3  # the last apply was refused: programs_dir is not what is applied
STATUS_NOT_APPLIED = 4  # nothing applied yet, or the kill switch is pulled
STATUS_NO_PERMISSION = 5  # this user may read neither the manifest nor the pins
# The last apply was killed before it ended (SIGKILL, MemoryMax=): the set before it stays
# applied, but programs_dir may differ from it. A killed commit (pending) is STATUS_DRIFT.
STATUS_INTERRUPTED = 6
STATUS_CODES = (f"exit codes: {STATUS_OK} ok, {STATUS_DRIFT} drift or a pending commit, "
                f"{STATUS_REFUSED} last apply refused (programs_dir differs from what is "
                f"applied), {STATUS_NOT_APPLIED} nothing applied or kill switch pulled, "
                f"{STATUS_NO_PERMISSION} no permission to see it, {STATUS_INTERRUPTED} last "
                "apply interrupted (killed before it finished; the set before it stays)")


def cmd_status(args: argparse.Namespace) -> int:
    """One status for both CLIs (same report, text and JSON, for root, the service user and
    the readers' group); the exit code is status_code()."""
    from loaderd.cli.render import render_status
    from loaderd.observe.status import load_view, status, to_json

    report = status(load_view(args.config))
    print(to_json(report) if args.json else render_status(report))
    return status_code(report)


def status_code(report: dict[str, Any]) -> int:
    head = report["manifest"]
    if status_failed(report):
        return STATUS_DRIFT
    if head.get("no_permission"):
        return STATUS_NO_PERMISSION
    if head.get("status") == "disabled":  # the switch explains any refusal after it
        return STATUS_NOT_APPLIED
    if head.get("interrupted"):  # newer than any refusal: a refused apply clears the marker
        return STATUS_INTERRUPTED
    if head.get("refused"):
        return STATUS_REFUSED
    if head.get("absent") or (head.get("status") == "empty" and not head.get("txid")):
        return STATUS_NOT_APPLIED  # no manifest, or the empty one `enable` leaves
    return STATUS_OK


def status_failed(report: dict[str, Any]) -> bool:
    head = report["manifest"]
    return bool(head.get("status") == "pending" or head.get("manifest_refused")
                or any(s["drift"] for s in report["specs"]))


def acting_settings(config: str | None) -> Settings:
    """The settings of a command that changes state (apply, run, disable, enable,
    rollback): its audit events are spooled in the state dir while journald is unreachable."""
    from loaderd.audit import log as audit

    settings = load_settings(config)
    audit.spool_in(settings.state_dir)
    return settings


def cmd_disable(args: argparse.Namespace) -> int:
    from loaderd.apply.applier import Applier

    removed = Applier(acting_settings(args.config)).disable()
    print(f"kill switch: detached and unpinned {plural(len(removed), 'spec')}"
          + (f": {', '.join(removed)}" if removed else ""))
    return 0


def cmd_enable(args: argparse.Namespace) -> int:
    from loaderd.apply.applier import Applier

    released = Applier(acting_settings(args.config)).enable()
    print("kill switch released: the next apply (systemctl reload loaderd) loads the specs"
          if released else "not disabled: nothing to do")
    return 0


def apply_summary(result: Any) -> str:
    """One line for an apply's outcome (an ApplyResult); a refusal compiled nothing it kept."""
    if not result.ok:
        return (f"REFUSED: {plural(count(result.errors), 'error')}; nothing changed (the set "
                "applied before, if any, stays applied)")
    return (f"built {names(result.built)}; adopted {names(result.adopted)}; removed "
            f"{names(result.removed)}; compiles {result.compiles}")


def add_rollback_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--release", action="store_true",
                    help="end a held rollback: the next apply applies programs_dir again "
                    "(applied now, through loaderd-apply.service under systemd)")


APPLY_UNIT = "loaderd-apply.service"
RESIDENT_UNIT = "loaderd.service"


def _systemctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *argv], capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)


def apply_unit_argv(config: str | None) -> list[str] | None:
    """How to have the hardened apply unit apply, when it is what applies these settings:
    systemd runs the system (/run/systemd/system, sd_booted(3)), loaderd-apply.service is
    installed (LoadState=loaded), and the settings are the unit's own (it applies
    DEFAULT_CONFIG). A running resident is reloaded (apply + SIGHUP, so its STATUS= follows);
    else the apply unit is started. None: apply in this process."""
    path = config or DEFAULT_CONFIG
    if not os.path.isdir("/run/systemd/system") or not os.path.exists(path) \
            or os.path.realpath(path) != os.path.realpath(DEFAULT_CONFIG):
        return None
    try:
        loaded = _systemctl("show", "--property=LoadState", "--value", APPLY_UNIT)
    except OSError:  # no systemctl
        return None
    if loaded.returncode != 0 or loaded.stdout.strip() != "loaded":
        return None
    if _systemctl("is-active", "--quiet", RESIDENT_UNIT).returncode == 0:
        return ["systemctl", "reload", RESIDENT_UNIT]
    return ["systemctl", "start", APPLY_UNIT]


def cmd_rollback(args: argparse.Namespace) -> int:
    """Hold the previous generation (or release the hold), then apply: through the hardened
    loaderd-apply.service when systemd runs it (no BCC as root here, nothing root-owned left
    in the state dir or the pin root), else in this process."""
    from loaderd.apply.applier import Applier

    settings = acting_settings(args.config)
    applier = Applier(settings)
    if args.release:
        hold = applier.release()
        if hold is None:
            print("no rollback is held: nothing to release")
            return 0
        print(f"rollback to generation {hold.generation} released: applying "
              f"{settings.programs_dir}")
    else:
        target = applier.request_rollback()
        print(f"rollback to generation {target}: held across reloads and restarts until "
              f"{settings.programs_dir} changes or `loaderd rollback --release`")
    argv = apply_unit_argv(args.config)
    if argv is not None:
        print(f"applying through {APPLY_UNIT}: {' '.join(argv)}", flush=True)
        rc = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            if not args.release:
                applier.drop_hold(f"{APPLY_UNIT} refused it")
            print(f"error: {APPLY_UNIT} failed (exit {rc}): journalctl -u {APPLY_UNIT} "
                  "says why", file=sys.stderr)
            return 1
        return 0
    result = applier.apply()
    if not result.ok and not args.release:
        applier.drop_hold("its apply was refused")
    for e in result.errors:
        print_error(e)
    print(apply_summary(result))
    return 0 if result.ok else 1
