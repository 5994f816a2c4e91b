"""Man pages and bash completion, generated from the argparse parsers and the JSON schemas the
code itself uses, so neither can drift from the CLI or the file formats. debian/rules runs
`python3 -m loaderd.cli.docgen OUTDIR` at build time:

    OUTDIR/man/loaderd.8 loaderctl.8 loaderd.yaml.5 loaderd-spec.5
    OUTDIR/completion/loaderd loaderctl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from loaderd import __version__
from loaderd.cli import loaderctl, loaderd

SOURCE = f"loaderd {__version__}"
SETTINGS_SCHEMA = "settings.schema.json"
SPEC_SCHEMA = "spec.schema.json"


def _date() -> str:
    """The build's date (SOURCE_DATE_EPOCH, from debian/changelog): reproducible pages."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def _breakable(word: str) -> str:
    """A long token (a regex pattern) gets break points (\\:) after its separators, or troff
    cannot fit it in a line (a groff warning, and lintian's)."""
    if len(word) <= 30:
        return word
    for sep in ("|", ",", ")", "/"):
        word = word.replace(sep, sep + "\\:")
    return word


def esc(text: str) -> str:
    """Text safe for roff: backslashes escaped, no line starting a request; markdown's
    `code` (docstrings and help are written for both) in bold, as man pages show commands."""
    out = []
    for line in text.replace("\\", "\\e").split("\n"):
        line = " ".join(_breakable(w) for w in line.split(" "))
        line = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", line)
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def opt(text: str) -> str:
    """An option or command name: bold, dashes as real minus signs (copy-pasteable)."""
    return "\\fB" + esc(text).replace("-", "\\-") + "\\fR"


# -- the command lines ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]  # ("--config",) or () for a positional
    metavar: str  # "" for a flag
    help: str
    choices: tuple[str, ...]
    positional_name: str  # for positionals: what it is called in the synopsis


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    options: tuple[Option, ...]


def _help(a: argparse.Action, prog: str) -> str:
    text = a.help or ""
    if "%" in text:  # argparse's own formatting: %(default)s, and %% for a literal %
        text = text % {**vars(a), "prog": prog}
    return text


def _options(p: argparse.ArgumentParser) -> tuple[Option, ...]:
    out = []
    for a in p._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, argparse._SubParsersAction):
            continue
        text = _help(a, p.prog)
        takes = a.nargs != 0
        metavar = ""
        if takes:
            mv = a.metavar if isinstance(a.metavar, str) else None
            metavar = mv or (a.dest if not a.option_strings else a.dest.upper())
        choices = tuple(str(c) for c in a.choices) if a.choices else ()
        out.append(Option(tuple(a.option_strings), metavar, text, choices,
                          a.metavar if isinstance(a.metavar, str) else a.dest))
    return tuple(out)


