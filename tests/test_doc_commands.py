"""Every shell command in README.md and docs/ runs here, as written, in a scratch directory.

Each documented command is declared once below as a :class:`Doc` and run by one of the tests.
Where a command needs GPUs, several machines, the Hub or days, its ``Doc`` states exactly what
is changed to run it on this CPU machine (processes on CPU through gloo, a tiny local ADE20K
copy, two iterations); nothing else differs from the page. ``test_every_documented_command_
is_run_here`` fails when a page gains a command that no test runs. The install commands are
run by CI itself: `.ci/run` runs README's test command, checked to contain them.
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
import pytest

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


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Path:
    """A directory laid out like a checkout (recipes/, examples/) with its own Accelerate
    config home, so a user's ~/.cache/huggingface/accelerate does not leak in."""
    for name in ("recipes", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path


@pytest.fixture
def shapes_sandbox(sandbox, tmp_path_factory) -> Path:
    """A sandbox whose data/shapes is the quickstart's dataset, generated once per session."""
    from hooktrain.data.shapes import generate_shapes
    from hooktrain.recipe import load_recipe

    source = load_recipe(ROOT / "recipes" / "quickstart.yaml").data.train.source
    params = source.model_dump(exclude={"type", "root", "split"})
    shared = tmp_path_factory.getbasetemp() / "quickstart_shapes"
    (sandbox / "data").mkdir()
    (sandbox / "data" / "shapes").symlink_to(generate_shapes(shared, **params))
    return sandbox


# -- README and docs/quickstart.md: install, the quickstart, what to do next ----------------

INSTALL = [
    "python3 -m venv .venv && . .venv/bin/activate",
    "pip install torch==2.14.1 torchvision==0.29.1 -e .",
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 -e '.[dev]' && python -m pytest -n 2 --dist loadfile",
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
    run(BROWSE, sandbox)
    assert len(list((sandbox / "browse").glob("train_*.png"))) == 8
    report = json.loads(run(BENCHMARK, sandbox).stdout.splitlines()[-1])
    assert report["params"]["total"] > 0 and len(report["measurements"]) == 3
    assert len(list((sandbox / "work_dirs" / "quickstart" / "confusion").glob("confusion_iter_*.csv"))) == 2

    run(TWO_CPU_PROCESSES, sandbox)
    rows = history(sandbox / "work_dirs" / "quickstart-2proc")
    assert rows[-1]["iter"] == 20 and any("val/mIoU" in row for row in rows)


# -- docs/quickstart.md and docs/distributed.md: ADE20K on GPUs, one and several machines ----

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


def test_ade20k_commands_on_a_tiny_local_copy(sandbox):
    write_ade_challenge_folder(sandbox / "data" / "ADEChallengeData2016")
    run(CONVERT, sandbox)
    assert len(list((sandbox / "data" / "ade20k" / "data").glob("train-*.parquet"))) == 16

    run(ACCELERATE_CONFIG, sandbox)
    assert (sandbox / "hf_home" / "accelerate" / "default_config.yaml").is_file()
    work_dir = sandbox / "work_dirs" / "ade20k"
    for number, doc in enumerate((ADE20K, ADE20K_FOLDER, ADE20K_8_GPUS)):
        run(doc, sandbox)
        assert_trained_and_evaluated(work_dir)
        assert "mixed_precision: bf16" in (work_dir / "recipe.yaml").read_text()
        work_dir.rename(work_dir.with_name(f"ade20k-{number}"))  # each command starts afresh

    logs = [sandbox / f"node{rank}.log" for rank in (0, 1)]
    nodes = [start(Doc(ADE20K_2_NODES.text, {**ADE20K_2_NODES.env, "NODE_RANK": str(rank)},
                       ADE20K_2_NODES.replace, ADE20K_2_NODES.append), sandbox, logs[rank])
             for rank in (0, 1)]  # fmt: skip
    codes = [node.wait(timeout=600) for node in nodes]
    assert codes == [0, 0], "".join(log.read_text()[-3000:] for log in logs)
    assert_trained_and_evaluated(work_dir)


# -- docs/checkpoints.md and docs/plugins.md -------------------------------------------------

EXPORT_BEST = Doc("hooktrain export work_dirs/run/checkpoints/best model.safetensors")
PREDICT_FILES = Doc(
    "python -m hooktrain predict model.safetensors photo.jpg more_images/ --out masks/"
)
PLUGIN_INSTALL = Doc("pip install ./examples/hooktrain-ema")
PLUGIN_RUN = Doc(
    "python -m hooktrain recipes/quickstart.yaml --work-dir work_dirs/plugin-test --cfg-options "
    "train.max_iters=4 data.train.num_workers=0 data.train.pipeline.crop_size=[64,64] "
    '"hooks=[{type: ema, momentum: 0.1}, {type: eval, interval: 4}]"'
)
# Shortens the quickstart to seconds for the runs that only set up what a command works on.
SHORT = (
    "--cfg-options train.max_iters=2 data.train.num_workers=0 data.train.pipeline.crop_size=[32,32]"
)


def test_checkpoint_export_and_predict_commands(shapes_sandbox):
    sandbox = shapes_sandbox
    setup = Doc("python -m hooktrain recipes/quickstart.yaml --work-dir work_dirs/run " + SHORT +
                ' "hooks=[{type: eval, interval: 2}, {type: checkpoint, interval: 2, save_best: mIoU}]"')  # fmt: skip
    run(setup, sandbox)
    run(EXPORT_BEST, sandbox)
    (sandbox / "more_images").mkdir()
    for name in ("photo.jpg", "more_images/a.png", "more_images/b.jpg"):
        cv2.imwrite(str(sandbox / name), np.full((24, 40, 3), 120, np.uint8))
    run(PREDICT_FILES, sandbox)
    written = sorted(p.name for p in (sandbox / "masks").iterdir())
    assert written == [
        "a.png",
        "a_label.png",
        "b.png",
        "b_label.png",
        "photo.png",
        "photo_label.png",
    ]


def test_plugin_commands_install_and_run_the_example(shapes_sandbox):
    sandbox = shapes_sandbox
    run(PLUGIN_INSTALL, sandbox)
    result = run(PLUGIN_RUN, sandbox)
    assert "ema(" in result.output and "validation at iter 4 on 200 images" in result.output


# -- docs/datasets.md: Cityscapes and VOC 2012 aug on tiny copies of the official layouts -----


def _cityscapes_source(key: str, split: str, labels: str) -> str:
    return (f'"data.{key}.source={{type: folder, root: data/cityscapes, images_dir: leftImg8bit/'
            f'{split}, annotations_dir: gtFine/{split}, img_suffix: _leftImg8bit.png, '
            f'seg_map_suffix: _gtFine_{labels}.png}}"')  # fmt: skip


TINY_DATASET = TINY_ADE + " data.val.num_workers=0"  # the copies' 32x64 and 24x40 images
CITYSCAPES_FOLDER = Doc(
    "accelerate launch -m hooktrain recipes/cityscapes.yaml --cfg-options "
    f"{_cityscapes_source('train', 'train', 'labelIds')} {_cityscapes_source('val', 'val', 'labelIds')}",
    append=TINY_DATASET,
)
CITYSCAPES_TRAIN_IDS = Doc(
    "accelerate launch -m hooktrain recipes/cityscapes.yaml --cfg-options data.label_map={} "
    f"{_cityscapes_source('train', 'train', 'labelTrainIds')} "
    f"{_cityscapes_source('val', 'val', 'labelTrainIds')}",
    append=TINY_DATASET,
)
VOC_FOLDER = Doc(
    'accelerate launch -m hooktrain recipes/voc12aug.yaml --cfg-options "data.train.source={type: '
    "folder, root: data/VOCdevkit/VOC2012, images_dir: JPEGImages, img_suffix: .jpg, "
    "annotations_dir: [SegmentationClass, SegmentationClassAug], split_file: "
    '[ImageSets/Segmentation/train.txt, ImageSets/Segmentation/aug.txt]}" "data.val.source={type: '
    "folder, root: data/VOCdevkit/VOC2012, images_dir: JPEGImages, img_suffix: .jpg, "
    'annotations_dir: SegmentationClass, split_file: ImageSets/Segmentation/val.txt}"',
    append=TINY_DATASET,
)


def test_dataset_page_commands_on_tiny_official_layouts(sandbox):
    from test_dataset_bases import write_cityscapes_folder, write_voc_folder

    write_cityscapes_folder(sandbox / "data" / "cityscapes")
    write_voc_folder(sandbox / "data" / "VOCdevkit")
    for doc, name in ((CITYSCAPES_FOLDER, "cityscapes"), (CITYSCAPES_TRAIN_IDS, "cityscapes"),
                      (VOC_FOLDER, "voc12aug")):  # fmt: skip
        result = run(doc, sandbox)
        work_dir = sandbox / "work_dirs" / name
        assert_trained_and_evaluated(work_dir)
        assert "validation at iter 2 on" in result.output
        label_map = (work_dir / "recipe.yaml").read_text().split("label_map:", 1)[1].split("\n", 1)[0]
        assert (label_map.strip() == "{}") == (doc is not CITYSCAPES_FOLDER)
        work_dir.rename(work_dir.with_name(f"{name}-{id(doc)}"))  # each command starts afresh


# -- docs/data-check.md: checking the quickstart and a tiny ADE20K folder; colour masks ------

DATA_CHECK = Doc("hooktrain data check recipes/quickstart.yaml")
DATA_CHECK_VAL = Doc("hooktrain data check recipes/quickstart.yaml --split val --limit 50")
DATA_CHECK_ADE = Doc(
    'hooktrain data check recipes/ade20k.yaml --cfg-options "data.train.source={type: folder, '
    'root: data/ADEChallengeData2016, split: training}"'
)
CONVERT_PALETTE = Doc(
    "hooktrain data convert data/colour_dataset data/colour_dataset_parquet --palette "
    "recipes/quickstart.yaml"
)
CONVERT_PALETTE_FILE = Doc(
    "hooktrain data convert data/photos data/photos_parquet --annotations data/photo_masks "
    "--palette colours.json"
)


def _paint_colour_masks(images: Path, masks: Path, palette: np.ndarray, seed: int) -> dict:
    """Random images and RGB masks painted with ``palette``; returns {stem: class indices}."""
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    painted = {}
    for i in range(3):
        rng = np.random.default_rng([seed, i])
        index = cv2.resize(rng.integers(0, len(palette), (3, 4), dtype=np.uint8), (40, 24),
                           interpolation=cv2.INTER_NEAREST)  # fmt: skip
        cv2.imwrite(str(images / f"{i}.jpg"), rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
        cv2.imwrite(str(masks / f"{i}.png"), cv2.cvtColor(palette[index], cv2.COLOR_RGB2BGR))
        painted[f"{i}.png"] = index
    return painted


def _converted_masks(out: Path, split: str) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((out / "data").glob(f"{split}-*.parquet")))
    return {cell["path"]: cv2.imdecode(np.frombuffer(cell["bytes"], np.uint8), cv2.IMREAD_UNCHANGED)
            for cell in table.column("annotation").to_pylist()}  # fmt: skip


def test_data_check_page_commands(shapes_sandbox):
    from hooktrain.recipe import load_recipe

    sandbox = shapes_sandbox
    for doc in (DATA_CHECK, DATA_CHECK_VAL):
        assert "Result: no problems" in run(doc, sandbox).stdout
    write_ade_challenge_folder(sandbox / "data" / "ADEChallengeData2016")
    checked = run(DATA_CHECK_ADE, sandbox).stdout
    assert "Classes (after reduce_zero_label; 150 classes" in checked
    assert "Result: no problems" in checked

    palette = np.asarray(load_recipe(ROOT / "recipes" / "quickstart.yaml").data.palette, np.uint8)
    root = sandbox / "data" / "colour_dataset"
    painted = {split: _paint_colour_masks(root / "images" / split, root / "annotations" / split,
                                          palette, seed)
               for seed, split in enumerate(("training", "validation"))}  # fmt: skip
    run(CONVERT_PALETTE, sandbox)
    for split, name in (("training", "train"), ("validation", "validation")):
        converted = _converted_masks(sandbox / "data" / "colour_dataset_parquet", name)
        assert converted.keys() == painted[split].keys()
        assert all((converted[k] == painted[split][k]).all() for k in converted)

    photos = _paint_colour_masks(sandbox / "data" / "photos", sandbox / "data" / "photo_masks",
                                 palette, 7)  # fmt: skip
    (sandbox / "colours.json").write_text(json.dumps(palette.tolist()))
    run(CONVERT_PALETTE_FILE, sandbox)
    converted = _converted_masks(sandbox / "data" / "photos_parquet", "train")
    assert all((converted[k] == photos[k]).all() for k in photos) and len(converted) == 3


# -- the inventory -------------------------------------------------------------------------

# -- docs/migrating-from-mmseg.md: bring your MMSegmentation checkpoint -----------------------

ZOO_CHECKPOINT = "upernet_r50_512x512_160k_ade20k_20200615_184328-8534de8d.pth"
ZOO_CONVERT = Doc(
    f"hooktrain convert mmseg {ZOO_CHECKPOINT} --recipe recipes/mmseg/upernet_r50_4xb4-160k_ade20k-512x512.yaml "
    "--out upernet_r50_ade20k.safetensors"
)
ZOO_PREDICT = Doc("hooktrain predict upernet_r50_ade20k.safetensors images/ --out masks/")


def test_bring_your_mmseg_checkpoint_commands(sandbox, mmseg_zoo_references):
    """The zoo file here is MMSegmentation's own UPerNet-R50, built and saved in the zoo's format
    by MMSegmentation 1.2.2 (random weights): the page's two commands, as written."""
    upernet = mmseg_zoo_references["upernet_r50_4xb4-160k_ade20k-512x512"]
    (sandbox / ZOO_CHECKPOINT).symlink_to(upernet / "checkpoint.pth")
    (sandbox / "images").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(sandbox / "images" / "room.jpg"), image)
    assert "converted" in run(ZOO_CONVERT, sandbox).output
    run(ZOO_PREDICT, sandbox)
    label = cv2.imread(str(sandbox / "masks" / "room_label.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (48, 64) and label.max() < 150
    assert (sandbox / "masks" / "room.png").is_file()


# -- docs/benchmarks.md: the benches' smoke run (CI) and the generated tables -----------------

RUN_ALL_QUICK = Doc("python bench/run_all.py --quick")
# As the page writes it, but only checking: a test never rewrites the committed docs.
REPORT = Doc("python bench/report.py", append="--check")


def test_benchmark_page_commands(mmseg_env, tmp_path):
    """Every CPU bench runs in its quick mode (nothing about speed is asserted), MMSegmentation's
    side included, writing its results file with where and when it ran; the tables are current."""
    run(REPORT, ROOT)
    quick = Doc(RUN_ALL_QUICK.text, env={"HOOKTRAIN_BENCH_RESULTS": str(tmp_path)})
    summary = json.loads(run(quick, ROOT, timeout=1800).stdout.strip().splitlines()[-1])
    names = [entry["bench"] for entry in summary["runs"]]
    assert set(names) == {"startup", "checkpoint", "metrics", "data_pipeline", "runner_overhead", "model_step",
                          "mmseg_parity", "quickstart"}  # fmt: skip
    for name in names:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["bench"] == name and record["quick"] is True
        assert record["machine"]["cpu"]["cores"] >= 1 and record["date"] and record["revision"]
    parity = json.loads((tmp_path / "mmseg_parity.json").read_text())
    assert [row["mode"] for row in parity["rows"]] == ["train", "whole"] and all(r["ratio"] > 0 for r in parity["rows"])
    pipeline = json.loads((tmp_path / "data_pipeline.json").read_text())
    assert pipeline["mmseg_same_outputs"] is True  # hooktrain and MMSegmentation 1.2.2 made the same crops


RUN_HERE = [
    README_QUICKSTART, QUICKSTART, CONFIG, RESUME, TEST, EXPORT, PREDICT, PLOT, BROWSE, BENCHMARK, TWO_CPU_PROCESSES,
    CONVERT, ACCELERATE_CONFIG, ADE20K, ADE20K_FOLDER, ADE20K_8_GPUS, ADE20K_2_NODES,
    EXPORT_BEST, PREDICT_FILES, PLUGIN_INSTALL, PLUGIN_RUN,
    CITYSCAPES_FOLDER, CITYSCAPES_TRAIN_IDS, VOC_FOLDER,
    DATA_CHECK, DATA_CHECK_VAL, DATA_CHECK_ADE, CONVERT_PALETTE, CONVERT_PALETTE_FILE,
    ZOO_CONVERT, ZOO_PREDICT, RUN_ALL_QUICK, REPORT,
]  # fmt: skip


def test_every_documented_command_is_run_here():
    documented = documented_commands()
    declared = {doc.text for doc in RUN_HERE} | set(INSTALL)
    unrun = {command: pages for command, pages in documented.items() if command not in declared}
    assert not unrun, (
        f"documented commands no test runs (declare them in {Path(__file__).name}): {unrun}"
    )
    stale = declared - set(documented)
    assert not stale, f"commands declared here that no page shows any more: {stale}"
