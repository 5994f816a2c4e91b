"""Validate parsed YAML against the shipped JSON Schemas; turn each failure into a
LoaderdError that names the file, line, column and field (with a did-you-mean for typos).

Validation cache: jsonschema (and the urllib/attrs/pyrsistent it imports) is 30-50 ms and
~15 MB of every process start, for a verdict that only the data, the schema and loaderd's code
decide. `validated.json` in the state directory lists the sha256 of (loaderd version, schema
name, schema text, the parsed data with its types) for each document that passed in the last
`loaderd apply`; a document whose key is listed is known to pass, and jsonschema is not even
imported. Anything else (a key not listed, data of a type the key cannot encode, a cache file
that is absent, too big, a symlink, not a regular file, writable by group or other, or owned by
anyone but root or the state directory's owner: the manifest's rules) is a miss, and a miss
runs every check. Every other check (semantics, policy, trust, sources) runs every time.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from importlib import resources
from typing import Any

from loaderd import __version__
from loaderd.config.yamlsafe import Marks, Path, field_name
from loaderd.errors import Kind, LoaderdError, Location

CACHE_FILE = "validated.json"
CACHE_MAX_BYTES = 1 << 20
CACHE_MAX_KEYS = 10000
_KEY = re.compile(r"[0-9a-f]{64}")


def _strict_integer(_checker: Any, instance: Any) -> bool:
    # jsonschema counts 1.0 as an integer; a spec's counts and sizes must be written as ints.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _anchored_pattern(validator: Any, pattern: str, instance: Any,
                      schema: dict[str, Any]) -> Iterator[Any]:
    # Python's `$` also matches before a trailing newline ("count\n"); in the schema (ECMA
    # regex, as editors read it) a final `$` means end of string, so match it as `\Z`.
    import jsonschema

    if not validator.is_type(instance, "string"):
        return
    if _anchored(pattern).search(instance) is None:
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@functools.cache
def _anchored(pattern: str) -> re.Pattern[str]:
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _anchored_pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any,
                                 schema: dict[str, Any]) -> Iterator[Any]:
    # The same `$` rule for mapping keys: a params name "PORT\n" is not "PORT".
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _anchored(pattern).search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _extras(instance: dict[Any, Any], schema: dict[str, Any]) -> list[Any]:
    """Keys neither named by `properties` nor matched (anchored) by `patternProperties`."""
    named, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    return [k for k in instance if k not in named
            and not any(_anchored(p).search(k) for p in patterns)]


def _additional_properties(validator: Any, allowed: Any, instance: Any,
                           schema: dict[str, Any]) -> Iterator[Any]:
    import jsonschema

    if not validator.is_type(instance, "object"):
        return
    extras = _extras(instance, schema)
    if validator.is_type(allowed, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], allowed, path=extra)
    elif allowed is False and extras:
        yield jsonschema.ValidationError(f"unexpected keys {sorted(map(str, extras))}")


@functools.cache
def _validator_class() -> Any:
    from jsonschema import validators

    base: Any = validators.Draft202012Validator
    return validators.extend(
        base,
        validators={"pattern": _anchored_pattern,
                    "patternProperties": _anchored_pattern_properties,
                    "additionalProperties": _additional_properties},
        type_checker=base.TYPE_CHECKER.redefine("integer", _strict_integer),
    )


_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string",
               "integer": "an integer", "boolean": "true or false", "null": "null",
               "number": "a number"}


@functools.cache
def _schema_text(name: str) -> str:
    return resources.files("loaderd.config").joinpath("schemas", name).read_text("utf-8")


@functools.cache
def _validator(name: str) -> Any:
    # The shipped schemas are checked against the metaschema by the unit tests, not here:
    # that costs ~20 ms on every process start (measured by bench P2).
    return _validator_class()(json.loads(_schema_text(name)))


# --- validation cache ---------------------------------------------------------------------

class _Uncacheable(Exception):
    pass


def _encode(value: Any, out: list[str]) -> None:
    """The data with its exact types (1, 1.0, True and "1" differ; so do {1: x} and
    {"1": x}), unambiguously: strings carry their length. Any other type: not cacheable."""
    t = type(value)
    if t is str:
        out.append(f"s{len(value)}:{value}")
    elif t is bool:
        out.append("T" if value else "F")
    elif t is int:
        out.append(f"i{value};")
    elif t is float:
        out.append(f"f{value!r};")
    elif value is None:
        out.append("N")
    elif t is dict:
        out.append(f"d{len(value)}:")
        for k, v in value.items():
            _encode(k, out)
            _encode(v, out)
    elif t is list:
        out.append(f"l{len(value)}:")
        for v in value:
            _encode(v, out)
    else:
        raise _Uncacheable(t.__name__)


# The revision of this module's own rules (the anchored patterns, strict integers): a change
# to what passes must not be answered by a verdict cached under the old rules.
RULES = 2


def cache_key(data: Any, schema_name: str) -> str | None:
    """sha256 of what decides the schema's verdict; None when the data cannot be encoded."""
    out = [f"loaderd {__version__}\0rules {RULES}\0{schema_name}\0"
           f"{len(_schema_text(schema_name))}:",
           _schema_text(schema_name), "\0"]
    try:
        _encode(data, out)
    except (_Uncacheable, RecursionError):
        return None
    return hashlib.sha256("".join(out).encode("utf-8", "surrogatepass")).hexdigest()


