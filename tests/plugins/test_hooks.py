"""Hook discovery, validation, ordering and stage calls."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from types import SimpleNamespace

import pytest

from hooktrain import hooks as hooks_mod
from hooktrain.errors import UserError
from hooktrain.hooks import Hook, HookError, build_hooks, call_hooks, discover_hooks, hooks_info


class Recorder(Hook):
    """Test hook that appends (name, stage) to a shared list."""

    calls: list = []

    def __init__(self, name: str, fail_in: str | None = None) -> None:
        self.name = name
        self.fail_in = fail_in

    def _hit(self, stage):
        if stage == self.fail_in:
            raise ValueError("boom")
        Recorder.calls.append((self.name, stage))

    def before_run(self, runner):
        self._hit("before_run")

    def after_train_iter(self, runner, outputs):
        self._hit("after_train_iter")

    def after_run(self, runner):
        self._hit("after_run")


class Early(Recorder):
    priority = 10


PATH = "test_hooks:Recorder"
EARLY = "test_hooks:Early"


def test_order_is_priority_then_recipe_order():
    Recorder.calls = []
    loaded = build_hooks(
        [
            {"type": PATH, "name": "a"},
            {"type": EARLY, "name": "early"},
            {"type": PATH, "name": "b"},
            {"type": PATH, "name": "first", "priority": "HIGHEST"},
            {"type": PATH, "name": "last", "priority": 99},
        ]
    )
    call_hooks(loaded, "after_train_iter", SimpleNamespace(), {})
    assert [name for name, _ in Recorder.calls] == ["first", "early", "a", "b", "last"]
    info = hooks_info(loaded)
    assert "after_train_iter" in info and "before_train_iter" not in info


def test_exception_in_hook_names_hook_and_stage():
    loaded = build_hooks([{"type": PATH, "name": "x", "fail_in": "after_run"}])
    with pytest.raises(HookError, match=r"hook 'test_hooks:Recorder' \(Recorder\) failed in after_run: ValueError: boom"):
        call_hooks(loaded, "after_run", SimpleNamespace())


def test_unknown_and_missing_options():
    with pytest.raises(UserError, match="unknown option 'hooks\\[0\\].nmae'.*did you mean 'name'"):
        build_hooks([{"type": PATH, "nmae": "a"}])
    with pytest.raises(UserError, match="hooks\\[0\\].name: required option of hook Recorder is missing"):
        build_hooks([{"type": PATH}])
    with pytest.raises(UserError, match="does not name a hooktrain.hooks.Hook subclass"):
        build_hooks([{"type": "test_hooks:PATH"}])
    with pytest.raises(UserError, match="cannot import"):
        build_hooks([{"type": "no_such_module_xyz:Hook"}])


def test_builtin_logger_is_an_entry_point():
    found = discover_hooks()
    assert found["logger"].distribution == "hooktrain"
    assert found["logger"].value == "hooktrain_plugins.logger:LoggerHook"
    assert found["logger"].description.startswith("Logs iteration")


def test_same_name_from_two_distributions_is_an_error(monkeypatch):
    def fake_entry_points(group):
        assert group == "hooktrain.hooks"
        eps = []
        for dist, value in (("dist-one", "a:Hook"), ("dist-two", "b:Hook")):
            ep = EntryPoint("ema", value, group)
            eps.append(ep._for(SimpleNamespace(name=dist)))
        return eps

    monkeypatch.setattr(hooks_mod, "entry_points", fake_entry_points)
    discover_hooks.cache_clear()
    try:
        with pytest.raises(UserError, match="'ema' is registered by two distributions, 'dist-one'.*'dist-two'"):
            discover_hooks()
    finally:
        discover_hooks.cache_clear()


class OwnEvaluator(Hook):
    """A plugin's own evaluation hook: it implements the Evaluator protocol, nothing else."""

    best_key = "mBoundaryIoU"

    def tracked_metrics(self, recipe=None) -> list[str]:
        return ["mBoundaryIoU"]

    def computes(self, key: str, recipe=None) -> bool:
        return key in self.tracked_metrics(recipe)

    def metric_hint(self, key: str) -> str:
        return " (OwnEvaluator computes only mBoundaryIoU)"


class LooksLikeOne(Hook):
    best_key = "mIoU"  # an attribute of the same name is not the protocol


def test_evaluators_are_found_by_the_declared_protocol_and_others_use_them():
    """The eval hook and a plugin's own evaluator are Evaluators; a hook with a stray
    ``best_key`` is not. early_stop and the checkpoint hook's save_best accept a plugin's
    evaluator, and refuse a key it does not compute with its hint."""
    from hooktrain.hooks import Evaluator, LoadedHook, evaluators

    own = LoadedHook("own", OwnEvaluator(), 30)
    stray = LoadedHook("stray", LooksLikeOne(), 30)
    [eval_hook] = build_hooks([{"type": "eval"}])
    assert isinstance(eval_hook.hook, Evaluator) and isinstance(own.hook, Evaluator)
    assert not isinstance(stray.hook, Evaluator)
    assert evaluators([stray, eval_hook, own]) == [eval_hook, own]
    assert eval_hook.hook.computes("mIoU") and not eval_hook.hook.computes("loss")
    assert "loss: true" in eval_hook.hook.metric_hint("loss")

    recipe = SimpleNamespace(data=SimpleNamespace(binary=False, val=object()))
    [early_stop] = build_hooks([{"type": "early_stop", "key": "mBoundaryIoU"}])
    early_stop.hook.check_recipe(recipe, [own, early_stop])
    [watching_other] = build_hooks([{"type": "early_stop", "key": "mDice"}])
    with pytest.raises(UserError, match="OwnEvaluator computes only mBoundaryIoU"):
        watching_other.hook.check_recipe(recipe, [own, watching_other])
    with pytest.raises(UserError, match="no eval hook"):
        early_stop.hook.check_recipe(recipe, [stray, early_stop])
    [checkpoint] = build_hooks([{"type": "checkpoint", "save_best": "mBoundaryIoU"}])
    checkpoint.hook.check_recipe(recipe, [own, checkpoint])
    with pytest.raises(UserError, match="needs an eval hook"):
        checkpoint.hook.check_recipe(recipe, [stray, checkpoint])