def commands(p: argparse.ArgumentParser) -> tuple[Command, ...]:
    """The subcommands of a parser, in the order they were added, with their options."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in a._choices_actions}
            return tuple(Command(name, helps.get(name, ""), _options(sp))
                         for name, sp in a.choices.items())
    return ()


def global_options(p: argparse.ArgumentParser) -> tuple[Option, ...]:
    return _options(p)


def _option_lines(o: Option) -> list[str]:
    if o.flags:
        head = ", ".join(opt(f) for f in o.flags)
        if o.metavar:
            head += " \\fI" + esc(o.metavar) + "\\fR"
    else:
        head = "\\fI" + esc(o.positional_name) + "\\fR"
    body = o.help
    if o.choices:
        body += ("; " if body else "") + "one of: " + ", ".join(o.choices)
    return [".TP", head, esc(body) if body else "\\&"]


_CLI_PAGES: dict[str, dict[str, str]] = {
    "loaderd": {
        "summary": "load eBPF programs from declarative YAML specs",
        "files": (".TP\n/etc/loaderd/loaderd.yaml\ndaemon settings, see \\fBloaderd.yaml\\fR(5)\n"
                  ".TP\n/etc/loaderd/programs.d/*.yaml\nprogram specs, see "
                  "\\fBloaderd\\-spec\\fR(5)\n"
                  ".TP\n/sys/fs/bpf/loaderd\npin root: one directory per spec\n"
                  ".TP\n/var/lib/loaderd\nstate: the manifest of what is applied, generations"),
        "see": "\\fBloaderctl\\fR(8), \\fBloaderd.yaml\\fR(5), \\fBloaderd\\-spec\\fR(5), "
               "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBbpftool\\fR(8)",
    },
    "loaderctl": {
        "summary": "inspect what loaderd loaded: status, maps, events, audits",
        "files": (".TP\n/etc/loaderd/loaderd.yaml\ndaemon settings, see \\fBloaderd.yaml\\fR(5)\n"
                  ".TP\n/var/lib/loaderd/manifest.json\nwhat is applied (readable by the "
                  "loaderd\\-readers group)"),
        "see": "\\fBloaderd\\fR(8), \\fBloaderd.yaml\\fR(5), \\fBloaderd\\-spec\\fR(5), "
               "\\fBbpftool\\fR(8)",
    },
}


def cli_page(p: argparse.ArgumentParser, description: str, section: int = 8) -> str:
    name = p.prog
    info = _CLI_PAGES[name]
    cmds = commands(p)
    lines = [f'.TH {name.upper()} {section} "{_date()}" "{SOURCE}" "loaderd manual"',
             ".SH NAME", f"{name} \\- {info['summary']}",
             ".SH SYNOPSIS",
             f"{opt(name)} [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fICOMMAND OPTIONS\\fR]",
             ".br", f"{opt(name)} {opt('--version')}",
             ".SH DESCRIPTION"]
    for para in description.strip().split("\n\n"):
        lines += [esc(" ".join(para.split())), ".PP"]
    lines.pop()
    lines.append(".SH OPTIONS")
    for o in global_options(p):
        lines += _option_lines(o)
    lines.append(".SH COMMANDS")
    for c in cmds:
        args = " ".join(f"\\fI{esc(o.positional_name)}\\fR" for o in c.options if not o.flags)
        lines += [".SS " + f"{name} {c.name}".replace("-", "\\-")
                  + (" " + args if args else ""), esc(c.help)]
        for o in c.options:
            lines += _option_lines(o)
    lines += [".SH FILES", info["files"], ".SH SEE ALSO", info["see"]]
    return "\n".join(lines) + "\n"


# -- the file formats --------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    path: str  # "maps[].events.layout"
    required: bool
    text: str  # type, range, choices, description


def load_schema(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        resources.files("loaderd.config").joinpath("schemas", name).read_text("utf-8"))
    return data


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        target: Any = root
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _kind(node: Any) -> str:
    """One line on what a value may be, from the schema's own keywords."""
    if node is True or node == {}:
        return "any value"
    if not isinstance(node, dict):
        return ""
    parts: list[str] = []
    t = node.get("type")
    if isinstance(t, list):
        parts.append(" or ".join(t))
    elif isinstance(t, str):
        parts.append(t)
    if "const" in node:
        parts.append(f"exactly {json.dumps(node['const'])}")
    if "enum" in node:
        parts.append("one of: " + ", ".join(str(v) for v in node["enum"]))
    for lo, hi, what in (("minimum", "maximum", "value"), ("minLength", "maxLength", "length"),
                         ("minItems", "maxItems", "items")):
        if lo in node or hi in node:
            parts.append(f"{what} {node.get(lo, '')}..{node.get(hi, '')}")
    if "pattern" in node and "description" not in node:
        parts.append(f"matching {node['pattern']}")
    if "default" in node:
        parts.append(f"default {json.dumps(node['default'])}")
    if isinstance(node.get("if"), dict) and "then" in node and "else" in node:
        parts.append(f"if {_kind(node['if']) or 'so'}: {_kind(node['then'])}; otherwise "
                     f"{_kind(node['else'])}")
    if "description" in node:
        parts.append(str(node["description"]))
    return "; ".join(p for p in parts if p)


def _condition(cond: Any) -> str:
    """`if: {properties: {type: {const: xdp}}}` -> "type is xdp" (else "")."""
    if not isinstance(cond, dict):
        return ""
    said = [f"{k} is {v['const']}" for k, v in cond.get("properties", {}).items()
            if isinstance(v, dict) and "const" in v]
    return " and ".join(said)


