"""Daemon settings (`/etc/loaderd/loaderd.yaml`) into a typed `Settings`.

Same path as specs: file trust (root-owned, like sshd_config) -> safe YAML -> JSON Schema ->
rules a schema cannot express (user names, octal modes, dangerous helpers).
"""

from __future__ import annotations

import os
import pwd
from typing import Any

from loaderd.config import schema as schemacheck
from loaderd.config import trust, yamlsafe
from loaderd.config.yamlsafe import Marks, Path
from loaderd.errors import Kind, LoaderdError, Location
from loaderd.model import (
    DANGEROUS_HELPERS,
    CompileLimits,
    Limits,
    MapFlag,
    MapType,
    PinOwnership,
    Policy,
    ProgType,
    Settings,
)
from loaderd.sanitize import Rules

SCHEMA = "settings.schema.json"
MAX_BYTES = 64 * 1024


class _Ctx:
    def __init__(self, path: str, marks: Marks) -> None:
        self.path, self.marks = path, marks

    def error(self, at: Path, message: str, *, value: Any = None,
              allowed: str | None = None) -> LoaderdError:
        mark = self.marks.keys.get(at) or self.marks.at(at)
        line, col = mark if mark else (None, None)
        return LoaderdError(Kind.SEMANTIC, message,
                            Location(self.path, line, col, yamlsafe.field_name(at) or None),
                            value=schemacheck.short(value), allowed=allowed)


def _uid(ctx: _Ctx, name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ctx.error(("config_owner",), "no such user", value=name) from None


def _paths(ctx: _Ctx, data: dict[str, Any]) -> None:
    for key in ("programs_dir", "bpffs_root", "state_dir"):
        if key in data and os.path.normpath(data[key]) != data[key]:
            raise ctx.error((key,), "path must be normalized (no '.', '..', '//' or trailing "
                            "'/')", value=data[key])


def _pins(ctx: _Ctx, raw: dict[str, Any]) -> PinOwnership:
    mode = PinOwnership().mode
    if "mode" in raw:
        mode = int(raw["mode"], 8)
        if mode & 0o002:
            raise ctx.error(("pins", "mode"), "pins must not be writable by other",
                            value=raw["mode"], allowed="e.g. 0600, 0640, 0660")
    return PinOwnership(mode=mode, group=raw.get("group"),
                        where=ctx.error(("pins", "group"), "").location)


ByType = dict[ProgType, frozenset[str]]


def _helpers(ctx: _Ctx, raw: dict[str, Any]) -> tuple[frozenset[str] | None, ByType]:
    """policy.helpers: `allow` (None: each type's defaults, model.PROG_KINDS) and `by_type`
    (added to one type: how a gated helper such as probe_read_kernel is turned on)."""
    allow = frozenset(raw["allow"]) if "allow" in raw else None
    lists: list[tuple[Path, list[str]]] = [(("allow",), raw.get("allow", []))]
    lists += [(("by_type", t), n) for t, n in raw.get("by_type", {}).items()]
    for where, names in lists:
        for j, name in enumerate(names):
            at = ("policy", "helpers", *where, j)
            if name.startswith("bpf_"):
                raise ctx.error(at, "write helper names without the bpf_ prefix (enum "
                                "bpf_func_id without BPF_FUNC_)", value=name,
                                allowed=name.removeprefix("bpf_"))
            if name in DANGEROUS_HELPERS and name not in (allow or ()):
                raise ctx.error(at, f"'{name}' is a dangerous helper: only policy.helpers.allow "
                                "can allow it", value=name)
    by_type = {ProgType(t): frozenset(n) for t, n in raw.get("by_type", {}).items()}
    return allow, by_type


def _policy(ctx: _Ctx, raw: dict[str, Any]) -> Policy:
    base = Policy()
    helpers, by_type = _helpers(ctx, raw.get("helpers", {}))
    calls = raw.get("calls", {})
    limits = Limits(**raw.get("limits", {}))
    return Policy(
        program_types=frozenset(ProgType(t) for t in raw.get("program_types", base.program_types)),
        map_types=frozenset(MapType(t) for t in raw.get("map_types", base.map_types)),
        map_flags=frozenset(MapFlag(f) for f in raw.get("map_flags", base.map_flags)),
        helpers=helpers, helpers_by_type=by_type,
        allow_calls=calls.get("bpf_to_bpf", base.allow_calls),
        allow_kfuncs=calls.get("kfunc", base.allow_kfuncs), limits=limits)


def _parse(path: str, raw: bytes) -> Settings:
    data, marks = yamlsafe.load(raw, file=path, max_bytes=MAX_BYTES)
    ctx = _Ctx(path, marks)
    mode = data.get("pins", {}).get("mode") if isinstance(data, dict) and isinstance(
        data.get("pins"), dict) else None
    if isinstance(mode, int) and not isinstance(mode, bool):
        # YAML reads 0640 as the octal int 416: say how to write it instead of "not a string".
        raise ctx.error(("pins", "mode"), "write the mode as a quoted octal string",
                        value=mode, allowed='"0640"')
    errors = schemacheck.validate(data, SCHEMA, marks=marks, file=path)
    if errors:
        raise errors[0]
    _paths(ctx, data)
    defaults = Settings()
    return Settings(
        programs_dir=data.get("programs_dir", defaults.programs_dir),
        bpffs_root=data.get("bpffs_root", defaults.bpffs_root),
        state_dir=data.get("state_dir", defaults.state_dir),
        config_owner_uid=_uid(ctx, data["config_owner"]) if "config_owner" in data
        else defaults.config_owner_uid,
        pins=_pins(ctx, data.get("pins", {})),
        policy=_policy(ctx, data.get("policy", {})),
        sanitize=Rules.from_mapping(data.get("sanitize", {})),  # shape checked by the schema
        compile=CompileLimits(**data.get("compile", {})),  # ranges checked by the schema
        accept_header_mismatch=data.get("accept_header_mismatch",
                                        defaults.accept_header_mismatch),
        path=path)


def load_settings(path: str | None = None, *, owner_uid: int | None = 0) -> Settings:
    """Settings from `path`; None means no file: the built-in defaults. The file must be
    owned by root (owner_uid; None skips ownership checks for non-root `loaderd check`)."""
    if path is None:
        return Settings()
    root = os.path.dirname(os.path.abspath(path))
    try:
        raw = trust.read_file(path, owner_uid=owner_uid, root_dir=root, max_bytes=MAX_BYTES)
        return _parse(path, raw)
    except LoaderdError as exc:
        raise exc.with_file(path) from None


DEFAULT_CONFIG = "/etc/loaderd/loaderd.yaml"


def load_default(config: str | None, *, check_owner: bool = True) -> Settings:
    """The given file; else /etc/loaderd/loaderd.yaml if it exists; else the defaults."""
    if config is None and os.path.exists(DEFAULT_CONFIG):
        config = DEFAULT_CONFIG
    return load_settings(config, owner_uid=0 if check_owner else None)
