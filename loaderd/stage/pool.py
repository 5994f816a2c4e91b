"""Stage specs in parallel, each compiled in its own short-lived, confined, forked process.

Per spec, a worker is forked (the parent never imported bcc, so it starts small and fast). The
worker closes every inherited fd (the state lock, other workers' sockets), lowers RLIMIT_AS and
RLIMIT_CPU, imports bcc, confines itself with Landlock (stage.confine: kernel headers and
library code read-only, write only its private temp dir; no bpffs), and only then hands the
spec's C text to clang. It loads the programs (bpf() is not a file access) and passes the fds of
what it created back over a unix socket; the parent (trusted code, unconfined) pins, fills and
freezes them (worker.finish). A wall-clock timeout is enforced here (SIGKILL). A worker that
dies, is killed or runs out of time is reported against the spec it was compiling, with the
cause; it is reaped before stage_all returns, so nothing it held (the lock's fd included)
outlives the apply.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import re
import selectors
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

from loaderd import faults, sandbox
from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import bpfobject, offsets
from loaderd.bpf.btf import helper_names
from loaderd.config.source import struct_uses
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import CompileLimits, Settings, Spec
from loaderd.stage import compile as bcc_compile
from loaderd.stage import confine, headers, wire
from loaderd.stage.worker import Built, StagedSpec, build, finish, verify_built

Progress = Callable[[str], None]  # one line of progress (the daemon's STATUS=, the CLI's stderr)

MAX_MESSAGE = 1 << 20
MAX_FDS = 250  # SCM_MAX_FD is 253; policy limits keep a spec far below (64 + 64)
REAP_GRACE = 5.0  # seconds a worker may take to exit after it sent its result
_OOM_MARKS = ("out of memory", "bad_alloc", "MemoryError", "Cannot allocate memory")


@dataclass
class _Job:
    index: int
    spec: Spec
    pid: int
    sock: socket.socket
    diag: int  # memfd shared with the worker: its last diagnostics survive its death
    tmp: str
    deadline: float
    timed_out: bool = False


def _close_inherited(keep: set[int]) -> None:
    """Close every fd the worker inherited except `keep` (and stdio): Landlock does not govern
    already-open files, and a copy of the state lock's fd would hold the lock."""
    try:
        fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    if len(data) > MAX_MESSAGE:
        data, fds = wire.error(LoaderdError(
            Kind.KERNEL, "internal error: the worker's result is too large")), []
    socket.send_fds(sock, [data], fds)


def _worker(job_spec: Spec, limits: CompileLimits, settings: Settings, sock: socket.socket,
            diag: int, tmp: str, parent: int, read: list[str]) -> NoReturn:
    """The forked compile worker. Never returns (whatever is raised, even while reporting: the
    parent's stack below this frame must never run here); every outcome is one message."""
    code = 1
    try:
        _work(job_spec, limits, settings, sock, diag, tmp, parent, read)
        code = 0
    finally:
        os._exit(code)


def _work(job_spec: Spec, limits: CompileLimits, settings: Settings, sock: socket.socket,
          diag: int, tmp: str, parent: int, read: list[str]) -> None:
    try:
        import prctl

        prctl.set_pdeathsig(signal.SIGKILL)  # die with the apply (it holds the state lock)
        if os.getppid() != parent:
            os._exit(1)
        gc.freeze()  # the parent's objects are never collected here (their fds are closed)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        _close_inherited({sock.fileno(), diag})
        os.chdir(tmp)  # BCC puts the working directory on clang's include path
        os.environ["TMPDIR"] = tmp  # BCC's kheaders fallback trusts $TMPDIR (CVE-2024-2314)
        tempfile.tempdir = tmp  # Python's own choice was made (and cached) in the parent
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        sandbox.set_limits(sandbox.Limits(limits.memory_mb << 20, limits.cpu_seconds))
        if job_spec.is_object:  # libbpf only: no bcc, no LLVM (~150 MB less)
            bpfobject.preload()
        else:
            bcc_compile.preload()
        bcc_compile.share_diagnostics(diag)
        support = confine.enter(tmp, read=read)
        if not support.available and limits.require_landlock:
            raise LoaderdError(Kind.KERNEL, f"refusing to compile without a sandbox: "
                               f"{support.describe()}", Location(settings.path,
                                                                field="compile.require_landlock"))
        built, _close = build(job_spec, settings.policy)  # the fds live until we exit
        if faults.armed("after_compile"):  # the parent dies (kill -9) with this compiled
            _send(sock, wire.encode("fault", point="after_compile"), [])
            signal.pause()
        progs, maps = list(built.prog_fds), list(built.map_fds)
        _send(sock, wire.built(built.staged, progs, maps), built.fds())
    except LoaderdError as exc:
        _send(sock, wire.error(exc.with_file(job_spec.path)), [])
    except MemoryError:
        _send(sock, wire.encode("oom"), [])
    except sandbox.SandboxError as exc:
        _send(sock, wire.error(LoaderdError(
            Kind.KERNEL, f"cannot confine the compile worker: {exc}", Location(job_spec.path))),
            [])
    except OSError as exc:  # not expected past the preflight; still say what and where
        _send(sock, wire.error(LoaderdError(Kind.KERNEL, f"{exc.strerror or exc}",
                                            Location(job_spec.path), value=exc.filename)), [])
    except BaseException as exc:  # a bug or a bcc surprise: contained, reported, nothing committed
        # The user sees an id; the text and traceback go to the journal under it (finish()).
        error_id = audit.new_error_id()
        _send(sock, wire.error(LoaderdError(
            Kind.KERNEL, f"internal error {error_id} while staging (journalctl "
            f"LOADERD_ERROR_ID={error_id}); nothing was committed", Location(job_spec.path)),
            (f"{_ERROR_ID}{error_id}\n{type(exc).__name__}: {exc}\n"
             + traceback.format_exc())[:wire.MAX_TEXT]), [])


