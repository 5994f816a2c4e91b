"""`loaderd` command line: run, apply, check, status, disable, enable, rollback.

Errors print as `error: file:line:col: field: message` (one per line, verifier/compiler detail
indented below); tracebacks only with --debug. Exit codes: 0 ok, 1 refused or failed, 2 usage,
141 ok but the output was cut short by a closed pipe (`| head`); a refusal stays 1. `status`:
0 ok, 1 drift or a pending commit, 3 last apply refused, 4 nothing applied or kill switch
pulled, 5 no permission (cli.common.STATUS_CODES).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from loaderd.audit import log as audit
from loaderd.cli.common import (
    STATUS_CODES,
    add_command,
    add_global_flags,
    cmd_disable,
    cmd_enable,
    cmd_rollback,
    cmd_status,
    guard_stdio,
    load_settings,
    print_error,
    run,
)
from loaderd.errors import count


def cmd_apply(args: argparse.Namespace) -> int:
    from loaderd.apply.applier import Applier
    from loaderd.runtime.daemon import PROGRESS, notify

    settings = load_settings(args.config)
    if args.child:  # the resident daemon relays these as STATUS=
        def progress(m: str) -> None:
            print(f"{PROGRESS}{m}", flush=True)
    else:
        def progress(m: str) -> None:
            notify(f"STATUS={m}")
    applier = Applier(settings, notify=progress)
    result = applier.apply(args.dir, jobs=args.jobs)
    for e in result.errors:
        print_error(e)
    if not args.child:
        print(f"built {result.built or '-'}; adopted {result.adopted or '-'}; "
              f"removed {result.removed or '-'}; compiles {result.compiles}"
              + ("" if result.ok else "; REFUSED: previous set left unchanged"))
    return 0 if result.ok else 1


def cmd_check(args: argparse.Namespace) -> int:
    from loaderd.apply.applier import validate
    from loaderd.bpf import attach, offsets
    from loaderd.stage.pool import sandbox_status, stage_all

    # A dry run changes nothing, so it has nothing to audit: keep its output to the verdicts.
    audit.configure(journal=False, stream=open(os.devnull, "w"))  # noqa: SIM115
    # Not root: an author checking their own files (nothing is loaded for them, and the kernel
    # part needs CAP_BPF anyway), so file ownership is not a verdict here; root gets the full one.
    as_root = os.geteuid() == 0
    settings = load_settings(args.config, check_owner=as_root)
    specs, errors = validate(settings, args.dir, check_owner=as_root)
    if not as_root:
        print("note: not root: file ownership and modes are not checked (the daemon will)")
    if not errors and not args.no_kernel:
        # The targets `apply` would attach to, looked up the same way (nothing attached).
        for s in specs:
            errs, notes = attach.check_targets(s)
            errors += errs
            for note in notes:
                print(f"note: {note}")
    if not errors and not args.no_kernel:
        _support, degraded = sandbox_status(settings)
        if degraded:
            print(f"warning: {degraded}")
        staged, errors = stage_all(specs, settings, "check", pin=False, jobs=args.jobs)
        for st in staged:
            if st.warnings:  # the compile succeeded; what clang said about it still counts
                print(f"warning: {st.name}: clang warnings:\n{st.warnings}")
            for p in st.programs.values():
                extra = f" (degraded: {p.degraded})" if p.degraded else ""
                print(f"ok: {st.name}/{p.name}: verifier accepted '{p.function}', helpers "
                      f"{', '.join(p.helpers) or 'none'}{extra}")
    if settings.accept_header_mismatch and not args.no_kernel:
        hstate, hsentence = offsets.describe(settings.state_dir)
        if hstate in ("mismatch", "version-mismatch"):
            print(f"warning: accept_header_mismatch: true: {hsentence}")
    for e in errors:
        print_error(e)
    print(f"{len(specs)} specs, {count(errors)} errors")
    return 0 if not errors else 1


def cmd_run(args: argparse.Namespace) -> int:
    from loaderd.runtime.daemon import Daemon

    settings = load_settings(args.config)
    return Daemon(settings, args.config, drift_interval=args.drift_interval,
                  apply=not args.no_apply).start()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loaderd", description=__doc__.splitlines()[0])
    add_global_flags(p)
    sub = p.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "run": (cmd_run, "foreground daemon: apply, drop capabilities, READY=1, watch"),
        "apply": (cmd_apply, "apply all specs atomically (loaderd-apply.service runs it)"),
        "check": (cmd_check, "validate, compile and verify specs; pin and attach nothing"),
        "status": (cmd_status, f"what is applied, and any drift; {STATUS_CODES}"),
        "disable": (cmd_disable, "kill switch: detach and unpin everything loaderd owns; "
                    "nothing loads again until `enable`"),
        "enable": (cmd_enable, "release the kill switch (then apply or reload)"),
        "rollback": (cmd_rollback, "re-apply the previous generation of specs"),
    }
    for name, (func, help_text) in commands.items():
        sp = add_command(sub, name, func, help_text)
        if name in ("apply", "check"):
            sp.add_argument("--dir", help="specs directory (default: programs_dir setting)")
            sp.add_argument("--jobs", type=int, default=None, help="parallel compiles")
        if name == "apply":
            sp.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
        if name == "check":
            sp.add_argument("--no-kernel", action="store_true",
                            help="schema and policy only (no compile, no CAP_BPF needed)")
        if name == "status":
            sp.add_argument("--json", action="store_true", help="the report as JSON")
        if name == "run":
            sp.add_argument("--drift-interval", type=float, default=30.0)
            sp.add_argument("--no-apply", action="store_true",
                            help="do not apply (a separate privileged unit does); just watch")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    guard_stdio()
    args = parser().parse_args(argv)
    audit.configure()
    return run(args)
