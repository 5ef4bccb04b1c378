"""Hooks: the plugin surface of the runner.

Before anything is written, two checks let a hook refuse a run that cannot work::

    check_recipe(recipe, hooks)                 # when the recipe is validated (hooktrain config too)
    check_run(runner)                           # runner built, work dir not yet touched

Then the loop, exactly as ``IterRunner.run`` executes it, with the stage each hook method fires at::

    before_run(runner)                          # after the model, optimizer and data are ready
    try:
        while state.iter < state.max_iters and not (runner.stop_requested or runner.finish_requested):
            before_train_iter(runner)
            for each of train.grad_accum_steps micro-batches:   # hooktrain.engine.step.train_step
                batch = next(train_stream)       # resumable stream; passes are invisible
                image, mask = model.input_stage(batch, device)  # gpu_augment runs here
                with accelerator.accumulate(model):
                    outputs = model(image, mask) # dict of named loss terms, summed into "loss"
                    accelerator.backward(loss)
            clip (or measure) the gradient norm
            ranks agree: stop signal? non-finite terms? same term names?  (hooktrain.engine.agreement)
            optimizer.step() unless non-finite; optimizer.zero_grad(); scheduler.step()
            state.iter += 1
            model.schedule(state.iter)           # a family's own schedule (EoMT's mask annealing); also before the loop
            after_train_iter(runner, outputs)    # eval, then checkpoint, then logging
                before_val(runner)               #   fired by an evaluating hook around
                after_val(runner, metrics)       #   its validation pass (runner.validate)
    finally:
        after_run(runner)                        # also on an exception, SIGTERM or SIGINT, and after
                                                 # runner.request_finish(reason) (early stopping)

    on_log(runner, values, step)                 # whenever anything calls runner.log(...)

Every method receives the runner (the ``Runner`` protocol below), which exposes
``accelerator``, ``model``, ``optimizer``, ``scheduler``, ``train_stream``, ``state`` (a
``TrainState``), ``work_dir``, ``recipe``, ``log()`` and ``request_finish(reason)``: a hook
that calls it on every rank at the same iteration ends the loop after that iteration, like a
finished run (exit code 0). Hooks run in ascending ``priority`` (lower first), ties in recipe
order, so an evaluation hook (``HIGH``) publishes its metrics before a checkpoint hook
(``NORMAL``) reads them in the same iteration. A hook that carries state across a resume
implements ``state_dict`` / ``load_state_dict``.

Hooks are found through the ``hooktrain.hooks`` entry-point group (``type: NAME`` in a recipe)
or imported directly (``type: package.module:Class``). Installing a plugin never activates it:
only a recipe does.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import logging
import typing
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pydantic

from hooktrain.errors import RunError, UserError, did_you_mean, disk_full, key_path, locate

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

logger = logging.getLogger("hooktrain")

ENTRY_POINT_GROUP = "hooktrain.hooks"
STAGES = (
    "before_run",
    "before_train_iter",
    "after_train_iter",
    "before_val",
    "after_val",
    "on_log",
    "after_run",
)
PRIORITIES = {
    "HIGHEST": 0,
    "VERY_HIGH": 10,
    "HIGH": 30,
    "ABOVE_NORMAL": 40,
    "NORMAL": 50,
    "BELOW_NORMAL": 60,
    "LOW": 70,
    "VERY_LOW": 90,
    "LOWEST": 100,
}


@dataclass
class TrainState:
    """What the loop knows about its progress (``runner.state``); saved with every checkpoint."""

    iter: int = 0
    max_iters: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # latest validation metrics
    best: dict[str, Any] = field(default_factory=dict)  # e.g. {"mIoU": 0.71, "iter": 4000}
    nonfinite_skips: int = 0  # optimizer steps skipped in a row (train.on_nonfinite: skip)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Runner(Protocol):
    """What a hook may use of the runner (``hooktrain.engine.runner.IterRunner`` implements it)."""

    accelerator: Accelerator
    model: torch.nn.Module  # prepared by the accelerator (DDP, compiled, ...)
    optimizer: torch.optim.Optimizer | None  # None in ``hooktrain test``
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_stream: Iterator[dict[str, torch.Tensor]] | None  # a hooktrain.data.stream.TrainStream
    hooks: list[LoadedHook]
    state: TrainState
    # a hooktrain.recipe.schema.Recipe; not imported here, as the recipe imports this module to
    # check its hooks' options
    recipe: Any
    work_dir: Path
    stop_requested: str | None  # a stop signal's name or "data outage", once every rank knows it
    finish_requested: str | None  # the reason a hook gave request_finish, once one did
    error: BaseException | None  # what ended the loop, if it failed

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The model without its DDP/compile wrappers; under FSDP its parameters are shards."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole weights on the main process (``{}`` elsewhere); every rank calls it."""

    def whole_model(self) -> AbstractContextManager[torch.nn.Module]:
        """A context giving the model with its whole weights for inference without collectives
        (under FSDP a plain copy); every rank enters it together."""

    def call_hooks(self, stage: str, *args: Any) -> None: ...

    def log(self, values: dict[str, Any], step: int | None = None) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Progress, hook states and stream position (what a checkpoint adds to Accelerate's)."""

    def load_state_dict(self, state: dict[str, Any]) -> str:
        """Restore :meth:`state_dict`'s parts; returns how the stream resumed."""

    def request_finish(self, reason: str) -> None:
        """End the loop after the current iteration, like a finished run (``after_run``
        fires, the final checkpoint is saved, exit code 0); every rank must call it at the
        same iteration."""


@runtime_checkable
class Evaluator(Protocol):
    """What hooks may ask of a hook that evaluates (the eval hook, or a plugin's own).

    The checkpoint hook's ``save_best`` and the early_stop hook find evaluators with
    :func:`evaluators` (``isinstance(hook, Evaluator)``), never by probing attributes; a plugin
    that evaluates implements these members to work with them.
    """

    best_key: str  # the metric whose best value it keeps in ``runner.state.best``

    def tracked_metrics(self, recipe: Any = None) -> list[str]:
        """The scalar metrics every evaluation logs (as ``val/<name>``) for ``recipe``."""

    def computes(self, key: str, recipe: Any = None) -> bool:
        """Whether evaluations log ``key``: one of :meth:`tracked_metrics`, or a key only known
        once computed (such as an ``evaluate`` module's ``<module>/<name>``)."""

    def metric_hint(self, key: str) -> str:
        """How to make it compute a ``key`` it does not (appended to errors), or ``""``."""


def evaluators(hooks: list[LoadedHook]) -> list[LoadedHook]:
    """The hooks of ``hooks`` that evaluate (:class:`Evaluator`), in run order."""
    return [h for h in hooks if isinstance(h.hook, Evaluator)]


class Hook:
    """Base class of every hook. Override only the stages you need; all are no-ops here.

    Constructor keyword arguments are the hook's recipe options: they are type-checked from
    the ``__init__`` annotations and unknown ones are rejected with a did-you-mean.
    """

    #: Lower runs first. A recipe may override it with ``priority:`` (a number or a name
    #: from ``PRIORITIES``).
    priority: int = PRIORITIES["NORMAL"]

    def check_recipe(self, recipe: Any, hooks: list[LoadedHook]) -> None:
        """Refuse settings that cannot work with the rest of the recipe or with the other
        ``hooks`` (in run order) by raising ``UserError``. Runs whenever a recipe is validated,
        ``hooktrain config`` included, before anything is built: keep it cheap, read no data."""

    def check_run(self, runner: Runner) -> None:
        """Find problems that would fail the run later (bad validation data, say) and raise
        ``UserError``. Runs on every rank once the runner is built, before the run writes to
        its work dir; write nothing here."""

    def before_run(self, runner: Runner) -> None:
        """Once, before the first iteration (also on resume)."""

    def before_train_iter(self, runner: Runner) -> None:
        """Before each iteration's first micro-batch is drawn."""

    def after_train_iter(self, runner: Runner, outputs: dict[str, Any]) -> None:
        """After each optimizer step; ``runner.state.iter`` is already the finished count."""

    def before_val(self, runner: Runner) -> None:
        """Before a validation pass."""

    def after_val(self, runner: Runner, metrics: dict[str, Any]) -> None:
        """After a validation pass, with its metrics (also in ``runner.state.metrics``)."""

    def on_log(self, runner: Runner, values: dict[str, Any], step: int) -> None:
        """Whenever ``runner.log(values)`` is called (on every rank; check
        ``runner.accelerator.is_main_process`` before writing anything)."""

    def after_run(self, runner: Runner) -> None:
        """Once at the end, also when the run failed or was interrupted."""

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a resume (saved with the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


@dataclass(frozen=True)
class HookInfo:
    """A discoverable hook: its recipe name, where it comes from, and its description."""

    name: str
    value: str
    distribution: str

    def load(self) -> type[Hook]:
        return _import_hook_class(self.value, what=f"hook '{self.name}' from {self.distribution}")

    @property
    def description(self) -> str:
        """The first line of the hook class's docstring, read from its source file without
        importing the plugin (so listing plugins costs no torch import); imported only when
        the source cannot be read."""
        module_name, _, attr = self.value.partition(":")
        try:
            spec = importlib.util.find_spec(module_name)
            tree = ast.parse(Path(spec.origin).read_text())
            node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == attr)
            doc = ast.get_docstring(node) or ""
        except (ImportError, AttributeError, TypeError, OSError, SyntaxError, StopIteration, ValueError):
            doc = inspect.getdoc(self.load()) or ""
        return doc.splitlines()[0] if doc else ""


def _distribution_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown distribution>"


@cache
def discover_hooks() -> dict[str, HookInfo]:
    """All hooks registered in the ``hooktrain.hooks`` entry-point group (nothing is imported).

    The same name offered by two distributions is an error naming both.
    """
    found: dict[str, HookInfo] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        info = HookInfo(ep.name, ep.value, _distribution_name(ep))
        other = found.get(ep.name)
        if other is not None and other != info:
            raise UserError(
                f"hook name '{ep.name}' is registered by two distributions, "
                f"'{other.distribution}' ({other.value}) and '{info.distribution}' ({info.value}); "
                "uninstall one of them or use 'module:Class' in the recipe"
            )
        found[ep.name] = info
    return found


def _import_hook_class(path: str, what: str) -> type[Hook]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import {what}: {exc}; check the package is installed") from exc
    try:
        cls = getattr(module, attr) if attr else None
    except AttributeError:
        cls = None
    if not (inspect.isclass(cls) and issubclass(cls, Hook)):
        raise UserError(f"{what}: '{path}' does not name a hooktrain.hooks.Hook subclass")
    return cls


def resolve_hook_class(type_name: str) -> type[Hook]:
    """Turn a recipe ``type`` (entry-point name or ``module:Class``) into the hook class."""
    if ":" in type_name:
        return _import_hook_class(type_name, what=f"hook '{type_name}'")
    available = discover_hooks()
    if type_name not in available:
        names = ", ".join(sorted(available)) or "none installed"
        raise UserError(
            f"unknown hook type '{type_name}'{did_you_mean(type_name, available)}; "
            f"available hooks: {names} (or use 'package.module:Class')"
        )
    return available[type_name].load()


@cache
def _arguments_model(cls: type[Hook]) -> type[pydantic.BaseModel]:
    """A strict pydantic model of the hook's ``__init__`` keyword arguments."""
    signature = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    fields: dict[str, Any] = {}
    for name, param in list(signature.parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(name, Any)
        default = ... if param.default is param.empty else param.default
        fields[name] = (annotation, default)
    return pydantic.create_model(
        f"{cls.__name__}Options", __config__=pydantic.ConfigDict(extra="forbid"), **fields
    )


def parse_priority(value: int | str, where: str) -> int:
    if isinstance(value, int):
        return value
    if value in PRIORITIES:
        return PRIORITIES[value]
    raise UserError(
        f"{where}: unknown priority '{value}'{did_you_mean(value, PRIORITIES)}; "
        f"use a number or one of {', '.join(PRIORITIES)}"
    )


def validate_hook_options(cls: type[Hook], options: dict[str, Any], where: str) -> dict[str, Any]:
    """Check recipe options against the hook's constructor; return them validated.
    ``where`` is the hook's place in the recipe (``hooks[0]``), the prefix of every key named."""
    model = _arguments_model(cls)
    try:
        return dict(model.model_validate(options))
    except pydantic.ValidationError as exc:
        error = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # typos first
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            path, valid = locate(model, options, loc[:-1])
            nested = f" {key_path([where, *path])}" if path else ""
            raise UserError(
                f"unknown option '{key_path([where, *path, loc[-1]])}' for hook {cls.__name__}"
                f"{did_you_mean(str(loc[-1]), valid)}; valid options{nested}: {', '.join(valid) or 'none'}"
            ) from None
        key = key_path([where, *locate(model, options, loc)[0]])
        if error["type"] == "missing":
            raise UserError(f"{key}: required option of hook {cls.__name__} is missing") from None
        raise UserError(f"{key}: {error['msg']} (got {error.get('input')!r})") from None


@dataclass
class LoadedHook:
    """A hook instance with the name and priority it runs under."""

    name: str
    hook: Hook
    priority: int


def build_hooks(specs: list[dict[str, Any]]) -> list[LoadedHook]:
    """Instantiate the recipe's hooks and sort them by priority, ties in recipe order."""
    loaded = []
    for index, spec in enumerate(specs):
        options = dict(spec)
        type_name = options.pop("type")
        priority = options.pop("priority", None)
        cls = resolve_hook_class(type_name)
        where = f"hooks[{index}]"
        hook = cls(**validate_hook_options(cls, options, where))
        rank = parse_priority(priority, where) if priority is not None else cls.priority
        loaded.append(LoadedHook(type_name, hook, rank))
    return sorted(loaded, key=lambda h: h.priority)  # sorted() is stable: recipe order on ties


class HookError(RuntimeError):
    """An exception raised inside a hook, re-raised with the hook's name and stage."""


def _overrides(hook: Hook, stage: str) -> bool:
    return getattr(type(hook), stage) is not getattr(Hook, stage)


def call_hooks(
    hooks: list[LoadedHook],
    stage: str,
    *args: Any,
    enter: Callable[[str], None] | None = None,
) -> None:
    """Call ``stage`` on every hook in order; an exception names the hook that raised it.
    ``enter`` is told each call's name (``hook 'eval' (after_train_iter)``) before it."""
    for loaded in hooks:
        if not _overrides(loaded.hook, stage):
            continue
        if enter is not None:
            enter(f"hook '{loaded.name}' ({stage})")
        try:
            getattr(loaded.hook, stage)(*args)
        except UserError as exc:
            raise UserError(f"hook '{loaded.name}' ({stage}): {exc}") from exc
        except RunError:
            raise
        except Exception as exc:
            near = getattr(args[0], "work_dir", None) if args else None  # the runner's
            full = disk_full(exc, what=f"hook '{loaded.name}' ({stage}): a file", near=near)
            if full is not None:
                raise full from exc
            raise HookError(
                f"hook '{loaded.name}' ({type(loaded.hook).__name__}) failed in {stage}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def hook_state_keys(hooks: list[LoadedHook]) -> list[tuple[str, LoadedHook]]:
    """Checkpoint keys of the hooks' states: the hook's name, with ``#k`` for its k-th
    repetition, so adding or removing other hooks between runs keeps states matched."""
    seen: dict[str, int] = {}
    keys = []
    for loaded in hooks:
        count = seen.get(loaded.name, 0)
        seen[loaded.name] = count + 1
        keys.append((loaded.name if count == 0 else f"{loaded.name}#{count}", loaded))
    return keys


def hooks_info(hooks: list[LoadedHook]) -> str:
    """The resolved order per stage, as printed at start-up."""
    lines = []
    for stage in STAGES:
        names = [f"{h.name}({h.priority})" for h in hooks if _overrides(h.hook, stage)]
        if names:
            lines.append(f"  {stage:<18} {' -> '.join(names)}")
    return "hook order:\n" + ("\n".join(lines) if lines else "  (no hooks)")
