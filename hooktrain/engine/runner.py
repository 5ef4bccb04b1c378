"""The iteration-based runner: one Accelerator, one loop, hooks around it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from hooktrain.checkpoint.resume import choose_resume
from hooktrain.checkpoint.sharded import full_state_dict
from hooktrain.checkpoint.state import load_state
from hooktrain.checkpoint.weights import load_weights, recorded_iteration
from hooktrain.checkpoint.workdir import prepare_work_dir
from hooktrain.data import build_train_stream, prepare_data
from hooktrain.engine.accelerator import make_accelerator, prepare_model
from hooktrain.engine.agreement import Verdict, agree, skip_or_stop
from hooktrain.engine.logs import main_process_logs, process_age, setup_logging
from hooktrain.engine.lookahead import Lookahead, outage_after_whole_iteration, rng_neutral_start
from hooktrain.engine.optim import build_scheduler
from hooktrain.engine.preflight import RESUME_FIX, TEST_FIX, preflight
from hooktrain.engine.sharding import InferenceReplica, share_batch_norm_stats
from hooktrain.engine.signals import EXIT_CODES, StopSignals
from hooktrain.engine.step import train_step
from hooktrain.engine.watchdog import RankWatch
from hooktrain.errors import SourceOutage
from hooktrain.hooks import LoadedHook, TrainState, call_hooks, hook_state_keys, hooks_info
from hooktrain.models import build_recipe_segmentor
from hooktrain.models.hub import resolve_weights
from hooktrain.recipe.schema import Recipe, dump_recipe

logger = logging.getLogger("hooktrain")
#: ``stop_requested`` when the data's server failed for longer than ``data.retry_budget_s``.
DATA_OUTAGE = "data outage"


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
        replica: InferenceReplica | None = None,
    ) -> None:
        self.recipe = recipe
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_stream = train_stream
        self.hooks = hooks
        self.work_dir = Path(work_dir)
        self._replica = replica  # under FSDP: the plain model evaluations fill with the whole weights
        self.state = TrainState(max_iters=recipe.train.max_iters)
        self.stop_requested: str | None = None  # a signal's name or DATA_OUTAGE, once every rank knows it
        self.outage: SourceOutage | None = None  # raised once the hooks have run (exit code 75)
        self.finish_requested: str | None = None  # why a hook ended the run early (request_finish)
        self._iteration_open = False  # between before_train_iter and the iteration count's update
        self._loop_started = False  # set when the loop first checks whether to go on
        self._data_time = 0.0  # seconds this train step waited for batches
        self.error: BaseException | None = None  # what ended the loop, if it failed
        self.signals = StopSignals()
        self.watch = RankWatch(accelerator.process_index, accelerator.num_processes,
                               recipe.train.collective_timeout)  # fmt: skip
        self._train_iter = iter(train_stream) if train_stream is not None else None
        self._lookahead = Lookahead(accelerator, train_stream, recipe.train.grad_accum_steps)
        # The LR reported in logs: the group without a multiplier (the recipe's lr).
        groups = optimizer.param_groups if optimizer is not None else []
        self._lr_group = next((i for i, g in enumerate(groups) if g.get("lr_mult", 1) == 1), 0)

    @classmethod
    def from_recipe(
        cls, recipe: Recipe, *, resume: str | None = None, force: bool = False
    ) -> IterRunner:
        """Build everything a recipe describes: accelerator, data, model, optimizer, hooks.

        ``resume`` is ``"auto"`` (the newest whole checkpoint of the work dir, or a fresh
        start when there is none) or a checkpoint path; ``force`` starts over in a work dir
        that holds checkpoints (they are moved aside, never deleted). The caller has claimed
        the work dir with ``hooktrain.checkpoint.workdir.claim_work_dir`` (its lock, then the
        checks; ``hooktrain RECIPE`` does, before it imports torch), so a run is never
        started over another.
        """
        accelerator = make_accelerator(recipe.train)
        setup_logging(accelerator.is_main_process)
        work_dir = Path(recipe.work_dir or "work_dirs/run")
        with main_process_logs(accelerator):
            checkpoint = choose_resume(work_dir, resume) if resume else None
        preflight(recipe, checkpoint=checkpoint, fix=RESUME_FIX)
        set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
        with accelerator.main_process_first():
            prepare_data(recipe.data)
        rank, world_size = accelerator.process_index, accelerator.num_processes
        stream = build_train_stream(recipe.data, seed=recipe.train.seed, rank=rank, world_size=world_size)
        model = build_recipe_segmentor(recipe)
        if recipe.load_from and checkpoint is None:
            load_weights(model, resolve_weights(recipe.load_from), strict=False)  # hf://OWNER/NAME: downloaded
        model, optimizer, replica = prepare_model(accelerator, model, recipe)
        scheduler = build_scheduler(optimizer, recipe.schedule, recipe.train.max_iters)
        accelerator.register_for_checkpointing(scheduler)
        runner = cls(
            recipe=recipe,
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_stream=stream,
            hooks=recipe.loaded_hooks(),  # built when the recipe was validated
            work_dir=work_dir,
            replica=replica,
        )
        if checkpoint is not None:
            runner.resume_from(checkpoint)
        runner.call_hooks("check_run")
        # Only now, with everything checked on every rank, does the work dir change.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            prepare_work_dir(work_dir, dump_recipe(recipe), move_aside=force and not checkpoint)
        accelerator.wait_for_everyone()
        return runner

    @classmethod
    def for_evaluation(cls, recipe: Recipe, checkpoint: str | os.PathLike) -> IterRunner:
        """A runner that only predicts: the recipe's model with ``checkpoint``'s weights and
        the recipe's hooks, without optimizer or training data (``hooktrain test``)."""
        accelerator = make_accelerator(recipe.train, shard=False)
        setup_logging(accelerator.is_main_process)
        preflight(recipe, checkpoint=checkpoint, fix=TEST_FIX)
        with accelerator.main_process_first():
            prepare_data(recipe.data)
        model = build_recipe_segmentor(recipe, pretrained=False)  # the checkpoint has every weight
        load_weights(model, checkpoint, strict=True)
        model = accelerator.prepare(model)
        runner = cls(
            recipe=recipe,
            accelerator=accelerator,
            model=model,
            optimizer=None,
            scheduler=None,
            train_stream=None,
            hooks=recipe.loaded_hooks(),
            work_dir=recipe.work_dir or "work_dirs/run",
        )
        runner.state.iter = recorded_iteration(checkpoint) or 0
        runner.call_hooks("check_run")
        return runner

    # -- what hooks use -------------------------------------------------------------------

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The model without its DDP/compile wrappers (for inference and saving)."""
        return self.accelerator.unwrap_model(self.model)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole weights under the plain module's names, on the main process (the
        others get ``{}``). Every rank calls it: under FSDP it gathers the shards."""
        if self._replica is not None:
            return full_state_dict(self.model)
        return self.unwrapped_model.state_dict() if self.accelerator.is_main_process else {}

    @contextmanager
    def whole_model(self) -> Iterator[torch.nn.Module]:
        """The model with its whole weights, for inference without collectives: the unwrapped
        model, or under FSDP a plain copy filled with the gathered weights for the duration
        (every rank enters it together). Every rank gets rank 0's BatchNorm statistics, so an
        evaluation scores the weights a checkpoint saves."""
        if self._replica is None:
            model = self.unwrapped_model
        else:
            model = self._replica.fill(self.model, self.accelerator.device)
        if self.accelerator.num_processes > 1:
            share_batch_norm_stats(model)
        try:
            yield model
        finally:
            if self._replica is not None:
                self._replica.release()

    def call_hooks(self, stage: str, *args: Any) -> None:
        """Fire ``stage`` on every hook in priority order."""
        outer = self.watch.stage
        call_hooks(self.hooks, stage, self, *args, enter=self.watch.enter)
        self.watch.stage = outer

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Publish values at ``step`` (default: the current iteration) to every hook's
        ``on_log`` (the logger hooks write them: console, history file, trackers). Call it
        on every rank; only the main process writes."""
        step = self.state.iter if step is None else step
        self.call_hooks("on_log", values, step)

    def request_finish(self, reason: str) -> None:
        """End the run cleanly after the current iteration (before the first one when called
        in ``before_run``), as if ``max_iters`` were reached: ``after_run`` fires, the
        checkpoint hook saves, the exit code is 0. Every rank must call it at the same
        iteration (decide from values every rank shares, such as validation metrics): the
        loop has no collective for it. The first reason wins; it is logged with the
        iteration the run stops after."""
        if self.finish_requested is not None:
            return
        self.finish_requested = reason
        if self.accelerator.is_main_process:
            if not self._loop_started:
                logger.info("%s; stopping at iteration %d without training", reason, self.state.iter)
            else:
                logger.info("%s; stopping after iteration %d", reason, self.state.iter + self._iteration_open)

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of a checkpoint beyond Accelerate's state (model, optimizer,
        scheduler, scaler, RNGs): the loop's progress, every stateful hook's state (keyed by
        ``hook_state_keys``) and the data stream's position."""
        return {
            "progress": self.state.state_dict(),
            "hooks": {key: loaded.hook.state_dict() for key, loaded in hook_state_keys(self.hooks)},
            "data": self.train_stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> str:
        """Restore what :meth:`state_dict` gave, with ``state["data"]`` holding the stream
        state of every rank that saved. Returns how the stream resumed: ``"exact"``, or
        ``"elastic"`` when the number of processes or workers changed."""
        progress = dict(state["progress"])
        progress.pop("max_iters", None)  # the recipe decides how long this run goes
        self.state.load_state_dict(progress)
        for key, loaded in hook_state_keys(self.hooks):
            if state["hooks"].get(key):
                loaded.hook.load_state_dict(state["hooks"][key])
        return self.train_stream.resume(state["data"])

    def resume_from(self, checkpoint: Path) -> None:
        """Continue the run ``checkpoint`` holds (``hooktrain.checkpoint.state.load_state``
        reads it back into :meth:`load_state_dict`)."""
        how = load_state(self, checkpoint)
        self._train_iter = rng_neutral_start(iter(self.train_stream))
        logger.info("resumed from %s at iteration %d%s", checkpoint, self.state.iter,
                    "" if how == "exact" else f" (data stream: {how})")  # fmt: skip

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> str | None:
        """Train until ``max_iters``, a stop signal or a hook's ``request_finish``. Returns the
        signal's name when one stopped the run (the CLI turns it into ``EXIT_CODES``), else
        ``None`` (a requested finish ends the run like a finished one)."""
        if self.state.iter >= self.state.max_iters:  # resumed a finished run: no hook fires
            logger.info(
                "already at iteration %d of %d: nothing to train (raise train.max_iters to go on)",
                self.state.iter, self.state.max_iters,
            )  # fmt: skip
            return None
        logger.info(hooks_info(self.hooks))
        logger.info("starting iteration %d, %.1f s after the command started", self.state.iter + 1, process_age())
        with self.signals:
            try:
                self._schedule_model()
                self.call_hooks("before_run")
                self._loop_started = True
                while self.state.iter < self.state.max_iters and not (self.stop_requested or self.finish_requested):
                    self._iteration_open = True
                    self.call_hooks("before_train_iter")
                    outputs = self.train_step()
                    self.state.iter += 1
                    self._schedule_model()
                    self._iteration_open = False
                    self.call_hooks("after_train_iter", outputs)
            except BaseException as exc:
                self.outage = outage_after_whole_iteration(exc, self.accelerator, self._iteration_open, self.state.iter)
                if self.outage is not None:
                    self.stop_requested = self.stop_requested or DATA_OUTAGE
                else:
                    self.error = exc
                    failure = self.watch.failed(exc)
                    if failure is exc:
                        raise
                    raise failure from exc
            finally:
                self.call_hooks("after_run")
        if self.outage is not None:
            raise self.outage
        return self.stop_requested

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum_steps`` micro-batches.

        Before the step, the ranks agree (``hooktrain.engine.agreement``) on a stop signal and on
        whether every loss term and the gradient norm are finite. Returns detached loss terms
        averaged over the micro-batches, ``lr`` (the LR this step used), ``grad_norm``,
        ``data_time`` and ``time`` in seconds.
        """
        self.watch.enter("train step", self.state.iter + 1)
        start, self._data_time, self._lookahead.seconds = time.perf_counter(), 0.0, 0.0
        if not self._lookahead.started:
            self._lookahead.first()
        lr = self.optimizer.param_groups[self._lr_group]["lr"]
        totals, grad_norm = train_step(
            self.accelerator,
            self.model,
            self.optimizer,
            self._micro_batches(),
            clip_grad_norm=self.recipe.train.clip_grad_norm,
            accept=self._agree,
        )
        self.scheduler.step()
        outputs: dict[str, Any] = {**totals, "lr": lr, "data_time": self._data_time + self._lookahead.seconds}
        outputs["grad_norm"] = grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm
        outputs["time"] = time.perf_counter() - start
        return outputs

    def _schedule_model(self) -> None:
        """Set what the model's family schedules by iteration (``SegmentorBase.schedule``: EoMT's mask
        annealing) for ``state.iter`` steps done: before the first step, and after each, before the
        hooks, so an evaluation at this iteration sees the values the next step trains with."""
        schedule = getattr(self.unwrapped_model, "schedule", None)  # a model of one's own may have none
        if schedule is not None:
            schedule(self.state.iter)

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """The next ``train.grad_accum_steps`` batches of the stream, timing the waits."""
        for _ in range(self.recipe.train.grad_accum_steps):
            fetch = time.perf_counter()
            batch = next(self._train_iter)
            self._data_time += time.perf_counter() - fetch
            yield batch

    def _agree(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> bool:
        """Whether the optimizer may step: the ranks agree on a stop signal, on whether every
        loss term and the gradient norm are finite, and on whether every rank has the next
        iteration's batches (``hooktrain.engine.agreement``)."""
        failure = self._lookahead.next(last=self.state.iter + 1 >= self.state.max_iters)
        verdict = agree(
            self.accelerator,
            iteration=self.state.iter + 1,
            stop=self.signals.requested,
            terms=terms,
            # fp16's GradScaler skips steps with overflowing gradients itself
            grad_norm=grad_norm if self.accelerator.scaler is None else None,
            data_failed=failure is not None,
        )
        if verdict.data_failed and self.outage is None:
            self.outage = self._lookahead.stop_after(self.state.iter + 1, failure)
            self.stop_requested = self.stop_requested or DATA_OUTAGE
        return self._accept(verdict)

    def _accept(self, verdict: Verdict) -> bool:
        """Act on the agreed verdict; whether the optimizer may step."""
        if verdict.stop and not self.stop_requested:
            self.stop_requested = verdict.stop
            if self.accelerator.is_main_process:
                logger.warning("%s received: stopping after iteration %d, then exit code %d",
                               verdict.stop, self.state.iter + 1, EXIT_CODES[verdict.stop])  # fmt: skip
        if not verdict.nonfinite:
            self.state.nonfinite_skips = 0
            return True
        self.state.nonfinite_skips = skip_or_stop(
            verdict, self.recipe.train, self.state.nonfinite_skips, iteration=self.state.iter + 1,
            num_processes=self.accelerator.num_processes, warn=self.accelerator.is_main_process,
        )  # fmt: skip
        return False
