"""The one message a compile worker sends its parent: JSON, checked field by field.

The worker is the confined side: whatever it sends is untrusted input to the unconfined parent
(a worker taken over through a compiler bug must gain nothing by lying), so no pickle, bounded
sizes, known kinds, and names that must be the spec's own.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import Spec
from loaderd.stage.worker import StagedProgram, StagedSpec

MAX_TEXT = 64 * 1024


class WireError(ValueError):
    """The worker's message is malformed."""


def encode(kind: str, **fields: Any) -> bytes:
    return json.dumps({"kind": kind, **fields}).encode()


def built(staged: StagedSpec, progs: list[str], maps: list[str]) -> bytes:
    return encode("built", staged=dataclasses.asdict(staged), progs=progs, maps=maps)


def error(exc: LoaderdError, debug: str | None = None) -> bytes:
    loc = exc.location
    value = exc.value if isinstance(exc.value, (str, int)) and not isinstance(
        exc.value, bool) else (None if exc.value is None else str(exc.value))
    return encode("error", error={
        "kind": exc.kind.value, "message": exc.message, "value": value,
        "allowed": exc.allowed, "detail": exc.detail,
        "location": [loc.file, loc.line, loc.column, loc.field]}, debug=debug)


def _text(v: Any, what: str, *, optional: bool = False) -> Any:
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise WireError(f"{what}: not a string of at most {MAX_TEXT} characters")
    return v


def _int(v: Any, what: str, *, optional: bool = False) -> Any:
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
        raise WireError(f"{what}: not a non-negative integer")
    return v


def decode(data: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or msg.get("kind") not in ("built", "error", "oom", "fault"):
        raise WireError("unknown message kind")
    return msg


def decode_error(msg: dict[str, Any]) -> tuple[LoaderdError, str | None]:
    e = msg.get("error")
    if not isinstance(e, dict):
        raise WireError("error: not an object")
    try:
        kind = Kind(str(e.get("kind")))
    except ValueError:
        raise WireError("error.kind: unknown") from None
    loc = e.get("location")
    if not isinstance(loc, list) or len(loc) != 4:
        raise WireError("error.location: not [file, line, column, field]")
    value = e.get("value")
    if isinstance(value, str):
        _text(value, "error.value")
    elif value is not None:
        _int(value, "error.value")
    return LoaderdError(
        kind, _text(e.get("message"), "error.message"),
        Location(_text(loc[0], "file", optional=True), _int(loc[1], "line", optional=True),
                 _int(loc[2], "column", optional=True), _text(loc[3], "field", optional=True)),
        value=value, allowed=_text(e.get("allowed"), "error.allowed", optional=True),
        detail=_text(e.get("detail"), "error.detail", optional=True),
    ), _text(msg.get("debug"), "debug", optional=True)


def decode_built(msg: dict[str, Any], spec: Spec) -> tuple[StagedSpec, list[str], list[str]]:
    """The staged facts and the order of the fds that came with them. Every program of the spec
    exactly once; maps: the spec's own names (the parent checks them against the kernel)."""
    raw, progs, maps = msg.get("staged"), msg.get("progs"), msg.get("maps")
    if not isinstance(raw, dict) or not isinstance(progs, list) or not isinstance(maps, list):
        raise WireError("built: staged, progs and maps missing")
    want_progs = [p.name for p in spec.programs]
    if sorted(progs) != sorted(want_progs) or sorted(maps) != sorted(m.name for m in spec.maps):
        raise WireError("built: programs or maps are not the spec's")
    staged = StagedSpec(spec.name, spec.path, spec.sha256, object_sha256=spec.object_sha256,
                        warnings=_text(raw.get("warnings"), "warnings", optional=True))
    programs = raw.get("programs")
    if not isinstance(programs, dict) or sorted(programs) != sorted(want_progs):
        raise WireError("built: staged.programs are not the spec's")
    for name, p in programs.items():
        if not isinstance(p, dict):
            raise WireError(f"program {name}: not an object")
        helpers = p.get("helpers")
        calls = p.get("calls")
        if not isinstance(helpers, list) or not isinstance(calls, dict):
            raise WireError(f"program {name}: helpers/calls")
        staged.programs[name] = StagedProgram(
            name=name, function=_text(p.get("function"), "function"),
            type=_text(p.get("type"), "type"), id=_int(p.get("id"), "id"),
            tag=_text(p.get("tag"), "tag"),
            helpers=[_text(h, "helper") for h in helpers],
            degraded=_text(p.get("degraded"), "degraded", optional=True),
            calls={_text(k, "call"): _int(v, "call count") for k, v in calls.items()})
    return staged, progs, maps
