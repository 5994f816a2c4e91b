"""Bench workloads: generated specs in a private workspace (temp dir, state dir, settings, bpffs
root `/sys/fs/bpf/ldbench_<rand>`), the real CLI and daemon as child processes, the plain BCC
baseline, an exec generator. Everything a workspace pins is removed by `close()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
BCC_LIBS = ("libbcc", "libLLVM", "libclang")

COUNTER = """loaderd: 1
description: bench counter {i}
source:
  inline: |
    int count_exec(void *ctx)
    {{
        u32 k = 0;
        u64 *v = hits.lookup(&k);
        if (v)
            __sync_fetch_and_add(v, {step});
        return 0;
    }}
maps:
  - {{name: hits, type: array, key: u32, value: u64, max_entries: 1}}
programs:
  - {{name: count_exec, type: tracepoint, attach: {{tracepoint: "sched:sched_process_exec"}}}}
"""

# The same counter as a spec of a precompiled object (bench/workload.LIBBPF_COUNTER, clang-built).
OBJECT_COUNTER = """loaderd: 1
description: bench counter, precompiled object
source: {{object: {obj}}}
maps:
  - {{name: hits, type: array, key: u32, value: u64, max_entries: 1}}
programs:
  - {{name: count_exec, type: tracepoint, attach: {{tracepoint: "sched:sched_process_exec"}}}}
"""

# Counts only execs of one binary name (the generator's), so other processes on the host do
# not blur the missed-events figure.
COMM_COUNTER = """loaderd: 1
description: bench exec counter for comm {comm}
source:
  inline: |
    int count_comm(void *ctx)
    {{
        char comm[16] = {{}};
        bpf_get_current_comm(&comm, sizeof(comm));
{checks}
        u32 k = 0;
        u64 *v = execs.lookup(&k);
        if (v)
            __sync_fetch_and_add(v, 1);
        return 0;
    }}
maps:
  - {{name: execs, type: array, key: u32, value: u64, max_entries: 1, preserve: true}}
programs:
  - {{name: count_comm, type: tracepoint, attach: {{tracepoint: "sched:sched_process_exec"}}}}
