"""The manifest as typed records: the one place that knows its JSON keys.

The manifest is written by the service user and can be written by the unprivileged resident's
user, so the privileged apply reads it as untrusted input: opened without following symlinks
and without blocking (a FIFO must not hang the apply), a regular file of bounded size owned by
root or the state directory's owner, then parsed into frozen records where every name is a safe
name, every pin directory is `<pin root>/<spec name>`, every txid has loaderd's shape and every
attach target parses. Any violation is one located error naming the file, never an internal
error or a silent rebuild.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import (
    NAME_RE,
    LinkTarget,
    ProgType,
    SignatureFacts,
    SignatureStatus,
    link_program,
    parse_target,
)

MAX_BYTES = 16 * 1024 * 1024  # a manifest of 64 specs x 64 objects is well under 1 MB
SAFE_NAME = NAME_RE  # spec, program, map names: pin names (model: the schema's `name`)
_HELPER = re.compile(r"[a-z_][a-z0-9_]{0,63}")  # enum bpf_func_id names, without BPF_FUNC_
TXID = re.compile(r"\d{8}t\d{6}-\d{9}-[0-9a-f]{6}")


class Status(enum.StrEnum):
    EMPTY = "empty"  # nothing applied yet (or the kill switch was released)
    PENDING = "pending"  # a commit in progress: the next apply rolls it forward
    COMMITTED = "committed"
    DISABLED = "disabled"  # kill switch pulled: nothing is applied until `loaderd enable`


@dataclass(frozen=True)
class Calls:
    bpf_to_bpf: int = 0
    kfunc: int = 0
    callx: int = 0


@dataclass(frozen=True)
class ProgramRecord:
    name: str
    function: str
    type: ProgType
    id: int
    tag: str
    helpers: tuple[str, ...]
    calls: Calls | None  # None: loaded before call facts were recorded (adopt rebuilds)
    degraded: str | None = None


@dataclass(frozen=True)
class MapRecord:
    name: str
    id: int
    frozen: bool
    access: str = ""  # "", "rdonly", "wronly" (model.map_access)


@dataclass(frozen=True)
class LinkRecord:
    target: LinkTarget
    id: int
    ifindex: int | None = None  # XDP: the interface at attach time
    # uprobe: the binary's inode and sha256 at attach (drift: replaced under the same path)
    binary_ino: int | None = None
    binary_sha256: str | None = None


@dataclass(frozen=True)
class SpecRecord:
    name: str
    file: str
    sha256: str
    pin_dir: str
    programs: Mapping[str, ProgramRecord]
    maps: Mapping[str, MapRecord]
    links: Mapping[str, LinkRecord] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    txid: str | None = None
    deferred_links: tuple[str, ...] = ()
    events: Mapping[str, str] = field(default_factory=dict)  # ring map -> record layout
    object_sha256: str | None = None  # source.object: the loaded ELF's sha256
    signature: SignatureFacts | None = None  # the spec's signature check at the last apply


@dataclass(frozen=True)
class LastApply:
    at: float
    compiles: int
    built: tuple[str, ...]
    adopted: tuple[str, ...]
    duration: float | None = None  # seconds from the lock taken to the manifest saved


@dataclass(frozen=True)
class Manifest:
    status: Status = Status.EMPTY
    txid: str | None = None
    specs: Mapping[str, SpecRecord] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    written_at: float | None = None
    last_apply: LastApply | None = None


EMPTY = Manifest()


# --- reading ------------------------------------------------------------------------------------

class _Bad(Exception):
    """A malformed field; becomes one LoaderdError naming the manifest and the field."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(what)
        self.where, self.what = where, what


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad(where, "expected an object")
    return v


