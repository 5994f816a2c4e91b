"""The sandbox wrapper's pure parts: Landlock masks and structs per ABI, the unavailable
reasons, the seccomp program (run on a small classic-BPF interpreter), the compile worker's
death causes, its wire format, and the `compile:` settings."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import struct
from pathlib import Path

import pytest

from loaderd import sandbox
from loaderd.config.settings import load_settings
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import CompileLimits, ProgType, Settings
from loaderd.observe.status import View, status
from loaderd.reports import compliance
from loaderd.sandbox import (
    EXECUTE,
    IOCTL_DEV,
    MAKE_REG,
    READ,
    READ_DIR,
    READ_FILE,
    REFER,
    TRUNCATE,
    WRITE,
    WRITE_FILE,
)
from loaderd.stage import wire
from loaderd.stage.pool import death_cause, sandbox_status
from loaderd.stage.worker import StagedProgram, StagedSpec
from loaderd.store.manifest import Manifest, Status
from tests.unit.test_policy import make_spec

# --- Landlock masks and structs ---------------------------------------------------------------


def test_handled_fs_grows_with_the_abi() -> None:
    assert sandbox.handled_fs(0) == 0
    assert sandbox.handled_fs(1) == (1 << 13) - 1  # the 13 rights of Landlock v1
    assert sandbox.handled_fs(2) == sandbox.handled_fs(1) | REFER
    assert sandbox.handled_fs(3) == sandbox.handled_fs(2) | TRUNCATE
    assert sandbox.handled_fs(4) == sandbox.handled_fs(3)  # ABI 4 added network rights only
    assert sandbox.handled_fs(5) == sandbox.handled_fs(4) | IOCTL_DEV
    assert sandbox.handled_fs(7) == sandbox.handled_fs(5)


def test_network_rights_from_abi_4_and_scopes_from_abi_6() -> None:
    assert [sandbox.handled_net(a) for a in (1, 3, 4, 7)] == [0, 0, 3, 3]
    assert [sandbox.scoped(a) for a in (1, 5, 6, 7)] == [0, 0, 3, 3]


@pytest.mark.parametrize(("abi", "size"), [(1, 8), (3, 8), (4, 16), (5, 16), (6, 24), (7, 24)])
def test_ruleset_attr_is_as_long_as_the_abi_knows(abi: int, size: int) -> None:
    attr = sandbox.ruleset_attr(abi)
    assert len(attr) == size
    fields = struct.unpack(f"={size // 8}Q", attr)
    assert fields[0] == sandbox.handled_fs(abi)
    if abi >= 4:
        assert fields[1] == sandbox.handled_net(abi)
    if abi >= 6:
        assert fields[2] == sandbox.scoped(abi)


def test_rule_access_keeps_only_rights_the_abi_handles() -> None:
    assert sandbox.rule_access(1, WRITE, is_dir=True) & (REFER | TRUNCATE) == 0
    assert sandbox.rule_access(2, WRITE, is_dir=True) & REFER
    assert not sandbox.rule_access(2, WRITE, is_dir=True) & TRUNCATE
    assert sandbox.rule_access(3, WRITE, is_dir=True) & TRUNCATE
    assert sandbox.rule_access(0, READ, is_dir=True) == 0


def test_a_rule_on_a_file_holds_file_rights_only() -> None:
    # the kernel refuses directory rights (READ_DIR, MAKE_*) on a file with EINVAL
    got = sandbox.rule_access(7, WRITE, is_dir=False)
    assert got == WRITE_FILE | READ_FILE | TRUNCATE
    assert sandbox.rule_access(7, READ, is_dir=False) == READ_FILE
    assert not got & (READ_DIR | MAKE_REG)


def test_read_never_executes_and_write_makes_no_devices() -> None:
    assert not READ & EXECUTE and not WRITE & EXECUTE
    assert not WRITE & (sandbox.MAKE_CHAR | sandbox.MAKE_BLOCK | sandbox.MAKE_FIFO
                        | sandbox.MAKE_SOCK)


def test_path_beneath_attr_is_packed() -> None:
    raw = sandbox.path_beneath_attr(READ, 7)
    assert len(raw) == 12 and struct.unpack("=Qi", raw) == (READ, 7)


# --- availability --------------------------------------------------------------------------


@pytest.mark.parametrize(("err", "words"), [
    (errno.ENOSYS, "built without Landlock"),
    (errno.EOPNOTSUPP, "not enabled at boot"),
    (errno.EPERM, "SystemCallFilter="),
    (errno.EINVAL, "landlock_create_ruleset: "),
])
def test_unavailable_is_reported_with_the_reason(monkeypatch: pytest.MonkeyPatch, err: int,
                                                 words: str) -> None:
    def fail(*_args: object) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(sandbox, "_syscall", fail)
    sandbox.probe.cache_clear()
    try:
        got = sandbox.probe()
    finally:
        sandbox.probe.cache_clear()
    assert not got.available and got.abi == 0
    assert words in got.reason and words in got.describe()
    with pytest.raises(sandbox.SandboxError, match="no Landlock"):
        sandbox.confine([], got)


def test_available_support_describes_its_abi() -> None:
    assert sandbox.Support(7).describe() == "Landlock ABI 7"
    assert sandbox.Support(7).available


# --- seccomp program, run on a classic-BPF interpreter -------------------------------------


def _run_cbpf(prog: bytes, nr: int, arch: int, args0: int) -> int:
    data = struct.pack("=iIQ6Q", nr, arch, 0, args0, 0, 0, 0, 0, 0)
    insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == 0x15:  # jeq #k
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x06:  # ret #k
            return int(k)
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


X86 = sandbox.AUDIT_ARCH["x86_64"]
DENY = sandbox.SECCOMP_RET_ERRNO | errno.EPERM
ALLOW = sandbox.SECCOMP_RET_ALLOW


def test_seccomp_program_refuses_exactly_the_listed_bpf_commands() -> None:
    prog = sandbox.bpf_command_filter(sandbox.DENIED_BPF_COMMANDS, "x86_64")
    assert len(prog) % 8 == 0
    for cmd in range(40):
        want = DENY if cmd in sandbox.DENIED_BPF_COMMANDS else ALLOW
        assert _run_cbpf(prog, 321, X86, cmd) == want, cmd
    for cmd in (0, 1, 2, 5, 15, 18, 22):  # MAP_CREATE, lookups, PROG_LOAD, info, BTF_LOAD, freeze
        assert _run_cbpf(prog, 321, X86, cmd) == ALLOW
    assert _run_cbpf(prog, 321, X86, 6 | 1 << 32) == DENY  # only the low 32 bits are the cmd


def test_seccomp_program_leaves_other_syscalls_and_catches_x32() -> None:
    prog = sandbox.bpf_command_filter([6, 7], "x86_64")
    assert _run_cbpf(prog, 0, X86, 6) == ALLOW  # read(), whatever its first argument
    assert _run_cbpf(prog, 257, X86, 7) == ALLOW  # openat
    assert _run_cbpf(prog, 321 | sandbox.X32_SYSCALL_BIT, X86, 0) == DENY  # x32 bpf()
    assert _run_cbpf(prog, 321, 0x40000003, 7) == ALLOW  # i386 is not this filter's


def test_seccomp_program_for_another_architecture() -> None:
    prog = sandbox.bpf_command_filter([7], "aarch64")
    assert _run_cbpf(prog, 280, sandbox.AUDIT_ARCH["aarch64"], 7) == DENY
    assert _run_cbpf(prog, 280, sandbox.AUDIT_ARCH["aarch64"], 5) == ALLOW


# --- resource limits (in a forked child: limits are per process) ----------------------------


def test_set_limits_lowers_as_and_cpu_in_a_child() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sandbox.set_limits(sandbox.Limits(1 << 30, 7))
            got = (resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(
                resource.RLIMIT_CPU))
            os.write(w, repr(got).encode())
        finally:
            os._exit(0)
    os.close(w)
    said = os.read(r, 200).decode()
    os.waitpid(pid, 0)
    assert said == repr(((1 << 30, 1 << 30), (7, 8)))


# --- why a worker died -----------------------------------------------------------------------

LIM = CompileLimits(memory_mb=512, cpu_seconds=5, timeout_seconds=9)


def _signaled(sig: int) -> int:
    return sig  # a wait status for "killed by sig", no core


def test_death_causes_name_the_limit_or_the_signal() -> None:
    def cause(status: int, **kw: object) -> str:
        args: dict[str, object] = {"timed_out": False, "cpu_seconds": 0.1, "diagnostics": "",
                                   "limits": LIM, **kw}
        return death_cause(status, **args)  # type: ignore[arg-type]

    assert "timed out after 9 s" in cause(_signaled(signal.SIGKILL), timed_out=True)
    assert "memory limit of 512 MiB" in cause(_signaled(signal.SIGABRT),
                                              diagnostics="LLVM ERROR: out of memory")
    assert "memory limit" in cause(_signaled(signal.SIGABRT), diagnostics=(
        "terminate called after throwing an instance of 'std::bad_alloc'"))
    assert "CPU time limit of 5 s" in cause(_signaled(signal.SIGXCPU))
    assert "CPU time limit" in cause(_signaled(signal.SIGKILL), cpu_seconds=6.0)
    segv = cause(_signaled(signal.SIGSEGV))
    assert "signal 11 (SIGSEGV)" in segv
    assert "OOM killer" in cause(_signaled(signal.SIGKILL))
    assert "exited with status 3 without a result" in cause(3 << 8)
    fatal = cause(1 << 8, diagnostics="noise\nerror: <inline asm>:1:9: Could not find incbin "
                  "file '/root/s'\n.incbin \"/root/s\"\n")
    assert fatal.endswith("stopped on a fatal error: <inline asm>:1:9: Could not find incbin "
                          "file '/root/s'"), fatal
    assert "LLVM says: x?y" in cause(1 << 8, diagnostics="LLVM ERROR: LLVM says: x\x1by\n")


# --- wire format: the worker's message is untrusted ----------------------------------------


def _staged(spec_name: str = "demo") -> StagedSpec:
    st = StagedSpec(spec_name, "/x/demo.yaml", "ab" * 32)
    st.programs["prog"] = StagedProgram("prog", "prog", "socket_filter", 12, "00" * 8,
                                        ["map_lookup_elem"], None, {"kfunc": 0})
    return st


def test_wire_round_trip_of_a_built_spec() -> None:
    spec = make_spec(maps=1)
    st = StagedSpec(spec.name, spec.path, spec.sha256)
    st.programs[spec.programs[0].name] = StagedProgram(
        spec.programs[0].name, spec.programs[0].name, ProgType.SOCKET_FILTER.value, 3,
        "ff" * 8, ["ktime_get_ns"], "why", {"bpf_to_bpf": 1})
    msg = wire.decode(wire.built(st, [p.name for p in spec.programs],
                                 [m.name for m in spec.maps]))
    got, progs, maps = wire.decode_built(msg, spec)
    assert got == st and progs == [p.name for p in spec.programs]
    assert maps == [m.name for m in spec.maps]


def test_wire_refuses_names_that_are_not_the_specs() -> None:
    spec = make_spec(maps=1)
    st = StagedSpec(spec.name, spec.path, spec.sha256)
    st.programs["intruder"] = _staged().programs["prog"]
    msg = wire.decode(wire.built(st, ["intruder"], [m.name for m in spec.maps]))
    with pytest.raises(wire.WireError, match="not the spec's"):
        wire.decode_built(msg, spec)


def test_wire_refuses_bad_types_and_kinds() -> None:
    with pytest.raises(wire.WireError):
        wire.decode(b"\x80garbage")
    with pytest.raises(wire.WireError, match="kind"):
        wire.decode(b'{"kind": "exec"}')
    bad = wire.decode(wire.encode("error", error={"kind": "nope", "message": "m",
                                                  "location": [None] * 4}))
    with pytest.raises(wire.WireError, match="kind"):
        wire.decode_error(bad)
    bad = wire.decode(wire.encode("error", error={"kind": "compile", "message": "m",
                                                  "location": ["f", True, None, None]}))
    with pytest.raises(wire.WireError, match="line"):
        wire.decode_error(bad)
    huge = wire.decode(wire.encode("error", error={"kind": "compile", "message": "m" * 70000,
                                                   "location": [None] * 4}))
    with pytest.raises(wire.WireError, match="message"):
        wire.decode_error(huge)


def test_wire_error_round_trip() -> None:
    exc = LoaderdError(Kind.COMPILE, "C source does not compile", Location("/s.yaml", 3, 4,
                       "source"), value="v", allowed="a", detail="d")
    got, debug = wire.decode_error(wire.decode(wire.error(exc, "tb")))
    assert (got.kind, got.message, got.location, got.value, got.allowed, got.detail, debug) == (
        exc.kind, exc.message, exc.location, "v", "a", "d", "tb")


# --- settings ------------------------------------------------------------------------------


def _settings_file(tmp_path: Path, body: str) -> str:
    p = tmp_path / "loaderd.yaml"
    p.write_text("loaderd: 1\n" + body)
    return str(p)


def test_compile_settings_default_wide_and_parse(tmp_path: Path) -> None:
    assert Settings().compile == CompileLimits(2048, 60, 120, False)
    path = _settings_file(tmp_path, "compile:\n  memory_mb: 1024\n  cpu_seconds: 30\n"
                          "  timeout_seconds: 45\n  require_landlock: true\n")
    got = load_settings(path, owner_uid=None).compile
    assert got == CompileLimits(1024, 30, 45, True)
    assert load_settings(_settings_file(tmp_path, ""), owner_uid=None).compile == \
        CompileLimits()


@pytest.mark.parametrize("body", ["compile:\n  memory_mb: 16\n", "compile:\n  cpu_seconds: 0\n",
                                  "compile:\n  timeout: 5\n", "compile:\n  memory_mb: '1G'\n"])
def test_compile_settings_refused_with_the_field(tmp_path: Path, body: str) -> None:
    with pytest.raises(LoaderdError) as err:
        load_settings(_settings_file(tmp_path, body), owner_uid=None)
    assert "compile" in str(err.value)


# --- degraded, not silent ------------------------------------------------------------------


@pytest.fixture
def no_landlock(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = sandbox.Support(0, "the kernel was built without Landlock (CONFIG_SECURITY_LANDLOCK)")
    monkeypatch.setattr(sandbox, "probe", lambda: gone)


def _view(tmp_path: Path, **kw: object) -> View:
    s = Settings(bpffs_root=str(tmp_path / "pins"), state_dir=str(tmp_path / "state"),
                 **kw)  # type: ignore[arg-type]
    return View(s, Manifest(Status.COMMITTED))


def test_compliance_warns_where_the_kernel_lacks_landlock(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          no_landlock: None) -> None:
    monkeypatch.setattr(compliance, "UNIT_DIRS", (str(tmp_path),))
    status, detail = compliance.check_compile_sandbox(_view(tmp_path))
    assert status == compliance.WARN and "DEGRADED" in detail and "unconfined" in detail
    strict = _view(tmp_path, compile=CompileLimits(require_landlock=True))
    assert "refuses every compile" in compliance.check_compile_sandbox(strict)[1]


def test_compliance_passes_with_landlock_and_checks_the_apply_unit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "probe", lambda: sandbox.Support(7))
    monkeypatch.setattr(compliance, "UNIT_DIRS", (str(tmp_path),))
    status, detail = compliance.check_compile_sandbox(_view(tmp_path))
    assert status == compliance.PASS and "Landlock ABI 7" in detail
    unit = tmp_path / "loaderd-apply.service"
    unit.write_text("[Service]\nSystemCallFilter=@system-service bpf perf_event_open\n")
    status, detail = compliance.check_compile_sandbox(_view(tmp_path))
    assert status == compliance.WARN and str(unit) in detail
    shipped = Path(__file__).resolve().parents[2] / "units" / "loaderd-apply.service"
    shutil.copy(shipped, unit)  # the packaged unit allows the three syscalls
    assert compliance.check_compile_sandbox(_view(tmp_path))[0] == compliance.PASS


def test_status_and_check_say_degraded(tmp_path: Path, no_landlock: None) -> None:
    report = status(_view(tmp_path))
    assert report["sandbox"]["landlock_abi"] == 0
    assert any("compile sandbox DEGRADED" in n for n in report["notes"])
    _support, line = sandbox_status(Settings())
    assert line is not None and line.startswith("DEGRADED: compile workers run without")
    _support, strict = sandbox_status(Settings(compile=CompileLimits(require_landlock=True)))
    assert strict is not None and "require_landlock" in strict


def test_status_is_quiet_with_landlock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "probe", lambda: sandbox.Support(7))
    report = status(_view(tmp_path))
    assert report["sandbox"]["landlock_abi"] == 7
    assert not any("sandbox" in n for n in report["notes"])
    assert sandbox_status(Settings())[1] is None
