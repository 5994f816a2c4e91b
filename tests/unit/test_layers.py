"""The package's layers, read from the imports (ast): no cycle, no upward import, no import
between siblings. Function-level imports count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import loaderd

ROOT = Path(loaderd.__file__).parent

# Rank of each top-level unit (module or subpackage) of loaderd: an import must go to a lower
# rank, or stay inside its own unit. Equal ranks are siblings.
RANKS: dict[str, int] = {
    "errors": 0, "faults": 0,
    "sanitize": 1,
    "model": 2,
    "layout": 3, "policy": 3, "privileges": 3, "sandbox": 3,
    "config": 4, "bpf": 4, "store": 4, "audit": 4,
    "stage": 5, "observe": 5,
    "apply": 6, "runtime": 6, "reports": 6,
    "cli": 7,
    "__main__": 8,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("loaderd")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if not mod.startswith("loaderd"):
                continue
            # `from loaderd.bpf import kernel` depends on loaderd.bpf.kernel
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (ROOT.parent / sub.replace(".", "/")).is_dir() else mod)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path, name) if m != name}
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_unit_has_a_rank() -> None:
    units = {_unit(m) for m in _graph()} - {""}
    assert units <= set(RANKS), f"add to RANKS: {sorted(units - set(RANKS))}"


def test_no_upward_or_sibling_import() -> None:
    bad = []
    for mod, deps in _graph().items():
        src = _unit(mod)
        for dep in deps:
            dst = _unit(dep)
            if not src or not dst or src == dst:
                continue
            if RANKS[dst] >= RANKS[src]:
                bad.append(f"{mod} -> {dep} (rank {RANKS[src]} -> {RANKS[dst]})")
    assert not bad, "layer violations:\n" + "\n".join(sorted(bad))


def test_no_import_cycle() -> None:
    graph = _graph()
    seen: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue  # a package's __init__ is graph-listed; anything else is a module
            if seen.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in seen:
                visit(dep, [*stack, dep])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_subpackage_says_its_role_and_what_it_may_import() -> None:
    for init in ROOT.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init}: docstring must say what it may import"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: a lazy upward import in a function is found."""
    bad = tmp_path / "loaderd" / "bpf" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from loaderd.apply import applier\n")
    found = _imports(bad, "loaderd.bpf.x")
    assert "loaderd.apply.applier" in found or "loaderd.apply" in found


def test_test_file_names_are_unique() -> None:
    """pytest imports test files by basename (no __init__.py under tests/): two files of one
    name in unit/ and kernel/ break collection of the whole suite, as CI runs it."""
    tests = ROOT.parent / "tests"
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
