"""The iteration-based runner: one Accelerator, one loop, hooks around it."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from hooktrain.checkpoints import (
    CHECKPOINTS,
    clean_stale,
    complete_checkpoints,
    resolve_resume,
    save_plain_weights,
)
from hooktrain.data import build_train_stream, prepare_data
from hooktrain.errors import UserError
from hooktrain.hooks import LoadedHook, build_hooks, call_hooks, hooks_info
from hooktrain.models import build_segmentor
from hooktrain.optim import build_optimizer, build_scheduler
from hooktrain.recipe import Recipe, TrainConfig, dump_recipe

logger = logging.getLogger("hooktrain")

#: Exit codes of an interrupted run (shell convention 128 + signal number).
EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}
#: A repeat of the stopping signal within this many seconds is the same request, not a second.
_REPEAT_S = 2.0


@dataclass
class TrainState:
    """What the loop knows about its progress; saved with every checkpoint."""

    iter: int = 0
    max_iters: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # latest validation metrics
    best: dict[str, Any] = field(default_factory=dict)  # e.g. {"mIoU": 0.71, "iter": 4000}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def make_accelerator(cfg: TrainConfig, **kwargs: Any) -> Accelerator:
    """The run's Accelerator. fp16 without a CUDA GPU is refused (Accelerate would silently
    train in fp32)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cfg.mixed_precision == "fp16" and (use_cpu or not torch.cuda.is_available()):
        raise UserError(
            "train.mixed_precision: fp16 needs a CUDA GPU and none is in use; "
            "use bf16 (autocasts on CPU too) or 'no'"
        )
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        **kwargs,
    )


