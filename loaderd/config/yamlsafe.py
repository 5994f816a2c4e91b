"""Safe YAML for hostile input: plain data plus the line/column of every key and item.

Built on PyYAML's event stream (libyaml when present) rather than its composer, so that
explicit tags, anchors/aliases, depth and document count are refused *before* any object is
built (the composer recurses and would expand aliases).

Plain scalars resolve by the YAML 1.2 core schema only (null, true/false, decimal, 0o, 0x,
1.2 floats; anything else is a string). A plain scalar that a YAML 1.1 reader (PyYAML,
Ansible, many linters) would read as something else is refused with the spelling both agree
on: `010` (octal 8 in 1.1), `1:30` (base 60), `on`/`yes`/`n` (booleans), `1_000`, `0b11`,
`-0x1`. Timestamps and `=` stay strings, as in 1.2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from loaderd.errors import Kind, LoaderdError, Location

Path = tuple[str | int, ...]
Mark = tuple[int, int]  # (line, column), both 1-based

MAX_DEPTH = 32

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# YAML 1.1 tags whose values a 1.1 reader builds; others (timestamp, value) read as strings.
_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("int", "float", "bool", "null")
)

# The YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution).
_NULL12 = frozenset({"", "~", "null", "Null", "NULL"})
_BOOL12 = {"true": True, "True": True, "TRUE": True,
           "false": False, "False": False, "FALSE": False}
_INT12 = re.compile(r"[-+]?[0-9]+")
_BASED12 = re.compile(r"0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT12 = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_INF12 = re.compile(r"([-+]?)\.(?:inf|Inf|INF)")
_NAN12 = re.compile(r"\.(?:nan|NaN|NAN)")
# YAML 1.1 booleans (its spec's list; PyYAML knows all but y/n).
_BOOL11 = re.compile(r"y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF")


def core_value(text: str) -> Any:
    """A plain scalar by the YAML 1.2 core schema. ValueError: an int too long for int()."""
    if text in _NULL12:
        return None
    if text in _BOOL12:
        return _BOOL12[text]
    if _INT12.fullmatch(text):
        return int(text)
    if _BASED12.fullmatch(text):
        return int(text, 0)
    if _FLOAT12.fullmatch(text):
        return float(text)
    inf = _INF12.fullmatch(text)
    if inf:
        return float(f"{inf.group(1)}inf")
    if _NAN12.fullmatch(text):
        return float("nan")
    return text


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    return bool(a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def yaml11_conflict(text: str, v12: Any, loader: Any) -> str | None:
    """Why a YAML 1.1 reader would take plain `text` for something other than `v12`, with
    the spelling to use instead; None when both read the same."""
    shown = repr(text[:32])
    if _BOOL11.fullmatch(text):
        return (f"{shown} is a boolean in YAML 1.1 and a string in YAML 1.2: write true or "
                "false, or quote it")
    lead = re.fullmatch(r"([-+]?)0([0-9]+)", text)
    if lead:
        sign, digits = lead.groups()
        octal = f" {sign}0o{digits} (octal) or" if set(digits) <= set("01234567") else ""
        return (f"{shown} has a leading zero (octal in YAML 1.1, decimal in YAML 1.2): "
                f"write{octal} {sign}{int(digits)} (decimal), or quote it")
    tag = loader.resolve(yaml.ScalarNode, text, (True, False))
    if tag not in _PLAIN_TAGS:
        return None
    try:
        v11 = loader.construct_object(yaml.ScalarNode(tag, text))
    except (ValueError, OverflowError):
        v11 = None
    if _same(v11, v12):
        return None
    if ":" in text:
        return (f"{shown} is a base-60 number in YAML 1.1 ({v11!r}) and a string in YAML "
                "1.2: quote it")
    if "_" in text:
        return (f"{shown} is a number in YAML 1.1 ({v11!r}) and a string in YAML 1.2: "
                f"write it without '_' ({v11!r}), or quote it")
    if re.match(r"[-+]?0b", text):
        return (f"{shown} is binary in YAML 1.1 only: write {v11!r} or {hex(int(v11))}, "
                "or quote it")
    return (f"{shown} is {v11!r} in YAML 1.1 but {v12!r} in YAML 1.2: write it so that both "
            "agree, or quote it")


@dataclass
class Marks:
    """Where each field path was written: `keys` for the key (or sequence item), `values`
    for the value start, `literal` for `|` block scalars (their lines map 1:1 to the text)."""

    keys: dict[Path, Mark] = field(default_factory=dict)
    values: dict[Path, Mark] = field(default_factory=dict)
    literal: set[Path] = field(default_factory=set)

    def at(self, path: Path) -> Mark | None:
        """Position of `path`, or of its nearest written ancestor (for missing keys)."""
        for end in range(len(path), -1, -1):
            sub = path[:end]
            mark = self.keys.get(sub) or self.values.get(sub)
            if mark is not None:
                return mark
        return None


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def field_name(path: Path) -> str:
    """("maps", 0, "max_entries") -> "maps[0].max_entries"; odd keys are quoted
    (`maps[0]['a\\nb']`) so a hostile key cannot forge lines in messages."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part[:40]!r}]"
    return out


