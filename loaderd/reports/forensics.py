"""`loaderctl forensics DIR`: one self-describing bundle for an incident, checksummed.

Collected read-only (nothing is detached, unpinned or written outside DIR): the manifest,
`status.json`, per program its info (bpftool field names) and the kernel's xlated bytecode, per
map its info and a sanitized dump, per link its info, the applied spec files (the generation
copies the manifest points at), the system-wide audit when permitted, the journal slice of
loaderd's MESSAGE_IDs, and `SHA256SUMS` (sha256sum -c format) over every file. DIR must be new
or empty; files are 0600 in a 0700 directory, because the bundle describes security state.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import time
from typing import Any

from loaderd.bpf import kernel
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.observe import dump as dumping
from loaderd.observe import status as ctl
from loaderd.reports import foreign
from loaderd.reports.compliance import UNITS, message_id_matches
from loaderd.store import statedir as state

SUMS = "SHA256SUMS"
MAX_SPEC_COPY = 16 * 1024 * 1024


class Bundle:
    def __init__(self, root: str) -> None:
        self.root = root
        self.files: list[str] = []
        self.notes: list[str] = []

    def write(self, rel: str, data: bytes | str) -> None:
        path = os.path.join(self.root, rel)
        parent = self.root
        for part in rel.split("/")[:-1]:  # makedirs would give intermediate levels 0777-umask
            parent = os.path.join(parent, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent, 0o700)
        raw = data.encode() if isinstance(data, str) else data
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        self.files.append(rel)

    def json(self, rel: str, data: Any) -> None:
        self.write(rel, ctl.to_json(data) + "\n")

    def copy(self, src: str, rel: str) -> None:
        """A regular file, never through a final symlink, never blocking on a FIFO (the state
        dir's files can be swapped by the service user while the bundle is collected)."""
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SPEC_COPY:
                    raise OSError(errno.EINVAL, "not a regular file of at most "
                                  f"{MAX_SPEC_COPY} bytes")
                data = os.read(fd, MAX_SPEC_COPY + 1)
            finally:
                os.close(fd)
            self.write(rel, data)
        except OSError as exc:
            self.notes.append(f"{src}: not copied: {exc.strerror}")

    def seal(self) -> None:
        lines = []
        for rel in sorted(self.files):
            with open(os.path.join(self.root, rel), "rb") as f:
                lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {rel}\n")
        self.write(SUMS, "".join(lines))


def _new_dir(path: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path) or os.path.islink(path) or os.listdir(path):
            raise LoaderdError(Kind.STATE, "forensics directory exists and is not empty",
                               Location(path), allowed="a new or empty directory") from None
        os.chmod(path, 0o700)


def _programs(b: Bundle, report: dict[str, Any]) -> None:
    for spec in report["specs"]:
        for p in spec["programs"]:
            rel = f"programs/{spec['spec']}/{p['name']}"
            b.json(rel + ".json", p)
            try:
                fd = kernel.obj_get(p["pin"])
            except LoaderdError as exc:
                b.notes.append(f"{p['pin']}: no xlated code: {exc}")
                continue
            try:
                b.write(rel + ".xlated", kernel.prog_xlated(fd))
            finally:
                os.close(fd)
        for lk in spec["links"]:
            b.json(f"links/{spec['spec']}/{lk['program']}.json", lk)


def _maps(b: Bundle, view: ctl.View, report: dict[str, Any]) -> None:
    for spec in report["specs"]:
        for m in spec["maps"]:
            rel = f"maps/{spec['spec']}/{m['name']}.json"
            try:
                b.json(rel, dumping.dump(view, f"{spec['spec']}/{m['name']}", raw=False))
            except LoaderdError as exc:
                b.json(rel, {**m, "dump_error": str(exc)})


def _read_within(src: str, roots: tuple[str, ...]) -> bytes:
    """`src`'s bytes if the file opened is a regular file under one of `roots` (checked on the
    opened fd: no symlink or swap on the way can lead elsewhere), else OSError."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        st = os.fstat(fd)
        if not any(real.startswith(r + "/") for r in roots):
            raise OSError(errno.EPERM, "outside the programs dir and the generations")
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SPEC_COPY:
            raise OSError(errno.EINVAL, f"not a regular file of at most {MAX_SPEC_COPY} bytes")
        return os.read(fd, MAX_SPEC_COPY + 1)
    finally:
        os.close(fd)


def _specs(b: Bundle, view: ctl.View) -> None:
    """The applied spec files. The manifest names them, and the service user can write it:
    only files in the programs dir or loaderd's generations are copied (measured: a manifest
    `sources: [/root/...]` put a root-only file into root's bundle)."""
    settings = view.settings
    roots = (os.path.realpath(settings.programs_dir),
             os.path.join(os.path.realpath(settings.state_dir), state.GENERATIONS))
    recorded = view.manifest.specs if view.manifest else {}
    for name, entry in sorted(recorded.items()):
        gen = os.path.join(settings.state_dir, state.GENERATIONS, entry.txid or "")
        signed = entry.signature is not None and entry.signature.status.value != "unsigned"
        sig = (entry.file + ".sig",) if signed else ()  # what the signature check verified
        for src in (entry.file, *sig, *entry.sources):
            copy = os.path.join(gen, os.path.basename(src))
            for path in ([copy] if entry.txid else []) + [src]:
                try:
                    data = _read_within(path, roots)
                except OSError as exc:
                    if path == src:
                        b.notes.append(f"{src}: not copied: {exc.strerror}")
                    continue
                b.write(f"specs/{name}/{os.path.basename(src)}", data)
                break


def _journal(b: Bundle, since: str) -> None:

    if shutil.which("journalctl") is None:
        b.notes.append("journalctl not installed: no journal slice")
        b.write("journal.json", b"")  # present but empty: the bundle's layout is fixed
        return
    # loaderd's events, plus whatever its units printed (stderr: errors, tracebacks at
    # debug priority) and what systemd said about them (start/stop/failed): "+" is OR.
    units = [m for u in UNITS for m in ("+", f"_SYSTEMD_UNIT={u}", "+", f"UNIT={u}")]
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", "--since", since,
                          *message_id_matches(), *units], capture_output=True, timeout=120,
                         check=False)
    if out.returncode != 0 or not out.stdout:
        why = out.stderr.decode(errors="replace").strip()[:200] or "no matching entries"
        b.notes.append(f"journal slice empty: {why}")
    b.write("journal.json", out.stdout)


