"""What a compile worker may touch, and entering that confinement.

Measured (strace -f -e trace=%file of a forked worker compiling the shipped examples, bcc 0.26,
kernel 6.18): BCC's clang reads only the kernel headers (`/lib/modules/<release>/{build,source}`
and what they resolve to); its own headers are compiled in (`/virtual/...`). Denied without
harm: clang's driver probing (/etc/os-release, /usr/lib/gcc, /opt, /usr/local/cuda). Granted
beyond that, read-only, for code the worker runs after confining: the Python library
directories and loaderd's own package (lazy imports), the running kernel's BTF, the possible-CPU
list, the tracefs event formats (BCC's TRACEPOINT_PROBE reads them) and /proc/kallsyms: BCC
looks `bpf_probe_read_kernel` up there and, denied, silently compiles every kernel read as the
legacy `bpf_probe_read` (measured: the policy then saw another helper than the C text calls).
Kernel addresses could reach an error only through a `#line` or an absolute quoted include,
which the text check refuses. Write: only the worker's private temp directory (also its cwd:
BCC puts the working directory on the include path). The pool adds the spec's own two files
(YAML and C), as file rules: BCC opens the file a `#line` directive names to put its lines
into the program's BTF line info (measured with `#line 1 "/etc/hostname"`), and loaderd's
generated `#line` names the spec. Not granted: the spec's directory (quoted includes are
refused by the text check, and nothing in a compile needs it), any other file a `#line` in the
C text names, the rest of /proc and /sys, /etc, /dev, and bpffs. No pin can be
made from a compile (Landlock: BPF_OBJ_PIN is a mknod) and, since Landlock does not govern
BPF_OBJ_GET (it opens no file: measured, a confined worker still opened an existing pin through
`BPF_TABLE_PINNED`), a seccomp filter refuses the bpf() commands that reach pins or objects by
path or id, and every attach command. The parent process pins what the worker loaded, through
the fds it passes back.
"""

from __future__ import annotations

import os
import site
import sysconfig
from pathlib import Path

from loaderd import sandbox
from loaderd.sandbox import READ, WRITE, Rule, Support

TRACEFS_EVENTS = ("/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events")
SYSFS = ("/sys/kernel/btf", "/sys/devices/system/cpu", "/proc/kallsyms")


def kernel_header_dirs(release: str | None = None) -> list[str]:
    """/lib/modules/<release> and the real directories its build/source links (and
    BCC_KERNEL_SOURCE) point to: Landlock rules hold on the resolved tree, not the link."""
    base = f"/lib/modules/{release or os.uname().release}"
    found = [base]
    for candidate in (os.path.join(base, "build"), os.path.join(base, "source"),
                      os.environ.get("BCC_KERNEL_SOURCE", "")):
        if candidate and os.path.isdir(candidate):
            found.append(os.path.realpath(candidate))
    return list(dict.fromkeys(found))


def python_dirs() -> list[str]:
    """The interpreter's library directories and loaderd's package: code, no data."""
    paths = sysconfig.get_paths()
    found = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    found += site.getsitepackages()
    found.append(str(Path(sandbox.__file__).resolve().parent))
    return [p for p in dict.fromkeys(os.path.realpath(p) for p in found) if os.path.isdir(p)]


def read_paths() -> list[str]:
    """Everything a compile worker may read (computed once, in the parent: a few ms)."""
    return [*kernel_header_dirs(), *python_dirs(), *SYSFS, *TRACEFS_EVENTS]


def rules(private_tmp: str, read: list[str] | None = None) -> list[Rule]:
    return [Rule(p, READ) for p in (read_paths() if read is None else read)] + [
        Rule(private_tmp, WRITE)]


def enter(private_tmp: str, support: Support | None = None, read: list[str] | None = None
          ) -> Support:
    """Confine this process for compiling (call in the forked worker, after bcc is imported and
    before any spec text reaches clang). Returns what was enforced: abi 0 means the kernel has
    no Landlock and the worker runs unconfined (degraded; the caller reports it)."""
    support = support or sandbox.probe()
    if support.available:
        sandbox.confine(rules(private_tmp, read), support)
    else:
        sandbox.no_new_privs()
    sandbox.deny_bpf_commands()  # no pin, no open of a pin, no attach: with or without Landlock
    return support
