"""Text checks on a spec's C source for what BCC acts on *inside* `BPF()`, before any of
loaderd's checks run: pinned/shared/extern tables, explicit `maps/` sections, and includes
that read files outside the kernel/BCC header trees.

Maps come from the spec's `maps:` (loaderd generates their declarations), so the C text needs
none of these. The text is checked after line splicing and comment removal (as the C
preprocessor sees it); anything that could rebuild a refused name behind our back (token
pasting, digraphs, trigraphs, raw strings) is refused too.

Lines are what clang (14, measured) takes them to be: a lone CR ends a line for clang, even
inside a `//` comment or a string literal, so it is refused (LF and CRLF are the line endings);
form feed and vertical tab are horizontal blanks before and after `#`, and a backslash followed
by blanks and a newline splices lines (clang accepts the blanks with a warning).
"""

from __future__ import annotations

import bisect
import re

from loaderd.errors import Kind, LoaderdError, Location

MAX_ERRORS = 20
INCLUDE_ROOTS = ("linux", "uapi", "net", "bcc", "asm")
_MAPS = "declare maps in the spec's `maps:` instead"

# (pattern, message); checked on comment-free text, string literals included.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), m) for p, m in (
        (r"\bBPF_TABLE_PINNED\w*", "BPF_TABLE_PINNED is not allowed: BCC pins it before "
                                   f"any check; {_MAPS}"),
        (r"\bBPF_TABLE_SHARED\b", f"BPF_TABLE_SHARED is not allowed (shares the map); {_MAPS}"),
        (r"\bBPF_TABLE_PUBLIC\b", f"BPF_TABLE_PUBLIC is not allowed (exports the map); {_MAPS}"),
        (r"\bBPF_QUEUESTACK_(?:PINNED|PUBLIC|SHARED)\b",
         f"pinned/shared queue/stack tables are not allowed; {_MAPS}"),
        (r"\bBPF_(?:F_TABLE|TABLE(?!_(?:PINNED|SHARED|PUBLIC))\w*|QUEUESTACK|"
         r"XDP_REDIRECT_MAP|XSKMAP\w*)\b",
         "generic table macros are not allowed: their type string can pin, share or extern "
         f"a map (\"hash:/path\", \"extern\"); {_MAPS}"),
        (r"\bextern\b", "extern declarations are not allowed (BCC extern tables reach maps "
                        "outside this spec)"),
        (r"\b(?:BCC_SEC|SEC|section|__section__)\b",
         "explicit sections are not allowed (a \"maps/\" section creates or pins a map in BCC)"),
        (r"maps/", "\"maps/\" sections are not allowed (BCC creates or pins such maps)"),
        (r"##", "token pasting (##) is not allowed: it can assemble refused names"),
        (r"%:|\?\?[=/'()!<>-]", "digraphs/trigraphs are not allowed"),
        (r"\b(?:u8|[uUL])?R\"", "raw string literals are not allowed"),
        # Landlock denies the open but not the lookup: EACCES for a file that exists, ENOENT
        # for one that does not (measured: "cannot open file '/root/x': Permission denied").
        (r"\b(?:__has_include(?:_next)?|GCC\s+dependency)\b",
         "__has_include and #pragma GCC dependency are not allowed (they tell whether any path "
         "exists, root-only directories included)"),
        # inline assembly: `.incbin`/`.include` read any file clang may open (all of them where
        # the kernel has no Landlock: measured, 8 bytes of a 0600 file in a map) and the
        # assembler's macros rebuild any directive; `.byte` writes raw instructions. The empty
        # template (`asm volatile("" ::: "memory")`, a compiler barrier) holds no directive.
        (r"\b(?:asm|__asm|__asm__)\b(?!/)(?!\s*(?:(?:volatile|__volatile__|inline|goto)\b\s*)*"
         r"\(\s*\"\"\s*[:)])",
         "inline assembly is not allowed (its .incbin/.include read files); only the empty "
         "barrier asm volatile(\"\" ::: \"memory\")"),
    )
)
# BCC's map macros: the spec declares maps (loaderd generates the declaration), so a kept
# macro would be a second definition (`redefinition of 'dist_table_t'` in a prelude the author
# never sees). Refused before clang, with the spec's equivalent.
_BCC_MAPS: dict[str, str] = {
    "BPF_HASH": "type: hash, key: u64, value: u64, max_entries: 10240",
    "BPF_ARRAY": "type: array, key: u32, value: u64, max_entries: 10240",
    "BPF_HISTOGRAM": "type: array, key: u32, value: u64, max_entries: 64, "
                     "histogram: {kind: log2, unit: usecs}",
    "BPF_PERCPU_HASH": "type: percpu_hash, key: u64, value: u64, max_entries: 10240",
    "BPF_PERCPU_ARRAY": "type: percpu_array, key: u32, value: u64, max_entries: 10240",
    "BPF_LRU_HASH": "type: lru_hash, key: u64, value: u64, max_entries: 10240",
    "BPF_LRU_PERCPU_HASH": "type: lru_percpu_hash, key: u64, value: u64, max_entries: 10240",
    "BPF_PERF_OUTPUT": "type: perf_event_array, max_entries: 64, events: {layout: ...}",
    "BPF_RINGBUF_OUTPUT": "type: ringbuf, max_entries: <pages x 4096>, events: {layout: ...}",
}
_BCC_MAP = re.compile(r"\b(" + "|".join(sorted(_BCC_MAPS, key=len, reverse=True))
                      + r")\s*\(\s*([A-Za-z_]\w*)?")
_DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*(include_next|include|import|embed)\b(.*)$", re.M)
# `#line N "file"` and the GNU linemarker `# N "file"`: BCC reads the named file into the
# program's BTF line info (bpftool prog dump ... linum shows it); loaderd writes its own.
_LINE_DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*(?:line\b|[0-9])", re.M)
_INCLUDE = re.compile(r"[ \t]*<([A-Za-z0-9_.+/-]+)>[ \t]*")
_LEXEME = re.compile(r'"(?:\\.|[^"\\\n])*"?|\'(?:\\.|[^\'\\\n])*\'?|//[^\n]*|/\*.*?(?:\*/|\Z)',
                     re.S)


_LONE_CR = re.compile(r"\r(?!\n)")


def _blanks(text: str) -> str:
    """clang's blanks as spaces, offsets kept: the CR of CRLF, form feed, vertical tab."""
    return text.replace("\r\n", " \n").replace("\f", " ").replace("\v", " ")


def _splice(text: str) -> tuple[str, list[int]]:
    """Join backslash(-blanks)-newline continuations of `_blanks` text; return the text and,
    for each original line after the first, the offset in the joined text where it starts."""
    out: list[str] = []
    starts: list[int] = []
    size = pos = 0
    for m in re.finditer(r"\\[ \t]*\n|\n", text):
        out.append(text[pos:m.start()])
        size += m.start() - pos
        if m.group() == "\n":
            out.append("\n")
            size += 1
        starts.append(size)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), starts


def _blank_comments(text: str) -> str:
    """Comments become spaces (newlines kept, so offsets and lines stay put)."""
    def repl(m: re.Match[str]) -> str:
        s = m.group()
        if s.startswith(("//", "/*")):
            return re.sub(r"[^\n]", " ", s)
        return s
    return _LEXEME.sub(repl, text)


def _include_problem(directive: str, rest: str) -> str | None:
    if directive != "include":
        return f"#{directive} is not allowed"
    m = _INCLUDE.fullmatch(rest)
    if m is None:
        if rest.strip().startswith('"'):
            return "quoted #include \"...\" is not allowed (it reads files next to the spec)"
        return "only #include <...> of kernel/BCC headers is allowed"
    parts = m.group(1).split("/")
    if parts[0] not in INCLUDE_ROOTS or ".." in parts or "" in parts:
        return f"#include <{m.group(1)}> is not allowed"
    return None


_FUNCTION = re.compile(r"\b([A-Za-z_]\w*)\s*\((?:[^()]|\([^()]*\))*\)\s*\{")


