"""The package's shape: no import circles, ``hooktrain`` never imports ``hooktrain_plugins``,
and the runner stays readable (at most 300 lines of code)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "hooktrain"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports anywhere (top level, functions, ``TYPE_CHECKING``)."""
    found = set()
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports(path):
            # `from hooktrain.data import x` depends on hooktrain.data (or on hooktrain.data.x)
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        edges[name] = targets
    return edges


def test_the_import_graph_has_no_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert "hooktrain.runner" in edges and "hooktrain.checkpoints" in edges["hooktrain.runner"]


PLUGINS = "hooktrain_plugins"  # the built-in hooks' package (the folder of the same name)


def imports_plugins(found: set[str]) -> bool:
    return any(i == PLUGINS or i.startswith(PLUGINS + ".") for i in found)


def test_hooktrain_never_imports_plugins():
    assert (ROOT / PLUGINS / "__init__.py").is_file()
    offenders = {module_name(p) for p in PACKAGE.rglob("*.py") if imports_plugins(imports(p))}
    assert not offenders


def test_the_plugins_guard_catches_every_import_form(tmp_path):
    """The check above would fail: each way of importing the plugins package is seen."""
    module = tmp_path / "hooktrain" / "module.py"
    module.parent.mkdir()
    for source in ("import hooktrain_plugins", "from hooktrain_plugins.logger import LoggerHook",
                   "def f():\n    import hooktrain_plugins.history as h", "from hooktrain_plugins import evaluation"):  # fmt: skip
        module.write_text(source + "\n")
        assert imports_plugins(imports(module, root=tmp_path)), source
    module.write_text("import hooktrain.plugins_like\nfrom hooktrain import plugins\n")
    assert not imports_plugins(imports(module, root=tmp_path))


def code_lines(path: Path) -> int:
    """Lines that are neither blank, comments nor docstrings."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(
        1
        for number, line in enumerate(source.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and number not in docstrings
    )


def test_the_runner_stays_under_300_lines_of_code():
    assert code_lines(PACKAGE / "runner.py") <= 300
