"""`loaderd` command line: run, apply, plan, check, status, disable, enable, rollback.

Errors print as `error: file:line:col: field: message` (one per line, verifier/compiler detail
indented below); tracebacks only with --debug. Exit codes: 0 ok, 1 refused or failed, 2 usage,
141 ok but the output was cut short by a closed pipe (`| head`); a refusal stays 1. `status`:
0 ok, 1 drift or a pending commit, 3 last apply refused, 4 nothing applied or kill switch
pulled, 5 no permission, 6 last apply interrupted. `plan`: 0 nothing to do, 2 changes
pending, 1 refused (terraform's -detailed-exitcode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from loaderd import privileges
from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.cli.common import (
    STATUS_CODES,
    acting_settings,
    add_command,
    add_global_flags,
    add_rollback_flags,
    apply_summary,
    cmd_disable,
    cmd_enable,
    cmd_rollback,
    cmd_status,
    exit_now,
    guard_stdio,
    load_settings,
    print_error,
    run,
    stdout_is_journal,
)
from loaderd.errors import Kind, LoaderdError, Location, count, plural


def cmd_apply(args: argparse.Namespace) -> int:
    from loaderd.apply.applier import Applier
    from loaderd.runtime.notify import PROGRESS, notify

    try:
        settings = acting_settings(args.config)
    except LoaderdError as exc:  # the same structured refusal a spec gets, for the journal
        audit.emit(Event.APPLY_FAILED, f"apply refused: settings {exc}; nothing changed",
                   errors=1, kind=exc.kind.value, file=exc.location.file,
                   line=exc.location.line, field=exc.location.field)
        raise
    if args.child:  # the resident daemon relays these as STATUS=
        def progress(m: str) -> None:
            print(f"{PROGRESS}{m}", flush=True)
    else:
        def progress(m: str) -> None:
            notify(f"STATUS={m}")
    applier = Applier(settings, notify=progress)
    if args.plan:
        from loaderd.apply import preview

        saved = preview.read(args.plan)
        applier.expect = preview.checker(saved, args.plan, settings)
        if os.path.abspath(args.dir or settings.programs_dir) != os.path.abspath(
                saved.programs_dir):
            print_error(LoaderdError(Kind.STATE, "the plan is of another programs directory",
                                     Location(args.plan), value=saved.programs_dir))
            return 1
    result = applier.apply(args.dir, jobs=args.jobs)
    from loaderd.config import schema

    schema.save_cache(settings.state_dir)  # what passed the schemas: the next start skips them
    # Under systemd (loaderd-apply.service) stdout and stderr are the journal, where the audit
    # events already say all of it: printing it too journaled each result and error twice
    # (the error once at priority 3, once at 6).
    if not (audit.journaled() and stdout_is_journal()):
        for e in result.errors:
            print_error(e)
        if not args.child:
            print(apply_summary(result))
    return 0 if result.ok else 1


def _lacks_cap_bpf() -> LoaderdError | None:
    """Compiling and verifying loads into the kernel: without CAP_BPF (CAP_SYS_ADMIN before
    5.8) BCC's first map creation fails with EPERM, which reads as a compiler problem. Said
    from the process's own capabilities before any compile."""
    caps = privileges.read_state()
    if caps.has("CAP_BPF") or caps.has("CAP_SYS_ADMIN"):
        return None
    return LoaderdError(Kind.CAPABILITY, "compiling and verifying needs CAP_BPF, which this "
                        f"process does not have (CapEff {caps.effective:016x})",
                        Location("/proc/self/status"), allowed="run it as root (or with "
                        "CAP_BPF), or `loaderd check --no-kernel` for schema and policy only")


