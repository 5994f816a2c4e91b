"""The compile sandbox on the real kernel, with the text checks deliberately bypassed (the spec's
C text is replaced after parsing): an #include or a #line of a root-only file cannot read it, a
pin from C cannot be made and an existing pin cannot be opened, a runaway compile ends at its
limits in bounded time with the state lock free, a killed worker is reported against its spec,
and the shipped examples still compile. Every refusal has a control run with the sandbox off
(confine.enter replaced), so each test can fail."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loaderd import sandbox
from loaderd.apply.applier import Applier
from loaderd.audit import log as audit
from loaderd.bpf import kernel
from loaderd.config.settings import load_settings
from loaderd.config.spec import load_spec
from loaderd.errors import LoaderdError
from loaderd.model import CompileLimits, Settings, Spec
from loaderd.stage import confine, pool
from loaderd.store.statedir import LOCK
from tests.conftest import EXAMPLES, make_conf

pytestmark = pytest.mark.kernel

CANARY = "LOADERD_SANDBOX_CANARY"
# Lines of C that an unconfined clang prints when it fails on them (error context).
SECRET = "".join(f"{CANARY}_{i} is a secret line;\n" for i in range(1, 13))
# 10^3 per B, B(B(B())) per C: C(C(...)) expands without end (clang's preprocessor grows by
# ~125 MB/s here); valid C as far as the text checks can tell.
EXPLOSION = ("#define A(x) x x x x x x x x x x\n#define B(x) A(A(A(x)))\n"
             "#define C(x) B(B(B(x)))\nint big = sizeof(\"\" C(C(\"abcdefgh\")));\n")


@pytest.fixture(autouse=True)
def _quiet_audit() -> Iterator[None]:
    audit.configure(journal=False, stream=io.StringIO())
    yield
    audit.configure()


@pytest.fixture
def secret() -> Iterator[str]:
    """A root-only file: mode 0600 in a 0700 directory under /root."""
    d = Path(f"/root/loaderd-sandbox-{uuid.uuid4().hex[:8]}")
    d.mkdir(mode=0o700)
    f = d / "secret.h"
    f.write_text(SECRET)
    f.chmod(0o600)
    yield str(f)
    shutil.rmtree(d)


@pytest.fixture
def base(tmp_path: Path) -> Spec:
    d = tmp_path / "specs"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    shutil.copy(EXAMPLES / "sched_switches.yaml", d)
    return load_spec(str(d / "sched_switches.yaml"), limits=Settings().policy.limits)


@pytest.fixture
def settings(bpffs_root: str) -> Settings:
    os.makedirs(bpffs_root, exist_ok=True)
    return dataclasses.replace(Settings(), bpffs_root=bpffs_root)


@pytest.fixture
def unconfined(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same pool, the same worker, no Landlock and no seccomp filter."""
    monkeypatch.setattr(confine, "enter", lambda tmp, support=None, read=None: sandbox.probe())


def bypass(spec: Spec, c_text: str) -> Spec:
    """The spec with C text that never went through the text checks."""
    return dataclasses.replace(spec, source=c_text + spec.source)


def only_error(spec: Spec, settings: Settings, *, pin: bool = False) -> LoaderdError:
    staged, errors = pool.stage_all([spec], settings, "t1", pin=pin)
    assert staged == [] and len(errors) == 1, (staged, errors)
    assert errors[0].location.file == spec.path  # against the spec, not the programs dir
    return errors[0]


def everything(err: LoaderdError) -> str:
    return f"{err}\n{err.detail or ''}"


def all_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


def test_the_kernel_has_landlock() -> None:
    # Everything below is about the sandbox, not its absence (measured: ABI 7 on 6.18).
    assert sandbox.probe().available, sandbox.probe().describe()


# --- files ----------------------------------------------------------------------------------

def test_include_of_a_root_only_file_cannot_be_read(base: Spec, settings: Settings,
                                                    secret: str) -> None:
    err = only_error(bypass(base, f'#include "{secret}"\n'), settings)
    assert "Permission denied" in everything(err)
    assert CANARY not in everything(err)