"""


class BenchError(RuntimeError):
    pass


# Installed loaderd runs from byte-compiled modules (the .deb's postinst runs compileall). Children
# get the same, from a cache under bench/__pycache__ (git-ignored; not in a world-writable /tmp:
# root runs what it finds there), even where the caller's environment says
# PYTHONDONTWRITEBYTECODE.
PYCACHE = str(REPO / "bench" / "__pycache__" / "prefix")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LOADERD_FAULT",
                        "LOADERD_CONFIG", "MAINPID", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    env.update(extra)
    return env


def proc_status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def kb(value: str) -> int:
    return int(value.split()[0])


def mapped_bcc_libs(pid: int | str) -> list[str]:
    """Names of libbcc/libLLVM/libclang files mapped into the process ([] = none)."""
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1].rsplit("/", 1)[-1] for line in f
                       if any(lib in line for lib in BCC_LIBS)})


# (CPU seconds used on the host by processes outside this bench's tree, wall seconds), one per
# timed CLI/baseline run: other load competes for the same 2 cores and skews the ratios.
FOREIGN: list[tuple[float, float]] = []
_HZ = os.sysconf("SC_CLK_TCK")


def _host_busy() -> float:
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _HZ  # all but idle and iowait


def _ours() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class HostLoad:
    """Measures a block: wall seconds, and CPU seconds the rest of the host used meanwhile
    (children are counted as ours once waited for)."""

    def __enter__(self) -> HostLoad:
        self.t0, self.busy0, self.ours0 = time.monotonic(), _host_busy(), _ours()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = time.monotonic() - self.t0
        foreign = max(0.0, _host_busy() - self.busy0 - (_ours() - self.ours0))
        FOREIGN.append((foreign, self.seconds))


@dataclass
class Timed:
    seconds: float
    proc: subprocess.CompletedProcess[str]


class Workspace:
    """A temp dir holding specs/, state/, loaderd.yaml, plus a private bpffs root."""

    def __init__(self, tag: str = "bench") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"ldbench-{tag}-"))
        os.chmod(self.dir, 0o755)  # trust checks: root-owned, not group/other-writable
        self.specs = self.dir / "specs"
        self.specs.mkdir(mode=0o755)
        self.state = self.dir / "state"
        self.root = f"/sys/fs/bpf/ldbench_{secrets.token_hex(5)}"
        self.config = self.dir / "loaderd.yaml"
        self.config.write_text(f"loaderd: 1\nprograms_dir: {self.specs}\n"
                               f"bpffs_root: {self.root}\nstate_dir: {self.state}\n"
                               # never the host's node_exporter directory (a packaged
                               # loaderd's loaderd.prom)
                               "metrics_dir: null\n")
        self.log = self.dir / "loaderd.log"
        self._marked_at: float | None = None  # manifest's last_apply.at at mark()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- specs ----------------------------------------------------------------------------
    def write_counters(self, n: int) -> list[str]:
        """N distinct tracepoint counters: distinct names, distinct constants (distinct tags)."""
        for f in self.specs.iterdir():
            f.unlink()
        names = [f"bench_{i:02d}" for i in range(n)]
        for i, name in enumerate(names):
            (self.specs / f"{name}.yaml").write_text(COUNTER.format(i=i, step=1000 + i))
        return names

    def write_object_counters(self, objs: list[Path]) -> list[str]:
        """The same N counters as specs of precompiled objects (source: {object: ...}), each
        object copied next to its spec (root-owned, 0644: the trust checks)."""
        for f in self.specs.iterdir():
            f.unlink()
        names = []
        for obj in objs:
            name = obj.name.split(".")[0]
            shutil.copy(obj, self.specs / obj.name)
            os.chmod(self.specs / obj.name, 0o644)
            (self.specs / f"{name}.yaml").write_text(OBJECT_COUNTER.format(obj=obj.name))
            names.append(name)
        return names

    def write_comm_counter(self, comm: str, name: str = "bench_exec") -> None:
        checks = "\n".join(f"        if (comm[{i}] != {ord(c)}) return 0;"
                           for i, c in enumerate(comm + "\0"))
        (self.specs / f"{name}.yaml").write_text(COMM_COUNTER.format(comm=comm, checks=checks))

    def copy_shipped(self, stem: str) -> None:
        for f in (REPO / "configs" / "programs.d").glob(f"{stem}.*"):
            shutil.copy(f, self.specs / f.name)

    def baseline_work(self) -> list[list[Any]]:
        """The exact C text loaderd compiles for each spec, with its functions and types."""
        from loaderd.apply.applier import validate
        from loaderd.config.settings import load_settings
        from loaderd.stage.compile import render

        specs, errors = validate(load_settings(str(self.config)))
        if errors:
            raise BenchError("; ".join(str(e) for e in errors))
        return [[render(s), [[p.name, p.type.kind.kernel_id] for p in s.programs]]
                for s in specs]

    # --- CLI ------------------------------------------------------------------------------
    def loaderd(self, *args: str, check: bool = True) -> Timed:
        """`loaderd --config <ws> ARGS` in a fresh interpreter; wall time from spawn to exit."""
        self.mark()
        cmd = [sys.executable, "-m", "loaderd", "--config", str(self.config), *args]
        with open(self.log, "a") as log:
            log.write(f"--- {' '.join(args)}\n")
            log.flush()
            with HostLoad() as load:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                      env=child_env(), timeout=600)
            seconds = load.seconds
        if check and proc.returncode != 0:
            raise BenchError(f"loaderd {' '.join(args)} failed ({proc.returncode}): "
                             f"{proc.stdout.strip()}\n{self.log_tail()}")
        return Timed(seconds, proc)

    def apply(self, jobs: int | None = None) -> float:
        extra = ["--jobs", str(jobs)] if jobs else []
        return self.loaderd("apply", *extra).seconds

    def disable(self) -> None:
        """Back to nothing loaded, between repetitions: the kill switch, then its release (it
        holds until `enable`, and the next repetition's apply must load)."""
        if os.path.exists(self.root) or self.state.exists():
            self.loaderd("disable")
            self.loaderd("enable")

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state / "manifest.json").read_text())
        return data

    def _last_apply_at(self) -> float | None:
        try:
            last = self.manifest().get("last_apply")
        except (OSError, ValueError):
            return None
        return float(last["at"]) if isinstance(last, dict) else None

    def mark(self) -> None:
        """Before an apply (CLI or resident): what last_compiles() compares against."""
        self._marked_at = self._last_apply_at()

    def last_compiles(self) -> int:
        """Compiles of the apply since mark(): an apply that changed nothing leaves the
        manifest's last_apply as it was (the last apply that changed the set), so 0."""
        at = self._last_apply_at()
        if at is None or at == self._marked_at:
            return 0
        return int(self.manifest()["last_apply"]["compiles"])

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        try:
            self.disable()
        finally:
            if os.path.exists(self.root):
                from loaderd.bpf.pins import PinLayout

                PinLayout(self.root).remove_tree(self.root)
            shutil.rmtree(self.dir, ignore_errors=True)


