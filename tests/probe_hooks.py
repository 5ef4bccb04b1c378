"""Hooks the end-to-end tests load by path (``probe_hooks:Name``) to observe a real run."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from hooktrain.hooks import PRIORITIES, Hook


class ProbeHook(Hook):
    """Per rank, records the LR and loss of every iteration, the dtype the first conv
    produced under autocast, and a digest of the final weights, to ``<prefix>.rank<r>.json``."""

    def __init__(self, prefix: str, sleep: float = 0.0) -> None:
        self.prefix = prefix
        self.sleep = sleep
        self.record: dict = {"lr": [], "loss": [], "stages": []}

    def before_run(self, runner):
        self.record["stages"].append("before_run")
        conv = next(m for m in runner.unwrapped_model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(self._dtype_probe)
        self.record["mixed_precision"] = runner.accelerator.mixed_precision
        self.record["world_size"] = runner.accelerator.num_processes

    def _dtype_probe(self, module, inputs, output):
        self.record.setdefault("conv_dtype", str(output.dtype))

    def after_train_iter(self, runner, outputs):
        self.record["lr"].append(outputs["lr"])
        self.record["loss"].append(float(outputs["loss"]))
        if self.sleep:
            time.sleep(self.sleep)

    def before_val(self, runner):
        self.record["before_val_params_sha256"] = digest(runner.unwrapped_model.named_parameters())

    def after_val(self, runner, metrics):
        self.record.setdefault("val", []).append(
            {"iter": runner.state.iter, "metrics": metrics, "best": dict(runner.state.best)}
        )

    def after_run(self, runner):
        self.record["stages"].append("after_run")
        self.record["final_iter"] = runner.state.iter
        model = runner.unwrapped_model
        self.record["weights_sha256"] = digest(model.state_dict().items())
        self.record["params_sha256"] = digest(model.named_parameters())
        path = f"{self.prefix}.rank{runner.accelerator.process_index}.json"
        with open(path + ".tmp", "w") as f:
            json.dump(self.record, f)
        os.replace(path + ".tmp", path)


class StallSaveHook(Hook):
    """Wraps ``accelerator.save_state``: after it has written the checkpoint of iteration
    ``at_iter``, touches ``marker`` and sleeps, so a test can ``kill -9`` mid-save."""

    def __init__(self, marker: str, at_iter: int, sleep: float = 600.0) -> None:
        self.marker = marker
        self.at_iter = at_iter
        self.sleep = sleep

    def before_run(self, runner):
        original = runner.accelerator.save_state

        def save_state(output_dir=None, **kwargs):
            result = original(output_dir, **kwargs)
            if runner.state.iter == self.at_iter:
                with open(self.marker, "w") as f:
                    f.write(str(output_dir))
                time.sleep(self.sleep)
            return result

        runner.accelerator.save_state = save_state


class SignalSelfHook(Hook):
    """Sends ``signal`` to its own process as iteration ``at_iter`` starts (on rank ``rank``
    only), as a scheduler preempting the job would."""

    def __init__(self, at_iter: int, signal: str = "SIGTERM", rank: int = 0) -> None:
        self.at_iter = at_iter
        self.signal = signal
        self.rank = rank

    def before_train_iter(self, runner):
        if runner.state.iter + 1 == self.at_iter and runner.accelerator.process_index == self.rank:
            import signal

            os.kill(os.getpid(), getattr(signal, self.signal))


def digest(named_tensors) -> str:
    """sha256 over (name, bytes) of named tensors in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class PoisonHook(Hook):
    """Makes training non-finite at iteration ``at_iter`` on rank ``rank`` (every rank when
    None): ``what: weights`` fills the first conv's weights with NaN before the iteration;
    ``what: loss`` makes the model's loss terms NaN for ``times`` iterations from ``at_iter``."""

    def __init__(self, at_iter: int, what: str = "weights", rank: int | None = None,
                 times: int = 1) -> None:  # fmt: skip
        self.at_iter, self.what, self.rank, self.times = at_iter, what, rank, times

    def before_run(self, runner):
        if self.what != "loss" or self.rank not in (None, runner.accelerator.process_index):
            return
        model = runner.unwrapped_model
        forward = model.forward

        def poisoned(*args, **kwargs):
            terms = forward(*args, **kwargs)
            if self.at_iter <= runner.state.iter + 1 < self.at_iter + self.times:
                terms = {k: v * float("nan") for k, v in terms.items()}
            return terms

        model.forward = poisoned

    def before_train_iter(self, runner):
        if self.what != "weights" or runner.state.iter + 1 != self.at_iter:
            return
        if self.rank in (None, runner.accelerator.process_index):
            conv = next(m for m in runner.unwrapped_model.modules() if isinstance(m, torch.nn.Conv2d))
            with torch.no_grad():
                conv.weight.fill_(float("nan"))