class _Cache:
    def __init__(self) -> None:
        self.dir: str | None = None
        self.known: frozenset[str] = frozenset()
        self.passed: set[str] = set()  # keys that passed in this process (hits included)


_cache = _Cache()


def _owners(state_dir: str) -> frozenset[int]:
    """Root and the state directory's owner (store.statedir.State.owners' rule)."""
    if os.geteuid() != 0:
        return frozenset({0, os.geteuid()})
    try:
        return frozenset({0, os.stat(state_dir).st_uid})
    except OSError:
        return frozenset({0})


def read_cache(path: str, owners: frozenset[int]) -> frozenset[str]:
    """The keys of a cache file loaderd wrote; empty (all misses) for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return frozenset()
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_size > CACHE_MAX_BYTES
                or st.st_uid not in owners or st.st_mode & 0o022):
            return frozenset()
        d = json.loads(os.read(fd, CACHE_MAX_BYTES + 1))
        keys = d["keys"]
        if (d.get("loaderd") != __version__ or not isinstance(keys, list)
                or len(keys) > CACHE_MAX_KEYS
                or not all(isinstance(k, str) and _KEY.fullmatch(k) for k in keys)):
            return frozenset()
        return frozenset(keys)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return frozenset()
    finally:
        os.close(fd)


def use_cache(state_dir: str | None) -> None:
    """Read the state directory's cache (once per directory); None: no cache."""
    if state_dir is None or not os.path.isabs(state_dir):
        state_dir = None
    if state_dir == _cache.dir:
        return
    _cache.dir = state_dir
    # Only root's own cache counts: the service user (the resident, and the packaged apply)
    # can compute any key (its inputs are public), so a cache it could write would let it
    # waive the schema for a spec the privileged apply then loads (attacker seat). Under the
    # packaged units every document is validated.
    _cache.known = (read_cache(os.path.join(state_dir, CACHE_FILE), frozenset({0}))
                    if state_dir and os.geteuid() == 0 else frozenset())