def _branches(node: Any, root: dict[str, Any], cond: str = "") -> Iterator[tuple[str, Any]]:
    """The node and every conditional or combined part of it (then/else, allOf/anyOf/oneOf),
    each with the condition it applies under."""
    node = _resolve(node, root)
    if not isinstance(node, dict):
        return
    yield cond, node
    when = _condition(node.get("if"))
    if "then" in node:
        yield from _branches(node["then"], root, when or cond)
    if "else" in node:
        yield from _branches(node["else"], root, f"not {when}" if when else cond)
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key, ()):
            yield from _branches(sub, root, cond)


def fields(schema: dict[str, Any]) -> Iterator[Field]:
    """Every field of a schema, depth first, as a dotted path ([] for array items); a field
    whose schema depends on a condition (program attach by type) once per variant."""

    def walk(node: Any, path: str, seen: tuple[str, ...]) -> Iterator[Field]:
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref in seen:
                return
            seen = (*seen, ref)
        parts = list(_branches(node, schema))
        required = set(parts[0][1].get("required", ()))
        variants: dict[str, list[tuple[str, Any]]] = {}
        for cond, part in parts:
            for key, sub in part.get("properties", {}).items():
                have = variants.setdefault(key, [])
                if all(_resolve(sub, schema) != _resolve(s, schema) for _, s in have):
                    have.append((cond, sub))
        for key, subs in variants.items():
            full = f"{path}.{key}" if path else key
            if len(subs) > 1:  # `attach: true` then per-type schemas: list the schemas
                subs = [(c, s) for c, s in subs if s is not True] or subs
            for cond, sub in subs:
                text = _kind(_resolve(sub, schema))
                if cond and len(subs) > 1:
                    text = f"when {cond}: {text}"
                yield Field(full, key in required, text)
                yield from walk(sub, full, seen)
        for _, part in parts:
            items = part.get("items")
            if isinstance(items, dict):
                yield from walk(items, f"{path}[]", seen)
            add = part.get("additionalProperties")
            if isinstance(add, dict):
                yield from walk(add, f"{path}.*", seen)
            for sub in part.get("patternProperties", {}).values():  # params: NAME -> {...}
                if isinstance(sub, dict):
                    yield from walk(sub, f"{path}.*", seen)

    yield from walk(schema, "", ())


def property_names(node: Any) -> set[str]:
    """Every key of every `properties` object anywhere in a schema (what a page must name)."""
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "properties" and isinstance(v, dict):
                out |= set(v)
            out |= property_names(v)
    elif isinstance(node, list):
        for v in node:
            out |= property_names(v)
    return out


_FORMAT_PAGES: dict[str, dict[str, str]] = {
    SETTINGS_SCHEMA: {
        "name": "loaderd.yaml",
        "summary": "loaderd daemon settings",
        "intro": ("/etc/loaderd/loaderd.yaml holds the settings of \\fBloaderd\\fR(8) and "
                  "\\fBloaderctl\\fR(8) (another file with \\fB\\-\\-config\\fR or "
                  "LOADERD_CONFIG). It must be owned by root and not writable by group or "
                  "others. Unknown keys are refused with the file, line and field named; "
                  "nothing is half-applied."),
        "files": ".TP\n/etc/loaderd/loaderd.yaml\nthe settings (a conffile of the package)",
        "see": "\\fBloaderd\\fR(8), \\fBloaderd\\-spec\\fR(5)",
    },
    SPEC_SCHEMA: {
        "name": "loaderd-spec",
        "summary": "loaderd eBPF program spec format",
        "intro": ("One spec per file in /etc/loaderd/programs.d/*.yaml, applied in name order "
                  "by \\fBloaderd apply\\fR (\\fBsystemctl reload loaderd\\fR). A spec "
                  "declares its maps, its programs and their attach points, and its C source "
                  "(BCC) or a precompiled CO\\-RE object. Unknown keys are refused with the "
                  "file, line and field named; a refused spec refuses the whole set."),
        "files": ".TP\n/etc/loaderd/programs.d/*.yaml\nthe specs\n"
                 ".TP\n/usr/share/doc/loaderd/examples/programs.d\nshipped examples",
        "see": "\\fBloaderd\\fR(8), \\fBloaderd.yaml\\fR(5), "
               "/usr/share/doc/loaderd/spec\\-format.md",
    },
}