_ERROR_ID = "LOADERD_ERROR_ID="  # first line of a worker's debug text: its error id


def death_cause(status: int, *, timed_out: bool, cpu_seconds: float, diagnostics: str,
                limits: CompileLimits) -> str:
    """Why a worker ended without a result, in words an operator can act on."""
    if timed_out:
        return (f"timed out after {limits.timeout_seconds} s (wall clock, "
                "compile.timeout_seconds) and was killed")
    if any(m in diagnostics for m in _OOM_MARKS):
        return f"reached its memory limit of {limits.memory_mb} MiB (compile.memory_mb)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL
                                     and cpu_seconds >= limits.cpu_seconds):
            return f"used its CPU time limit of {limits.cpu_seconds} s (compile.cpu_seconds)"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {sig} ({name})" + (
            " (the OOM killer, or an operator)" if sig == signal.SIGKILL else "")
    code = os.waitstatus_to_exitcode(status)
    fatal = fatal_error(diagnostics)
    if fatal:  # LLVM exits(1) on an error in code generation or inline assembly
        return f"exited with status {code}: the compiler stopped on a fatal error: {fatal}"
    return f"exited with status {code} without a result"


_FATAL = re.compile(r"^(?:LLVM ERROR: |error: )(.+)$", re.M)


def fatal_error(diagnostics: str) -> str:
    """The first line LLVM printed as a fatal error, printable and at most 200 characters (what
    a confined compile can echo: its own C text and paths; the file contents stay unread)."""
    m = _FATAL.search(diagnostics)
    if m is None:
        return ""
    return re.sub(r"[^\x20-\x7e]", "?", m.group(1))[:200]


def _died(job: _Job, status: int, cpu: float, limits: CompileLimits) -> LoaderdError:
    os.lseek(job.diag, 0, os.SEEK_SET)
    tail = os.read(job.diag, MAX_MESSAGE)[-4096:].decode("utf-8", "replace")
    cause = death_cause(status, timed_out=job.timed_out, cpu_seconds=cpu, diagnostics=tail,
                        limits=limits)
    # Only the fatal error's first line is shown: a runaway compile's output is the author's
    # text echoed.
    return _limit_error(job, cause)


def _limit_error(job: _Job, cause: str) -> LoaderdError:
    # A limit (memory, CPU, wall clock, or the OOM killer's SIGKILL) is the settings' to
    # raise; a fatal error or a crash (SIGILL/SIGSEGV: `#pragma clang __debug crash`) is not.
    limit = any(w in cause for w in ("limit", "timed out", "OOM killer"))
    return LoaderdError(Kind.COMPILE, f"the compile worker {cause}; nothing was committed",
                        Location(job.spec.path, field="source"),
                        allowed="a smaller program, or higher compile: limits in loaderd.yaml"
                        if limit else "C text the compiler accepts")


def _reap(job: _Job, *, kill: bool) -> tuple[int, float]:
    """Wait for the worker (after SIGKILL if `kill`). Returns (wait status, CPU seconds)."""
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(job.pid, signal.SIGKILL)
    else:
        end = time.monotonic() + REAP_GRACE
        while time.monotonic() < end:
            pid, status, usage = os.wait4(job.pid, os.WNOHANG)
            if pid:
                return status, usage.ru_utime + usage.ru_stime
            time.sleep(0.002)
        os.kill(job.pid, signal.SIGKILL)
    _, status, usage = os.wait4(job.pid, 0)
    return status, usage.ru_utime + usage.ru_stime


