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
                               self.detail))

    def with_file(self, file: str) -> LoaderdError:
        """Fill in the file when the raiser did not know it."""
        if self.location.file is None:
            self.location = Location(file, self.location.line, self.location.column,
                                     self.location.field)
        return self
