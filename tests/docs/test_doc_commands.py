"""The commands of README.md, docs/quickstart.md and docs/distributed.md run here as written
(see tests/doc_commands.py), and every documented command on any page is run by some test."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT
from doc_commands import (
    CPU,
    FROM_CONVERTED,
    TINY_ADE,
    Doc,
    assert_trained_and_evaluated,
    documented_commands,
    history,
    run,
    start,
    write_ade_challenge_folder,
)

pytestmark = pytest.mark.spread  # independent runs: the test workers share them

# -- README and docs/quickstart.md: install, the quickstart, what to do next ----------------

INSTALL = [
    "python3 -m venv .venv && . .venv/bin/activate",
    "pip install torch==2.14.1 torchvision==0.29.1 -e .",
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 -e '.[dev]' && python -m pytest -n 2 --dist loadgroup",
]  # fmt: skip
README_INSTALL = f"{INSTALL[0]} && {INSTALL[1]} && "
# README's first command: its install is CI's (the test command installs the same plus
# '[dev]'); its run is QUICKSTART's, below.
README_QUICKSTART = Doc(
    README_INSTALL + "python -m hooktrain recipes/quickstart.yaml", replace=((README_INSTALL, ""),)
)
# The quickstart's 960 iterations on single small crops: the same data, model, hooks,
# schedule and checkpoint names in seconds instead of 3 minutes. The full run, and the
# mIoU it reaches, is `bench/quickstart.py`.
SMALL_STEPS = "--cfg-options data.train.batch_size=1 data.train.pipeline.crop_size=[32,32] data.train.num_workers=0"
QUICKSTART = Doc("python -m hooktrain recipes/quickstart.yaml", append=SMALL_STEPS)
CONFIG = Doc("hooktrain config recipes/quickstart.yaml")
RESUME = Doc("python -m hooktrain recipes/quickstart.yaml --resume", append=SMALL_STEPS)
TEST = Doc(
    "hooktrain test recipes/quickstart.yaml --checkpoint work_dirs/quickstart/checkpoints/iter_960"
)
EXPORT = Doc("hooktrain export work_dirs/quickstart/checkpoints/iter_960 shapes.safetensors")
PREDICT = Doc("hooktrain predict shapes.safetensors data/some_images/ --out predictions/")
# docs/analysis.md, on the quickstart's work dir.
PLOT = Doc("hooktrain plot work_dirs/quickstart --keys train/loss val/loss val/mIoU train/lr --out curves.png")
BROWSE = Doc("hooktrain browse recipes/quickstart.yaml --num 8 --out browse/")
BENCHMARK = Doc("hooktrain benchmark recipes/quickstart.yaml", append="--iters 1 --warmup 0")
TWO_CPU_PROCESSES = Doc(
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port "
    "29650 -m hooktrain recipes/quickstart.yaml --work-dir work_dirs/quickstart-2proc "
    "--cfg-options train.max_iters=20",
    append=SMALL_STEPS,
)


def test_install_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci_command = readme.split("<!-- test-command", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert ci_command == INSTALL[2]
    with_dev_extra = INSTALL[1].replace("-e .", "-e '.[dev]'")
    assert ci_command.startswith(f"{INSTALL[0]} && {with_dev_extra} && ")
    assert README_QUICKSTART.shell() == QUICKSTART.text  # run below


@pytest.mark.slow
def test_quickstart_page_commands_in_order(sandbox):
    """The quickstart (data generated on the fly), then every next step the page lists,
    against its work dir, in the page's order."""
    result = run(QUICKSTART, sandbox)
    rows = history(sandbox / "work_dirs" / "quickstart")
    final = [row for row in rows if "val/mIoU" in row][-1]
    assert final["iter"] == 960 and "validation at iter 960 on 200 images" in result.output
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]

    assert "max_iters: 960" in run(CONFIG, sandbox).stdout
    resumed = run(RESUME, sandbox)
    assert "already at iteration 960 of 960: nothing to train" in resumed.output
    tested = run(TEST, sandbox)
    assert f"val/mIoU: {final['val/mIoU']:.4f}" in tested.output  # the same weights, the same data

    run(EXPORT, sandbox)
    images = sandbox / "data" / "some_images"
    images.mkdir()
    for i, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
        picture = np.full((70 + 10 * i, 90, 3), 30, np.uint8)
        cv2.circle(picture, (45, 38), 25, colour, -1)
        cv2.imwrite(str(images / f"photo{i}.jpg"), picture)
    run(PREDICT, sandbox)
    labels = cv2.imread(str(sandbox / "predictions" / "photo1_label.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (80, 90) and (sandbox / "predictions" / "photo0.png").is_file()

    run(PLOT, sandbox)
    assert cv2.imread(str(sandbox / "curves.png")).shape == (750, 1000, 3)  # 2 x 2 panels
    assert len(list((sandbox / "work_dirs" / "quickstart" / "confusion").glob("confusion_iter_*.csv"))) == 2


# The page's steps that need no trained run, on the quickstart's data: tests of their own, so
# that the test workers share them.


@pytest.mark.slow
def test_quickstart_page_browse_and_benchmark(shapes_sandbox):
    run(BROWSE, shapes_sandbox)
    assert len(list((shapes_sandbox / "browse").glob("train_*.png"))) == 8
    report = json.loads(run(BENCHMARK, shapes_sandbox).stdout.splitlines()[-1])
    assert report["params"]["total"] > 0 and len(report["measurements"]) == 3


@pytest.mark.slow
def test_quickstart_page_two_cpu_processes(shapes_sandbox):
    run(TWO_CPU_PROCESSES, shapes_sandbox)
    rows = history(shapes_sandbox / "work_dirs" / "quickstart-2proc")
    assert rows[-1]["iter"] == 20 and any("val/mIoU" in row for row in rows)


CONVERT = Doc("hooktrain data convert data/ADEChallengeData2016 data/ade20k --shards 16")
ACCELERATE_CONFIG = Doc("accelerate config default")
ADE20K = Doc(
    "accelerate launch -m hooktrain recipes/ade20k.yaml",
    append=TINY_ADE + FROM_CONVERTED,
)
ADE20K_FOLDER = Doc(
    'accelerate launch -m hooktrain recipes/ade20k.yaml --cfg-options "data.train.source={type: '
    'folder, root: data/ADEChallengeData2016, split: training}" "data.val.source={type: folder, '
    'root: data/ADEChallengeData2016, split: validation}"',
    append=TINY_ADE,
)
ADE20K_8_GPUS = Doc(
    "accelerate launch --multi_gpu --num_processes 8 -m hooktrain recipes/ade20k.yaml",
    env=CPU,
    replace=(("--num_processes 8", "--num_processes 2 --main_process_port 29671"),),
    append=TINY_ADE + FROM_CONVERTED,
)
ADE20K_2_NODES = Doc(
    "accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK "
    "--main_process_ip $MASTER_ADDR --main_process_port 29500 -m hooktrain recipes/ade20k.yaml",
    # Two "nodes" on this machine, one process each; each launcher would otherwise give its
    # process every core (and spinning OpenMP threads on shared cores crawl).
    env={**CPU, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"},
    replace=(("--num_processes 16", "--num_processes 2"), ("29500", "29672")),
    append=TINY_ADE + FROM_CONVERTED,
)


def converted_ade20k(sandbox: Path) -> Path:
    """The page's first steps: a tiny ADEChallengeData2016 folder converted, Accelerate's
    default config written. Returns the run's work dir."""
    write_ade_challenge_folder(sandbox / "data" / "ADEChallengeData2016")
    run(CONVERT, sandbox)
    assert len(list((sandbox / "data" / "ade20k" / "data").glob("train-*.parquet"))) == 16
    run(ACCELERATE_CONFIG, sandbox)
    assert (sandbox / "hf_home" / "accelerate" / "default_config.yaml").is_file()
    return sandbox / "work_dirs" / "ade20k"


@pytest.mark.slow
@pytest.mark.parametrize("docs", [(ADE20K, ADE20K_FOLDER), (ADE20K_8_GPUS,)], ids=["one_process", "eight_gpus"])
def test_ade20k_commands_on_a_tiny_local_copy(sandbox, docs):
    work_dir = converted_ade20k(sandbox)
    for number, doc in enumerate(docs):
        run(doc, sandbox)
        assert_trained_and_evaluated(work_dir)
        assert "mixed_precision: bf16" in (work_dir / "recipe.yaml").read_text()
        work_dir.rename(work_dir.with_name(f"ade20k-{number}"))  # each command starts afresh


@pytest.mark.slow
def test_ade20k_on_two_nodes(sandbox):
    work_dir = converted_ade20k(sandbox)
    logs = [sandbox / f"node{rank}.log" for rank in (0, 1)]
    nodes = [start(Doc(ADE20K_2_NODES.text, {**ADE20K_2_NODES.env, "NODE_RANK": str(rank)},
                       ADE20K_2_NODES.replace, ADE20K_2_NODES.append), sandbox, logs[rank])
             for rank in (0, 1)]  # fmt: skip
    codes = [node.wait(timeout=600) for node in nodes]
    assert codes == [0, 0], "".join(log.read_text()[-3000:] for log in logs)
    assert_trained_and_evaluated(work_dir)


RUN_HERE = [
    README_QUICKSTART, QUICKSTART, CONFIG, RESUME, TEST, EXPORT, PREDICT, PLOT, BROWSE, BENCHMARK, TWO_CPU_PROCESSES,
    CONVERT, ACCELERATE_CONFIG, ADE20K, ADE20K_FOLDER, ADE20K_8_GPUS, ADE20K_2_NODES,
]  # fmt: skip


def test_every_documented_command_is_run_here():
    from test_doc_commands_data import RUN_HERE as RUN_IN_DATA_FILE

    documented = documented_commands()
    declared = {doc.text for doc in RUN_HERE + RUN_IN_DATA_FILE} | set(INSTALL)
    unrun = {command: pages for command, pages in documented.items() if command not in declared}
    assert not unrun, (
        f"documented commands no test runs (declare them in {Path(__file__).name} or "
        f"test_doc_commands_data.py): {unrun}"
    )
    stale = declared - set(documented)
    assert not stale, f"commands declared here that no page shows any more: {stale}"
