"""`loaderctl`: read-mostly operator tooling over what loaderd applied.

status, list and dump need no capability: they read the manifest and open pins themselves
(maps with BPF_F_RDONLY). The kernel lets BPF_OBJ_GET open a program or link only read-write,
so a reader whose pin mode grants read alone sees those from the manifest, and says so. When
the manifest itself is unreadable (it is 0640 loaderd:loaderd-readers), the pins are walked.

JSON uses bpftool's field names for kernel facts, plus loaderd's own (spec, sha256, pin,
freeze, degraded, drift, facts). Exit codes: 0 ok, 1 failed or a finding, 2 usage,
141 ok but the output was cut short by a closed pipe; `status` as `loaderd status`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from loaderd.audit import log as audit
from loaderd.cli.common import (
    STATUS_CODES,
    add_command,
    add_global_flags,
    add_rollback_flags,
    cmd_disable,
    cmd_enable,
    cmd_rollback,
    cmd_status,
    exit_now,
    guard_stdio,
    run,
)
from loaderd.cli.render import listing, render_dump, render_list
from loaderd.errors import Kind, LoaderdError
from loaderd.observe.dump import check_raw, dump, map_pin, perf_buffer_reader, sanitize_key
from loaderd.observe.status import load_view, status, to_json

# --- commands ---------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    rows = listing(status(load_view(args.config)))
    print(to_json(rows) if args.json else render_list(rows))
    return 0


def privileged_read(what: str, target: str) -> None:
    """Unsanitized reads are on the record: who (uid, login uid: emit adds them) and what."""
    who = f"uid {os.getuid()}"
    audit.emit(audit.Event.PRIVILEGED_READ, f"loaderctl {what} by {who}", what=what,
               target=target)


def cmd_dump(args: argparse.Namespace) -> int:
    view = load_view(args.config)
    rules = view.settings.sanitize
    d = dump(view, args.target, raw=args.raw, ip=args.ip or (),
             pseudonymize=args.pseudonymize or (),
             ipv4_prefix=rules.ipv4_prefix if args.ipv4_prefix is None else args.ipv4_prefix,
             ipv6_prefix=rules.ipv6_prefix if args.ipv6_prefix is None else args.ipv6_prefix)
    if args.raw:
        privileged_read(f"dump --raw {args.target}", args.target)
    print(to_json(d) if args.json else render_dump(d))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from loaderd import sanitize
    from loaderd.bpf import btf
    from loaderd.layout import enum_names, parse_layout
    from loaderd.runtime import ringbuf as events

    view = load_view(args.config)
    spec, mname, path = map_pin(view, args.target)
    check_raw(args.raw)
    resident = None if args.take else perf_buffer_reader(view, spec, mname, path)
    if resident is not None:
        raise LoaderdError(Kind.STATE, f"{spec}/{mname} is a perf buffer the resident (pid "
                           f"{resident}) journals: it has one reader, and reading it here "
                           "takes it from the resident until `systemctl restart loaderd`",
                           allowed="journalctl -u loaderd LOADERD_EVENT=bpf_event "
                           f"LOADERD_SPEC={spec}, or --take (then restart loaderd)")
    if args.raw:
        privileged_read(f"events --raw {args.target}", args.target)
    notes: list[str] = []
    clean = None if args.raw else sanitize.Sanitizer(sanitize_key(view, notes),
                                                     view.settings.sanitize)
    # --layout wins; else the layout the applied spec declares (as the daemon decodes them)
    entry = view.entry(spec)
    declared = entry.events.get(mname) if entry is not None else None
    text = args.layout or declared
    layout = parse_layout(text) if text else None
    if layout is None:
        notes.append(f"{spec}/{mname} declares no events layout: records shown as hex "
                     "(--layout name:type,...)")
    enums, missing = btf.enum_labels(enum_names(layout or ()))
    notes += [f"enum {n} is not in the running kernel's BTF: shown as numbers"
              for n in missing]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    rate = args.rate or view.settings.policy.limits.max_event_rate
    for event in events.stream(path, layout=layout, rate=rate, sanitize=clean,
                               count=args.count, duration=args.duration,
                               addresses=view.settings.sanitize.ip_fields, enums=enums,
                               backlog=args.backlog):
        print(json.dumps(event, sort_keys=True,
                         default=lambda o: o.hex() if isinstance(o, bytes) else str(o)),
              flush=True)
    return 0


def cmd_audit_system(args: argparse.Namespace) -> int:
    from loaderd.reports import foreign

    view = load_view(args.config)
    report = foreign.run(view, burst=args.burst, window=args.window,
                          baseline=not args.no_baseline)
    _audit_metrics(view.settings.metrics_dir, report)
    print(to_json(report) if args.json else foreign.render(report))
    return 1 if report["findings"] else 0


def _audit_metrics(where: str | None, report: dict[str, Any]) -> None:
    """loaderd-audit.prom next to the resident's loaderd.prom (the foreign-program alert)."""
    import time

    from loaderd.observe import metrics
    from loaderd.store import textfile

    if where is None or not os.path.isdir(where):
        return
    text = metrics.render(metrics.audit_samples(
        len(report["foreign_programs"]), len(report["new_foreign_programs"]),
        len(report["bursts"]), time.time()))
    try:
        textfile.write(where, metrics.AUDIT_FILE_NAME, text)
    except OSError as exc:
        print(f"warning: metrics not written to {where}: {exc}", file=sys.stderr)


