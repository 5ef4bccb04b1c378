"""What the doc-command tests share: how a documented command is declared (:class:`Doc`), found
on the pages, run, and the sandboxes it runs in.

Every shell command in README.md and docs/ runs in a scratch directory, as written, in
``test_doc_commands.py`` (README, the quickstart, ADE20K and distributed pages) or
``test_doc_commands_data.py`` (checkpoints, plugins, datasets, data check, your own data,
mmseg and smp checkpoints, benchmarks); two files so that two test workers share the work. Where a
command needs GPUs, several machines, the Hub or days, its ``Doc`` states exactly what is
changed to run it on this CPU machine (processes on CPU through gloo, a tiny local ADE20K copy,
two iterations); nothing else differs from the page.
"""


from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # `python`, `hooktrain`, `accelerate`, `pip` of this environment


@dataclass(frozen=True)
class Doc:
    """A command exactly as a page writes it, and how it is run here."""

    text: str
    env: dict[str, str] = field(default_factory=dict)
    replace: tuple[tuple[str, str], ...] = ()  # (written, run here): a port, a process count
    append: str = ""  # extra arguments: fewer iterations, a tiny local dataset

    def shell(self) -> str:
        command = self.text
        for old, new in self.replace:
            assert old in command, f"{old!r} is no longer in {self.text!r}"
            command = command.replace(old, new)
        return f"{command} {self.append}".strip()


def documented_commands() -> dict[str, list[str]]:
    """Every command line of every ```bash block, continuations joined, comments dropped,
    mapped to the pages that show it."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = " ".join(line.split("  #", 1)[0].split())
                if command and not command.startswith("#"):
                    found.setdefault(command, []).append(page.name)
    return found


def run(doc: Doc, cwd: Path, *, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``doc`` with bash in ``cwd``, this environment's executables first on PATH; it must
    exit 0."""
    env = {**os.environ, **doc.env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", doc.shell()], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    result.output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"`{doc.shell()}` exited {result.returncode}:\n{result.output[-4000:]}"
    )
    return result


def start(doc: Doc, cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``doc`` like :func:`run` without waiting; its output goes to ``log`` (a file, not
    a pipe: a pipe nobody drains yet would stall the process and its peers)."""
    env = {**os.environ, **doc.env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "w") as out:
        return subprocess.Popen(["bash", "-c", doc.shell()], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def history(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


CPU = {"ACCELERATE_USE_CPU": "1"}
TINY_ADE = (  # two iterations of the recipe at 32x32 on the tiny copy; no ImageNet download
    "--cfg-options train.max_iters=2 schedule.warmup_iters=1 model.encoder.pretrained=false "
    "data.train.batch_size=2 data.train.num_workers=0 data.train.shuffle_buffer=8 "
    "data.train.pipeline.scale=[64,32] data.train.pipeline.crop_size=[32,32] "
    "data.val.pipeline.scale=[64,32]"
)
FROM_CONVERTED = (  # the converted shards instead of the Hub, as recipes/_base_/datasets/ade20k.yaml says
    ' "data.train.source={type: hub, path: data/ade20k, split: train}"'
    ' "data.val.source={type: hub, path: data/ade20k, split: validation}"'
)


def write_ade_challenge_folder(root: Path, per_split: int = 16) -> None:
    """The official ADEChallengeData2016 layout with small random scenes (labels 0..150)."""
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(per_split):
            rng = np.random.default_rng(i)
            blocks = rng.integers(0, 151, (4, 5), dtype=np.uint8)
            mask = cv2.resize(blocks, (40, 32), interpolation=cv2.INTER_NEAREST)
            image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / split / f"ADE_{split}_{i:08d}.jpg"), image)
            cv2.imwrite(str(root / "annotations" / split / f"ADE_{split}_{i:08d}.png"), mask)


def assert_trained_and_evaluated(work_dir: Path, iters: int = 2) -> None:
    rows = history(work_dir)
    assert rows[-1]["iter"] == iters and "val/mIoU" in rows[-1]
    assert (work_dir / "checkpoints" / f"iter_{iters}" / "model.safetensors").is_file()
