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
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from loaderd.audit import log as audit
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import Settings, Spec
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


def stage_all(specs: list[Spec], settings: Settings, txid: str, *, pin: bool = True,
              jobs: int | None = None, progress: Progress | None = None
              ) -> tuple[list[StagedSpec], list[LoaderdError]]:
    """Compile+load each spec in its own short-lived process (BCC chdirs the process and keeps
    ~130 MB of LLVM: neither may leak into the caller), up to one per core at a time."""
    if not specs:
        return [], []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    staged: list[StagedSpec] = []
    errors: list[LoaderdError] = []
    # fork: the parent never imported bcc, so workers start small and fast. A worker that dies
    # (OOM, a crash inside LLVM) breaks the pool: reported as an error, nothing committed.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                             initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        work = [(s, settings, txid, pin) for s in specs]
        try:
            for i, result in enumerate(pool.map(_stage_worker, work), 1):
                if progress:
                    progress(f"compiled {i}/{len(specs)}: {specs[i - 1].name}")
                if isinstance(result, LoaderdError):
                    errors.append(result)
                else:
                    staged.append(result)
        except BrokenProcessPool:
            errors.append(LoaderdError(Kind.KERNEL, "a compile worker died (killed or crashed);"
                                       " nothing was committed", Location(settings.programs_dir)))
    return staged, errors