def _system(b: Bundle, view: ctl.View) -> None:

    try:
        report = foreign.scan(view.manifest, view.settings.bpffs_root)
    except LoaderdError as exc:
        b.notes.append(f"no system-wide audit: {exc}")
        return
    report.pop("all_programs", None)
    b.json("system/audit.json", report)


def collect(view: ctl.View, directory: str, *, since: str = "-7d") -> list[str]:
    """Write the bundle; returns the files written (relative to `directory`)."""
    if os.geteuid() != 0:
        raise LoaderdError(Kind.CAPABILITY, "forensics reads program pins and xlated code",
                           allowed="run as root")
    _new_dir(directory)
    b = Bundle(directory)
    report = ctl.status(view)
    b.json("status.json", report)
    if view.manifest is not None:
        b.copy(view.manifest_path, "manifest.json")
    else:
        b.notes.append(view.manifest_note or "no manifest")
    _programs(b, report)
    _maps(b, view, report)
    _specs(b, view)
    _system(b, view)
    _journal(b, since)
    b.notes += report["notes"]
    uname = platform.uname()
    b.json("README.json", {
        "what": "loaderd forensics bundle", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": uname.node, "kernel": uname.release, "config": view.settings.path,
        "bpffs_root": view.settings.bpffs_root, "state_dir": view.settings.state_dir,
        "map_dumps": "sanitized (IPs masked, secrets redacted)", "journal_since": since,
        "verify": f"cd {directory} && sha256sum -c {SUMS}", "notes": b.notes})
    with contextlib.suppress(OSError):
        b.seal()
    return [*b.files]