class Resident:
    """`loaderd run --config CONFIG` under a private NOTIFY_SOCKET (in `workdir`, as is its log):
    READY=1 arrives after the initial apply committed and every capability was dropped."""

    def __init__(self, config: Path | str, workdir: Path | str,
                 drift_interval: float = 3600.0, no_apply: bool = False,
                 env: dict[str, str] | None = None) -> None:
        workdir = Path(workdir)
        self.log_path = workdir / "loaderd.log"
        self.sock_path = str(workdir / f"notify-{secrets.token_hex(3)}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.messages: list[str] = []
        self.log: IO[str] = open(self.log_path, "a")  # noqa: SIM115 (closed in stop())
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loaderd", "--config", str(config), "run",
             "--drift-interval", str(drift_interval), *(["--no-apply"] if no_apply else [])],
            stdout=self.log, stderr=self.log,
            env=child_env(NOTIFY_SOCKET=self.sock_path, **(env or {})))

    @classmethod
    def of(cls, ws: Workspace, drift_interval: float = 3600.0) -> Resident:
        ws.mark()
        return cls(ws.config, ws.dir, drift_interval)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 300.0,
                   while_waiting: Callable[[], None] | None = None) -> float:
        """Seconds from spawn to READY=1; `while_waiting` is called every 50 ms until then."""
        deadline = self.t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"loaderd run exited ({self.proc.returncode}) before READY=1"
                                 f"\n{self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no READY=1 within {timeout}s\n{self.log_tail()}")
            if while_waiting:
                while_waiting()
            self.sock.settimeout(min(left, 0.05))
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(msg)
            if "READY=1" in msg.split("\n"):
                ready = time.monotonic() - self.t0
                self._wait_handlers()
                return ready

    def _wait_handlers(self, timeout: float = 10.0) -> None:
        """daemon.py installs its SIGTERM/SIGHUP handlers only after READY=1: a signal sent in
        between kills it. Wait until /proc shows both caught (SigCgt) before anyone signals."""
        want = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1))
        deadline = time.monotonic() + timeout
        while int(self.status().get("SigCgt", "0"), 16) & want != want:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise BenchError(f"loaderd run never caught SIGTERM/SIGHUP\n{self.log_tail()}")
            time.sleep(0.005)

    def status(self) -> dict[str, str]:
        return proc_status(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> float:
        """Seconds from the signal to the process's exit."""
        t0 = time.monotonic()
        try:
            if self.proc.poll() is None:
                # Popen.wait(timeout) polls with sleeps growing to 50 ms, which the figure
                # would include: a pidfd is readable the moment the process exits.
                pidfd = os.pidfd_open(self.proc.pid)
                t0 = time.monotonic()
                self.proc.send_signal(sig)
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                exited = bool(poller.poll(int(timeout * 1000)))
                seconds = time.monotonic() - t0
                os.close(pidfd)
                try:
                    if not exited:
                        raise subprocess.TimeoutExpired(str(self.proc.args), timeout)
                    self.proc.wait(10)
                    return seconds
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise BenchError(f"loaderd run ignored signal {sig} for {timeout}s") from None
            return time.monotonic() - t0
        finally:
            self.log.close()
            self.sock.setblocking(False)  # keep what it said on the way out (STOPPING=1)
            with contextlib.suppress(BlockingIOError):
                while True:
                    self.messages.append(self.sock.recv(4096).decode())
            self.sock.close()
            os.unlink(self.sock_path)


def run_baseline(ws: Workspace) -> tuple[float, dict[str, Any]]:
    """The plain BCC script on the workspace's specs: (wall seconds, its report)."""
    work = ws.dir / "baseline.json"
    work.write_text(json.dumps(ws.baseline_work()))
    with HostLoad() as load:
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "baseline_bcc.py"),
                               str(work)], capture_output=True, text=True, env=child_env(),
                              timeout=600)
    seconds = load.seconds
    if proc.returncode != 0:
        raise BenchError(f"baseline BCC script failed: {proc.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, report


GENERATOR = """
import os, signal, sys
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
path, n = sys.argv[1], 0
print("go", flush=True)
while not stop:
    pid = os.posix_spawn(path, [path], {})
    os.waitpid(pid, 0)
    n += 1
print(n, flush=True)
"""


class ExecGenerator:
    """fork/exec a private copy of /bin/true in a loop; `stop()` returns how many execs ran.
    The copy's name is the comm the filtered counter matches."""

    def __init__(self, ws: Workspace) -> None:
        self.comm = f"ldbx{secrets.token_hex(4)}"
        self.binary = ws.dir / self.comm
        shutil.copy("/bin/true", self.binary)
        os.chmod(self.binary, 0o755)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", GENERATOR, str(self.binary)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "go":
            raise BenchError("exec generator did not start")

    def stop(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.stdout.read()
        self.proc.wait(30)
        return int(out.strip())


def read_counter(pin: str, key: int = 0) -> int:
    """Sum of a u64 array/percpu_array slot, read through a read-only pin fd."""
    from loaderd.bpf import kernel

    fd = kernel.obj_get(pin, rdonly=True)
    try:
        info = kernel.map_info(fd)
        size = info.value_size
        if info.type == 6:  # percpu array: one 8-byte slot per possible CPU
            size = (size + 7) // 8 * 8 * kernel.possible_cpus()
        raw = kernel.map_lookup(fd, key.to_bytes(4, "little"), size)
    finally:
        os.close(fd)
    if raw is None:
        raise BenchError(f"{pin}: key {key} missing")
    return sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8))


