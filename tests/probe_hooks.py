"""Hooks the end-to-end tests load by path (``probe_hooks:Name``) to observe a real run."""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from hooktrain.hooks import Hook


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

    def after_run(self, runner):
        self.record["stages"].append("after_run")
        self.record["final_iter"] = runner.state.iter
        digest = hashlib.sha256()
        for name, tensor in sorted(runner.unwrapped_model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.record["weights_sha256"] = digest.hexdigest()
        path = f"{self.prefix}.rank{runner.accelerator.process_index}.json"
        with open(path + ".tmp", "w") as f:
            json.dump(self.record, f)
        os.replace(path + ".tmp", path)
