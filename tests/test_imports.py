"""No import cycles between the modules of clip_jax, counting imports inside functions.

Python tolerates many cycles at run time (an import inside a function runs late), which is
exactly why they go unnoticed: this test reads the source with `ast`, so every `import` counts
wherever it sits. Only `if TYPE_CHECKING:` blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "clip_jax"


def module_names(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file under the package."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(base, names) of every import statement, anywhere in the file, as absolute names.

    `import a.b` is (a.b, []); `from a import b, c` is (a, [a.b, a.c]).
    """
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [f"{base}.{alias.name}" for alias in node.names]
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """Edges module -> the modules of the same package that it imports."""
    modules = module_names(package_dir)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = set()
        for base, names in _imports(tree, name, is_package):
            # `from pkg import submodule` loads the submodule; `from pkg import name` runs
            # pkg/__init__.py to find the name.
            submodules = [n for n in names if n in modules]
            targets.update(submodules if submodules else [base])
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_clip_jax_has_no_import_cycles():
    cycles = find_cycles(import_graph(ROOT))
    assert not cycles, "import cycles (modules that reach each other): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def _write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    package = root / "pkg"
    for rel, text in files.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


@pytest.mark.parametrize(
    "files, expected",
    [
        # A cycle hidden behind an import inside a function is still a cycle.
        (
            {
                "__init__.py": "",
                "a.py": "from pkg import b\n",
                "b.py": "def f():\n    from pkg.a import x\n",
            },
            [["pkg.a", "pkg.b"]],
        ),
        # Relative imports resolve against the importing module's package.
        (
            {
                "__init__.py": "",
                "sub/__init__.py": "",
                "sub/c.py": "from . import d\n",
                "sub/d.py": "from ..sub import c\n",
            },
            [["pkg.sub.c", "pkg.sub.d"]],
        ),
        # Type-only imports never run, and a one-way import is not a cycle.
        (
            {
                "__init__.py": "",
                "a.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg import b\n",
                "b.py": "import pkg.a\n",
            },
            [],
        ),
    ],
)
def test_cycle_finder_on_known_packages(tmp_path, files, expected):
    assert find_cycles(import_graph(_write_package(tmp_path, files))) == expected
