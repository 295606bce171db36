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
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.endswith("__")):
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
                return path[path.index(nxt):] + [nxt]
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


def test_the_readme_layout_names_every_module_and_package():
    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed = {line.split()[0] for line in section.splitlines() if line.startswith("src/palm/")}
    present = {f"src/palm/{p.name}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    present |= {f"src/palm/{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert sorted(present - listed) == [], "modules the README's layout does not describe"
    assert sorted(listed - present) == [], "the README's layout describes modules that are gone"