# --- precompiled objects for `bpftool prog loadall` ------------------------------------------

LIBBPF_COUNTER = """#define SEC(n) __attribute__((section(n), used))
struct {{
    int (*type)[2];
    int (*max_entries)[1];
    unsigned int *key;
    unsigned long long *value;
}} hits SEC(".maps");
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
SEC("tracepoint/sched/sched_process_exec")
int count_exec(void *ctx)
{{
    unsigned int k = 0;
    unsigned long long *v = bpf_map_lookup_elem(&hits, &k);
    if (v)
        __sync_fetch_and_add(v, {step});
    return 0;
}}
char LICENSE[] SEC("license") = "GPL";
"""


def find_clang() -> str | None:
    for name in ("clang", *(f"clang-{v}" for v in range(20, 13, -1))):
        path = shutil.which(name)
        if path:
            return path
    return None


def build_objects(ws: Workspace, n: int, clang: str) -> list[Path]:
    """The same N counters as libbpf-style C, compiled ahead of time (not timed)."""
    out = ws.dir / "objs"
    out.mkdir(exist_ok=True)
    objs = []
    for i in range(n):
        src = out / f"bench_{i:02d}.bpf.c"
        src.write_text(LIBBPF_COUNTER.format(step=1000 + i))
        obj = src.with_suffix(".o")
        subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-c", str(src), "-o", str(obj)],
                       check=True, capture_output=True)
        objs.append(obj)
    return objs


def loadall(objs: list[Path], root: str) -> float:
    """`bpftool prog loadall` of each object, serially, pinned under `root`: wall seconds."""
    os.makedirs(root, exist_ok=True)
    t0 = time.monotonic()
    try:
        for obj in objs:  # bpffs refuses names with a dot
            proc = subprocess.run(["bpftool", "prog", "loadall", str(obj),
                                   f"{root}/{obj.name.split('.')[0]}"], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise BenchError(f"bpftool prog loadall {obj}: {proc.stderr.strip()}")
        return time.monotonic() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)  # unpinning drops the programs
