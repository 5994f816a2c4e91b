"""One error type for everything a user can get wrong or the kernel can refuse.

Every refusal names *where* (file, line, column, field), *what* (the bad value) and *what is
allowed*, so `loaderd check` output reads like a compiler's. Internals (tracebacks, addresses)
never go into `str()`; they go to the debug log by the caller.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Kind(enum.StrEnum):
    """What class of check refused the input. Stable: tests and audit events key on it."""

    YAML = "yaml"  # not parseable, tags, duplicate keys, aliases, size/depth, encoding
    SCHEMA = "schema"  # structure/types/unknown keys (JSON Schema)
    SEMANTIC = "semantic"  # cross-field rules a schema cannot express
    TRUST = "trust"  # file ownership/mode/symlinks/path escapes
    SIGNATURE = "signature"  # a spec's SSH signature or sha256 pins (config.signature)
    POLICY = "policy"  # allow-lists: program types, helpers, map types, flags
    LIMIT = "limit"  # counts/sizes over the configured limit
    CAPABILITY = "capability"  # a needed capability is missing
    COMPILE = "compile"  # BCC/clang refused the C source
    HELPER = "helper"  # bytecode calls a helper that is not allowed
    VERIFIER = "verifier"  # the kernel verifier refused the program
    KERNEL = "kernel"  # any other bpf()/perf/netlink errno
    PIN = "pin"  # bpffs layout, confinement, existing foreign pins
    ATTACH = "attach"  # attach target missing or busy
    STATE = "state"  # manifest/state dir problems


@dataclass(frozen=True)
class Location:
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    field: str | None = None  # dotted path, e.g. "maps[0].max_entries"

    def __str__(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.field}" if self.field else where


@dataclass
class LoaderdError(Exception):
    """A refusal with a precise location. `str()` is the one-line user message."""

    kind: Kind
    message: str
    location: Location = field(default_factory=Location)
    value: Any = None
    allowed: str | None = None
    detail: str | None = None  # long text for users (e.g. the verifier log), never a traceback
    more: int = 0  # > 0: this stands for that many further errors in the file (cap_per_file)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.location}: {self.message}"
        if self.value is not None:
            text += f" (got {self.value!r})"
        if self.allowed:
            text += f"; allowed: {self.allowed}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (compile workers): pickle the fields, not args.
        return (LoaderdError, (self.kind, self.message, self.location, self.value, self.allowed,
                               self.detail, self.more))

    def with_file(self, file: str) -> LoaderdError:
        """Fill in the file when the raiser did not know it."""
        if self.location.file is None:
            self.location = Location(file, self.location.line, self.location.column,
                                     self.location.field)
        return self


MAX_PER_FILE = 20  # errors shown (and journaled) per file; the rest are counted


def cap_per_file(errors: list[LoaderdError], limit: int = MAX_PER_FILE) -> list[LoaderdError]:
    """The first `limit` errors of each file (by location.file), in order, each file's rest
    folded into one "and N more" error after its last shown one: a file with 20,000 bad
    items is 21 lines, not 20,000, and the count is kept (`count`)."""
    shown: dict[str | None, list[LoaderdError]] = {}
    more: dict[str | None, int] = {}
    for e in errors:
        group = shown.setdefault(e.location.file, [])
        if len(group) < limit:
            group.append(e)
        else:
            more[e.location.file] = more.get(e.location.file, 0) + count([e])
    out: list[LoaderdError] = []
    for file, group in shown.items():
        out += group
        if more.get(file):
            n = more[file]
            out.append(LoaderdError(group[0].kind, f"and {n} more error{'s' * (n != 1)} in "
                                    "this file (fix the ones above first)", Location(file),
                                    more=n))
    return out


def count(errors: list[LoaderdError]) -> int:
    """How many errors `errors` stands for ("and N more" counts N)."""
    return sum(e.more or 1 for e in errors)


def plural(n: int, word: str, words: str | None = None) -> str:
    """"1 spec", "2 specs": every count a message shows (journal, STATUS=, CLI output)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def article(word: object) -> str:
    """"a hash", "an array", "an xdp": the article a type name takes in a message (by sound:
    a vowel, or an x said "ex")."""
    text = str(word)
    return f"{'an' if text[:1].lower() in 'aeiox' else 'a'} {text}"


def names(items: list[str] | tuple[str, ...]) -> str:
    """A list for a message: "a, b" or "none" (never a Python repr like ['a'])."""
    return ", ".join(items) if items else "none"
