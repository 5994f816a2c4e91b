"""Daemon settings (`/etc/loaderd/loaderd.yaml`) into a typed `Settings`.

Same path as specs: file trust (root-owned, like sshd_config) -> safe YAML -> JSON Schema ->
rules a schema cannot express (user names, octal modes, dangerous helpers) -> the trust walk
of programs_dir and state_dir (config.trust.walk_dir: every directory on the way, through
symlinks, root's; state_dir itself root's or the service user's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pwd
from typing import Any

from loaderd.config import schema as schemacheck
from loaderd.config import signature, trust, yamlsafe
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
    SignatureMode,
    SignaturePolicy,
)
from loaderd.sanitize import Rules

SCHEMA = "settings.schema.json"
MAX_BYTES = 64 * 1024
SERVICE_USER = "loaderd"  # sysusers.d: the account the units run as (`service_user:`)
# state_dir may not be one of these (loaderd writes its manifest, lock and generations
# there, and root hands the directory's contents to the service user) nor lie below the trees.
_SYSTEM_DIRS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64",
                          "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv",
                          "/sys", "/tmp", "/usr", "/var", "/var/lib", "/var/log", "/var/tmp"})
_SYSTEM_TREES = ("/boot", "/dev", "/etc", "/proc", "/sys", "/usr")


class _Ctx:
    def __init__(self, path: str, marks: Marks) -> None:
        self.path, self.marks = path, marks

    def error(self, at: Path, message: str, *, value: Any = None, allowed: str | None = None,
              kind: Kind = Kind.SEMANTIC) -> LoaderdError:
        mark = self.marks.keys.get(at) or self.marks.at(at)
        line, col = mark if mark else (None, None)
        return LoaderdError(kind, message,
                            Location(self.path, line, col, yamlsafe.field_name(at) or None),
                            value=schemacheck.short(value), allowed=allowed)


def _uid(ctx: _Ctx, name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ctx.error(("config_owner",), "no such user", value=name) from None


def _paths(ctx: _Ctx, data: dict[str, Any]) -> None:
    for key in ("programs_dir", "bpffs_root", "state_dir", "metrics_dir"):
        if data.get(key) is not None and os.path.normpath(data[key]) != data[key]:
            raise ctx.error((key,), "path must be normalized (no '.', '..', '//' or trailing "
                            "'/')", value=data[key])


def _service_uids(ctx: _Ctx, data: dict[str, Any]) -> frozenset[int]:
    """Who may own state_dir: root, the service user and (not root) whoever runs this."""
    uids = {0} if os.geteuid() == 0 else {0, os.geteuid()}
    name = data.get("service_user", SERVICE_USER)
    try:
        uids.add(pwd.getpwnam(name).pw_uid)
    except KeyError:
        if "service_user" in data:
            raise ctx.error(("service_user",), "no such user", value=name) from None
    return frozenset(uids)


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _walk(ctx: _Ctx, key: str, path: str, uids: frozenset[int],
          last_uids: frozenset[int]) -> str:
    try:
        return trust.walk_dir(path, uids=uids, last_uids=last_uids, allow_missing=True,
                              last_symlink_ok=key != "state_dir")
    except LoaderdError as exc:  # the settings line, and which directory on the way
        raise ctx.error((key,), f"{exc.location.file}: {exc.message}", value=exc.value,
                        allowed=exc.allowed, kind=Kind.TRUST) from None


def _trusted_dirs(ctx: _Ctx, data: dict[str, Any], settings: Settings) -> None:
    """No trusted path passes through a directory others can write (config.trust.walk_dir);
    state_dir is the service user's at most, and holds nothing of the system's or of the
    specs (whoever writes state_dir must not be able to write a spec)."""
    owner = frozenset({0, settings.config_owner_uid})
    programs = _walk(ctx, "programs_dir", settings.programs_dir, owner, owner)
    state = _walk(ctx, "state_dir", settings.state_dir, frozenset({0}),
                  _service_uids(ctx, data))
    for shown in {settings.state_dir, state}:
        if shown in _SYSTEM_DIRS or any(_inside(shown, t) for t in _SYSTEM_TREES):
            raise ctx.error(("state_dir",), "state_dir is a system directory: loaderd writes "
                            "its manifest there and hands it to the service user", value=shown,
                            allowed="a directory of its own, e.g. /var/lib/loaderd",
                            kind=Kind.TRUST)
    for a, b in ((programs, state), (state, programs)):
        if _inside(a, b):
            raise ctx.error(("state_dir",), "state_dir and programs_dir must not contain "
                            "each other (the service user writes state_dir, and must not "
                            "write specs)", value=state, allowed="separate directories",
                            kind=Kind.TRUST)


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


def _signatures(ctx: _Ctx, raw: dict[str, Any], owner_uid: int | None) -> SignaturePolicy:
    """signatures: the mode, and the allowed_signers / revoked_keys files read now, with the
    same trust rules as this file (root's, not writable by others, one link)."""
    mode = SignatureMode(raw.get("mode", SignatureMode.OFF.value))
    got: dict[str, bytes] = {}
    for key in ("allowed_signers", "revoked_keys"):
        if key not in raw:
            continue
        path = raw[key]
        try:
            got[key] = trust.read_file(path, owner_uid=owner_uid,
                                       root_dir=os.path.dirname(path),
                                       max_bytes=signature.MAX_LIST_BYTES)
        except LoaderdError as exc:
            raise ctx.error(("signatures", key), f"{exc.location.file}: {exc.message}",
                            value=exc.value, allowed=exc.allowed, kind=Kind.TRUST) from None
        if len(got[key]) > signature.MAX_LIST_BYTES:
            raise ctx.error(("signatures", key), "file too large", value=path,
                            allowed=f"<= {signature.MAX_LIST_BYTES} bytes", kind=Kind.LIMIT)
    if mode is not SignatureMode.OFF and "allowed_signers" not in got:
        raise ctx.error(("signatures", "mode"), f"signatures.mode {mode.value} needs "
                        "signatures.allowed_signers (whose keys may sign specs)",
                        allowed="an allowed_signers file in ssh-keygen(1) format")
    signers = (signature.parse_allowed_signers(got["allowed_signers"], raw["allowed_signers"])
               if "allowed_signers" in got else ())
    revoked = (signature.parse_revoked(got["revoked_keys"], raw["revoked_keys"])
               if "revoked_keys" in got else frozenset())
    digest = hashlib.sha256()
    for key in ("allowed_signers", "revoked_keys"):
        digest.update(hashlib.sha256(got.get(key, b"")).digest())
    return SignaturePolicy(mode=mode, allowed_signers=raw.get("allowed_signers"),
                           revoked_keys=raw.get("revoked_keys"), signers=signers,
                           revoked=revoked, files_sha256=digest.hexdigest())


def _parse(path: str, raw: bytes, *, check_dirs: bool, owner_uid: int | None = 0
           ) -> Settings:
    data, marks = yamlsafe.load(raw, file=path, max_bytes=MAX_BYTES)
    ctx = _Ctx(path, marks)
    mode = data.get("pins", {}).get("mode") if isinstance(data, dict) and isinstance(
        data.get("pins"), dict) else None
    if isinstance(mode, int) and not isinstance(mode, bool):
        # YAML reads 0640 as the octal int 416: say how to write it instead of "not a string".
        raise ctx.error(("pins", "mode"), "write the mode as a quoted octal string",
                        value=mode, allowed='"0640"')
    # The validation cache lives in the state dir these settings name (only read here: its
    # keys say what passed before; the directory's trust is checked below as always).
    state_dir = data.get("state_dir") if isinstance(data, dict) else None
    schemacheck.use_cache(state_dir if isinstance(state_dir, str) else Settings.state_dir)
    errors = schemacheck.validate(data, SCHEMA, marks=marks, file=path)
    if errors:
        raise errors[0]
    _paths(ctx, data)
    defaults = Settings()
    settings = Settings(
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
        signatures=_signatures(ctx, data.get("signatures", {}), owner_uid),
        metrics_dir=data.get("metrics_dir", defaults.metrics_dir),
        path=path)
    if check_dirs:
        _trusted_dirs(ctx, data, settings)
    return settings


def load_settings(path: str | None = None, *, owner_uid: int | None = 0) -> Settings:
    """Settings from `path`; None means no file: the built-in defaults. The file must be
    owned by root (owner_uid; None skips ownership checks for non-root `loaderd check`)."""
    if path is None:
        settings = Settings()
        if owner_uid is not None:
            _trusted_dirs(_Ctx("built-in settings", Marks()), {}, settings)
        return settings
    root = os.path.dirname(os.path.abspath(path))
    try:
        raw = trust.read_file(path, owner_uid=owner_uid, root_dir=root, max_bytes=MAX_BYTES)
        parsed = _parse(path, raw, check_dirs=owner_uid is not None, owner_uid=owner_uid)
    except LoaderdError as exc:
        raise exc.with_file(path) from None
    whole = hashlib.sha256(raw + b"\0" + parsed.signatures.files_sha256.encode()).hexdigest()
    return dataclasses.replace(parsed, sha256=whole)


DEFAULT_CONFIG = "/etc/loaderd/loaderd.yaml"


def load_default(config: str | None, *, check_owner: bool = True) -> Settings:
    """The given file; else /etc/loaderd/loaderd.yaml if it exists; else the defaults."""
    if config is None and os.path.exists(DEFAULT_CONFIG):
        config = DEFAULT_CONFIG
    return load_settings(config, owner_uid=0 if check_owner else None)
