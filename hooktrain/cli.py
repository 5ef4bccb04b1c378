"""Command line: ``hooktrain RECIPE`` trains; ``config``, ``plugins`` and more are subcommands.

Bad input (a recipe key, a file, a dataset column) prints one line and exits with code 2;
a run stopped by SIGTERM / SIGINT exits with 143 / 130 after its hooks have run, leaving
``stopped.json`` in its work dir for requeue scripts; a non-finite loss exits with 3, a failure
another rank caused with 1 (see docs/distributed.md and docs/checkpoints.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from hooktrain.errors import RunError, UserError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


def _add_recipe_args(parser: argparse.ArgumentParser, *, work_dir: bool = True) -> None:
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe keys, e.g. train.max_iters=100 data.train.batch_size=4 "
        "(values are YAML: x=[1,2], y=null); may be given more than once, later keys win",
    )
    if work_dir:
        parser.add_argument("--work-dir", help="run directory (default: work_dirs/<recipe name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hooktrain",
        description="Train semantic segmentors from a recipe: `hooktrain RECIPE` trains.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a recipe (the default command)")
    _add_recipe_args(train)
    train.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="continue from the newest complete checkpoint of the work dir, or from PATH",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="start over in a work dir that holds checkpoints (they are moved aside)",
    )

    config = sub.add_parser(
        "config",
        help="print the resolved recipe after the checks a run makes before it starts (schema, hook "
        "options, encoder and heads on the meta device, load_from's shapes)",
    )
    _add_recipe_args(config)

    test = sub.add_parser("test", help="evaluate a checkpoint on the validation split")
    _add_recipe_args(test)
    test.add_argument(
        "--checkpoint", required=True, help="a checkpoint directory or a .safetensors file"
    )
    test.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation as MMSegmentation's: multi-scale (model.inference.scales, or "
        "0.5 to 1.75 by 0.25 when null) and flip, averaging probabilities",
    )

    sub.add_parser("plugins", help="list every discoverable hook")
    sub.add_parser("reference", help="print the recipe reference (docs/recipes.md) as Markdown")

    export = sub.add_parser(
        "export",
        help="write a checkpoint's model into one file: .safetensors (weights + recipe) or .onnx (verified graph)",
    )
    export.add_argument("checkpoint", help="a checkpoint directory (iter_N, best) or its latest file")
    export.add_argument("out", help="the file to write; its suffix picks the format: .safetensors or .onnx")

    convert = sub.add_parser(
        "convert", help="convert an MMSegmentation, transformers or smp checkpoint into one exported file, "
        "or a sharded checkpoint into its whole model.safetensors"
    )
    convert_sub = convert.add_subparsers(dest="convert_kind", required=True)
    sources = {
        "mmseg": "an MMSegmentation model-zoo checkpoint (.pth)",
        "transformers": "a transformers EoMT, Mask2Former, SegFormer or UperNet: a directory, weights file or Hub id",
        "smp": "a segmentation_models_pytorch Unet state dict (tu-<timm encoder>): a file or a save_pretrained directory",
    }
    for kind, source_help in sources.items():
        kind_parser = convert_sub.add_parser(kind, help=f"convert {source_help}")
        kind_parser.add_argument("source", help=source_help)
        derived = " (default: derived from its config.json)" if kind == "transformers" else ""
        kind_parser.add_argument(
            "--recipe", required=not derived, help=f"recipe describing the checkpoint's model{derived}"
        )
        kind_parser.add_argument("--out", required=True, help="output .safetensors file (as `hooktrain export`)")
        kind_parser.add_argument(
            "--cfg-options", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="override recipe keys"
        )
    dcp = convert_sub.add_parser(
        "dcp", help="write the whole weights of a sharded checkpoint (train.sharded_checkpoint)"
    )
    dcp.add_argument("source", help="a sharded checkpoint directory (iter_N)")
    dcp.add_argument("--out", help="output .safetensors file (default: the checkpoint's own model.safetensors, "
                     "after which test, export and load_from take the directory)")  # fmt: skip

    predict = sub.add_parser("predict", help="segment images with an exported model")
    predict.add_argument("model", help="a .safetensors or .onnx file written by `hooktrain export`, or a model "
                         "shared with `hooktrain push`: hf://OWNER/NAME[@REVISION]")  # fmt: skip
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or directories")
    predict.add_argument("--out", required=True, help="directory for the colour and label PNGs (GeoTIFFs when tiled)")
    predict.add_argument(
        "--tiled", action=argparse.BooleanOptionalAction, default=None,
        help=f"predict in tiles into a label GeoTIFF, reading windows (default: TIFFs and images over "
        f"{4096 * 4096} pixels); --no-tiled predicts every image whole",
    )  # fmt: skip
    predict.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="tile size (default: the recipe's "
                         "model.inference.crop_size)")  # fmt: skip
    predict.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="tile stride (default: the recipe's "
                         "model.inference.stride)")  # fmt: skip
    predict.add_argument("--blend", choices=["mean", "hann", "gaussian", "center"],
                         help="how tile overlaps blend (default: the recipe's model.inference.blend)")  # fmt: skip
    predict.add_argument("--probabilities", action="store_true", help="tiled: also write <stem>_probs.tif, one "
                         "uint8 band per class")  # fmt: skip
    predict.add_argument("--batch-size", type=int, default=1, help="tiles (or images) run together (default: 1)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar of the tiles")

    push = sub.add_parser(
        "push", help="share a trained model on the Hugging Face Hub: the exported model, its recipe, metrics, "
        "training curves and a model card, in one commit"
    )
    push.add_argument("source", metavar="WORK_DIR_OR_CHECKPOINT", help="a run's work dir, or one checkpoint directory")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repository, OWNER/NAME (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                      "its visibility)")  # fmt: skip
    push.add_argument("--revision", metavar="BRANCH", help="the branch to commit to (created from main if missing; "
                      "default: main)")  # fmt: skip
    push.add_argument("--commit-message", metavar="MSG", help="the commit's summary line")
    push.add_argument("--checkpoint", metavar="best|latest|iter_N", help="which checkpoint of a work dir "
                      "(default: best when the run saved one, else latest)")  # fmt: skip

    plot = sub.add_parser("plot", help="plot curves from runs' metrics.jsonl, several runs overlaid")
    plot.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="run directories (each has metrics.jsonl)")
    plot.add_argument(
        "--keys",
        nargs="+",
        metavar="KEY",
        help="history keys to plot, one panel each, e.g. train/loss val/mIoU (default: the loss "
        "terms, the learning rate and the validation metrics found)",
    )
    plot.add_argument("--out", required=True, help="the PNG file to write")
    plot.add_argument("--log-scale", action="store_true", help="logarithmic y axes")

    browse = sub.add_parser(
        "browse", help="write the samples exactly as the model sees them after the pipeline, as PNGs"
    )
    _add_recipe_args(browse, work_dir=False)
    browse.add_argument("--split", choices=("train", "val"), default="train", help="the pipeline to show")
    browse.add_argument("--num", type=int, default=8, help="samples to write (default 8)")
    browse.add_argument("--out", required=True, help="directory for the PNGs")

    benchmark = sub.add_parser(
        "benchmark",
        help="parameters, FLOPs at the crop size, inference and train-step images/s and peak memory "
        "of a recipe's model on this device; ends with a JSON line",
    )
    _add_recipe_args(benchmark, work_dir=False)
    benchmark.add_argument("--checkpoint", help="weights to load (a checkpoint directory or a .safetensors file)")
    benchmark.add_argument("--iters", type=int, default=10, help="timed iterations per measurement (default 10)")
    benchmark.add_argument("--warmup", type=int, default=2, help="untimed iterations before each (default 2)")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    convert = data_sub.add_parser(
        "convert",
        help="turn an images/annotations folder into parquet shards with image/annotation "
        "columns (stream them locally or push them to the Hub)",
    )
    convert.add_argument(
        "path", help="dataset root in the ADEChallengeData2016 layout, or an images directory"
    )
    convert.add_argument("out", help="output directory for the parquet shards")
    convert.add_argument("--shards", type=int, default=8, help="parquet files per split")
    convert.add_argument("--split", help="only this split (default: every split found)")
    convert.add_argument(
        "--annotations",
        help="directory of PNG masks sharing the images' file stems (names before the "
        "suffixes, with --img-suffix / --seg-map-suffix)",
    )
    convert.add_argument(
        "--img-suffix",
        metavar="SUFFIX",
        help="images are the files ending with SUFFIX, which is cut off to pair them with the "
        "masks, e.g. _leftImg8bit.png (default: any image extension)",
    )
    convert.add_argument(
        "--seg-map-suffix",
        metavar="SUFFIX",
        default=".png",
        help="masks are the files ending with SUFFIX, e.g. _gtFine_labelIds.png (default: .png)",
    )
    convert.add_argument(
        "--palette",
        metavar="SOURCE",
        help="turn RGB colour masks into class-index PNGs: SOURCE is a recipe (its "
        "data.palette) or a JSON/YAML list of [r, g, b] colours, one per class index",
    )
    check = data_sub.add_parser(
        "check",
        help="read the first examples of a recipe's data and diagnose labels, masks and "
        "images; print class weights (exit 2 when the recipe would not train correctly)",
    )
    check.add_argument("recipe", help="path to a recipe YAML file")
    check.add_argument(
        "--split", choices=("train", "val"), default="train", help="the source to read"
    )
    check.add_argument("--limit", type=int, default=200, help="examples to read (default 200)")
    check.add_argument(
        "--cfg-options",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe keys, as for training (try the fixes the report suggests)",
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["train", *argv]
    return build_parser().parse_args(argv)


@command("train")
def train_command(args: argparse.Namespace) -> int:
    from hooktrain.checkpoint.workdir import claim_work_dir
    from hooktrain.recipe.schema import load_recipe

    recipe = load_recipe(args.recipe, args.cfg_options, args.work_dir)
    main_process = os.environ.get("RANK", "0") == "0"
    # Before importing torch, so that a second run into this work dir is refused at once.
    with claim_work_dir(Path(recipe.work_dir), force=args.force, resume=bool(args.resume), main_process=main_process):
        from hooktrain.engine.runner import IterRunner

        runner = IterRunner.from_recipe(recipe, resume=args.resume, force=args.force)
        try:
            return _train(runner)
        finally:
            runner.watch.close()
            runner.accelerator.end_training()


def _train(runner) -> int:
    """Run ``runner`` and return its exit code. A run that stopped to be resumed (a signal, or
    the data's server failing: its iteration saved) leaves ``stopped.json`` in the work dir
    (``hooktrain.checkpoint.stopped``), since a launcher reports it as a failure."""
    from hooktrain.engine.runner import DATA_OUTAGE
    from hooktrain.engine.signals import EXIT_CODES
    from hooktrain.errors import SourceOutage

    try:
        stopped_by = runner.run()
    except SourceOutage as exc:
        if exc is runner.outage:  # raised after the hooks saved the iteration, as for a signal
            _mark_stopped(runner, DATA_OUTAGE, exc.exit_code)
        raise
    if stopped_by is None:
        return 0
    _mark_stopped(runner, stopped_by, EXIT_CODES[stopped_by])
    return EXIT_CODES[stopped_by]


def _mark_stopped(runner, reason: str, exit_code: int) -> None:
    # run() returns after every hook's after_run: the checkpoint hook's save ends with a
    # barrier that every rank reaches once its files are written, so the checkpoint is whole.
    if runner.accelerator.is_main_process:
        import logging

        from hooktrain.checkpoint.stopped import mark_stopped

        path = mark_stopped(runner.work_dir, reason=reason, exit_code=exit_code, iteration=runner.state.iter)
        logging.getLogger("hooktrain").info("stopped to be resumed: wrote %s (exit code %d)", path, exit_code)


@command("config")
def config_command(args: argparse.Namespace) -> int:
    from hooktrain.recipe.schema import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.cfg_options, args.work_dir)
    from hooktrain.engine.preflight import preflight  # imports torch and timm: after the fast checks

    preflight(recipe)
    print(dump_recipe(recipe), end="")
    return 0


@command("test")
def test_command(args: argparse.Namespace) -> int:
    import json

    from hooktrain.checkpoint.weights import read_shapes, weights_file
    from hooktrain.evaluation.validation import EvalOptions, Evaluation
    from hooktrain.recipe.schema import load_recipe

    recipe = load_recipe(args.recipe, args.cfg_options, args.work_dir)
    read_shapes(weights_file(args.checkpoint))  # a wrong file is refused before the slow imports
    from hooktrain.engine.runner import IterRunner

    if args.tta:
        recipe.model.inference = recipe.model.inference.with_tta()
    runner = IterRunner.for_evaluation(recipe, args.checkpoint)
    specs = [s for s in recipe.hooks if s.type == "eval"]  # the recipe's eval options, if any
    options = EvalOptions.from_hook_options(specs[0].model_extra or {}) if specs else EvalOptions()
    try:
        metrics = Evaluation(options).run(runner, name="test")
    finally:
        runner.watch.close()
        runner.accelerator.end_training()
    if runner.accelerator.is_main_process:
        out = Path(runner.work_dir) / "test_metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(args.checkpoint), **metrics}
        if args.tta:
            inference = recipe.model.inference
            record["tta"] = {"scales": inference.scales, "flip": inference.flip}
        out.write_text(json.dumps(record, indent=1))
        print(f"metrics written to {out}")
    return 0


@command("data")
def data_command(args: argparse.Namespace) -> int:
    return {"convert": _data_convert, "check": _data_check}[args.data_command](args)


def _data_convert(args: argparse.Namespace) -> int:
    from hooktrain.tools.convert import convert_folder

    palette = None
    if args.palette is not None:
        from hooktrain.tools.palette import load_palette

        palette = load_palette(args.palette)
        for colour, classes in palette.duplicates:
            print(f"note: colour {list(colour)} is given to classes {classes} in "
                  f"{palette.source}; its pixels become class {classes[0]}")  # fmt: skip
    written = convert_folder(
        args.path, args.out, shards=args.shards, split=args.split,
        annotations_dir=args.annotations, palette=palette,
        img_suffix=args.img_suffix, seg_map_suffix=args.seg_map_suffix,
    )  # fmt: skip
    for split, files in written.items():
        print(f"{split}: {len(files)} parquet files in {files[0].parent if files else args.out}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from hooktrain.tools.check import check_data

    check_data(args.recipe, args.cfg_options, split=args.split, limit=args.limit)
    return 0


@command("export")
def export_command(args: argparse.Namespace) -> int:
    from hooktrain.deploy.export import export_checkpoint

    print(f"exported {export_checkpoint(args.checkpoint, args.out, report=print)}")
    return 0


@command("convert")
def convert_command(args: argparse.Namespace) -> int:
    if args.convert_kind == "dcp":
        from hooktrain.checkpoint.dcp import consolidate

        print(f"wrote the whole weights of {args.source} to {consolidate(args.source, args.out)}")
        return 0
    from hooktrain.deploy.convert import convert

    out = convert(args.convert_kind, args.source, args.recipe, args.out, args.cfg_options)
    print(f"converted {args.source} into {out}")
    return 0


@command("predict")
def predict_command(args: argparse.Namespace) -> int:
    from hooktrain.deploy.predict import TileOptions, predict_images
    from hooktrain.models.hub import is_hub_id, resolve_weights

    tiles = TileOptions(tiled=args.tiled, crop_size=args.crop_size, stride=args.stride, blend=args.blend,
                        probabilities=args.probabilities, progress=not args.no_progress)  # fmt: skip
    model = resolve_weights(args.model, "predict") if is_hub_id(args.model) else args.model  # hf://OWNER/NAME
    written = predict_images(model, args.inputs, args.out, tiles, batch_size=args.batch_size)
    pngs = sum(path.suffix == ".png" for path in written)
    geotiffs = f" and {len(written) - pngs} label GeoTIFFs" if len(written) > pngs else ""
    print(f"wrote {pngs} colour masks (and *_label.png){geotiffs} to {args.out}")
    return 0


@command("push")
def push_command(args: argparse.Namespace) -> int:
    from hooktrain.deploy.hub_push import push

    push(args.source, args.repo_id, private=args.private, revision=args.revision,
         commit_message=args.commit_message, checkpoint=args.checkpoint, report=print)  # fmt: skip
    return 0


@command("plot")
def plot_command(args: argparse.Namespace) -> int:
    from hooktrain.tools.plot import plot_runs

    print(f"wrote {plot_runs(args.work_dirs, args.out, keys=args.keys, log_scale=args.log_scale)}")
    return 0


@command("browse")
def browse_command(args: argparse.Namespace) -> int:
    from hooktrain.tools.browse import browse

    written = browse(args.recipe, args.cfg_options, split=args.split, num=args.num, out=args.out)
    print(f"wrote {len(written)} samples to {args.out}")
    return 0


@command("benchmark")
def benchmark_command(args: argparse.Namespace) -> int:
    from hooktrain.tools.benchmark import benchmark

    benchmark(args.recipe, args.cfg_options, checkpoint=args.checkpoint, iters=args.iters, warmup=args.warmup)
    return 0


@command("reference")
def reference_command(args: argparse.Namespace) -> int:
    from hooktrain.recipe.reference import recipe_reference

    print(recipe_reference(), end="")
    return 0


@command("plugins")
def plugins_command(args: argparse.Namespace) -> int:
    from hooktrain.hooks import discover_hooks

    hooks = discover_hooks()
    if not hooks:
        print("no hooks installed")
        return 0
    width = max(len(name) for name in hooks)
    dist_width = max(len(info.distribution) for info in hooks.values())
    for name, info in sorted(hooks.items()):
        print(f"{name:<{width}}  {info.distribution:<{dist_width}}  {info.description}")
    return 0


def _report(message: str) -> None:
    rank = os.environ.get("RANK", "0")
    prefix = f"[rank {rank}] " if rank != "0" else ""
    print(f"{prefix}hooktrain: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``hooktrain`` console script and ``python -m hooktrain``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code = COMMANDS[args.command](args)
    except UserError as exc:
        _report(str(exc))
        code = UserError.exit_code
    except RunError as exc:
        if exc.per_rank or os.environ.get("RANK", "0") == "0":
            _report(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C before training started, or a second signal
        _report(str(exc) or "interrupted")
        code = getattr(exc, "exit_code", 130)
    sys.exit(code)