class MisbehaveHook(Hook):
    """On rank ``rank`` after iteration ``at_iter``: ``how: raise`` raises; ``how: hang``
    stops calling collectives (sleeps); ``how: extra_loss`` makes its model return one more
    loss term than the other ranks' from then on."""

    def __init__(self, at_iter: int, how: str, rank: int = 1) -> None:
        self.at_iter, self.how, self.rank = at_iter, how, rank

    def after_train_iter(self, runner, outputs):
        if runner.state.iter != self.at_iter or runner.accelerator.process_index != self.rank:
            return
        if self.how == "raise":
            raise RuntimeError("probe failure on purpose")
        if self.how == "hang":
            time.sleep(3600)
        if self.how == "extra_loss":
            model = runner.unwrapped_model
            forward = model.forward
            model.forward = lambda *a, **k: {**(terms := forward(*a, **k)),
                                             "extra.loss": 0 * terms["decode.loss_ce"]}  # fmt: skip


class ExampleIdsHook(Hook):
    """Records, per rank and in training order, the ``(shard, row)`` of every example the run
    trains on, to ``<prefix>.rank<r>.json`` (appending across resumed runs).

    Loading the hook stamps each example's id into its image's first pixel (before any
    DataLoader worker starts, so forked workers stamp too); the model's forward reads it back.
    """

    def __init__(self, prefix: str) -> None:
        from hooktrain.data.stream import TrainExamples

        self.prefix = prefix
        self.ids: list[list[int]] = []
        original = TrainExamples._example
        if getattr(original, "stamps_ids", False):
            return

        def stamped(dataset, raw, epoch, worker, pos):
            example = original(dataset, raw, epoch, worker, pos)
            if example is not None:
                example[0][0, 0, 0] = raw.shard * 1000 + raw.row
            return example

        stamped.stamps_ids = True
        TrainExamples._example = stamped

    def before_run(self, runner):
        model = runner.unwrapped_model
        forward = model.forward

        def recording(image, *args, **kwargs):
            if model.training:
                self.ids += [[int(v) // 1000, int(v) % 1000] for v in image[:, 0, 0, 0].tolist()]
            return forward(image, *args, **kwargs)

        model.forward = recording

    def after_run(self, runner):
        path = f"{self.prefix}.rank{runner.accelerator.process_index}.json"
        previous = json.load(open(path)) if os.path.exists(path) else []
        with open(path + ".tmp", "w") as f:
            json.dump(previous + self.ids, f)
        os.replace(path + ".tmp", path)


class LateLog(Hook):
    """Logs a value at a step below the ones already logged, at the last iteration."""

    priority = PRIORITIES["LOWEST"]

    def after_train_iter(self, runner, outputs) -> None:
        if runner.state.iter == runner.state.max_iters:
            runner.log({"probe/late": 1.0}, step=1)


class InputProbe(Hook):
    """Records the dtype and range of every image batch the model trains on, to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: list = []

    def before_run(self, runner) -> None:
        model = runner.unwrapped_model
        forward = model.forward

        def recording(image, *args, **kwargs):
            if model.training:
                self.seen.append([str(image.dtype), float(image.min()), float(image.max())])
            return forward(image, *args, **kwargs)

        model.forward = recording

    def after_run(self, runner) -> None:
        Path(self.path).write_text(json.dumps(self.seen))


class FillDiskHook(Hook):
    """Another program filling the disk: after iteration ``at_iter`` it writes ``path`` until
    the file system has no space left (``priority`` decides which of the run's writes, before
    or after it in that iteration, meets the full disk first)."""

    def __init__(self, path: str, at_iter: int) -> None:
        self.path = Path(path)
        self.at_iter = at_iter

    def after_train_iter(self, runner, outputs) -> None:
        if runner.state.iter != self.at_iter:
            return
        with open(self.path, "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * (1 << 20))
                    filler.flush()
            except OSError:  # full
                pass
