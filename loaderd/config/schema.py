"""Validate parsed YAML against the shipped JSON Schemas; turn each failure into a
LoaderdError that names the file, line, column and field (with a did-you-mean for typos)."""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

import jsonschema
from jsonschema import validators

from loaderd.config.yamlsafe import Marks, Path, field_name
from loaderd.errors import Kind, LoaderdError, Location


def _strict_integer(_checker: Any, instance: Any) -> bool:
    # jsonschema counts 1.0 as an integer; a spec's counts and sizes must be written as ints.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _anchored_pattern(validator: Any, pattern: str, instance: Any,
                      schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    # Python's `$` also matches before a trailing newline ("count\n"); in the schema (ECMA
    # regex, as editors read it) a final `$` means end of string, so match it as `\Z`.
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
                                 schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
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
                           schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = _extras(instance, schema)
    if validator.is_type(allowed, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], allowed, path=extra)
    elif allowed is False and extras:
        yield jsonschema.ValidationError(f"unexpected keys {sorted(map(str, extras))}")


_Base: Any = validators.Draft202012Validator
_Validator: Any = validators.extend(
    _Base,
    validators={"pattern": _anchored_pattern,
                "patternProperties": _anchored_pattern_properties,
                "additionalProperties": _additional_properties},
    type_checker=_Base.TYPE_CHECKER.redefine("integer", _strict_integer),
)

_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string",
               "integer": "an integer", "boolean": "true or false", "null": "null",
               "number": "a number"}


@functools.cache
def _validator(name: str) -> Any:
    text = resources.files("loaderd.config").joinpath("schemas", name).read_text("utf-8")
    # The shipped schemas are checked against the metaschema by the unit tests, not here:
    # that costs ~20 ms on every process start (measured by bench P2).
    return _Validator(json.loads(text))


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
    """All schema violations of `data`, sorted by position."""
    found = [d for err in _validator(schema_name).iter_errors(data) for d in _describe(err)]
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
