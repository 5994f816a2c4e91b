"""BCC: turn a Spec's C text into kernel objects, under loaderd's rules.

- Map declarations are generated from the spec and prepended, so the spec is the truth.
- BCC's auto-attach of `kprobe__`/`tracepoint__`/... names is disabled: nothing attaches unless a
  spec says so.
- `allow_rlimit=False`: BCC must not raise RLIMIT_MEMLOCK (kernels >= 5.11 account maps to memcg).
- clang diagnostics and the verifier log go to C-level fd 2; they are captured into the error.
- BCC chdirs the whole process while compiling: one compile per process at a time (callers run
  each spec in its own worker process).

Only the short-lived apply workers import bcc (lazily, through Module); the resident daemon
imports this module's name through stage/state but never loads bcc or LLVM.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import MAP_FLAG_BITS, CType, Field, MapSpec, MapType, ProgType, Spec

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _member(f: Field, names: set[str], index: int) -> str:
    name = f.name if f.name not in names else f"{f.name}{index}"  # `_pad` may repeat
    names.add(name)
    if f.type == "char":
        return f"char {name}[{f.size}];"
    if f.type == "bytes":
        return f"u8 {name}[{f.size}];"
    return f"{f.type} {name}[{f.count}];" if f.count != 1 else f"{f.type} {name};"


def c_type(map_name: str, role: str, ctype: CType) -> tuple[str, str]:
    """(typedef needed or "", C type name) for a key or value: a scalar by its name, anything
    else as `loaderd_<map>_<key|value>_t` (docs/spec-format.md, "Generated C names"). A
    struct's members are the declared fields in order: C lays them out at the offsets the
    layout computed (natural alignment), so the program and the readers agree."""
    if ctype.name is not None:
        return "", ctype.name
    tag = f"loaderd_{map_name}_{role}"
    if ctype.fields:
        names: set[str] = set()
        body = " ".join(_member(f, names, i) for i, f in enumerate(ctype.fields))
    else:
        body = f"u8 bytes[{ctype.size}];"
    return f"typedef struct {tag} {{ {body} }} {tag}_t;\n", f"{tag}_t"


def map_declaration(m: MapSpec) -> str:
    flags = sum(MAP_FLAG_BITS[f] for f in m.flags)
    if m.type is MapType.RINGBUF:
        return f"BPF_RINGBUF_OUTPUT({m.name}, {max(1, m.max_entries // PAGE_SIZE)});\n"
    if m.type is MapType.PERF_EVENT_ARRAY:
        return f"BPF_PERF_OUTPUT({m.name});\n"
    if m.type is MapType.SOCKMAP:  # u64 values: the syscall side reads socket cookies
        return f"BPF_F_TABLE(\"sockmap\", u32, u64, {m.name}, {m.max_entries}, 0);\n"
    key_def, key_t = c_type(m.name, "key", m.key)
    val_def, val_t = c_type(m.name, "value", m.value)
    return (f"{key_def}{val_def}BPF_F_TABLE(\"{m.type.kind.bcc}\", {key_t}, {val_t}, "
            f"{m.name}, {m.max_entries}, {flags});\n")


def render(spec: Spec) -> str:
    """The exact C text BCC compiles: generated map prelude, then the author's source."""
    # params: `#define NAME value`, what `-DNAME=value` would give clang (values typed and
    # checked by config.semantic; the YAML they come from is in the spec's sha256)
    prelude = "".join(f"#define {p.name} {p.c_value}\n" for p in spec.params)
    prelude += "".join(map_declaration(m) for m in spec.maps)
    origin = spec.source_path or spec.path
    # #line keeps clang's diagnostics pointing at the author's file and line numbers.
    return f"{prelude}#line {spec.source_line} \"{_c_string(origin)}\"\n{spec.source}"


