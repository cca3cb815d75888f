"""The package's shape: no import circle between modules of ``moreau_pruner`` (function-level imports
included), and no module takes another subpackage's ``_private`` names.

Read from the source with ``ast`` (nothing is imported), so a circle hidden inside a function body
counts as much as one at the top of a module."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "python"
PACKAGE = "moreau_pruner"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if "templates" in parts:  # copied next to saved models, never imported from the package
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]):
    """(module imported, names taken from it) for every import statement of module ``name``."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            plain = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # ``from . import data``: the submodule itself
                    yield sub, []
                else:
                    plain.append(alias.name)
            if plain:
                yield target, plain


def graph():
    known = modules()
    edges, private = {}, []
    for name, path in known.items():
        out = set()
        for target, names in imports(name, path, known):
            if target not in known:
                raise AssertionError(f"{name} imports {target}, which is not a module of the package")
            if target != name:
                out.add(target)
            for n in names:
                if n.startswith("_") and not n.startswith("__") and \
                        target.split(".")[:2] != name.split(".")[:2]:
                    private.append(f"{name} imports {n} from {target}")
        edges[name] = out
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def without_package_init(edges):
    """The top-level ``__init__`` only re-exports the public API: an import of ``moreau_pruner``
    itself from inside is a use of that API, and would make every module one circle."""
    return {k: {t for t in v if t != PACKAGE} for k, v in edges.items() if k != PACKAGE}


def test_no_import_circle():
    edges, _ = graph()
    found = cycles(without_package_init(edges))
    assert not found, "import circles (function-level imports included): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_no_private_names_across_subpackages():
    _, private = graph()
    assert not private, "\n".join(private)


def test_nothing_inside_imports_the_package_root():
    edges, _ = graph()
    users = sorted(k for k, v in edges.items() if PACKAGE in v and k != PACKAGE)
    assert not users, f"modules importing the package root (use the module that defines the name): {users}"


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_circle_finder_finds_circles(edges, expected):
    assert cycles(edges) == expected
