"""Recipe composition, overrides and validation errors."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from conftest import QUICKSTART, run_cli

from hooktrain.errors import UserError
from hooktrain.recipe.schema import apply_cfg_options, load_recipe, load_yaml, merge


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_merge_later_wins_and_mappings_merge():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    merged = merge(base, {"a": {"y": [3]}, "c": 2})
    assert merged == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # inputs untouched


def test_delete_replaces_instead_of_merging():
    merged = merge({"a": {"x": 1, "y": 2}}, {"a": {"_delete_": True, "z": 3}})
    assert merged == {"a": {"z": 3}}


def test_bases_are_recursive_relative_and_ordered(tmp_path):
    (tmp_path / "_base_").mkdir()
    write(tmp_path / "_base_" / "root.yaml", "a: {x: 1, y: 1}\nlist: [1]\n")
    write(tmp_path / "_base_" / "mid.yaml", "_base_: root.yaml\na: {y: 2}\n")
    write(tmp_path / "_base_" / "other.yaml", "a: {z: 3}\nlist: [2]\n")
    write(tmp_path / "top.yaml", "_base_: [_base_/mid.yaml, _base_/other.yaml]\na: {x: 9}\n")
    assert load_yaml(tmp_path / "top.yaml") == {"a": {"x": 9, "y": 2, "z": 3}, "list": [2]}


def test_base_cycle_and_missing_base_are_clear(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_yaml(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "_base_: missing.yaml\n")
    with pytest.raises(UserError, match="missing.yaml"):
        load_yaml(tmp_path / "c.yaml")


def test_cfg_options_parse_yaml_values_and_index_lists():
    cfg = {"train": {"max_iters": 10}, "hooks": [{"type": "logger", "interval": 5}]}
    out = apply_cfg_options(
        cfg, ["train.max_iters=7", "x.y=[1,2]", "hooks.0.interval=3", "z=null", "s=abc"]
    )
    assert out["train"]["max_iters"] == 7
    assert out["x"] == {"y": [1, 2]}
    assert out["hooks"][0]["interval"] == 3
    assert out["z"] is None and out["s"] == "abc"
    with pytest.raises(UserError, match="key.path=value"):
        apply_cfg_options(cfg, ["novalue"])
    with pytest.raises(UserError, match="not an index"):
        apply_cfg_options(cfg, ["hooks.4.interval=1"])


def test_quickstart_resolves_with_defaults():
    recipe = load_recipe(QUICKSTART, ["train.max_iters=12", "train.seed=3", "train.mixed_precision=no"])
    assert recipe.train.max_iters == 12 and recipe.train.seed == 3
    assert recipe.train.mixed_precision == "no"  # YAML's bare `no` is false
    assert recipe.work_dir == "work_dirs/quickstart"
    assert load_recipe(QUICKSTART, work_dir="elsewhere").work_dir == "elsewhere"


@pytest.mark.parametrize(
    "option, message",
    [
        ("train.max_iter=5", "unknown recipe key 'train.max_iter' (did you mean 'max_iters'?)"),
        ("optimizer.lr=fast", "recipe key 'optimizer.lr': Input should be a valid number"),
        ("train.mixed_precision=fp8", "recipe key 'train.mixed_precision'"),
        ("modle={}", "unknown recipe key 'modle' (did you mean 'model'?)"),
        ("hooks.0.intervall=3", "unknown option 'hooks[0].intervall' for hook LoggerHook (did you mean 'interval'?)"),
        ("hooks.0.type=loggr", "unknown hook type 'loggr' (did you mean 'logger'?)"),
        ("hooks.0.interval=many", "hooks[0].interval"),
        ("hooks.0.priority=SOON", "unknown priority 'SOON'"),
        ("optimizer.param_rules=[{pattern: '('}]", "not a valid regular expression"),
    ],
)
def test_validation_errors_name_the_key(option, message):
    with pytest.raises(UserError) as info:
        load_recipe(QUICKSTART, [option])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_nested_unknown_key_gets_full_path_and_suggestion():
    with pytest.raises(UserError) as info:
        load_recipe(QUICKSTART, ["data.train.batch_sise=2"])
    assert "'data.train.batch_sise'" in str(info.value)
    assert "did you mean 'batch_size'" in str(info.value)


def test_config_command_prints_resolved_recipe_and_errors_exit_2():
    ok = run_cli("config", str(QUICKSTART), "--cfg-options", "train.max_iters=42", "train.seed=3",
                 "--cfg-options", "train.max_iters=43")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)
    assert resolved["train"]["max_iters"] == 43 and resolved["train"]["seed"] == 3  # repeated flags add up
    assert resolved["hooks"][0]["type"] == "logger"
    bad = run_cli("config", str(QUICKSTART), "--cfg-options", "train.max_iter=5")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "did you mean 'max_iters'" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("config", "nope.yaml")
    assert missing.returncode == 2 and "recipe file not found: nope.yaml" in missing.stderr