def _c_string(text: str) -> str:
    """A C string literal's body: a newline in a path must not end the `#line` directive
    (config.trust refuses such paths; this holds whatever reaches here)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\{ord(m.group()):03o}", text)


# A memfd the parent shares (set by the worker process): what clang or LLVM wrote last is still
# there when the worker dies in the middle of a compile ("LLVM ERROR: out of memory").
_SINK: int | None = None


def share_diagnostics(fd: int) -> None:
    global _SINK
    _SINK = fd


@contextlib.contextmanager
def captured_fd2() -> Iterator[list[str]]:
    """Redirect C-level stderr (clang, libbcc's verifier log) into a buffer for the block."""
    out: list[str] = []
    if _SINK is None:
        mem = os.memfd_create("loaderd-stderr")
    else:
        mem = os.dup(_SINK)
        os.ftruncate(mem, 0)
        os.lseek(mem, 0, os.SEEK_SET)
    saved = os.dup(2)
    os.dup2(mem, 2)
    try:
        yield out
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.lseek(mem, 0, os.SEEK_SET)
        with os.fdopen(mem, "rb") as f:
            out.append(f.read(1 << 20).decode("utf-8", "replace"))


def preload() -> None:
    """Import bcc and load libbcc/LLVM now: a confined worker could not open them later."""
    import bcc  # noqa: F401

    _lib()


_LIB_SETUP = False


def _lib() -> Any:
    """libbcc with the table-enumeration prototypes bcc's Python binding does not declare."""
    global _LIB_SETUP
    from bcc.libbcc import lib

    if not _LIB_SETUP:
        lib.bpf_num_tables.restype = ctypes.c_size_t
        lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
        lib.bpf_table_name.restype = ctypes.c_char_p
        lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.bpf_table_fd_id.restype = ctypes.c_int
        lib.bpf_table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _LIB_SETUP = True
    return lib


def _strip_diagnostics(text: str) -> str:
    """Keep clang's error lines and their context; drop BCC's noise and absolute temp paths."""
    lines = [ln for ln in text.splitlines() if ln.strip()
             and not ln.startswith("In file included from /virtual/")]
    return "\n".join(lines[:60])


_DIAG_RE = re.compile(
    r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): (?:fatal )?error: (?P<msg>.+)$", re.M)


def compile_error(diagnostics: str, where: Location, indent: int = 0) -> LoaderdError:
    """The refusal for clang's output: located at clang's first error when it names the spec's
    own file (#line maps the C text back to it), so the one line journaled at priority err
    and shown by `systemctl status` says file:line:col and why, not just "does not compile".
    `indent`: the columns YAML strips from an `inline: |` block's lines. The whole diagnostic
    stays in the detail."""
    m = _DIAG_RE.search(diagnostics)
    if m is None:
        return LoaderdError(Kind.COMPILE, "C source does not compile", where,
                            detail=diagnostics or None)
    loc = where
    if where.file is not None and m["file"] == where.file:
        loc = Location(where.file, int(m["line"]), int(m["col"]) + indent, where.field)
    return LoaderdError(Kind.COMPILE, f"C source does not compile: {m['msg'].strip()}", loc,
                        detail=diagnostics)


def inline_indent(spec: Spec) -> int:
    """The indentation of an `inline: |` block (clang counts columns in the dedented text)."""
    if spec.source_path is not None or spec.source_line < 2:
        return 0
    lines = spec.yaml_bytes.split(b"\n")
    if spec.source_line > len(lines):
        return 0
    line = lines[spec.source_line - 1]
    return len(line) - len(line.lstrip(b" "))


def clang_warnings(diagnostics: str, where: Location | None = None,
                   indent: int = 0) -> str | None:
    """clang's warnings of a compile that succeeded (what `check` shows the author), or None;
    columns in the spec's own file shifted by `indent` (an `inline: |` block's), as errors."""
    text = _strip_diagnostics(diagnostics)
    if "warning:" not in text:
        return None
    if indent and where is not None and where.file is not None:
        head = re.escape(where.file)
        text = re.sub(rf"^({head}):(\d+):(\d+):",
                      lambda m: f"{m[1]}:{m[2]}:{int(m[3]) + indent}:", text, flags=re.M)
    return text


def bcc_compile(text: str, where: Location, indent: int = 0,
                warnings: list[str] | None = None) -> Any:
    """BPF(text) with nothing auto-attached, no RLIMIT_MEMLOCK change, a private TMPDIR and
    clang's diagnostics in the error (located at `where`); on success clang's warnings are
    appended to `warnings`."""
    from bcc import BPF

    class _NoAutoAttach(BPF):  # type: ignore[misc]
        def _trace_autoload(self) -> None:  # nothing attaches unless a spec says so
            return None

    # BCC's kheaders fallback trusts an existing $TMPDIR/kheaders-<rel> (CVE-2024-2314):
    # give it a private, fresh TMPDIR so nothing planted there can be picked up.
    private_tmp = tempfile.mkdtemp(prefix="loaderd-bcc-")
    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = private_tmp
    try:
        bpf: Any = None
        err: Exception | None = None
        with captured_fd2() as diag:
            try:
                bpf = _NoAutoAttach(text=text.encode(), allow_rlimit=False)
            except Exception as exc:  # bcc raises bare Exception
                err = exc
        if err is None:
            found = clang_warnings(diag[0], where, indent)
            if found and warnings is not None:
                warnings.append(found)
            return bpf
        raise compile_error(_strip_diagnostics(diag[0]) or str(err), where, indent) from None
    finally:
        if old_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmp
        with contextlib.suppress(OSError):
            os.rmdir(private_tmp)


class Module:
    """One compiled spec. Maps exist in the kernel as soon as this is constructed."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        found: list[str] = []
        self.bpf = bcc_compile(render(spec), Location(spec.source_path or spec.path,
                                                      field="source"), inline_indent(spec),
                               found)
        self.warnings = found[0] if found else None  # clang's, on success: `check` shows them

    def functions(self) -> list[str]:
        lib = _lib()
        n = lib.bpf_num_functions(self.bpf.module)
        return [lib.bpf_function_name(self.bpf.module, i).decode() for i in range(n)]

    def tables(self) -> dict[str, int]:
        """Every map the compiled object created: name -> fd (owned by the BPF object)."""
        lib = _lib()
        n = lib.bpf_num_tables(self.bpf.module)
        return {lib.bpf_table_name(self.bpf.module, i).decode(): lib.bpf_table_fd_id(
            self.bpf.module, i) for i in range(n)}

    def bytecode(self, function: str) -> bytes:
        """Exactly the bytes `load` would hand to the kernel."""
        return bytes(self.bpf.dump_func(function.encode()))

    def load(self, function: str, ptype: ProgType, *, field: str, line: int | None = None,
             attach_type: int | None = None) -> int:
        """Load into the kernel; the verifier's reason ends up in the error. Returns the fd.
        `attach_type`: the expected_attach_type (cgroup hooks: the kernel checks the context
        accesses against it and refuses another hook at attach)."""
        with captured_fd2() as log:
            try:
                fn = self.bpf.load_func(function.encode(), ptype.kind.kernel_id,
                                        attach_type=-1 if attach_type is None else attach_type)
                err = None
            except Exception as exc:
                err = exc
        if err is not None:
            text = log[0].strip()
            raise LoaderdError(
                Kind.VERIFIER if "processed " in text else Kind.KERNEL,
                f"kernel refused program '{function}': {first_reason(text) or err}",
                Location(self.spec.path, line, None, field),  # the program's entry
                detail=redact_addresses(text[-8000:]) or None) from None
        return int(fn.fd)

    def close(self) -> None:
        """Close every fd the BPF object holds. Pinned objects stay in the kernel."""
        self.bpf.cleanup()


_KADDR = re.compile(r"0xffff[0-9a-f]{8,12}")


def redact_addresses(text: str) -> str:
    """Kernel pointers in verifier logs are internal addresses: never show them to users."""
    return _KADDR.sub("0x<kaddr>", text)


def first_reason(log: str) -> str:
    """The verifier's verdict: the last line before 'processed N insns' that is not an
    instruction, a register-state dump or a source comment."""
    body = log.split("\nprocessed ")[0].splitlines()
    for line in reversed(body):
        text = line.strip()
        if text and not re.match(r"^(\d+: |; |from \d+ to |bpf: Failed)", text):
            return redact_addresses(text)
    return ""