def _mark(event: Any) -> Mark:
    return (event.start_mark.line + 1, event.start_mark.column + 1)


def _error(message: str, file: str | None, mark: Mark | None = None,
           path: Path = (), value: Any = None) -> LoaderdError:
    line, col = mark if mark else (None, None)
    return LoaderdError(Kind.YAML, message,
                        Location(file, line, col, field_name(path) or None), value=value)


class _Frame:
    __slots__ = ("data", "key", "path", "start")

    def __init__(self, data: dict[str, Any] | list[Any], path: Path, start: Mark) -> None:
        self.data = data
        self.path = path
        self.start = start
        self.key: str | None = None  # mapping: key waiting for its value


class _Builder:
    """Turns the event stream into data + Marks, refusing what we do not allow."""

    def __init__(self, loader: Any, file: str | None, max_depth: int) -> None:
        self.loader = loader
        self.file = file
        self.max_depth = max_depth
        self.marks = Marks()
        self.stack: list[_Frame] = []
        self.root: Any = None
        self.documents = 0

    def child_path(self, mark: Mark, is_key_ok: bool) -> Path | None:
        """Path the next node will take; None when it is a mapping key."""
        if not self.stack:
            return ()
        top = self.stack[-1]
        if isinstance(top.data, list):
            return (*top.path, len(top.data))
        if top.key is None:
            if not is_key_ok:
                raise _error("mapping keys must be plain scalars", self.file, mark, top.path)
            return None
        return (*top.path, top.key)

    def attach(self, value: Any, path: Path, mark: Mark, is_container: bool) -> None:
        if not self.stack:
            self.root = value
            self.marks.values[()] = mark
            return
        top = self.stack[-1]
        if isinstance(top.data, list):
            top.data.append(value)
            if not is_container:
                self.marks.keys[path] = mark
                self.marks.values[path] = mark
            return
        top.data[top.key] = value  # type: ignore[index]
        top.key = None
        if not is_container:
            self.marks.values[path] = mark

    def add_key(self, key: Any, mark: Mark) -> None:
        top = self.stack[-1]
        assert isinstance(top.data, dict)
        if not isinstance(key, str):
            raise _error("mapping keys must be strings; quote it", self.file, mark,
                         top.path, value=key)
        if key in top.data:
            first = self.marks.keys.get((*top.path, key))
            where = f" (first at line {first[0]})" if first else ""
            raise _error(f"duplicate key {key[:64]!r}{where}", self.file, mark,
                         (*top.path, key))
        top.key = key
        self.marks.keys[(*top.path, key)] = mark

    def scalar(self, event: Any) -> None:
        mark = _mark(event)
        path = self.child_path(mark, True)
        value: Any = event.value
        if event.implicit[0]:  # plain: resolved; quoted and block scalars are strings
            if value == "<<" and path is None:
                raise _error("merge keys (<<) are not allowed", self.file, mark,
                             self.stack[-1].path)
            try:
                value = core_value(event.value)
            except (ValueError, OverflowError):  # e.g. int() over the 4300-digit limit
                raise _error("invalid scalar (number too long or out of range)", self.file,
                             mark, path or (), value=event.value[:32]) from None
            conflict = yaml11_conflict(event.value, value, self.loader)
            if conflict:
                where = path if path is not None else self.stack[-1].path
                raise _error(conflict, self.file, mark, where)
        if path is None:
            self.add_key(value, mark)
            return
        if event.style == "|":
            self.marks.literal.add(path)
        self.attach(value, path, mark, False)

    def start(self, event: Any, data: dict[str, Any] | list[Any]) -> None:
        mark = _mark(event)
        path = self.child_path(mark, False)
        assert path is not None
        if len(self.stack) >= self.max_depth:
            raise _error(f"nesting deeper than {self.max_depth} levels", self.file, mark)
        if self.stack:
            self.marks.values[path] = mark
            if isinstance(self.stack[-1].data, list):
                self.marks.keys[path] = mark
        self.stack.append(_Frame(data, path, mark))

    def end(self) -> None:
        frame = self.stack.pop()
        self.attach(frame.data, frame.path, frame.start, True)

    def where(self) -> Path:
        """Field path of the node an event starts (its mapping's path for a key)."""
        if not self.stack:
            return ()
        top = self.stack[-1]
        if isinstance(top.data, list):
            return (*top.path, len(top.data))
        return top.path if top.key is None else (*top.path, top.key)

    def feed(self, event: Any) -> None:
        if getattr(event, "anchor", None) is not None or isinstance(event, yaml.AliasEvent):
            raise _error("anchors and aliases (&, *) are not allowed", self.file,
                         _mark(event), self.where())
        if getattr(event, "tag", None) is not None:
            raise _error("explicit tags are not allowed", self.file, _mark(event),
                         self.where(), value=event.tag[:64])
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise _error("only one YAML document is allowed (found '---')", self.file,
                             _mark(event))
        elif isinstance(event, yaml.ScalarEvent):
            self.scalar(event)
        elif isinstance(event, yaml.MappingStartEvent):
            self.start(event, {})
        elif isinstance(event, yaml.SequenceStartEvent):
            self.start(event, [])
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            self.end()