def setup_logging(is_main_process: bool) -> None:
    """Info lines from the main process only; warnings from every rank."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if is_main_process else logging.WARNING)
    logger.propagate = False


class IterRunner:
    """Trains ``model`` for ``state.max_iters`` optimizer steps, calling ``hooks`` around it.

    Build one from a recipe with ``IterRunner.from_recipe``; the constructor only assembles
    ready parts (so tests and benchmarks can pass their own). ``model`` and ``optimizer``
    must already be prepared by ``accelerator``; ``scheduler`` must not be (it steps once per
    optimizer step, whatever the number of processes).
    """

    def __init__(
        self,
        *,
        recipe: Recipe,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        train_stream: Iterator[dict[str, torch.Tensor]] | None,
        hooks: list[LoadedHook],
        work_dir: str | os.PathLike,
    ) -> None:
        self.recipe = recipe
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_stream = train_stream
        self.hooks = hooks
        self.work_dir = Path(work_dir)
        self.state = TrainState(max_iters=recipe.train.max_iters)
        self.stop_requested: str | None = None  # the signal's name once one arrived
        self.error: BaseException | None = None  # what ended the loop, if it failed
        self._train_iter = iter(train_stream) if train_stream is not None else None
        self._clip = recipe.train.clip_grad_norm
        self._accum = recipe.train.grad_accum_steps
        # The LR reported in logs: the group without a multiplier (the recipe's lr).
        groups = optimizer.param_groups if optimizer is not None else []
        self._lr_group = next((i for i, g in enumerate(groups) if g.get("lr_mult", 1) == 1), 0)

    @classmethod
    def from_recipe(
        cls, recipe: Recipe, *, resume: str | None = None, force: bool = False
    ) -> IterRunner:
        """Build everything a recipe describes: accelerator, data, model, optimizer, hooks.

        ``resume`` is ``"auto"`` (the newest complete checkpoint of the work dir) or a
        checkpoint path; ``force`` starts over in a work dir that holds checkpoints (they are
        moved aside, never deleted).
        """
        accelerator = make_accelerator(recipe.train)
        setup_logging(accelerator.is_main_process)
        work_dir = Path(recipe.work_dir or "work_dirs/run")
        checkpoint = resolve_resume(work_dir, resume) if resume else None
        if checkpoint is None:
            _check_work_dir(work_dir, force)
        accelerator.wait_for_everyone()  # every rank checked before the main one moves things
        hooks = build_hooks([spec.model_dump(exclude_none=True) for spec in recipe.hooks])
        if accelerator.is_main_process:
            if checkpoint is None and force:
                _move_aside_old_checkpoints(work_dir)
            for name in clean_stale(work_dir):
                logger.warning("removed %s, left by an interrupted save", name)
            _write_atomically(work_dir / "recipe.yaml", dump_recipe(recipe))
        set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
        with accelerator.main_process_first():
            prepare_data(recipe.data)
        data = recipe.data
        model = build_segmentor(
            recipe.model, num_classes=data.num_classes, ignore_index=data.ignore_index
        )
        if recipe.load_from and checkpoint is None:
            load_weights(model, recipe.load_from, strict=False)
        if recipe.train.sync_bn and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = build_optimizer(model, recipe.optimizer)
        model, optimizer = accelerator.prepare(model, optimizer)
        save_plain_weights(accelerator)  # no DDP `module.` prefix in model.safetensors
        scheduler = build_scheduler(optimizer, recipe.schedule, recipe.train.max_iters)
        accelerator.register_for_checkpointing(scheduler)
        stream = build_train_stream(
            data,
            seed=recipe.train.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        runner = cls(
            recipe=recipe,
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_stream=stream,
            hooks=hooks,
            work_dir=work_dir,
        )
        if checkpoint is not None:
            runner.load_state(checkpoint)
        return runner

    @classmethod
    def for_evaluation(cls, recipe: Recipe, checkpoint: str | os.PathLike) -> IterRunner:
        """A runner that only predicts: the recipe's model with ``checkpoint``'s weights and
        the recipe's hooks, without optimizer or training data (``hooktrain test``)."""
        accelerator = make_accelerator(recipe.train)
        setup_logging(accelerator.is_main_process)
        hooks = build_hooks([spec.model_dump(exclude_none=True) for spec in recipe.hooks])
        with accelerator.main_process_first():
            prepare_data(recipe.data)
        model = build_segmentor(
            recipe.model, num_classes=recipe.data.num_classes, ignore_index=recipe.data.ignore_index
        )
        load_weights(model, checkpoint, strict=True)
        model = accelerator.prepare(model)
        return cls(
            recipe=recipe,
            accelerator=accelerator,
            model=model,
            optimizer=None,
            scheduler=None,
            train_stream=None,
            hooks=hooks,
            work_dir=recipe.work_dir or "work_dirs/run",
        )

    # -- what hooks use -------------------------------------------------------------------

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The model without its DDP/compile wrappers (for inference and saving)."""
        return self.accelerator.unwrap_model(self.model)

    def call_hooks(self, stage: str, *args: Any) -> None:
        """Fire ``stage`` on every hook in priority order."""
        call_hooks(self.hooks, stage, self, *args)

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Publish values at ``step`` (default: the current iteration) to every hook's
        ``on_log`` (the logger hooks write them: console, history file, trackers). Call it
        on every rank; only the main process writes."""
        step = self.state.iter if step is None else step
        self.call_hooks("on_log", values, step)

    # -- state -----------------------------------------------------------------------------

    def save_state(self, directory: str | os.PathLike) -> None:
        """Write everything a resume needs into ``directory`` (call on every rank; the
        checkpoint hook makes it atomic). See ``hooktrain.checkpoints`` for the files."""
        directory = Path(directory)
        accelerator = self.accelerator
        accelerator.save_state(str(directory))
        if hasattr(self.train_stream, "state_dict"):
            rank = accelerator.process_index
            torch.save(self.train_stream.state_dict(), directory / f"data_state_rank{rank}.pt")
        if accelerator.is_main_process:
            hook_states = {key: h.hook.state_dict() for key, h in _hook_keys(self.hooks)}
            torch.save(hook_states, directory / "hooks.pt")
            train_state = {**self.state.state_dict(), "world_size": accelerator.num_processes}
            (directory / "train_state.json").write_text(json.dumps(train_state, indent=1))

    def load_state(self, directory: str | os.PathLike) -> None:
        """Restore what ``save_state`` wrote: weights, optimizer, scheduler, RNGs, progress,
        hooks and (with the same number of processes) the exact data stream position."""
        directory = Path(directory)
        self.accelerator.load_state(str(directory))
        train_state = json.loads((directory / "train_state.json").read_text())
        saved_world = train_state.pop("world_size", 1)
        train_state.pop("max_iters", None)  # the recipe decides how long this run goes
        self.state.load_state_dict(train_state)
        hooks_file = directory / "hooks.pt"
        hook_states = torch.load(hooks_file, weights_only=False) if hooks_file.exists() else {}
        for key, loaded in _hook_keys(self.hooks):
            state = hook_states.get(key)
            if state:
                loaded.hook.load_state_dict(state)
        data_file = directory / f"data_state_rank{self.accelerator.process_index}.pt"
        if saved_world != self.accelerator.num_processes:
            logger.warning(
                "resuming with %d processes from a checkpoint written by %d: the data stream "
                "restarts its pass instead of continuing exactly",
                self.accelerator.num_processes, saved_world,
            )  # fmt: skip
        elif data_file.exists() and hasattr(self.train_stream, "load_state_dict"):
            self.train_stream.load_state_dict(torch.load(data_file, weights_only=False))
        self._train_iter = _rng_neutral_start(iter(self.train_stream))
        logger.info("resumed from %s at iteration %d", directory, self.state.iter)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> str | None:
        """Train until ``max_iters`` or a stop signal. Returns the signal's name when one
        stopped the run (the CLI turns it into ``EXIT_CODES``), else ``None``."""
        if self.state.iter >= self.state.max_iters:  # resumed a finished run: no hook fires
            logger.info(
                "already at iteration %d of %d: nothing to train (raise train.max_iters to go on)",
                self.state.iter, self.state.max_iters,
            )  # fmt: skip
            return None
        logger.info(hooks_info(self.hooks))
        previous = self._install_signal_handlers()
        try:
            self.call_hooks("before_run")
            while self.state.iter < self.state.max_iters and not self._should_stop():
                self.call_hooks("before_train_iter")
                outputs = self.train_step()
                self.state.iter += 1
                self.call_hooks("after_train_iter", outputs)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            try:
                self.call_hooks("after_run")
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        if self.stop_requested:
            logger.warning("stopped by %s at iteration %d", self.stop_requested, self.state.iter)
        return self.stop_requested

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum_steps`` micro-batches.

        Returns detached loss terms averaged over the micro-batches, ``lr`` (the LR this step
        used), ``grad_norm`` (when clipping), ``data_time`` and ``time`` in seconds.
        """
        start = time.perf_counter()
        data_time = 0.0
        totals: dict[str, torch.Tensor] = {}
        grad_norm = None
        lr = self.optimizer.param_groups[self._lr_group]["lr"]
        for _ in range(self._accum):
            fetch = time.perf_counter()
            batch = next(self._train_iter)
            data_time += time.perf_counter() - fetch
            image, mask = (batch[k].to(self.accelerator.device, non_blocking=True) for k in ("image", "mask"))
            with self.accelerator.accumulate(self.model):
                terms = self.model(image, mask)
                loss = sum(v for k, v in terms.items() if "loss" in k)
                self.accelerator.backward(loss)
                if self._clip is not None and self.accelerator.sync_gradients:
                    grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self._clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss, **terms}.items():
                totals[key] = totals.get(key, 0) + value.detach() / self._accum
        self.scheduler.step()
        outputs: dict[str, Any] = {**totals, "lr": lr, "data_time": data_time}
        if grad_norm is not None:
            outputs["grad_norm"] = grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm
        outputs["time"] = time.perf_counter() - start
        return outputs

    # -- stopping --------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT finish the current iteration, then stop (hooks save in after_run);
        a second signal aborts at once (the same one within ``_REPEAT_S`` is a repeat)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        received: dict[str, float] = {}  # what this process itself was sent, and when

        def request_stop(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if received:
                # A launcher forwards the signal its process group already delivered (Ctrl-C,
                # scancel under `accelerate launch`): the same signal at once is not a second.
                first, at = next(iter(received.items()))
                if name == first and time.monotonic() - at < _REPEAT_S:
                    return
                raise KeyboardInterrupt(f"second {name}: aborting")
            received[name] = time.monotonic()
            self.stop_requested = self.stop_requested or name
            logger.warning("%s received: stopping after this iteration", name)

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
        return previous

    def _should_stop(self) -> bool:
        """Whether any rank was asked to stop; ranks agree so none waits in a collective."""
        if self.accelerator.num_processes == 1:
            return self.stop_requested is not None
        flag = torch.tensor(
            [EXIT_CODES.get(self.stop_requested or "", 0)], device=self.accelerator.device
        )
        code = int(self.accelerator.gather(flag).max())
        if code and not self.stop_requested:
            self.stop_requested = next(name for name, c in EXIT_CODES.items() if c == code)
        return bool(code)


def _rng_neutral_start(batches: Iterator[dict[str, torch.Tensor]]):
    """``batches``, but the first ``next`` leaves torch's global RNG as it found it.

    Starting a DataLoader iterator draws its base seed from the global RNG. The run that
    wrote the checkpoint drew it at iteration 0, before the RNG state was saved; a resumed
    run would draw again and shift every later dropout mask, so resume would not be exact.
    """
    state = torch.get_rng_state()
    first = next(batches)
    torch.set_rng_state(state)
    yield first
    yield from batches


def _hook_keys(hooks: list[LoadedHook]) -> list[tuple[str, LoadedHook]]:
    """Checkpoint keys of the hooks' states: the hook's name, with ``#k`` for its k-th
    repetition, so adding or removing other hooks between runs keeps states matched."""
    seen: dict[str, int] = {}
    keys = []
    for loaded in hooks:
        count = seen.get(loaded.name, 0)
        seen[loaded.name] = count + 1
        keys.append((loaded.name if count == 0 else f"{loaded.name}#{count}", loaded))
    return keys


def _check_work_dir(work_dir: Path, force: bool) -> None:
    if not force and complete_checkpoints(work_dir):
        raise UserError(
            f"{work_dir} already holds checkpoints; pass --resume to continue that run, "
            "--force to start over in it (the old checkpoints are moved aside), "
            "or --work-dir to choose another directory"
        )


def _move_aside_old_checkpoints(work_dir: Path) -> None:
    old = work_dir / CHECKPOINTS
    if old.is_dir():
        aside = work_dir / f"{CHECKPOINTS}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(old, aside)
        logger.warning("--force: moved the previous checkpoints to %s", aside)


def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load weights only (``load_from``, ``test --checkpoint``): a ``.safetensors`` file or a
    checkpoint directory holding ``model.safetensors``. Reports missing and unexpected keys."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"weights not found: {file}; give a .safetensors file or a checkpoint directory")
    state = load_file(str(file))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise UserError(
            f"{file} does not fit the recipe's model: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    logger.info(
        "loaded weights from %s: %d missing keys %s, %d unexpected keys %s",
        file, len(result.missing_keys), result.missing_keys[:10],
        len(result.unexpected_keys), result.unexpected_keys[:10],
    )  # fmt: skip


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
