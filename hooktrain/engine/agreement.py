"""What the ranks agree on once per iteration, in one all-gather of three integers per rank.

It runs between the backward pass and the optimizer step, so a non-finite loss is caught
before it reaches the weights. Each rank contributes:

- the stop signal it received (``hooktrain.engine.signals``), so every rank stops after the same
  iteration and none waits in a collective the others left;
- a bit per loss term (and the gradient norm) that is NaN or infinite on it;
- a checksum of its loss-term names. Ranks whose models return different terms would pair up
  the wrong tensors in the logger's reduction and hang; they are named here instead.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from hooktrain.engine.signals import EXIT_CODES
from hooktrain.errors import RunError

GRAD_NORM = "grad_norm"
_SIGNALS = {code: name for name, code in EXIT_CODES.items()}


@dataclass
class Verdict:
    """The agreed outcome of one iteration's checks."""

    stop: str | None = None  # a signal some rank received
    nonfinite: dict[int, list[str]] = field(default_factory=dict)  # rank -> terms


def agree(
    accelerator: Accelerator,
    *,
    iteration: int,
    stop: str | None,
    terms: dict[str, torch.Tensor],
    grad_norm: torch.Tensor | None,
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
    local = torch.stack([torch.tensor(signal_code, device=device),
                         torch.tensor(checksum, device=device), mask])  # fmt: skip
    if accelerator.num_processes > 1:
        local = accelerator.gather(local[None])
    rows = local.reshape(-1, 3).tolist()  # the one host sync of the check
    if len({checksum for _, checksum, _ in rows}) > 1:
        _raise_different_terms(iteration, sorted(terms))
    codes = [code for code, _, _ in rows if code]
    return Verdict(
        stop=_SIGNALS[codes[0]] if codes else None,
        nonfinite={
            rank: [name for bit, name in enumerate(names) if bits >> bit & 1]
            for rank, (_, _, bits) in enumerate(rows)
            if bits
        },
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
