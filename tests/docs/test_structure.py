"""The package's shape: no import circles, ``hooktrain`` never imports ``hooktrain_plugins``,
and the runner stays readable (at most 300 lines of code)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
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


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph ``edges`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_the_import_graph_has_no_circle():
    edges = graph()
    circle = find_circle(edges)
    assert circle is None, "import circle: " + " -> ".join(circle)
    assert "hooktrain.engine.runner" in edges and "hooktrain.checkpoint.state" in edges["hooktrain.engine.runner"]


def folder(module: str) -> str:
    """The top-level package (``recipe``, ``data``, ...) or top-level module (``cli``) of a
    module of hooktrain."""
    return module.split(".")[1] if "." in module else module


def folder_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, targets in graph().items():
        if name != "hooktrain":
            edges.setdefault(folder(name), set()).update(folder(t) for t in targets if t != "hooktrain")
    return {node: targets - {node} for node, targets in edges.items()}


def test_the_folders_import_each_other_without_a_loop():
    """The packages follow the data flow (recipe, data, models, engine, evaluation, checkpoint,
    deploy, tools): no package imports one that imports it back, however indirectly."""
    edges = folder_graph()
    circle = find_circle(edges)
    assert circle is None, "folders in a loop: " + " -> ".join(circle)
    assert {"recipe", "data", "models", "engine", "evaluation", "checkpoint", "deploy", "tools"} <= set(edges)
    assert "data" in edges["engine"] and "engine" not in edges["data"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_top_level_is_packages_and_at_most_five_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 5, modules


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
    assert code_lines(PACKAGE / "engine" / "runner.py") <= 300


def called(path: Path, name: str) -> bool:
    """Whether ``path`` calls a function or method named ``name``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) == name:
                return True
    return False


def callers(name: str) -> list[str]:
    return sorted(module_name(p) for p in [*PACKAGE.rglob("*.py"), *(ROOT / PLUGINS).rglob("*.py")] if called(p, name))


def test_each_step_is_written_once():
    """A recipe's segmentor is built by one function (``build_recipe_segmentor``), a loss is
    backpropagated by one train step (``hooktrain.engine.step``) and ``total_loss`` is the one
    loss-summing rule."""
    assert callers("build_segmentor") == ["hooktrain.models.segmentor"]
    assert callers("backward") == ["hooktrain.engine.step"]
    assert callers("total_loss") == ["hooktrain.engine.step"]
    assert "hooktrain.tools.benchmark" in callers("train_step")
    assert "hooktrain.engine.runner" in callers("train_step")


def test_a_modules_tests_share_one_worker(request):
    """Under README's ``-n 2 --dist loadgroup`` a module's tests (unless marked ``spread``) run on
    one pytest-xdist worker, so its module fixtures are built once (tests/conftest.py): xdist marks
    them by suffixing the group to the node id, which some pytest releases silently drop."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only under pytest-xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@test_structure"), request.node.nodeid