def cmd_check(args: argparse.Namespace) -> int:
    from loaderd.apply.applier import validate, validate_files
    from loaderd.bpf import attach, offsets
    from loaderd.stage.pool import sandbox_status, stage_all

    # A dry run changes nothing, so it has nothing to audit: keep its output to the verdicts.
    audit.configure(journal=False, stream=open(os.devnull, "w"))  # noqa: SIM115
    # Not root: an author checking their own files (nothing is loaded for them, and the kernel
    # part needs CAP_BPF anyway), so file ownership is not a verdict here; root gets the full one.
    as_root = os.geteuid() == 0
    settings = load_settings(args.config, check_owner=as_root)
    usage = ("give spec FILEs or --dir, not both" if args.files and args.dir else
             "--as takes exactly one FILE" if args.as_path and len(args.files) != 1 else None)
    if usage:
        print(f"loaderd check: {usage}", file=sys.stderr)
        return 2
    if args.files:
        if args.as_path:
            print(f"checking {args.files[0]} as {args.as_path}")
        specs, errors = validate_files(settings, args.files, as_path=args.as_path,
                                       check_owner=as_root)
    else:
        specs, errors = validate(settings, args.dir, check_owner=as_root)
    if not as_root:
        print("note: not root: file ownership and modes are not checked (the daemon will)")
    if not errors and not args.no_kernel:
        missing = _lacks_cap_bpf()
        if missing is not None:
            errors.append(missing)
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
    print(f"{plural(len(specs), 'spec')}, {plural(count(errors), 'error')}")
    return 0 if not errors else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from loaderd.apply import preview
    from loaderd.apply.applier import Applier, validate

    # A plan changes nothing, so it has nothing to audit.
    audit.configure(journal=False, stream=open(os.devnull, "w"))  # noqa: SIM115
    settings = load_settings(args.config)
    p = preview.make(settings, Applier(settings), validate, args.dir)
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(preview.to_dict(p), indent=2) + "\n")
    print(json.dumps(preview.to_dict(p), indent=2) if args.json else preview.render(p))
    return p.exit_code


def cmd_run(args: argparse.Namespace) -> int:
    from loaderd.runtime.daemon import Daemon

    settings = acting_settings(args.config)
    # Stopped: everything is written, journaled and closed; exit_now (the entry point) skips
    # interpreter finalization, ~15 ms of SIGTERM -> exit.
    return Daemon(settings, args.config, drift_interval=args.drift_interval,
                  apply=not args.no_apply, apply_main=main).start()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loaderd", description=__doc__.splitlines()[0])
    add_global_flags(p)
    sub = p.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "run": (cmd_run, "foreground daemon: apply, drop capabilities, READY=1, watch"),
        "apply": (cmd_apply, "apply all specs atomically (loaderd-apply.service runs it)"),
        "plan": (cmd_plan, "what an apply would do, per spec and object; loads nothing; exit "
                 "0 nothing to do, 2 changes pending, 1 refused"),
        "check": (cmd_check, "validate, compile and verify specs; pin and attach nothing"),
        "status": (cmd_status, f"what is applied, and any drift; {STATUS_CODES}"),
        "disable": (cmd_disable, "kill switch: detach and unpin everything loaderd owns; "
                    "nothing loads again until `enable`"),
        "enable": (cmd_enable, "release the kill switch (then apply or reload)"),
        "rollback": (cmd_rollback, "re-apply the previous generation of specs and hold it "
                     "across reloads and restarts until programs_dir changes or --release"),
    }
    for name, (func, help_text) in commands.items():
        sp = add_command(sub, name, func, help_text)
        if name == "plan":
            sp.add_argument("--dir", help="specs directory (default: programs_dir setting)")
            sp.add_argument("--json", action="store_true", help="the plan as JSON")
            sp.add_argument("--out", help="also write the plan (JSON) here, for apply --plan")
        if name in ("apply", "check"):
            sp.add_argument("--dir", help="specs directory (default: programs_dir setting)")
            sp.add_argument("--jobs", type=int, default=None, help="parallel compiles")
        if name == "apply":
            sp.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
            sp.add_argument("--plan", help="apply exactly this plan (loaderd plan --out); "
                            "refused if /etc, the settings or the kernel state changed since")
        if name == "check":
            sp.add_argument("--no-kernel", action="store_true",
                            help="schema and policy only (no compile, no CAP_BPF needed)")
            sp.add_argument("files", nargs="*", metavar="FILE",
                            help="check these spec files on their own instead of the specs "
                            "directory (any name, any directory: Ansible's `validate: "
                            "loaderd check --as DEST %%s` checks a temp copy)")
            sp.add_argument("--as", dest="as_path", metavar="DEST",
                            help="with one FILE: check it as if installed at DEST (its name, "
                            "when it has no `name:`, and its relative source.file come from "
                            "DEST's name and directory)")
        if name == "rollback":
            add_rollback_flags(sp)
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


def entry() -> NoReturn:
    """/usr/bin/loaderd and `python3 -m loaderd`."""
    exit_now(main)