def _decode(data: bytes, file: str | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        raise _error("not valid UTF-8", file, (line, col),
                     value=data[exc.start:exc.end]) from None


def _yaml_error(exc: yaml.YAMLError, loader: Any, text: str,
                file: str | None) -> LoaderdError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = (mark.line + 1, mark.column + 1) if mark is not None else None
    if isinstance(exc, yaml.reader.ReaderError):
        # libyaml reports a byte offset into the UTF-8 text, PyYAML's reader a char index.
        c_parser = getattr(getattr(yaml, "cyaml", None), "CParser", None)
        as_bytes = c_parser is not None and isinstance(loader, c_parser)
        before = text.encode()[: exc.position].decode(errors="replace") if as_bytes \
            else text[: exc.position]
        where = (before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1)
        return _error("control characters are not allowed", file, where,
                      value=chr(exc.character) if isinstance(exc.character, int)
                      else exc.character)
    return _error(f"invalid YAML: {problem}", file, where)


def load(data: bytes, *, file: str | None = None, max_bytes: int,
         max_depth: int = MAX_DEPTH) -> tuple[Any, Marks]:
    """Parse one YAML document from untrusted bytes. Empty input gives (None, Marks())."""
    if len(data) > max_bytes:
        raise _error(f"file is larger than {max_bytes} bytes", file, value=len(data))
    text = _decode(data, file)
    loader: Any = None
    try:
        loader = _Loader(text)  # PyYAML's pure reader already checks characters here
        builder = _Builder(loader, file, max_depth)
        while loader.check_event():
            builder.feed(loader.get_event())
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, loader, text, file) from None
    finally:
        if loader is not None:
            loader.dispose()
    return builder.root, builder.marks
