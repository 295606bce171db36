"""The shape of src/palm: no import cycles, no reaching into another module's private names, no module
too long to read in one sitting. Imports inside functions count: they are still dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "src"
PACKAGE = ROOT / "palm"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(name: str) -> tuple[set[str], list[str]]:
    """(palm modules that `name` imports, anywhere in it; "module.name" of each private name it takes
    from another palm module)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    edges, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "palm":
                    edges.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, is_package, node.level, node.module)
            if base.split(".")[0] != "palm":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from . import loop`: the submodule itself
                    edges.add(sub)
                    aliases[alias.asname or alias.name] = sub
                else:
                    edges.add(base)
                    if alias.name.startswith("_") and base != name:
                        private.append(f"{base}.{alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.endswith("__")
        ):
            private.append(f"{aliases[node.value.id]}.{node.attr}")
    return {e for e in edges if e in MODULES and e != name}, private


GRAPH = {name: imports(name) for name in MODULES}


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node][0]):
            # A package's __init__ gathers its modules; a module reaching back to its own package is the
            # ordinary `from . import x` of Python packages, not a cycle between concepts.
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_there_is_no_import_cycle():
    cycle = find_cycle()
    assert cycle is None, " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    taken = {name: private for name, (_, private) in GRAPH.items() if private}
    assert not taken, taken


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_is_short_enough_to_read(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines"


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A planted cycle and a planted private import are caught."""
    planted = {"palm.a": ({"palm.b"}, []), "palm.b": ({"palm.a"}, ["palm.a._secret"])}
    monkeypatch.setattr(__import__(__name__), "GRAPH", planted)
    assert find_cycle() == ["palm.a", "palm.b", "palm.a"]


MAX_ENTRIES = 12  # what `ls src/palm` shows besides __init__.py: the architecture, not a heap of modules


def packages() -> dict[str, set[str]]:
    """Each package of palm -> the packages its docstring says it may import ("May import: a, b.")."""
    table = {}
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        line = next((ln for ln in doc.splitlines() if ln.startswith("May import:")), None)
        assert line is not None, f"{init} does not say which packages it may import"
        names = line.removeprefix("May import:").strip().rstrip(".")
        allowed = (
            {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
            if names.startswith("every package")
            else set()
            if names == "nothing"
            else {n.strip() for n in names.split(",")}
        )
        table[init.parent.name] = allowed
    return table


def upward_imports(graph: dict, table: dict[str, set[str]]) -> list[str]:
    """ "module -> module" for each import of a package its own package may not import."""
    wrong = []
    for name, (edges, _) in graph.items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in table:
            continue  # palm's own __init__ gathers the public names
        for target in sorted(edges):
            other = target.split(".")[1] if target.count(".") else None
            if other is not None and other != parts[1] and other not in table[parts[1]]:
                wrong.append(f"{name} -> {target}")
    return wrong


def test_src_palm_shows_the_architecture():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name not in ("__init__.py", "__pycache__"))
    assert len(entries) <= MAX_ENTRIES, entries
    assert all((PACKAGE / e / "__init__.py").exists() for e in entries), "only packages beside __init__.py"


def test_every_package_imports_only_what_its_docstring_allows():
    table = packages()
    assert set(table) >= {
        "model",
        "core",
        "text",
        "data",
        "weights",
        "inference",
        "training",
        "evaluate",
        "export",
        "serve",
        "cli",
    }
    for pkg, allowed in table.items():
        assert allowed <= set(table), f"palm/{pkg} names packages that do not exist: {allowed - set(table)}"
    assert upward_imports(GRAPH, table) == []


def test_the_package_check_can_fail():
    """A planted import of training from core, which sits below it, is caught."""
    planted = {**GRAPH, "palm.core.errors": ({"palm.training.loop"}, [])}
    assert upward_imports(planted, packages()) == ["palm.core.errors -> palm.training.loop"]


def test_the_architecture_page_names_every_package():
    page = (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = {line.split("`")[1] for line in page.splitlines() if line.startswith("| `palm/")}
    present = {f"palm/{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    assert sorted(present - listed) == [], "packages the architecture page does not describe"
    assert sorted(listed - present) == [], "the architecture page describes packages that are gone"