def _int(v: Any, where: str, *, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum or v >= 1 << 63:
        raise _Bad(where, "expected a non-negative integer")
    return v


def _str(v: Any, where: str, *, pattern: re.Pattern[str] | None = None, limit: int = 4096
         ) -> str:
    if not isinstance(v, str) or len(v) > limit or "\0" in v:
        raise _Bad(where, "expected a string")
    if pattern is not None and not pattern.fullmatch(v):
        raise _Bad(where, f"not a valid value: {v[:80]!r}")
    return v


def _opt(v: Any, where: str, parse: Any) -> Any:
    return None if v is None else parse(v, where)


def _names(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise _Bad(where, "expected a list")
    return tuple(_str(x, f"{where}[{i}]", pattern=SAFE_NAME) for i, x in enumerate(v))


def _keyed(v: Any, where: str) -> dict[str, dict[str, Any]]:
    d = _obj(v, where)
    for k in d:
        _str(k, f"{where}: key", pattern=SAFE_NAME)
    return {k: _obj(x, f"{where}.{k}") for k, x in d.items()}


def _path(v: Any, where: str) -> str:
    p = _str(v, where)
    if not os.path.isabs(p) or "\n" in p:
        raise _Bad(where, f"not an absolute path: {p[:80]!r}")
    return p


def _program(name: str, d: dict[str, Any], where: str) -> ProgramRecord:
    try:
        ptype = ProgType(str(d.get("type")))
    except ValueError:
        raise _Bad(f"{where}.type", "unknown program type") from None
    calls = None
    if "calls" in d:
        c = _obj(d["calls"], f"{where}.calls")
        calls = Calls(*(_int(c.get(k, 0), f"{where}.calls.{k}")
                        for k in ("bpf_to_bpf", "kfunc", "callx")))
    if _str(d.get("name"), f"{where}.name") != name:
        raise _Bad(f"{where}.name", "differs from its key")
    return ProgramRecord(
        name=name, function=_str(d.get("function"), f"{where}.function", pattern=SAFE_NAME),
        type=ptype, id=_int(d.get("id"), f"{where}.id", minimum=1),
        tag=_str(d.get("tag"), f"{where}.tag", pattern=re.compile(r"[0-9a-f]{16}")),
        helpers=tuple(_str(h, f"{where}.helpers", pattern=_HELPER)
                      for h in _list(d.get("helpers", []), f"{where}.helpers")),
        calls=calls, degraded=_opt(d.get("degraded"), f"{where}.degraded", _str))


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise _Bad(where, "expected a list")
    return v


def _map(name: str, d: dict[str, Any], where: str) -> MapRecord:
    if not isinstance(d.get("frozen"), bool):
        raise _Bad(f"{where}.frozen", "expected true or false")
    access = d.get("access", "")
    if access not in ("", "rdonly", "wronly"):
        raise _Bad(f"{where}.access", "expected '', 'rdonly' or 'wronly'")
    return MapRecord(name, _int(d.get("id"), f"{where}.id", minimum=1), d["frozen"], access)


def _link(d: dict[str, Any], where: str) -> LinkRecord:
    try:
        tgt = parse_target(_str(d.get("target"), f"{where}.target"))
    except ValueError as exc:
        raise _Bad(f"{where}.target", str(exc)) from None
    # ifindex 0 is no interface: the writer leaves it out, so read it as absent (round trip)
    return LinkRecord(tgt, _int(d.get("id"), f"{where}.id", minimum=1),
                      _opt(d.get("ifindex"), f"{where}.ifindex", _int) or None,
                      _opt(d.get("binary_ino"), f"{where}.binary_ino", _int),
                      _opt(d.get("binary_sha256"), f"{where}.binary_sha256", _str))


_PRINTABLE = re.compile(r"[\x20-\x7e]{1,512}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _signature(v: Any, where: str) -> SignatureFacts:
    d = _obj(v, where)
    try:
        status = SignatureStatus(str(d.get("status")))
    except ValueError:
        raise _Bad(f"{where}.status", f"unknown status {str(d.get('status'))[:40]!r}") from None

    def text(key: str, pattern: re.Pattern[str] = _PRINTABLE) -> str | None:
        got: str | None = _opt(d.get(key), f"{where}.{key}",
                               lambda x, w: _str(x, w, pattern=pattern))
        return got
    return SignatureFacts(status, text("principal"), text("fingerprint"), text("key_type"),
                          text("namespace"), text("signed_sha256", _SHA256),
                          _opt(d.get("counter"), f"{where}.counter", _int))


def signature_dict(f: SignatureFacts) -> dict[str, Any]:
    return {"status": f.status.value, "principal": f.principal, "fingerprint": f.fingerprint,
            "key_type": f.key_type, "namespace": f.namespace,
            "signed_sha256": f.signed_sha256, "counter": f.counter}


def _spec(name: str, d: dict[str, Any], where: str, pin_root: str | None) -> SpecRecord:
    pin_dir = _path(d.get("pin_dir"), f"{where}.pin_dir")
    expected = os.path.join(pin_root, name) if pin_root else None
    if (os.path.normpath(pin_dir) != pin_dir.rstrip("/") or ".." in pin_dir.split("/")
            or (expected and os.path.normpath(pin_dir) != os.path.normpath(expected))
            or os.path.basename(pin_dir) != name):
        raise _Bad(f"{where}.pin_dir",
                   f"{pin_dir[:80]!r} is not {expected or '<pin root>/' + name}")
    if _str(d.get("name", name), f"{where}.name") != name:
        raise _Bad(f"{where}.name", "differs from its key")
    programs = {k: _program(k, v, f"{where}.programs.{k}")
                for k, v in _keyed(d.get("programs", {}), f"{where}.programs").items()}
    links = {k: _link(v, f"{where}.links.{k}")
             for k, v in _keyed(d.get("links", {}), f"{where}.links").items()}
    deferred = _names(d.get("deferred_links", []), f"{where}.deferred_links")
    for k in (*links, *deferred):
        if link_program(k) not in programs:
            raise _Bad(f"{where}.links", f"link for unknown program {k!r}")
    for k in deferred:
        if k not in links or not links[k].target.exclusive:
            raise _Bad(f"{where}.deferred_links", f"{k!r} has no exclusive link to update")
    events = _obj(d.get("events", {}), f"{where}.events")
    return SpecRecord(
        name=name, file=_path(d.get("file"), f"{where}.file"),
        sha256=_str(d.get("sha256"), f"{where}.sha256", pattern=re.compile(r"[0-9a-f]{64}")),
        pin_dir=pin_dir, programs=programs,
        maps={k: _map(k, v, f"{where}.maps.{k}")
              for k, v in _keyed(d.get("maps", {}), f"{where}.maps").items()},
        links=links,
        sources=tuple(_path(s, f"{where}.sources") for s in _list(d.get("sources", []),
                                                                  f"{where}.sources")),
        txid=_opt(d.get("txid"), f"{where}.txid",
                  lambda v, w: _str(v, w, pattern=TXID)),
        deferred_links=deferred,
        events={_str(k, f"{where}.events", pattern=SAFE_NAME):
                _str(v, f"{where}.events.{k}", limit=1024) for k, v in events.items()},
        object_sha256=_opt(d.get("object_sha256"), f"{where}.object_sha256",
                           lambda v, w: _str(v, w, pattern=re.compile(r"[0-9a-f]{64}"))),
        signature=_opt(d.get("signature"), f"{where}.signature", _signature))


def parse(data: bytes, path: str, pin_root: str | None = None) -> Manifest:
    """Typed records from the manifest's bytes; one located error if anything is off."""
    try:
        top = _obj(json.loads(data), "manifest")
        if top.get("version", 1) != 1:
            raise _Bad("version", "unknown manifest version")
        try:
            status = Status(str(top.get("status")))
        except ValueError:
            raise _Bad("status", f"unknown status {str(top.get('status'))[:40]!r}") from None
        txid = _opt(top.get("txid"), "txid", lambda v, w: _str(v, w, pattern=TXID))
        if status == Status.PENDING and txid is None:
            raise _Bad("txid", "a pending commit needs its txid")
        last = None
        if top.get("last_apply") is not None:
            la = _obj(top["last_apply"], "last_apply")
            at = la.get("at")
            if isinstance(at, bool) or not isinstance(at, int | float):
                raise _Bad("last_apply.at", "expected a time")
            took = la.get("duration")
            if took is not None and (isinstance(took, bool) or not isinstance(took, int | float)
                                     or not 0 <= took < 1e6):
                raise _Bad("last_apply.duration", "expected seconds")
            last = LastApply(float(at), _int(la.get("compiles", 0), "last_apply.compiles"),
                             _names(la.get("built", []), "last_apply.built"),
                             _names(la.get("adopted", []), "last_apply.adopted"),
                             None if took is None else float(took))
        written = top.get("written_at")
        if written is not None and (isinstance(written, bool)
                                    or not isinstance(written, int | float)):
            raise _Bad("written_at", "expected a time")
        return Manifest(
            status=status, txid=txid,
            specs={k: _spec(k, v, f"specs.{k}", pin_root)
                   for k, v in _keyed(top.get("specs", {}), "specs").items()},
            removed=_names(top.get("removed", []), "removed"),
            written_at=None if written is None else float(written), last_apply=last)
    except _Bad as bad:
        raise LoaderdError(Kind.STATE, f"manifest is malformed: {bad.what}",
                           Location(path, field=bad.where),
                           allowed="a manifest written by loaderd; move it aside and run "
                           "`loaderd apply` to rebuild the applied set") from None
    except (ValueError, RecursionError) as exc:  # JSON syntax, bad UTF-8, absurd nesting
        raise LoaderdError(Kind.STATE, f"manifest is not valid JSON: {str(exc)[:120]}",
                           Location(path), allowed="move it aside and run `loaderd apply`"
                           ) from None


def read(path: str, pin_root: str | None = None, *, owners: frozenset[int] | None = None
         ) -> Manifest | None:
    """The manifest at `path` (None if absent). owners: uids allowed to own it (default: root
    and the owner of its directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise  # a reader outside the readers' group: the caller says what it shows instead
    except OSError as exc:
        why = ("is a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc))
        raise LoaderdError(Kind.STATE, f"manifest unreadable: {why}", Location(path),
                           allowed="a regular file written by loaderd") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoaderdError(Kind.STATE, "manifest is not a regular file", Location(path),
                               allowed="remove it; loaderd writes a regular file")
        if owners is None:
            owners = frozenset({0, os.stat(os.path.dirname(path) or ".").st_uid})
        if st.st_uid not in owners:
            raise LoaderdError(Kind.STATE, f"manifest is owned by uid {st.st_uid}",
                               Location(path), allowed="owned by root or the state directory's"
                               " owner")
        if st.st_size > MAX_BYTES:
            raise LoaderdError(Kind.STATE, f"manifest is {st.st_size} bytes", Location(path),
                               allowed=f"at most {MAX_BYTES} bytes")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_BYTES:
                raise LoaderdError(Kind.STATE, "manifest grew past its size bound while read",
                                   Location(path), allowed=f"at most {MAX_BYTES} bytes")
    finally:
        os.close(fd)
    return parse(b"".join(chunks), path, pin_root)


# --- writing ------------------------------------------------------------------------------------

def _program_dict(p: ProgramRecord) -> dict[str, Any]:
    d: dict[str, Any] = {"name": p.name, "function": p.function, "type": p.type.value,
                         "id": p.id, "tag": p.tag, "helpers": list(p.helpers),
                         "degraded": p.degraded}
    if p.calls is not None:
        d["calls"] = {"bpf_to_bpf": p.calls.bpf_to_bpf, "kfunc": p.calls.kfunc,
                      "callx": p.calls.callx}
    return d


def spec_dict(s: SpecRecord) -> dict[str, Any]:
    return {
        "name": s.name, "file": s.file, "sha256": s.sha256, "pin_dir": s.pin_dir,
        "programs": {k: _program_dict(p) for k, p in s.programs.items()},
        "maps": {k: {"name": m.name, "id": m.id, "frozen": m.frozen, "access": m.access}
                 for k, m in s.maps.items()},
        "links": {k: {"target": lk.target.text, "id": lk.id,
                      **({"ifindex": lk.ifindex} if lk.ifindex else {}),
                      **({"binary_ino": lk.binary_ino, "binary_sha256": lk.binary_sha256}
                         if lk.binary_ino is not None else {})}
                  for k, lk in s.links.items()},
        "sources": list(s.sources), "txid": s.txid, "deferred_links": list(s.deferred_links),
        "events": dict(s.events),
        **({"object_sha256": s.object_sha256} if s.object_sha256 else {}),
        **({"signature": signature_dict(s.signature)} if s.signature else {})}


def to_dict(m: Manifest) -> dict[str, Any]:
    d: dict[str, Any] = {"version": 1, "status": m.status.value, "txid": m.txid,
                         "specs": {k: spec_dict(s) for k, s in m.specs.items()},
                         "removed": list(m.removed)}
    if m.written_at is not None:
        d["written_at"] = m.written_at
    if m.last_apply is not None:
        la = m.last_apply
        d["last_apply"] = {"at": la.at, "compiles": la.compiles, "built": list(la.built),
                           "adopted": list(la.adopted)}
        if la.duration is not None:
            d["last_apply"]["duration"] = la.duration
    return d