def schema_page(schema_name: str) -> str:
    info = _FORMAT_PAGES[schema_name]
    schema = load_schema(schema_name)
    title = info["name"].upper().replace("-", "\\-")
    roff_name = info["name"].replace("-", "\\-")
    lines = [f'.TH {title} 5 "{_date()}" "{SOURCE}" "loaderd manual"',
             # Left-adjusted: long patterns cannot be justified without groff warnings.
             ".ad l",
             ".SH NAME", f"{roff_name} \\- {info['summary']}",
             ".SH DESCRIPTION", info["intro"]]
    if "description" in schema:
        lines += [".PP", esc(str(schema["description"]))]
    lines += [".SH FIELDS",
              "Each field by its path (\\fB[]\\fR: every item of a list); \\fB(required)\\fR "
              "where it must be present."]
    for f in fields(schema):
        head = "\\fB" + esc(f.path) + "\\fR" + (" (required)" if f.required else "")
        lines += [".TP", head, esc(f.text) if f.text else "\\&"]
    lines += [".SH FILES", info["files"], ".SH SEE ALSO", info["see"]]
    return "\n".join(lines) + "\n"


# -- bash completion ------------------------------------------------------------------------------

def _words(opts: Sequence[Option]) -> str:
    return " ".join(f for o in opts for f in o.flags)


def completion(p: argparse.ArgumentParser) -> str:
    """A bash completion function for a parser: subcommands, their options, option choices,
    file names where an option takes a path."""
    name = p.prog
    fn = "_" + name.replace("-", "_")
    glob = global_options(p)
    cmds = commands(p)
    valued = sorted({f for o in glob for f in o.flags if o.metavar}
                    | {f for c in cmds for o in c.options for f in o.flags if o.metavar})
    lines = [f"# bash completion for {name} (generated from its argparse parser by",
             "# loaderd.cli.docgen: do not edit)",
             f"{fn}() {{",
             "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}",
             "    local cmd='' i w",
             f"    local valued=' {' '.join(valued)} '",
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             "        w=${COMP_WORDS[i]}",
             '        if [[ $valued == *" $w "* ]]; then ((i++)); continue; fi',
             "        case $w in -*) ;; *) cmd=$w; break ;; esac",
             "    done",
             "    case $prev in"]
    choice_cases: dict[str, str] = {}
    for o in [*glob, *(o for c in cmds for o in c.options)]:
        for f in o.flags:
            if o.choices:
                choice_cases[f] = f"COMPREPLY=($(compgen -W '{' '.join(o.choices)}' -- \"$cur\"))"
            elif o.metavar and f not in choice_cases:
                choice_cases[f] = "COMPREPLY=($(compgen -f -- \"$cur\"))"
    for f, action in sorted(choice_cases.items()):
        lines.append(f"        {f}) {action}; return ;;")
    lines += ["    esac",
              '    if [[ -z $cmd ]]; then',
              '        if [[ $cur == -* ]]; then',
              f"            COMPREPLY=($(compgen -W '{_words(glob)}' -- \"$cur\"))",
              "        else",
              f"            COMPREPLY=($(compgen -W '{' '.join(c.name for c in cmds)}' -- "
              "\"$cur\"))",
              "        fi",
              "        return",
              "    fi",
              "    case $cmd in"]
    for c in cmds:
        files = any(not o.flags for o in c.options)
        rest = "COMPREPLY=($(compgen -f -- \"$cur\"))" if files else "COMPREPLY=()"
        lines.append(f"        {c.name}) if [[ $cur == -* ]]; then "
                     f"COMPREPLY=($(compgen -W '{_words(c.options)}' -- \"$cur\")); "
                     f"else {rest}; fi ;;")
    lines += ["    esac", "}", f"complete -F {fn} {name}", ""]
    return "\n".join(lines)


# -- the build step ------------------------------------------------------------------------------

def pages() -> dict[str, str]:
    """File name -> content of every man page."""
    d_parser, c_parser = loaderd.parser(), loaderctl.parser()
    return {
        "loaderd.8": cli_page(d_parser, loaderd.__doc__ or ""),
        "loaderctl.8": cli_page(c_parser, loaderctl.__doc__ or ""),
        "loaderd.yaml.5": schema_page(SETTINGS_SCHEMA),
        "loaderd-spec.5": schema_page(SPEC_SCHEMA),
    }


def completions() -> dict[str, str]:
    return {"loaderd": completion(loaderd.parser()), "loaderctl": completion(loaderctl.parser())}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python3 -m loaderd.cli.docgen OUTDIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    for sub, files in (("man", pages()), ("completion", completions())):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / sub / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
