"""Stage specs in parallel, each in its own short-lived forked process.

BCC chdirs the process and keeps ~130 MB of LLVM: neither may leak into the caller. The parent
never imported bcc, so forked workers start small and fast.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import offsets
from loaderd.config.source import struct_uses
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import Settings, Spec
from loaderd.stage import headers
from loaderd.stage.worker import StagedSpec, stage_spec

Progress = Callable[[str], None]  # one line of progress (the daemon's STATUS=, the CLI's stderr)


def _stage_worker(args: tuple[Spec, Settings, str, bool]) -> StagedSpec | LoaderdError:
    s, settings, txid, pin = args
    try:
        return stage_spec(s, settings.policy, settings.bpffs_root, txid, settings.pins, pin=pin)
    except LoaderdError as exc:
        return exc.with_file(s.path)
    except OSError as exc:  # not expected past the preflight; still say what and where
        return LoaderdError(Kind.KERNEL, f"{exc.strerror or exc}", Location(s.path),
                            value=exc.filename)
    except Exception as exc:  # a bug or a bcc surprise: contained, reported, nothing committed
        audit.debug(f"{s.path}: internal error while staging", traceback.format_exc())
        return LoaderdError(Kind.KERNEL, f"internal error while staging: {type(exc).__name__}: "
                            f"{exc}", Location(s.path))


def _worker_init(parent: int) -> None:
    """Die with the apply: a forked worker shares the apply's state lock, and idle workers of a
    `kill -9`ed parent would otherwise hold it (and every later apply would wait for them)."""
    import prctl

    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _struct_readers(specs: list[Spec]) -> tuple[frozenset[str], list[Spec]]:
    """The running kernel's struct names and the specs whose C text names one of them."""
    if not any(set(struct_uses(s.source)) - offsets.STABLE_STRUCTS for s in specs):
        return frozenset(), []  # only ABI structs (__sk_buff, xdp_md, ...): no BTF parse
    try:
        names = offsets.kernel_struct_names()
    except OSError as exc:  # no BTF: nothing to compare against (said, not fatal)
        audit.emit(Event.DEGRADED, f"cannot read the running kernel's BTF ({exc.strerror}): "
                   "struct offsets of BCC programs are not checked", reason="no BTF")
        return frozenset(), []
    return names, [s for s in specs if headers.kernel_structs(s, names)]


def header_facts(settings: Settings, measure: Callable[[], offsets.HeaderFacts]
                 ) -> offsets.HeaderFacts:
    """The cached measurement for this host, else `measure()` (then cached)."""
    facts = offsets.load_cached(settings.state_dir)
    if facts is None:
        facts = measure()
        offsets.save_cached(settings.state_dir, facts)
    return facts


def header_verdicts(readers: list[Spec], facts: offsets.HeaderFacts, names: frozenset[str],
                    settings: Settings) -> list[LoaderdError]:
    """Refusals of the specs that read kernel structs at wrong offsets (none when the settings
    accept the risk: each such spec is then journaled as degraded)."""
    errors: list[LoaderdError] = []
    for s in readers:
        err = headers.check(s, facts, names)
        if err is None:
            continue
        if settings.accept_header_mismatch:
            audit.emit(Event.DEGRADED, f"{s.name}: staged anyway (accept_header_mismatch: "
                       f"true), its struct reads are wrong: it {err.message}", spec=s.name,
                       file=s.path,
                       reason="header mismatch accepted")
            continue
        errors.append(err)
    return errors


def stage_all(specs: list[Spec], settings: Settings, txid: str, *, pin: bool = True,
              jobs: int | None = None, progress: Progress | None = None
              ) -> tuple[list[StagedSpec], list[LoaderdError]]:
    """Compile+load each spec in its own short-lived process (BCC chdirs the process and keeps
    ~130 MB of LLVM: neither may leak into the caller), up to one per core at a time. Specs
    that read kernel structs wait for the headers check (measured in a worker beside the
    other compiles, or cached) and are refused, never compiled, where the headers are wrong."""
    if not specs:
        return [], []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    names, readers = _struct_readers(specs)
    held = {s.name for s in readers}
    errors: list[LoaderdError] = []
    results: dict[str, StagedSpec | LoaderdError] = {}
    # fork: the parent never imported bcc, so workers start small and fast. A worker that dies
    # (OOM, a crash inside LLVM) breaks the pool: reported as an error, nothing committed.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                             initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        try:
            running: dict[str, Future[StagedSpec | LoaderdError]] = {
                s.name: pool.submit(_stage_worker, (s, settings, txid, pin))
                for s in specs if s.name not in held}
            if readers:
                facts = header_facts(settings, lambda: pool.submit(headers.measure).result())
                refused = header_verdicts(readers, facts, names, settings)
                errors += refused
                refused_files = {e.location.file for e in refused}
                running.update({s.name: pool.submit(_stage_worker, (s, settings, txid, pin))
                                for s in readers if s.path not in refused_files})
            done = 0
            for s in specs:
                if s.name not in running:
                    continue
                results[s.name] = running[s.name].result()
                done += 1
                if progress:
                    progress(f"compiled {done}/{len(running)}: {s.name}")
        except BrokenProcessPool:
            errors.append(LoaderdError(Kind.KERNEL, "a compile worker died (killed or crashed);"
                                       " nothing was committed", Location(settings.programs_dir)))
            return [], errors
    staged = [r for r in results.values() if isinstance(r, StagedSpec)]
    errors += [r for r in results.values() if isinstance(r, LoaderdError)]
    return staged, errors
