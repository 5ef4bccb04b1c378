"""The route a reader follows from ``hooktrain RECIPE`` to the first training iteration.

Runs ``hooktrain train recipes/quickstart.yaml`` in this process on a tiny generated dataset,
traces every call into ``hooktrain/`` code (``sys.setprofile``) until the first train step,
and reports the *stops*: the functions ``cli.train_command`` calls and the functions those
call (two levels: what a reader opens to follow the route), skipping comprehensions,
lambdas and module bodies. From them: the modules visited, and how often the route climbs
back into a module it had already left. Not a speed benchmark: it measures how the code
reads, so its results are not under bench/results (docs/architecture.md quotes them).

    python bench/route.py [--show]

The last line printed is one line of JSON. To measure another revision, run this file with
that revision's checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
TINY = [
    "train.max_iters=1",
    "data.train.num_workers=0",
    "data.train.shuffle_buffer=8",
    *(f"data.{split}.source.{key}" for split in ("train", "val")
      for key in ("num_train=16", "num_val=2", "image_size=32", "train_shards=2", "val_shards=1")),
]
SKIPPED = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>", "<module>")
GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


class FirstIteration(Exception):
    """Raised at the first train step to end the traced run."""


def trace_route(package_dir: Path) -> list[tuple[int, str, str]]:
    """``(depth, module, function)`` of every hooktrain function called by
    ``cli.train_command`` (depth 1) or, transitively, by hooktrain code it called, also through
    a library (a context manager's ``__enter__``), in call order, until the first train step.
    Module bodies run by imports are not on the route; a resumed generator is not a new stop."""
    package = str(package_dir) + os.sep
    stops: list[tuple[int, str, str]] = []
    depths: dict[int, int] = {}  # id(frame) -> depth, for the open frames on the route

    def module_of(code) -> str:
        relative = Path(code.co_filename).relative_to(package_dir.parent).with_suffix("")
        return ".".join(relative.parts)

    def profile(frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(package):
            return
        if event == "call" and id(frame) not in depths:
            if code.co_name == "train_command":
                depths[id(frame)] = 0
                return
            caller = frame.f_back  # the nearest hooktrain caller, through library frames
            while caller is not None and not caller.f_code.co_filename.startswith(package):
                caller = caller.f_back
            parent = depths.get(id(caller)) if caller is not None else None
            if parent is None or code.co_name == "<module>":  # imports are not on the route
                return
            if code.co_name == "train_step":
                raise FirstIteration
            depths[id(frame)] = parent + 1
            if code.co_name not in SKIPPED:
                stops.append((parent + 1, module_of(code), code.co_name))
        elif event == "return" and not code.co_flags & GENERATOR_FLAGS:
            depths.pop(id(frame), None)

    # The libraries the run imports on its way, imported before tracing starts: import-time
    # module bodies are not on the route, and tracing them (torch's, timm's) is most of this
    # bench's run time; the route is the same either way.
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    from hooktrain.cli import main

    with tempfile.TemporaryDirectory(prefix="hooktrain-route-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        sys.setprofile(profile)
        try:
            main(["train", QUICKSTART, "--work-dir", str(Path(tmp) / "run"), "--cfg-options", *TINY])
        except FirstIteration:
            pass
        finally:
            sys.setprofile(None)
            os.chdir(cwd)
    return stops


def summarise(stops: list[tuple[int, str, str]], levels: int = 2) -> dict:
    route = [(module, name) for depth, module, name in stops if depth <= levels]
    modules: list[str] = []
    climbs = 0
    previous = None
    for module, _ in route:
        if module != previous and module in modules:
            climbs += 1
        if module not in modules:
            modules.append(module)
        previous = module
    return {
        "stops": len(route),
        "modules": len(modules),
        "climbs_back": climbs,
        "module_order": modules,
        "all_modules_entered": len({module for _, module, _ in stops}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", action="store_true", help="print every stop")
    args = parser.parse_args()
    import hooktrain

    package_dir = Path(hooktrain.__file__).parent
    stops = trace_route(package_dir)
    summary = summarise(stops)
    if args.show:
        for depth, module, name in stops:
            if depth <= 2:
                print(f"{'  ' * depth}{module}.{name}")
    print(f"{package_dir}: {summary['stops']} stops in {summary['modules']} modules, climbing back "
          f"{summary['climbs_back']} times; {summary['all_modules_entered']} modules entered at any depth")  # fmt: skip
    print(json.dumps({"bench": "route", "package": str(package_dir), **summary}))


if __name__ == "__main__":
    main()