def test_include_control_unconfined_leaks_the_file(base: Spec, settings: Settings,
                                                   secret: str, unconfined: None) -> None:
    err = only_error(bypass(base, f'#include "{secret}"\n'), settings)
    assert CANARY in everything(err)  # what the sandbox prevents (root reads 0600 files)


def _line_info(settings: Settings, spec: Spec) -> str:
    staged, errors = pool.stage_all([spec], settings, "t1", pin=True)
    assert errors == [] and len(staged) == 1
    pin = f"{settings.bpffs_root}/_staging/t1/{spec.name}/progs/count_switch"
    return subprocess.run(["bpftool", "prog", "dump", "xlated", "pinned", pin, "linum"],
                          capture_output=True, text=True, check=True).stdout


def test_line_directive_cannot_put_a_root_only_file_into_btf(base: Spec, settings: Settings,
                                                             secret: str) -> None:
    # BCC opens the file a #line names and puts its lines into the program's BTF line info
    # (anyone who can dump the program reads them): confined, the open fails, the load works.
    out = _line_info(settings, bypass(base, f'#line 1 "{secret}"\n'))
    assert "line_num" in out and CANARY not in out


def test_line_directive_control_unconfined_leaks_into_btf(base: Spec, settings: Settings,
                                                          secret: str, unconfined: None) -> None:
    assert CANARY in _line_info(settings, bypass(base, f'#line 1 "{secret}"\n'))


def _incbin(path: str) -> str:
    # Top-level asm: the bytes land in .text, which BCC never loads; reading them is the point.
    return f'__asm__(".incbin \\"{path}\\"");\n'


def test_asm_incbin_of_a_root_only_file_cannot_be_read(base: Spec, settings: Settings,
                                                       secret: str) -> None:
    # The assembler opens the file, not clang's preprocessor: LLVM exits(1), and the worker's
    # death names the compiler's fatal error, not a resource limit.
    err = only_error(bypass(base, _incbin(secret)), settings)
    assert f"the compiler stopped on a fatal error: <inline asm>:1:9: Could not find incbin " \
        f"file '{secret}'" in str(err), str(err)
    assert err.allowed == "C text the compiler accepts"
    assert CANARY not in everything(err)


def test_asm_incbin_control_unconfined_reads_the_file(base: Spec, settings: Settings,
                                                      secret: str, unconfined: None) -> None:
    staged, errors = pool.stage_all([bypass(base, _incbin(secret))], settings, "t1", pin=False)
    assert errors == [] and len(staged) == 1  # found and assembled in


# --- pins -----------------------------------------------------------------------------------

def _pinned_table(path: str) -> str:
    return f'BPF_TABLE_PINNED("hash", u32, u64, evil, 16, "{path}");\n'


def test_pin_from_c_cannot_be_made(base: Spec, settings: Settings) -> None:
    target = f"{settings.bpffs_root}/evil"
    err = only_error(bypass(base, _pinned_table(target)), settings)
    assert "failed to pin map" in everything(err)
    assert all_files(settings.bpffs_root) == []


@pytest.mark.parametrize(("layer", "errno_text"), [("landlock", "Permission denied"),
                                                    ("seccomp", "Operation not permitted")])
def test_each_layer_alone_refuses_the_pin(base: Spec, settings: Settings,
                                          monkeypatch: pytest.MonkeyPatch, layer: str,
                                          errno_text: str) -> None:
    """Landlock alone (BPF_OBJ_PIN is a mknod: EACCES), the seccomp filter alone (EPERM)."""
    if layer == "landlock":
        monkeypatch.setattr(sandbox, "deny_bpf_commands", lambda *a: None)
    else:
        monkeypatch.setattr(sandbox, "confine", lambda *a: [])
    err = only_error(bypass(base, _pinned_table(f"{settings.bpffs_root}/evil")), settings)
    assert f"error: {errno_text}" in everything(err)
    assert all_files(settings.bpffs_root) == []


