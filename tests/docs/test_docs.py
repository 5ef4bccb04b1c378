"""The docs stay true: the generated recipe reference is current, every recipe in the docs
resolves, and the README keeps exactly its two set-up commands."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import ROOT, ensure_installed, run_cli

from hooktrain.recipe.reference import recipe_reference
from hooktrain.recipe.schema import load_recipe

DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_recipe_reference_is_current():
    written = (ROOT / "docs" / "recipes.md").read_text()
    assert written == recipe_reference(), "docs/recipes.md is stale: run `hooktrain reference > docs/recipes.md`"


def test_benchmark_tables_come_from_the_results_files():
    """Every generated block of docs/benchmarks.md and README.md is what bench/report.py makes
    of bench/results/*.json, and every bench the report knows has a block on the page."""
    import runpy

    report = runpy.run_path(str(ROOT / "bench" / "report.py"))
    for doc in report["DOCS"]:
        written = doc.read_text()
        assert written == report["render"](written), f"{doc.name} is stale: run `python bench/report.py`"
    blocks = set(re.findall(r"<!-- generated: ([a-z0-9_]+) -->", (ROOT / "docs" / "benchmarks.md").read_text()))
    assert blocks == {"summary", *report["BENCHES"]}
    assert "<!-- generated: quickstart_readme -->" in (ROOT / "README.md").read_text()


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2
    assert "python -m hooktrain recipes/quickstart.yaml" in commands[0]
    assert "pytest" in commands[1]
    assert "test-command" in (ROOT / ".ci" / "run").read_text()


def documented_recipe_commands() -> list[tuple[str, list[str]]]:
    """Every `hooktrain RECIPE ...` / `python -m hooktrain RECIPE ...` line in the docs."""
    found = []
    for page in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#", 1)[0].strip()
                match = re.search(r"(?:-m hooktrain|^hooktrain) (recipes/\S+\.yaml.*)", line)
                if match:
                    found.append((page.name, shlex.split(match.group(1))))
    return found


def test_the_docs_show_recipe_commands_with_overrides():
    """The test below has something to check: the pages' runs, overrides included, are found."""
    commands = documented_recipe_commands()
    assert ("README.md", ["recipes/quickstart.yaml"]) in commands
    assert sum("--cfg-options" in args for _, args in commands) >= 5


def holds(got, want) -> bool:
    """``got`` (resolved recipe data) has ``want`` (an override's YAML value): mappings may
    carry more keys (the section's defaults), numbers compare as numbers."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and holds(got[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(holds, got, want))
    return got == want


@pytest.mark.parametrize("page, args", documented_recipe_commands())
def test_documented_recipes_and_overrides_resolve(page, args):
    """Each documented run's recipe and --cfg-options validate (what `hooktrain config` does),
    and every override, and --work-dir, is what the resolved recipe then holds."""
    import yaml

    ensure_installed("hooktrain-ema", ROOT / "examples" / "hooktrain-ema")
    recipe, rest = args[0], args[1:]
    options = []
    if "--cfg-options" in rest:
        options = rest[rest.index("--cfg-options") + 1 :]
        options = [o for o in options if "=" in o and not o.startswith("-")]
    work_dir = rest[rest.index("--work-dir") + 1] if "--work-dir" in rest else None
    resolved = load_recipe(ROOT / recipe, options, work_dir)  # a UserError names the key on any problem
    assert resolved.work_dir == (work_dir or f"work_dirs/{(ROOT / recipe).stem}")
    data = resolved.to_dict()
    for option in options:
        key, _, raw = option.partition("=")
        got = data
        for part in key.replace("[", ".").replace("]", "").split("."):
            got = got[int(part)] if isinstance(got, list) else got[part]
        assert holds(got, yaml.safe_load(raw)), f"{page}: {option} resolved to {got!r}"


def test_config_command_runs_like_the_docs_say():
    result = run_cli("config", "recipes/ade20k.yaml", "--cfg-options", "data.train.batch_size=4")
    assert result.returncode == 0, result.stderr
    assert "batch_size: 4" in result.stdout and "num_classes: 150" in result.stdout