class _Stager:
    def __init__(self, specs: list[Spec], settings: Settings, txid: str, pin: bool,
                 jobs: int, progress: Progress | None) -> None:
        self.specs, self.settings, self.txid, self.pin = specs, settings, txid, pin
        self.jobs, self.progress = jobs, progress
        self.limits = settings.compile
        self.results: list[StagedSpec | LoaderdError | None] = [None] * len(specs)
        self.running: dict[int, _Job] = {}
        self.sel = selectors.DefaultSelector()
        self.done = 0
        self.read = confine.read_paths()

    def start(self, index: int, spec: Spec) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        diag = os.memfd_create(f"loaderd-compile-{spec.name}")
        tmp = tempfile.mkdtemp(prefix="loaderd-compile-")
        try:
            pid = os.fork()
        except BaseException:
            parent_end.close()
            child_end.close()
            os.close(diag)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if pid == 0:
            parent_end.close()
            # + the spec's own files: BCC reads the file the generated #line names, for the
            # source lines in the program's BTF (what `bpftool prog dump xlated ... linum` shows)
            _worker(spec, self.limits, self.settings, child_end, diag, tmp, os.getppid(),
                    [*self.read, *(p for p in (spec.path, spec.source_path) if p)])
        child_end.close()  # EOF on parent_end then means: the worker is gone
        job = _Job(index, spec, pid, parent_end, diag, tmp,
                   time.monotonic() + self.limits.timeout_seconds)
        self.running[pid] = job
        self.sel.register(parent_end, selectors.EVENT_READ, job)

    def run(self) -> None:
        pending = deque(enumerate(self.specs))
        try:
            while pending or self.running:
                while pending and len(self.running) < self.jobs:
                    self.start(*pending.popleft())
                wait = min(j.deadline for j in self.running.values()) - time.monotonic()
                for key, _ in self.sel.select(max(0.0, wait)):
                    self.readable(key.data)
                now = time.monotonic()
                for job in [j for j in self.running.values() if j.deadline <= now]:
                    job.timed_out = True
                    status, cpu = _reap(job, kill=True)
                    self.end(job, _died(job, status, cpu, self.limits))
        finally:
            for job in list(self.running.values()):  # an exception here: leave no worker
                _reap(job, kill=True)
                self.end(job, None)
            self.sel.close()

    def readable(self, job: _Job) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(job.sock, MAX_MESSAGE, MAX_FDS)
        except OSError:
            data, fds, flags = b"", [], 0
        try:
            if not data:  # EOF: the worker died without a result
                status, cpu = _reap(job, kill=False)
                self.end(job, _died(job, status, cpu, self.limits))
                return
            try:
                message = wire.decode(data)
            except wire.WireError as exc:
                message = {"kind": "garbled", "why": str(exc)}
            if message["kind"] == "fault":  # a crash test: die here, the worker with us
                faults.point(str(message.get("point")))
            status, cpu = _reap(job, kill=False)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                self.end(job, LoaderdError(Kind.KERNEL, "internal error: the compile "
                                           "worker's result was truncated",
                                           Location(job.spec.path)))
                return
            self.end(job, self.finish(job, message, fds, status, cpu))
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def finish(self, job: _Job, message: dict[str, Any], fds: list[int], status: int,
               cpu: float) -> StagedSpec | LoaderdError:
        kind = message["kind"]
        try:
            if kind == "oom":  # Python's own MemoryError: the worker lived to say so
                return _limit_error(job, f"reached its memory limit of {self.limits.memory_mb} "
                                    "MiB (compile.memory_mb)")
            if kind == "error":
                err, debug = wire.decode_error(message)
                if debug and debug.startswith(_ERROR_ID):
                    head, _, rest = debug.partition("\n")
                    what, _, tb = rest.partition("\n")
                    audit.internal_error(head[len(_ERROR_ID):], what.partition(":")[0],
                                         f"{job.spec.path}: {what}", tb)
                elif debug:
                    audit.debug(f"{job.spec.path}: internal error while staging", debug)
                return err.with_file(job.spec.path)
            if kind != "built":
                raise wire.WireError(message.get("why") or f"unexpected message {kind!r}")
            staged, progs, maps = wire.decode_built(message, job.spec)
        except wire.WireError as exc:
            return LoaderdError(Kind.KERNEL, f"the compile worker sent a malformed result "
                                f"({exc}); nothing was committed", Location(job.spec.path))
        if len(fds) != len(progs) + len(maps):
            return LoaderdError(Kind.KERNEL, "internal error: the compile worker passed "
                                f"{len(fds)} fds for {len(progs) + len(maps)} objects",
                                Location(job.spec.path))
        built = Built(staged, dict(zip(progs, fds[:len(progs)], strict=True)),
                      dict(zip(maps, fds[len(progs):], strict=True)))
        try:
            verify_built(job.spec, built)
            return finish(job.spec, built, self.settings.bpffs_root, self.txid,
                          self.settings.pins, pin=self.pin)
        except LoaderdError as exc:
            return exc.with_file(job.spec.path)
        except OSError as exc:
            return LoaderdError(Kind.KERNEL, f"{exc.strerror or exc}", Location(job.spec.path),
                                value=exc.filename)

    def end(self, job: _Job, result: StagedSpec | LoaderdError | None) -> None:
        self.running.pop(job.pid, None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(job.sock)
        job.sock.close()
        os.close(job.diag)
        shutil.rmtree(job.tmp, ignore_errors=True)
        self.results[job.index] = result
        if result is not None:
            self.done += 1
            if self.progress:
                self.progress(f"compiled {self.done}/{len(self.specs)}: {job.spec.name}")


def sandbox_status(settings: Settings) -> tuple[sandbox.Support, str | None]:
    """(what the kernel offers, a warning line when compiles run unconfined or not at all)."""
    support = sandbox.probe()
    if support.available:
        return support, None
    if settings.compile.require_landlock:
        return support, (f"compile sandbox unavailable: {support.describe()}; "
                         "compile.require_landlock refuses every compile")
    return support, (f"DEGRADED: compile workers run without Landlock ({support.reason}); "
                     "C text is confined by the text checks and resource limits only")


def _struct_readers(specs: list[Spec]) -> tuple[frozenset[str], list[Spec]]:
    """The running kernel's struct names and the specs whose C text names one of them."""
    if not any(set(struct_uses(s.source)) - offsets.STABLE_STRUCTS for s in specs
               if not s.is_object):
        return frozenset(), []  # only ABI structs (__sk_buff, xdp_md, ...): no BTF parse
    try:
        names = offsets.kernel_struct_names()
    except OSError as exc:  # no BTF: nothing to compare against (said, not fatal)
        audit.emit(Event.DEGRADED, f"cannot read the running kernel's BTF ({exc.strerror}): "
                   "struct offsets of BCC programs are not checked", reason="no BTF")
        return frozenset(), []
    return names, [s for s in specs if headers.kernel_structs(s, names)]


def _measure_in_child() -> offsets.HeaderFacts:
    """The headers' offsets, measured by BCC in a forked child (this process never imports
    bcc: the resident and the apply stay small)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as one:
        return one.submit(headers.measure).result()


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
                       file=s.path, reason="header mismatch accepted")
            continue
        errors.append(err)
    return errors


def stage_all(specs: list[Spec], settings: Settings, txid: str, *, pin: bool = True,
              jobs: int | None = None, progress: Progress | None = None
              ) -> tuple[list[StagedSpec], list[LoaderdError]]:
    """Compile+load each spec in its own confined process, up to one per core at a time; pin
    (with pin) what they loaded. Results in the order of `specs`. BCC specs that read kernel
    structs are checked against the running kernel's BTF first and refused, never compiled,
    where the headers' offsets are wrong."""
    if not specs:
        return [], []
    refused: list[LoaderdError] = []
    names, readers = _struct_readers(specs)
    if readers:
        refused = header_verdicts(readers, header_facts(settings, _measure_in_child), names,
                                  settings)
        gone = {e.location.file for e in refused}
        specs = [s for s in specs if s.path not in gone]
        if not specs:
            return [], refused
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    support, warning = sandbox_status(settings)
    if warning:
        audit.emit(Event.DEGRADED, warning, sandbox=support.describe())
    with contextlib.suppress(OSError, ValueError):
        helper_names()  # read the BTF once here, not in every worker
    if any(not s.is_object for s in specs):
        # Once here, not once per forked worker (~60 ms each, measured): the apply is a
        # short-lived process; the resident never stages, so it still never maps bcc/LLVM.
        bcc_compile.preload()
    stager = _Stager(specs, settings, txid, pin, jobs, progress)
    stager.run()
    staged = [r for r in stager.results if isinstance(r, StagedSpec)]
    errors = [r for r in stager.results if isinstance(r, LoaderdError)]
    return staged, refused + errors