def function_names(text: str) -> set[str]:
    """Names that look defined as functions (`name(...) {`) in C `text`, comments ignored."""
    code = _blank_comments(_splice(_blanks(text))[0])
    return {m.group(1) for m in _FUNCTION.finditer(code)}


def _lone_crs(text: str, file: str | None, first_line: int,
              field: str | None) -> list[LoaderdError]:
    errors: list[LoaderdError] = []
    for m in _LONE_CR.finditer(text):
        before = text[:m.start()]
        line, col = before.count("\n"), m.start() - before.rfind("\n")
        errors.append(LoaderdError(
            Kind.POLICY, "a lone carriage return (CR) ends a line for the C compiler but not "
            "for this check; end lines with LF (or CRLF)",
            Location(file, first_line + line, col, field)))
        if len(errors) >= MAX_ERRORS:
            break
    return errors


def check_source(text: str, *, file: str | None, first_line: int = 1,
                 field: str | None = None) -> list[LoaderdError]:
    """All refused constructs in C `text`, located at `file`:`first_line` + line - 1."""
    allowed = ", ".join(f"<{r}/...>" for r in INCLUDE_ROOTS)
    crs = _lone_crs(text, file, first_line, field)
    if crs:  # every later line number would disagree with clang's: fix these first
        return crs
    code, starts = _splice(_blanks(text))
    code = _blank_comments(code)
    found: list[tuple[int, str, str | None]] = []
    for rx, message in _RULES:
        found.extend((m.start(), message, None) for m in rx.finditer(code))
    for m in _DIRECTIVE.finditer(code):
        problem = _include_problem(m.group(1), m.group(2))
        if problem:
            found.append((m.start(), problem, allowed))
    found.extend((m.start(), "#line directives are not allowed: BCC reads the file one names "
                  "into the program's line info", None) for m in _LINE_DIRECTIVE.finditer(code))
    for m in _BCC_MAP.finditer(code):
        name = m.group(2) or "NAME"
        found.append((m.start(), f"{m.group(1)}({name}, ...) declares a map in the C text; "
                      "the spec declares maps (loaderd generates the declaration, and the C "
                      f"code uses `{name}` as before): remove the macro and add under maps: "
                      f"`- {{name: {name}, {_BCC_MAPS[m.group(1)]}}}` (key/value types and "
                      "size as the macro's arguments say; a struct key or value: "
                      f"{{struct: ...}}, used as loaderd_{name}_key_t / loaderd_{name}_value_t)",
                      None))
    errors: list[LoaderdError] = []
    seen: set[tuple[int, str]] = set()
    for offset, message, allow in sorted(found):
        line = first_line + bisect.bisect_right(starts, offset)
        if (line, message) in seen:
            continue
        seen.add((line, message))
        errors.append(LoaderdError(Kind.POLICY, message, Location(file, line, None, field),
                                   allowed=allow))
        if len(errors) >= MAX_ERRORS:
            break
    return errors


_STRUCT_USE = re.compile(r"\bstruct\s+([A-Za-z_]\w*)")
_STRUCT_DEF = re.compile(r"\bstruct\s+([A-Za-z_]\w*)\s*\{")
_CURRENT_TASK = re.compile(r"\bbpf_get_current_task(?:_btf)?\s*\(")


def struct_uses(text: str) -> dict[str, int]:
    """Structs the C text names (`struct NAME`, comments ignored) and does not define itself,
    with the line (in `text`) of the first use; `bpf_get_current_task()` counts as a use of
    task_struct. Which of them are kernel structs is for the caller (the running kernel's BTF)
    to say: BCC's tracepoint `args` are no `struct` the text names."""
    code, starts = _splice(text)
    code = _blank_comments(code)
    defined = {m.group(1) for m in _STRUCT_DEF.finditer(code)}
    found: dict[str, int] = {}
    for m in _STRUCT_USE.finditer(code):
        if m.group(1) not in defined:
            found.setdefault(m.group(1), 1 + bisect.bisect_right(starts, m.start()))
    task = _CURRENT_TASK.search(code)
    if task is not None and "task_struct" not in found:
        found["task_struct"] = 1 + bisect.bisect_right(starts, task.start())
    return found