def save_cache(state_dir: str) -> None:
    """Replace the cache with the keys that passed in this process (`loaderd apply` calls it
    after its apply: the settings and every spec it validated). Root's, 0600, written only
    by root. Best effort: a cache not written is a miss next time."""
    keys = sorted(_cache.passed)[:CACHE_MAX_KEYS]
    path = os.path.join(state_dir, CACHE_FILE)
    if os.geteuid() != 0 or not os.path.isdir(state_dir) or set(keys) == _cache.known:
        return  # root's alone (use_cache)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            data = json.dumps({"loaderd": __version__, "keys": keys}).encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _cache.known = frozenset(keys)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def short(value: Any) -> Any:
    """A value fit for a one-line message: containers by kind, long strings clipped."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str) and len(value) > 60:
        return value[:57] + "..."
    return value


def _range(schema: dict[str, Any]) -> str | None:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f"{low}..{high}"
    return f">= {low}" if low is not None else f"<= {high}" if high is not None else None


def _pattern_words(schema: dict[str, Any]) -> str | None:
    patterns = schema.get("patternProperties", {})
    return " or ".join(f"names matching {p}" for p in patterns) or None


def suggest(key: str, choices: list[str]) -> str:
    """"; did you mean 'x'?" for a near miss, else ""."""
    close = difflib.get_close_matches(key[:64], choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _describe(err: Any) -> list[tuple[Path, str, Any, str | None]]:
    """(path, message, value, allowed) for one jsonschema error; some expand to several."""
    path: Path = tuple(err.absolute_path)
    kw, want, schema, inst = err.validator, err.validator_value, err.schema, err.instance
    desc = schema.get("description")
    if kw == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        return [((*path, k), f"unknown key {short(k)!r}{suggest(k, known)}", None,
                 ", ".join(known) or _pattern_words(schema)) for k in _extras(inst, schema)]
    if kw == "required":
        return [((*path, k), f"missing required key '{k}'", None, None)
                for k in want if k not in inst]
    if kw == "type":
        kinds = [want] if isinstance(want, str) else want
        return [(path, "expected " + " or ".join(_TYPE_WORDS[k] for k in kinds),
                 short(inst), None)]
    if kw == "enum":
        return [(path, "unknown value", short(inst), ", ".join(map(str, want)))]
    if kw == "const":
        return [(path, f"must be {want!r}", short(inst), None)]
    if kw in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return [(path, "out of range", inst, _range(schema))]
    if kw in ("minLength", "maxLength"):
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        return [(path, f"length {len(inst)} out of range", short(inst),
                 f"{low}..{high} chars" if high is not None else f">= {low} chars")]
    if kw == "pattern":
        return [(path, "invalid value", short(inst), desc or want)]
    if kw in ("minItems", "maxItems"):
        return [(path, f"{len(inst)} items", None,
                 f"{schema.get('minItems', 0)}..{schema.get('maxItems', 'any')} items")]
    if kw == "uniqueItems":
        dup = next((x for i, x in enumerate(inst) if x in inst[:i]), None)
        return [(path, "duplicate entries", short(dup), None)]
    if kw in ("minProperties", "maxProperties"):
        # source.sha256 goes with file/object: not one of the alternatives
        keys = " or ".join(f"'{k}'" for k in schema.get("properties", {}) if k != "sha256")
        return [(path, f"exactly one of {keys} is required", None, None)]
    if kw == "not":
        return [(path, desc or "not allowed here", None, None)]
    if kw == "oneOf" and all(list(sub) == ["required"] for sub in want):  # one key of several
        keys = " or ".join(f"'{k}'" for sub in want for k in sub["required"])
        return [(path, f"exactly one of {keys} is required", None, None)]
    return [(path, err.message[:120], None, None)]


def validate(data: Any, schema_name: str, *, marks: Marks, file: str | None,
             kind: Kind = Kind.SCHEMA) -> list[LoaderdError]:
    """All schema violations of `data`, sorted by position (none without running jsonschema
    when the validation cache knows the data passed)."""
    key = cache_key(data, schema_name) if _cache.dir else None
    if key is not None and key in _cache.known:
        _cache.passed.add(key)
        return []
    found = [d for err in _validator(schema_name).iter_errors(data) for d in _describe(err)]
    if not found and key is not None:
        _cache.passed.add(key)
    # A misspelled key is reported once, as unknown with its suggestion, not also as missing.
    typos = {(path[:-1], f"missing required key '{m.group(1)}'")
             for path, message, _v, _a in found
             if (m := re.search(r"did you mean '([^']+)'", message))}
    errors: dict[tuple[str, str], LoaderdError] = {}
    for path, message, value, allowed in found:
        if (path[:-1], message) in typos:
            continue
        mark = marks.keys.get(path) or marks.at(path)
        line, col = mark if mark else (None, None)
        fname = field_name(path) or None
        errors.setdefault((fname or "", message), LoaderdError(
            kind, message, Location(file, line, col, fname), value=value, allowed=allowed))
    return sorted(errors.values(), key=lambda e: (e.location.line or 0,
                                                  e.location.column or 0,
                                                  e.location.field or ""))