def test_pin_control_unconfined_is_made(base: Spec, settings: Settings,
                                        unconfined: None) -> None:
    only_error(bypass(base, _pinned_table(f"{settings.bpffs_root}/evil")), settings)
    assert all_files(settings.bpffs_root) == ["evil"]  # BCC pinned before loaderd refused


@pytest.fixture
def existing_pin(settings: Settings) -> Iterator[tuple[str, int]]:
    path = f"{settings.bpffs_root}/existing"
    fd = kernel.map_create(1, 4, 8, 16)  # a hash map like the one the C text declares
    kernel.obj_pin(fd, path)
    map_id = kernel.map_info(fd).id
    os.close(fd)
    yield path, map_id


def test_an_existing_pin_cannot_be_opened_from_c(base: Spec, settings: Settings,
                                                 existing_pin: tuple[str, int]) -> None:
    path, map_id = existing_pin
    err = only_error(bypass(base, _pinned_table(path)), settings)
    # The seccomp filter refused BPF_OBJ_GET; BCC then tried to create and pin: refused too.
    assert "Operation not permitted" in everything(err)
    fd = kernel.obj_get(path, rdonly=True)
    try:
        assert kernel.map_info(fd).id == map_id
    finally:
        os.close(fd)


def test_landlock_alone_does_not_govern_obj_get(base: Spec, settings: Settings,
                                                existing_pin: tuple[str, int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the seccomp filter exists (measured): BPF_OBJ_GET opens no file, so under Landlock
    alone BCC opened the pin, and only the map-facts check refused the undeclared map."""
    monkeypatch.setattr(sandbox, "deny_bpf_commands", lambda *a: None)
    err = only_error(bypass(base, _pinned_table(existing_pin[0])), settings)
    assert "source defines map 'evil'" in str(err)


# --- limits, deaths and the lock ------------------------------------------------------------

def _apply_with(tmp_path: Path, bpffs_root: str, c_text: str, limits: str
                ) -> tuple[Settings, float, list[LoaderdError]]:
    yaml = (EXAMPLES / "sched_switches.yaml").read_text()
    yaml = yaml.replace("  inline: |\n", "  inline: |\n" + "".join(
        f"    {line}\n" for line in c_text.splitlines()))
    conf = make_conf(tmp_path, bpffs_root, {"runaway": yaml, "good": (
        EXAMPLES / "udp_filter.yaml").read_text()}, f"compile:\n{limits}")
    settings = load_settings(str(conf))
    t0 = time.monotonic()
    result = Applier(settings).apply()
    return settings, time.monotonic() - t0, result.errors


def _assert_lock_free_and_no_worker(settings: Settings) -> None:
    fd = os.open(os.path.join(settings.state_dir, LOCK), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anyone still holds it
    finally:
        os.close(fd)
    with open(f"/proc/self/task/{threading.get_native_id()}/children") as f:
        assert f.read().split() == []


@pytest.mark.parametrize(("limits", "cause", "bound"), [
    ("  memory_mb: 768\n", "reached its memory limit of 768 MiB", 60.0),
    ("  memory_mb: 16384\n  timeout_seconds: 3\n", "timed out after 3 s", 15.0),
    ("  memory_mb: 16384\n  cpu_seconds: 2\n", "used its CPU time limit of 2 s", 30.0),
])
def test_a_runaway_compile_ends_at_its_limit_and_frees_the_lock(
        tmp_path: Path, bpffs_root: str, limits: str, cause: str, bound: float) -> None:
    settings, took, errors = _apply_with(tmp_path, bpffs_root, EXPLOSION, limits)
    assert took < bound, took
    runaway = [e for e in errors if e.location.file and e.location.file.endswith(
        "runaway.yaml")]
    assert len(runaway) == 1 and cause in str(runaway[0]), errors
    assert "nothing was committed" in str(runaway[0])
    assert "compile: limits" in (runaway[0].allowed or "")
    assert not any(e.location.file == settings.programs_dir for e in errors)
    _assert_lock_free_and_no_worker(settings)
    assert not os.path.exists(f"{bpffs_root}/good")  # all or nothing


def test_a_worker_killed_by_a_signal_is_named_against_its_spec(
        base: Spec, settings: Settings) -> None:
    spec = bypass(base, EXPLOSION)
    slow = dataclasses.replace(settings, compile=CompileLimits(memory_mb=16384))
    out: list[tuple[object, list[LoaderdError]]] = []
    thread = threading.Thread(target=lambda: out.append(pool.stage_all(
        [spec], slow, "t1", pin=False)))
    thread.start()
    children: list[str] = []
    deadline = time.monotonic() + 20
    while not children and time.monotonic() < deadline:
        time.sleep(0.2)
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                children += f.read().split()
    assert children, "no compile worker appeared"
    os.kill(int(children[0]), signal.SIGSEGV)
    thread.join(30)
    assert out and out[0][0] == []
    (err,) = out[0][1]
    assert err.location.file == spec.path
    assert "killed by signal 11 (SIGSEGV)" in str(err)
    assert err.allowed == "C text the compiler accepts"  # a crash: no limit to raise


# --- the normal case ------------------------------------------------------------------------

def test_the_shipped_examples_still_compile_and_pin(settings: Settings, tmp_path: Path) -> None:
    d = tmp_path / "examples"
    shutil.copytree(EXAMPLES, d)
    os.chmod(tmp_path, 0o755)
    specs = [load_spec(str(p), limits=Settings().policy.limits)
             for p in sorted(d.glob("*.yaml"))]
    staged, errors = pool.stage_all(specs, settings, "t1", pin=True)
    assert errors == [] and sorted(s.name for s in staged) == sorted(s.name for s in specs)
    pinned = all_files(f"{settings.bpffs_root}/_staging/t1")
    for s in specs:
        for p in s.programs:
            assert f"{s.name}/progs/{p.name}" in pinned
        for m in s.maps:
            assert f"{s.name}/maps/{m.name}" in pinned
    # The spec's own C file stays readable: its lines are in the program's BTF line info.
    out = subprocess.run(["bpftool", "prog", "dump", "xlated", "pinned",
                          f"{settings.bpffs_root}/_staging/t1/exec_counter/progs/count_exec",
                          "linum"], capture_output=True, text=True, check=True).stdout
    assert "__sync_fetch_and_add(value, 1);" in out, out


def test_the_seccomp_filter_in_a_child_refuses_obj_get_and_allows_map_create(
        settings: Settings, existing_pin: tuple[str, int]) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sandbox.no_new_privs()
            sandbox.deny_bpf_commands()
            fd = kernel.map_create(2, 4, 8, 1)
            try:
                kernel.obj_get(existing_pin[0])
                verdict = "opened"
            except LoaderdError as exc:
                verdict = f"refused {getattr(exc, 'errno', None)}"
            os.write(w, f"{fd >= 0} {verdict}".encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    assert got == "True refused 1"  # EPERM


# --- a kernel without Landlock (simulated: the probe says so) -------------------------------

@pytest.fixture
def without_landlock(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    gone = sandbox.Support(0, "the kernel was built without Landlock (CONFIG_SECURITY_LANDLOCK)")
    monkeypatch.setattr(sandbox, "probe", lambda: gone)
    events = io.StringIO()
    audit.configure(journal=False, stream=events)
    yield events


def test_without_landlock_the_seccomp_filter_still_refuses_pins_and_it_is_said(
        base: Spec, settings: Settings, without_landlock: io.StringIO) -> None:
    err = only_error(bypass(base, _pinned_table(f"{settings.bpffs_root}/evil")), settings)
    assert "error: Operation not permitted" in everything(err)
    assert all_files(settings.bpffs_root) == []
    assert '"event": "degraded"' in without_landlock.getvalue()
    assert "compile workers run without Landlock" in without_landlock.getvalue()


def test_require_landlock_refuses_to_compile_without_it(base: Spec, settings: Settings,
                                                        secret: str,
                                                        without_landlock: io.StringIO) -> None:
    strict = dataclasses.replace(settings, compile=CompileLimits(require_landlock=True))
    err = only_error(bypass(base, f'#include "{secret}"\n'), strict)
    assert "refusing to compile without a sandbox" in str(err)
    assert CANARY not in everything(err)
