"""What the ranks agree on once per iteration, in one all-gather of four integers per rank.

It runs between the backward pass and the optimizer step, so a non-finite loss is caught
before it reaches the weights. Each rank contributes:

- the stop signal it received (``hooktrain.engine.signals``), so every rank stops after the same
  iteration and none waits in a collective the others left;
- a bit per loss term (and the gradient norm) that is NaN or infinite on it;
- a checksum of its loss-term names. Ranks whose models return different terms would pair up
  the wrong tensors in the logger's reduction and hang; they are named here instead;
- whether it failed to fetch the next iteration's batches, its data's server having failed
  for longer than ``data.retry_budget_s`` (``hooktrain.data.retry``): every rank then stops
  after this iteration, which none could do once the others had started the next one.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from hooktrain.engine.signals import EXIT_CODES
from hooktrain.errors import NonFiniteLoss, RunError

if TYPE_CHECKING:
    from hooktrain.recipe.schema import TrainConfig

logger = logging.getLogger("hooktrain")
GRAD_NORM = "grad_norm"
_SIGNALS = {code: name for name, code in EXIT_CODES.items()}


@dataclass
class Verdict:
    """The agreed outcome of one iteration's checks."""

    stop: str | None = None  # a signal some rank received
    nonfinite: dict[int, list[str]] = field(default_factory=dict)  # rank -> terms
    data_failed: list[int] = field(default_factory=list)  # ranks without their next batches


def agree(
    accelerator: Accelerator,
    *,
    iteration: int,
    stop: str | None,
    terms: dict[str, torch.Tensor],
    grad_norm: torch.Tensor | None,
    data_failed: bool = False,
) -> Verdict:
    """Agree across ranks on stopping and on finiteness (see the module doc). Raises
    ``RunError`` on every rank when the ranks' loss-term names differ."""
    names = sorted(terms)
    values = [terms[name] for name in names]
    if grad_norm is not None:
        names.append(GRAD_NORM)
        values.append(grad_norm)
    device = accelerator.device
    bad = ~torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in values]).to(device))
    mask = (bad.long() << torch.arange(len(values), device=device)).sum()
    signal_code = EXIT_CODES.get(stop or "", 0)
    checksum = zlib.crc32(",".join(sorted(terms)).encode())
    local = torch.stack([torch.tensor(signal_code, device=device), torch.tensor(checksum, device=device),
                         mask, torch.tensor(int(data_failed), device=device)])  # fmt: skip
    if accelerator.num_processes > 1:
        local = accelerator.gather(local[None])
    rows = local.reshape(-1, 4).tolist()  # the one host sync of the check
    if len({row[1] for row in rows}) > 1:
        _raise_different_terms(iteration, sorted(terms))
    codes = [row[0] for row in rows if row[0]]
    return Verdict(
        stop=_SIGNALS[codes[0]] if codes else None,
        nonfinite={
            rank: [name for bit, name in enumerate(names) if row[2] >> bit & 1]
            for rank, row in enumerate(rows)
            if row[2]
        },
        data_failed=[rank for rank, row in enumerate(rows) if row[3]],
    )


def _raise_different_terms(iteration: int, names: list[str]) -> None:
    every = gather_object([names])  # only when they differ: every rank is here
    listed = ", ".join(f"rank {rank} {terms}" for rank, terms in enumerate(every))
    raise RunError(
        f"iteration {iteration} (train step): the ranks' models returned different loss "
        f"terms: {listed}; every rank must return the same names (compute a term on every "
        "rank, as 0 where it does not apply)"
    )


def describe_nonfinite(verdict: Verdict, num_processes: int) -> str:
    """``loss_ce, grad_norm``, with the ranks when not every rank saw the same terms."""
    found = verdict.nonfinite
    distinct = {tuple(terms) for terms in found.values()}
    if len(distinct) == 1 and len(found) == num_processes:
        return ", ".join(distinct.pop())
    return "; ".join(f"{', '.join(terms)} on rank {rank}" for rank, terms in found.items())


def skip_or_stop(verdict: Verdict, cfg: TrainConfig, skips: int, *, iteration: int, num_processes: int,
                 warn: bool) -> int:  # fmt: skip
    """``train.on_nonfinite`` for a verdict with non-finite terms: the number of optimizer
    steps skipped in a row, this one included, when it may be skipped (with a warning when
    ``warn``); else raises ``NonFiniteLoss`` before the step, on every rank alike."""
    what = describe_nonfinite(verdict, num_processes)
    if cfg.on_nonfinite == "skip" and skips < cfg.max_nonfinite_skips:
        if warn:
            logger.warning("iteration %d: %s not finite: optimizer step skipped (%d in a row, "
                           "train.max_nonfinite_skips=%d)", iteration, what, skips + 1,
                           cfg.max_nonfinite_skips)  # fmt: skip
        return skips + 1
    if cfg.on_nonfinite == "skip":
        reason = f"{what} not finite for more than train.max_nonfinite_skips={cfg.max_nonfinite_skips} iterations in a row"
    else:
        reason = f"{what} not finite (train.on_nonfinite: stop)"
    raise NonFiniteLoss(
        f"iteration {iteration}: {reason}; stopped before the optimizer step, nothing "
        "saved; resume from the last checkpoint with a lower learning rate or "
        "train.clip_grad_norm" + ("" if cfg.on_nonfinite == "skip" else ", or set train.on_nonfinite: skip")
    )
