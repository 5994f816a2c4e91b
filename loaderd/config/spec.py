"""Spec files into typed, immutable `Spec` objects.

Order (each step only sees input the previous one accepted): file trust -> safe YAML ->
JSON Schema -> source file trust -> semantic rules -> C source text checks.
Every problem found in one file is collected (at most errors.MAX_PER_FILE shown, the rest
counted in one "and N more"); `load_spec` raises the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

from loaderd import layout
from loaderd.config import schema as schemacheck
from loaderd.config import semantic, signature, trust, yamlsafe
from loaderd.config import source as srccheck
from loaderd.config.semantic import Collector
from loaderd.config.yamlsafe import Path
from loaderd.errors import Kind, LoaderdError, Location, cap_per_file
from loaderd.model import (
    NAME_RE,
    SCALAR_TYPES,
    CType,
    HistKind,
    Histogram,
    Limits,
    MapFlag,
    MapSpec,
    MapType,
    ProgramSpec,
    ProgType,
    Settings,
    SignatureFacts,
    SignaturePolicy,
    SignatureStatus,
    Spec,
)

SAFE_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,250}\.yaml")
SCHEMA = "spec.schema.json"
_NO_KEY_VALUE = CType(None, 0)  # ringbuf / perf_event_array: the kernel fixes the sizes


def _ctype(f: Collector, at: Path, raw: Any) -> CType:
    if isinstance(raw, str):
        return CType(raw, SCALAR_TYPES[raw][0])
    if "struct" in raw:
        try:
            return layout.struct_ctype(layout.parse_fields(raw["struct"]))
        except LoaderdError as exc:
            f.add(Kind.SEMANTIC, (*at, "struct"), exc.message, value=exc.value,
                  allowed=exc.allowed)
            return CType(None, 1)
    return CType(None, int(raw["bytes"]))


def _events(f: Collector, i: int, raw: dict[str, Any]) -> str | None:
    """The events layout in its text form (the manifest keeps it; the daemon parses it)."""
    if "events" not in raw:
        return None
    try:
        return layout.layout_text(layout.parse_fields(raw["events"]["layout"]))
    except LoaderdError as exc:
        f.add(Kind.SEMANTIC, ("maps", i, "events", "layout"), exc.message, value=exc.value,
              allowed=exc.allowed)
        return None


def _build_map(f: Collector, i: int, raw: dict[str, Any]) -> MapSpec:
    mtype = MapType(raw["type"])
    fixed = mtype.kind.fixed
    key = _NO_KEY_VALUE if fixed else _ctype(f, ("maps", i, "key"), raw["key"])
    value = _NO_KEY_VALUE if fixed else _ctype(f, ("maps", i, "value"), raw["value"])
    hist = raw.get("histogram")
    m = MapSpec(name=raw["name"], type=mtype, key=key, value=value,
                max_entries=raw["max_entries"],
                flags=frozenset(MapFlag(x) for x in raw.get("flags", [])),
                freeze=raw.get("freeze", False), preserve=raw.get("preserve", False),
                events=_events(f, i, raw),
                histogram=None if hist is None else Histogram(
                    HistKind(hist["kind"]), hist.get("unit", "value"), hist.get("step", 1)),
                line=f.line(("maps", i)))
    return dataclasses.replace(m, initial=semantic.map_rules(f, i, m, raw.get("initial", [])))


def _build_program(f: Collector, i: int, raw: dict[str, Any]) -> ProgramSpec:
    ptype = ProgType(raw["type"])
    return ProgramSpec(name=raw["name"], type=ptype,
                       attach=ptype.kind.attach.from_spec(raw.get("attach")),
                       fallback=tuple(raw.get("fallback", [])), line=f.line(("programs", i)))


def _spec_name(f: Collector, data: dict[str, Any], shown: str) -> str:
    if "name" in data:
        return str(data["name"])
    stem = os.path.basename(shown).removesuffix(".yaml")
    if NAME_RE.fullmatch(stem) is None:
        f.add(Kind.SEMANTIC, ("name",), f"the file name {stem[:60]!r} is not a valid spec "
              "name; add a `name:` key", allowed=NAME_RE.pattern)
    return stem


def _read_source(f: Collector, data: dict[str, Any], limits: Limits, owner_uid: int | None,
                 pins_required: bool, base: str) -> tuple[bytes, str | None, int] | None:
    """(C bytes, C file path or None, line of its first line in its file)."""
    src = data["source"]
    kinds = [k for k in ("file", "inline", "object") if k in src]
    if len(kinds) != 1 or ("sha256" in src and "inline" in src):
        f.add(Kind.SCHEMA, ("source",), "exactly one of 'file' or 'inline' or 'object' is "
              "required ('sha256' goes with 'file' or 'object')", value=sorted(src),
              allowed="{file: x.bpf.c, sha256: ...}, {object: x.bpf.o, sha256: ...} or "
              "{inline: ...}")
        return None
    if "inline" in src:
        raw = src["inline"].encode("utf-8")
        at = ("source", "inline")
        mark = f.marks.values.get(at)
        first = (mark[0] + 1 if at in f.marks.literal else mark[0]) if mark else 1
        if len(raw) > limits.max_source_bytes:
            f.add(Kind.LIMIT, at, f"inline source is {len(raw)} bytes",
                  allowed=f"<= {limits.max_source_bytes} bytes")
            return None
        return raw, None, first
    kind = "object" if "object" in src else "file"
    at = ("source", kind)
    limit = limits.max_object_bytes if kind == "object" else limits.max_source_bytes
    try:
        real = trust.check_relative(src[kind], base)
        raw = trust.read_file(real, owner_uid=owner_uid, root_dir=base, max_bytes=limit)
    except LoaderdError as exc:
        # Point at the spec's `source.file:` line; keep which file/dir failed in the message.
        if exc.location.file is not None and exc.location.field is None:
            exc.message = f"{exc.location.file}: {exc.message}"
        exc.location = f.loc(at)
        f.errors.append(exc)
        return None
    if len(raw) > limit:
        f.add(Kind.LIMIT, at, f"source {kind} is too large", value=src[kind],
              allowed=f"<= {limit} bytes")
        return None
    pin = signature.check_pin(src.get("sha256"), raw, required=pins_required)
    if pin is not None:
        f.add(Kind.SIGNATURE, ("source", "sha256") if "sha256" in src else at, pin,
              value=src[kind])
        return None
    if kind == "object" and not raw.startswith(b"\x7fELF"):
        f.add(Kind.SEMANTIC, at, "source.object is not an ELF object", value=src[kind],
              allowed="a BPF object built with clang -target bpf -g -O2")
        return None
    return raw, real, 1


def _decode_source(f: Collector, raw: bytes, where: str | None) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        f.errors.append(LoaderdError(Kind.SEMANTIC, "C source is not valid UTF-8",
                                     Location(where or f.path, line)))
        return None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        f.errors.append(LoaderdError(Kind.SEMANTIC, "C source contains a NUL byte",
                                     Location(where or f.path, line)))
        return None
    return text


def _read_signature(path: str, yaml_bytes: bytes, root: str, owner_uid: int | None,
                    policy: SignaturePolicy, shown: str) -> tuple[bytes | None, SignatureFacts]:
    """The `<spec>.sig` beside the spec (same trust rules) and its verdict, before the YAML
    is parsed: in enforce mode nothing unsigned reaches the parser. `shown`: where the spec
    lives (its temp copy's signature is beside the destination)."""
    sig_path = shown + signature.SUFFIX
    if shown != path:
        root = os.path.dirname(os.path.abspath(shown))
    sig = None
    if os.path.lexists(sig_path):
        sig = trust.read_file(sig_path, owner_uid=owner_uid, root_dir=root,
                              max_bytes=signature.MAX_SIG_BYTES)
    return sig, signature.check(path, yaml_bytes, sig, policy)


def parse_spec(path: str, *, limits: Limits, owner_uid: int | None = 0,
               root_dir: str | None = None, signatures: SignaturePolicy | None = None,
               as_path: str | None = None) -> tuple[Spec | None, list[LoaderdError]]:
    """The Spec in `path`, or every error found in it (never both). `as_path`: where the file
    is going to live (`loaderd check --as`, Ansible's `validate:` checks a temp copy): the
    spec's name, when it has no `name:`, its relative source file and its `.sig` (deployed
    before the spec) come from there."""
    root = root_dir or os.path.dirname(os.path.abspath(path))
    policy = signatures or SignaturePolicy()
    try:
        yaml_bytes = trust.read_file(path, owner_uid=owner_uid, root_dir=root,
                                     max_bytes=limits.max_spec_bytes)
        sig_bytes, sig_facts = _read_signature(path, yaml_bytes, root, owner_uid, policy,
                                               as_path or path)
        data, marks = yamlsafe.load(yaml_bytes, file=path, max_bytes=limits.max_spec_bytes)
    except LoaderdError as exc:
        return None, [exc.with_file(path)]
    errors = schemacheck.validate(data, SCHEMA, marks=marks, file=path)
    if errors:
        return None, cap_per_file(errors)
    f = Collector(path, marks)
    name = _spec_name(f, data, as_path or path)
    maps = tuple(_build_map(f, i, m) for i, m in enumerate(data.get("maps", [])))
    programs = tuple(_build_program(f, i, p) for i, p in enumerate(data["programs"]))
    pins_required = policy.requires_pins or sig_facts.status is not SignatureStatus.UNSIGNED
    got = _read_source(f, data, limits, owner_uid, pins_required,
                       os.path.dirname(os.path.abspath(as_path or path)))
    is_object = "object" in data["source"]
    text = ("" if is_object else _decode_source(f, got[0], got[1])) if got else None
    semantic.names(f, maps, programs)
    semantic.orders(f, name, programs)
    params = semantic.params(f, data.get("params", {}), is_object)
    if is_object:
        semantic.object_rules(f, programs)
    elif got and text is not None:
        semantic.fallbacks(f, maps, programs, text)
        semantic.btf_names(f, programs)
        field = None if got[1] else "source.inline"
        found = srccheck.check_source(text, file=got[1] or path, first_line=got[2],
                                      field=field)
        if field and ("source", "inline") not in f.marks.literal:
            # A quoted or folded scalar's C lines are not the YAML's: point at the scalar.
            for e in found:
                e.location = dataclasses.replace(e.location, line=got[2], column=None)
        f.errors += found
    if f.errors or got is None or text is None:
        return None, cap_per_file(f.errors)
    digest = hashlib.sha256(yaml_bytes + b"\0" + got[0]).hexdigest()
    return Spec(name=name, path=path, source=text, source_path=got[1], maps=maps,
                programs=programs, sha256=digest, description=data.get("description", ""),
                marks=dict(marks.keys), yaml_bytes=yaml_bytes,
                source_bytes=got[0] if got[1] else b"",
                source_ref=data["source"].get("file", data["source"].get("object")),
                object_sha256=hashlib.sha256(got[0]).hexdigest() if is_object else None,
                params=params,
                source_line=got[2] if got[1] or ("source", "inline") in f.marks.literal
                else 1, signature_bytes=sig_bytes, signature=sig_facts), []


def load_spec(path: str, *, limits: Limits, owner_uid: int | None = 0) -> Spec:
    """Load one spec; raise the first problem (owner_uid None skips ownership checks)."""
    spec, errors = parse_spec(path, limits=limits, owner_uid=owner_uid)
    if errors or spec is None:
        raise errors[0]
    return spec


def load_dir(directory: str, settings: Settings, *, check_owner: bool = True,
             ) -> tuple[list[Spec], list[LoaderdError]]:
    """Every `*.yaml` spec in `directory`, in name order, and every error found in any."""
    try:
        names = sorted(n for n in os.listdir(directory)
                       if n.endswith(".yaml") and not n.startswith("."))
    except OSError as exc:
        return [], [LoaderdError(Kind.TRUST, f"cannot read directory: {exc.strerror}",
                                 Location(directory))]
    owner = settings.config_owner_uid if check_owner else None
    specs: list[Spec] = []
    errors: list[LoaderdError] = []
    seen: dict[str, str] = {}
    for name in names:
        if SAFE_FILE_RE.fullmatch(name) is None:  # it would be printed in every message
            errors.append(LoaderdError(Kind.TRUST, "unsafe spec file name", Location(directory),
                                       value=name[:80], allowed=SAFE_FILE_RE.pattern))
            continue
        path = os.path.join(directory, name)
        spec, errs = parse_spec(path, limits=settings.policy.limits, owner_uid=owner,
                                root_dir=directory, signatures=settings.signatures)
        errors += errs
        if spec is None:
            continue
        if spec.name in seen:
            errors.append(LoaderdError(Kind.SEMANTIC, f"spec name '{spec.name}' is already "
                                       f"used by {seen[spec.name]}",
                                       Location(path, spec.line_of("name"), None, "name")))
            continue
        seen[spec.name] = path
        specs.append(spec)
    return specs, errors
