"""Checkpoint hook: atomic full-state saves every ``interval`` iterations and when the run
ends (``max_iters``, or a hook's ``request_finish``) or is stopped, pruning to ``max_keep``,
and the best model by a validation metric.

The on-disk layout and the atomic protocol live in ``hooktrain.checkpoint.state``; this hook only
decides when to save. See docs/checkpoints.md.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from pydantic import Field

from hooktrain.errors import UserError
from hooktrain.hooks import PRIORITIES, Evaluator, Hook

logger = logging.getLogger("hooktrain")


class CheckpointHook(Hook):
    """Saves resumable checkpoints every `interval` iterations, at the end and on SIGTERM/SIGINT.

    ``max_keep`` keeps only the newest complete checkpoints (``best`` is never pruned);
    ``save_best: mIoU`` also keeps ``checkpoints/best`` with the weights of the best score the
    eval hook reported (its ``best_key`` must be the same metric). No checkpoint is written
    after the run failed.

    Args:
        interval: Save every this many iterations into checkpoints/iter_N.
        max_keep: Keep only this many newest complete checkpoints (best is never pruned); null keeps all.
        save_best: Also keep checkpoints/best with the weights of the best value of this metric (the eval hook's best_key).
        save_last: Save when the run ends (max_iters or early_stop) or is stopped by SIGTERM/SIGINT (not after a crash).
    """

    priority = PRIORITIES["NORMAL"]  # after the eval hook (HIGH): sees this iteration's best

    def __init__(
        self,
        interval: Annotated[int, Field(gt=0)] = 1000,
        max_keep: Annotated[int, Field(ge=1)] | None = None,
        save_best: Annotated[str, Field(min_length=1)] | None = None,
        save_last: bool = True,
    ) -> None:
        if interval < 1:
            raise UserError(f"checkpoint hook: interval must be at least 1 (got {interval})")
        if max_keep is not None and max_keep < 1:
            raise UserError(
                f"checkpoint hook: max_keep must be at least 1 (got {max_keep}); "
                "use null to keep every checkpoint"
            )
        self.interval = interval
        self.max_keep = max_keep
        self.save_best = save_best
        self.save_last = save_last
        self._last_saved: int | None = None
        self._best_saved_iter: int | None = None

    def before_run(self, runner) -> None:
        # A resumed run starts at the iteration of the checkpoint it came from.
        self._last_saved = runner.state.iter or None
        self._best_saved_iter = runner.state.best.get("iter")

    def check_recipe(self, recipe, hooks) -> None:
        """Refuse a ``save_best`` that no eval hook running before this one tracks."""
        if self.save_best is not None:
            self._check_eval_hook(hooks)

    def _check_eval_hook(self, hooks) -> None:
        """``save_best`` needs an eval hook tracking the same metric, running before this one."""
        names = [h.name for h in hooks]
        found = [i for i, h in enumerate(hooks) if isinstance(h.hook, Evaluator)]
        if not found:
            raise UserError(
                f"checkpoint hook: save_best '{self.save_best}' needs an eval hook in the "
                "recipe's hooks (e.g. {type: eval, best_key: " + self.save_best + "})"
            )
        eval_index = found[0]
        eval_hook = hooks[eval_index].hook
        if eval_hook.best_key != self.save_best:
            raise UserError(
                f"checkpoint hook: save_best is '{self.save_best}' but the eval hook's "
                f"best_key is '{eval_hook.best_key}'; set both to the same metric"
            )
        own_index = next(i for i, h in enumerate(hooks) if h.hook is self)
        if eval_index > own_index:
            raise UserError(
                f"checkpoint hook: it runs before the eval hook (order: {names}), so save_best "
                "would see last evaluation's best; give the checkpoint hook a larger priority"
            )

    def after_train_iter(self, runner, outputs: dict[str, Any]) -> None:
        state = runner.state
        if state.iter % self.interval == 0:
            self._save(runner)
        best = state.best
        if self.save_best is not None and best.get("iter") == state.iter != self._best_saved_iter:
            if best.get("key") != self.save_best:
                raise UserError(
                    f"checkpoint hook: save_best is '{self.save_best}' but the best score "
                    f"reported is '{best.get('key')}'; set the eval hook's best_key to match"
                )
            weights = runner.full_state_dict()  # every rank: under FSDP the shards are gathered
            if runner.accelerator.is_main_process:
                from hooktrain.checkpoint.state import save_best

                path = save_best(runner, dict(best), weights)
                logger.info("saved best %s %.4f (iter %d) to %s",
                            best["key"], best["value"], best["iter"], path)  # fmt: skip
            self._best_saved_iter = state.iter

    def after_run(self, runner) -> None:
        if runner.error is not None or runner.state.iter == 0:
            return  # never save what a crash left; nothing learned yet at iteration 0
        # A hook's request_finish (early stopping) ends the run like reaching max_iters.
        finished = runner.state.iter >= runner.state.max_iters or getattr(runner, "finish_requested", None)
        if (finished and self.save_last) or runner.stop_requested:
            if self._last_saved != runner.state.iter:  # a resumed run's iteration counts as saved
                self._save(runner)

    def _save(self, runner) -> None:
        from hooktrain.checkpoint.state import prune_checkpoints, save_checkpoint

        start = time.perf_counter()
        path = save_checkpoint(runner)
        self._last_saved = runner.state.iter
        if runner.accelerator.is_main_process:
            logger.info("saved checkpoint %s in %.2fs", path, time.perf_counter() - start)
            if self.max_keep is not None:
                for old in prune_checkpoints(runner.work_dir, self.max_keep, keep=path):
                    logger.info("removed old checkpoint %s (max_keep=%d)", old.name, self.max_keep)
