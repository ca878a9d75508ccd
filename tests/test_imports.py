"""The package's import graph: no cycle, no import from a lower layer to a higher one, and imports of the
package's own modules at the top of a module, where a reader sees them.

The graph is read from the source with `ast` (nothing is imported): every `import` and `from ... import` of a
`magic_align` module, at module level (including `if TYPE_CHECKING:` blocks) and inside functions. Importing
`a.b.c` also runs the package `a.b`, so an import from outside a package counts as an import of the package too.
The layer table is the one in docs/architecture.md; keep the two together.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "magic_align"
ROOT = "magic_align"

# Lowest first. A module may import modules of its own layer (without a cycle) and of the layers above it in
# this list, never of a layer below it. A module belongs to the longest prefix it matches.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "plugins", "stats", "progress", "diffusion.architecture_specs")),
    ("configuration", ("config",)),
    ("run directory", ("run",)),
    ("records", ("ledger", "checklists", "data")),
    ("models", ("diffusion", "backbones")),
    ("judges", ("judges",)),
    ("sampling stages", ("sample", "synthesize", "judge")),
    ("pairs", ("feedback",)),
    ("training", ("train",)),
    ("evaluation", ("evaluate",)),
    ("review", ("review",)),
    ("pipeline", ("pipeline",)),
    ("plug-in", ("demo",)),
    ("command line", ("cli", "__main__")),
]

# The command line imports a stage inside the command that runs it, so that `magic --help` and `magic config`
# stay fast (torch alone takes about a second to import, numpy and scipy a tenth each). Allowed only in cli.py,
# and only for modules that load one of HEAVY when imported (`test_command_line_defers_only_heavy_modules`).
LAZY_IN_CLI = "magic_align.cli"
HEAVY = ("torch", "numpy", "scipy", "fastapi", "httpx")
# Any other import of a package module inside a function: "importer -> imported": why. Keep it empty.
FUNCTION_LEVEL_ALLOWED: dict[str, str] = {}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    path: Path
    line: int
    in_function: bool
    type_only: bool
    implied: bool  # a package run because a module inside it is imported (its layer is not checked)

    def where(self) -> str:
        return f"{self.path.relative_to(PACKAGE.parent)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[tuple[str, bool]]:
    """The package modules an import statement runs, each with whether it is only implied: the named module (or
    the imported submodule), and every package above it that is not also above the importer (implied)."""
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        module = _resolve(importer, is_package, node)
        named = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module for alias in node.names]
    found = []
    own_packages = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    for name in named:
        if not (name == ROOT or name.startswith(ROOT + ".")):
            continue
        parts = name.split(".")
        for i in range(2, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in MODULES and (prefix == name or prefix not in own_packages) and prefix != importer:
                found.append((prefix, prefix != name))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def package_imports() -> list[Edge]:
    edges: list[Edge] = []
    for importer, path in MODULES.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for imported, implied in _targets(importer, is_package, node):
                    edges.append(Edge(importer, imported, path, node.lineno, in_function, type_only, implied))
            for child in ast.iter_child_nodes(node):
                visit(
                    child,
                    in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                    type_only or (isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body),
                )

        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, False)
    return edges


def layer_of(module: str) -> int:
    relative = module.removeprefix(ROOT + ".")
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (relative == prefix or relative.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_imports.py and to docs/architecture.md")
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


EDGES = package_imports()


def test_every_module_has_a_layer():
    for module in MODULES:
        if module != ROOT:
            layer_of(module)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for edge in EDGES:
        graph.setdefault(edge.importer, set()).add(edge.imported)
    cycle = find_cycle(graph)
    if cycle:
        steps = []
        for importer, imported in zip(cycle, cycle[1:]):
            where = next(edge.where() for edge in EDGES if edge.importer == importer and edge.imported == imported)
            steps.append(f"{importer} -> {imported} ({where})")
        pytest.fail("import cycle:\n  " + "\n  ".join(steps))


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [
        f"{edge.where()}: {edge.importer} ({LAYERS[layer_of(edge.importer)][0]}) imports {edge.imported} "
        f"({LAYERS[layer_of(edge.imported)][0]})"
        for edge in EDGES
        if edge.importer != ROOT and not edge.implied and layer_of(edge.imported) > layer_of(edge.importer)
    ]
    assert not upward, "upward imports:\n  " + "\n  ".join(upward)


def test_package_modules_are_imported_at_the_top():
    hidden = [
        f"{edge.where()}: {edge.importer} imports {edge.imported} inside a function"
        for edge in EDGES
        if edge.in_function and not edge.implied and edge.importer != LAZY_IN_CLI
        and f"{edge.importer} -> {edge.imported}" not in FUNCTION_LEVEL_ALLOWED
    ]
    assert not hidden, "imports inside functions (move them to the top of the module):\n  " + "\n  ".join(hidden)


def _loads_heavy(module: str, seen: set[str] | None = None) -> bool:
    """Whether importing `module` imports one of HEAVY, directly or through the package modules it imports at the
    top."""
    seen = set() if seen is None else seen
    if module in seen:
        return False
    seen.add(module)
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] in HEAVY for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in HEAVY:
            return True
    return any(_loads_heavy(edge.imported, seen) for edge in EDGES
               if edge.importer == module and not edge.in_function and not edge.type_only)


def test_command_line_defers_only_heavy_modules():
    needless = sorted({
        f"{edge.where()}: {edge.imported}" for edge in EDGES
        if edge.importer == LAZY_IN_CLI and edge.in_function and not edge.implied and not _loads_heavy(edge.imported)
    })
    assert not needless, (f"cli.py imports these inside a command, but they load none of {HEAVY}; import them at "
                          "the top:\n  " + "\n  ".join(needless))
    assert not _loads_heavy(LAZY_IN_CLI), f"importing magic_align.cli loads one of {HEAVY}: `magic --help` would be slow"


def test_the_checks_see_what_they_check():
    """The graph reader finds function-level, relative and package imports, and the cycle finder finds a cycle."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    source = "from .base import Verdict\n\ndef f():\n    from magic_align.ledger import Ledger\n"
    tree = ast.parse(source)
    relative, inside = tree.body[0], tree.body[1].body[0]
    assert _targets("magic_align.judges.rules", False, relative) == [("magic_align.judges.base", False)]
    assert _targets("magic_align.ledger", False, ast.parse("from magic_align.judges.base import Verdict").body[0]) == [
        ("magic_align.judges", True), ("magic_align.judges.base", False)]
    assert _targets("magic_align.judge", False, inside) == [("magic_align.ledger", False)]
    assert layer_of("magic_align.judges.base") > layer_of("magic_align.ledger")