def cmd_compliance(args: argparse.Namespace) -> int:
    from loaderd.reports import compliance

    results = compliance.run(load_view(args.config), unit_files=args.unit_file or None)
    print(to_json(compliance.as_json(results)) if args.json else compliance.render(results))
    return compliance.exit_code(results)


def cmd_forensics(args: argparse.Namespace) -> int:
    from loaderd.reports import forensics

    if os.geteuid() == 0:  # collect() refuses anyone else before reading anything
        privileged_read(f"forensics {args.dir} (since {args.since})", args.dir)
    written = forensics.collect(load_view(args.config), args.dir, since=args.since)
    print(f"forensics bundle: {args.dir} ({len(written)} files, SHA256SUMS included)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loaderctl", description=__doc__.splitlines()[0])
    add_global_flags(p)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str,
            json_flag: bool = True) -> argparse.ArgumentParser:
        sp = add_command(sub, name, func, text)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    add("status", cmd_status, "what is applied, per spec, with kernel facts and drift; "
        + STATUS_CODES)
    add("list", cmd_list, "every program, map and link loaderd owns (bpftool-style rows)")
    sp = add("dump", cmd_dump, "a map's entries through a read-only fd, typed and sanitized")
    sp.add_argument("target", metavar="SPEC/MAP")
    sp.add_argument("--raw", action="store_true", help="no sanitization (root only)")
    sp.add_argument("--ip", action="append", choices=("key", "value"),
                    help="key/value holds an IP address (network order): mask it")
    sp.add_argument("--pseudonymize", action="append", choices=("key", "value"),
                    help="replace key/value by a keyed HMAC pseudonym")
    sp.add_argument("--ipv4-prefix", type=int, default=None,
                    help="default: sanitize.ipv4_prefix in loaderd.yaml (24)")
    sp.add_argument("--ipv6-prefix", type=int, default=None,
                    help="default: sanitize.ipv6_prefix in loaderd.yaml (48)")
    sp = add("events", cmd_events, "stream a ring buffer map's records as JSON lines, decoded "
             "and sanitized (root or the pin's owner: consuming needs a read-write fd)",
             json_flag=False)
    sp.add_argument("target", metavar="SPEC/MAP")
    sp.add_argument("--layout", help="record fields in C order, e.g. pid:u32,comm:char16:comm "
                    "(default: the spec's events layout)")
    sp.add_argument("--count", type=int, help="stop after this many events")
    sp.add_argument("--duration", type=float, help="stop after this many seconds")
    sp.add_argument("--backlog", action="store_true",
                    help="also print a ring buffer's stale backlog (records written before "
                    "this reader attached); by default it is skipped and counted in a "
                    "first {\"_backlog\": N} record")
    sp.add_argument("--take", action="store_true",
                    help="read a perf buffer the resident journals anyway (it has one "
                    "reader: the resident reads it again after `systemctl restart loaderd`)")
    sp.add_argument("--rate", type=int, help="events/s emitted (default limits.max_event_rate)")
    sp.add_argument("--raw", action="store_true", help="no sanitization (root only)")
    sp = add("audit-system", cmd_audit_system, "every BPF program/map on the host: report "
             "those loaderd did not load, and load bursts (needs CAP_SYS_ADMIN)")
    sp.add_argument("--burst", type=int, default=20, help="more loads than this within "
                    "--window seconds is a burst (default 20)")
    sp.add_argument("--window", type=float, default=10.0, help="seconds (default 10)")
    sp.add_argument("--no-baseline", action="store_true",
                    help="report every foreign program as new (ignore/keep no baseline)")
    sp = add("compliance", cmd_compliance, "PASS/FAIL report on the security checklist; PASS "
             "(exit 0) only when every high check passed, else FAIL 1, WARN 2, SKIP 3")
    sp.add_argument("--unit-file", action="append",
                    help="unit file to score (default: installed loaderd units)")
    sp = add("forensics", cmd_forensics, "incident bundle: info, xlated code, sanitized dumps, "
             "manifest, specs, journal slice, SHA256SUMS (root)", json_flag=False)
    sp.add_argument("dir", help="new (or empty) directory to write into")
    sp.add_argument("--since", default="-7d", help="journal slice start (journalctl --since)")
    add("disable", cmd_disable, "kill switch: detach and unpin everything loaderd owns",
        json_flag=False)
    add("enable", cmd_enable, "release the kill switch (then apply or reload)", json_flag=False)
    add_rollback_flags(add("rollback", cmd_rollback, "re-apply the previous generation of specs "
                           "and hold it across reloads and restarts until programs_dir "
                           "changes or --release", json_flag=False))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    guard_stdio()
    args = parser().parse_args(argv)
    audit.configure()
    return run(args)


def entry() -> NoReturn:
    """/usr/bin/loaderctl and `python3 -m loaderd.cli.loaderctl`."""
    exit_now(main)


if __name__ == "__main__":
    entry()

